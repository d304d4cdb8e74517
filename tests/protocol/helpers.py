"""Two in-memory peers and a tiny synchronous driver for them.

The driver answers events the way the real engine does (look up the offer, trust the peer,
send the manifest, accept, stream chunks, sign the receipt) but with no I/O, so tests can split,
flip, drop and reorder the bytes between the two sessions at will.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pshare import crypto
from p2pshare import digest as file_digest
from p2pshare.errors import RemoteProtocolError
from p2pshare.manifest import Instance, Manifest, Series
from p2pshare.protocol import consent
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import CHUNK_HEADER, MAX_FRAME, FrameBuffer, FrameType, encode
from p2pshare.protocol.receiver import ReceiverSession
from p2pshare.protocol.sender import SenderSession

OFFER_ID = "0123456789abcdef0123456789abcdef"
PASSWORD = b"p2pshare qr:" + b"k" * 32
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def make_files(count: int = 3, size: int = 10_000, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size + i * 777) for i in range(count)]


def stream_ordered_numbers(count: int) -> list[int]:
    """Instance numbers under which the stream order (middle slice first) is manifest order.

    The hostile tests count chunks on the wire ("the 5th chunk is file 1"), so the first file
    carries the middle number and the others the rest, ascending.
    """
    middle = count // 2 + 1
    return [middle] + [n for n in range(1, count + 1) if n != middle]


def make_manifest(files: list[bytes], chunk_size: int = 4096) -> Manifest:
    numbers = stream_ordered_numbers(len(files))
    return Manifest(
        study_instance_uid=STUDY,
        study_description="CT TRAUMA",
        patient={"name": "TEST^PATIENT"},
        series=(Series(SERIES, "CT", "Axial", 1),),
        chunk_size=chunk_size,
        instances=tuple(
            Instance(
                sop_instance_uid=f"{SERIES}.{i + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=SERIES,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size=len(data),
                digest=file_digest.of_bytes(data),
                instance_number=numbers[i],
            )
            for i, data in enumerate(files)
        ),
    )


def make_pair(
    password_r: bytes = PASSWORD,
    window: int = 4,
    seed: int = 1,
    *,
    offer_ref: str = OFFER_ID,
    spoken: bool = False,
    sender_cls: type[SenderSession] = SenderSession,
    deferred: bool = False,
) -> tuple[SenderSession, ReceiverSession, crypto.Identity, crypto.Identity]:
    ids = crypto.Identity.generate(seeded(seed))
    idr = crypto.Identity.generate(seeded(seed + 100))
    sender = sender_cls(
        name="Referring Hospital ED",
        public_key=ids.public_key,
        sign=ids.sign,
        entropy=seeded(seed + 1),
        window=window,
    )
    receiver = ReceiverSession(
        name="Trauma Centre Radiology",
        public_key=idr.public_key,
        sign=idr.sign,
        offer_ref=offer_ref,
        spoken=spoken,
        password=password_r,
        entropy=seeded(seed + 2),
        deferred=deferred,
    )
    return sender, receiver, ids, idr


Tamper = Callable[[str, bytes], bytes]
#: Driver hook: return True when the test handled the event itself (the default answer is skipped).
Hook = Callable[[object, ev.Event], bool]


@dataclass
class Outcome:
    files: dict[int, bytes] = field(default_factory=dict)
    verified: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    receipt: dict[str, object] | None = None
    sender_events: list[ev.Event] = field(default_factory=list)
    receiver_events: list[ev.Event] = field(default_factory=list)
    sender_error: RemoteProtocolError | None = None
    receiver_error: RemoteProtocolError | None = None
    wire_s2r: list[bytes] = field(default_factory=list)
    wire_r2s: list[bytes] = field(default_factory=list)
    #: the largest ``sender.unacked`` seen right after any chunk was sent
    max_unacked: int = 0


def run(
    sender: SenderSession,
    receiver: ReceiverSession,
    files: list[bytes],
    manifest: Manifest,
    *,
    tamper_s2r: Tamper | None = None,
    split: Callable[[bytes], list[bytes]] | None = None,
    sender_password: bytes = PASSWORD,
    tries_left: int = 2,
    max_rounds: int = 100_000,
    tamper_r2s: Tamper | None = None,
    have: dict[int, int] | None = None,
    on_sender_event: Hook | None = None,
    on_receiver_event: Hook | None = None,
    consent: bool = True,
) -> Outcome:
    """Drive both sessions until both stop; every byte from S to R passes ``tamper_s2r``
    (and from R to S ``tamper_r2s``).

    With ``split`` each direction's bytes are cut into pieces, and the receiving session is
    asked for events after every single piece (h11 style). ``on_*_event`` hooks see every event
    first and may answer it themselves (return True) to play a misbehaving or refusing peer.
    """
    out = Outcome()
    partial: dict[int, bytearray] = {}

    def drain_sender() -> None:
        try:
            while (e := sender.next_event()) is not None:
                out.sender_events.append(e)
                if on_sender_event and on_sender_event(sender, e):
                    continue
                if isinstance(e, ev.OfferRequest):
                    sender.use_offer(OFFER_ID, sender_password)
                elif isinstance(e, ev.CodeMismatch):
                    sender.refuse("code-rejected", "code not accepted", tries_left)
                elif isinstance(e, ev.PeerIdentity):
                    sender.trust_peer()
                elif isinstance(e, ev.Paired):
                    sender.send_manifest(manifest)
                elif isinstance(e, ev.Accepted) and consent and sender.awaiting_consent:
                    record, sig = consent_record_for(sender)
                    sender.send_consent(record, sig)
                elif isinstance(e, ev.Receipt):
                    sender.close()
        except RemoteProtocolError as exc:
            out.sender_error = exc

    def drain_receiver() -> None:
        try:
            while (e := receiver.next_event()) is not None:
                out.receiver_events.append(e)
                if on_receiver_event and on_receiver_event(receiver, e):
                    continue
                if isinstance(e, ev.PeerIdentity):
                    receiver.trust_peer()
                elif isinstance(e, ev.ManifestOffer):
                    receiver.accept(have)
                elif isinstance(e, ev.Chunk):
                    partial.setdefault(e.file_index, bytearray()).extend(e.data)
                elif isinstance(e, ev.FileVerified):
                    out.verified.append(e.file_index)
                    out.files[e.file_index] = bytes(partial.pop(e.file_index))
                elif isinstance(e, ev.FileRejected):
                    out.rejected[e.file_index] = e.reason
                    partial.pop(e.file_index, None)
                elif isinstance(e, ev.SenderDone):
                    if not receiver.rejected:
                        out.receipt = receiver.send_receipt(now=1_700_000_000)
                    else:
                        receiver.refuse("incomplete", "some files failed verification")
        except RemoteProtocolError as exc:
            out.receiver_error = exc

    receiver.start()
    r2s = receiver.data_to_send()
    s2r = b""
    for _ in range(max_rounds):
        # receiver → sender
        if r2s:
            out.wire_r2s.append(r2s)
            if tamper_r2s:
                r2s = tamper_r2s("r2s", r2s)
            for piece in split(r2s) if split else [r2s]:
                sender.receive_data(piece)
                drain_sender()
        else:
            drain_sender()
        while sender.window_open:
            nxt = sender.next_chunk()
            assert nxt is not None
            fi, ci, off, length = nxt
            sender.send_chunk(fi, ci, files[fi][off : off + length])
            out.max_unacked = max(out.max_unacked, sender.unacked)
        s2r = sender.data_to_send()
        if s2r:
            out.wire_s2r.append(s2r)
            if tamper_s2r:
                s2r = tamper_s2r("s2r", s2r)
            for piece in split(s2r) if split else [s2r]:
                receiver.receive_data(piece)
                drain_receiver()
        else:
            drain_receiver()
        r2s = receiver.data_to_send()
        if not r2s and not s2r and not sender.window_open:
            break
    return out


def consent_record_for(
    sender: SenderSession, decision: str = "approved", **changes: object
) -> tuple[bytes, bytes]:
    """A consent record as the sending node signs it, for the paired receiver."""
    fields: dict[str, object] = {
        "offer_id": OFFER_ID,
        "manifest_sha256": sender.manifest_digest,
        "sender_fingerprint": crypto.fingerprint(sender._pk),
        "destination_fingerprint": crypto.fingerprint(sender.peer_key),
        "destination_name": sender.peer_name,
        "intended_destination": None,
        "shown_to_decider": "verified",
        "decision": decision,
        "decided_by": {"role": "patient"},
        "method": {"approved": "phone-link", "break-glass": "break-glass"}.get(
            decision, "policy-none"
        ),
        "policy": "patient",
        "at": 1_700_000_000,
    }
    fields.update(changes)
    record = consent.build(**fields)  # type: ignore[arg-type]
    return record, sender._sign(consent.sign_bytes(record))


# -- working on whole frames ------------------------------------------------------------------


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Cut bytes that hold only whole frames (as ``data_to_send`` returns them) into frames."""
    buf = FrameBuffer(MAX_FRAME)
    buf.feed(data)
    frames: list[tuple[int, bytes]] = []
    while (frame := buf.next_frame()) is not None:
        frames.append((frame[0], bytes(frame[1])))
    assert buf.buffered == 0, "trailing partial frame"
    return frames


