"""Staging as the deferred receiver drives it: chunks opened, hashed and written on two write
threads, digests collected with ``finished()``, identities read from the first chunk in memory.

Real temp folders and real synthetic DICOM files (the fixtures of ``tests/test_staging.py``).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pshare import digest as file_digest
from p2pshare import staging as staging_module
from p2pshare.dicom.ingest import StudyScan, scan
from p2pshare.dicom.synthetic import generate_ct_study
from p2pshare.dicom.verify import read_identity_of_verified
from p2pshare.errors import CryptoError, TransferError
from p2pshare.staging import WRITE_THREADS, ChunkUnreadable, Staging
from tests.test_staging import CHUNK, SERIES, Harness, data, final_path
from tests.test_staging import harness as harness  # the fixture: a Staging maker, closed after

# The synthetic study: five files of 3, 3, 2, 2 and 1 chunks of 4 KiB.
COUNTS = [3, 3, 2, 2, 1]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyScan:
    root = tmp_path_factory.mktemp("study")
    generate_ct_study(root, seed=11, series=SERIES)
    found = scan(root, chunk_size=CHUNK).study(None)
    assert [found.manifest.chunk_count(i) for i in range(5)] == COUNTS
    return found


def chunks_of(content: bytes) -> list[bytes]:
    return [content[i : i + CHUNK] for i in range(0, len(content), CHUNK)]


def sealed(piece: bytes, log: list[Any] | None = None, tag: Any = None, delay: float = 0.0):
    """A stand-in for ``functools.partial(open_chunk, event)``: returns the plaintext (as a
    bytearray, like open_chunk) on the write thread, noting which thread and when."""

    def open_it() -> bytearray:
        if delay:
            time.sleep(delay)
        if log is not None:
            log.append((tag, threading.get_ident()))
        return bytearray(piece)

    return open_it


def unreadable(log: list[Any] | None = None) -> Callable[[], bytearray]:
    def open_it() -> bytearray:
        if log is not None:
            log.append(threading.get_ident())
        raise CryptoError("a sealed record failed authentication")

    return open_it


async def write_file(
    s: Staging, study: StudyScan, fi: int, *, hasher: Any = "fresh", content: bytes | None = None
) -> None:
    """Every chunk of file ``fi`` as the deferred driver queues it: sealed, the hasher with the
    first chunk only."""
    pieces = chunks_of(data(study, fi) if content is None else content)
    for ci, piece in enumerate(pieces):
        h = (file_digest.hasher() if hasher == "fresh" else hasher) if ci == 0 else None
        await s.write(fi, ci, sealed(piece), ci == len(pieces) - 1, h)


def digest_of(study: StudyScan, fi: int) -> str:
    d = file_digest.of_bytes(data(study, fi))
    assert d == study.manifest.instances[fi].digest
    return d


# -- digests and bytes ------------------------------------------------------------------------------


async def test_finished_reports_each_file_once_in_order_with_its_digest(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    order = [2, 0, 4, 1, 3]  # stream order, not manifest order
    for fi in order:
        await write_file(s, study, fi)
    await s.drain()
    assert s.finished() == [(fi, digest_of(study, fi)) for fi in order]
    assert s.finished() == []  # each file once
    for fi in order:
        assert (s.dir / f"{fi}.part").read_bytes() == data(study, fi)
    assert harness.placed == []  # nothing placed before the session says verified

    for fi in order:
        s.verified(fi)
    await s.sync()
    assert harness.placed == order and s.placed == 5 and s.failures == {}
    for fi in order:
        assert final_path(harness.out, m, fi).read_bytes() == data(study, fi)
    assert list(s.dir.iterdir()) == []


async def test_a_file_done_first_on_the_other_thread_waits_for_the_earlier_one(
    harness: Harness, study: StudyScan
) -> None:
    s = harness.make(study.manifest)
    assert s.finished() == []
    await write_file(s, study, 0)
    await s.drain()
    assert s.finished() == [(0, digest_of(study, 0))]

    # file 1 (odd thread) is slow to open its last chunk; file 4 (even thread), queued after
    # it and written without a hasher, is done first
    gate = threading.Event()
    pieces = chunks_of(data(study, 1))
    await s.write(1, 0, sealed(pieces[0]), False, file_digest.hasher())
    await s.write(1, 1, sealed(pieces[1]), False)

    def slow() -> bytearray:
        assert gate.wait(5)
        return bytearray(pieces[2])

    await s.write(1, 2, slow, True)
    await write_file(s, study, 4, hasher=None)
    part4 = s.dir / "4.part"
    for _ in range(500):
        if part4.exists() and part4.stat().st_size == study.manifest.instances[4].size:
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)
    assert part4.read_bytes() == data(study, 4)
    assert s.finished() == []  # in stream order: file 4 waits behind file 1
    gate.set()
    await s.drain()
    assert s.finished() == [(1, digest_of(study, 1)), (4, None)]
    assert s.finished() == []


async def test_a_held_prefix_hasher_continues_a_resumed_file(
    harness: Harness, study: StudyScan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file resumed part-way: its first chunk on this connection comes with the hasher of what
    is held; the part is continued in place; the identity is read from the file."""
    m = study.manifest
    whole = data(study, 0)
    first = harness.make(m)
    await first.write(0, 0, sealed(whole[:CHUNK]), False, file_digest.hasher())
    await harness.close(first, remove_staging=False)
    have, prefix, placed = staging_module.held_chunks(harness.out, first.dir, m)
    assert (have, placed) == ({0: 1}, 0)

    read: list[Path] = []

    def spy(path: Path) -> Any:
        read.append(Path(path))
        return read_identity_of_verified(path)

    monkeypatch.setattr(staging_module, "read_identity_of_verified", spy)
    s = harness.make(m)
    await s.write(0, 1, sealed(whole[CHUNK : 2 * CHUNK]), False, prefix[0])
    await s.write(0, 2, sealed(whole[2 * CHUNK :]), True)
    await s.drain()
    assert s.finished() == [(0, digest_of(study, 0))]
    assert (s.dir / "0.part").read_bytes() == whole
    s.verified(0)
    await s.settle()
    assert harness.placed == [0]
    assert final_path(harness.out, m, 0).read_bytes() == whole
    assert read == [s.dir / "0.part"]  # no first chunk on this connection: read from the file


