"""Ten transfers at once through one node: five it sends, four it receives, and one whose
receiver stops reading after the manifest. The nine finish verified; the stalled one is dropped
by the node's idle timeout (set small here) and its memory is released."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import psutil
import pytest

from p2pshare.demo import spawn_node, stop_node, tree_hashes

from .netutil import api, last, offer, offer_view, receive

pytestmark = [pytest.mark.e2e]

IDLE_S = 6


class StallingProxy:
    """Forwards a TCP connection both ways, but stops reading from the server (the sending
    node) after ``limit`` bytes: to the sender the receiver has simply stopped reading."""

    def __init__(self, target_port: int, limit: int) -> None:
        self.target_port = target_port
        self.limit = limit
        self.forwarded = 0
        self.stalled = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def up() -> None:
            with contextlib.suppress(Exception):
                while data := await cr.read(65536):
                    sw.write(data)
                    await sw.drain()

        async def down() -> None:
            while self.forwarded < self.limit:
                data = await sr.read(min(65536, self.limit - self.forwarded))
                if not data:
                    return
                self.forwarded += len(data)
                cw.write(data)
                await cw.drain()
            self.stalled.set()
            await asyncio.Event().wait()  # never read again, never close

        for coro in (up(), down()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)


async def test_ten_concurrent_transfers_and_a_stalled_peer(study: Path, tmp_path: Path) -> None:
    hub = await spawn_node(
        "Hub Hospital", tmp_path / "hub", extra_args=["--idle-timeout", str(IDLE_S)]
    )
    peer = await spawn_node("Peer Hospital", tmp_path / "peer", extra_args=["--no-discovery"])
    try:
        async with api(hub, peer) as (h, p), StallingProxy(hub.port, 30_000) as proxy:
            outgoing = [await offer(h, study) for _ in range(5)]
            incoming = [await offer(p, study) for _ in range(4)]
            stalled = await offer(h, study)
            rss_before = psutil.Process(hub.proc.pid).memory_info().rss

            jobs = [
                receive(p, o["code"], tmp_path / f"at-peer-{i}", [hub.address])
                for i, o in enumerate(outgoing)
            ] + [
                receive(h, o["code"], tmp_path / f"at-hub-{i}", [peer.address])
                for i, o in enumerate(incoming)
            ]
            stalled_job = asyncio.create_task(
                receive(p, stalled["code"], tmp_path / "stalled", [proxy.address])
            )
            results = await asyncio.gather(*jobs)

            for events in results:
                assert last(events)["event"] == "complete", last(events)
            for i in range(5):
                assert tree_hashes(tmp_path / f"at-peer-{i}") == tree_hashes(study)
            for i in range(4):
                assert tree_hashes(tmp_path / f"at-hub-{i}") == tree_hashes(study)

            # the stalled transfer: the hub drops it once its peer stopped reading
            assert proxy.stalled.is_set() or await _wait(proxy.stalled, 30)
            for _ in range(600):
                view = await offer_view(h, stalled["offer_id"])
                if view["state"] in ("failed", "interrupted"):
                    break
                await asyncio.sleep(0.1)
            # timed out and its connection closed; the offer waits (interrupted) in case that
            # receiver comes back with its resume ticket, holding no connection or buffer
            assert view["state"] in ("failed", "interrupted"), view
            assert "stopped reading" in view["error"] or "sent nothing" in view["error"]
            stalled_job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stalled_job

            # the hub is still serving, and its memory stayed bounded
            info = await h.info()
            assert info["name"] == "Hub Hospital"
            rss_after = psutil.Process(hub.proc.pid).memory_info().rss
            assert rss_after < rss_before + 200 * 1024**2, (rss_before, rss_after)
    finally:
        await stop_node(peer)
        await stop_node(hub)


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    await asyncio.wait_for(event.wait(), timeout)
    return True
