"""Hostile paths: a network that flips, drops, replays and reorders, and peers that lie.

Every test asserts the exact error code and, where a study is involved, that nothing damaged
was ever reported as verified and that no receipt changed hands.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from p2pshare import crypto
from p2pshare.errors import RemoteProtocolError
from p2pshare.manifest import MAX_FILE_BYTES
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import (
    CHUNK_HEADER,
    FLAG_LAST,
    HEADER,
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    FrameType,
    Inner,
    dump_json,
    encode,
    encode_json,
    load_json,
)
from p2pshare.protocol.receiver import ReceiverSession, ReceiverState
from p2pshare.protocol.sender import SenderSession, SenderState
from tests.protocol.helpers import (
    OFFER_ID,
    PASSWORD,
    SERIES,
    FrameTamper,
    Outcome,
    consent_record_for,
    flip,
    forge_chunk,
    make_files,
    make_manifest,
    make_pair,
    run,
    seeded,
    split_frames,
    wire_frames,
)

FILES = make_files()  # 3 files × 3 chunks of 4096: chunk_no 4 is file 1, chunk 1
MANIFEST = make_manifest(FILES)
UID = [inst.sop_instance_uid for inst in MANIFEST.instances]
WIDE = 16  # a window wide enough that every chunk and DONE leave in one round


def keep(f):
    return [(f.ftype, f.body)]


def on_chunk(n: int, edit):
    """Tamper hook: ``edit(frame)`` replaces CHUNK frame number ``n``."""
    return FrameTamper(lambda f: edit(f) if f.chunk_no == n else keep(f))


def assert_no_study_delivered(out: Outcome, sender: SenderSession, receiver: ReceiverSession):
    """The outcome every failure must have: no receipt either way, both sides stopped."""
    assert out.receipt is None
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)
    assert not any(isinstance(e, ev.SenderDone) for e in out.receiver_events)
    assert receiver.state is ReceiverState.ERROR
    assert sender.state is SenderState.ERROR


def assert_file_not_verified(out: Outcome, receiver: ReceiverSession, fi: int):
    assert ev.FileVerified(fi) not in out.receiver_events
    assert fi not in receiver.verified
    assert fi not in out.files


def assert_failed(out, sender, receiver, code: str, damaged: int | None = None):
    assert out.receiver_error is not None, "the receiver did not notice"
    assert out.receiver_error.code == code, out.receiver_error.message
    # the receiver told the sender, authenticated, and the sender stopped
    assert out.sender_error is None
    assert isinstance(out.sender_events[-1], ev.RemoteError)
    assert out.sender_events[-1].code == code
    assert_no_study_delivered(out, sender, receiver)
    if damaged is not None:
        assert_file_not_verified(out, receiver, damaged)
        assert UID[damaged] in out.receiver_error.message


def reference_frames(seed: int = 1):
    s, r, _, _ = make_pair(window=WIDE, seed=seed)
    out = run(s, r, FILES, MANIFEST)
    assert out.receipt is not None
    return wire_frames(out.wire_s2r)


# -- the network tampers with the sender → receiver stream --------------------------------------


@pytest.mark.parametrize(
    "pos",
    [CHUNK_HEADER.size, CHUNK_HEADER.size + 2000, -17, -1],
    ids=["first-ct-byte", "middle", "last-ct-byte", "tag"],
)
def test_flipped_bit_in_chunk_ciphertext_is_an_integrity_error_naming_the_instance(pos):
    sender, receiver, _, _ = make_pair(window=WIDE)
    tamper = on_chunk(4, lambda f: [(f.ftype, flip(f.body, pos, 3))])
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=tamper)
    assert_failed(out, sender, receiver, "integrity", damaged=1)
    assert "chunk 1 of instance" in out.receiver_error.message
    assert out.verified == [0]
    assert out.files == {0: FILES[0]}
    # nothing of the altered chunk (or later) was handed out as data
    delivered = [
        (e.file_index, e.chunk_index) for e in out.receiver_events if isinstance(e, ev.Chunk)
    ]
    assert delivered == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_replayed_chunk_is_out_of_order():
    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=on_chunk(4, lambda f: keep(f) * 2))
    assert_failed(out, sender, receiver, "out-of-order", damaged=1)
    delivered = [
        (e.file_index, e.chunk_index) for e in out.receiver_events if isinstance(e, ev.Chunk)
    ]
    assert delivered == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_replayed_final_chunk_is_refused():
    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=on_chunk(8, lambda f: keep(f) * 2))
    assert out.receiver_error.code == "protocol-violation"
    assert "more chunks than the manifest" in out.receiver_error.message
    assert_no_study_delivered(out, sender, receiver)


def test_swapped_chunks_are_out_of_order():
    sender, receiver, _, _ = make_pair(window=WIDE)
    held = []

    def edit(f):
        if f.chunk_no == 4:
            held.append(f)
            return []
        if f.chunk_no == 5:
            return [(f.ftype, f.body), (held[0].ftype, held[0].body)]
        return keep(f)

    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=FrameTamper(edit))
    assert_failed(out, sender, receiver, "out-of-order", damaged=1)
    assert "chunk 2 of file #1" in out.receiver_error.message
    assert "chunk 1 of instance " + UID[1] in out.receiver_error.message


@pytest.mark.parametrize("n, damaged", [(0, 0), (4, 1), (6, 2)])
def test_dropped_chunk_is_out_of_order(n, damaged):
    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=on_chunk(n, lambda f: []))
    assert_failed(out, sender, receiver, "out-of-order", damaged=damaged)
    assert out.verified == list(range(damaged))


@pytest.mark.parametrize("dropped", [{8}, {7, 8}, {3, 4, 5, 6, 7, 8}])
def test_chunks_dropped_before_done_are_caught_by_the_record_counter(dropped):
    """DONE arrives, but sealed under a later counter than the receiver expects."""
    sender, receiver, _, _ = make_pair(window=WIDE)
    tamper = FrameTamper(lambda f: [] if f.chunk_no in dropped else keep(f))
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=tamper)
    assert_failed(out, sender, receiver, "integrity")
    assert_file_not_verified(out, receiver, 2)
    assert sender.unacked > 0


class EarlyDoneSender(SenderSession):
    """A hostile sender: declares the study complete with its last chunk never sent."""

    def _handle_sealed(self, inner, payload):
        super()._handle_sealed(inner, payload)
        if inner is Inner.ACCEPT:
            self._plan.pop()


def test_done_before_every_chunk_is_truncated():
    sender, receiver, _, _ = make_pair(window=WIDE, sender_cls=EarlyDoneSender)
    out = run(sender, receiver, FILES, MANIFEST)
    assert_failed(out, sender, receiver, "truncated", damaged=2)
    assert "1 chunks never arrived" in out.receiver_error.message
    assert "first missing: chunk 2 of instance " + UID[2] in out.receiver_error.message
    assert out.verified == [0, 1]


def test_connection_cut_mid_study_leaves_no_receipt_and_no_verified_file():
    sender, receiver, _, _ = make_pair(window=WIDE)
    cut = {"at": None}  # everything from chunk 5 on is lost, sealed frames included

    def edit(f):
        if f.chunk_no == 5:
            cut["at"] = f.index
        if cut["at"] is not None and f.index >= cut["at"]:
            return []
        return keep(f)

    tamper = FrameTamper(edit)
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=tamper)
    assert out.receiver_error is None
    assert receiver.state is ReceiverState.RECEIVING
    assert_file_not_verified(out, receiver, 1)
    assert out.receipt is None
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)
    assert sender.state is SenderState.AWAIT_RECEIPT


@pytest.mark.parametrize(
    "n, edit_header, code, says",
    [
        # chunk_no 4 is (1, 1), not a last chunk; chunk_no 5 is (1, 2), the last of file 1
        (4, lambda fi, ci, fl: (fi, ci, fl | FLAG_LAST), "integrity", "wrong last-chunk flag"),
        (5, lambda fi, ci, fl: (fi, ci, fl & ~FLAG_LAST), "integrity", "wrong last-chunk flag"),
        (5, lambda fi, ci, fl: (fi, ci, fl | 0x80), "integrity", "failed authentication"),
        (4, lambda fi, ci, fl: (fi, ci + 1, fl), "out-of-order", "chunk 2 of file #1 arrived"),
        (4, lambda fi, ci, fl: (fi + 1, ci, fl), "out-of-order", "chunk 1 of file #2 arrived"),
        (4, lambda fi, ci, fl: (fi, 2**32 - 1, fl), "out-of-order", "chunk 4294967295 of"),
    ],
    ids=["set-last", "clear-last", "unknown-flag", "chunk-index", "file-index", "huge-index"],
)
def test_edited_chunk_header_is_detected(n, edit_header, code, says):
    def edit(f):
        header = CHUNK_HEADER.pack(*edit_header(*f.chunk))
        return [(f.ftype, header + f.body[CHUNK_HEADER.size :])]

    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=on_chunk(n, edit))
    assert_failed(out, sender, receiver, code, damaged=1)
    assert says in out.receiver_error.message


def test_header_kept_but_ciphertext_from_the_next_chunk_is_an_integrity_error():
    ref = [f for f in reference_frames() if f.chunk_no is not None]

    def edit(f):
        body = f.body[: CHUNK_HEADER.size] + ref[5].body[CHUNK_HEADER.size :]
        return [(f.ftype, body)]

    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=on_chunk(4, edit))
    assert_failed(out, sender, receiver, "integrity", damaged=1)


def test_chunk_from_another_session_is_an_integrity_error():
    """Same files, same position, but recorded on another connection: other keys, other AAD."""
    other = [f for f in reference_frames(seed=5) if f.chunk_no is not None]
    sender, receiver, _, _ = make_pair(window=WIDE, seed=1)
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        tamper_s2r=on_chunk(0, lambda f: [(f.ftype, other[0].body)]),
    )
    assert_failed(out, sender, receiver, "integrity", damaged=0)
    assert out.verified == []


def test_recorded_session_replayed_to_a_fresh_receiver_delivers_nothing():
    s, r, _, _ = make_pair(window=WIDE, seed=1)
    recorded = b"".join(run(s, r, FILES, MANIFEST).wire_s2r)
    _, receiver, _, _ = make_pair(seed=9)  # the victim runs its own key exchange
    receiver.start()
    receiver.receive_data(recorded)
    events = []
    with pytest.raises(RemoteProtocolError) as info:
        while (e := receiver.next_event()) is not None:
            events.append(e)
    assert info.value.code == "integrity"
    assert events == []
    assert receiver.state is ReceiverState.ERROR
    assert receiver.peer_key == b"" and receiver.manifest is None


def test_truncated_chunk_frame_is_refused():
    sender, receiver, _, _ = make_pair(window=WIDE)
    cut = CHUNK_HEADER.size + crypto.TAG_BYTES - 1
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        tamper_s2r=on_chunk(4, lambda f: [(f.ftype, f.body[:cut])]),
    )
    assert_failed(out, sender, receiver, "protocol-violation")
    assert "truncated chunk" in out.receiver_error.message
    assert_file_not_verified(out, receiver, 1)


def _sealed_edit(which, edit):
    """Tamper hook editing the sealed frame chosen by ``which(frame, seen)``."""
    state = {"last_chunk_index": None}

    def pick(f):
        if f.chunk_no == 8:
            state["last_chunk_index"] = f.index
        if f.ftype == FrameType.SEALED and which(f, state):
            return edit(f)
        return keep(f)

    return FrameTamper(pick)


IDENT_S = lambda f, st: f.sealed_no == 0  # noqa: E731
MANIFEST_FRAME = lambda f, st: f.sealed_no == 1  # noqa: E731
DONE = lambda f, st: st["last_chunk_index"] is not None and f.index == st["last_chunk_index"] + 1  # noqa: E731


@pytest.mark.parametrize(
    "which, pos",
    [(IDENT_S, 0), (IDENT_S, -1), (MANIFEST_FRAME, 0), (MANIFEST_FRAME, 300), (DONE, -1)],
    ids=["ident-first", "ident-tag", "manifest-first", "manifest-middle", "done-tag"],
)
def test_flipped_bit_in_a_sealed_control_frame_is_an_integrity_error(which, pos):
    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        tamper_s2r=_sealed_edit(which, lambda f: [(f.ftype, flip(f.body, pos))]),
    )
    assert_failed(out, sender, receiver, "integrity")
    if which is not DONE:
        assert not any(isinstance(e, ev.ManifestOffer) for e in out.receiver_events)
        assert not any(isinstance(e, ev.Chunk) for e in out.receiver_events)
    else:
        # every file arrived and verified, yet without an authentic DONE there is no receipt
        assert out.verified == [0, 1, 2]
    if which is IDENT_S:
        assert not any(isinstance(e, ev.PeerIdentity) for e in out.receiver_events)
        assert receiver.peer_key == b""


@pytest.mark.parametrize("which", [MANIFEST_FRAME, DONE], ids=["manifest", "done"])
def test_truncated_or_dropped_sealed_frame_is_an_integrity_error(which):
    sender, receiver, _, _ = make_pair(window=WIDE)
    tamper = _sealed_edit(which, lambda f: [(f.ftype, f.body[: len(f.body) // 2])])
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=tamper)
    assert_failed(out, sender, receiver, "integrity")


def test_dropped_manifest_makes_the_next_sealed_frame_fail():
    """Drop MANIFEST and slip a STATUS in its place: the counter no longer matches."""
    sender, receiver, _, _ = make_pair(window=WIDE)

    def on_sender(s, e):
        if isinstance(e, ev.Paired):
            s.send_manifest(MANIFEST)
            s.send_status("waiting")
            return True
        return False

    tamper = _sealed_edit(MANIFEST_FRAME, lambda f: [])
    out = run(sender, receiver, FILES, MANIFEST, tamper_s2r=tamper, on_sender_event=on_sender)
    # the receiver waits for MANIFEST; the STATUS sealed under counter 1 arrives where 0 was due
    assert out.receiver_error.code == "integrity"
    assert receiver.manifest is None


def test_injected_random_sealed_frame_is_an_integrity_error():
    sender, receiver, _, _ = make_pair(window=WIDE)
    junk = bytes(range(200))
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        tamper_s2r=on_chunk(4, lambda f: [(FrameType.SEALED, junk), *keep(f)]),
    )
    assert_failed(out, sender, receiver, "integrity")
    assert_file_not_verified(out, receiver, 1)


def test_unauthenticated_error_injected_after_pairing_is_refused():
    """An on-path attacker cannot make the receiver believe the sender aborted."""
    fake = dump_json({"code": "aborted", "message": "sender cancelled"})
    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(
        sender,
        receiver,
        FILES,
        MANIFEST,
        tamper_s2r=on_chunk(4, lambda f: [(FrameType.ERROR, fake), *keep(f)]),
    )
    assert out.receiver_error.code == "protocol-violation"
    assert not any(isinstance(e, ev.RemoteError) for e in out.receiver_events)
    assert_no_study_delivered(out, sender, receiver)
    assert_file_not_verified(out, receiver, 1)


def test_flipped_ack_from_the_receiver_is_an_integrity_error_at_the_sender():
    sender, receiver, _, _ = make_pair(window=2)  # the receiver is still waiting for chunks

    def edit(f):
        # r2s sealed frames: IDENT_R, CONFIRM_R, ACCEPT, ACK×9, RECEIPT
        if f.sealed_no == 5:
            return [(f.ftype, flip(f.body, 7))]
        return keep(f)

    out = run(sender, receiver, FILES, MANIFEST, tamper_r2s=FrameTamper(edit))
    assert out.sender_error is not None and out.sender_error.code == "integrity"
    assert sender.state is SenderState.ERROR
    # the sender's sealed ERROR stops the receiver before it signs anything
    assert out.receiver_events[-1] == ev.RemoteError("integrity", out.sender_error.message)
    assert out.receipt is None
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)
    assert receiver.state is ReceiverState.ERROR
    assert_file_not_verified(out, receiver, 2)


# -- a sender that lies about sizes and contents ---------------------------------------------------


class MisSizingSender(SenderSession):
    """Seals one chunk whose plaintext length differs from what the manifest implies."""

    target: tuple[int, int] = (1, 1)
    delta = 1

    def next_chunk(self):
        nxt = super().next_chunk()
        if nxt is not None and nxt[:2] == self.target:
            fi, ci, off, n = nxt
            return fi, ci, off, n + self.delta
        return nxt


@pytest.mark.parametrize(
    "target, delta", [((1, 1), 1), ((1, 1), -1), ((1, 2), 1), ((1, 2), -2), ((1, 0), -4096)]
)
def test_chunk_of_the_wrong_length_is_a_size_mismatch(target, delta):
    cls = type("S", (MisSizingSender,), {"target": target, "delta": delta})
    sender, receiver, _, _ = make_pair(window=WIDE, sender_cls=cls)
    files = [FILES[0], FILES[1] + b"EXTRA BYTES", FILES[2]]  # room for a longer last chunk
    out = run(sender, receiver, files, MANIFEST)
    assert_failed(out, sender, receiver, "size-mismatch", damaged=1)
    expected = MANIFEST.chunk_length(*target)
    assert f"holds {expected + delta} bytes where the manifest implies {expected}" in (
        out.receiver_error.message
    )
    delivered = [
        (e.file_index, e.chunk_index) for e in out.receiver_events if isinstance(e, ev.Chunk)
    ]
    assert target not in delivered


def test_forged_chunk_with_valid_seal_but_wrong_position_is_out_of_order():
    sender, receiver, _, _ = make_pair(window=WIDE)

    def on_sender(s, e):
        if isinstance(e, ev.Accepted):
            s.send_consent(*consent_record_for(s))
            # a correctly sealed chunk, but for a position the receiver does not expect
            s._out.append(forge_chunk(s, 2, 0, FILES[2][:4096], 0))
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=on_sender)
    assert out.receiver_error.code == "out-of-order"
    assert not any(isinstance(e, ev.Chunk) for e in out.receiver_events)
    assert_no_study_delivered(out, sender, receiver)


def test_contents_that_do_not_match_the_manifest_are_rejected_not_verified():
    corrupt = [FILES[0], FILES[1][:-1] + bytes([FILES[1][-1] ^ 1]), FILES[2]]
    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(sender, receiver, corrupt, MANIFEST)
    assert out.receiver_error is None  # every chunk authentic: the sender's file is wrong
    assert set(out.rejected) == {1}
    assert UID[1] in out.rejected[1] and "digest in the signed manifest" in out.rejected[1]
    assert out.verified == [0, 2]
    assert_file_not_verified(out, receiver, 1)
    assert out.receipt is None
    assert out.sender_events[-1].code == "incomplete"
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)


# -- manifests that are malformed or lie -------------------------------------------------------


def _manifest_dict():
    return json.loads(MANIFEST.to_bytes())


def _canonical(d) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def deliver_manifest(
    data: bytes, *, signer=None, extra: bytes = b"", digest_of: bytes | None = None
):
    """Pair honestly, then have the sender seal ``data`` as its manifest."""
    sender, receiver, ids, _ = make_pair(window=WIDE)
    key = signer or ids

    def on_sender(s, e):
        if isinstance(e, ev.Paired):
            digest = hashlib.sha256(digest_of if digest_of is not None else data).hexdigest()
            sig = key.sign(b"p2pshare/1 manifest\0" + digest.encode())
            s._seal(Inner.MANIFEST, len(data).to_bytes(4, "big") + data + sig + extra)
            s.state = SenderState.AWAIT_ACCEPT
            s.manifest = MANIFEST
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=on_sender)
    return out, sender, receiver


def _assert_manifest_refused(out, sender, receiver, code):
    assert out.receiver_error is not None
    assert out.receiver_error.code == code, out.receiver_error.message
    assert not any(isinstance(e, ev.ManifestOffer) for e in out.receiver_events)
    assert receiver.manifest is None
    assert out.sender_events[-1] == ev.RemoteError(code, out.receiver_error.message[:500])
    assert not any(f.ftype == FrameType.CHUNK for f in wire_frames(out.wire_s2r))
    assert_no_study_delivered(out, sender, receiver)


def test_deliver_manifest_helper_is_honest_when_the_manifest_is():
    out, sender, receiver = deliver_manifest(MANIFEST.to_bytes())
    assert out.receiver_error is None
    assert any(isinstance(e, ev.ManifestOffer) for e in out.receiver_events)


def _mutate(path_value):
    def make():
        d = _manifest_dict()
        path, value = path_value
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return _canonical(d)

    return make


LIES = {
    "traversal-sop": (("instances", 1, "sop_instance_uid"), "../../etc/passwd"),
    "traversal-study": (("study_instance_uid",), "../.."),
    "traversal-series": (("instances", 0, "series_instance_uid"), "1.2/../3"),
    "absolute-path": (("instances", 0, "sop_instance_uid"), "/etc/passwd"),
    "uid-leading-zero": (("instances", 0, "sop_instance_uid"), "1.02.3"),
    "uid-too-long": (("instances", 0, "sop_instance_uid"), "1." * 32 + "1"),
    "negative-size": (("instances", 0, "size"), -1),
    "zero-size": (("instances", 0, "size"), 0),
    "huge-size": (("instances", 0, "size"), MAX_FILE_BYTES + 1),
    "float-size": (("instances", 0, "size"), 10000.0),
    "string-size": (("instances", 0, "size"), "10000"),
    "bool-size": (("instances", 0, "size"), True),
    "bad-sha": (("instances", 0, "blake3"), "ABC"),
    "upper-sha": (("instances", 0, "blake3"), "A" * 64),
    "chunk-size-tiny": (("chunk_size",), 1),
    "chunk-size-huge": (("chunk_size",), 2**30),
    "version-1": (("version",), 1),
    "version-3": (("version",), 3),
    "no-instances": (("instances",), []),
    "instances-not-list": (("instances",), {"0": {}}),
    "long-text": (("study_description",), "x" * 257),
    "patient-not-text": (("patient",), {"name": 1}),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_manifest_is_refused(lie):
    out, sender, receiver = deliver_manifest(_mutate(LIES[lie])())
    _assert_manifest_refused(out, sender, receiver, "manifest-invalid")


def test_duplicate_sop_uids_are_refused():
    d = _manifest_dict()
    d["instances"][2]["sop_instance_uid"] = d["instances"][0]["sop_instance_uid"]
    out, sender, receiver = deliver_manifest(_canonical(d))
    _assert_manifest_refused(out, sender, receiver, "manifest-invalid")
    assert "listed twice" in out.receiver_error.message


def test_study_larger_than_any_study_is_refused():
    d = _manifest_dict()
    inst = d["instances"][0]
    d["instances"] = [
        dict(inst, sop_instance_uid=f"{SERIES}.{i}", size=MAX_FILE_BYTES) for i in range(1, 66)
    ]
    out, sender, receiver = deliver_manifest(_canonical(d))
    _assert_manifest_refused(out, sender, receiver, "manifest-invalid")


@pytest.mark.parametrize(
    "data",
    [
        json.dumps(json.loads(MANIFEST.to_bytes()), indent=1, sort_keys=True).encode(),
        json.dumps(
            dict(reversed(list(json.loads(MANIFEST.to_bytes()).items()))), separators=(",", ":")
        ).encode(),
        MANIFEST.to_bytes() + b" ",
        MANIFEST.to_bytes()[:-1] + b',"evil":"x"}',
        MANIFEST.to_bytes()[:-1] + b',"version":2}',  # duplicate key
    ],
    ids=["indented", "key-order", "trailing-space", "unknown-key", "duplicate-key"],
)
def test_non_canonical_manifest_is_refused(data):
    out, sender, receiver = deliver_manifest(data)
    _assert_manifest_refused(out, sender, receiver, "manifest-invalid")
    assert "canonical" in out.receiver_error.message


def test_non_ascii_escape_form_matters_for_canonical_form():
    d = _manifest_dict()
    d["patient"] = {"name": "MÜLLER^JÖRG"}
    raw = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    out, sender, receiver = deliver_manifest(raw)
    _assert_manifest_refused(out, sender, receiver, "manifest-invalid")
    # while the canonical (escaped) form of the very same manifest is accepted
    out, _, _ = deliver_manifest(_canonical(d))
    offer = next(e for e in out.receiver_events if isinstance(e, ev.ManifestOffer))
    assert offer.manifest.patient == {"name": "MÜLLER^JÖRG"}


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b"\xff\xfe", b"null", b'{"instances": 1}', b"[" * 100_000, b"1" * 5000],
    ids=["garbage", "list", "bad-utf8", "null", "wrong-shape", "deep-nesting", "huge-int"],
)
def test_malformed_manifest_is_refused(data):
    out, sender, receiver = deliver_manifest(data)
    _assert_manifest_refused(out, sender, receiver, "manifest-invalid")


def test_huge_integer_inside_manifest_is_refused():
    d = _canonical(_manifest_dict()).replace(b'"size":10000', b'"size":' + b"9" * 5000)
    out, sender, receiver = deliver_manifest(d)
    _assert_manifest_refused(out, sender, receiver, "manifest-invalid")


def test_manifest_signed_by_another_key_is_an_integrity_error():
    intruder = crypto.Identity.generate(seeded(666))
    out, sender, receiver = deliver_manifest(MANIFEST.to_bytes(), signer=intruder)
    _assert_manifest_refused(out, sender, receiver, "integrity")
    assert "signature" in out.receiver_error.message


def test_manifest_signature_over_another_manifest_is_an_integrity_error():
    other = make_manifest(make_files(seed=3)).to_bytes()
    out, sender, receiver = deliver_manifest(MANIFEST.to_bytes(), digest_of=other)
    _assert_manifest_refused(out, sender, receiver, "integrity")


def test_manifest_length_prefix_longer_than_the_payload_is_refused():
    sender, receiver, ids, _ = make_pair(window=WIDE)
    data = MANIFEST.to_bytes()

    def on_sender(s, e):
        if isinstance(e, ev.Paired):
            sig = ids.sign(b"p2pshare/1 manifest\0" + hashlib.sha256(data).hexdigest().encode())
            s._seal(Inner.MANIFEST, (len(data) + 100).to_bytes(4, "big") + data + sig)
            s.state = SenderState.AWAIT_ACCEPT
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=on_sender)
    _assert_manifest_refused(out, sender, receiver, "protocol-violation")
    assert "truncated manifest" in out.receiver_error.message


def test_malformed_manifest_extras_are_refused():
    out, sender, receiver = deliver_manifest(MANIFEST.to_bytes(), extra=b"[1,2")
    _assert_manifest_refused(out, sender, receiver, "protocol-violation")


# -- a receiver that lies to the sender ------------------------------------------------------------


def _receiver_sends(inner: int, payload: bytes, at=ev.ManifestOffer):
    """The receiver seals ``payload`` once, on the first ``at`` event (which it then ignores
    if it is the manifest offer, so that nothing else is answered)."""
    sender, receiver, _, _ = make_pair(window=WIDE)
    done = []

    def on_receiver(r, e):
        if isinstance(e, at) and not done:
            done.append(e)
            r._seal(inner, payload)
            return at is ev.ManifestOffer
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_receiver_event=on_receiver)
    return out, sender, receiver


@pytest.mark.parametrize(
    "have",
    [
        {"9": 1},  # no such file
        {"1": 4},  # more chunks than the file has
        {"1": -1},
        {"x": 1},
        {"-1": 3},
        {"1": "3"},
        {"²": 1},  # a Unicode digit: str.isdigit() says yes, int() says no
        [1, 2],
        {str(i): 3 for i in range(4)},  # more entries than files
    ],
    ids=str,
)
def test_receiver_lying_about_what_it_has_is_refused(have):
    out, sender, receiver = _receiver_sends(Inner.ACCEPT, dump_json({"have": have}))
    assert out.sender_error is not None
    assert out.sender_error.code == "protocol-violation"
    assert "resume list" in out.sender_error.message
    assert sender.state is SenderState.ERROR
    assert not any(f.ftype == FrameType.CHUNK for f in wire_frames(out.wire_s2r))
    assert out.receiver_events[-1] == ev.RemoteError("protocol-violation", out.sender_error.message)


def test_receiver_may_resume_whole_files_on_the_sender_side():
    # the sender accepts a partial file in a resume list; only the rest is sent
    out, sender, receiver = _receiver_sends(Inner.ACCEPT, dump_json({"have": {"0": 3, "1": 1}}))
    assert out.sender_error is None
    assert ev.Accepted({0: 3, 1: 1}) in out.sender_events
    sent = [f.chunk[:2] for f in wire_frames(out.wire_s2r) if f.ftype == FrameType.CHUNK]
    assert sent == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize(
    "payload",
    [
        dump_json({"chunks": 100}),
        dump_json({"chunks": -1}),
        dump_json({"chunks": "1"}),
        b'{"chunks":' + b"9" * 5000 + b"}",
        b"{",
    ],
    ids=["too-many", "negative", "string", "huge-int", "garbage"],
)
def test_receiver_acknowledging_unsent_chunks_is_refused(payload):
    out, sender, receiver = _receiver_sends(Inner.ACK, payload, at=ev.Chunk)
    assert out.sender_error is not None
    assert out.sender_error.code == "protocol-violation"
    assert sender.state is SenderState.ERROR


def _receipt_body(receiver, **changes):
    body = {
        "transfer_id": receiver.transfer_id.hex(),
        "manifest_sha256": receiver.manifest_digest,
        "study_instance_uid": MANIFEST.study_instance_uid,
        "instances": 3,
        "bytes": MANIFEST.total_bytes,
        "received_at": 1,
        "receiver": "x",
        "sender": "y",
    }
    body.update(changes)
    return dump_json(body)


@pytest.mark.parametrize(
    "forge, code",
    [
        (
            lambda r, idr: (
                (b := _receipt_body(r))
                + crypto.Identity.generate(seeded(7)).sign(b"p2pshare/1 receipt\0" + b)
            ),
            "integrity",
        ),
        (
            lambda r, idr: (
                (b := _receipt_body(r, manifest_sha256="0" * 64))
                + idr.sign(b"p2pshare/1 receipt\0" + b)
            ),
            "integrity",
        ),
        (
            lambda r, idr: (
                (b := _receipt_body(r, transfer_id="00" * 16))
                + idr.sign(b"p2pshare/1 receipt\0" + b)
            ),
            "integrity",
        ),
        (
            lambda r, idr: (b := _receipt_body(r)) + idr.sign(b"p2pshare/1 manifest\0" + b),
            "integrity",
        ),
        (lambda r, idr: b"x" * 10, "protocol-violation"),
    ],
    ids=["other-key", "other-manifest", "other-transfer", "wrong-label", "truncated"],
)
def test_forged_receipt_is_refused(forge, code):
    sender, receiver, _, idr = make_pair(window=WIDE)

    def on_receiver(r, e):
        if isinstance(e, ev.SenderDone):
            r._seal(Inner.RECEIPT, forge(r, idr))
            r.state = ReceiverState.AWAIT_CLOSE
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_receiver_event=on_receiver)
    assert out.sender_error is not None and out.sender_error.code == code
    assert sender.state is SenderState.ERROR
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)


def test_receipt_before_done_is_refused():
    sender, receiver, _, idr = make_pair(window=WIDE)

    def on_receiver(r, e):
        if isinstance(e, ev.ManifestOffer):
            body = _receipt_body(r)
            r._seal(Inner.RECEIPT, body + idr.sign(b"p2pshare/1 receipt\0" + body))
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_receiver_event=on_receiver)
    assert out.sender_error.code == "protocol-violation"
    assert "RECEIPT" in out.sender_error.message
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)


# -- raw hostile bytes before pairing --------------------------------------------------------------


def _hello(**changes) -> dict:
    _, receiver, _, _ = make_pair()
    receiver.start()
    ((ftype, body),) = split_frames(receiver.data_to_send())
    assert ftype == FrameType.HELLO
    hello = load_json(body, "hello")
    hello.update(changes)
    return {k: v for k, v in hello.items() if v is not None}


def _feed_sender(data: bytes) -> tuple[SenderSession, list[ev.Event], RemoteProtocolError | None]:
    sender, _, _, _ = make_pair()
    sender.receive_data(data)
    events: list[ev.Event] = []
    try:
        while (e := sender.next_event()) is not None:
            events.append(e)
    except RemoteProtocolError as exc:
        return sender, events, exc
    return sender, events, None


def _queued_error(session) -> dict:
    frames = split_frames(session.data_to_send())
    assert [f[0] for f in frames] == [FrameType.ERROR]
    return load_json(frames[0][1], "error")


def test_oversized_frame_before_pairing_is_refused_from_its_header_alone():
    header = HEADER.pack(MAX_HANDSHAKE_FRAME + 1, FrameType.HELLO)
    sender, events, err = _feed_sender(header)  # not one byte of body needed
    assert err is not None and err.code == "frame-too-large"
    assert str(MAX_HANDSHAKE_FRAME) in err.message
    assert sender.state is SenderState.ERROR
    assert _queued_error(sender)["code"] == "frame-too-large"


def test_handshake_frame_exactly_at_the_limit_is_parsed():
    body = dump_json(_hello())
    padded = body[:-1] + b" " * (MAX_HANDSHAKE_FRAME - 1 - len(body)) + b"}"
    frame = encode(FrameType.HELLO, padded)
    assert HEADER.unpack(frame[:5])[0] == MAX_HANDSHAKE_FRAME
    sender, events, err = _feed_sender(frame)
    assert err is None
    assert events == [ev.OfferRequest(offer_ref=OFFER_ID, spoken=False)]
    # and one byte more is refused
    sender, events, err = _feed_sender(encode(FrameType.HELLO, padded + b" "))
    assert err is not None and err.code == "frame-too-large" and events == []


def test_unknown_frame_type_is_refused():
    sender, events, err = _feed_sender(encode(0x7F, b"hi"))  # type: ignore[arg-type]
    assert err.code == "protocol-violation"
    assert "unknown frame type 0x7f" in err.message
    assert _queued_error(sender) == {"code": "protocol-violation", "message": err.message}


def test_empty_frame_is_refused():
    sender, events, err = _feed_sender(b"\x00\x00\x00\x00\x01")
    assert err.code == "protocol-violation"
    assert "empty frame" in err.message


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b"null", b"\xff\xfe{}", b"[" * 3000, b'{"v":1,}'],
    ids=["garbage", "list", "null", "bad-utf8", "deep", "trailing-comma"],
)
def test_garbage_hello_is_refused(body):
    sender, events, err = _feed_sender(encode(FrameType.HELLO, body))
    assert err is not None and err.code == "protocol-violation"
    assert events == []
    assert sender.state is SenderState.ERROR
    assert _queued_error(sender)["code"] == "protocol-violation"


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"v": 2}, "version"),
        ({"v": None}, "version"),
        ({"v": "1"}, "version"),
        ({"offer": ""}, "protocol-violation"),
        ({"offer": "x" * 65}, "protocol-violation"),
        ({"offer": 7}, "protocol-violation"),
        ({"kind": "email"}, "protocol-violation"),
        ({"pake": None}, "protocol-violation"),
        ({"pake": "!!!"}, "protocol-violation"),
        ({"pake": 33}, "protocol-violation"),
        ({"pake": base64.b64encode(b"A" * 32).decode()}, "protocol-violation"),
        ({"pake": base64.b64encode(b"A" * 34).decode()}, "protocol-violation"),
        ({"pake": base64.b64encode(b"").decode()}, "protocol-violation"),
    ],
    ids=[
        "v2", "no-v", "v-text", "empty-offer", "long-offer", "offer-int", "kind",
        "no-pake", "pake-not-b64", "pake-int", "pake-32", "pake-34", "pake-empty",
    ],
)  # fmt: skip
def test_invalid_hello_is_refused(changes, code):
    sender, events, err = _feed_sender(encode_json(FrameType.HELLO, _hello(**changes)))
    assert err is not None and err.code == code
    assert events == []
    assert _queued_error(sender)["code"] == code


@pytest.mark.parametrize(
    "msg",
    [b"A" + b"\xff" * 32, b"A" + bytes(range(1, 33)), b"B" + bytes(32), b"x" * 33],
    ids=["off-curve", "off-curve-2", "wrong-side", "no-side"],
)
def test_bad_key_exchange_message_is_refused_when_the_offer_is_used(msg):
    """Well-formed enough to pass the HELLO parser; SPAKE2 must refuse it, as a protocol error."""
    hello = _hello(pake=base64.b64encode(msg).decode())
    sender, events, err = _feed_sender(encode_json(FrameType.HELLO, hello))
    assert err is None and events == [ev.OfferRequest(OFFER_ID, False)]
    with pytest.raises(RemoteProtocolError) as info:
        sender.use_offer(OFFER_ID, PASSWORD)
    assert info.value.code == "protocol-violation"
    assert sender.state is SenderState.ERROR
    assert _queued_error(sender)["code"] == "protocol-violation"


@pytest.mark.parametrize(
    "ftype, body",
    [
        (FrameType.SEALED, b"x" * 40),
        (FrameType.CHUNK, b"x" * 40),
        (FrameType.PAKE, b"{}"),
    ],
)
def test_frames_out_of_place_before_pairing_are_refused(ftype, body):
    sender, events, err = _feed_sender(encode(ftype, body))
    assert err.code == "protocol-violation"
    assert events == []


def test_plain_error_before_pairing_is_reported():
    body = {"code": "offer-unavailable", "message": "m" * 600, "tries_left": True}
    sender, events, err = _feed_sender(encode_json(FrameType.ERROR, body))
    assert err is None
    # bounded and type-checked: long message cut, a bool is not a count of tries
    assert events == [ev.RemoteError("offer-unavailable", "m" * 500, None)]
    assert sender.state is SenderState.ERROR


def _started_receiver(**kw) -> tuple[ReceiverSession, dict]:
    sender, receiver, _, _ = make_pair(**kw)
    receiver.start()
    sender.receive_data(receiver.data_to_send())
    assert isinstance(sender.next_event(), ev.OfferRequest)
    sender.use_offer(OFFER_ID, PASSWORD)
    ((ftype, body),) = split_frames(sender.data_to_send())
    assert ftype == FrameType.PAKE
    return receiver, load_json(body, "pake")


def _feed(session, data: bytes):
    session.receive_data(data)
    events = []
    try:
        while (e := session.next_event()) is not None:
            events.append(e)
    except RemoteProtocolError as exc:
        return events, exc
    return events, None


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"offer_id": "f" * 32}, "protocol-violation"),  # another offer than the QR named
        ({"offer_id": ""}, "protocol-violation"),
        ({"offer_id": None}, "protocol-violation"),
        ({"pake": base64.b64encode(b"B" * 32).decode()}, "protocol-violation"),
        ({"pake": base64.b64encode(b"B" + b"\xff" * 32).decode()}, "integrity"),
    ],
    ids=["other-offer", "empty-offer", "no-offer", "short-pake", "off-curve"],
)
def test_invalid_pake_answer_is_refused(changes, code):
    receiver, pake = _started_receiver()
    pake.update(changes)
    pake = {k: v for k, v in pake.items() if v is not None}
    events, err = _feed(receiver, encode_json(FrameType.PAKE, pake))
    assert err is not None and err.code == code
    assert events == []
    assert receiver.state is ReceiverState.ERROR
    # nothing sealed (no identity) went out, only the plain error
    assert _queued_error(receiver)["code"] == code


def test_reflected_key_exchange_message_is_refused():
    """A fake sender echoes the receiver's own SPAKE2 message back."""
    sender, receiver, _, _ = make_pair()
    receiver.start()
    hello = load_json(split_frames(receiver.data_to_send())[0][1], "hello")
    echo = {"offer_id": OFFER_ID, "pake": hello["pake"]}
    events, err = _feed(receiver, encode_json(FrameType.PAKE, echo))
    assert err is not None and err.code == "integrity"
    assert _queued_error(receiver)["code"] == "integrity"


