"""The receiver's disk side: stage chunks, and move a file into place only once it is verified.

All per-byte work for one transfer runs off the event loop, so the loop keeps reading the network
while earlier chunks are opened, hashed and written (OpenSSL, BLAKE3 and file writes release the
GIL):

* two **write threads** take alternate files. For each chunk, in order, a write thread opens
  (decrypts and authenticates) it, feeds it to the file's hasher, reads the file's identifying
  UIDs from the first chunk while it is in memory, and appends it to ``<staging>/<index>.part``;
  when a file's last chunk is written its digest goes back to the protocol session, which
  decides whether the file is verified;
* a **commit thread** takes every file verified since its last round, makes their
  data durable with one ``syncfs`` for the whole batch, checks that each file's DICOM header
  names the instance and study the manifest promised, and links it to
  ``<out>/<study UID>/<series UID>/<SOP UID>.dcm``: never over a file already there (the same
  bytes are accepted as already delivered; different bytes are refused and left alone).

The staging folder is private (0700, files 0600) and removed when the transfer ends, whatever
the outcome; placed instances are readable by the node's group (0640).

So a file under its final name is always verified and complete on disk, and batching the flush
(rather than one ``fdatasync`` per file, each waiting for a journal commit) lets the disk work
while the network does: batches grow by themselves when the disk is the slower of the two. The
folders are synced once more before the receipt, so the receipt never promises a file that a
crash could still take back. Nothing else is ever written below ``out``.

At most ``max_pending`` writes are queued; the loop waits beyond that, so memory stays bounded
whatever the study size.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from p2pshare import digest as file_digest
from p2pshare.dicom.verify import Identity, identity_from_head, read_identity_of_verified
from p2pshare.errors import CryptoError, DicomError, TransferError
from p2pshare.manifest import Manifest

_libc = ctypes.CDLL(None, use_errno=True)


#: Write threads per transfer: chunks are opened (decrypted), hashed and written there, off the
#: event loop; two let one file's disk write overlap the next file's decryption.
WRITE_THREADS = 2


class ChunkUnreadable(Exception):
    """A sealed chunk failed authentication on a write thread; nothing of it was written."""

    def __init__(self, file_index: int, chunk_index: int) -> None:
        super().__init__(f"chunk {chunk_index} of file #{file_index} failed authentication")
        self.file_index = file_index
        self.chunk_index = chunk_index


class _Dropped(Exception):
    """A chunk of a file whose earlier chunk failed: not written, and the file never placed."""


#: Placed instances: readable by the node's group (e.g. a PACS import service), nobody else.
PLACED_MODE = 0o640


def syncfs(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (Linux ``syncfs``)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if getattr(_libc, "syncfs", None) is None or _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class Staging:
    def __init__(
        self,
        out_dir: Path,
        staging_dir: Path,
        manifest: Manifest,
        on_placed: Callable[[int], None],
        max_pending: int = 32,
        already_placed: int = 0,
    ) -> None:
        self.out_dir = out_dir
        self.dir = staging_dir
        self.manifest = manifest
        #: instances in place, including those placed by an earlier connection (resume)
        self.placed = already_placed
        self.failures: dict[int, str] = {}
        self._root = out_dir.resolve()
        self._on_placed = on_placed
        self._max = max_pending
        # A file's chunks all go to the same write thread, in order; files alternate.
        self._writers = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pshare-write")
            for _ in range(WRITE_THREADS)
        ]
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pshare-commit")
        self._writes: deque[asyncio.Future[Any]] = deque()
        #: every chunk's write, in stream order, until finished() has reported it
        self._results: deque[tuple[int, bool, asyncio.Future[str | None]]] = deque()
        self._file_written: dict[int, asyncio.Future[Any]] = {}
        self._ready: list[tuple[int, asyncio.Future[Any]]] = []
        self._commit: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        #: per file being written: its part file's descriptor and hasher (its write thread only)
        self._open: dict[int, tuple[int, Any]] = {}
        #: files with a chunk that failed to open: their later chunks are dropped, so the part
        #: holds exactly the chunks before it (its write thread only)
        self._spoilt: set[int] = set()
        #: identities read from first chunks in memory (write threads set, commit thread pops)
        self._idents: dict[int, Identity] = {}
        self._dirs: set[Path] = set()  # commit thread only
        #: destination folders checked (inside ``out`` or not), and those created (commit thread)
        self._dir_ok: dict[Path, bool] = {}
        self._made: set[Path] = set()
        # Patient data: the staging area is private to the node's user.
        staging_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging_dir.mkdir(mode=0o700, exist_ok=True)

    # -- called on the event loop ---------------------------------------------------------------

    async def write(
        self,
        file_index: int,
        chunk_index: int,
        data: bytes | bytearray | Callable[[], bytes | bytearray],
        last: bool,
        hasher: Any = None,
    ) -> None:
        """Queue one chunk for the file's write thread, which appends it to the file's part.

        ``data`` is the plaintext, or a function the write thread calls for it (opening a
        sealed chunk there, off the event loop); a :class:`p2pshare.errors.CryptoError` from
        it is reported by :meth:`finished` as :class:`ChunkUnreadable`, and nothing of that
        chunk is written. ``hasher``, given with a file's first chunk, is fed every chunk of
        the file; :meth:`finished` then reports its digest. Waits while ``max_pending`` chunks
        are queued, so memory stays bounded.
        """
        self._raise_if_failed()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(
            self._writers[file_index % WRITE_THREADS],
            self._write_sync,
            file_index,
            chunk_index,
            data,
            last,
            hasher,
        )
        fut.add_done_callback(self._failed_cb)
        self._writes.append(fut)
        self._results.append((file_index, last, fut))
        if last:
            self._file_written[file_index] = fut
        while len(self._writes) > self._max:
            await self._oldest_write()
        while self._writes and self._writes[0].done():
            self._writes.popleft()

    async def _oldest_write(self) -> None:
        """Wait for the oldest queued write, and only then forget it: a cancelled wait must not
        lose a write that is still running (closing waits for every write)."""
        oldest = self._writes[0]
        await asyncio.wait([oldest])
        if self._writes and self._writes[0] is oldest:
            self._writes.popleft()

    def finished(self) -> list[tuple[int, str | None]]:
        """Files whose last chunk is now written, each with its digest (None for a file written
        without a hasher), in stream order and never past a chunk that failed: files before it
        are reported first, and the next call raises.

        Raises:
            ChunkUnreadable: a sealed chunk failed to open (nothing of it was written).
            TransferError: a chunk could not be written (the disk failed).
        """
        out: list[tuple[int, str | None]] = []
        while self._results and self._results[0][2].done():
            fi, last, fut = self._results[0]
            if fut.cancelled() or fut.exception() is not None:
                if out:
                    break
                exc = fut.exception() if not fut.cancelled() else None
                if isinstance(exc, ChunkUnreadable):
                    raise exc
                raise self._disk_error(exc or asyncio.CancelledError())
            self._results.popleft()
            if last:
                out.append((fi, fut.result()))
        return out

    async def drain(self) -> None:
        """Wait for every queued chunk to be written (then ask :meth:`finished`)."""
        while self._writes:
            await self._oldest_write()
        self._raise_if_failed()

    def verified(self, file_index: int) -> None:
        """Queue for placing a file whose last chunk is written (or queued) and whose digest
        matched."""
        self._ready.append((file_index, self._file_written.pop(file_index)))
        if self._commit is None or self._commit.done():
            self._commit = asyncio.ensure_future(self._commit_rounds())

    async def rejected(self, file_index: int, reason: str) -> None:
        self.failures[file_index] = reason
        self._file_written.pop(file_index, None)
        fut = asyncio.get_running_loop().run_in_executor(
            self._writers[file_index % WRITE_THREADS], self._discard_sync, file_index
        )
        fut.add_done_callback(self._failed_cb)
        self._writes.append(fut)

    async def settle(self) -> None:
        """Wait until every write and every queued placement is done; raise if the disk failed."""
        while self._writes:
            await self._oldest_write()
        while self._commit is not None and not self._commit.done():
            await asyncio.wait([self._commit])
        self._raise_if_failed()

    async def sync(self) -> None:
        """Make the renames durable too (once, before the receipt)."""
        await self.settle()
        await asyncio.get_running_loop().run_in_executor(self._committer, self._sync_dirs)

    async def close(self, *, remove_staging: bool) -> None:
        with contextlib.suppress(BaseException):
            await self.settle()
        # Every write is done or failed (settle waited): close what a cut left open. A disk error
        # here was already reported by write()/settle(): closing must not hide it.
        loop = asyncio.get_running_loop()
        for k, writer in enumerate(self._writers):
            # on the writer itself, behind any write still running
            with contextlib.suppress(OSError):
                await loop.run_in_executor(writer, self._close_sync, k)
        for writer in self._writers:
            writer.shutdown(wait=False)
        self._committer.shutdown(wait=False)
        if remove_staging:
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.dir.parent.rmdir()

    async def _commit_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while self._ready:
            batch, self._ready = self._ready, []
            await asyncio.wait([written for _, written in batch])
            indices = [fi for fi, written in batch if written.exception() is None]
            try:
                problems = await loop.run_in_executor(self._committer, self._commit_sync, indices)
            except Exception as exc:  # the disk failed; settle() reports it to the person
                if self._error is None:
                    self._error = exc
                return
            for fi, problem in zip(indices, problems, strict=True):
                if problem:
                    uid = self.manifest.instances[fi].sop_instance_uid
                    self.failures[fi] = f"instance {uid}: {problem}"
                else:
                    self.placed += 1
                    self._on_placed(fi)

    def _failed_cb(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or (exc := fut.exception()) is None:
            return
        if not isinstance(exc, ChunkUnreadable | _Dropped) and self._error is None:
            self._error = exc  # a chunk that failed to open is finished()'s to report

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._disk_error(self._error)

    def _disk_error(self, exc: BaseException) -> TransferError:
        error = TransferError(
            f"could not write to {self.out_dir}: {getattr(exc, 'strerror', None) or exc}; "
            f"free some space or choose another --out, then ask for the study again"
        )
        error.__cause__ = exc
        return error

    # -- on the write thread --------------------------------------------------------------------

    def _part(self, file_index: int) -> Path:
        return self.dir / f"{file_index}.part"

    def _close_sync(self, writer: int) -> None:
        """Close what a cut left open on write thread ``writer`` (run on that thread)."""
        for fi in [fi for fi in self._open if fi % WRITE_THREADS == writer]:
            fd, _ = self._open.pop(fi)
            os.close(fd)

    def _write_sync(
        self,
        file_index: int,
        chunk_index: int,
        data: bytes | bytearray | Callable[[], bytes | bytearray],
        last: bool,
        hasher: Any,
    ) -> str | None:
        if file_index in self._spoilt:
            raise _Dropped(file_index)  # finished() stops at the chunk that failed, before this
        if callable(data):
            try:
                data = data()
            except CryptoError:
                self._spoilt.add(file_index)
                fd, _ = self._open.pop(file_index, (-1, None))
                if fd >= 0:
                    os.close(fd)
                raise ChunkUnreadable(file_index, chunk_index) from None
        fd, file_hasher = self._open.pop(file_index, (-1, None))
        if hasher is not None:
            file_hasher = hasher
        try:
            if fd < 0:
                if chunk_index == 0:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                    fd = os.open(self._part(file_index), flags, 0o600)
                else:
                    # Resumed part-way: the held chunks are on disk (checked by resume_state).
                    fd = os.open(self._part(file_index), os.O_WRONLY, 0o600)
                    os.lseek(fd, chunk_index * self.manifest.chunk_size, os.SEEK_SET)
            if file_hasher is not None:
                file_hasher.update(data)
            if chunk_index == 0:
                ident = identity_from_head(data, self.manifest.instances[file_index].size)
                if ident is not None:
                    self._idents[file_index] = ident
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            # The file's later chunks are dropped: its part keeps whole chunks before this one
            # and what this one tore (a resume cuts a torn chunk off), never a gap.
            self._spoilt.add(file_index)
            if fd >= 0:
                os.close(fd)
            raise
        if not last:
            self._open[file_index] = (fd, file_hasher)
            return None
        os.close(fd)
        return None if file_hasher is None else str(file_hasher.hexdigest())

    def resume_state(self) -> tuple[dict[int, int], dict[int, Any], int]:
        """See :func:`held_chunks` (run it in a thread)."""
        return held_chunks(self.out_dir, self.dir, self.manifest)

    def _discard_sync(self, file_index: int) -> None:
        fd, _ = self._open.pop(file_index, (-1, None))
        if fd >= 0:
            os.close(fd)
        self._part(file_index).unlink(missing_ok=True)

    # -- on the commit thread -------------------------------------------------------------------

    def _commit_sync(self, indices: list[int]) -> list[str | None]:
        if not indices:
            return []
        syncfs(self.dir)
        return [self._place_sync(fi) for fi in indices]

    def _place_sync(self, file_index: int) -> str | None:
        inst = self.manifest.instances[file_index]
        part = self._part(file_index)
        final = self.out_dir / inst.relpath(self.manifest.study_instance_uid)
        problem = self._check(file_index, part, final, inst.sop_instance_uid)
        if problem:
            part.unlink(missing_ok=True)
            return problem
        self._make_folder(final.parent)
        os.chmod(part, PLACED_MODE)
        try:
            # A link, not a rename: it never replaces a file already there.
            try:
                os.link(part, final)
            except FileNotFoundError:
                # its folder was removed meanwhile (say, by an import service): check it again
                self._dir_ok.pop(final.parent, None)
                self._made.discard(final.parent)
                if not self._folder_inside(final.parent):
                    part.unlink(missing_ok=True)
                    return "its path would leave the destination folder"
                self._make_folder(final.parent)
                os.link(part, final)
        except FileExistsError:
            # a symbolic link in its place is never taken for the instance
            same = (
                not final.is_symlink()
                and file_digest.of_file(final, self.manifest.digest_algorithm) == inst.digest
            )
            part.unlink()
            if not same:
                return (
                    "a different file with this SOP Instance UID is already in the destination; "
                    "it was left as it was"
                )
        else:
            part.unlink()
        self._dirs.update((final.parent, final.parent.parent))
        return None

    def _folder_inside(self, folder: Path) -> bool:
        """Whether ``folder`` resolves inside the destination (checked once per folder; the
        destination belongs to the node, so this guards how paths are built, not a local
        user who may write there)."""
        ok = self._dir_ok.get(folder)
        if ok is None:
            resolved = folder.resolve()
            ok = self._dir_ok[folder] = resolved == self._root or self._root in resolved.parents
        return ok

    def _make_folder(self, folder: Path) -> None:
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    def _sync_dirs(self) -> None:
        # Every folder of the study, not only those this connection placed into: after a
        # resume, files placed by an earlier connection are promised by this receipt too.
        m = self.manifest
        for inst in m.instances:
            series = (self.out_dir / inst.relpath(m.study_instance_uid)).parent
            if series not in self._dirs and series.is_dir():
                self._dirs.update((series, series.parent))
        for d in sorted(self._dirs | {self.out_dir}):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _check(self, file_index: int, part: Path, final: Path, sop_uid: str) -> str | None:
        # The file name is a sanitised UID (uid_filename: never a separator, "." or ".."), so
        # checking its folder once, before creating it, keeps every file of the series inside.
        if not self._folder_inside(final.parent) or final.name in ("", ".", ".."):
            return "its path would leave the destination folder"
        try:
            # read from the first chunk as it was written, else (rarely) from the file
            ident = self._idents.pop(file_index, None) or read_identity_of_verified(part)
        except DicomError as exc:
            return f"it is not a readable DICOM file ({exc.message})"
        if ident.sop_instance_uid != sop_uid:
            return "its DICOM header names another instance than the manifest"
        if ident.study_instance_uid != self.manifest.study_instance_uid:
            return "its DICOM header names another study than the manifest"
        return None


def held_chunks(
    out_dir: Path, staging_dir: Path, m: Manifest
) -> tuple[dict[int, int], dict[int, Any], int]:
    """What an earlier connection left (slow: run it in a thread, before reconnecting): chunks
    held per file, a BLAKE3 hasher over the held part of each partial file, and how many instances
    are already placed.

    A placed instance is checked against the manifest's hash once more; a staged part counts
    only in whole chunks (a torn last write is cut off), and a part that is complete but was
    never placed keeps all but its last chunk, so that chunk comes again and the file is
    verified whole.
    """
    have: dict[int, int] = {}
    prefix: dict[int, Any] = {}
    placed = 0
    for fi, inst in enumerate(m.instances):
        final = out_dir / inst.relpath(m.study_instance_uid)
        if (
            final.is_file()
            and final.stat().st_size == inst.size
            and file_digest.of_file(final, m.digest_algorithm) == inst.digest
        ):
            have[fi] = m.chunk_count(fi)
            placed += 1
            continue
        part = staging_dir / f"{fi}.part"
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            continue
        n = min(size // m.chunk_size, m.chunk_count(fi) - 1)
        if n <= 0:
            part.unlink(missing_ok=True)
            continue
        held = n * m.chunk_size
        h = file_digest.hasher()
        with open(part, "r+b") as fh:
            fh.truncate(held)
            while block := fh.read(1 << 20):
                h.update(block)
        have[fi] = n
        prefix[fi] = h
    return have, prefix, placed