# -- order across the two write threads -------------------------------------------------------------


async def test_interleaved_files_keep_their_chunk_order_on_two_write_threads(
    harness: Harness, study: StudyScan
) -> None:
    assert WRITE_THREADS == 2
    m = study.manifest
    s = harness.make(m)
    files = [0, 1, 2, 3, 4]
    pieces = {fi: chunks_of(data(study, fi)) for fi in files}
    # round-robin, chunk by chunk: (0,0) (1,0) (2,0) (3,0) (4,0) (0,1) (1,1) … (1,2)
    plan = [(fi, ci) for ci in range(3) for fi in files if ci < COUNTS[fi]]
    rng = random.Random(3)
    log: list[Any] = []
    for fi, ci in plan:
        # earlier chunks are slower to open: any reordering would show in the bytes
        delay = rng.choice([0.0, 0.002, 0.01]) if ci == 0 else 0.0
        h = file_digest.hasher() if ci == 0 else None
        await s.write(fi, ci, sealed(pieces[fi][ci], log, (fi, ci), delay), ci == COUNTS[fi] - 1, h)
    await s.drain()

    # finished() in the order the last chunks were queued
    ends = [fi for fi, ci in plan if ci == COUNTS[fi] - 1]
    assert ends == [4, 2, 3, 0, 1]
    assert s.finished() == [(fi, digest_of(study, fi)) for fi in ends]
    for fi in files:
        assert (s.dir / f"{fi}.part").read_bytes() == data(study, fi)

    # one thread per file, files alternating between two threads, each in queue order
    thread_of: dict[int, set[int]] = {}
    for (fi, _), ident in log:
        thread_of.setdefault(fi, set()).add(ident)
    assert all(len(t) == 1 for t in thread_of.values())
    even = thread_of[0] | thread_of[2] | thread_of[4]
    odd = thread_of[1] | thread_of[3]
    assert len(even) == 1 and len(odd) == 1 and even != odd
    for ident in (*even, *odd):
        ran = [tag for tag, t in log if t == ident]
        assert ran == [p for p in plan if p in ran]


