"""Two in-memory sessions against each other: the honest paths, byte for byte.

Style after h11's tests: no sockets, the bytes between the peers are ours to cut, and every
assertion is on an exact outcome (bytes, states, event sequences, error codes).
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pshare import codes, crypto
from p2pshare import digest as file_digest
from p2pshare.errors import LocalProtocolError, RemoteProtocolError
from p2pshare.manifest import Manifest
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import FrameType, dump_json, load_json
from p2pshare.protocol.receiver import ReceiverSession, ReceiverState
from p2pshare.protocol.sender import SenderSession, SenderState
from p2pshare.protocol.session import transfer_plan
from tests.protocol.helpers import (
    OFFER_ID,
    PASSWORD,
    SERIES,
    consent_record_for,
    make_files,
    make_manifest,
    make_pair,
    run,
    seeded,
    split_frames,
    wire_frames,
)

FILES = make_files()  # 3 files: 10000, 10777, 11554 bytes → 3 chunks each at 4096
MANIFEST = make_manifest(FILES)


def kinds(events: list[ev.Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def chunk_frames(blobs: list[bytes]) -> list[tuple[int, int, int]]:
    return [f.chunk for f in wire_frames(blobs) if f.ftype == FrameType.CHUNK]


def assert_complete(out, files: list[bytes], sender: SenderSession, receiver: ReceiverSession):
    assert out.sender_error is None and out.receiver_error is None
    assert sender.state is SenderState.DONE
    assert receiver.state is ReceiverState.DONE
    assert out.receipt is not None
    assert receiver.verified == set(range(len(files)))
    assert receiver.rejected == {}


# -- happy path ------------------------------------------------------------------------------


def test_happy_path_delivers_identical_files_and_a_signed_receipt():
    sender, receiver, ids, idr = make_pair()
    out = run(sender, receiver, FILES, MANIFEST)

    assert_complete(out, FILES, sender, receiver)
    assert out.files == dict(enumerate(FILES))
    assert out.verified == [0, 1, 2]

    # exact event sequences on both sides
    assert kinds(out.sender_events) == [
        "OfferRequest",
        "PeerIdentity",
        "Paired",
        "Accepted",
        "Receipt",
    ]
    n_chunks = sum(MANIFEST.chunk_count(i) for i in range(3))
    assert kinds(out.receiver_events) == (
        ["PeerIdentity", "Paired", "ManifestOffer", "ConsentGranted"]
        + (["Chunk"] * 3 + ["FileVerified"]) * 3
        + ["SenderDone", "Closed"]
    )
    assert n_chunks == 9

    # the receipt names exactly this manifest, this transfer and both identities
    digest = hashlib.sha256(MANIFEST.to_bytes()).hexdigest()
    assert out.receipt == {
        "transfer_id": sender.transfer_id.hex(),
        "manifest_sha256": digest,
        "study_instance_uid": MANIFEST.study_instance_uid,
        "instances": 3,
        "bytes": sum(len(f) for f in FILES),
        "received_at": 1_700_000_000,
        "receiver": crypto.fingerprint(idr.public_key),
        "sender": crypto.fingerprint(ids.public_key),
    }
    receipt_ev = out.sender_events[-1]
    assert isinstance(receipt_ev, ev.Receipt)
    assert receipt_ev.body == out.receipt
    crypto.verify_signature(
        idr.public_key, b"p2pshare/1 receipt\0" + dump_json(out.receipt), receipt_ev.signature
    )

    # both sides derived the same connection keys and saw each other's identities
    assert sender.transfer_id == receiver.transfer_id and len(sender.transfer_id) == 16
    assert sender.session_key == receiver.session_key and len(sender.session_key) == 32
    paired_s = out.sender_events[2]
    paired_r = out.receiver_events[1]
    assert paired_s == paired_r == ev.Paired(sender.transfer_id, sender.session_key)
    assert out.sender_events[1] == ev.PeerIdentity(
        idr.public_key, "Trauma Centre Radiology", crypto.fingerprint(idr.public_key)
    )
    assert out.receiver_events[0] == ev.PeerIdentity(
        ids.public_key, "Referring Hospital ED", crypto.fingerprint(ids.public_key)
    )
    assert out.sender_events[0] == ev.OfferRequest(offer_ref=OFFER_ID, spoken=False)

    offer = out.receiver_events[2]
    assert isinstance(offer, ev.ManifestOffer)
    assert offer.manifest == MANIFEST
    assert offer.digest == digest == receiver.manifest_digest
    assert offer.extra == {"window": 4}  # the sender announces its window
    crypto.verify_signature(
        ids.public_key, b"p2pshare/1 manifest\0" + digest.encode(), offer.signature
    )


def test_chunk_events_carry_offsets_and_last_flags_in_stream_order():
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, FILES, MANIFEST)
    chunks = [e for e in out.receiver_events if isinstance(e, ev.Chunk)]
    assert [(c.file_index, c.chunk_index) for c in chunks] == transfer_plan(MANIFEST, {})
    for c in chunks:
        assert c.offset == c.chunk_index * MANIFEST.chunk_size
        assert c.data == FILES[c.file_index][c.offset : c.offset + MANIFEST.chunk_size]
        assert c.last == (c.chunk_index == MANIFEST.chunk_count(c.file_index) - 1)
    # and on the wire: one CHUNK frame per planned chunk, flags set only on last chunks
    assert chunk_frames(out.wire_s2r) == [
        (fi, ci, int(ci == MANIFEST.chunk_count(fi) - 1)) for fi, ci in transfer_plan(MANIFEST, {})
    ]


def test_no_plaintext_of_the_study_crosses_the_wire():
    files = [b"PATIENT^SECRET^" * 300, b"DICM" * 2000]
    manifest = make_manifest(files)
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, files, manifest)
    assert out.files == dict(enumerate(files))
    wire = b"".join(out.wire_s2r)
    assert b"PATIENT^SECRET^" not in wire
    assert b"DICM" not in wire
    assert b"TEST^PATIENT" not in wire  # the demographics travel sealed, too
    assert manifest.study_instance_uid.encode() not in wire


@pytest.mark.parametrize(
    "sizes",
    [
        [1],  # a one-byte file: one short chunk
        [4096],  # exactly one full chunk
        [4097],  # a full chunk and a one-byte chunk
        [8192, 1, 4095],  # exact multiple, tiny, one short of a chunk
    ],
)
def test_chunk_boundaries(sizes):
    rng = random.Random(len(sizes))
    files = [rng.randbytes(n) for n in sizes]
    manifest = make_manifest(files)
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, files, manifest)
    assert_complete(out, files, sender, receiver)
    assert out.files == dict(enumerate(files))
    expected_chunks = sum(-(-n // 4096) for n in sizes)
    assert len(chunk_frames(out.wire_s2r)) == expected_chunks
    assert out.receipt["bytes"] == sum(sizes)


def test_manifest_extras_and_status_reach_the_receiver():
    sender, receiver, _, _ = make_pair()

    def on_sender(s, e):
        if isinstance(e, ev.Paired):
            s.send_manifest(MANIFEST, extra={"reason": "trauma", "urgent": True})
            s.send_status("waiting-consent", {"who": "radiologist"})
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=on_sender)
    assert_complete(out, FILES, sender, receiver)
    offer = next(e for e in out.receiver_events if isinstance(e, ev.ManifestOffer))
    assert offer.extra == {"reason": "trauma", "urgent": True, "window": 4}
    # the status sealed after the manifest reaches the receiver after the offer was accepted
    statuses = [e for e in out.receiver_events if isinstance(e, ev.Status)]
    assert statuses == [ev.Status("waiting-consent", {"who": "radiologist"})]


def test_both_sides_derive_the_same_key_schedule_and_different_runs_differ():
    s1, r1, _, _ = make_pair(seed=1)
    run(s1, r1, FILES, MANIFEST)
    s2, r2, _, _ = make_pair(seed=2)
    run(s2, r2, FILES, MANIFEST)
    assert s1.session_key == r1.session_key
    assert s2.session_key == r2.session_key
    assert s1.session_key != s2.session_key
    assert s1.transfer_id != s2.transfer_id


def test_the_same_entropy_gives_the_same_bytes_on_the_wire():
    s1, r1, _, _ = make_pair(seed=7)
    o1 = run(s1, r1, FILES, MANIFEST)
    s2, r2, _, _ = make_pair(seed=7)
    o2 = run(s2, r2, FILES, MANIFEST)
    assert b"".join(o1.wire_s2r) == b"".join(o2.wire_s2r)
    assert b"".join(o1.wire_r2s) == b"".join(o2.wire_r2s)


# -- resume: whole files the receiver already holds ---------------------------------------------


def test_zero_have_sends_everything():
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, FILES, MANIFEST, have={})
    assert_complete(out, FILES, sender, receiver)
    accepted = next(e for e in out.sender_events if isinstance(e, ev.Accepted))
    assert accepted.have == {}
    assert len(chunk_frames(out.wire_s2r)) == 9


def test_have_skipping_whole_files_sends_only_the_rest():
    have = {0: MANIFEST.chunk_count(0), 2: MANIFEST.chunk_count(2)}
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, FILES, MANIFEST, have=have)

    assert_complete(out, FILES, sender, receiver)
    accepted = next(e for e in out.sender_events if isinstance(e, ev.Accepted))
    assert accepted.have == have
    # only file 1 travelled, all of it, in order
    assert [(fi, ci) for fi, ci, _ in chunk_frames(out.wire_s2r)] == [(1, 0), (1, 1), (1, 2)]
    assert out.files == {1: FILES[1]}
    assert out.verified == [1]
    assert receiver.verified == {0, 1, 2}
    assert out.receipt["instances"] == 3
    # the chunk ACK count only counts what was sent on this connection
    assert sender.unacked == 0


def test_have_everything_sends_no_chunk_but_still_a_receipt():
    have = {i: MANIFEST.chunk_count(i) for i in range(3)}
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, FILES, MANIFEST, have=have)
    assert_complete(out, FILES, sender, receiver)
    assert chunk_frames(out.wire_s2r) == []
    assert out.files == {}
    assert "SenderDone" in kinds(out.receiver_events)


@pytest.mark.parametrize("have", [{1: 1}, {1: 4}, {5: 1}, {-1: 3}, {0: 3, 1: 1}, {0: 3, 7: 1}])
def test_accept_refuses_partial_files_without_their_hash_or_unknown_files_and_changes_nothing(
    have,
):
    sender, receiver, _, _ = make_pair()

    def hold(r, e):
        return isinstance(e, ev.ManifestOffer)  # the test decides below

    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    assert receiver.state is ReceiverState.AWAIT_DECISION
    with pytest.raises(LocalProtocolError):
        receiver.accept(have)
    assert receiver.state is ReceiverState.AWAIT_DECISION
    assert receiver.verified == set()
    assert receiver.data_to_send() == b""


def _resume_with(have, prefix):
    sender, receiver, _, _ = make_pair()

    def on_offer(r, e):
        if isinstance(e, ev.ManifestOffer):
            r.accept(have, prefix)
            return True
        return False

    return run(sender, receiver, FILES, MANIFEST, on_receiver_event=on_offer), receiver


def test_a_partial_file_resumes_at_its_next_chunk_and_is_still_verified_whole():
    have = {0: 3, 1: 1}
    out, receiver = _resume_with(have, {1: file_digest.hasher(FILES[1][:4096])})
    assert out.receipt is not None
    assert len(chunk_frames(out.wire_s2r)) == 9 - 4  # only what was missing was sent
    assert sorted(receiver.verified) == [0, 1, 2]
    assert out.files[2] == FILES[2]


def test_a_resumed_file_whose_held_part_differs_is_rejected():
    out, receiver = _resume_with({1: 1}, {1: file_digest.hasher(b"not what was sent")})
    assert 1 in out.rejected and out.receipt is None


def test_transfer_plan_lists_remaining_chunks_in_stream_order():
    assert transfer_plan(MANIFEST, {}) == [(f, c) for f in range(3) for c in range(3)]
    assert transfer_plan(MANIFEST, {0: 3, 1: 2}) == [(1, 2), (2, 0), (2, 1), (2, 2)]
    assert transfer_plan(MANIFEST, {0: 3, 1: 3, 2: 3}) == []


# -- flow control -----------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3, 8, 64])
def test_window_bounds_unacked_chunks(window):
    files = make_files(count=4, size=20_000)  # 5-6 chunks each
    manifest = make_manifest(files)
    sender, receiver, _, _ = make_pair(window=window)
    total = sum(manifest.chunk_count(i) for i in range(4))
    out = run(sender, receiver, files, manifest)
    assert_complete(out, files, sender, receiver)
    assert out.files == dict(enumerate(files))
    assert out.max_unacked == min(window, total)
    # the sender's pace is visible on the wire: at most `window` CHUNK frames per round
    per_round = [sum(1 for f in split_frames(b) if f[0] == FrameType.CHUNK) for b in out.wire_s2r]
    assert max(per_round) == min(window, total)
    assert sum(per_round) == total


def test_window_closes_after_window_chunks_and_reopens_on_ack():
    """Pumped by hand: the sender stops at `window` unacked chunks until the ACKs arrive."""
    window = 3
    sender, receiver, _, _ = make_pair(window=window)

    # run() streams while the window is open, so stop at the offer and accept by hand
    def hold_offer(r, e):
        return isinstance(e, ev.ManifestOffer)

    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold_offer)
    receiver.accept()
    sender.receive_data(receiver.data_to_send())
    assert isinstance(sender.next_event(), ev.Accepted)
    assert sender.state is SenderState.SENDING
    assert not sender.window_open  # nothing flows before the consent record
    sender.send_consent(*consent_record_for(sender))

    sent = []
    while sender.window_open:
        fi, ci, off, length = sender.next_chunk()
        sender.send_chunk(fi, ci, FILES[fi][off : off + length])
        sent.append((fi, ci))
        assert sender.unacked <= window
    assert sent == [(0, 0), (0, 1), (0, 2)]
    assert sender.unacked == window
    # a closed window is enforced, not advisory
    fi, ci, off, length = sender.next_chunk()
    with pytest.raises(LocalProtocolError):
        sender.send_chunk(fi, ci, FILES[fi][off : off + length])
    assert sender.state is SenderState.SENDING and sender.unacked == window

    receiver.receive_data(sender.data_to_send())
    got = []
    while (e := receiver.next_event()) is not None:
        got.append(e)
    assert kinds(got) == ["ConsentGranted", "Chunk", "Chunk", "Chunk", "FileVerified"]
    sender.receive_data(receiver.data_to_send())
    assert sender.next_event() is None  # ACKs are silent
    assert sender.unacked == 0 and sender.window_open
    assert sender.next_chunk() == (1, 0, 0, 4096)


# -- arbitrary re-chunking of the byte stream -----------------------------------------------------


def splitter(sizes: list[int]):
    """Cut every blob into pieces of the given sizes, cycling."""

    def split(data: bytes) -> list[bytes]:
        pieces, pos, i = [], 0, 0
        while pos < len(data):
            n = sizes[i % len(sizes)]
            pieces.append(data[pos : pos + n])
            pos += n
            i += 1
        return pieces

    return split


REFERENCE_SEED = 11


def _reference():
    s, r, _, _ = make_pair(seed=REFERENCE_SEED)
    out = run(s, r, FILES, MANIFEST)
    return out


def test_one_byte_at_a_time_in_both_directions():
    ref = _reference()
    sender, receiver, _, _ = make_pair(seed=REFERENCE_SEED)
    out = run(sender, receiver, FILES, MANIFEST, split=splitter([1]))
    assert_complete(out, FILES, sender, receiver)
    assert out.files == dict(enumerate(FILES))
    assert out.receipt == ref.receipt
    assert kinds(out.receiver_events) == kinds(ref.receiver_events)
    assert kinds(out.sender_events) == kinds(ref.sender_events)
    assert b"".join(out.wire_s2r) == b"".join(ref.wire_s2r)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=12))
def test_arbitrary_splits_give_the_same_result(sizes):
    ref = _reference()
    sender, receiver, _, _ = make_pair(seed=REFERENCE_SEED)
    out = run(sender, receiver, FILES, MANIFEST, split=splitter(sizes))
    assert_complete(out, FILES, sender, receiver)
    assert out.files == dict(enumerate(FILES))
    assert out.receipt == ref.receipt
    assert [e for e in out.receiver_events if not isinstance(e, ev.Chunk)] == [
        e for e in ref.receiver_events if not isinstance(e, ev.Chunk)
    ]
    assert b"".join(out.wire_s2r) == b"".join(ref.wire_s2r)
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)


@settings(max_examples=25, deadline=None)
@given(
    files=st.lists(st.binary(min_size=1, max_size=9000), min_size=1, max_size=4),
    window=st.integers(min_value=1, max_value=6),
    cut=st.integers(min_value=1, max_value=700),
)
def test_arbitrary_studies_arrive_intact(files, window, cut):
    manifest = make_manifest(files)
    sender, receiver, _, _ = make_pair(window=window)
    out = run(sender, receiver, files, manifest, split=splitter([cut, 1]))
    assert_complete(out, files, sender, receiver)
    assert out.files == dict(enumerate(files))
    assert out.max_unacked <= window


# -- the code: wrong, spoken, forgiving --------------------------------------------------------


@pytest.mark.parametrize("tries_left", [2, 0])
def test_wrong_code_delivers_nothing_and_reports_code_rejected(tries_left):
    sender, receiver, _, _ = make_pair(password_r=b"p2pshare qr:" + b"x" * 32)
    out = run(sender, receiver, FILES, MANIFEST, tries_left=tries_left)

    assert kinds(out.sender_events) == ["OfferRequest", "CodeMismatch"]
    assert out.receiver_events == [
        ev.RemoteError(code="code-rejected", message="code not accepted", tries_left=tries_left)
    ]
    assert sender.state is SenderState.ERROR
    assert receiver.state is ReceiverState.ERROR
    # the sender never learnt who knocked, and the receiver never saw a byte of the study
    assert sender.peer_key == b"" and receiver.peer_key == b""
    assert receiver.manifest is None and sender.manifest is None
    assert out.files == {} and out.receipt is None
    frames = wire_frames(out.wire_s2r)
    assert [f.ftype for f in frames] == [FrameType.PAKE, FrameType.ERROR]
    assert load_json(frames[1].body, "error") == {
        "code": "code-rejected",
        "message": "code not accepted",
        "tries_left": tries_left,
    }


def _spoken_pair(sender_text: str, receiver_text: str, seed: int = 3):
    s_code = codes.parse_spoken(sender_text)
    r_code = codes.parse_spoken(receiver_text)
    sender, receiver, ids, idr = make_pair(
        password_r=r_code.password, seed=seed, offer_ref=str(r_code.number), spoken=True
    )
    return sender, receiver, s_code.password


def test_spoken_code_path_pairs_and_transfers():
    text = codes.new_spoken_code(7, seeded(42))
    # the receiver typed it sloppily: capitals, spaces, three-letter prefixes
    number, *words = text.split("-")
    typed = f" {number}  " + " ".join(w[:3].upper() for w in words)
    sender, receiver, password = _spoken_pair(text, typed)
    out = run(sender, receiver, FILES, MANIFEST, sender_password=password)
    assert out.sender_events[0] == ev.OfferRequest(offer_ref="7", spoken=True)
    assert_complete(out, FILES, sender, receiver)
    assert out.files == dict(enumerate(FILES))
    assert receiver.offer_id == OFFER_ID


def test_wrong_spoken_code_is_rejected():
    text = codes.new_spoken_code(7, seeded(42))
    number, *words = text.split("-")
    other = next(w for w in codes.wordlist() if w != words[3])
    wrong = "-".join([number, *words[:3], other])
    sender, receiver, password = _spoken_pair(text, wrong)
    out = run(sender, receiver, FILES, MANIFEST, sender_password=password, tries_left=1)
    assert kinds(out.sender_events) == ["OfferRequest", "CodeMismatch"]
    assert out.receiver_events == [ev.RemoteError("code-rejected", "code not accepted", 1)]
    assert not any(isinstance(e, (ev.Chunk, ev.ManifestOffer)) for e in out.receiver_events)


def test_spoken_code_for_another_offer_number_is_rejected():
    text = codes.new_spoken_code(7, seeded(42))
    _, *words = text.split("-")
    sender, receiver, password = _spoken_pair(text, "-".join(["8", *words]))
    out = run(sender, receiver, FILES, MANIFEST, sender_password=password)
    # the number is part of the password: the right words for another offer do not pair
    assert kinds(out.sender_events) == ["OfferRequest", "CodeMismatch"]
    assert out.sender_events[0] == ev.OfferRequest(offer_ref="8", spoken=True)
    assert out.receiver_events[0].code == "code-rejected"


# -- identity pinning hook and refusals ------------------------------------------------------


def _refuse_at(event_type, code, message="refused by the test"):
    def hook(session, e):
        if isinstance(e, event_type):
            session.refuse(code, message)
            return True
        return False

    return hook


def test_receiver_refusing_the_sender_identity_stops_before_the_manifest():
    sender, receiver, _, _ = make_pair()
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        on_receiver_event=_refuse_at(ev.PeerIdentity, "peer-key-changed", "pinned key differs"),
    )
    assert out.sender_error is None
    assert out.sender_events[-1] == ev.RemoteError("peer-key-changed", "pinned key differs")
    assert kinds(out.sender_events) == ["OfferRequest", "PeerIdentity", "RemoteError"]
    assert sender.state is SenderState.ERROR
    assert receiver.state is ReceiverState.ERROR
    assert sender.manifest is None  # no manifest was ever sealed
    assert kinds(out.receiver_events) == ["PeerIdentity"]
    # after IDENT_S the sender sent nothing sealed: no manifest frame crossed the wire
    sealed = [f for f in wire_frames(out.wire_s2r) if f.ftype == FrameType.SEALED]
    assert len(sealed) == 1


def test_sender_refusing_the_receiver_identity_tells_the_receiver():
    sender, receiver, _, _ = make_pair()
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        on_sender_event=_refuse_at(ev.PeerIdentity, "peer-key-changed", "pinned key differs"),
    )
    assert out.receiver_error is None
    assert out.receiver_events == [ev.RemoteError("peer-key-changed", "pinned key differs")]
    assert sender.state is SenderState.ERROR and receiver.state is ReceiverState.ERROR
    # the sender's identity was never revealed to the receiver
    assert receiver.peer_key == b""
    assert [f.ftype for f in wire_frames(out.wire_s2r)] == [FrameType.PAKE, FrameType.ERROR]


def test_sender_refusing_the_offer_request():
    sender, receiver, _, _ = make_pair()
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        on_sender_event=_refuse_at(ev.OfferRequest, "offer-unavailable", "expired"),
    )
    assert out.receiver_events == [ev.RemoteError("offer-unavailable", "expired")]
    assert receiver.state is ReceiverState.ERROR


def test_receiver_declining_the_manifest_stops_the_sender_before_any_chunk():
    sender, receiver, _, _ = make_pair()
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        on_receiver_event=_refuse_at(ev.ManifestOffer, "declined", "not our patient"),
    )
    assert out.sender_events[-1] == ev.RemoteError("declined", "not our patient")
    assert sender.state is SenderState.ERROR
    assert chunk_frames(out.wire_s2r) == []
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)


def test_status_while_sending_reaches_the_receiver_in_order():
    sender, receiver, _, _ = make_pair(window=2)

    def on_sender(s, e):
        if isinstance(e, ev.Accepted):
            s.send_status("sending", {"of": 9})
            s.send_consent(*consent_record_for(s))
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=on_sender)
    assert_complete(out, FILES, sender, receiver)
    k = kinds(out.receiver_events)
    assert k.index("Status") < k.index("Chunk")
    assert ev.Status("sending", {"of": 9}) in out.receiver_events


def test_receiver_aborting_mid_transfer_reaches_the_sender_authenticated():
    sender, receiver, _, _ = make_pair(window=2)

    def abort_after_first(r, e):
        if isinstance(e, ev.FileVerified) and e.file_index == 0:
            r.refuse("aborted", "cancelled by the user")
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_receiver_event=abort_after_first)
    assert out.sender_error is None
    assert out.sender_events[-1] == ev.RemoteError("aborted", "cancelled by the user")
    assert sender.state is SenderState.ERROR and receiver.state is ReceiverState.ERROR
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)
    assert out.receipt is None
    assert not sender.window_open


# -- illegal calls: LocalProtocolError, nothing changes ---------------------------------------------


def _assert_illegal(session, call):
    before = session.state
    with pytest.raises(LocalProtocolError):
        call()
    assert session.state is before
    assert session.data_to_send() == b""


def test_illegal_calls_on_a_fresh_sender():
    sender, _, _, _ = make_pair()
    _assert_illegal(sender, lambda: sender.use_offer(OFFER_ID, PASSWORD))
    _assert_illegal(sender, sender.trust_peer)
    _assert_illegal(sender, lambda: sender.send_manifest(MANIFEST))
    _assert_illegal(sender, lambda: sender.send_status("x"))
    _assert_illegal(sender, lambda: sender.send_chunk(0, 0, FILES[0][:4096]))
    assert sender.state is SenderState.AWAIT_HELLO
    assert not sender.window_open and sender.next_chunk() is None


def test_illegal_calls_on_a_fresh_receiver():
    _, receiver, _, _ = make_pair()
    _assert_illegal(receiver, receiver.trust_peer)
    _assert_illegal(receiver, receiver.accept)
    _assert_illegal(receiver, lambda: receiver.send_receipt(0))
    receiver.start()
    assert receiver.state is ReceiverState.AWAIT_PAKE
    receiver.data_to_send()
    _assert_illegal(receiver, receiver.start)
    _assert_illegal(receiver, receiver.accept)


def test_illegal_calls_in_the_middle_of_a_transfer():
    sender, receiver, _, _ = make_pair(window=8)

    def hold_offer(r, e):
        return isinstance(e, ev.ManifestOffer)

    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold_offer)
    assert sender.state is SenderState.AWAIT_ACCEPT
    assert receiver.state is ReceiverState.AWAIT_DECISION
    _assert_illegal(sender, lambda: sender.send_manifest(MANIFEST))
    _assert_illegal(sender, sender.trust_peer)
    _assert_illegal(sender, lambda: sender.send_chunk(0, 0, FILES[0][:4096]))
    _assert_illegal(receiver, receiver.trust_peer)
    _assert_illegal(receiver, lambda: receiver.send_receipt(0))

    receiver.accept()
    sender.receive_data(receiver.data_to_send())
    assert isinstance(sender.next_event(), ev.Accepted)
    # out of order, wrong file, wrong length: refused, nothing sealed, nothing consumed
    _assert_illegal(sender, lambda: sender.send_chunk(0, 1, FILES[0][4096:8192]))
    _assert_illegal(sender, lambda: sender.send_chunk(1, 0, FILES[1][:4096]))
    _assert_illegal(sender, lambda: sender.send_chunk(0, 0, FILES[0][:4095]))
    _assert_illegal(sender, lambda: sender.send_chunk(0, 0, FILES[0][:4096] + b"x"))
    assert sender.next_chunk() == (0, 0, 0, 4096)
    assert sender.unacked == 0
    _assert_illegal(receiver, receiver.accept)
    _assert_illegal(receiver, lambda: receiver.send_receipt(0))


def test_receipt_is_refused_while_a_file_is_rejected():
    files = list(FILES)
    manifest = make_manifest(files)
    corrupt = [files[0], bytes(len(files[1])), files[2]]  # the sender's disk returns zeros
    sender, receiver, _, _ = make_pair()
    seen = {}

    def on_receiver(r, e):
        if isinstance(e, ev.SenderDone):
            with pytest.raises(LocalProtocolError):
                r.send_receipt(now=1)
            seen["state"] = r.state
            r.refuse("incomplete", "a file failed verification")
            return True
        return False

    out = run(sender, receiver, corrupt, manifest, on_receiver_event=on_receiver)
    assert seen["state"] is ReceiverState.AWAIT_VERDICT
    assert out.verified == [0, 2]
    assert set(out.rejected) == {1}
    assert f"{SERIES}.2" in out.rejected[1]
    assert ev.FileVerified(1) not in out.receiver_events
    assert out.sender_events[-1] == ev.RemoteError("incomplete", "a file failed verification")
    assert out.receipt is None
    assert sender.state is SenderState.ERROR


# -- sticky errors -----------------------------------------------------------------------------


def test_remote_protocol_error_is_sticky_and_queues_a_plain_error_frame():
    sender, _, _, _ = make_pair()
    sender.receive_data(b"\x00\x00\x00\x05\x01{bad")  # HELLO with garbage JSON
    with pytest.raises(RemoteProtocolError) as info:
        sender.next_event()
    assert info.value.code == "protocol-violation"
    assert sender.state is SenderState.ERROR
    frames = split_frames(sender.data_to_send())
    assert len(frames) == 1 and frames[0][0] == FrameType.ERROR
    body = load_json(frames[0][1], "error")
    assert body == {"code": "protocol-violation", "message": info.value.message}

    # sticky: nothing more is parsed, nothing more is sent, calls are refused
    _, receiver, _, _ = make_pair()
    receiver.start()
    sender.receive_data(receiver.data_to_send())
    assert sender.next_event() is None
    sender.refuse("other", "ignored")
    assert sender.data_to_send() == b""
    _assert_illegal(sender, lambda: sender.use_offer(OFFER_ID, PASSWORD))
    assert sender.state is SenderState.ERROR


def test_error_after_pairing_is_sealed_and_the_peer_decodes_it():
    sender, receiver, _, _ = make_pair()

    def hold_offer(r, e):
        return isinstance(e, ev.ManifestOffer)

    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold_offer)
    # a sealed STATUS from the sender is fine, an ACCEPT-shaped junk is not: make the receiver
    # fail on a frame of an unknown type
    receiver.receive_data(b"\x00\x00\x00\x01\x7f")
    with pytest.raises(RemoteProtocolError) as info:
        receiver.next_event()
    assert receiver.state is ReceiverState.ERROR
    wire = receiver.data_to_send()
    frames = split_frames(wire)
    assert [f[0] for f in frames] == [FrameType.SEALED]  # authenticated, not plaintext
    assert b"protocol-violation" not in wire
    sender.receive_data(wire)
    err = sender.next_event()
    assert err == ev.RemoteError("protocol-violation", info.value.message)
    assert sender.state is SenderState.ERROR
    assert sender.next_event() is None


def test_close_before_keys_sends_nothing_and_after_done_is_delivered():
    sender, receiver, _, _ = make_pair()
    sender.close()
    assert sender.data_to_send() == b""
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.receiver_events[-1] == ev.Closed()
    assert receiver.state is ReceiverState.DONE


def test_manifest_type_is_preserved_through_the_wire():
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, FILES, MANIFEST)
    offer = next(e for e in out.receiver_events if isinstance(e, ev.ManifestOffer))
    assert isinstance(offer.manifest, Manifest)
    assert offer.manifest.to_bytes() == MANIFEST.to_bytes()
    assert receiver.manifest == sender.manifest == MANIFEST


# -- the key schedule, pinned --------------------------------------------------------------------

# make_pair(seed=1): seeded identities, names and SPAKE2 entropy, QR password b"p2pshare qr:k…k".
# Computed once from this implementation; any change of a KDF label, the transcript's contents
# or order, or the role labels changes these, and old and new nodes would no longer pair.
PINNED_TRANSFER_ID = "05347f09af8581ca9577cc4c0b802634"
PINNED_SESSION_KEY = "2d0fcbd9ba01048d2d77867420624fd0c132df0de297b156fe1465fe4e853314"


def test_key_schedule_known_answer():
    sender, receiver, _, _ = make_pair(seed=1)
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.receipt is not None
    assert sender.transfer_id.hex() == receiver.transfer_id.hex() == PINNED_TRANSFER_ID
    assert sender.session_key.hex() == receiver.session_key.hex() == PINNED_SESSION_KEY
    # the derivation chain is the documented one
    assert sender.transfer_id == crypto.derive(sender.session_key, "p2ps transfer")[:16]


def test_names_and_keys_are_bound_into_the_key_schedule():
    base, _, _, _ = make_pair(seed=1)
    _, r0, _, _ = make_pair(seed=1)
    run(base, r0, FILES, MANIFEST)
    renamed, r1, _, _ = make_pair(seed=1)
    renamed._name = "Another Hospital"
    out = run(renamed, r1, FILES, MANIFEST)
    assert out.receipt is not None
    assert renamed.session_key != base.session_key
    assert r1.peer_name == "Another Hospital"


# -- refusals while the other side is still deciding ------------------------------------------------


def test_receiver_giving_up_while_the_sender_decides_on_trust():
    sender, receiver, _, _ = make_pair()

    def wait(s, e):
        return isinstance(e, ev.PeerIdentity)  # the sender's operator has not decided yet

    run(sender, receiver, FILES, MANIFEST, on_sender_event=wait)
    assert sender.state is SenderState.AWAIT_TRUST
    assert receiver.state is ReceiverState.AWAIT_IDENT
    receiver.refuse("aborted", "the receiving user cancelled")
    assert receiver.state is ReceiverState.ERROR
    # sealed with the handshake key: an on-path attacker could not have forged it
    wire = receiver.data_to_send()
    assert [t for t, _ in split_frames(wire)] == [FrameType.SEALED]
    sender.receive_data(wire)
    assert sender.next_event() == ev.RemoteError("aborted", "the receiving user cancelled")
    assert sender.state is SenderState.ERROR
    with pytest.raises(LocalProtocolError):
        sender.trust_peer()


def test_unexpected_sealed_message_while_the_sender_decides_is_refused():
    sender, receiver, _, _ = make_pair()

    def wait(s, e):
        return isinstance(e, ev.PeerIdentity)

    run(sender, receiver, FILES, MANIFEST, on_sender_event=wait)
    receiver._seal(11, b"{}")  # an ACCEPT, long before any manifest
    sender.receive_data(receiver.data_to_send())
    with pytest.raises(RemoteProtocolError) as info:
        sender.next_event()
    assert info.value.code == "protocol-violation"
    assert sender.state is SenderState.ERROR


@pytest.mark.parametrize(
    "state, detail",
    [
        ("waiting", {"blob": "x" * 5000}),  # bulk data dressed as a status
        ("waiting", {"nested": {"a": 1}}),  # only flat values
        ("waiting", {f"k{i}": i for i in range(17)}),  # too many keys
        ("x" * 65, {}),  # an over-long state
        ("", {}),
    ],
)
def test_a_status_is_a_few_words_never_bulk_data(state, detail):
    sender, receiver, _, _ = make_pair()

    def on_sender(s, e):
        if isinstance(e, ev.Paired):
            s.send_manifest(MANIFEST)
            s.send_status(state, detail)
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=on_sender)
    assert out.receiver_error is not None
    assert "status" in out.receiver_error.message
    assert not [e for e in out.receiver_events if isinstance(e, ev.Status)]
    assert out.receipt is None


def test_a_receiver_that_closes_before_the_receipt_breaks_the_protocol():
    """An early CLOSE must not end the sender's run as if all were well (its offer would hang)."""
    sender, receiver, _, _ = make_pair()

    def on_receiver(r, e):
        if isinstance(e, ev.ManifestOffer):
            r.close()  # instead of accept()
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_receiver_event=on_receiver)
    assert out.sender_error is not None and out.sender_error.code == "protocol-violation"
    assert not [e for e in out.sender_events if isinstance(e, ev.Closed)]
    assert out.receipt is None