def test_oversized_frame_to_the_receiver_before_pairing():
    receiver, _ = _started_receiver()
    events, err = _feed(receiver, HEADER.pack(MAX_HANDSHAKE_FRAME + 1, FrameType.PAKE))
    assert err.code == "frame-too-large"


def test_after_pairing_the_frame_limit_is_raised_but_still_enforced():
    def hold(r, e):
        return isinstance(e, ev.ManifestOffer)

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    assert receiver.state is ReceiverState.AWAIT_DECISION
    # a 64 KiB frame is no longer too large: it fails authentication instead
    events, err = _feed(receiver, encode(FrameType.SEALED, bytes(64 * 1024)))
    assert err.code == "integrity"

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    events, err = _feed(receiver, HEADER.pack(MAX_FRAME + 1, FrameType.CHUNK))
    assert err.code == "frame-too-large"
    # the refusal is sealed: the sender learns why, authenticated
    sender.receive_data(receiver.data_to_send())
    assert sender.next_event() == ev.RemoteError("frame-too-large", err.message)

    # and the sender enforces the same limit on the receiver
    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    events, err = _feed(sender, HEADER.pack(MAX_FRAME + 1, FrameType.SEALED))
    assert err.code == "frame-too-large"


def test_unknown_or_empty_sealed_message_is_refused():
    def hold(r, e):
        return isinstance(e, ev.ManifestOffer)

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    sender._seal(99, b"{}")  # type: ignore[arg-type]
    events, err = _feed(receiver, sender.data_to_send())
    assert err.code == "protocol-violation"
    assert "unknown message type 99" in err.message

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    ct = crypto.seal(sender._send_key, sender._send_ctr, b"", sender._aad(FrameType.SEALED))
    events, err = _feed(receiver, encode(FrameType.SEALED, ct))
    assert err.code == "protocol-violation"
    assert "empty sealed message" in err.message


