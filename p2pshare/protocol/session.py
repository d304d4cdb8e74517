"""Sans-I/O protocol sessions: one object per connection, per role.

Theory of operation
-------------------
A session never touches a socket, a file, a clock or a random source. The driver feeds it bytes
(``receive_data``), pulls events (``next_event``) and answers them by calling methods
(``use_offer``, ``trust_peer``, ``accept``, ``send_chunk``…), then ships whatever the session
queued (``data_to_send``). Randomness enters only through the ``entropy`` constructor argument and
time only through method arguments, so two sessions can be run against each other byte for byte
in a test.

The receiver (R) opens the connection; the sender (S) holds the offer::

    R                                                     S
    HELLO {offer ref, SPAKE2 msg A}          ─────►       OfferRequest → use_offer()
                                             ◄─────       PAKE {offer id, SPAKE2 msg B}
    IDENT_R  {pk_R, name_R, confirm0}  (hs key) ────►     opens? no → CodeMismatch → refuse(tries_left)
                                                          PeerIdentity(R) → trust_peer()
                                             ◄─────       IDENT_S {pk_S, name_S, sig_S(T), confirm_S(T)}
    PeerIdentity(S) → trust_peer()
    CONFIRM_R {sig_R(T), confirm_R(T)} (hs key) ────►     Paired
    Paired                                   ◄─────       MANIFEST {manifest, sig}   (data keys from here)
    ManifestOffer → accept(have)             ─────►       Accepted
                                             ◄─────       [STATUS …] CHUNK … CHUNK  (window-limited)
    Chunk / FileVerified / FileRejected      ─────►  ACK  (every half window; reopens it)
                                             ◄─────       DONE
    SenderDone → send_receipt(now)           ─────►       Receipt → CLOSE
    Closed                                   ◄─────

Any error is sticky: the session moves to ``ERROR``, queues an ERROR frame for the peer (sealed
once keys exist) and raises. The key schedule and every check are written down in
``docs/protocol.md``.

This module holds what both roles share (framing, the record layer, the key schedule, sticky
errors); ``sender.py`` and ``receiver.py`` hold one role each.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable
from typing import Any

from p2pshare import crypto
from p2pshare.errors import CryptoError, RemoteProtocolError
from p2pshare.manifest import Manifest
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import (
    FrameBuffer,
    FrameType,
    Inner,
    check_type,
    dump_json,
    encode,
    encode_json,
    inner_type,
    require,
)

PROTOCOL_VERSION = 1
DEFAULT_WINDOW = 16
MAX_WINDOW = 1024
MAX_NAME = 200

Sign = Callable[[bytes], bytes]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) > 4096:
        raise RemoteProtocolError(f"the peer sent a malformed {what}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError(f"the peer sent a malformed {what}") from exc
    if size is not None and len(raw) != size:
        raise RemoteProtocolError(f"the peer sent a {what} of the wrong length")
    return raw


def peer_name(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise RemoteProtocolError("the peer sent an unusable institution name")
    return value


def file_order(manifest: Manifest) -> list[int]:
    """The order files are streamed in, so that something useful is viewable early.

    First the middle instance of every series (a thumbnail per series), then every series in
    turn, each in instance-number order. Series go by series number, then UID (series with no
    number last); instances by instance number, then manifest position (unnumbered last); the
    middle one is ``sorted[len // 2]``. Only signed manifest fields are used, so both sides
    derive the same order without a word on the wire.
    """
    numbers = {s.series_instance_uid: s.number for s in manifest.series}
    by_series: dict[str, list[int]] = {}
    for fi, inst in enumerate(manifest.instances):
        by_series.setdefault(inst.series_instance_uid, []).append(fi)

    def series_key(uid: str) -> tuple[bool, int, str]:
        n = numbers.get(uid)
        return (n is None, n or 0, uid)

    def instance_key(fi: int) -> tuple[bool, int, int]:
        n = manifest.instances[fi].instance_number
        return (n is None, n or 0, fi)

    ordered = [sorted(by_series[uid], key=instance_key) for uid in sorted(by_series, key=series_key)]
    middles = [files[len(files) // 2] for files in ordered]
    first = set(middles)
    return middles + [fi for files in ordered for fi in files if fi not in first]


def transfer_plan(manifest: Manifest, have: dict[int, int]) -> list[tuple[int, int]]:
    """Every (file index, chunk index) still to send, in stream order (see ``file_order``).

    The chunks of one file are contiguous and in order; ``have`` (file index → chunks already
    held) skips what the receiver holds.
    """
    plan: list[tuple[int, int]] = []
    for fi in file_order(manifest):
        start = have.get(fi, 0)
        plan.extend((fi, ci) for ci in range(start, manifest.chunk_count(fi)))
    return plan


class Session:
    """What both roles share: framing, the record layer, the outbox, sticky errors."""

    role = ""

    def __init__(
        self, *, name: str, public_key: bytes, sign: Sign, entropy: crypto.Entropy
    ) -> None:
        self._name = name
        self._pk = public_key
        self._sign = sign
        self._entropy = entropy
        self._buf = FrameBuffer()
        self._out: list[bytes | bytearray] = []
        self._events: deque[ev.Event] = deque()
        self._k = b""  # SPAKE2 key
        self._t0 = b""
        self._t = b""
        self._send_key = b""
        self._recv_key = b""
        self._send_ctr = 0
        self._recv_ctr = 0
        self.peer_key = b""
        self.peer_name = ""
        self.transfer_id = b""
        self.session_key = b""
        self.manifest: Manifest | None = None

    # -- plumbing ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def data_to_send(self) -> bytes | bytearray:
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ev.Event | None:
        """The next event, or None when more bytes are needed.

        Raises:
            RemoteProtocolError: the peer broke the protocol; an ERROR frame is queued for it.
        """
        while not self._events:
            if self._is_error():
                return None
            try:
                frame = self._buf.next_frame()
                if frame is None:
                    return None
                self._handle(check_type(frame[0]), frame[1])
            except RemoteProtocolError as exc:
                self._fail(exc.code, exc.message)
                raise
            except CryptoError as exc:
                err = RemoteProtocolError(str(exc), "integrity")
                self._fail(err.code, err.message)
                raise err from exc
        return self._events.popleft()

    def take_events(self) -> list[ev.Event]:
        """The events already queued, without reading another frame: for a driver winding up
        after the stream ended (cut, or refused) with results still coming in."""
        out = list(self._events)
        self._events.clear()
        return out

    def refuse(self, code: str, message: str, tries_left: int | None = None) -> None:
        """Tell the peer why we stop, and stop."""
        self._fail(code, message, tries_left)

    def close(self) -> None:
        """Orderly end after the work is done."""
        if self._send_key:
            self._seal(Inner.CLOSE, b"")

    def _fail(self, code: str, message: str, tries_left: int | None = None) -> None:
        if self._is_error():
            return
        body: dict[str, Any] = {"code": code, "message": message[:500]}
        if tries_left is not None:
            body["tries_left"] = tries_left
        if self._send_key:
            self._seal(Inner.ERROR, dump_json(body))
        else:
            self._out.append(encode_json(FrameType.ERROR, body))
        self._set_error()

    def _is_error(self) -> bool:
        raise NotImplementedError

    def _set_error(self) -> None:
        raise NotImplementedError

    def _handle(self, ftype: FrameType, body: bytes | memoryview) -> None:
        raise NotImplementedError

    # -- record layer -----------------------------------------------------------------------

    def _aad(self, ftype: FrameType, header: bytes = b"") -> bytes:
        # Sealed control messages are bound to their connection by their keys. Chunks are
        # additionally bound to the transfer and to their position (file, chunk, last flag).
        if ftype is FrameType.CHUNK:
            return b"p2pshare/1" + bytes([ftype]) + self.transfer_id + header
        return b"p2pshare/1" + bytes([ftype])

    def _seal(self, inner: Inner, payload: bytes) -> None:
        plain = bytes([inner]) + payload
        ct = crypto.seal(self._send_key, self._send_ctr, plain, self._aad(FrameType.SEALED))
        self._send_ctr += 1
        self._out.append(encode(FrameType.SEALED, ct))

    def _open(self, body: bytes | memoryview) -> tuple[Inner, bytes]:
        if not self._recv_key:
            raise RemoteProtocolError("the peer sent a sealed message before the key exchange")
        try:
            plain = bytes(
                crypto.open_sealed(
                    self._recv_key, self._recv_ctr, body, self._aad(FrameType.SEALED)
                )
            )
        except CryptoError:
            raise RemoteProtocolError(
                "a message from the peer failed authentication: it was altered, replayed, "
                "reordered or dropped in transit",
                "integrity",
            ) from None
        self._recv_ctr += 1
        if not plain:
            raise RemoteProtocolError("the peer sent an empty sealed message")
        return inner_type(plain[0]), plain[1:]

    def _remote_error(self, body: dict[str, Any]) -> ev.RemoteError:
        code = body.get("code")
        message = body.get("message")
        tries = body.get("tries_left")
        return ev.RemoteError(
            code=code[:64] if isinstance(code, str) else "error",
            message=message[:500] if isinstance(message, str) else "the peer reported an error",
            tries_left=tries if isinstance(tries, int) and not isinstance(tries, bool) else None,
        )

    # -- key schedule -----------------------------------------------------------------------

    def _pake_done(self, key: bytes, offer_id: str, msg_r: bytes, msg_s: bytes) -> None:
        self._k = key
        self._t0 = crypto.transcript_hash(b"p2pshare/1 pake", offer_id.encode(), msg_r, msg_s)

    def _hs_key(self, direction: str) -> bytes:
        return crypto.derive(self._k, f"p2ps hs {direction}", self._t0)

    def _full_transcript(self, pk_r: bytes, name_r: str, pk_s: bytes, name_s: str) -> None:
        self._t = crypto.transcript_hash(
            self._t0, pk_r, name_r.encode("utf-8"), pk_s, name_s.encode("utf-8")
        )

    def _confirm(self, who: str) -> bytes:
        return crypto.derive(self._k, f"p2ps confirm {who}", self._t)

    def resume_ticket(self) -> tuple[str, bytes]:
        """(ticket id, secret) to reconnect this transfer later; both sides derive the same.

        Derived from this connection's session key, so only the two paired nodes know it; a
        reconnection runs the whole handshake again with the secret as the PAKE password, so it
        gets fresh connection keys and proves both identities again.
        """
        require(bool(self.session_key), "no session key before pairing")
        ticket = crypto.derive(self.session_key, "p2ps resume id")[:16].hex()
        return ticket, crypto.derive(self.session_key, "p2ps resume key")

    def _data_keys(self) -> tuple[bytes, bytes]:
        """(sender→receiver, receiver→sender) keys for this connection."""
        self.session_key = crypto.derive(self._k, "p2ps session", self._t)
        self.transfer_id = crypto.derive(self.session_key, "p2ps transfer")[:16]
        conn = self._t
        return (
            crypto.derive(self.session_key, "p2ps data s2r", conn),
            crypto.derive(self.session_key, "p2ps data r2s", conn),
        )


def split_signed(payload: bytes) -> tuple[bytes, bytes]:
    if len(payload) <= crypto.SIGNATURE_BYTES:
        raise RemoteProtocolError("the peer sent a truncated signed message")
    return payload[: -crypto.SIGNATURE_BYTES], payload[-crypto.SIGNATURE_BYTES :]
