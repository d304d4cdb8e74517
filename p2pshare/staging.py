"""The receiver's disk side: stage chunks, and move a file into place only once it is verified.

All disk work for one transfer runs, in order, on one worker thread, so the event loop keeps
reading and decrypting while the previous chunk is written (file writes, hashing and libsodium
all release the GIL). At most ``max_pending`` operations are queued; the loop waits beyond that,
so memory stays bounded whatever the study size.

A file goes ``<staging>/<index>.part`` → checked (hash already matched in the protocol session;
here its DICOM header must name the instance and study the manifest promised) → renamed to
``<out>/<study UID>/<series UID>/<SOP UID>.dcm``. Nothing else is ever written below ``out``.
Durability: each file's data is flushed (``fdatasync``) on the disk thread before its rename, so
a file under its final name is always complete on disk; the folders are synced once before the
receipt, so the receipt never promises a file a crash could still take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from p2pshare.dicom.verify import read_identity
from p2pshare.errors import DicomError, TransferError
from p2pshare.manifest import Manifest


class Staging:
    def __init__(
        self,
        out_dir: Path,
        staging_dir: Path,
        manifest: Manifest,
        on_placed: Callable[[int], None],
        max_pending: int = 16,
    ) -> None:
        self.out_dir = out_dir
        self.dir = staging_dir
        self.manifest = manifest
        self.placed = 0
        self.failures: dict[int, str] = {}
        self._root = out_dir.resolve()
        self._on_placed = on_placed
        self._max = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pshare-disk")
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._fh: IO[bytes] | None = None  # touched only on the worker thread
        self._error: BaseException | None = None
        self._dirs: set[Path] = set()  # folders that received files (worker thread only)
        staging_dir.mkdir(parents=True, exist_ok=True)

    # -- called on the event loop ---------------------------------------------------------------

    async def write(self, file_index: int, chunk_index: int, data: bytes | bytearray) -> None:
        await self._submit(self._write_sync, file_index, chunk_index, data)

    async def verified(self, file_index: int) -> None:
        fut = await self._submit(self._place_sync, file_index)
        fut.add_done_callback(lambda f: self._placed_cb(file_index, f))

    async def rejected(self, file_index: int, reason: str) -> None:
        self.failures[file_index] = reason
        await self._submit(self._discard_sync, file_index)

    async def settle(self) -> None:
        """Wait for every queued operation; raise if the disk failed."""
        while self._pending:
            await asyncio.wait([self._pending.popleft()])
        self._raise_if_failed()

    async def sync(self) -> None:
        """Make the renames durable too (once, before the receipt)."""
        await self.settle()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._sync_dirs)

    async def close(self, *, remove_staging: bool) -> None:
        with contextlib.suppress(BaseException):
            await self.settle()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close_sync)
        self._pool.shutdown(wait=False)
        if remove_staging:
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.dir.parent.rmdir()

    async def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        self._raise_if_failed()
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        fut.add_done_callback(self._failed_cb)
        self._pending.append(fut)
        while len(self._pending) > self._max:
            await asyncio.wait([self._pending.popleft()])
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        return fut

    def _failed_cb(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None and self._error is None:
            self._error = fut.exception()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc = self._error
            raise TransferError(
                f"could not write to {self.out_dir}: {getattr(exc, 'strerror', None) or exc}; "
                f"free some space or choose another --out, then ask for the study again"
            ) from exc

    def _placed_cb(self, file_index: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        problem = fut.result()
        if problem:
            uid = self.manifest.instances[file_index].sop_instance_uid
            self.failures[file_index] = f"instance {uid}: {problem}"
        else:
            self.placed += 1
            self._on_placed(file_index)

    # -- on the worker thread -------------------------------------------------------------------

    def _part(self, file_index: int) -> Path:
        return self.dir / f"{file_index}.part"

    def _close_sync(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _write_sync(self, file_index: int, chunk_index: int, data: bytes | bytearray) -> None:
        if chunk_index == 0:
            self._close_sync()
            self._fh = open(self._part(file_index), "wb")  # noqa: SIM115 - spans calls
        assert self._fh is not None
        self._fh.write(data)

    def _discard_sync(self, file_index: int) -> None:
        self._close_sync()
        self._part(file_index).unlink(missing_ok=True)

    def _place_sync(self, file_index: int) -> str | None:
        if self._fh is not None:
            self._fh.flush()
            os.fdatasync(self._fh.fileno())
        self._close_sync()
        inst = self.manifest.instances[file_index]
        part = self._part(file_index)
        final = self.out_dir / inst.relpath(self.manifest.study_instance_uid)
        problem = self._check(part, final, inst.sop_instance_uid)
        if problem:
            part.unlink(missing_ok=True)
            return problem
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        self._dirs.update((final.parent, final.parent.parent))
        return None

    def _sync_dirs(self) -> None:
        for d in sorted(self._dirs | {self.out_dir}):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _check(self, part: Path, final: Path, sop_uid: str) -> str | None:
        if self._root not in final.resolve().parents:
            return "its path would leave the destination folder"
        try:
            ident = read_identity(part)
        except DicomError as exc:
            return f"it is not a readable DICOM file ({exc.message})"
        if ident.sop_instance_uid != sop_uid:
            return "its DICOM header names another instance than the manifest"
        if ident.study_instance_uid != self.manifest.study_instance_uid:
            return "its DICOM header names another study than the manifest"
        return None