def test_sealed_messages_out_of_place_are_refused():
    def hold(r, e):
        return isinstance(e, ev.ManifestOffer)

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    sender._seal(Inner.DONE, b"{}")  # DONE before the receiver accepted
    events, err = _feed(receiver, sender.data_to_send())
    assert err.code == "protocol-violation"
    assert "DONE" in err.message

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    sender._seal(Inner.MANIFEST, b"again")  # a second manifest
    events, err = _feed(receiver, sender.data_to_send())
    assert err.code == "protocol-violation"
    assert receiver.manifest == MANIFEST

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    sender._seal(Inner.STATUS, dump_json({"state": "x" * 65}))
    events, err = _feed(receiver, sender.data_to_send())
    assert err.code == "protocol-violation"
    assert "malformed status" in err.message

    sender, receiver, _, _ = make_pair()
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    events, err = _feed(receiver, forge_chunk(sender, 0, 0, FILES[0][:4096], 0))
    assert err.code == "protocol-violation"  # a chunk before the receiver accepted
    assert events == []


# -- impostors: they know the code, but not the private key they claim -----------------------------


def _impostor_pair(side: str):
    """A pair where one side presents one identity's public key but signs with another's."""
    sender, receiver, ids, idr = make_pair(window=WIDE)
    thief = crypto.Identity.generate(seeded(4242))
    if side == "sender":
        sender._sign = thief.sign  # presents ids.public_key
    else:
        receiver._sign = thief.sign  # presents idr.public_key
    return sender, receiver


