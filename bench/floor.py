"""The floor under p2pshare's throughput: the work a transfer needs, timed with no protocol.

Two processes on 127.0.0.1 and one study. The sender reads each file and seals it whole with
p2pshare's own sealing (XChaCha20-Poly1305, as in the product). The receiver, per instance, does
what issue 2 asks of a receiver and nothing more:

* opens the record (authenticated decryption);
* hashes the plaintext (BLAKE3) and compares it with the digest it expects;
* writes it to a part file;
* reads its UIDs from the header (``identity_from_head``, pydicom underneath);
* after one ``syncfs`` per batch, links it into place under its SOP Instance UID, and syncs the
  folders at the end (durable, as p2pshare's receipt promises).

There is no pairing, manifest, acknowledgement, window, progress, database, audit or resume. The
receiver runs on one thread, but for flushing and linking, which a second thread does batch by
batch, as p2pshare's staging does. Three transports:

* ``ws``: an aiohttp WebSocket, one binary message per instance (p2pshare's wire);
* ``http``: one aiohttp HTTP response streaming every record, read with ``readexactly``;
* ``stream``: a plain asyncio stream, records received straight into one buffer
  (``asyncio.BufferedProtocol``): no aiohttp at all.

``bench/transfer.py --compare --floor`` runs them between its other contestants, from the same
clean state. What p2pshare loses against the ``ws`` floor is its own machinery; what one floor
loses against another is its transport. Run alone::

    .venv/bin/python bench/floor.py send --transport ws --port 9000 --study DIR --key HEX &
    .venv/bin/python bench/floor.py receive --transport ws --port 9000 --study DIR --key HEX \\
        --out OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import cast

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pshare import crypto  # noqa: E402
from p2pshare import digest as file_digest  # noqa: E402
from p2pshare.dicom.synthetic import study_files  # noqa: E402
from p2pshare.dicom.verify import identity_from_head, read_identity_of_verified  # noqa: E402
from p2pshare.errors import CryptoError  # noqa: E402
from p2pshare.staging import syncfs  # noqa: E402

#: record header: instance index, plaintext length (also the record's associated data)
RECORD = struct.Struct(">II")
TRANSPORTS = ("ws", "http", "stream")
PATH = "/floor"
#: the stream receiver's buffer; it grows for a record that does not fit
STREAM_BUFFER = 16 << 20
#: the least free space the stream receiver offers the socket at a time
MIN_READ = 1 << 20
#: how often the receiver makes a batch durable and links it into place (p2pshare's commit
#: thread batches the same way, as fast as syncfs returns)
BATCH_S = 0.02


def record(key: bytes, index: int, data: bytes) -> bytearray:
    header = RECORD.pack(index, len(data))
    return crypto.seal_after(header, key, index, data, header)


# -- sender -------------------------------------------------------------------------------------


async def send(transport: str, port: int, files: list[Path], key: bytes) -> None:
    """Serve the study to one receiver, then exit. A failure here ends the connection, so the
    receiver stops too."""
    done = asyncio.get_running_loop().create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    if transport in ("ws", "http"):

        async def over_ws(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(max_msg_size=64 << 20)
            await ws.prepare(request)
            try:
                for i, path in enumerate(files):
                    # aiohttp takes any bytes-like object; its hint says bytes
                    await ws.send_bytes(cast(bytes, record(key, i, path.read_bytes())))
                await ws.receive()  # the receiver closes once everything is in place
            finally:
                finished()
            return ws

        async def over_http(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            try:
                resp.content_length = sum(
                    RECORD.size + p.stat().st_size + crypto.TAG_BYTES for p in files
                )
                await resp.prepare(request)
                for i, path in enumerate(files):
                    await resp.write(cast(bytes, record(key, i, path.read_bytes())))
                await resp.write_eof()
            finally:
                finished()
            return resp

        app = web.Application()
        app.router.add_get(PATH, over_ws if transport == "ws" else over_http)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)
        await done
        await runner.cleanup()
        return

    class Sender(asyncio.Protocol):
        def connection_made(self, tr: asyncio.BaseTransport) -> None:
            assert isinstance(tr, asyncio.WriteTransport)
            self.tr = tr
            self.writable = asyncio.Event()
            self.writable.set()
            self.task = asyncio.ensure_future(self.run())

        def pause_writing(self) -> None:
            self.writable.clear()

        def resume_writing(self) -> None:
            self.writable.set()

        def connection_lost(self, exc: Exception | None) -> None:
            self.writable.set()
            finished()

        async def run(self) -> None:
            try:
                for i, path in enumerate(files):
                    self.tr.write(record(key, i, path.read_bytes()))
                    await self.writable.wait()
            except BaseException:
                self.tr.abort()  # the receiver sees the connection end
                finished()
                raise

    server = await asyncio.get_running_loop().create_server(Sender, "127.0.0.1", port)
    print("ready", flush=True)
    await done
    server.close()


# -- receiver -----------------------------------------------------------------------------------


class Placer:
    """Open, hash, write, identify and place each record, on the calling thread."""

    def __init__(self, key: bytes, out: Path, digests: list[str]) -> None:
        self.key = key
        self.out = out
        self.parts = out / ".parts"
        self.parts.mkdir(parents=True)
        self.digests = digests
        self.pending: list[tuple[int, str]] = []
        self.placed = 0
        self.bytes = 0
        self.last_batch = time.monotonic()
        #: flushing and linking run on one thread, batch by batch, as in p2pshare's staging
        self.committer = ThreadPoolExecutor(max_workers=1)
        self.commits: list[Future[None]] = []

    def take(self, header: bytes | memoryview, sealed: bytes | memoryview) -> None:
        index, length = RECORD.unpack(header)
        try:
            plain = crypto.open_sealed(self.key, index, sealed, bytes(header))
        except CryptoError:
            raise SystemExit(f"instance #{index} failed authentication") from None
        if file_digest.of_bytes(plain) != self.digests[index]:
            raise SystemExit(f"instance #{index} does not match its digest")
        part = self.parts / f"{index}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(plain)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        ident = identity_from_head(plain, length) or read_identity_of_verified(part)
        self.pending.append((index, ident.sop_instance_uid))
        self.bytes += length
        if time.monotonic() - self.last_batch >= BATCH_S:
            self.commit()

    def commit(self) -> None:
        self.last_batch = time.monotonic()
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        self.commits.append(self.committer.submit(self._commit, batch))

    def _commit(self, batch: list[tuple[int, str]]) -> None:
        syncfs(self.out)
        for index, uid in batch:
            part = self.parts / f"{index}.part"
            os.chmod(part, 0o640)
            os.link(part, self.out / f"{uid}.dcm")
            part.unlink()
        self.placed += len(batch)

    def finish(self) -> None:
        self.commit()
        for batch in self.commits:
            batch.result()
        self.committer.shutdown()
        for folder in (self.out, self.parts):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


async def receive(transport: str, port: int, placer: Placer, count: int) -> None:
    if transport == "ws":
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}{PATH}", max_msg_size=64 << 20)
            for _ in range(count):
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    raise SystemExit(f"the sender stopped early ({msg.type.name})")
                view = memoryview(msg.data)
                placer.take(view[: RECORD.size], view[RECORD.size :])
            placer.finish()
            await ws.close()
        return

    if transport == "http":
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{PATH}") as r:
            if r.status != 200:
                raise SystemExit(f"the sender failed (HTTP {r.status})")
            try:
                for _ in range(count):
                    header = await r.content.readexactly(RECORD.size)
                    _, length = RECORD.unpack(header)
                    placer.take(header, await r.content.readexactly(length + crypto.TAG_BYTES))
            except asyncio.IncompleteReadError:
                raise SystemExit("the sender closed the connection early") from None
            placer.finish()
        return

    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    class Receiver(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(STREAM_BUFFER)
            self.view = memoryview(self.buf)
            self.start = 0  # the first byte not yet taken
            self.end = 0  # the end of what arrived
            self.records = 0

        def get_buffer(self, sizehint: int) -> memoryview:
            if len(self.buf) - self.end < MIN_READ and self.start > 0:
                # move the part of a record already here to the front
                n = self.end - self.start
                self.buf[:n] = self.view[self.start : self.end]
                self.start, self.end = 0, n
            if len(self.buf) - self.end < MIN_READ:  # one record larger than the buffer
                self.view.release()
                self.buf = self.buf + bytes(len(self.buf))
                self.view = memoryview(self.buf)
            return self.view[self.end :]

        def buffer_updated(self, nbytes: int) -> None:
            self.end += nbytes
            while self.end - self.start >= RECORD.size:
                _, length = RECORD.unpack_from(self.buf, self.start)
                stop = self.start + RECORD.size + length + crypto.TAG_BYTES
                if stop > self.end:
                    break
                placer.take(
                    self.view[self.start : self.start + RECORD.size],
                    self.view[self.start + RECORD.size : stop],
                )
                self.start = stop
                self.records += 1
                if self.records == count and not finished.done():
                    finished.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not finished.done():
                finished.set_exception(SystemExit("the sender closed the connection early"))

    tr, _ = await loop.create_connection(Receiver, "127.0.0.1", port)
    try:
        if count:
            await finished
        placer.finish()
    finally:
        tr.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=("send", "receive"))
    ap.add_argument("--transport", choices=TRANSPORTS, default="ws")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--key", required=True, help="64 hex digits, the same on both sides")
    ap.add_argument("--out", type=Path, help="receive: an empty folder to place instances in")
    args = ap.parse_args(argv)
    key = bytes.fromhex(args.key)
    files = study_files(args.study)
    if args.role == "send":
        asyncio.run(send(args.transport, args.port, files, key))
        return
    if args.out is None:
        ap.error("receive needs --out")
    # the digests a manifest would have listed, worked out before the clock starts
    placer = Placer(key, args.out, [file_digest.of_file(p, "blake3") for p in files])
    t0 = time.perf_counter()
    asyncio.run(receive(args.transport, args.port, placer, len(files)))
    seconds = time.perf_counter() - t0
    report: dict[str, float | int] = {
        "instances": placer.placed,
        "bytes": placer.bytes,
        "seconds": seconds,
        "mb_per_s": placer.bytes / 1e6 / seconds,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
