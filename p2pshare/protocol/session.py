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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from p2pshare import crypto
from p2pshare.errors import (
    CryptoError,
    LocalProtocolError,
    ManifestError,
    ProtocolError,
    RemoteProtocolError,
)
from p2pshare.manifest import Manifest
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import (
    CHUNK_HEADER,
    FLAG_LAST,
    HEADER,
    MAX_FRAME,
    FrameBuffer,
    FrameType,
    Inner,
    check_type,
    dump_json,
    encode,
    encode_json,
    inner_type,
    load_json,
    require,
)

PROTOCOL_VERSION = 1
DEFAULT_WINDOW = 16
MAX_WINDOW = 1024
MAX_NAME = 200

Sign = Callable[[bytes], bytes]


class SenderState(Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_OFFER = "await-offer"
    AWAIT_IDENT = "await-ident"
    CODE_MISMATCH = "code-mismatch"
    AWAIT_TRUST = "await-trust"
    AWAIT_CONFIRM = "await-confirm"
    PAIRED = "paired"
    AWAIT_ACCEPT = "await-accept"
    SENDING = "sending"
    AWAIT_RECEIPT = "await-receipt"
    DONE = "done"
    ERROR = "error"


class ReceiverState(Enum):
    START = "start"
    AWAIT_PAKE = "await-pake"
    AWAIT_IDENT = "await-ident"
    AWAIT_TRUST = "await-trust"
    AWAIT_MANIFEST = "await-manifest"
    AWAIT_DECISION = "await-decision"
    RECEIVING = "receiving"
    AWAIT_VERDICT = "await-verdict"
    AWAIT_CLOSE = "await-close"
    DONE = "done"
    ERROR = "error"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) > 4096:
        raise RemoteProtocolError(f"the peer sent a malformed {what}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError(f"the peer sent a malformed {what}") from exc
    if size is not None and len(raw) != size:
        raise RemoteProtocolError(f"the peer sent a {what} of the wrong length")
    return raw


def _name(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not value.isprintable():
        raise RemoteProtocolError("the peer sent an unusable institution name")
    return value


def transfer_plan(manifest: Manifest, have: dict[int, int]) -> list[tuple[int, int]]:
    """Every (file index, chunk index) still to send, in stream order."""
    plan: list[tuple[int, int]] = []
    for fi in range(len(manifest.instances)):
        start = have.get(fi, 0)
        plan.extend((fi, ci) for ci in range(start, manifest.chunk_count(fi)))
    return plan


class _Session:
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

    def _data_keys(self) -> tuple[bytes, bytes]:
        """(sender→receiver, receiver→sender) keys for this connection."""
        self.session_key = crypto.derive(self._k, "p2ps session", self._t)
        self.transfer_id = crypto.derive(self.session_key, "p2ps transfer")[:16]
        conn = self._t
        return (
            crypto.derive(self.session_key, "p2ps data s2r", conn),
            crypto.derive(self.session_key, "p2ps data r2s", conn),
        )


class SenderSession(_Session):
    """The sending node's side of one connection."""

    role = "sender"

    def __init__(
        self,
        *,
        name: str,
        public_key: bytes,
        sign: Sign,
        entropy: crypto.Entropy = os.urandom,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        super().__init__(name=name, public_key=public_key, sign=sign, entropy=entropy)
        self.state = SenderState.AWAIT_HELLO
        self.window = window
        self._hello: dict[str, Any] = {}
        self._msg_r = b""
        self._offer_id = ""
        self._plan: deque[tuple[int, int]] = deque()
        self._sent = 0
        self._acked = 0
        self._manifest_digest = ""

    def _is_error(self) -> bool:
        return self.state is SenderState.ERROR

    def _set_error(self) -> None:
        self.state = SenderState.ERROR

    # -- driver calls -----------------------------------------------------------------------

    def use_offer(self, offer_id: str, password: bytes) -> None:
        """Answer an OfferRequest: run SPAKE2 with the offer's password."""
        require(self.state is SenderState.AWAIT_OFFER, f"use_offer in state {self.state}")
        pake = crypto.Pake(password, sender=True, entropy=self._entropy)
        try:
            key = pake.finish(self._msg_r)
        except CryptoError as exc:
            err = RemoteProtocolError(str(exc))
            self._fail(err.code, err.message)
            raise err from exc
        self._offer_id = offer_id
        self._pake_done(key, offer_id, self._msg_r, pake.message)
        self._recv_key = self._hs_key("r2s")
        self._send_key = b""  # nothing sealed goes out before the receiver proves the code
        self._out.append(
            encode_json(FrameType.PAKE, {"offer_id": offer_id, "pake": _b64(pake.message)})
        )
        self.state = SenderState.AWAIT_IDENT

    def trust_peer(self) -> None:
        """The driver accepted the receiver's identity: prove ours."""
        require(self.state is SenderState.AWAIT_TRUST, f"trust_peer in state {self.state}")
        self._full_transcript(self.peer_key, self.peer_name, self._pk, self._name)
        self._send_key = self._hs_key("s2r")
        self._send_ctr = 0
        self._seal(
            Inner.IDENT_S,
            dump_json(
                {
                    "pk": _b64(self._pk),
                    "name": self._name,
                    "sig": _b64(self._sign(b"p2pshare/1 sender\0" + self._t)),
                    "confirm": _b64(self._confirm("s")),
                }
            ),
        )
        # From here on every sealed message in either direction after the receiver's
        # confirmation uses the connection's data keys.
        s2r, _ = self._data_keys()
        self._send_key, self._send_ctr = s2r, 0
        self.state = SenderState.AWAIT_CONFIRM

    def send_manifest(self, manifest: Manifest, extra: dict[str, Any] | None = None) -> str:
        """Send the signed manifest; returns its digest."""
        require(self.state is SenderState.PAIRED, f"send_manifest in state {self.state}")
        data = manifest.to_bytes()
        digest = hashlib.sha256(data).hexdigest()
        sig = self._sign(b"p2pshare/1 manifest\0" + digest.encode())
        # The window travels with the manifest so the receiver can acknowledge in batches
        # (half a window at a time) without ever leaving the sender stalled.
        extra_json = dump_json({**(extra or {}), "window": self.window})
        self._seal(
            Inner.MANIFEST,
            len(data).to_bytes(4, "big") + data + sig + extra_json,
        )
        self.manifest = manifest
        self._manifest_digest = digest
        self.state = SenderState.AWAIT_ACCEPT
        return digest

    def send_status(self, state: str, detail: dict[str, Any] | None = None) -> None:
        require(
            self.state in (SenderState.AWAIT_ACCEPT, SenderState.SENDING),
            f"send_status in state {self.state}",
        )
        self._seal(Inner.STATUS, dump_json({"state": state, "detail": detail or {}}))

    @property
    def window_open(self) -> bool:
        return (
            self.state is SenderState.SENDING
            and bool(self._plan)
            and self._sent - self._acked < self.window
        )

    def next_chunk(self) -> tuple[int, int, int, int] | None:
        """(file index, chunk index, offset, length) of the next chunk to send, or None."""
        if not self._plan or self.manifest is None:
            return None
        fi, ci = self._plan[0]
        m = self.manifest
        return fi, ci, ci * m.chunk_size, m.chunk_length(fi, ci)

    def send_chunk(self, file_index: int, chunk_index: int, data: bytes) -> None:
        require(self.window_open, "send_chunk with the window closed")
        nxt = self.next_chunk()
        assert nxt is not None and self.manifest is not None
        require(
            (file_index, chunk_index) == nxt[:2], f"chunk {file_index}/{chunk_index} out of order"
        )
        require(len(data) == nxt[3], f"chunk {file_index}/{chunk_index} has the wrong length")
        last = chunk_index == self.manifest.chunk_count(file_index) - 1
        header = CHUNK_HEADER.pack(file_index, chunk_index, FLAG_LAST if last else 0)
        # Frame header, chunk header and ciphertext are written into one buffer (no copies).
        prefix = HEADER.pack(1 + len(header) + len(data) + crypto.TAG_BYTES, FrameType.CHUNK)
        frame = crypto.seal_after(
            prefix + header,
            self._send_key,
            self._send_ctr,
            data,
            self._aad(FrameType.CHUNK, header),
        )
        self._send_ctr += 1
        self._out.append(frame)
        self._plan.popleft()
        self._sent += 1
        if not self._plan:
            self._seal(Inner.DONE, dump_json({"chunks": self._sent}))
            self.state = SenderState.AWAIT_RECEIPT

    @property
    def unacked(self) -> int:
        return self._sent - self._acked

    # -- incoming ---------------------------------------------------------------------------

    def _handle(self, ftype: FrameType, body: bytes | memoryview) -> None:
        st = self.state
        if ftype is FrameType.HELLO and st is SenderState.AWAIT_HELLO:
            hello = load_json(body, "hello")
            if hello.get("v") != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    "the receiver speaks another protocol version; update both nodes",
                    "version",
                )
            ref, kind = hello.get("offer"), hello.get("kind")
            if not isinstance(ref, str) or not 0 < len(ref) <= 64 or kind not in ("qr", "spoken"):
                raise RemoteProtocolError("the receiver named no valid offer")
            self._msg_r = _unb64(hello.get("pake"), "key-exchange message", 33)
            self.state = SenderState.AWAIT_OFFER
            self._events.append(ev.OfferRequest(offer_ref=ref, spoken=kind == "spoken"))
        elif ftype is FrameType.SEALED and st is SenderState.AWAIT_IDENT:
            try:
                inner, payload = self._open(body)
            except RemoteProtocolError:
                # The receiver used another password: a wrong code, not an attack on the
                # stream. The driver counts it and answers with refuse(tries_left=…).
                self.state = SenderState.CODE_MISMATCH
                self._events.append(ev.CodeMismatch())
                return
            if inner is not Inner.IDENT_R:
                raise RemoteProtocolError("the receiver sent an unexpected message while pairing")
            msg = load_json(payload, "identity")
            pk = _unb64(msg.get("pk"), "identity key", crypto.PUBLIC_KEY_BYTES)
            name = _name(msg.get("name"))
            confirm0 = _unb64(msg.get("confirm"), "key confirmation", 32)
            if not crypto.equal(confirm0, crypto.derive(self._k, "p2ps confirm r0", self._t0)):
                raise RemoteProtocolError("the receiver's key confirmation is wrong", "integrity")
            self.peer_key, self.peer_name = pk, name
            self.state = SenderState.AWAIT_TRUST
            self._events.append(ev.PeerIdentity(pk, name, crypto.fingerprint(pk)))
        elif ftype is FrameType.SEALED and st in (
            SenderState.AWAIT_TRUST,
            SenderState.AWAIT_CONFIRM,
        ):
            inner, payload = self._open(body)
            if inner is Inner.ERROR:
                # The receiver refused our identity (e.g. a pinned key changed) or gave up
                # while pairing; it seals that with its handshake key.
                self._events.append(self._remote_error(load_json(payload, "error")))
                self.state = SenderState.ERROR
                return
            if inner is not Inner.CONFIRM_R or st is not SenderState.AWAIT_CONFIRM:
                raise RemoteProtocolError("the receiver sent an unexpected message while pairing")
            msg = load_json(payload, "confirmation")
            sig = _unb64(msg.get("sig"), "signature", crypto.SIGNATURE_BYTES)
            confirm = _unb64(msg.get("confirm"), "key confirmation", 32)
            if not crypto.equal(confirm, self._confirm("r")):
                raise RemoteProtocolError("the receiver's key confirmation is wrong", "integrity")
            try:
                crypto.verify_signature(self.peer_key, b"p2pshare/1 receiver\0" + self._t, sig)
            except CryptoError:
                raise RemoteProtocolError(
                    "the receiver's identity signature is invalid", "integrity"
                ) from None
            _, r2s = self._data_keys()
            self._recv_key, self._recv_ctr = r2s, 0
            self._buf.max_frame = MAX_FRAME
            self.state = SenderState.PAIRED
            self._events.append(ev.Paired(self.transfer_id, self.session_key))
        elif ftype is FrameType.SEALED and st in (
            SenderState.AWAIT_ACCEPT,
            SenderState.SENDING,
            SenderState.AWAIT_RECEIPT,
            SenderState.PAIRED,
            SenderState.DONE,
        ):
            self._handle_sealed(*self._open(body))
        elif ftype is FrameType.ERROR and st in (
            SenderState.AWAIT_HELLO,
            SenderState.AWAIT_IDENT,
            SenderState.AWAIT_OFFER,
        ):
            self._events.append(self._remote_error(load_json(body, "error")))
            self.state = SenderState.ERROR
        else:
            raise RemoteProtocolError(
                f"the receiver sent a {ftype.name} frame while this node was in state {st.value}"
            )

    def _handle_sealed(self, inner: Inner, payload: bytes) -> None:
        st = self.state
        if inner is Inner.ERROR:
            self._events.append(self._remote_error(load_json(payload, "error")))
            self.state = SenderState.ERROR
        elif inner is Inner.ACCEPT and st is SenderState.AWAIT_ACCEPT:
            assert self.manifest is not None
            msg = load_json(payload, "accept")
            have = _parse_have(msg.get("have", {}), self.manifest)
            self._plan = deque(transfer_plan(self.manifest, have))
            self.state = SenderState.SENDING
            self._events.append(ev.Accepted(have))
            if not self._plan:
                self._seal(Inner.DONE, dump_json({"chunks": 0}))
                self.state = SenderState.AWAIT_RECEIPT
        elif inner is Inner.ACK and st in (SenderState.SENDING, SenderState.AWAIT_RECEIPT):
            msg = load_json(payload, "ack")
            n = msg.get("chunks")
            if not isinstance(n, int) or not self._acked <= n <= self._sent:
                raise RemoteProtocolError("the receiver acknowledged chunks that were never sent")
            self._acked = n
        elif inner is Inner.RECEIPT and st is SenderState.AWAIT_RECEIPT:
            body, sig = _split_signed(payload)
            try:
                crypto.verify_signature(self.peer_key, b"p2pshare/1 receipt\0" + body, sig)
            except CryptoError:
                raise RemoteProtocolError(
                    "the receipt's signature is invalid", "integrity"
                ) from None
            receipt = load_json(body, "receipt")
            if (
                receipt.get("manifest_sha256") != self._manifest_digest
                or receipt.get("transfer_id") != self.transfer_id.hex()
            ):
                raise RemoteProtocolError("the receipt is for another manifest", "integrity")
            self.state = SenderState.DONE
            self._events.append(ev.Receipt(receipt, sig))
        elif inner is Inner.CLOSE:
            self._events.append(ev.Closed())
        else:
            raise RemoteProtocolError(
                f"the receiver sent {inner.name} while this node was in state {st.value}"
            )


class ReceiverSession(_Session):
    """The receiving node's side of one connection."""

    role = "receiver"

    def __init__(
        self,
        *,
        name: str,
        public_key: bytes,
        sign: Sign,
        offer_ref: str,
        spoken: bool,
        password: bytes,
        entropy: crypto.Entropy = os.urandom,
    ) -> None:
        super().__init__(name=name, public_key=public_key, sign=sign, entropy=entropy)
        self.state = ReceiverState.START
        self._offer_ref = offer_ref
        self._spoken = spoken
        self._pake = crypto.Pake(password, sender=False, entropy=entropy)
        self.offer_id = ""
        self.manifest_digest = ""
        self._plan: deque[tuple[int, int]] = deque()
        self._hash: Any = None
        self._stored = 0
        self._ack_every = 1
        self.verified: set[int] = set()
        self.rejected: dict[int, str] = {}
        self._have: dict[int, int] = {}

    def _is_error(self) -> bool:
        return self.state is ReceiverState.ERROR

    def _set_error(self) -> None:
        self.state = ReceiverState.ERROR

    # -- driver calls -----------------------------------------------------------------------

    def start(self) -> None:
        require(self.state is ReceiverState.START, f"start in state {self.state}")
        self._out.append(
            encode_json(
                FrameType.HELLO,
                {
                    "v": PROTOCOL_VERSION,
                    "offer": self._offer_ref,
                    "kind": "spoken" if self._spoken else "qr",
                    "pake": _b64(self._pake.message),
                },
            )
        )
        self.state = ReceiverState.AWAIT_PAKE

    def trust_peer(self) -> None:
        """The driver accepted the sender's identity: confirm and finish pairing."""
        require(self.state is ReceiverState.AWAIT_TRUST, f"trust_peer in state {self.state}")
        self._seal(
            Inner.CONFIRM_R,
            dump_json(
                {
                    "sig": _b64(self._sign(b"p2pshare/1 receiver\0" + self._t)),
                    "confirm": _b64(self._confirm("r")),
                }
            ),
        )
        s2r, r2s = self._data_keys()
        self._send_key, self._send_ctr = r2s, 0
        self._recv_key, self._recv_ctr = s2r, 0
        self._buf.max_frame = MAX_FRAME
        self.state = ReceiverState.AWAIT_MANIFEST
        self._events.append(ev.Paired(self.transfer_id, self.session_key))

    def accept(self, have: dict[int, int] | None = None) -> None:
        """Accept the manifest. ``have``: file index → chunks already held (whole files only)."""
        require(self.state is ReceiverState.AWAIT_DECISION, f"accept in state {self.state}")
        assert self.manifest is not None
        have = dict(have or {})
        count = len(self.manifest.instances)
        for fi, n in have.items():
            require(0 <= fi < count, f"file #{fi} is not in the manifest")
            require(n == self.manifest.chunk_count(fi), "only whole files can be skipped")
        # Validate everything before touching any state: a refused call changes nothing.
        self.verified.update(have)
        self._have = have
        self._plan = deque(transfer_plan(self.manifest, have))
        self._seal(Inner.ACCEPT, dump_json({"have": {str(k): v for k, v in have.items()}}))
        self.state = ReceiverState.RECEIVING

    def send_receipt(self, now: int) -> dict[str, Any]:
        """Sign and send the receipt; only when every file verified."""
        require(self.state is ReceiverState.AWAIT_VERDICT, f"send_receipt in state {self.state}")
        assert self.manifest is not None
        require(
            len(self.verified) == len(self.manifest.instances) and not self.rejected,
            "a receipt needs every instance verified",
        )
        body = {
            "transfer_id": self.transfer_id.hex(),
            "manifest_sha256": self.manifest_digest,
            "study_instance_uid": self.manifest.study_instance_uid,
            "instances": len(self.manifest.instances),
            "bytes": self.manifest.total_bytes,
            "received_at": now,
            "receiver": crypto.fingerprint(self._pk),
            "sender": crypto.fingerprint(self.peer_key),
        }
        raw = dump_json(body)
        sig = self._sign(b"p2pshare/1 receipt\0" + raw)
        self._seal(Inner.RECEIPT, raw + sig)
        self.state = ReceiverState.AWAIT_CLOSE
        return body

    # -- incoming ---------------------------------------------------------------------------

    def _handle(self, ftype: FrameType, body: bytes | memoryview) -> None:
        st = self.state
        if ftype is FrameType.PAKE and st is ReceiverState.AWAIT_PAKE:
            msg = load_json(body, "key exchange")
            offer_id = msg.get("offer_id")
            if not isinstance(offer_id, str) or not 0 < len(offer_id) <= 64:
                raise RemoteProtocolError("the sender named no valid offer")
            if not self._spoken and offer_id != self._offer_ref:
                raise RemoteProtocolError("the sender answered for another offer")
            msg_s = _unb64(msg.get("pake"), "key-exchange message", 33)
            key = self._pake.finish(msg_s)
            self.offer_id = offer_id
            self._pake_done(key, offer_id, self._pake.message, msg_s)
            self._send_key = self._hs_key("r2s")
            self._recv_key = self._hs_key("s2r")
            self._seal(
                Inner.IDENT_R,
                dump_json(
                    {
                        "pk": _b64(self._pk),
                        "name": self._name,
                        "confirm": _b64(crypto.derive(self._k, "p2ps confirm r0", self._t0)),
                    }
                ),
            )
            self.state = ReceiverState.AWAIT_IDENT
        elif ftype is FrameType.SEALED and st is ReceiverState.AWAIT_IDENT:
            inner, payload = self._open(body)
            if inner is not Inner.IDENT_S:
                raise RemoteProtocolError("the sender sent an unexpected message while pairing")
            msg = load_json(payload, "identity")
            pk = _unb64(msg.get("pk"), "identity key", crypto.PUBLIC_KEY_BYTES)
            name = _name(msg.get("name"))
            sig = _unb64(msg.get("sig"), "signature", crypto.SIGNATURE_BYTES)
            confirm = _unb64(msg.get("confirm"), "key confirmation", 32)
            self._full_transcript(self._pk, self._name, pk, name)
            if not crypto.equal(confirm, self._confirm("s")):
                raise RemoteProtocolError("the sender's key confirmation is wrong", "integrity")
            try:
                crypto.verify_signature(pk, b"p2pshare/1 sender\0" + self._t, sig)
            except CryptoError:
                raise RemoteProtocolError(
                    "the sender's identity signature is invalid", "integrity"
                ) from None
            self.peer_key, self.peer_name = pk, name
            self.state = ReceiverState.AWAIT_TRUST
            self._events.append(ev.PeerIdentity(pk, name, crypto.fingerprint(pk)))
        elif ftype is FrameType.CHUNK and st is ReceiverState.RECEIVING:
            self._handle_chunk(body)
        elif ftype is FrameType.SEALED and st in (
            ReceiverState.AWAIT_MANIFEST,
            ReceiverState.AWAIT_DECISION,
            ReceiverState.RECEIVING,
            ReceiverState.AWAIT_VERDICT,
            ReceiverState.AWAIT_CLOSE,
        ):
            self._handle_sealed(*self._open(body))
        elif ftype is FrameType.ERROR and st in (
            ReceiverState.AWAIT_PAKE,
            ReceiverState.AWAIT_IDENT,
        ):
            self._events.append(self._remote_error(load_json(body, "error")))
            self.state = ReceiverState.ERROR
        else:
            raise RemoteProtocolError(
                f"the sender sent a {ftype.name} frame while this node was in state {st.value}"
            )

    def _handle_sealed(self, inner: Inner, payload: bytes) -> None:
        st = self.state
        if inner is Inner.ERROR:
            self._events.append(self._remote_error(load_json(payload, "error")))
            self.state = ReceiverState.ERROR
        elif inner is Inner.MANIFEST and st is ReceiverState.AWAIT_MANIFEST:
            self._handle_manifest(payload)
        elif inner is Inner.STATUS and st in (
            ReceiverState.AWAIT_DECISION,
            ReceiverState.RECEIVING,
        ):
            msg = load_json(payload, "status")
            state, detail = msg.get("state"), msg.get("detail", {})
            if not isinstance(state, str) or len(state) > 64 or not isinstance(detail, dict):
                raise RemoteProtocolError("the sender sent a malformed status")
            self._events.append(ev.Status(state, detail))
        elif inner is Inner.DONE and st is ReceiverState.RECEIVING:
            if self._plan:
                fi, ci = self._plan[0]
                raise RemoteProtocolError(
                    f"the sender declared the study complete but {len(self._plan)} chunks never "
                    f"arrived (first missing: chunk {ci} of {self._file(fi)})",
                    "truncated",
                )
            self.state = ReceiverState.AWAIT_VERDICT
            self._events.append(ev.SenderDone())
        elif inner is Inner.CLOSE and st in (ReceiverState.AWAIT_CLOSE, ReceiverState.DONE):
            self.state = ReceiverState.DONE
            self._events.append(ev.Closed())
        else:
            raise RemoteProtocolError(
                f"the sender sent {inner.name} while this node was in state {st.value}"
            )

    def _handle_manifest(self, payload: bytes) -> None:
        if len(payload) < 4:
            raise RemoteProtocolError("the sender sent a truncated manifest")
        n = int.from_bytes(payload[:4], "big")
        data = payload[4 : 4 + n]
        sig = payload[4 + n : 4 + n + crypto.SIGNATURE_BYTES]
        extra_raw = payload[4 + n + crypto.SIGNATURE_BYTES :]
        if len(data) != n or len(sig) != crypto.SIGNATURE_BYTES:
            raise RemoteProtocolError("the sender sent a truncated manifest")
        digest = hashlib.sha256(data).hexdigest()
        try:
            crypto.verify_signature(self.peer_key, b"p2pshare/1 manifest\0" + digest.encode(), sig)
        except CryptoError:
            raise RemoteProtocolError("the manifest's signature is invalid", "integrity") from None
        manifest = Manifest.from_bytes(data)  # ManifestError is a RemoteProtocolError
        if manifest.to_bytes() != data:
            raise ManifestError("it is not in canonical form")
        extra = load_json(extra_raw, "manifest extras") if extra_raw else {}
        window = extra.get("window", 1)
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
            raise RemoteProtocolError("the sender announced an impossible window")
        self._ack_every = max(1, window // 2)
        self.manifest = manifest
        self.manifest_digest = digest
        self.state = ReceiverState.AWAIT_DECISION
        self._events.append(ev.ManifestOffer(manifest, digest, sig, extra))

    def _file(self, fi: int) -> str:
        assert self.manifest is not None
        return f"instance {self.manifest.instances[fi].sop_instance_uid}"

    def _handle_chunk(self, body: bytes | memoryview) -> None:
        assert self.manifest is not None
        if len(body) < CHUNK_HEADER.size + crypto.TAG_BYTES:
            raise RemoteProtocolError("the sender sent a truncated chunk")
        header = bytes(body[: CHUNK_HEADER.size])
        fi, ci, flags = CHUNK_HEADER.unpack(header)
        if not self._plan:
            raise RemoteProtocolError("the sender sent more chunks than the manifest lists")
        efi, eci = self._plan[0]
        if (fi, ci) != (efi, eci):
            raise RemoteProtocolError(
                f"chunk {ci} of file #{fi} arrived where chunk {eci} of {self._file(efi)} was "
                f"expected: the stream was reordered, replayed or cut",
                "out-of-order",
            )
        last = eci == self.manifest.chunk_count(efi) - 1
        if bool(flags & FLAG_LAST) != last:
            raise RemoteProtocolError(
                f"chunk {eci} of {self._file(efi)} carries a wrong last-chunk flag", "integrity"
            )
        try:
            data = crypto.open_sealed(
                self._recv_key,
                self._recv_ctr,
                body[CHUNK_HEADER.size :],
                self._aad(FrameType.CHUNK, header),
            )
        except CryptoError:
            raise RemoteProtocolError(
                f"chunk {eci} of {self._file(efi)} failed authentication: it was altered, "
                f"replayed or reordered in transit; the file was not kept",
                "integrity",
            ) from None
        self._recv_ctr += 1
        expected = self.manifest.chunk_length(efi, eci)
        if len(data) != expected:
            raise RemoteProtocolError(
                f"chunk {eci} of {self._file(efi)} holds {len(data)} bytes where the manifest "
                f"implies {expected}",
                "size-mismatch",
            )
        self._plan.popleft()
        if eci == 0:
            self._hash = hashlib.sha256()
        self._hash.update(data)
        self._events.append(ev.Chunk(efi, eci, eci * self.manifest.chunk_size, data, last))
        self._stored += 1
        if self._stored % self._ack_every == 0 or not self._plan:
            self._seal(Inner.ACK, dump_json({"chunks": self._stored}))
        if last:
            if self._hash.hexdigest() == self.manifest.instances[efi].sha256:
                self.verified.add(efi)
                self._events.append(ev.FileVerified(efi))
            else:
                reason = f"{self._file(efi)} does not match the SHA-256 in the signed manifest"
                self.rejected[efi] = reason
                self._events.append(ev.FileRejected(efi, reason))
            self._hash = None


def _split_signed(payload: bytes) -> tuple[bytes, bytes]:
    if len(payload) <= crypto.SIGNATURE_BYTES:
        raise RemoteProtocolError("the peer sent a truncated signed message")
    return payload[: -crypto.SIGNATURE_BYTES], payload[-crypto.SIGNATURE_BYTES :]


def _parse_have(raw: object, manifest: Manifest) -> dict[int, int]:
    if not isinstance(raw, dict) or len(raw) > len(manifest.instances):
        raise RemoteProtocolError("the receiver sent a malformed resume list")
    have: dict[int, int] = {}
    for k, v in raw.items():
        # isascii: str.isdigit() also accepts digits like "²" that int() refuses
        if not isinstance(k, str) or not (k.isascii() and k.isdigit()) or not isinstance(v, int):
            raise RemoteProtocolError("the receiver sent a malformed resume list")
        fi = int(k)
        if fi >= len(manifest.instances) or not 0 <= v <= manifest.chunk_count(fi):
            raise RemoteProtocolError("the receiver's resume list names chunks that do not exist")
        have[fi] = v
    return have


__all__ = [
    "PROTOCOL_VERSION",
    "ProtocolError",
    "LocalProtocolError",
    "ReceiverSession",
    "ReceiverState",
    "SenderSession",
    "SenderState",
    "transfer_plan",
]
