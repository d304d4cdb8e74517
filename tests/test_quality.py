"""The package stays typed (mypy --strict) and linted (ruff): the style guide's promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_passes_mypy_strict() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "p2pshare"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_code_passes_ruff() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "p2pshare", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
