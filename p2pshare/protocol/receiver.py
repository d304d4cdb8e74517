"""The receiving node's side of one connection (sans-I/O; see ``session.py`` for the theory)."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from enum import Enum
from typing import Any, NoReturn

from p2pshare import crypto
from p2pshare import digest as file_digest
from p2pshare.errors import CryptoError, ManifestError, RemoteProtocolError
from p2pshare.manifest import Manifest
from p2pshare.protocol import consent
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import (
    CHUNK_HEADER,
    FLAG_LAST,
    MAX_FRAME,
    FrameType,
    Inner,
    dump_json,
    encode_json,
    load_json,
    require,
)
from p2pshare.protocol.session import (
    MAX_WINDOW,
    PROTOCOL_VERSION,
    Session,
    Sign,
    b64,
    peer_name,
    transfer_plan,
    unb64,
)


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


class ReceiverSession(Session):
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
        resume_offer: str = "",
        deferred: bool = False,
    ) -> None:
        """``resume_offer``: reconnecting to this offer (``offer_ref`` is then the resume
        ticket id and ``password`` its secret).

        ``deferred``: hand chunks out sealed (:class:`ev.SealedChunk`) for the driver to open
        and hash off the event loop, in parallel with reading the next ones, and take each
        file's digest back through :meth:`file_hashed`. Otherwise the session opens and hashes
        every chunk itself and hands out :class:`ev.Chunk` (simplest for in-memory drivers).
        The checks and their verdicts are the same either way."""
        super().__init__(name=name, public_key=public_key, sign=sign, entropy=entropy)
        self.state = ReceiverState.START
        self._offer_ref = offer_ref
        self._spoken = spoken
        self._resume_offer = resume_offer
        self._prefix: dict[int, Any] = {}
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
        self._deferred = deferred
        #: deferred mode: files whose last chunk went out sealed, waiting for their digest
        self._unhashed: set[int] = set()
        #: the verified consent record; no chunk is accepted before it
        self.consent: dict[str, Any] | None = None

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
                    "kind": "resume"
                    if self._resume_offer
                    else ("spoken" if self._spoken else "qr"),
                    "pake": b64(self._pake.message),
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
                    "sig": b64(self._sign(b"p2pshare/1 receiver\0" + self._t)),
                    "confirm": b64(self._confirm("r")),
                }
            ),
        )
        s2r, r2s = self._data_keys()
        self._send_key, self._send_ctr = r2s, 0
        self._recv_key, self._recv_ctr = s2r, 0
        self._buf.max_frame = MAX_FRAME
        self.state = ReceiverState.AWAIT_MANIFEST
        self._events.append(ev.Paired(self.transfer_id, self.session_key))

    def accept(
        self, have: dict[int, int] | None = None, prefix_hashes: dict[int, Any] | None = None
    ) -> None:
        """Accept the manifest.

        ``have``: file index → chunks already held (resuming). A whole file counts as verified;
        for a partial one, ``prefix_hashes[fi]`` is a BLAKE3 hasher over the chunks held, so the
        file is still verified whole when its last chunk arrives.
        """
        require(self.state is ReceiverState.AWAIT_DECISION, f"accept in state {self.state}")
        assert self.manifest is not None
        have = {fi: n for fi, n in (have or {}).items() if n}
        prefix = dict(prefix_hashes or {})
        count = len(self.manifest.instances)
        for fi, n in have.items():
            require(0 <= fi < count, f"file #{fi} is not in the manifest")
            require(0 < n <= self.manifest.chunk_count(fi), f"file #{fi} has no chunk {n}")
            if n < self.manifest.chunk_count(fi):
                require(fi in prefix, f"a partial file #{fi} needs the hash of what is held")
        # Validate everything before touching any state: a refused call changes nothing.
        self.verified.update(fi for fi, n in have.items() if n == self.manifest.chunk_count(fi))
        self._prefix = {fi: prefix[fi] for fi, n in have.items() if fi in prefix}
        self._have = have
        self._plan = deque(transfer_plan(self.manifest, have))
        self._seal(Inner.ACCEPT, dump_json({"have": {str(k): v for k, v in have.items()}}))
        self.state = ReceiverState.RECEIVING

    def send_receipt(self, now: int) -> dict[str, Any]:
        """Sign and send the receipt; only when every file verified."""
        require(self.state is ReceiverState.AWAIT_VERDICT, f"send_receipt in state {self.state}")
        assert self.manifest is not None
        require(
            len(self.verified) == len(self.manifest.instances)
            and not self.rejected
            and not self._unhashed,
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
            expected = self._resume_offer or (None if self._spoken else self._offer_ref)
            if expected is not None and offer_id != expected:
                raise RemoteProtocolError("the sender answered for another offer")
            msg_s = unb64(msg.get("pake"), "key-exchange message", 33)
            key = self._pake.finish(msg_s)
            self.offer_id = offer_id
            self._pake_done(key, offer_id, self._pake.message, msg_s)
            self._send_key = self._hs_key("r2s")
            self._recv_key = self._hs_key("s2r")
            self._seal(
                Inner.IDENT_R,
                dump_json(
                    {
                        "pk": b64(self._pk),
                        "name": self._name,
                        "confirm": b64(crypto.derive(self._k, "p2ps confirm r0", self._t0)),
                    }
                ),
            )
            self.state = ReceiverState.AWAIT_IDENT
        elif ftype is FrameType.SEALED and st is ReceiverState.AWAIT_IDENT:
            inner, payload = self._open(body)
            if inner is not Inner.IDENT_S:
                raise RemoteProtocolError("the sender sent an unexpected message while pairing")
            msg = load_json(payload, "identity")
            pk = unb64(msg.get("pk"), "identity key", crypto.PUBLIC_KEY_BYTES)
            name = peer_name(msg.get("name"))
            sig = unb64(msg.get("sig"), "signature", crypto.SIGNATURE_BYTES)
            confirm = unb64(msg.get("confirm"), "key confirmation", 32)
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
        elif inner is Inner.CONSENT and st in (
            ReceiverState.AWAIT_DECISION,
            ReceiverState.RECEIVING,
        ):
            self._handle_consent(payload)
        elif inner is Inner.STATUS and st in (
            ReceiverState.AWAIT_DECISION,
            ReceiverState.RECEIVING,
        ):
            if len(payload) > MAX_STATUS_BYTES:
                raise RemoteProtocolError("the sender sent an oversized status")
            msg = load_json(payload, "status")
            state, detail = msg.get("state"), msg.get("detail", {})
            if not isinstance(state, str) or not _short_text(state, 64) or not _flat_detail(detail):
                raise RemoteProtocolError("the sender sent a malformed status")
            self._events.append(ev.Status(state, detail))
            if st is ReceiverState.RECEIVING:
                # Answer with the current count: nothing new for the window, but the sender
                # hears from us while it waits (for consent), so neither side times out.
                self._seal(Inner.ACK, dump_json({"chunks": self._stored}))
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

    def _handle_consent(self, payload: bytes) -> None:
        if self.consent is not None:
            raise RemoteProtocolError("the sender sent a second consent record", "consent")
        n = int.from_bytes(payload[:4], "big") if len(payload) >= 4 else -1
        raw = payload[4 : 4 + n]
        sig = payload[4 + n :]
        if n < 0 or len(raw) != n or len(sig) != crypto.SIGNATURE_BYTES:
            raise RemoteProtocolError("the sender sent a truncated consent record", "consent")
        self.consent = consent.check(
            raw,
            sig,
            sender_key=self.peer_key,
            receiver_key=self._pk,
            offer_id=self.offer_id,
            manifest_sha256=self.manifest_digest,
        )
        self._events.append(ev.ConsentGranted(self.consent, raw, sig))

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
        if self.consent is None:
            raise RemoteProtocolError(
                "the sender sent images before showing that the transfer was authorised; "
                "nothing was kept",
                "consent",
            )
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
        sealed = body[CHUNK_HEADER.size :]
        aad = self._aad(FrameType.CHUNK, header)
        expected = self.manifest.chunk_length(efi, eci)
        if self._deferred and len(sealed) - crypto.TAG_BYTES == expected:
            # (a length that does not fit is decided below, as without deferral: a forged
            # chunk fails authentication, an authentic one of the wrong length is a lie)
            self._pass_sealed(efi, eci, last, sealed, aad, expected)
            return
        try:
            data = crypto.open_sealed(self._recv_key, self._recv_ctr, sealed, aad)
        except CryptoError:
            raise self._unreadable(efi, eci) from None
        self._recv_ctr += 1
        if len(data) != expected:
            raise RemoteProtocolError(
                f"chunk {eci} of {self._file(efi)} holds {len(data)} bytes where the manifest "
                f"implies {expected}",
                "size-mismatch",
            )
        self._plan.popleft()
        if eci == 0:
            self._hash = file_digest.hasher()
        elif self._hash is None:  # the first chunk of a file resumed part-way
            self._hash = self._prefix.pop(efi)
        self._hash.update(data)
        self._events.append(ev.Chunk(efi, eci, eci * self.manifest.chunk_size, data, last))
        self._count_stored()
        if last:
            self._verdict(efi, self._hash.hexdigest())
            self._hash = None

    def _pass_sealed(
        self, fi: int, ci: int, last: bool, sealed: bytes | memoryview, aad: bytes, length: int
    ) -> None:
        assert self.manifest is not None
        counter = self._recv_ctr
        self._recv_ctr += 1
        self._plan.popleft()
        # the first chunk of a file starts its hash; for a file resumed part-way, the hash of
        # what is held goes with the first chunk this connection brings
        hasher = file_digest.hasher() if ci == 0 else self._prefix.pop(fi, None)
        offset = ci * self.manifest.chunk_size
        self._events.append(
            ev.SealedChunk(
                fi, ci, offset, length, last, sealed, self._recv_key, counter, aad, hasher
            )
        )
        self._count_stored()
        if last:
            self._unhashed.add(fi)

    def _count_stored(self) -> None:
        self._stored += 1
        if self._stored % self._ack_every == 0 or not self._plan:
            self._seal(Inner.ACK, dump_json({"chunks": self._stored}))

    def _verdict(self, fi: int, hexdigest: str) -> None:
        assert self.manifest is not None
        if hexdigest == self.manifest.instances[fi].digest:
            self.verified.add(fi)
            self._events.append(ev.FileVerified(fi))
        else:
            reason = f"{self._file(fi)} does not match its digest in the signed manifest"
            self.rejected[fi] = reason
            self._events.append(ev.FileRejected(fi, reason))

    def _unreadable(self, fi: int, ci: int) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"chunk {ci} of {self._file(fi)} failed authentication: it was altered, "
            f"replayed or reordered in transit; the file was not kept",
            "integrity",
        )

    # -- deferred mode: what the driver reports back ---------------------------------------------

    def file_hashed(self, file_index: int, hexdigest: str) -> None:
        """The digest of a file whose chunks all went out sealed; queues FileVerified or
        FileRejected, exactly as the session would have itself."""
        require(file_index in self._unhashed, f"file #{file_index} is not waiting for a digest")
        self._unhashed.discard(file_index)
        self._verdict(file_index, hexdigest)

    def chunk_unreadable(self, file_index: int, chunk_index: int) -> NoReturn:
        """A sealed chunk failed to open: tell the sender why, and raise it here too."""
        err = self._unreadable(file_index, chunk_index)
        self._fail(err.code, err.message)
        raise err


def open_chunk(chunk: ev.SealedChunk) -> bytearray:
    """The plaintext of a chunk the session handed out sealed (deferred mode).

    A pure function of the event, safe on any thread. Raises CryptoError if the chunk was altered,
    replayed or moved; the driver then reports it with ``ReceiverSession.chunk_unreadable``.
    """
    return crypto.open_sealed(chunk.key, chunk.counter, chunk.sealed, chunk.aad)


#: A status is a few words for the person (e.g. "waiting for consent"), never bulk data.
MAX_STATUS_BYTES = 4096


def _short_text(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _flat_detail(detail: object) -> bool:
    """A status detail: at most 16 short keys with short text, number or flag values."""
    if not isinstance(detail, dict) or len(detail) > 16:
        return False
    for key, value in detail.items():
        if not _short_text(key, 64):
            return False
        if isinstance(value, str):
            if len(value) > 256:
                return False
        elif not isinstance(value, int | float | bool) and value is not None:
            return False
    return True