# -- a chunk that does not open ---------------------------------------------------------------------


async def test_an_unreadable_chunk_writes_nothing_and_is_reported_by_finished(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    await write_file(s, study, 4)
    await write_file(s, study, 0)
    h1 = file_digest.hasher()
    head = data(study, 1)[:CHUNK]
    await s.write(1, 0, sealed(head), False, h1)
    opened: list[int] = []
    await s.write(1, 1, unreadable(opened), False)
    await write_file(s, study, 2)  # a whole file queued after the failure
    await s.drain()  # a chunk that fails to open is not a disk error
    assert len(opened) == 1

    # the files before the failure are reported, in order, then the failure, and nothing after
    assert s.finished() == [(4, digest_of(study, 4)), (0, digest_of(study, 0))]
    with pytest.raises(ChunkUnreadable) as info:
        s.finished()
    assert (info.value.file_index, info.value.chunk_index) == (1, 1)
    assert str(info.value) == "chunk 1 of file #1 failed authentication"
    with pytest.raises(ChunkUnreadable):  # and it stays reported
        s.finished()
    # nothing of the chunk reached the hasher
    assert h1.hexdigest() == file_digest.of_bytes(head)

    # the files before it, verified, are still placed as usual
    s.verified(4)
    s.verified(0)
    await s.settle()
    assert harness.placed == [4, 0] and s.failures == {}
    assert final_path(harness.out, m, 4).read_bytes() == data(study, 4)
    assert final_path(harness.out, m, 0).read_bytes() == data(study, 0)
    assert not final_path(harness.out, m, 1).exists()

    await harness.close(s, remove_staging=False)
    # nothing of the chunk was written: the part holds the first chunk, and only it
    assert (s.dir / "1.part").read_bytes() == head


async def test_an_unreadable_last_chunk_never_finishes_its_file(
    harness: Harness, study: StudyScan
) -> None:
    s = harness.make(study.manifest)
    await write_file(s, study, 2)
    await s.drain()
    assert s.finished() == [(2, digest_of(study, 2))]
    await s.write(4, 0, unreadable(), True, file_digest.hasher())
    await s.drain()
    with pytest.raises(ChunkUnreadable) as info:
        s.finished()
    assert (info.value.file_index, info.value.chunk_index) == (4, 0)
    await harness.close(s, remove_staging=False)
    assert not (s.dir / "4.part").exists()  # not even created


# -- drain ----------------------------------------------------------------------------------------


async def test_drain_waits_for_every_queued_write(harness: Harness, study: StudyScan) -> None:
    s = harness.make(study.manifest)
    gate = threading.Event()
    done: list[tuple[int, int]] = []

    def gated(fi: int, ci: int, piece: bytes) -> Callable[[], bytearray]:
        def open_it() -> bytearray:
            assert gate.wait(5)
            done.append((fi, ci))
            return bytearray(piece)

        return open_it

    plan = [(fi, ci) for fi in (0, 1, 4) for ci in range(COUNTS[fi])]
    for fi, ci in plan:
        piece = chunks_of(data(study, fi))[ci]
        h = file_digest.hasher() if ci == 0 else None
        await s.write(fi, ci, gated(fi, ci, piece), ci == COUNTS[fi] - 1, h)

    drain = asyncio.ensure_future(s.drain())
    await asyncio.sleep(0.05)
    assert not drain.done() and done == []
    assert s.finished() == []
    gate.set()
    await asyncio.wait_for(drain, 5)
    assert sorted(done) == sorted(plan)
    # once drained, every file is finished and on disk, without waiting any further
    assert s.finished() == [(fi, digest_of(study, fi)) for fi in (0, 1, 4)]
    for fi in (0, 1, 4):
        assert (s.dir / f"{fi}.part").read_bytes() == data(study, fi)


async def test_drain_reports_a_disk_error(harness: Harness, study: StudyScan) -> None:
    s = harness.make(study.manifest)
    (s.dir / "4.part").symlink_to("/dev/full")
    await write_file(s, study, 4)
    with pytest.raises(TransferError) as info:
        await s.drain()
    assert "No space left on device" in info.value.message
    # a file that failed to write has no digest: finished() says why instead
    with pytest.raises(TransferError) as again:
        s.finished()
    assert again.value.message == info.value.message


# -- the identity read from the first chunk ------------------------------------------------------------


async def test_the_identity_read_from_the_first_chunk_is_used_for_placing(
    harness: Harness, study: StudyScan, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = study.manifest
    from_file: list[Path] = []
    heads: list[tuple[int, int, int]] = []
    real_head = staging_module.identity_from_head

    def head_spy(head: Any, size: int) -> Any:
        heads.append((len(head), size, threading.get_ident()))
        return real_head(head, size)

    def file_reader(path: Any) -> Any:
        from_file.append(Path(path))
        raise AssertionError("the file was read again for its identity")

    monkeypatch.setattr(staging_module, "identity_from_head", head_spy)
    monkeypatch.setattr(staging_module, "read_identity_of_verified", file_reader)
    s = harness.make(m)
    for fi in range(5):
        await write_file(s, study, fi)
    await s.drain()
    for fi, digest in s.finished():
        assert digest == m.instances[fi].digest
        s.verified(fi)
    await s.sync()
    assert from_file == []
    assert (s.placed, s.failures) == (5, {})
    assert sorted(harness.placed) == [0, 1, 2, 3, 4]
    for fi in range(5):
        assert final_path(harness.out, m, fi).read_bytes() == data(study, fi)
    # read once per file, from its first chunk only, on a write thread
    sizes = [m.instances[fi].size for fi in range(5)]
    # (two write threads: in any order between files)
    assert sorted((n, size) for n, size, _ in heads) == sorted((min(CHUNK, z), z) for z in sizes)
    assert threading.get_ident() not in {t for _, _, t in heads}


async def test_without_an_identity_from_the_head_the_file_is_read(
    harness: Harness, study: StudyScan, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = study.manifest
    from_file: list[Path] = []

    def file_reader(path: Any) -> Any:
        from_file.append(Path(path))
        return read_identity_of_verified(path)

    monkeypatch.setattr(staging_module, "identity_from_head", lambda head, size: None)
    monkeypatch.setattr(staging_module, "read_identity_of_verified", file_reader)
    s = harness.make(m)
    for fi in (0, 4):
        await write_file(s, study, fi)
        s.verified(fi)
    await s.settle()
    assert from_file == [s.dir / "0.part", s.dir / "4.part"]
    assert harness.placed == [0, 4] and s.failures == {}
    assert final_path(harness.out, m, 4).read_bytes() == data(study, 4)


@pytest.mark.parametrize("head_identity", [True, False], ids=["from-head", "from-file"])
async def test_a_file_naming_another_instance_is_refused_at_placing(
    harness: Harness, study: StudyScan, monkeypatch: pytest.MonkeyPatch, head_identity: bool
) -> None:
    m = study.manifest
    assert m.instances[0].size == m.instances[1].size
    from_file: list[Path] = []

    def file_reader(path: Any) -> Any:
        from_file.append(Path(path))
        return read_identity_of_verified(path)

    monkeypatch.setattr(staging_module, "read_identity_of_verified", file_reader)
    if not head_identity:
        monkeypatch.setattr(staging_module, "identity_from_head", lambda head, size: None)
    s = harness.make(m)
    await write_file(s, study, 0, content=data(study, 1))  # instance 1's bytes under index 0
    await write_file(s, study, 2)
    await s.drain()
    assert s.finished() == [(0, digest_of(study, 1)), (2, digest_of(study, 2))]
    s.verified(0)  # as if the signed manifest had promised these bytes
    s.verified(2)
    await s.settle()

    uid = m.instances[0].sop_instance_uid
    assert s.failures == {
        0: f"instance {uid}: its DICOM header names another instance than the manifest"
    }
    assert harness.placed == [2] and s.placed == 1
    assert not final_path(harness.out, m, 0).exists()
    assert not (s.dir / "0.part").exists()
    assert from_file == ([] if head_identity else [s.dir / "0.part", s.dir / "2.part"])


# -- chunks of a file queued after one of its chunks failed to open -----------------------------------
#
# The driver (transfer/receiving.py) queues every SealedChunk as it arrives and learns of a failed
# one only later, from finished(): by then the same file's next chunks are usually queued too.
# The write thread must drop them: the part keeps exactly the chunks before the failed one.


async def test_an_unreadable_first_chunk_is_not_reported_as_a_disk_error(
    harness: Harness, study: StudyScan
) -> None:
    s = harness.make(study.manifest)
    pieces = chunks_of(data(study, 0))
    await s.write(0, 0, unreadable(), False, file_digest.hasher())
    await s.write(0, 1, sealed(pieces[1]), False)
    await s.write(0, 2, sealed(pieces[2]), True)
    # not a disk error ("could not write … free some space"), which drain() and write() would
    # raise before the driver asks finished(): the person must hear that a chunk was altered
    await s.drain()
    with pytest.raises(ChunkUnreadable) as info:
        s.finished()
    assert (info.value.file_index, info.value.chunk_index) == (0, 0)
    await s.write(4, 0, sealed(data(study, 4)), True, file_digest.hasher())


async def test_chunks_after_an_unreadable_one_are_not_kept_in_its_place(
    harness: Harness,
) -> None:
    from tests.protocol.helpers import make_manifest

    content = random.Random(5).randbytes(5 * CHUNK - 480)  # five chunks, four of them full
    m = make_manifest([content], chunk_size=CHUNK)
    s = harness.make(m)
    pieces = chunks_of(content)
    assert len(pieces) == m.chunk_count(0) == 5
    for ci, piece in enumerate(pieces):
        fn = unreadable() if ci == 1 else sealed(piece)
        await s.write(0, ci, fn, ci == 4, file_digest.hasher() if ci == 0 else None)
    await s.drain()
    with pytest.raises(ChunkUnreadable):
        s.finished()
    # the connection was lost before the driver asked finished(): ReceiverRun keeps the staging
    # folder for a resume, which starts from what held_chunks finds there
    await harness.close(s, remove_staging=False)
    have, prefix, _ = staging_module.held_chunks(harness.out, s.dir, m)
    # today: the part is chunks 0, 2, 3, 4 back to back; held_chunks counts three whole chunks
    # and hashes them as if they were 0, 1, 2, so the resumed file can never verify
    for fi, n in have.items():
        assert prefix[fi].hexdigest() == file_digest.of_bytes(content[: n * CHUNK])


# -- the destination changing under the transfer ----------------------------------------------------


async def test_a_series_folder_removed_meanwhile_is_made_again(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    same = [
        i
        for i in range(len(m.instances))
        if m.instances[i].series_instance_uid == m.instances[0].series_instance_uid
    ]
    assert len(same) >= 2
    first, second = same[:2]
    s = harness.make(m)
    await write_file(s, study, first)
    s.verified(first)
    await s.settle()
    folder = final_path(harness.out, m, first).parent
    shutil.rmtree(folder)  # say, an import service took the series away
    await write_file(s, study, second)
    s.verified(second)
    await s.settle()
    assert final_path(harness.out, m, second).read_bytes() == data(study, second)
    assert s.failures == {}


async def test_a_symbolic_link_in_an_instance_place_is_not_taken_for_it(
    harness: Harness, study: StudyScan, tmp_path: Path
) -> None:
    m = study.manifest
    s = harness.make(m)
    elsewhere = tmp_path / "elsewhere.dcm"
    elsewhere.write_bytes(data(study, 4))  # the very bytes, but outside the destination
    target = final_path(harness.out, m, 4)
    target.parent.mkdir(parents=True)
    target.symlink_to(elsewhere)
    await write_file(s, study, 4)
    s.verified(4)
    await s.settle()
    uid = m.instances[4].sop_instance_uid
    assert s.failures == {
        4: f"instance {uid}: a different file with this SOP Instance UID is already in the "
        "destination; it was left as it was"
    }
    assert target.is_symlink() and elsewhere.read_bytes() == data(study, 4)
