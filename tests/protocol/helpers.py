"""Two in-memory peers and a tiny synchronous driver for them.

The driver answers events the way the real engine does (look up the offer, trust the peer,
send the manifest, accept, stream chunks, sign the receipt) but with no I/O, so tests can split,
flip, drop and reorder the bytes between the two sessions at will.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pshare import crypto
from p2pshare.errors import RemoteProtocolError
from p2pshare.manifest import Instance, Manifest, Series
from p2pshare.protocol import events as ev
from p2pshare.protocol.session import ReceiverSession, SenderSession

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


def make_manifest(files: list[bytes], chunk_size: int = 4096) -> Manifest:
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
                sha256=hashlib.sha256(data).hexdigest(),
                instance_number=i + 1,
            )
            for i, data in enumerate(files)
        ),
    )


def make_pair(
    password_r: bytes = PASSWORD, window: int = 4, seed: int = 1
) -> tuple[SenderSession, ReceiverSession, crypto.Identity, crypto.Identity]:
    ids = crypto.Identity.generate(seeded(seed))
    idr = crypto.Identity.generate(seeded(seed + 100))
    sender = SenderSession(
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
        offer_ref=OFFER_ID,
        spoken=False,
        password=password_r,
        entropy=seeded(seed + 2),
    )
    return sender, receiver, ids, idr


Tamper = Callable[[str, bytes], bytes]


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
) -> Outcome:
    """Drive both sessions until both stop; every byte from S to R passes ``tamper_s2r``."""
    out = Outcome()
    partial: dict[int, bytearray] = {}
    receiver.start()
    r2s = receiver.data_to_send()
    s2r = b""
    for _ in range(max_rounds):
        # receiver → sender
        if r2s:
            for piece in split(r2s) if split else [r2s]:
                sender.receive_data(piece)
        try:
            while (e := sender.next_event()) is not None:
                out.sender_events.append(e)
                if isinstance(e, ev.OfferRequest):
                    sender.use_offer(OFFER_ID, sender_password)
                elif isinstance(e, ev.CodeMismatch):
                    sender.refuse("code-rejected", "code not accepted", tries_left)
                elif isinstance(e, ev.PeerIdentity):
                    sender.trust_peer()
                elif isinstance(e, ev.Paired):
                    sender.send_manifest(manifest)
                elif isinstance(e, ev.Receipt):
                    sender.close()
        except RemoteProtocolError as exc:
            out.sender_error = exc
        while sender.window_open:
            nxt = sender.next_chunk()
            assert nxt is not None
            fi, ci, off, length = nxt
            sender.send_chunk(fi, ci, files[fi][off : off + length])
        s2r = sender.data_to_send()
        if s2r:
            out.wire_s2r.append(s2r)
            if tamper_s2r:
                s2r = tamper_s2r("s2r", s2r)
            for piece in split(s2r) if split else [s2r]:
                receiver.receive_data(piece)
        try:
            while (e := receiver.next_event()) is not None:
                out.receiver_events.append(e)
                if isinstance(e, ev.PeerIdentity):
                    receiver.trust_peer()
                elif isinstance(e, ev.ManifestOffer):
                    receiver.accept()
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
        r2s = receiver.data_to_send()
        if not r2s and not s2r and not sender.window_open:
            break
    return out
