"""bench/floor.py, the floor the throughput figures are read against, does the work it claims.

Nothing is timed here: these run its sender and receiver as real processes on 127.0.0.1 on a
small study and check that every instance arrives opened, verified and placed under its own SOP
Instance UID, and that a wrong key gets nothing placed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from p2pshare.demo import free_port
from p2pshare.dicom.synthetic import SeriesSpec, bench_series, generate_ct_study

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "floor.py"
TRANSPORTS = ["ws", "http", "stream"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    generate_ct_study(root, series=bench_series(5))
    return root


def run_pair(
    study: Path,
    out: Path,
    transport: str,
    send_key: bytes,
    receive_key: bytes,
    expected: Path | None = None,
    after_ready: Callable[[], object] = lambda: None,
) -> subprocess.CompletedProcess[str]:
    """One sender and one receiver; the receiver expects the digests of ``expected`` (default:
    the study sent). ``after_ready`` runs once the sender has listed its files."""
    port = str(free_port())
    common = ["--transport", transport, "--port", port]
    sender = subprocess.Popen(
        [sys.executable, str(SCRIPT), "send", *common, "--study", str(study)]
        + ["--key", send_key.hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert sender.stdout is not None
        assert sender.stdout.readline().strip() == "ready"
        after_ready()
        received = subprocess.run(
            [sys.executable, str(SCRIPT), "receive", *common, "--study", str(expected or study)]
            + ["--key", receive_key.hex(), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # the sender ends once its receiver is done, whatever the outcome
        sender.wait(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    return received


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_instance_is_placed_under_its_own_uid_byte_for_byte(
    study: Path, tmp_path: Path, transport: str
) -> None:
    key = os.urandom(32)
    out = tmp_path / "out"
    done = run_pair(study, out, transport, key, key)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    originals = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.read_bytes()
        for p in study.rglob("*.dcm")
    }
    assert report["instances"] == len(originals) == 5
    assert report["bytes"] == sum(len(b) for b in originals.values())
    placed = {p.name: p.read_bytes() for p in out.glob("*.dcm")}
    assert placed == {f"{uid}.dcm": data for uid, data in originals.items()}
    assert not any((out / ".parts").iterdir())  # every part was linked and removed


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_wrong_key_places_nothing(study: Path, tmp_path: Path, transport: str) -> None:
    out = tmp_path / "out"
    done = run_pair(study, out, transport, os.urandom(32), os.urandom(32))
    assert done.returncode != 0
    assert "failed authentication" in done.stderr
    assert not list(out.glob("*.dcm"))


def copy_of(study: Path, dest: Path) -> list[Path]:
    """Copy the study to ``dest``; its files in the order both sides number them."""
    shutil.copytree(study, dest)
    return sorted(dest.rglob("*.dcm"))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_instance_that_differs_from_its_expected_digest_stops_the_receiver(
    study: Path, tmp_path: Path, transport: str
) -> None:
    expected = tmp_path / "expected"
    altered = copy_of(study, expected)[2]
    data = bytearray(altered.read_bytes())
    data[-1] ^= 1  # the last pixel's byte: same UIDs, other content
    altered.write_bytes(data)
    key = os.urandom(32)
    done = run_pair(study, tmp_path / "out", transport, key, key, expected=expected)
    assert done.returncode != 0
    assert "instance #2 does not match its digest" in done.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_sender_that_fails_mid_study_ends_the_receiver_instead_of_hanging_it(
    study: Path, tmp_path: Path, transport: str
) -> None:
    copy = tmp_path / "study"
    last = copy_of(study, copy)[-1]
    key = os.urandom(32)
    # listed by the sender, gone when it comes to read it
    done = run_pair(
        copy, tmp_path / "out", transport, key, key, expected=study, after_ready=last.unlink
    )
    assert done.returncode != 0
    assert "the sender" in done.stderr


@pytest.fixture(scope="module")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 8.4 MB and one 18.9 MB instance."""
    root = tmp_path_factory.mktemp("big")
    generate_ct_study(
        root,
        series=[
            SeriesSpec("BIG", 1, 2048, 2048, 1.0, "abdomen"),
            SeriesSpec("HUGE", 1, 3072, 3072, 1.0, "chest"),
        ],
    )
    return root


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_instances_larger_than_the_stream_buffer_arrive_whole(
    big_study: Path, tmp_path: Path, transport: str
) -> None:
    """The stream receiver moves a partial record to the front of its 16 MiB buffer, and grows
    the buffer for a record that cannot fit."""
    sizes = sorted(p.stat().st_size for p in big_study.rglob("*.dcm"))
    assert sizes[0] > 8 << 20 and sizes[1] > 16 << 20
    key = os.urandom(32)
    out = tmp_path / "out"
    done = run_pair(big_study, out, transport, key, key)
    assert done.returncode == 0, done.stderr
    assert sorted(p.stat().st_size for p in out.glob("*.dcm")) == sizes
