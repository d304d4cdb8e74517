"""Fixtures for end-to-end tests: real `p2pshare` processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pshare.demo import NodeProc, two_nodes
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study

pytestmark = pytest.mark.e2e

#: The institutions every end-to-end test plays.
NAMES = ("Referring Hospital ED", "Trauma Centre Radiology")


@pytest.fixture(scope="session")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic CT study: two series, 20 instances, a few files in a sub-folder."""
    root = tmp_path_factory.mktemp("study")
    generate_ct_study(
        root,
        seed=7,
        series=[
            SeriesSpec("Head", slices=8, rows=64, columns=64, region="head"),
            SeriesSpec("Chest", slices=12, rows=96, columns=96, region="chest"),
        ],
    )
    return root


@dataclass
class CliResult:
    code: int
    lines: list[dict[str, Any]]
    stderr: str
    stdout: str

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("type") == kind]


class Cli:
    """Runs `python -m p2pshare …` as a real subprocess."""

    def __init__(self, tmp: Path) -> None:
        self.env = dict(
            os.environ, PYTHONUNBUFFERED="1", P2PSHARE_DATA_DIR=str(tmp / "default-data")
        )
        self.env.pop("P2PSHARE_TOKEN", None)

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "p2pshare",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env=self.env,
        )

    @staticmethod
    async def first_json(
        proc: asyncio.subprocess.Process, kind: str, timeout: float = 60
    ) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            if not line:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(
                    f"process ended before a {kind!r} line: {err.decode()[-2000:]}"
                )
            obj = json.loads(line)
            if obj.get("type") == kind:
                return obj

    @staticmethod
    async def finish(
        proc: asyncio.subprocess.Process,
        timeout: float = 120,
        seen: list[dict[str, Any]] | None = None,
    ) -> CliResult:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        lines = list(seen or [])
        for raw in out.decode().splitlines():
            raw = raw.strip()
            if raw.startswith("{"):
                lines.append(json.loads(raw))
        assert proc.returncode is not None
        return CliResult(proc.returncode, lines, err.decode(), out.decode())

    async def run(self, *args: str, timeout: float = 120) -> CliResult:
        return await self.finish(await self.start(*args), timeout)

    async def receive_at(
        self, node: NodeProc, code: str, out: str, *extra: str, as_json: bool = True
    ) -> CliResult:
        """`p2pshare receive CODE` driving the running node ``node`` into ``out``."""
        args = ["receive", code, "--node", node.url, "--data-dir", str(node.data_dir)]
        args += ["--out", out, *extra, *(["--json"] if as_json else [])]
        return await self.run(*args)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[NodeProc, NodeProc]]:
    """Two `p2pshare serve` processes: a referring hospital and a trauma centre."""
    async with two_nodes(tmp_path, *NAMES) as pair:
        yield pair


#: Chunks of 16 KiB and a quick first reconnection: transfers with many chunks, cut or held
#: anywhere, that resume at once (resume, cancel and receipt tests).
CHUNK = 16384
FAST = ("--reconnect-delay", "0.1", "--chunk-size", str(CHUNK))


@pytest.fixture(scope="session")
def chunked_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two series, 24 files of ~33 KB (3 chunks each at 16 KiB): cuts land everywhere, and a
    stream held after 300 kB has placed some files and staged more."""
    root = tmp_path_factory.mktemp("chunked-study")
    generate_ct_study(
        root,
        seed=99,
        series=[
            SeriesSpec("HEAD", slices=12, rows=128, columns=128, region="head"),
            SeriesSpec("CHEST", slices=12, rows=128, columns=128, region="chest"),
        ],
    )
    return root


@pytest.fixture
async def fast_nodes(tmp_path: Path) -> AsyncIterator[tuple[NodeProc, NodeProc]]:
    """Two `p2pshare serve` processes with :data:`FAST` settings."""
    async with two_nodes(tmp_path, *NAMES, sender_args=FAST, receiver_args=FAST) as pair:
        yield pair
