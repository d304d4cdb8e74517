"""The receiver's disk side: chunks are staged, and only verified instances are put in place."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from p2pshare import staging as staging_module
from p2pshare.dicom.ingest import StudyScan, scan
from p2pshare.dicom.synthetic import generate_ct_study
from p2pshare.errors import TransferError
from p2pshare.manifest import Manifest
from p2pshare.staging import Staging
from tests.small_study import CHUNK, SERIES, make_small_study

TID = "00112233445566778899aabbccddeeff"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyScan:
    return make_small_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def other_study(tmp_path_factory: pytest.TempPathFactory) -> StudyScan:
    root = tmp_path_factory.mktemp("other")
    generate_ct_study(root, seed=12, series=SERIES[:1], patient_id="OTHER")
    return scan(root, chunk_size=CHUNK).study(None)


def data(study: StudyScan, index: int) -> bytes:
    return Path(study.sources[index].path).read_bytes()


def final_path(out: Path, manifest: Manifest, index: int) -> Path:
    inst = manifest.instances[index]
    return (
        out
        / manifest.study_instance_uid
        / inst.series_instance_uid
        / f"{inst.sop_instance_uid}.dcm"
    )


class Harness:
    """Builds Stagings the way the engine does and closes every one after the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.out = tmp / "out"
        self.placed: list[int] = []
        self.made: list[Staging] = []

    def make(
        self,
        manifest: Manifest,
        *,
        out: Path | None = None,
        staging_dir: Path | None = None,
        on_placed: Callable[[int], None] | None = None,
        **kw: Any,
    ) -> Staging:
        out = out or self.out
        s = Staging(
            out,
            staging_dir or out / ".p2pshare-partial" / TID,
            manifest,
            on_placed or self.placed.append,
            **kw,
        )
        self.made.append(s)
        return s

    async def close(self, s: Staging, *, remove_staging: bool) -> None:
        self.made.remove(s)
        await s.close(remove_staging=remove_staging)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    for s in h.made:
        # A close that fails after a disk error is the subject of its own test.
        with contextlib.suppress(OSError):
            await s.close(remove_staging=False)