def test_sender_impostor_is_refused_before_the_receiver_trusts_it():
    sender, receiver = _impostor_pair("sender")
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.receiver_error.code == "integrity"
    assert "identity signature" in out.receiver_error.message
    assert not any(isinstance(e, ev.PeerIdentity) for e in out.receiver_events)
    assert receiver.peer_key == b""
    assert sender.manifest is None
    assert out.sender_events[-1].code == "integrity"
    assert_no_study_delivered(out, sender, receiver)


def test_receiver_impostor_never_gets_a_manifest():
    sender, receiver = _impostor_pair("receiver")
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.sender_error.code == "integrity"
    assert "identity signature" in out.sender_error.message
    assert not any(isinstance(e, ev.Paired) for e in out.sender_events)
    assert sender.manifest is None
    assert not any(isinstance(e, ev.ManifestOffer) for e in out.receiver_events)
    assert out.receiver_events[-1] == ev.RemoteError("integrity", out.sender_error.message)


def _bad_confirm(session, who):
    real = session._confirm

    def confirm(w):
        value = real(w)
        return bytes(32) if w == who else value

    session._confirm = confirm


def test_wrong_key_confirmation_from_the_sender_is_refused():
    sender, receiver, _, _ = make_pair(window=WIDE)
    _bad_confirm(sender, "s")
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.receiver_error.code == "integrity"
    assert "key confirmation" in out.receiver_error.message
    assert not any(isinstance(e, ev.PeerIdentity) for e in out.receiver_events)


