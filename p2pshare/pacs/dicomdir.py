"""Read the DICOMDIR index of a CD/DVD (IHE Portable Data for Imaging), folder or zip.

The files themselves are found and imported by ``scan()`` (it walks everything, so extra files
on the disc, viewer software and junk are all reported). The DICOMDIR adds what only it knows:
which instances the disc *says* it holds. Those it lists that were not imported are reported as
missing, so an incomplete or damaged disc is noticed instead of silently offered in part.

The directory records are read with pydicom; a DICOMDIR that cannot be read is itself reported
(never fatal). Only ``ReferencedFileID`` and ``ReferencedSOPInstanceUIDInFile`` are used.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from p2pshare.dicom.header import quiet_pydicom
from p2pshare.manifest import is_uid

__all__ = ["Index", "Reference", "read_indexes"]

log = logging.getLogger(__name__)

MAX_DICOMDIR_BYTES = 64 * 1024**2
MAX_DEPTH = 4


@dataclass(frozen=True)
class Reference:
    """One instance a DICOMDIR lists: its file id (as on the disc) and SOP Instance UID."""

    file_id: str
    sop_instance_uid: str


@dataclass
class Index:
    found: bool = False
    referenced: list[Reference] = field(default_factory=list)
    #: (name, reason) for DICOMDIR files that could not be read
    problems: list[tuple[str, str]] = field(default_factory=list)


def read_indexes(path: str | Path) -> Index:
    """Every DICOMDIR in a folder (up to a few levels deep) or a zip archive."""
    index = Index()
    root = Path(path)
    try:
        if root.is_dir():
            for found in _dicomdirs_in(root):
                _read(index, found.relative_to(root).as_posix(), found.read_bytes)
        elif root.is_file() and zipfile.is_zipfile(root):
            with zipfile.ZipFile(root) as archive:
                for info in archive.infolist():
                    if info.filename.rsplit("/", 1)[-1].upper() == "DICOMDIR":
                        if info.file_size > MAX_DICOMDIR_BYTES:
                            index.problems.append((info.filename, "DICOMDIR too large"))
                            continue
                        _read(index, info.filename, functools.partial(archive.read, info))
    except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError):
        index.problems.append((root.name, "DICOMDIR unreadable: read error"))
    return index


def _dicomdirs_in(root: Path) -> list[Path]:
    out: list[Path] = []
    base = len(root.parts)
    for folder, dirs, files in os.walk(root):
        if len(Path(folder).parts) - base >= MAX_DEPTH:
            dirs[:] = []
        dirs.sort()
        out.extend(Path(folder) / f for f in sorted(files) if f.upper() == "DICOMDIR")
    return out


def _read(index: Index, name: str, read: Callable[[], bytes]) -> None:
    index.found = True
    try:
        data = read()
        with quiet_pydicom():
            ds = dcmread(io.BytesIO(data), force=True)
            if "DirectoryRecordSequence" not in ds:
                raise ValueError("no directory records")
            refs = [_reference(r) for r in ds.DirectoryRecordSequence]
    except Exception:  # noqa: BLE001 - hostile input: pydicom raises all sorts on bad bytes
        index.problems.append((name, "DICOMDIR unreadable: damaged index"))
        return
    prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    for ref in refs:
        if ref is not None:
            index.referenced.append(Reference(prefix + ref.file_id, ref.sop_instance_uid))
    log.info("DICOMDIR lists %d instances", sum(1 for r in refs if r is not None))


def _reference(record: Dataset) -> Reference | None:
    sop = str(record.get("ReferencedSOPInstanceUIDInFile", "") or "").strip()
    file_id = record.get("ReferencedFileID")
    if not is_uid(sop) or file_id is None:
        return None
    parts = [file_id] if isinstance(file_id, str) else [str(p) for p in file_id]
    return Reference("/".join(parts), sop)
