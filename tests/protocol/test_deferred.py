"""The receiver's deferred mode: chunks handed out sealed, opened and hashed by the driver.

Most tests run the same transfer twice, once with a receiver that opens and hashes chunks itself
and once with a deferred one driven the way ``transfer/receiving.py`` drives it (open the
SealedChunk, feed the hasher, report the digest after the last chunk), and assert the two give
the same bytes, the same events (chunk events aside), the same verdicts and the same errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pshare import digest as file_digest
from p2pshare.errors import CryptoError, LocalProtocolError, RemoteProtocolError
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import CHUNK_HEADER, FrameType
from p2pshare.protocol.receiver import ReceiverSession, ReceiverState, open_chunk
from p2pshare.protocol.sender import SenderSession, SenderState
from tests.protocol.helpers import (
    FrameTamper,
    Outcome,
    flip,
    make_files,
    make_manifest,
    make_pair,
    run,
    wire_frames,
)
from tests.protocol.test_hostile import MisSizingSender
from tests.protocol.test_session import splitter

FILES = make_files()  # 3 files × 3 chunks of 4096; on the wire chunk_no 4 is file 1, chunk 1
MANIFEST = make_manifest(FILES)
UID = [inst.sop_instance_uid for inst in MANIFEST.instances]
WIDE = 16  # every chunk and DONE leave in one round
NOW = 1_700_000_000


def make_deferred_pair(
    window: int = 4, seed: int = 1, *, sender_cls: type[SenderSession] = SenderSession
) -> tuple[SenderSession, ReceiverSession]:
    """``make_pair`` with a deferred receiver: otherwise the same receiver (same identity, name
    and entropy), so both modes put the very same bytes on the wire."""
    sender, receiver, _, _ = make_pair(
        window=window, seed=seed, sender_cls=sender_cls, deferred=True
    )
    return sender, receiver


@dataclass
class Driver:
    """What a deferred receiver's driver does with the chunks, kept for the assertions.

    ``lazy``: open nothing until the sender says it is done (as a driver whose write threads
    lag behind the network would), then open, hash and report everything in order.
    """

    lazy: bool = False
    #: hooks run before the default answer; return True to skip it
    before: Any = None
    sealed: list[ev.SealedChunk] = field(default_factory=list)
    pending: list[ev.SealedChunk] = field(default_factory=list)
    hashers: dict[int, Any] = field(default_factory=dict)
    start: dict[int, int] = field(default_factory=dict)
    partial: dict[int, bytearray] = field(default_factory=dict)
    files: dict[int, bytes] = field(default_factory=dict)
    verified: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)
    open_errors: list[tuple[int, int, CryptoError]] = field(default_factory=list)

    def take(self, r: ReceiverSession, e: ev.SealedChunk) -> None:
        fi = e.file_index
        try:
            data = open_chunk(e)
        except CryptoError as exc:
            self.open_errors.append((fi, e.chunk_index, exc))
            r.chunk_unreadable(fi, e.chunk_index)  # raises RemoteProtocolError
            raise AssertionError("chunk_unreadable returned") from None
        assert len(data) == e.length
        if e.hasher is not None:
            assert fi not in self.hashers, "a second hasher for a file"
            self.hashers[fi] = e.hasher
            self.start[fi] = e.offset
            self.partial[fi] = bytearray()
        part = self.partial[fi]
        assert e.offset == self.start[fi] + len(part), "a chunk out of place"
        part.extend(data)
        self.hashers[fi].update(data)
        if e.last:
            digest = self.hashers.pop(fi).hexdigest()
            self.digests[fi] = digest
            r.file_hashed(fi, digest)

    def catch_up(self, r: ReceiverSession) -> None:
        while self.pending:
            self.take(r, self.pending.pop(0))

    def __call__(self, r: ReceiverSession, e: ev.Event) -> bool:
        if self.before is not None and self.before(r, e):
            return True
        if isinstance(e, ev.SealedChunk):
            self.sealed.append(e)
            if self.lazy:
                self.pending.append(e)
            else:
                self.take(r, e)
            return True
        if isinstance(e, ev.FileVerified):
            self.verified.append(e.file_index)
            self.files[e.file_index] = bytes(self.partial.pop(e.file_index))
            return True
        if isinstance(e, ev.FileRejected):
            self.rejected[e.file_index] = e.reason
            self.partial.pop(e.file_index, None)
            return True
        if isinstance(e, ev.SenderDone):
            self.catch_up(r)
        return False  # the default answer (send_receipt or refuse on SenderDone, …)


def run_deferred(
    files: list[bytes] = FILES,
    manifest=MANIFEST,
    *,
    window: int = 4,
    seed: int = 1,
    sender_cls: type[SenderSession] = SenderSession,
    driver: Driver | None = None,
    **kw: Any,
) -> tuple[Outcome, Driver, SenderSession, ReceiverSession]:
    sender, receiver = make_deferred_pair(window=window, seed=seed, sender_cls=sender_cls)
    driver = driver or Driver()
    out = run(sender, receiver, files, manifest, on_receiver_event=driver, **kw)
    return out, driver, sender, receiver


def run_plain(
    files: list[bytes] = FILES,
    manifest=MANIFEST,
    *,
    window: int = 4,
    seed: int = 1,
    sender_cls: type[SenderSession] = SenderSession,
    **kw: Any,
) -> tuple[Outcome, SenderSession, ReceiverSession]:
    sender, receiver, _, _ = make_pair(window=window, seed=seed, sender_cls=sender_cls)
    return run(sender, receiver, files, manifest, **kw), sender, receiver


def without_chunks(events: list[ev.Event]) -> list[ev.Event]:
    return [e for e in events if not isinstance(e, ev.Chunk | ev.SealedChunk)]


def kinds(events: list[ev.Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def assert_same_as_plain(out: Outcome, ref: Outcome) -> None:
    assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)
    assert out.sender_events == ref.sender_events
    assert out.receipt == ref.receipt
    assert b"".join(out.wire_s2r) == b"".join(ref.wire_s2r)
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)


# -- the honest transfer -------------------------------------------------------------------------


def test_a_deferred_transfer_equals_the_plain_one_byte_for_byte():
    ref, _, _ = run_plain()
    assert ref.receipt is not None and ref.files == dict(enumerate(FILES))

    out, d, sender, receiver = run_deferred()
    assert out.receiver_error is None and out.sender_error is None
    assert d.files == dict(enumerate(FILES))
    assert d.verified == [0, 1, 2] and d.rejected == {}
    assert d.digests == {i: MANIFEST.instances[i].digest for i in range(3)}
    assert receiver.verified == {0, 1, 2}
    assert sender.state is SenderState.DONE and receiver.state is ReceiverState.DONE
    assert out.receipt is not None and out.receipt["instances"] == 3
    assert_same_as_plain(out, ref)

    # one SealedChunk per planned chunk where the plain receiver gives a Chunk, nothing else
    assert not any(isinstance(e, ev.Chunk) for e in out.receiver_events)
    plain_chunks = [e for e in ref.receiver_events if isinstance(e, ev.Chunk)]
    assert [(c.file_index, c.chunk_index, c.offset, len(c.data), c.last) for c in plain_chunks] == [
        (s.file_index, s.chunk_index, s.offset, s.length, s.last) for s in d.sealed
    ]
    assert kinds(out.receiver_events) == (
        ["PeerIdentity", "Paired", "ManifestOffer", "ConsentGranted"]
        + (["SealedChunk"] * 3 + ["FileVerified"]) * 3
        + ["SenderDone", "Closed"]
    )
    # a fresh hasher with each file's first chunk, none with the others; counters in order
    assert [s.hasher is not None for s in d.sealed] == [True, False, False] * 3
    assert len({id(s.hasher) for s in d.sealed if s.hasher is not None}) == 3
    assert [s.counter for s in d.sealed] == list(
        range(d.sealed[0].counter, d.sealed[0].counter + 9)
    )
    assert all(s.key == d.sealed[0].key and len(s.key) == 32 for s in d.sealed)
    for s in d.sealed:
        header = CHUNK_HEADER.pack(s.file_index, s.chunk_index, int(s.last))
        assert bytes(s.aad).endswith(header)


def test_digests_reported_only_after_the_sender_is_done_give_the_same_receipt():
    ref, _, _ = run_plain()
    out, d, sender, receiver = run_deferred(driver=Driver(lazy=True))
    assert out.receiver_error is None
    assert d.files == dict(enumerate(FILES))
    assert out.receipt == ref.receipt
    assert sender.state is SenderState.DONE and receiver.state is ReceiverState.DONE
    # the verdicts now follow SenderDone; everything else is as in the plain run
    k = kinds(without_chunks(out.receiver_events))
    assert k == [
        "PeerIdentity",
        "Paired",
        "ManifestOffer",
        "ConsentGranted",
        "SenderDone",
        "FileVerified",
        "FileVerified",
        "FileVerified",
        "Closed",
    ]
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)


def test_open_chunk_is_a_pure_function_bound_to_key_counter_and_aad():
    _, d, _, _ = run_deferred()
    first, second = d.sealed[0], d.sealed[1]
    # any order, any number of times
    assert open_chunk(second) == FILES[0][4096:8192]
    assert open_chunk(first) == FILES[0][:4096]
    assert open_chunk(first) == FILES[0][:4096]
    for moved in (
        dataclasses.replace(first, counter=first.counter + 1),
        dataclasses.replace(first, aad=second.aad),
        dataclasses.replace(first, key=bytes(32)),
        dataclasses.replace(first, sealed=bytes(first.sealed)[:-1]),
    ):
        with pytest.raises(CryptoError):
            open_chunk(moved)


def test_a_sealed_chunk_shows_no_key_ciphertext_or_aad():
    _, d, _, _ = run_deferred()
    s = d.sealed[0]
    text = repr(s)
    assert text == "SealedChunk(file_index=0, chunk_index=0, offset=0, length=4096, last=False)"
    assert str(s) == text
    for secret in (s.key, bytes(s.sealed[:16]), bytes(s.aad), s.aad[-9:]):
        assert repr(secret)[2:-1] not in text
        assert secret.hex() not in text


# -- arbitrary re-chunking of the byte stream ----------------------------------------------------


REFERENCE_SEED = 11
_REFERENCE: list[Outcome] = []


def _reference() -> Outcome:
    if not _REFERENCE:
        _REFERENCE.append(run_plain(seed=REFERENCE_SEED)[0])
    return _REFERENCE[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=12),
    lazy=st.booleans(),
)
def test_arbitrary_splits_give_the_same_result_in_deferred_mode(sizes, lazy):
    ref = _reference()
    out, d, sender, receiver = run_deferred(
        seed=REFERENCE_SEED, split=splitter(sizes), driver=Driver(lazy=lazy)
    )
    assert out.receiver_error is None and out.sender_error is None
    # the sealed chunks stay intact however the stream was cut and however late they are opened
    assert d.files == dict(enumerate(FILES))
    assert out.receipt == ref.receipt
    assert b"".join(out.wire_s2r) == b"".join(ref.wire_s2r)
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)
    if not lazy:
        assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)
    assert sender.state is SenderState.DONE and receiver.state is ReceiverState.DONE


def test_one_byte_at_a_time_in_deferred_mode():
    ref = _reference()
    out, d, _, _ = run_deferred(seed=REFERENCE_SEED, split=splitter([1]), driver=Driver(lazy=True))
    assert d.files == dict(enumerate(FILES))
    assert out.receipt == ref.receipt


# -- an altered chunk ------------------------------------------------------------------------------


def on_chunk(n: int, edit):
    return FrameTamper(lambda f: edit(f) if f.chunk_no == n else [(f.ftype, f.body)])


@pytest.mark.parametrize(
    "pos",
    [CHUNK_HEADER.size, CHUNK_HEADER.size + 2000, -17, -1],
    ids=["first-ct-byte", "middle", "last-ct-byte", "tag"],
)
@pytest.mark.parametrize("lazy", [False, True], ids=["at-once", "after-done"])
def test_a_flipped_bit_fails_to_open_and_is_reported_as_in_plain_mode(pos, lazy):
    def tamper():
        return on_chunk(4, lambda f: [(f.ftype, flip(f.body, pos, 3))])

    ref, _, _ = run_plain(window=WIDE, tamper_s2r=tamper())
    assert ref.receiver_error is not None and ref.receiver_error.code == "integrity"

    out, d, sender, receiver = run_deferred(
        window=WIDE, tamper_s2r=tamper(), driver=Driver(lazy=lazy)
    )
    # the session passed the chunk on (its length fits); opening it is what fails
    assert [(fi, ci) for fi, ci, _ in d.open_errors] == [(1, 1)]
    assert str(d.open_errors[0][2]) == "a sealed record failed authentication"
    err = out.receiver_error
    assert isinstance(err, RemoteProtocolError)
    assert err.code == "integrity"
    assert err.message == ref.receiver_error.message
    assert err.message == (
        f"chunk 1 of instance {UID[1]} failed authentication: it was altered, replayed or "
        "reordered in transit; the file was not kept"
    )
    assert receiver.state is ReceiverState.ERROR
    # the sender heard why, authenticated, and stopped without a receipt
    assert out.sender_error is None
    assert out.sender_events[-1] == ev.RemoteError("integrity", err.message)
    assert sender.state is SenderState.ERROR
    assert out.receipt is None
    assert not any(isinstance(e, ev.Receipt) for e in out.sender_events)
    # nothing of file 1 was verified; file 0 was, as in plain mode
    assert 1 not in receiver.verified and ev.FileVerified(1) not in out.receiver_events
    assert d.verified == [0] and d.files == {0: FILES[0]}
    if not lazy:
        assert out.sender_events == ref.sender_events
        assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)


def test_chunk_unreadable_queues_an_integrity_error_for_the_sender():
    """Pumped by hand: what chunk_unreadable puts on the wire."""
    sealed: list[ev.SealedChunk] = []

    def hold(r, e):
        if isinstance(e, ev.SealedChunk):
            sealed.append(e)
        return isinstance(e, ev.SealedChunk | ev.SenderDone)  # no digest, no receipt

    sender, receiver = make_deferred_pair(window=WIDE)
    run(sender, receiver, FILES, MANIFEST, on_receiver_event=hold)
    assert receiver.state is ReceiverState.AWAIT_VERDICT  # every chunk passed on, none opened
    receiver.data_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        receiver.chunk_unreadable(2, 1)
    assert info.value.code == "integrity"
    assert info.value.message.startswith(f"chunk 1 of instance {UID[2]} failed authentication")
    assert receiver.state is ReceiverState.ERROR
    wire = receiver.data_to_send()
    frames = wire_frames([wire])
    assert [f.ftype for f in frames] == [FrameType.SEALED]  # authenticated, not plaintext
    assert b"integrity" not in wire
    sender.receive_data(wire)
    assert sender.next_event() == ev.RemoteError("integrity", info.value.message)
    assert sender.state is SenderState.ERROR
    # sticky: nothing more is said, digests are no longer taken
    with pytest.raises(RemoteProtocolError):
        receiver.chunk_unreadable(2, 2)
    assert receiver.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        receiver.send_receipt(NOW)


# -- a sender whose files are not what it signed -----------------------------------------------------


def test_contents_not_matching_the_manifest_are_rejected_as_in_plain_mode():
    corrupt = [FILES[0], FILES[1][:-1] + bytes([FILES[1][-1] ^ 1]), FILES[2]]
    ref, _, _ = run_plain(corrupt, window=WIDE)
    assert set(ref.rejected) == {1}

    refused: list[LocalProtocolError] = []

    def at_done(r, e):
        if isinstance(e, ev.SenderDone):
            with pytest.raises(LocalProtocolError) as info:
                r.send_receipt(NOW)
            refused.append(info.value)
            assert r.state is ReceiverState.AWAIT_VERDICT
        return False  # then the default: refuse("incomplete", …)

    out, d, sender, receiver = run_deferred(corrupt, window=WIDE, driver=Driver(before=at_done))
    assert out.receiver_error is None  # every chunk authentic: the sender's file is wrong
    assert d.rejected == {1: ref.rejected[1]}
    assert d.rejected[1] == (f"instance {UID[1]} does not match its digest in the signed manifest")
    assert receiver.rejected == {1: d.rejected[1]}
    assert d.digests[1] == file_digest.of_bytes(corrupt[1]) != MANIFEST.instances[1].digest
    assert d.verified == [0, 2] and 1 not in receiver.verified and 1 not in d.files
    assert [str(x) for x in refused] == ["a receipt needs every instance verified"]
    assert out.receipt is None
    assert out.sender_events[-1] == ev.RemoteError("incomplete", "some files failed verification")
    assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)
    assert out.sender_events == ref.sender_events
    # the refused receipt sent nothing: the receiver's bytes are those of the plain run
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)


def test_a_receipt_waits_for_every_digest():
    ref, _, _ = run_plain()
    steps: list[str] = []
    d = Driver(lazy=True)

    def at_done(r, e):
        if not isinstance(e, ev.SenderDone):
            return False
        assert len(d.pending) == 9
        # no digest yet, then all but the last file's: no receipt
        with pytest.raises(LocalProtocolError):
            r.send_receipt(NOW)
        steps.append("none")
        while d.pending[0].file_index != 2 or not d.pending[0].last:
            d.take(r, d.pending.pop(0))
        assert r.verified == {0, 1}
        with pytest.raises(LocalProtocolError):
            r.send_receipt(NOW)
        steps.append("two")
        assert r.state is ReceiverState.AWAIT_VERDICT
        return False  # the driver reports the last digest, then the default signs

    d.before = at_done
    out, _, sender, receiver = run_deferred(driver=d)
    assert steps == ["none", "two"]
    assert out.receipt == ref.receipt
    # the refused calls sent nothing: the receiver's bytes are those of the plain run
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)
    assert sender.state is SenderState.DONE


# -- file_hashed when no file waits ---------------------------------------------------------------


def test_file_hashed_is_refused_for_a_file_that_is_not_waiting():
    good = [inst.digest for inst in MANIFEST.instances]
    corrupt = [FILES[0], FILES[1], bytes(len(FILES[2]))]  # file 2 will be rejected
    refused: list[str] = []

    def expect_refused(r: ReceiverSession, fi: int, digest: str, why: str) -> None:
        before = (r.state, set(r.verified), dict(r.rejected))
        with pytest.raises(LocalProtocolError) as info:
            r.file_hashed(fi, digest)
        assert str(info.value) == f"file #{fi} is not waiting for a digest"
        assert (r.state, r.verified, r.rejected) == before
        refused.append(why)

    seen: list[ev.SealedChunk] = []

    def before(r, e):
        if isinstance(e, ev.ManifestOffer):
            r.accept()
            expect_refused(r, 0, good[0], "nothing sent yet")
            expect_refused(r, 99, good[0], "no such file")
            return True
        if isinstance(e, ev.SealedChunk):
            seen.append(e)
            if (e.file_index, e.chunk_index) == (0, 1):
                expect_refused(r, 0, good[0], "half sent")
        if isinstance(e, ev.FileVerified) and e.file_index == 0:
            expect_refused(r, 0, good[0], "reported twice")
        if isinstance(e, ev.FileRejected):
            # the right digest, late, does not turn a rejected file into a verified one
            expect_refused(r, 2, good[2], "rejected, then the right digest")
        return False

    ref, _, _ = run_plain(corrupt)
    out, d, _, receiver = run_deferred(corrupt, driver=Driver(before=before))
    assert refused == [
        "nothing sent yet",
        "no such file",
        "half sent",
        "reported twice",
        "rejected, then the right digest",
    ]
    # the refused calls changed nothing: the same verdicts and events as without them
    assert d.verified == [0, 1] and set(d.rejected) == {2}
    assert receiver.rejected == {2: ref.rejected[2]}
    assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)
    assert out.sender_events == ref.sender_events


# -- chunks of the wrong length: decided inline, as in plain mode ------------------------------------


def _same_failure(out: Outcome, d: Driver, ref: Outcome, target: tuple[int, int]) -> None:
    assert out.receiver_error is not None and ref.receiver_error is not None
    assert (out.receiver_error.code, out.receiver_error.message) == (
        ref.receiver_error.code,
        ref.receiver_error.message,
    )
    assert out.sender_events == ref.sender_events
    assert out.sender_events[-1] == ev.RemoteError(
        ref.receiver_error.code, ref.receiver_error.message
    )
    assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)
    assert out.receipt is None
    # the chunk was never handed out, sealed or not, and nothing failed to open
    assert target not in [(s.file_index, s.chunk_index) for s in d.sealed]
    assert d.open_errors == []
    assert 1 not in d.verified


@pytest.mark.parametrize(
    "target, delta", [((1, 1), 1), ((1, 1), -1), ((1, 2), 1), ((1, 2), -2), ((1, 0), -4096)]
)
def test_an_authentic_chunk_of_the_wrong_length_is_a_size_mismatch(target, delta):
    cls = type("S", (MisSizingSender,), {"target": target, "delta": delta})
    files = [FILES[0], FILES[1] + b"EXTRA BYTES", FILES[2]]  # room for a longer last chunk
    ref, _, _ = run_plain(files, window=WIDE, sender_cls=cls)
    out, d, _, receiver = run_deferred(files, window=WIDE, sender_cls=cls)
    _same_failure(out, d, ref, target)
    expected = MANIFEST.chunk_length(*target)
    assert out.receiver_error.code == "size-mismatch"
    assert out.receiver_error.message == (
        f"chunk {target[1]} of instance {UID[1]} holds {expected + delta} bytes where the "
        f"manifest implies {expected}"
    )
    assert receiver.state is ReceiverState.ERROR


@pytest.mark.parametrize(
    "n, cut",
    [
        (4, lambda body: body + b"\0"),  # one byte longer: a full chunk plus one
        (4, lambda body: body[:-1]),
        (4, lambda body: body[: CHUNK_HEADER.size + 16]),  # the tag alone: an empty chunk
        (5, lambda body: body + b"\0" * 7),  # the last, short chunk of file 1
        (5, lambda body: body[:-100]),
    ],
    ids=["longer", "shorter", "tag-only", "last-longer", "last-shorter"],
)
def test_a_forged_chunk_of_the_wrong_length_is_an_integrity_error(n, cut):
    def tamper():
        return on_chunk(n, lambda f: [(f.ftype, cut(f.body))])

    ref, _, _ = run_plain(window=WIDE, tamper_s2r=tamper())
    out, d, _, receiver = run_deferred(window=WIDE, tamper_s2r=tamper())
    target = (1, n - 3)
    _same_failure(out, d, ref, target)
    assert out.receiver_error.code == "integrity"
    assert out.receiver_error.message.startswith(
        f"chunk {target[1]} of instance {UID[1]} failed authentication"
    )
    assert receiver.state is ReceiverState.ERROR


# -- resuming part-way ------------------------------------------------------------------------------


def _resume(have, prefix, *, deferred: bool, driver: Driver | None = None):
    def on_offer(r, e):
        if isinstance(e, ev.ManifestOffer):
            r.accept(have, prefix)
            return True
        return False

    if not deferred:
        out, _, receiver = run_plain(on_receiver_event=on_offer)
        return out, None, receiver
    driver = driver or Driver()
    then = driver.before

    def before(r, e):
        return on_offer(r, e) or (then is not None and then(r, e))

    driver.before = before
    out, d, _, receiver = run_deferred(driver=driver)
    return out, d, receiver


@pytest.mark.parametrize("lazy", [False, True], ids=["at-once", "after-done"])
def test_a_file_resumed_part_way_gets_its_prefix_hasher_and_verifies(lazy):
    have = {0: 3, 1: 1}
    ref, _, _ = _resume(have, {1: file_digest.hasher(FILES[1][:4096])}, deferred=False)
    assert ref.receipt is not None

    prefix = {1: file_digest.hasher(FILES[1][:4096])}
    given_hasher = prefix[1]
    out, d, receiver = _resume(have, prefix, deferred=True, driver=Driver(lazy=lazy))
    sent = [(s.file_index, s.chunk_index) for s in d.sealed]
    assert sent == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    first = d.sealed[0]
    assert first.hasher is given_hasher  # the held prefix's hasher, not a fresh one
    assert first.offset == 4096
    assert d.sealed[1].hasher is None
    assert d.sealed[2].hasher is not None and d.sealed[2].hasher is not given_hasher
    assert d.digests[1] == MANIFEST.instances[1].digest
    assert d.files == {1: FILES[1][4096:], 2: FILES[2]}
    assert d.verified == [1, 2]
    assert receiver.verified == {0, 1, 2}
    assert out.receipt == ref.receipt
    assert b"".join(out.wire_r2s) == b"".join(ref.wire_r2s)
    if not lazy:
        assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)


def test_a_resumed_file_whose_held_part_differs_is_rejected_as_in_plain_mode():
    wrong = b"not what was sent"
    ref, _, _ = _resume({1: 1}, {1: file_digest.hasher(wrong)}, deferred=False)
    out, d, receiver = _resume({1: 1}, {1: file_digest.hasher(wrong)}, deferred=True)
    assert set(ref.rejected) == {1}
    assert d.rejected == ref.rejected
    assert receiver.rejected == ref.rejected
    assert out.receipt is None
    assert without_chunks(out.receiver_events) == without_chunks(ref.receiver_events)


def test_a_file_held_whole_before_takes_no_digest():
    refused: list[str] = []

    def at_done(r, e):
        if isinstance(e, ev.SenderDone):
            with pytest.raises(LocalProtocolError):
                r.file_hashed(0, MANIFEST.instances[0].digest)
            refused.append(str(r.verified))
        return False

    out, d, receiver = _resume({0: 3}, {}, deferred=True, driver=Driver(before=at_done))
    assert refused == ["{0, 1, 2}"]
    assert [s.file_index for s in d.sealed] == [1, 1, 1, 2, 2, 2]
    assert d.verified == [1, 2]
    assert out.receipt is not None and out.receipt["instances"] == 3


def test_an_unreadable_first_chunk_of_the_first_file():
    tamper = on_chunk(0, lambda f: [(f.ftype, flip(f.body, -1))])
    out, d, sender, receiver = run_deferred(window=WIDE, tamper_s2r=tamper)
    assert [(fi, ci) for fi, ci, _ in d.open_errors] == [(0, 0)]
    assert out.receiver_error is not None and out.receiver_error.code == "integrity"
    assert out.sender_events[-1] == ev.RemoteError("integrity", out.receiver_error.message)
    assert out.receiver_error.message.startswith(
        f"chunk 0 of instance {UID[0]} failed authentication"
    )
    assert d.verified == [] and d.files == {} and receiver.verified == set()
    assert sender.state is SenderState.ERROR and receiver.state is ReceiverState.ERROR
