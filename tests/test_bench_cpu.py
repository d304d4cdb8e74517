"""bench/transfer.py's CPU readings, which the throughput figures are weighed with, read the
time a process really used (its threads included)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_transfer", ROOT / "bench" / "transfer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_busy_process_with_threads_is_charged_for_all_of_them(bench: ModuleType) -> None:
    busy = (
        "import threading, time\n"
        "def spin():\n"
        "    end = time.process_time() + 0.4\n"
        "    while time.process_time() < end: pass\n"
        "t = threading.Thread(target=spin); t.start(); t.join()\n"
        "print('done', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        used = bench.cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    assert 0.35 <= used < 5  # the thread's 0.4 s (and start-up), not the sleep


def test_an_idle_process_is_charged_for_nothing_more(bench: ModuleType) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        first = bench.cpu_seconds(child.pid)
        time.sleep(0.3)
        assert bench.cpu_seconds(child.pid) - first < 0.05
    finally:
        child.kill()
        child.wait()
