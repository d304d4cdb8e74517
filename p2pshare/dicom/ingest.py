"""Find the DICOM instances in what the user hands us, and describe them as a manifest.

In an emergency the sender gets whatever the PACS export, the CD or the colleague produced: a
folder tree with a DICOMDIR and viewer software, a zip with nested folders, old files without
the 128-byte preamble, ``.DS_Store`` and ``Thumbs.db``, the same image exported twice. ``scan``
must turn that into one clean, verifiable list per study without ever crashing on a bad file:
everything it cannot use becomes a :class:`Skipped` entry with a plain-words reason, so the
person at the keyboard can see why "412 of 415 files" are offered.

Files are moved byte for byte, never re-encoded: the manifest records the size and BLAKE3 digest of
each whole file as it is on disk (or in the zip), and where it came from (:class:`Source`) so
the transfer can stream the same bytes later. Only the header is parsed (by
:mod:`p2pshare.dicom.header`). A file up to :data:`WHOLE_READ_BYTES` (any ordinary slice) is
read once, parsed from memory and hashed from the same bytes; a larger one is parsed from the
file and hashed in 1 MiB reads, so memory stays flat whatever the study size. File names are
shown to the user but never logged (folders are often named after the patient): this module logs
UIDs and counts only.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from p2pshare import digest as file_digest
from p2pshare.dicom.header import REASON_DICOMDIR, REASON_EMPTY, Header, parse_header, quiet_pydicom
from p2pshare.errors import ConfigError, DicomError, InputError, StudyChoiceError
from p2pshare.manifest import (
    MAX_CHUNK,
    MAX_FILE_BYTES,
    MAX_INSTANCES,
    MAX_STUDY_BYTES,
    MIN_CHUNK,
    Instance,
    Manifest,
    Series,
)

__all__ = ["ScanReport", "Skipped", "Source", "StudyScan", "scan"]

logger = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024

REASON_SYMLINK = "symbolic link"
REASON_SPECIAL = "not a regular file"
REASON_TOO_LARGE = "too large: more than 4 GiB"


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Source:
    """Where one instance's bytes come from: a file, or a member of a zip archive."""

    path: str
    member: str | None = None

    def open(self) -> BinaryIO:
        """Open the bytes for reading. Raises :class:`InputError` if they are gone."""
        try:
            if self.member is None:
                return open(self.path, "rb")  # noqa: SIM115 - the caller closes it
            archive = zipfile.ZipFile(self.path)
            try:
                return cast(BinaryIO, archive.open(self.member))
            finally:
                # The member keeps the archive's file open until the member itself is closed.
                archive.close()
        except (OSError, KeyError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not found"
            raise InputError(
                f"a file of the study can no longer be read ({detail}): it was moved, changed "
                "or deleted after the scan; scan the study again"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "member": self.member}

    @classmethod
    def from_json(cls, d: object) -> Source:
        if not isinstance(d, dict):
            raise InputError("a stored file source is not an object")
        path, member = d.get("path"), d.get("member")
        if not isinstance(path, str) or not path:
            raise InputError("a stored file source has no path")
        if member is not None and not isinstance(member, str):
            raise InputError("a stored file source has an invalid zip member name")
        return cls(path=path, member=member)


@dataclass(frozen=True)
class Skipped:
    """A file that is not offered, and why (shown to the user only; never logged)."""

    name: str
    reason: str

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0].strip()


@dataclass(frozen=True)
class StudyScan:
    """One study ready to offer: its manifest and, aligned with it, where each file is."""

    manifest: Manifest
    sources: tuple[Source, ...]

    def summary(self) -> dict[str, object]:
        m = self.manifest
        return {
            "uid": m.study_instance_uid,
            "description": m.study_description,
            "date": m.study_date,
            "modalities": m.modalities,
            "instances": len(m.instances),
            "bytes": m.total_bytes,
        }


