"""The protocol core is sans-I/O: importing it must not drag in an event loop or I/O libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ["asyncio", "aiohttp", "zeroconf", "pydicom", "socket", "ssl"]

PROBE = """
import json, sys
before = set(sys.modules)
import {modules}
loaded = sorted(set(sys.modules) - before)
print(json.dumps(loaded))
"""


def _loaded_by(*modules: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PROBE.format(modules=", ".join(modules))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _top(names: list[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize(
    "modules",
    [
        ("p2pshare.protocol",),
        ("p2pshare.protocol.session",),
        ("p2pshare.protocol.sender",),
        ("p2pshare.protocol.receiver",),
        ("p2pshare.protocol.frames",),
        ("p2pshare.protocol.events",),
        (
            "p2pshare.protocol.session",
            "p2pshare.protocol.sender",
            "p2pshare.protocol.receiver",
            "p2pshare.protocol.frames",
            "p2pshare.protocol.events",
            "p2pshare.crypto",
            "p2pshare.codes",
            "p2pshare.manifest",
            "p2pshare.errors",
        ),
    ],
    ids=["package", "session", "sender", "receiver", "frames", "events", "whole-core"],
)
def test_protocol_core_imports_no_io_libraries(modules):
    loaded = _loaded_by(*modules)
    assert set(modules) <= set(loaded) | {"p2pshare.protocol"}
    bad = _top(loaded) & set(FORBIDDEN)
    assert not bad, f"importing {modules} loaded {sorted(bad)}"


def test_the_probe_would_notice():
    """Guard against a probe that can never fail: asyncio is visible when it is imported."""
    assert "asyncio" in _top(_loaded_by("asyncio"))