def test_wrong_key_confirmation_from_the_receiver_is_refused():
    sender, receiver, _, _ = make_pair(window=WIDE)
    _bad_confirm(receiver, "r")
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.sender_error.code == "integrity"
    assert "key confirmation" in out.sender_error.message
    assert sender.state is SenderState.ERROR and sender.manifest is None


def test_wrong_first_key_confirmation_from_the_receiver_is_refused():
    """IDENT_R sealed correctly but carrying a wrong ``confirm r0``."""
    sender, receiver, _, idr = make_pair(window=WIDE)

    def edit(f):
        if f.sealed_no != 0:
            return keep(f)
        body = dump_json(
            {
                "pk": base64.b64encode(idr.public_key).decode(),
                "name": "Trauma Centre Radiology",
                "confirm": base64.b64encode(bytes(32)).decode(),
            }
        )
        ct = crypto.seal(
            receiver._hs_key("r2s"),
            0,
            bytes([Inner.IDENT_R]) + body,
            b"p2pshare/1" + bytes([FrameType.SEALED]),
        )
        return [(FrameType.SEALED, ct)]

    out = run(sender, receiver, FILES, MANIFEST, tamper_r2s=FrameTamper(edit))
    assert out.sender_error.code == "integrity"
    assert "key confirmation" in out.sender_error.message
    assert not any(isinstance(e, ev.PeerIdentity) for e in out.sender_events)
    assert sender.peer_key == b""