@dataclass
class WireFrame:
    """One frame as it crossed the wire, numbered in stream order."""

    ftype: int
    body: bytes
    index: int  # among all frames in this direction
    chunk_no: int | None  # among CHUNK frames, or None
    sealed_no: int | None  # among SEALED frames, or None

    @property
    def chunk(self) -> tuple[int, int, int]:
        """(file index, chunk index, flags) of a CHUNK frame."""
        return CHUNK_HEADER.unpack(self.body[: CHUNK_HEADER.size])


def wire_frames(blobs: list[bytes]) -> list[WireFrame]:
    """Every frame in the recorded blobs (e.g. ``Outcome.wire_s2r``), numbered."""
    tamper = FrameTamper(lambda f: [(f.ftype, f.body)])
    for blob in blobs:
        tamper("s2r", blob)
    return tamper.seen


class FrameTamper:
    """A ``tamper_s2r`` hook that edits whole frames.

    ``edit(frame)`` returns the frames to put on the wire in its place, as ``(type, body)``
    pairs: ``[]`` drops it, two entries inject one, a held frame can be emitted later.
    """

    def __init__(self, edit: Callable[[WireFrame], list[tuple[int, bytes]]]) -> None:
        self.edit = edit
        self.seen: list[WireFrame] = []
        self._chunks = 0
        self._sealed = 0

    def __call__(self, direction: str, data: bytes) -> bytes:
        out: list[bytes] = []
        for ftype, body in split_frames(data):
            chunk_no = sealed_no = None
            if ftype == 0x11:
                chunk_no, self._chunks = self._chunks, self._chunks + 1
            elif ftype == 0x10:
                sealed_no, self._sealed = self._sealed, self._sealed + 1
            frame = WireFrame(ftype, body, len(self.seen), chunk_no, sealed_no)
            self.seen.append(frame)
            out.extend(encode(t, b) for t, b in self.edit(frame))  # type: ignore[arg-type]
        return b"".join(out)


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    """``data`` with one bit flipped (``pos`` may be negative)."""
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def forge_chunk(
    sender: SenderSession, file_index: int, chunk_index: int, data: bytes, flags: int
) -> bytes:
    """A CHUNK frame sealed with the sender's real keys and next counter, but with whatever
    header and plaintext a hostile sender chooses (the honest ``send_chunk`` refuses this)."""
    header = CHUNK_HEADER.pack(file_index, chunk_index, flags)
    ct = crypto.seal(sender._send_key, sender._send_ctr, data, sender._aad(FrameType.CHUNK, header))
    sender._send_ctr += 1
    return encode(FrameType.CHUNK, header + ct)