@dataclass(frozen=True)
class ScanReport:
    """Everything one scan found: studies, skipped files, ignored identical duplicates."""

    studies: tuple[StudyScan, ...]
    skipped: tuple[Skipped, ...]
    duplicates: int
    #: The path that was scanned, as the user gave it (for messages to that user).
    root: str = ""

    def reasons(self) -> dict[str, int]:
        """How many files were skipped per reason (the reason text before any ':')."""
        return dict(Counter(s.category for s in self.skipped).most_common())

    def study(self, uid: str | None) -> StudyScan:
        """The one study to offer: the only one, or the one with Study Instance UID ``uid``."""
        where = self.root or "the selection"
        if not self.studies:
            if not self.skipped:
                raise InputError(
                    f"no DICOM images found in {where}: it holds no files. Choose the folder, "
                    "zip archive or file that holds the study"
                )
            reasons = ", ".join(f"{n} {r}" for r, n in self.reasons().items())
            count = len(self.skipped)
            raise InputError(
                f"no DICOM images found in {where}: {count} file{'s' if count != 1 else ''} "
                f"skipped ({reasons}). Choose the folder, zip archive or file that holds the study"
            )
        if uid is None:
            if len(self.studies) == 1:
                chosen = self.studies[0]
            else:
                listing = "; ".join(
                    f"{s.manifest.study_instance_uid} ({_describe(s)})" for s in self.studies
                )
                raise StudyChoiceError(
                    f"{where} holds {len(self.studies)} studies; choose one by its Study "
                    f"Instance UID: {listing}",
                    studies=[s.summary() for s in self.studies],
                )
        else:
            found = [s for s in self.studies if s.manifest.study_instance_uid == uid.strip()]
            if not found:
                known = ", ".join(s.manifest.study_instance_uid for s in self.studies)
                raise InputError(f"study {uid} is not in {where}; it holds: {known}")
            chosen = found[0]
        _check_limits(chosen.manifest)
        return chosen


def _describe(study: StudyScan) -> str:
    m = study.manifest
    parts = [m.study_date or "no date", m.study_description or "no description"]
    parts.append(", ".join(m.modalities) or "no modality")
    parts.append(f"{len(m.instances)} images")
    return ", ".join(parts)


def _check_limits(m: Manifest) -> None:
    if len(m.instances) > MAX_INSTANCES:
        raise InputError(
            f"study {m.study_instance_uid} has {len(m.instances)} files, more than the "
            f"{MAX_INSTANCES} one transfer can carry; export it in parts"
        )
    if m.total_bytes > MAX_STUDY_BYTES:
        raise InputError(
            f"study {m.study_instance_uid} holds {m.total_bytes} bytes, more than one transfer "
            "can carry; export it in parts"
        )


# ------------------------------------------------------------------------------ scanning


@dataclass(frozen=True)
class _Found:
    header: Header
    size: int
    digest: str
    source: Source


@dataclass(frozen=True)
class _Candidate:
    """A file to look at: its display name, how to open it, and what is known up front."""

    name: str
    source: Source
    opener: Callable[[], BinaryIO]
    size: int


def scan(path: str | Path, *, chunk_size: int = 1024 * 1024) -> ScanReport:
    """Scan a folder (recursively), a zip archive or a single file for DICOM studies.

    Raises :class:`InputError` only when ``path`` itself cannot be used (missing, not a
    folder/file, an unreadable zip). Individual bad files are reported in ``skipped``.
    """
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ConfigError(f"chunk size must be between {MIN_CHUNK} and {MAX_CHUNK} bytes")
    root = Path(path)
    shown = str(path)
    try:
        st = root.stat()
    except FileNotFoundError:
        raise InputError(
            f"{shown} does not exist: check the path of the study folder, zip archive or file"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{shown} cannot be opened ({exc.strerror}): check that you may read it"
        ) from None
    skipped: list[Skipped] = []
    found: list[_Found] = []
    duplicates = 0
    with quiet_pydicom():
        if stat.S_ISDIR(st.st_mode):
            candidates: Iterator[_Candidate | Skipped] = _walk_folder(root)
            archive = None
        elif stat.S_ISREG(st.st_mode):
            archive = _open_zip(root, shown) if _is_zip(root) else None
            if archive is None:
                candidates = iter([_file_candidate(root, root.name, st.st_size)])
            else:
                candidates = _walk_zip(archive, os.path.abspath(root))
        else:
            raise InputError(
                f"{shown} is neither a folder nor a file: choose the study folder, zip archive "
                "or DICOM file"
            )
        try:
            seen: dict[str, tuple[int, str]] = {}
            for item in candidates:
                if isinstance(item, Skipped):
                    skipped.append(item)
                    continue
                result = _inspect(item)
                if isinstance(result, Skipped):
                    skipped.append(result)
                    continue
                sop = result.header.sop_instance_uid
                previous = seen.get(sop)
                if previous is None:
                    seen[sop] = (result.size, result.digest)
                    found.append(result)
                elif previous == (result.size, result.digest):
                    duplicates += 1
                else:
                    skipped.append(
                        Skipped(
                            item.name,
                            f"conflicting duplicate: another file has SOP Instance UID {sop} "
                            "with different content",
                        )
                    )
        finally:
            if archive is not None:
                archive.close()
    studies = _build_studies(found, chunk_size)
    report = ScanReport(tuple(studies), tuple(skipped), duplicates, shown)
    logger.info(
        "scan found %d studies with %d instances; %d files skipped, %d identical duplicates",
        len(studies),
        len(found),
        len(skipped),
        duplicates,
    )
    if skipped:
        logger.debug("skipped files per reason: %s", report.reasons())
    return report


