"""The sending node's side of one connection (sans-I/O; see ``session.py`` for the theory)."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from enum import Enum
from typing import Any

from p2pshare import crypto
from p2pshare.errors import CryptoError, RemoteProtocolError
from p2pshare.manifest import Manifest
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import (
    CHUNK_HEADER,
    FLAG_LAST,
    HEADER,
    MAX_FRAME,
    FrameType,
    Inner,
    dump_json,
    encode_json,
    load_json,
    require,
)
from p2pshare.protocol.session import (
    DEFAULT_WINDOW,
    PROTOCOL_VERSION,
    Session,
    Sign,
    b64,
    peer_name,
    split_signed,
    transfer_plan,
    unb64,
)


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


class SenderSession(Session):
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
        #: no chunk leaves before the signed consent record went out (send_consent)
        self.consent_sent = False

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
            encode_json(FrameType.PAKE, {"offer_id": offer_id, "pake": b64(pake.message)})
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
                    "pk": b64(self._pk),
                    "name": self._name,
                    "sig": b64(self._sign(b"p2pshare/1 sender\0" + self._t)),
                    "confirm": b64(self._confirm("s")),
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

    def send_consent(self, record: bytes, signature: bytes) -> None:
        """Send the signed consent record; only now may chunks follow."""
        require(
            self.state in (SenderState.AWAIT_ACCEPT, SenderState.SENDING),
            f"send_consent in state {self.state}",
        )
        require(not self.consent_sent, "the consent record was already sent")
        self._seal(Inner.CONSENT, len(record).to_bytes(4, "big") + record + signature)
        self.consent_sent = True

    @property
    def manifest_digest(self) -> str:
        return self._manifest_digest

    @property
    def awaiting_consent(self) -> bool:
        """Accepted by the receiver, but the consent record has not gone out yet."""
        return self.state is SenderState.SENDING and not self.consent_sent

    @property
    def window_open(self) -> bool:
        return (
            self.state is SenderState.SENDING
            and self.consent_sent
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
        require(self.window_open, "send_chunk with the window closed or before consent")
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
            if (
                not isinstance(ref, str)
                or not 0 < len(ref) <= 64
                or kind not in ("qr", "spoken", "resume")
            ):
                raise RemoteProtocolError("the receiver named no valid offer")
            self._msg_r = unb64(hello.get("pake"), "key-exchange message", 33)
            self.state = SenderState.AWAIT_OFFER
            self._events.append(
                ev.OfferRequest(offer_ref=ref, spoken=kind == "spoken", resume=kind == "resume")
            )
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
            pk = unb64(msg.get("pk"), "identity key", crypto.PUBLIC_KEY_BYTES)
            name = peer_name(msg.get("name"))
            confirm0 = unb64(msg.get("confirm"), "key confirmation", 32)
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
            sig = unb64(msg.get("sig"), "signature", crypto.SIGNATURE_BYTES)
            confirm = unb64(msg.get("confirm"), "key confirmation", 32)
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
            body, sig = split_signed(payload)
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
        elif inner is Inner.CLOSE and st is SenderState.DONE:
            self._events.append(ev.Closed())
        else:
            raise RemoteProtocolError(
                f"the receiver sent {inner.name} while this node was in state {st.value}"
            )


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