@pytest.mark.parametrize(
    "name", ["", "x" * 201, "bad\nname", "tab\there"], ids=["empty", "long", "nl", "tab"]
)
def test_unusable_institution_name_is_refused(name):
    sender, receiver, _, _ = make_pair(window=WIDE)
    sender._name = name
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.receiver_error.code == "protocol-violation"
    assert "institution name" in out.receiver_error.message
    assert not any(isinstance(e, ev.PeerIdentity) for e in out.receiver_events)


# -- the record layer, pinned ----------------------------------------------------------------------


def test_chunk_aad_binds_protocol_type_transfer_and_header():
    sender, receiver, _, _ = make_pair(window=WIDE)
    out = run(sender, receiver, FILES, MANIFEST)
    first = next(f for f in wire_frames(out.wire_s2r) if f.chunk_no == 0)
    header, ct = first.body[: CHUNK_HEADER.size], first.body[CHUNK_HEADER.size :]
    key = receiver._recv_key  # the s2r data key
    counter = 2  # the MANIFEST used 0, the CONSENT record 1
    aad = b"p2pshare/1" + bytes([FrameType.CHUNK]) + receiver.transfer_id + header
    assert crypto.open_sealed(key, counter, ct, aad) == FILES[0][:4096]
    for wrong in (
        b"p2pshare/1" + bytes([FrameType.CHUNK]) + receiver.transfer_id,  # header not bound
        b"p2pshare/1" + bytes([FrameType.CHUNK]) + header,  # transfer not bound
        b"p2pshare/1" + bytes([FrameType.SEALED]) + receiver.transfer_id + header,
    ):
        with pytest.raises(crypto.CryptoError):
            crypto.open_sealed(key, counter, ct, wrong)
    # sealed control messages: the counter continues across both kinds of record
    manifest_frame = next(f for f in wire_frames(out.wire_s2r) if f.sealed_no == 1)
    plain = crypto.open_sealed(key, 0, manifest_frame.body, b"p2pshare/1" + bytes([0x10]))
    assert plain[0] == Inner.MANIFEST
    assert plain[5 : 5 + len(MANIFEST.to_bytes())] == MANIFEST.to_bytes()