#: Files up to this size (every ordinary CT or MR slice) are read into memory once, whole.
WHOLE_READ_BYTES = 8 * 1024 * 1024


def _inspect(item: _Candidate) -> _Found | Skipped:
    """Parse one file's header and hash its bytes; any failure becomes a Skipped reason."""
    if item.size == 0:
        return Skipped(item.name, REASON_EMPTY)
    if item.size > MAX_FILE_BYTES:
        return Skipped(item.name, REASON_TOO_LARGE)
    try:
        with item.opener() as fp:
            # one byte more than listed tells a file that grew since (it is then streamed)
            whole = fp.read(item.size + 1) if item.size <= WHOLE_READ_BYTES else None
            if whole is not None and len(whole) <= item.size:
                # Read once: parsed from memory (pydicom asks a file for its position at every
                # element, a system call each time) and hashed from the same bytes.
                try:
                    header = parse_header(io.BytesIO(whole))
                except DicomError as exc:
                    return Skipped(item.name, exc.message)
                size, digest = len(whole), file_digest.of_bytes(whole)
            else:  # large, or grew since it was listed: streamed, never held whole
                fp.seek(0)
                try:
                    header = parse_header(fp)
                except DicomError as exc:
                    return Skipped(item.name, exc.message)
                fp.seek(0)
                size, digest = file_digest.of_stream(fp)
    except OSError as exc:
        return Skipped(item.name, f"unreadable: {(exc.strerror or 'read error').lower()}")
    except zipfile.BadZipFile:
        return Skipped(item.name, "unreadable: damaged zip member")
    except RuntimeError:  # zipfile: encrypted member
        return Skipped(item.name, "unreadable: encrypted zip member")
    except NotImplementedError:
        return Skipped(item.name, "unreadable: unsupported zip compression")
    except (EOFError, ValueError):
        return Skipped(item.name, "unreadable: truncated or damaged data")
    if size == 0:
        return Skipped(item.name, REASON_EMPTY)
    if size > MAX_FILE_BYTES:
        return Skipped(item.name, REASON_TOO_LARGE)
    return _Found(header, size, digest, item.source)


def _file_candidate(path: Path, name: str, size: int) -> _Candidate | Skipped:
    if path.name.upper() == "DICOMDIR":
        return Skipped(name, REASON_DICOMDIR)
    full = os.path.abspath(path)
    return _Candidate(name, Source(full), lambda: open(full, "rb"), size)


def _walk_folder(root: Path) -> Iterator[_Candidate | Skipped]:
    """Every entry below ``root``, depth first in name order (``a/b`` before ``b``).

    Symbolic links are reported, not followed: they could loop or lead out of the folder.
    """
    # A stack of (path, display name, is a folder still to list); pushed in reverse name order.
    stack: list[tuple[Path, str, bool]] = [(root, "", True)]
    while stack:
        path, name, is_folder = stack.pop()
        if not is_folder:
            try:
                size = path.stat(follow_symlinks=False).st_size
            except OSError as exc:
                yield Skipped(name, f"unreadable: {(exc.strerror or 'stat failed').lower()}")
                continue
            yield _file_candidate(path, name, size)
            continue
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Skipped(name or ".", f"unreadable folder: {(exc.strerror or 'error').lower()}")
            continue
        pending: list[tuple[Path, str, bool]] = []
        for entry in entries:
            child = f"{name}/{entry.name}" if name else entry.name
            try:
                if entry.is_symlink():
                    yield Skipped(child, REASON_SYMLINK)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), child, True))
                elif entry.is_file(follow_symlinks=False):
                    pending.append((Path(entry.path), child, False))
                else:
                    yield Skipped(child, REASON_SPECIAL)
            except OSError as exc:
                yield Skipped(child, f"unreadable: {(exc.strerror or 'stat failed').lower()}")
        stack.extend(reversed(pending))


