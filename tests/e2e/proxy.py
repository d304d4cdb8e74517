"""A man-in-the-middle TCP proxy for end-to-end tests (asyncio, 127.0.0.1 only).

The receiving node is the WebSocket *client*: it connects to ``ws://host:port/p2p`` on the
sending node. Put :class:`MitmProxy` in between (tell the receiver ``--from <proxy address>``)
and it forwards both directions byte for byte, except that it can apply **one** attack to the
sender→receiver (s2r) direction:

* the HTTP upgrade request and the ``101`` response pass through untouched;
* after the blank line of the ``101`` response, the s2r bytes are parsed as RFC 6455 frames
  (the server does not mask), re-assembled into messages and forwarded message by message;
* the attack hits the ``index``-th binary message that matches the selector (payload at least
  ``min_size`` bytes and, if given, protocol frame type ``frame_type`` — the byte after the
  4-byte length prefix; 0x11 is a CHUNK) and either flips one bit, drops it, replays it, swaps
  it with the next binary message, or rewrites the protocol frame's length prefix;
* ``cut`` instead closes both TCP connections after ``cut_after`` bytes of the s2r stream
  (counted from its first byte, the HTTP response included), possibly in the middle of a frame,
  or, without ``cut_after``, right after the selected message went out whole.

A protocol frame inside a message is ``u32 length | u8 type | body``; for a CHUNK the body
starts with ``u32 file index | u32 chunk index | u8 flags`` in clear, so byte offsets 5‥13 of
the message are that header (:data:`OFF_FILE_INDEX`, :data:`OFF_CHUNK_INDEX`,
:data:`OFF_FLAGS` name the low bytes) and offsets from 14 on are ciphertext.

Everything forwarded is recorded: byte counts per direction, the raw s2r stream, and the list of
WebSocket payloads as they were forwarded (after tampering) in each direction, so a test can
check what actually crossed the wire. The attack's state (which message is next, whether it
fired) belongs to the proxy, not to one connection: arm it, run one transfer, inspect, then
:meth:`MitmProxy.reset` it (e.g. disarmed, for a control run through the same proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field
from typing import Any

FLIP, DROP, REPLAY, REORDER, CUT, LENGTH = "flip", "drop", "replay", "reorder", "cut", "length"
KINDS = (FLIP, DROP, REPLAY, REORDER, CUT, LENGTH)

#: protocol frame type of a CHUNK (``p2pshare.protocol.frames.FrameType.CHUNK``)
CHUNK_FRAME = 0x11
#: ``u32 length | u8 type`` + ``u32 file | u32 chunk | u8 flags``: the clear part of a CHUNK
PROTO_HEADER = 5 + 9
OFF_FILE_INDEX = 8  # low byte of the file index
OFF_CHUNK_INDEX = 12  # low byte of the chunk index
OFF_FLAGS = 13  # flags byte (bit 0: last chunk of the file)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class Attack:
    """What to do, and to which s2r message."""

    kind: str
    #: which matching binary message (0 = the first that matches)
    index: int = 0
    #: a message matches only if its payload has at least this many bytes
    min_size: int = 0
    #: ... and, if set, only if it carries this protocol frame type (payload byte 4)
    frame_type: int | None = None
    #: FLIP: byte offset within the WebSocket payload, and which bit
    offset: int = PROTO_HEADER + 64
    bit: int = 0
    #: LENGTH: added to the protocol frame's u32 length prefix
    length_delta: int = 1
    #: CUT: bytes of the s2r stream forwarded before both connections are closed; None: cut
    #: right after the selected message went out whole
    cut_after: int | None = None
    #: CUT: end the receiver's side with a reset instead of an orderly FIN
    reset: bool = False
    #: FLIP: then cut both connections right after the altered message (the receiver may find
    #: the alteration only after the connection is gone)
    then_cut: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown attack {self.kind!r}")


@dataclass
class WsMessage:
    opcode: int
    payload: bytes
    raw: bytes  # the frame(s) exactly as received
    rsv: int = 0


@dataclass
class Applied:
    """What the proxy did, for the test to check that the attack really happened."""

    kind: str
    message_number: int  # position among all s2r binary messages (0-based)
    size: int
    #: the clear CHUNK header of the attacked message (file index, chunk index, flags), if any
    chunk: tuple[int, int, int] | None
    detail: dict[str, Any] = field(default_factory=dict)


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (as a server sends it)."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
    return head + payload


def chunk_header(payload: bytes) -> tuple[int, int, int] | None:
    if len(payload) >= PROTO_HEADER and payload[4] == CHUNK_FRAME:
        fi, ci, flags = struct.unpack_from(">IIB", payload, 5)
        return fi, ci, flags
    return None


class WsParser:
    """Incremental RFC 6455 frame parser; yields whole messages (control frames on their own)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._frag_op: int | None = None
        self._frag_payload = bytearray()
        self._frag_raw = bytearray()
        self._frag_rsv = 0

    def feed(self, data: bytes) -> list[WsMessage]:
        self._buf += data
        out: list[WsMessage] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return out
            fin, rsv, opcode, payload, raw = frame
            if opcode >= 0x8:  # control frames are never fragmented
                out.append(WsMessage(opcode, payload, raw, rsv))
                continue
            if opcode != OP_CONT:
                self._frag_op, self._frag_rsv = opcode, rsv
                self._frag_payload.clear()
                self._frag_raw.clear()
            self._frag_payload += payload
            self._frag_raw += raw
            if fin:
                op = self._frag_op if self._frag_op is not None else OP_BINARY
                out.append(
                    WsMessage(op, bytes(self._frag_payload), bytes(self._frag_raw), self._frag_rsv)
                )
                self._frag_op = None

    def _next_frame(self) -> tuple[bool, int, int, bytes, bytes] | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        pos, n = 2, b1 & 0x7F
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack_from(">H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack_from(">Q", buf, 2)[0], 10
        mask = b""
        if b1 & 0x80:
            if len(buf) < pos + 4:
                return None
            mask, pos = bytes(buf[pos : pos + 4]), pos + 4
        if len(buf) < pos + n:
            return None
        payload = bytes(buf[pos : pos + n])
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        raw = bytes(buf[: pos + n])
        del buf[: pos + n]
        return bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, payload, raw


class MitmProxy:
    """Listens on 127.0.0.1:0 and forwards every connection to ``127.0.0.1:upstream_port``."""

    def __init__(
        self, upstream_port: int, attack: Attack | None = None, *, cut_once: bool = False
    ) -> None:
        self.upstream_port = upstream_port
        self.attack = attack
        #: after a CUT, let the next connection (a reconnection) through untouched
        self.cut_once = cut_once
        self.port = 0
        #: raw bytes forwarded, per direction (HTTP upgrade included)
        self.bytes_s2r = 0
        self.bytes_r2s = 0
        #: the whole s2r stream as forwarded
        self.s2r_raw = bytearray()
        #: WebSocket data payloads as forwarded (after tampering), per direction
        self.s2r_messages: list[bytes] = []
        self.r2s_messages: list[bytes] = []
        self.applied: list[Applied] = []
        self.connections = 0
        self.errors: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._binary_seen = 0
        self._matched = 0
        self._held: WsMessage | None = None
        self._cut = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def fired(self) -> bool:
        return bool(self.applied)

    async def start(self) -> MitmProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def __aenter__(self) -> MitmProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def reset(self, attack: Attack | None = None) -> None:
        """Arm another attack (or none) and forget what was recorded."""
        self.attack = attack
        self.bytes_s2r = self.bytes_r2s = self.connections = 0
        self.s2r_raw.clear()
        self.s2r_messages.clear()
        self.r2s_messages.clear()
        self.applied.clear()
        self.errors.clear()
        self._binary_seen = self._matched = 0
        self._held = None
        self._cut = False

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every proxied connection has ended."""
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    # -- per connection ---------------------------------------------------------------------

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self.cut_once and self._cut:
            self._cut, self.attack = False, None
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError as exc:
                self.errors.append(f"upstream: {exc}")
                c_writer.close()
                return
            writers = (c_writer, u_writer)
            await asyncio.gather(
                self._pump_r2s(c_reader, u_writer, writers),
                self._pump_s2r(u_reader, c_writer, writers),
            )
        finally:
            self._tasks.discard(task)

    @staticmethod
    def _close_all(writers: tuple[asyncio.StreamWriter, ...]) -> None:
        for w in writers:
            with contextlib.suppress(Exception):
                w.close()

    async def _pump_r2s(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
    ) -> None:
        head = bytearray()
        parser: WsParser | None = None
        try:
            while not self._cut:
                data = await reader.read(65536)
                if not data or self._cut:
                    break
                writer.write(data)
                self.bytes_r2s += len(data)
                await writer.drain()
                if parser is None:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end >= 0:
                        parser = WsParser()
                        rest = bytes(head[end + 4 :])
                        head.clear()
                        data = rest
                    else:
                        continue
                for msg in parser.feed(data):
                    if msg.opcode in (OP_BINARY, OP_TEXT):
                        self.r2s_messages.append(msg.payload)
        except (ConnectionError, OSError):
            pass
        finally:
            if not self._cut:
                self._close_all(writers)

    async def _pump_s2r(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
    ) -> None:
        head = bytearray()
        parser: WsParser | None = None
        passthrough = False
        try:
            while not self._cut:
                data = await reader.read(65536)
                if not data:
                    if self._held is not None:  # never leave a held message behind
                        held, self._held = self._held, None
                        await self._forward(writer, writers, held.raw, held)
                    break
                if passthrough:
                    await self._write(writer, writers, data)
                    continue
                if parser is None:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    response, rest = bytes(head[: end + 4]), bytes(head[end + 4 :])
                    head.clear()
                    await self._write(writer, writers, response)
                    if b" 101 " not in response.split(b"\r\n", 1)[0]:
                        passthrough = True  # not an upgrade: nothing to parse
                        if rest:
                            await self._write(writer, writers, rest)
                        continue
                    parser = WsParser()
                    data = rest
                for msg in parser.feed(data):
                    await self._on_s2r_message(writer, writers, msg)
                    if self._cut:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            if not self._cut:  # after a cut the connections are already being torn down
                self._close_all(writers)

    # -- s2r messages -----------------------------------------------------------------------

    def _matches(self, a: Attack, payload: bytes) -> bool:
        if len(payload) < a.min_size:
            return False
        return a.frame_type is None or (len(payload) > 4 and payload[4] == a.frame_type)

    async def _on_s2r_message(
        self,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
        msg: WsMessage,
    ) -> None:
        a = self.attack
        if msg.opcode != OP_BINARY:
            if self._held is not None:  # a close (or ping) after the held one: release it first
                held, self._held = self._held, None
                await self._forward(writer, writers, held.raw, held)
            await self._forward(writer, writers, msg.raw, msg)
            return
        number = self._binary_seen
        self._binary_seen += 1
        if self._held is not None:  # REORDER: this one first, then the held one
            held, self._held = self._held, None
            await self._forward(writer, writers, msg.raw, msg)
            await self._forward(writer, writers, held.raw, held)
            return
        hit = False
        selectable = a is not None and (a.kind != CUT or a.cut_after is None)
        if selectable and a is not None and not self.fired and self._matches(a, msg.payload):
            hit = self._matched == a.index
            self._matched += 1
        if not hit:
            await self._forward(writer, writers, msg.raw, msg)
            return
        assert a is not None
        if msg.rsv:
            self.errors.append("the server compressed its frames: tampering would be meaningless")
        applied = Applied(a.kind, number, len(msg.payload), chunk_header(msg.payload))
        self.applied.append(applied)
        if a.kind == FLIP:
            payload = bytearray(msg.payload)
            payload[a.offset] ^= 1 << a.bit
            applied.detail = {"offset": a.offset, "bit": a.bit}
            tampered = WsMessage(OP_BINARY, bytes(payload), ws_frame(OP_BINARY, bytes(payload)))
            await self._forward(writer, writers, tampered.raw, tampered)
            if a.then_cut:
                self._cut_now(writer, writers)
        elif a.kind == DROP:
            pass
        elif a.kind == REPLAY:
            await self._forward(writer, writers, msg.raw, msg)
            await self._forward(writer, writers, msg.raw, msg)
        elif a.kind == REORDER:
            self._held = msg
        elif a.kind == LENGTH:
            (length,) = struct.unpack_from(">I", msg.payload, 0)
            new = (length + a.length_delta) % (1 << 32)
            payload = struct.pack(">I", new) + msg.payload[4:]
            applied.detail = {"length": length, "new_length": new}
            tampered = WsMessage(OP_BINARY, payload, ws_frame(OP_BINARY, payload))
            await self._forward(writer, writers, tampered.raw, tampered)
        elif a.kind == CUT:
            await self._forward(writer, writers, msg.raw, msg)
            self._cut_now(writer, writers)

    async def _forward(
        self,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
        raw: bytes,
        msg: WsMessage,
    ) -> None:
        # recorded only when it went out whole (a cut may stop it half way)
        if await self._write(writer, writers, raw) and msg.opcode in (OP_BINARY, OP_TEXT):
            self.s2r_messages.append(msg.payload)

    async def _write(
        self, writer: asyncio.StreamWriter, writers: tuple[asyncio.StreamWriter, ...], data: bytes
    ) -> bool:
        """Forward ``data`` (or, for CUT, as much as allowed); True if all of it went out."""
        if self._cut:
            return False
        a = self.attack
        whole, cut = True, False
        if (
            a is not None
            and a.kind == CUT
            and a.cut_after is not None
            and self.bytes_s2r + len(data) >= a.cut_after
        ):
            keep = max(0, a.cut_after - self.bytes_s2r)
            whole, cut = keep == len(data), True
            data = data[:keep]
            self.applied.append(
                Applied(CUT, self._binary_seen, keep, None, {"cut_after": a.cut_after})
            )
        if data:
            writer.write(data)
            self.bytes_s2r += len(data)
            self.s2r_raw += data
            await writer.drain()
        if cut:
            self._cut_now(writer, writers)
        return whole

    def _cut_now(
        self, writer: asyncio.StreamWriter, writers: tuple[asyncio.StreamWriter, ...]
    ) -> None:
        """Both connections end here: the receiver gets what was written, then FIN (or a reset);
        the sender gets a reset."""
        self._cut = True
        a = self.attack
        with contextlib.suppress(Exception):
            if a is not None and a.reset:
                writer.transport.abort()
            else:
                writer.close()
        for w in writers:
            if w is not writer:
                with contextlib.suppress(Exception):
                    w.transport.abort()


class HoldProxy:
    """Forwards a TCP connection both ways; holds the sender→receiver direction once
    ``hold_after`` bytes went through, until :meth:`release` (to revoke mid-stream)."""

    def __init__(self, upstream_port: int, hold_after: int) -> None:
        self.upstream_port = upstream_port
        self.hold_after = hold_after
        self.s2r = 0
        self.held = asyncio.Event()
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def release(self) -> None:
        self._release.set()

    async def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _handle(self, c_r: asyncio.StreamReader, c_w: asyncio.StreamWriter) -> None:
        u_r, u_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, s2r: bool) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                    if s2r:
                        self.s2r += len(data)
                        if self.s2r >= self.hold_after and not self._release.is_set():
                            self.held.set()
                            await self._release.wait()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.close()

        for coro in (pump(c_r, u_w, False), pump(u_r, c_w, True)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
