"""The relay between real nodes: a transfer through it, everything it forwards captured and
searched for plaintext, and its limits (allow-list, rate, bytes, idle, channels).

The sending node is told to advertise an address nobody listens on and runs without LAN
discovery, so the only way the receiver can reach it is the relay listed in the QR code.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pydicom
import pytest
import pytest_asyncio

from p2pshare import crypto
from p2pshare.demo import NodeProc, free_port, spawn_node, stop_node, tree_hashes
from p2pshare.errors import ConnectionLost
from p2pshare.relay import RelayConfig, start_relay
from p2pshare.transfer.relay_client import RelayRefused, open_channel, rendezvous_token

from .conftest import NAMES
from .netutil import api, first, last, offer, offer_view, receive

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

#: a port nothing listens on: the direct path in the QR code leads nowhere
DEAD = "127.0.0.1:9"


async def _relay_proc(port: int, *extra: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2pshare", "relay", "--port", str(port), "--json", *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert b'"relay"' in line, line
    return proc


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def relay_port() -> AsyncIterator[int]:
    port = free_port()
    proc = await _relay_proc(port)
    try:
        yield port
    finally:
        proc.terminate()
        await proc.wait()


async def _pair(root: Path, relay: str) -> tuple[NodeProc, NodeProc]:
    sender = await spawn_node(
        NAMES[0],
        root / "s",
        extra_args=["--relay", f"ws://{relay}", "--advertise", DEAD, "--no-discovery"],
    )
    receiver = await spawn_node(NAMES[1], root / "r", extra_args=["--no-discovery"])
    return sender, receiver


async def test_transfer_through_the_relay_cli(
    relay_port: int, study: Path, tmp_path: Path
) -> None:
    sender, receiver = await _pair(tmp_path, f"127.0.0.1:{relay_port}")
    try:
        async with api(sender, receiver) as (s, r):
            o = await offer(s, study)
            assert o["addresses"] == [DEAD, f"relay:127.0.0.1:{relay_port}"]
            assert f"a=relay%3A127.0.0.1%3A{relay_port}" in o["uri"]
            events = await receive(r, o["uri"], tmp_path / "out")
            done = last(events)
            assert done["event"] == "complete", done
            assert done["path"] == "relay"
            assert first(events, "path")["path"] == "relay"
            assert first(events, "paired")["address"] == f"relay:127.0.0.1:{relay_port}"
            assert tree_hashes(tmp_path / "out") == tree_hashes(study)
            assert (await offer_view(s, o["offer_id"]))["state"] == "completed"
        # the receiving node recorded which path it used
        db = sqlite3.connect(receiver.data_dir / "node.sqlite3")
        assert db.execute("SELECT path FROM transfers").fetchall() == [("relay",)]
        db.close()
    finally:
        await stop_node(receiver)
        await stop_node(sender)


def _secrets(study: Path) -> dict[str, bytes]:
    """What must never cross the relay in clear, read from the study's own files."""
    out: dict[str, bytes] = {}
    for path in sorted(study.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        out["patient name"] = str(ds.PatientName).encode()
        out["patient id"] = str(ds.PatientID).encode()
        out["study uid"] = str(ds.StudyInstanceUID).encode()
        out[f"series {ds.SeriesInstanceUID}"] = str(ds.SeriesInstanceUID).encode()
        out[f"sop {ds.SOPInstanceUID}"] = str(ds.SOPInstanceUID).encode()
        pixels = bytes(ds.PixelData)
        for at in (len(pixels) // 3, len(pixels) // 2):
            run = pixels[at : at + 64]
            if len(set(run)) > 8:
                out[f"pixels {path.name}@{at}"] = run
    assert len(out["patient name"]) >= 4 and any(k.startswith("pixels") for k in out)
    return out


async def test_relay_forwards_ciphertext_only(study: Path, tmp_path: Path) -> None:
    captured: list[tuple[str, bytes]] = []
    runner, _app = await start_relay(
        RelayConfig(port=0), tap=lambda _ch, direction, data: captured.append((direction, data))
    )
    port = runner.addresses[0][1]
    sender, receiver = await _pair(tmp_path, f"127.0.0.1:{port}")
    try:
        async with api(sender, receiver) as (s, r):
            o = await offer(s, study)
            events = await receive(r, o["uri"], tmp_path / "out")
            assert last(events)["event"] == "complete" and last(events)["path"] == "relay"
    finally:
        await stop_node(receiver)
        await stop_node(sender)
        await runner.cleanup()
    s2r = b"".join(d for k, d in captured if k == "s2r")
    r2s = b"".join(d for k, d in captured if k == "r2s")
    # the capture is the whole transfer: at least the study's bytes went through
    study_bytes = sum(p.stat().st_size for p in study.rglob("*.dcm"))
    assert len(s2r) > study_bytes and r2s
    everything = s2r + r2s
    for name, secret in _secrets(study).items():
        assert secret not in everything, f"{name} crossed the relay in clear"
        assert not any(secret in d for _k, d in captured), name


# -- limits, against an in-process relay on loopback -----------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def limited() -> AsyncIterator[tuple[str, crypto.Identity, crypto.Identity]]:
    allowed, other = crypto.Identity.generate(), crypto.Identity.generate()
    runner, _app = await start_relay(
        RelayConfig(
            port=0,
            allow=frozenset({allowed.fingerprint}),
            rate_per_min=8,
            max_bytes=10_000,
            idle_timeout=1.0,
            max_channels=2,
        )
    )
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}", allowed, other
    finally:
        await runner.cleanup()


async def test_relay_limits(limited: tuple[str, crypto.Identity, crypto.Identity]) -> None:
    relay, allowed, other = limited
    token = rendezvous_token("0" * 32, b"k" * 32)
    async with aiohttp.ClientSession() as http:
        # a node not on the allow-list is refused with a sentence saying why
        with pytest.raises(RelayRefused, match="allow-list"):
            await open_channel(relay, token, "sender", other, http, wait_s=2)

        # two allowed ends meet; more than max_bytes in the channel closes it
        a_task = asyncio.create_task(open_channel(relay, token, "sender", allowed, http))
        b = await open_channel(relay, token, "receiver", allowed, http, wait_s=5)
        a = await a_task
        await a.send(b"x" * 6000)
        assert await b.recv() == b"x" * 6000
        await a.send(b"y" * 6000)  # 12,000 > 10,000: the relay closes both ends
        assert await b.recv() is None
        await a.close()
        await b.close()

        # idle: a paired channel with no traffic is closed after idle_timeout
        t2 = rendezvous_token("1" * 32, b"k" * 32)
        a_task = asyncio.create_task(open_channel(relay, t2, "sender", allowed, http))
        b = await open_channel(relay, t2, "receiver", allowed, http, wait_s=5)
        a = await a_task
        with pytest.raises(ConnectionLost):
            while True:  # nothing is sent; the relay must end it (recv → None)
                if await asyncio.wait_for(b.recv(), 10) is None:
                    raise ConnectionLost("closed")
        await a.close()
        await b.close()

        # per-address connection rate: 8 per minute, this is the 7th and 8th…, then refused
        refused = 0
        for _ in range(4):
            try:
                await open_channel(relay, token, "sender", other, http, wait_s=1)
            except RelayRefused as exc:
                refused += "too many connections" in exc.message
        assert refused >= 1
