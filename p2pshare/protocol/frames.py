"""Framing: how the byte stream between two nodes is cut into frames.

Every frame is ``length (u32, big endian) | type (u8) | body``; ``length`` counts the type byte
and the body. The stream may arrive split at any byte (the channel is free to re-chunk it), so
:class:`FrameBuffer` reassembles frames and refuses, as soon as the 5-byte header is in, any
frame longer than the current limit: a hostile peer cannot make us buffer more than that.

Frame types
-----------
Before keys exist (plaintext, small):

=========  =====  =========================================================================
HELLO      0x01   receiver → sender: protocol version, which offer, SPAKE2 message (JSON)
PAKE       0x02   sender → receiver: offer id, SPAKE2 message (JSON)
ERROR      0x03   either way: code, message, tries left (JSON). Unauthenticated by nature.
=========  =====  =========================================================================

After the PAKE (every body sealed with XChaCha20-Poly1305, counter nonces):

=========  =====  =========================================================================
SEALED     0x10   a control message; its plaintext is ``inner type (u8) | JSON or bytes``
CHUNK      0x11   ``file index (u32) | chunk index (u32) | flags (u8) | ciphertext``; the
                  header is in clear so errors can name the file, and is bound as AAD
=========  =====  =========================================================================
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any

from p2pshare.errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">IB")
CHUNK_HEADER = struct.Struct(">IIB")
FLAG_LAST = 0x01

#: Limit before the peer has proved knowledge of the code: handshake frames are tiny.
MAX_HANDSHAKE_FRAME = 4 * 1024
#: Limit afterwards: one chunk (≤ 4 MiB) or one manifest (≤ 16 MiB) plus overhead.
MAX_FRAME = 16 * 1024 * 1024 + 1024


class FrameType(IntEnum):
    HELLO = 0x01
    PAKE = 0x02
    ERROR = 0x03
    SEALED = 0x10
    CHUNK = 0x11


class Inner(IntEnum):
    """Types of sealed control messages."""

    IDENT_R = 1  # receiver identity + its key confirmation
    IDENT_S = 2  # sender identity, signature and key confirmation
    CONFIRM_R = 3  # receiver signature and key confirmation over the full transcript
    MANIFEST = 10  # signed manifest
    ACCEPT = 11  # receiver accepts; lists what it already holds (resume)
    ACK = 12  # receiver has stored N chunks (window credit)
    DONE = 13  # sender has sent every chunk
    RECEIPT = 14  # receiver's signed receipt
    STATUS = 15  # sender-side status the receiver should show (e.g. waiting for consent)
    CONSENT = 16  # sender's signed consent record; required before the first chunk
    ERROR = 20  # an error after pairing, authenticated
    CLOSE = 21  # orderly end


def encode(ftype: FrameType, body: bytes) -> bytes:
    return HEADER.pack(len(body) + 1, ftype) + body


def encode_json(ftype: FrameType, obj: dict[str, Any]) -> bytes:
    return encode(ftype, dump_json(obj))


def dump_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def load_json(body: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    """Parse a JSON object from the peer; anything else is a protocol violation."""
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    # ValueError covers JSONDecodeError and integers beyond Python's 4300-digit limit
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"the peer sent a malformed {what} message") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"the peer sent a malformed {what} message")
    return obj


class FrameBuffer:
    """Reassembles frames from arbitrarily split input.

    The common case, a piece of input holding whole frames, costs no copy: the input is kept as
    it came (immutable ``bytes``) and frames are handed out as memoryviews into it. Only a frame
    split across pieces is assembled in a bytearray (and then copied out, because a bytearray
    with views into it could not grow).
    """

    def __init__(self, max_frame: int = MAX_HANDSHAKE_FRAME) -> None:
        self.max_frame = max_frame
        self._buf: bytes | bytearray = b""
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self.buffered == 0:
            self._buf = data if isinstance(data, bytes) else bytes(data)
            self._pos = 0
            return
        if isinstance(self._buf, bytes):
            self._buf = bytearray(memoryview(self._buf)[self._pos :])
            self._pos = 0
        elif self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> tuple[int, bytes | memoryview] | None:
        """Return ``(type, body)`` for the next complete frame, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: the frame announces an empty or over-limit length.
        """
        if self.buffered < HEADER.size:
            return None
        length, ftype = HEADER.unpack_from(self._buf, self._pos)
        if length < 1:
            raise RemoteProtocolError("the peer sent an empty frame")
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"the peer sent a {length}-byte frame, larger than the {self.max_frame}-byte limit",
                "frame-too-large",
            )
        end = self._pos + 4 + length
        if len(self._buf) < end:
            return None
        start = self._pos + HEADER.size
        body: bytes | memoryview
        if isinstance(self._buf, bytes):
            body = memoryview(self._buf)[start:end]
        else:
            body = bytes(self._buf[start:end])
        self._pos = end
        if self._pos == len(self._buf):
            self._buf = b""
            self._pos = 0
        return ftype, body


def check_type(ftype: int) -> FrameType:
    try:
        return FrameType(ftype)
    except ValueError:
        raise RemoteProtocolError(f"the peer sent an unknown frame type {ftype:#x}") from None


def inner_type(value: int) -> Inner:
    try:
        return Inner(value)
    except ValueError:
        raise RemoteProtocolError(f"the peer sent an unknown message type {value}") from None


def require(cond: bool, message: str) -> None:
    """Guard for API misuse on our side."""
    if not cond:
        raise LocalProtocolError(message)
