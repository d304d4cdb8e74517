"""A cancelled wait in ``Staging.write`` or ``Staging.drain`` must not lose a write still running.

Protects ``Staging._oldest_write``: it waits for the oldest queued write and only then forgets
it. If it forgot the write first (popped it, then waited), cancelling the coroutine waiting in
``write()`` (over ``max_pending``) or in ``drain()`` dropped a write that was still running on
its write thread from ``Staging._writes``: ``drain()``/``settle()`` then returned while that
write was still writing, so a file still being written was left out of a salvage, and
``close()``'s ``settle()`` no longer waited for it (``close()`` as a whole still waits, because it
closes each write thread's descriptors on that thread, behind any write still running: the last
test checks both).

Each write here takes its data from a callable that blocks the write thread on a
``threading.Event`` until the test releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from p2pshare import digest as file_digest
from p2pshare.manifest import MIN_CHUNK
from p2pshare.staging import WRITE_THREADS, Staging
from tests.protocol.helpers import make_manifest

CHUNK = MIN_CHUNK
TID = "00112233445566778899aabbccddeeff"
#: how long a waiter is given to (wrongly) finish while a write thread is still blocked
GRACE_S = 0.2


def make_files() -> list[bytes]:
    """Two files: #0 (even write thread) of 3 chunks, #1 (odd write thread) of 1 chunk."""
    rng = random.Random(5)
    return [rng.randbytes(3 * CHUNK - 100), rng.randbytes(CHUNK // 2)]


FILES = make_files()
MANIFEST = make_manifest(FILES, chunk_size=CHUNK)
assert 0 % WRITE_THREADS != 1 % WRITE_THREADS  # the two files go to different write threads


def chunks(fi: int) -> list[bytes]:
    data = FILES[fi]
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


class Gate:
    """A write thread's data callable that blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.open = threading.Event()

    def blocked(self, piece: bytes) -> Callable[[], bytearray]:
        def data() -> bytearray:
            self.started.set()
            assert self.open.wait(10), "the test never released the write"
            return bytearray(piece)

        return data

    async def running(self) -> None:
        """Wait until the blocked write is running on its write thread."""
        assert await asyncio.to_thread(self.started.wait, 5)


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    g = Gate()
    yield g
    g.open.set()  # never leave a write thread blocked after a failed test


class Stagings:
    """Builds Stagings as the receiver does, and closes each one after the test."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.made: list[Staging] = []

    def make(self, max_pending: int) -> Staging:
        out = self.out
        s = Staging(out, out / ".p2pshare-partial" / TID, MANIFEST, lambda _fi: None, max_pending)
        self.made.append(s)
        return s


@pytest.fixture
async def stagings(tmp_path: Path) -> AsyncIterator[Stagings]:
    made = Stagings(tmp_path / "out")
    yield made
    for s in made.made:
        # (RuntimeError: a test closed it already, and its write threads take no more work)
        with contextlib.suppress(OSError, RuntimeError):
            await s.close(remove_staging=False)


def open_descriptors_to(path: Path) -> list[int]:
    """This process's file descriptors that point at ``path``."""
    target = str(path.resolve())
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.append(int(name))
    return found


async def block_first_chunk(staging: Staging, gate: Gate) -> asyncio.Future[object]:
    """Queue chunk 0 of file #0 (not its last) with blocked data; return its write's future."""
    await staging.write(0, 0, gate.blocked(chunks(0)[0]), False, file_digest.hasher())
    assert len(staging._writes) == 1
    blocked = staging._writes[0]
    await gate.running()
    assert not blocked.done()
    return blocked


async def cancel_waiting_write(staging: Staging) -> None:
    """Start writing file #1 (the other write thread), which waits over ``max_pending`` for the
    blocked write, and cancel it while it waits."""
    waiter = asyncio.ensure_future(staging.write(1, 0, chunks(1)[0], True, file_digest.hasher()))
    for _ in range(100):
        await asyncio.sleep(0)
        if len(staging._writes) == 2:
            break
    await asyncio.sleep(0.01)
    assert not waiter.done(), "write() should wait while more than max_pending are queued"
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def still_waits(awaitable: asyncio.Future[None] | asyncio.Task[None]) -> bool:
    """True if ``awaitable`` is still running after a grace period."""
    await asyncio.sleep(GRACE_S)
    return not awaitable.done()


async def test_a_cancelled_wait_in_write_keeps_the_running_write_queued(
    stagings: Stagings, gate: Gate
) -> None:
    staging = stagings.make(max_pending=1)
    blocked = await block_first_chunk(staging, gate)
    await cancel_waiting_write(staging)

    # The write still running on its thread is remembered...
    assert blocked in staging._writes
    assert not blocked.done()
    # ...so settling waits for it rather than returning while it still writes.
    settle = asyncio.ensure_future(staging.settle())
    assert await still_waits(settle), "settle() returned while a write was still running"

    gate.open.set()
    await asyncio.wait_for(settle, 5)
    assert blocked.done() and not blocked.cancelled() and blocked.exception() is None
    assert len(staging._writes) == 0
    assert (staging.dir / "0.part").read_bytes() == chunks(0)[0]
    assert (staging.dir / "1.part").read_bytes() == FILES[1]


async def test_a_cancelled_drain_keeps_the_running_write_queued(
    stagings: Stagings, gate: Gate
) -> None:
    staging = stagings.make(max_pending=32)
    blocked = await block_first_chunk(staging, gate)
    # file #1 on the other write thread: written at once, so only the blocked write holds drain
    await staging.write(1, 0, chunks(1)[0], True, file_digest.hasher())
    assert len(staging._writes) == 2
    for _ in range(500):
        if staging._writes[-1].done():
            break
        await asyncio.sleep(0.005)
    assert staging._writes[-1].done()

    drain = asyncio.ensure_future(staging.drain())
    await asyncio.sleep(0.01)
    assert not drain.done()
    drain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drain

    assert blocked in staging._writes
    assert not blocked.done()
    # A second drain (the salvage after a cut does one) still waits for the blocked write, so
    # finished() then reports every file that had fully arrived.
    again = asyncio.ensure_future(staging.drain())
    assert await still_waits(again), "drain() returned while a write was still running"
    assert staging.finished() == []  # nothing reported past the running write

    gate.open.set()
    await asyncio.wait_for(again, 5)
    assert staging.finished() == [(1, file_digest.of_bytes(FILES[1]))]
    assert (staging.dir / "0.part").read_bytes() == chunks(0)[0]


async def test_close_after_a_cancelled_wait_waits_for_the_running_write(
    stagings: Stagings, gate: Gate
) -> None:
    """File #0's first chunk (not its last) is blocked; the writer of file #1 is cancelled while
    it waits. Closing must wait for the blocked write, then close the descriptor it left open
    for the file's next chunk, and keep the part whole."""
    staging = stagings.make(max_pending=1)
    part = staging.dir / "0.part"
    blocked = await block_first_chunk(staging, gate)
    await cancel_waiting_write(staging)
    assert blocked in staging._writes

    close = asyncio.ensure_future(staging.close(remove_staging=False))
    assert await still_waits(close), "close() returned while a write was still running"
    assert staging.dir.is_dir()
    assert not blocked.done()

    gate.open.set()
    await asyncio.wait_for(close, 5)
    assert blocked.done() and blocked.exception() is None
    # the chunk is on disk whole, and the descriptor the write left open for the file's next
    # chunk was closed by close(), after the write finished with it
    assert part.read_bytes() == chunks(0)[0]
    assert staging._open == {}
    assert open_descriptors_to(part) == []
    assert (staging.dir / "1.part").read_bytes() == FILES[1]