def _is_zip(path: Path) -> bool:
    """A zip by its magic or its name, but never a file with the DICOM prefix."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return path.suffix.lower() == ".zip"
    if len(head) == 132 and head[128:132] == b"DICM":
        return False
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or path.suffix.lower() == ".zip"


def _open_zip(path: Path, shown: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):
        raise InputError(
            f"{shown} cannot be read as a zip archive: check that the copy or download is "
            "complete, or extract it and choose the folder"
        ) from None


#: the zip compression methods read (every common archiver writes these)
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
REASON_ZIP_METHOD = (
    "unreadable: unsupported zip compression (only stored and deflated members are read; "
    "extract the archive and choose the folder)"
)


def _walk_zip(archive: zipfile.ZipFile, path: str) -> Iterator[_Candidate | Skipped]:
    infos = [i for i in archive.infolist() if not i.is_dir()]
    last = {info.filename: info for info in infos}
    for info in sorted(infos, key=lambda i: i.filename):
        name = info.filename
        if last[name] is not info:
            yield Skipped(name, "duplicate name in the zip archive")
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            yield Skipped(name, REASON_SYMLINK)
            continue
        if name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
            yield Skipped(name, REASON_DICOMDIR)
            continue
        if info.compress_type not in _ZIP_METHODS:
            # zipfile inflates bzip2 and LZMA members without a bound: a few kilobytes can
            # become gigabytes in memory before any size check
            yield Skipped(name, REASON_ZIP_METHOD)
            continue
        yield _Candidate(name, Source(path, name), _member_opener(archive, info), info.file_size)


def _member_opener(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], BinaryIO]:
    return lambda: cast(BinaryIO, archive.open(info))


def _order(number: int | None) -> tuple[int, int]:
    return (0, number) if number is not None else (1, 0)


def _build_studies(found: list[_Found], chunk_size: int) -> list[StudyScan]:
    by_study: dict[str, list[_Found]] = {}
    for f in found:
        by_study.setdefault(f.header.study_instance_uid, []).append(f)
    studies: list[StudyScan] = []
    for study_uid, items in by_study.items():
        items.sort(
            key=lambda f: (
                _order(f.header.series_number),
                f.header.series_instance_uid,
                _order(f.header.instance_number),
                f.header.sop_instance_uid,
            )
        )
        series: dict[str, Series] = {}
        for f in items:
            h = f.header
            if h.series_instance_uid not in series:
                series[h.series_instance_uid] = Series(
                    series_instance_uid=h.series_instance_uid,
                    modality=h.modality,
                    description=h.series_description,
                    number=h.series_number,
                )
        manifest = Manifest(
            study_instance_uid=study_uid,
            instances=tuple(
                Instance(
                    sop_instance_uid=f.header.sop_instance_uid,
                    sop_class_uid=f.header.sop_class_uid,
                    series_instance_uid=f.header.series_instance_uid,
                    transfer_syntax_uid=f.header.transfer_syntax_uid,
                    size=f.size,
                    digest=f.digest,
                    instance_number=f.header.instance_number,
                )
                for f in items
            ),
            series=tuple(series.values()),
            study_description=_first(items, lambda h: h.study_description),
            study_date=_first(items, lambda h: h.study_date),
            accession_number=_first(items, lambda h: h.accession_number),
            patient=next((dict(f.header.patient) for f in items if f.header.patient), {}),
            chunk_size=chunk_size,
        )
        studies.append(StudyScan(manifest, tuple(f.source for f in items)))
    studies.sort(
        key=lambda s: (
            s.manifest.study_date == "",
            s.manifest.study_date,
            s.manifest.study_instance_uid,
        )
    )
    return studies


def _first(items: list[_Found], get: Callable[[Header], str]) -> str:
    return next((value for f in items if (value := get(f.header))), "")