async def send_file(s: Staging, manifest: Manifest, index: int, content: bytes) -> None:
    """Write ``content`` in the manifest's chunking for ``index``, as the receiver does."""
    count = max(1, -(-len(content) // manifest.chunk_size))
    for ci in range(count):
        piece = content[ci * manifest.chunk_size : (ci + 1) * manifest.chunk_size]
        await s.write(index, ci, piece, ci == count - 1)


async def send_verified(s: Staging, study: StudyScan, index: int) -> None:
    await send_file(s, study.manifest, index, data(study, index))
    s.verified(index)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- the good path ---------------------------------------------------------------------------------


async def test_every_verified_file_is_placed_byte_identical_under_its_uids(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    for i in range(len(m.instances)):
        await send_verified(s, study, i)
    await s.sync()

    assert sorted(harness.placed) == [0, 1, 2, 3, 4]
    assert (s.placed, s.failures) == (5, {})
    for i in range(5):
        assert final_path(harness.out, m, i).read_bytes() == data(study, i)
    assert list(s.dir.iterdir()) == []  # no .part file is left behind

    await harness.close(s, remove_staging=True)
    assert not (harness.out / ".p2pshare-partial").exists()
    # Nothing else is ever written below out.
    assert tree(harness.out) == sorted(
        str(final_path(harness.out, m, i).relative_to(harness.out)) for i in range(5)
    )
    assert [p.name for p in harness.out.iterdir()] == [m.study_instance_uid]


async def test_files_placed_in_any_order_and_one_at_a_time(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    for i in (4, 2, 0, 3, 1):
        await send_verified(s, study, i)
        await s.settle()  # one commit round per file
        assert harness.placed[-1] == i
    assert harness.placed == [4, 2, 0, 3, 1]
    assert s.placed == 5
    for i in range(5):
        assert final_path(harness.out, m, i).read_bytes() == data(study, i)


async def test_the_data_is_flushed_before_any_file_of_the_batch_is_renamed(
    harness: Harness, study: StudyScan, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = study.manifest
    calls: list[tuple[Path, list[str]]] = []

    def fake_syncfs(path: Path) -> None:
        calls.append((path, tree(harness.out / m.study_instance_uid)))

    monkeypatch.setattr(staging_module, "syncfs", fake_syncfs)
    s = harness.make(m)
    for i in range(5):
        # verified() right after each file's last chunk, without yielding to the loop, as the
        # engine does while chunks keep arriving: one batch, one flush.
        await send_file(s, m, i, data(study, i))
        s.verified(i)
    await s.settle()
    assert calls == [(s.dir, [])]
    assert s.placed == 5


async def test_settle_without_any_file_is_a_no_op(harness: Harness, study: StudyScan) -> None:
    s = harness.make(study.manifest)
    await s.settle()
    await s.sync()
    assert (s.placed, s.failures, harness.placed) == (0, {}, [])
    await harness.close(s, remove_staging=True)
    assert not s.dir.exists()


async def test_close_keeping_staging_leaves_the_partial_file_flushed(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    first = data(study, 0)[:CHUNK]
    await s.write(0, 0, first, False)
    await harness.close(s, remove_staging=False)
    assert (s.dir / "0.part").read_bytes() == first
    assert not (harness.out / m.study_instance_uid).exists()


# -- files that are not what the manifest says ---------------------------------------------------


async def test_bytes_of_another_instance_are_not_placed(harness: Harness, study: StudyScan) -> None:
    m = study.manifest
    assert m.instances[0].size == m.instances[1].size
    s = harness.make(m)
    await send_file(s, m, 0, data(study, 1))  # instance 1's bytes under index 0
    s.verified(0)
    for i in (1, 2, 3, 4):
        await send_verified(s, study, i)
    await s.sync()

    uid = m.instances[0].sop_instance_uid
    assert s.failures == {
        0: f"instance {uid}: its DICOM header names another instance than the manifest"
    }
    assert sorted(harness.placed) == [1, 2, 3, 4] and s.placed == 4
    assert not final_path(harness.out, m, 0).exists()
    assert final_path(harness.out, m, 1).read_bytes() == data(study, 1)
    assert not (s.dir / "0.part").exists()
    assert len(tree(harness.out / m.study_instance_uid)) == 4


async def test_bytes_that_are_not_dicom_are_not_placed(harness: Harness, study: StudyScan) -> None:
    m = study.manifest
    s = harness.make(m)
    junk = b"this is not a DICOM file\n" * 200
    await send_file(s, m, 2, junk)
    s.verified(2)
    await s.settle()
    reason = s.failures[2]
    assert reason.startswith(
        f"instance {m.instances[2].sop_instance_uid}: it is not a readable DICOM file ("
    )
    assert reason.endswith(")") and "Traceback" not in reason
    assert list(s.failures) == [2]
    assert harness.placed == [] and s.placed == 0
    assert not final_path(harness.out, m, 2).exists()
    assert not (s.dir / "2.part").exists()


async def test_an_instance_of_another_study_is_not_placed(
    harness: Harness, study: StudyScan
) -> None:
    m = dataclasses.replace(study.manifest, study_instance_uid="1.2.826.0.1.3680043.8.498.999")
    s = harness.make(m)
    for i in range(5):
        await send_verified(s, study, i)
    await s.settle()
    assert s.failures == {
        i: f"instance {m.instances[i].sop_instance_uid}: its DICOM header names another study "
        "than the manifest"
        for i in range(5)
    }
    assert harness.placed == [] and s.placed == 0
    assert not (harness.out / m.study_instance_uid).exists()
    assert list(s.dir.iterdir()) == []


async def test_a_file_of_another_study_under_a_known_instance_is_not_placed(
    harness: Harness, study: StudyScan, other_study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    await send_file(s, m, 0, data(other_study, 0))
    s.verified(0)
    await s.settle()
    assert s.failures == {
        0: f"instance {m.instances[0].sop_instance_uid}: its DICOM header names another "
        "instance than the manifest"
    }
    assert harness.placed == []


async def test_a_destination_that_leads_out_of_the_folder_is_refused(
    harness: Harness, study: StudyScan, tmp_path: Path
) -> None:
    m = study.manifest
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    harness.out.mkdir()
    (harness.out / m.study_instance_uid).symlink_to(elsewhere)
    s = harness.make(m)
    await send_verified(s, study, 0)
    await s.settle()
    assert s.failures == {
        0: f"instance {m.instances[0].sop_instance_uid}: its path would leave the destination "
        "folder"
    }
    assert list(elsewhere.iterdir()) == []
    assert harness.placed == []


async def test_rejected_deletes_the_partial_file(harness: Harness, study: StudyScan) -> None:
    m = study.manifest
    s = harness.make(m)
    await send_file(s, m, 0, data(study, 0))
    await s.rejected(0, "its SHA-256 does not match the manifest")
    await s.settle()
    assert s.failures == {0: "its SHA-256 does not match the manifest"}
    assert not (s.dir / "0.part").exists()
    assert not final_path(harness.out, m, 0).exists()
    assert harness.placed == [] and s.placed == 0


async def test_rejecting_a_half_written_file_then_continuing(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    await s.write(0, 0, data(study, 0)[:CHUNK], False)
    await s.rejected(0, "chunk 1 failed authentication")
    await send_verified(s, study, 1)
    await s.sync()
    assert s.failures == {0: "chunk 1 failed authentication"}
    assert harness.placed == [1]
    assert final_path(harness.out, m, 1).read_bytes() == data(study, 1)
    assert list(s.dir.iterdir()) == []


# -- disk errors ---------------------------------------------------------------------------------


def hint(out: Path, cause: str) -> str:
    return (
        f"could not write to {out}: {cause}; free some space or choose another --out, then ask "
        "for the study again"
    )


async def test_a_full_disk_surfaces_as_a_transfer_error(harness: Harness, study: StudyScan) -> None:
    m = study.manifest
    s = harness.make(m)
    os.symlink("/dev/full", s.dir / "0.part")
    await send_file(s, m, 0, data(study, 0))
    s.verified(0)
    with pytest.raises(TransferError) as info:
        await s.settle()
    assert info.value.message == hint(harness.out, "No space left on device")
    assert isinstance(info.value.__cause__, OSError)
    # Every later call says the same, instead of writing on.
    with pytest.raises(TransferError) as again:
        await s.write(1, 0, b"x", True)
    assert again.value.message == info.value.message
    assert harness.placed == [] and s.placed == 0


async def test_closing_after_a_full_disk_does_not_raise_and_removes_staging(
    harness: Harness, study: StudyScan
) -> None:
    # The engine closes the staging in a ``finally`` after the TransferError above: close must
    # not replace that readable error with a raw OSError from the half-written file.
    m = study.manifest
    s = harness.make(m)
    os.symlink("/dev/full", s.dir / "0.part")
    await send_file(s, m, 0, data(study, 0))
    with pytest.raises(TransferError):
        await s.settle()
    await harness.close(s, remove_staging=True)
    assert not s.dir.exists()


async def test_a_disk_error_surfaces_from_write(harness: Harness, study: StudyScan) -> None:
    m = study.manifest
    s = harness.make(m)
    s.dir.rmdir()
    s.dir.write_bytes(b"")  # the staging folder is gone: a file stands in its place
    raised: TransferError | None = None
    for _ in range(200):
        try:
            await s.write(0, 0, data(study, 0)[:CHUNK], False)
        except TransferError as exc:
            raised = exc
            break
        await asyncio.sleep(0.005)
    assert raised is not None, "write never reported the failed disk"
    assert raised.message == hint(harness.out, "Not a directory")
    assert raised.code == "transfer"


async def test_a_destination_that_is_a_file_surfaces_from_settle(
    harness: Harness, study: StudyScan, tmp_path: Path
) -> None:
    m = study.manifest
    out = tmp_path / "not-a-folder"
    out.write_bytes(b"someone's notes")
    s = harness.make(m, out=out, staging_dir=tmp_path / "staging")
    await send_verified(s, study, 0)
    with pytest.raises(TransferError) as info:
        await s.sync()
    assert info.value.message == hint(out, "Not a directory")
    assert harness.placed == [] and s.placed == 0
    assert out.read_bytes() == b"someone's notes"


# -- bounded memory ------------------------------------------------------------------------------


class GatedExecutor(ThreadPoolExecutor):
    """One write thread that starts nothing until the gate opens; counts what it holds."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(max_workers=1)
        self.gate = gate
        self.lock = threading.Lock()
        self.submitted = 0
        self.finished = 0
        self.most_held = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self.lock:
            self.submitted += 1
            self.most_held = max(self.most_held, self.submitted - self.finished)

        def run() -> Any:
            self.gate.wait(10)
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.finished += 1

        return super().submit(run)


async def test_no_more_than_max_pending_writes_are_held(harness: Harness, study: StudyScan) -> None:
    m = study.manifest
    gate = threading.Event()
    s = harness.make(m, max_pending=4)
    for writer in s._writers:
        writer.shutdown()
    slow = GatedExecutor(gate)
    s._writers = [slow] * len(s._writers)
    chunk = data(study, 4)
    returned = 0
    queued_after_write: list[int] = []

    async def producer() -> None:
        nonlocal returned
        for _ in range(40):
            await s.write(4, 0, chunk, True)  # the same one-chunk file, over and over
            returned += 1
            queued_after_write.append(len(s._writes))

    task = asyncio.create_task(producer())
    await asyncio.sleep(0.1)
    # The disk is stuck: the producer waits, holding one chunk on the write thread and
    # max_pending queued behind it, and no more.
    assert not task.done()
    assert (slow.submitted, returned) == (5, 4)
    gate.set()
    await asyncio.wait_for(task, 5)
    await s.settle()
    assert returned == 40 and slow.finished == 40
    assert slow.most_held == 5
    assert max(queued_after_write) <= 4
    assert (s.dir / "4.part").read_bytes() == chunk


# -- never over a file already there; private while staged ------------------------------------------


async def test_a_file_already_in_place_is_never_replaced(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    target = final_path(harness.out, m, 0)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"an earlier, different file with the same SOP Instance UID")
    s = harness.make(m)
    await send_verified(s, study, 0)
    await s.sync()
    assert target.read_bytes() == b"an earlier, different file with the same SOP Instance UID"
    assert s.placed == 0 and "already in the destination" in s.failures[0]
    assert list(s.dir.iterdir()) == []


async def test_the_same_instance_delivered_twice_is_accepted(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    target = final_path(harness.out, m, 1)
    target.parent.mkdir(parents=True)
    target.write_bytes(data(study, 1))
    s = harness.make(m)
    await send_verified(s, study, 1)
    await s.sync()
    assert (s.placed, s.failures) == (1, {})
    assert target.read_bytes() == data(study, 1)


async def test_staged_data_is_private_and_placed_files_group_readable(
    harness: Harness, study: StudyScan
) -> None:
    m = study.manifest
    s = harness.make(m)
    assert s.dir.stat().st_mode & 0o777 == 0o700
    assert s.dir.parent.stat().st_mode & 0o777 == 0o700
    await send_file(s, m, 0, data(study, 0)[: CHUNK * 2])  # two of three chunks: still staged
    await s.settle()
    assert (s.dir / "0.part").stat().st_mode & 0o777 == 0o600
    await send_verified(s, study, 4)
    await s.sync()
    assert final_path(harness.out, m, 4).stat().st_mode & 0o777 == staging_module.PLACED_MODE
