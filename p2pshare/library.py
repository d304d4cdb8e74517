"""The node's study library: the studies a referring node holds, ready to be offered.

Studies arrive three ways — pushed by a modality or PACS to the node's Storage SCP
(:mod:`p2pshare.pacs.scp`), imported from a CD/DVD (DICOMDIR), folder or zip, or uploaded (a
radiology report attached to a study) — and all land in one place::

    <data dir>/library/<study id>/study.json                 summary, source, state (no patient data)
    <data dir>/library/<study id>/files/<series>/<sop>.dcm   the instances, named by validated UIDs

The study id is derived from the Study Instance UID, so the same study pushed twice, or imported
and then pushed, is one library entry; an instance whose SOP Instance UID is already there is a
duplicate, counted and ignored. ``path_of`` hands the ``files`` folder to the existing ingest
``scan()`` when the study is offered.

A study is ``receiving`` while instances may still arrive (DICOM pushes have no "end of study"
message) and ``complete`` once the node decides it is whole: after a quiet period without a new
instance, or when an operator says "send now". Imports are complete at once.

Every file is written to a private temporary file, flushed to disk and renamed into place, so a
crash never leaves a half-written instance under a final name. A write that would leave less
than ``min_free_bytes`` free on the library's disk is refused (``OSError`` ENOSPC) before it
starts and while it runs, so a push or an import cannot fill the disk the node needs. The library is used from the
event loop (list, get) and from pynetdicom's threads (store), so one lock guards its state; slow
work (import, report attachment) runs in worker threads.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from p2pshare import digest as file_digest
from p2pshare.dicom.header import Header, parse_header
from p2pshare.dicom.ingest import scan
from p2pshare.errors import DicomError, InputError
from p2pshare.manifest import uid_filename
from p2pshare.pacs import dicomdir, report

__all__ = ["COMPLETE", "RECEIVING", "Library", "Stored", "study_id_for"]

log = logging.getLogger(__name__)

RECEIVING, COMPLETE = "receiving", "complete"
SOURCES = ("scp", "import", "upload")
READ_SIZE = 1024 * 1024
STALE_TMP_S = 3600


def study_id_for(study_uid: str) -> str:
    """The library's stable id for a study: the same Study Instance UID, the same id."""
    return hashlib.sha256(b"p2pshare-study\0" + study_uid.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Stored:
    """What happened to one instance handed to the library."""

    study_id: str
    sop_instance_uid: str
    #: "stored" or "duplicate" (an instance with this SOP Instance UID was already there)
    outcome: str
    #: True when the study was complete and this instance reopened it
    reopened: bool = False


class Library:
    """The studies this node holds. Thread-safe; see the module docstring."""

    def __init__(
        self,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
        *,
        min_free_bytes: int = 0,
    ) -> None:
        self.min_free_bytes = min_free_bytes
        self.root = Path(data_dir) / "library"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)
        self._clock = clock
        self._lock = threading.RLock()
        self._records: dict[str, dict[str, Any]] = {}
        self._sops: dict[str, set[str]] = {}
        self._load()

    # -- reading ------------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Every study, most recently changed first (copies; safe to hand out)."""
        with self._lock:
            records = [json.loads(json.dumps(r)) for r in self._records.values()]
        return sorted(records, key=lambda r: (-r["updated"], r["study_id"]))

    def get(self, study_id: str) -> dict[str, Any]:
        with self._lock:
            record = self._record(study_id)
            copy: dict[str, Any] = json.loads(json.dumps(record))
            return copy

    def path_of(self, study_id: str) -> Path:
        """The folder holding the study's instances, for ``scan()`` and offers.

        Raises:
            InputError: no study with this id in the library.
        """
        with self._lock:
            self._record(study_id)
            return self._files(study_id)

    def find(self, study_uid: str) -> str | None:
        """The id of the study with this Study Instance UID, if the library holds it."""
        sid = study_id_for(study_uid)
        with self._lock:
            return sid if sid in self._records else None

    # -- disk space ---------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Free space on the library's disk."""
        return shutil.disk_usage(self._tmp).free

    def check_space(self, incoming: int = 0) -> None:
        """Refuse a write of ``incoming`` more bytes that would leave less than
        ``min_free_bytes`` free on the library's disk.

        Raises:
            OSError: ENOSPC, with a sentence for the operator as ``strerror``.
        """
        if self.free_bytes() - incoming < self.min_free_bytes:
            raise OSError(
                errno.ENOSPC,
                f"not enough free disk space (this node keeps {self.min_free_bytes / 1e6:.0f} MB "
                "free); free some space and send again",
            )

    # -- instances ----------------------------------------------------------------------------

    def store_bytes(self, data: bytes, source: str, *, complete: bool = False) -> Stored:
        """Store one encoded DICOM file (with file meta), e.g. from a C-STORE.

        Raises:
            DicomError: the bytes are not a usable DICOM instance (reason in the message).
            OSError: the disk refused the write.
        """
        return self.store_stream(io.BytesIO(data), source, complete=complete)

    def store_stream(
        self, fp: BinaryIO, source: str, *, complete: bool = False, digest: str | None = None
    ) -> Stored:
        """Copy one DICOM file from ``fp`` into the library (atomically, flushed to disk).

        ``digest``, when given, is the BLAKE3 the bytes must hash to (the scan saw them so); a file
        that changed in between is refused rather than stored with unverified content.
        """
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}")
        self.check_space(READ_SIZE)
        with self._temp_file() as (tmp, out):
            hasher = file_digest.hasher()
            while block := fp.read(READ_SIZE):
                self.check_space(len(block))
                hasher.update(block)
                out.write(block)
            out.flush()
            if digest is not None and hasher.hexdigest() != digest:
                raise DicomError("the file changed while it was being imported")
            out.seek(0)
            header = parse_header(out)
            size = os.fstat(out.fileno()).st_size
            os.fsync(out.fileno())
            return self._place(tmp, header, size, source, complete)

    def store_file(self, path: Path, source: str) -> Stored:
        """Take a complete DICOM file written elsewhere (pynetdicom's chunked C-STORE) into the
        library: moved when it is on the library's disk, else copied. ``path`` is gone
        afterwards either way.

        Raises:
            DicomError: the file is not a usable DICOM instance.
            OSError: the disk refused the write, or too little space would be left.
        """
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}")
        try:
            with self._temp_file() as (tmp, out):
                try:
                    os.replace(path, tmp)  # same disk: no copy, and no new space taken
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    self.check_space(path.stat().st_size)
                    with path.open("rb") as src:
                        shutil.copyfileobj(src, out, READ_SIZE)
                    out.flush()
                    os.fsync(out.fileno())
                    return self._place_open(tmp, out, source, False)
                self.check_space(0)  # it already takes its room on this disk
                with tmp.open("r+b") as moved:
                    os.fsync(moved.fileno())
                    return self._place_open(tmp, moved, source, False)
        finally:
            path.unlink(missing_ok=True)

    def _place_open(self, tmp: Path, fh: BinaryIO, source: str, complete: bool) -> Stored:
        fh.seek(0)
        header = parse_header(fh)
        size = os.fstat(fh.fileno()).st_size
        return self._place(tmp, header, size, source, complete)

    def _place(
        self, tmp: Path, header: Header, size: int, source: str, complete: bool
    ) -> Stored:
        study_uid, sop = header.study_instance_uid, header.sop_instance_uid
        sid = study_id_for(study_uid)
        with self._lock:
            now = self._clock()
            record = self._records.get(sid)
            if record is None:
                record = self._new_record(sid, study_uid, source, now)
                self._records[sid] = record
                self._sops[sid] = set()
            sops = self._sops_of(sid)
            if sop in sops:
                record["duplicates"] += 1
                self._save(record)
                return Stored(sid, sop, "duplicate")
            dest = self._files(sid) / uid_filename(header.series_instance_uid)[:-4]
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / uid_filename(sop)
            os.chmod(tmp, 0o640)
            os.replace(tmp, target)
            _fsync_dir(dest)
            sops.add(sop)
            reopened = record["state"] == COMPLETE and not complete
            _count(record, header, size)
            record["updated"] = now
            if source == "scp":
                record["last_instance_at"] = now
            if complete:
                record["state"] = COMPLETE
            elif source == "scp":
                record["state"] = RECEIVING
            self._save(record)
        return Stored(sid, sop, "stored", reopened)

    # -- state --------------------------------------------------------------------------------

    def mark_complete(self, study_id: str) -> dict[str, Any]:
        """"Send now": the study is whole. Returns the updated record."""
        with self._lock:
            record = self._record(study_id)
            record["state"] = COMPLETE
            record["updated"] = self._clock()
            self._save(record)
        return self.get(study_id)

    def due(self, quiet_s: float) -> builtins.list[str]:
        """Ids of studies still receiving whose last instance came ``quiet_s`` or more ago."""
        now = self._clock()
        with self._lock:
            return [
                sid
                for sid, r in self._records.items()
                if r["state"] == RECEIVING and now - r.get("last_instance_at", 0) >= quiet_s
            ]

    def delete(self, study_id: str) -> None:
        """Remove a study and its files from the library."""
        with self._lock:
            self._record(study_id)
            del self._records[study_id]
            self._sops.pop(study_id, None)
            folder = self.root / study_id
            trash = self._tmp / f"deleted-{study_id}-{os.getpid()}"
            os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # -- import -------------------------------------------------------------------------------

    def import_path(self, path: str | Path) -> dict[str, Any]:
        """Import every DICOM instance found in a CD/DVD folder (DICOMDIR), folder or zip.

        Junk and broken files are reported with reasons, instances already in the library (or
        twice in the input) are counted as duplicates and ignored; nothing here is fatal except
        an unusable ``path`` itself (:class:`InputError`). Blocking: call it in a thread.
        """
        found = scan(path)
        index = dicomdir.read_indexes(path)
        # Same SOP Instance UID, different bytes (e.g. another transfer syntax): a duplicate too.
        conflicts = [s for s in found.skipped if s.reason.startswith("conflicting duplicate")]
        skipped = [
            {"name": s.name, "reason": s.reason} for s in found.skipped if s not in conflicts
        ]
        duplicates = found.duplicates + len(conflicts)
        studies: list[dict[str, Any]] = []
        imported_sops: set[str] = set()
        for study in found.studies:
            m = study.manifest
            added = dups = 0
            sid = study_id_for(m.study_instance_uid)
            for inst, src in zip(m.instances, study.sources, strict=True):
                try:
                    with src.open() as fp:
                        stored = self.store_stream(fp, "import", digest=inst.digest)
                except (DicomError, InputError) as exc:
                    skipped.append({"name": _shown(src.path, src.member), "reason": exc.message})
                    continue
                except OSError as exc:
                    reason = f"not imported: {(exc.strerror or 'write error').lower()}"
                    skipped.append({"name": _shown(src.path, src.member), "reason": reason})
                    continue
                imported_sops.add(inst.sop_instance_uid)
                if stored.outcome == "duplicate":
                    dups += 1
                else:
                    added += 1
            duplicates += dups
            if sid in self._records:
                self.mark_complete(sid)
            studies.append(
                {
                    "study_id": sid,
                    "study_instance_uid": m.study_instance_uid,
                    "added": added,
                    "duplicates": dups,
                }
            )
        missing = [r for r in index.referenced if r.sop_instance_uid not in imported_sops]
        skipped.extend({"name": n, "reason": r} for n, r in index.problems)
        log.info(
            "import: %d studies, %d instances added, %d duplicates, %d skipped, %d DICOMDIR "
            "entries missing",
            len(studies),
            sum(s["added"] for s in studies),
            duplicates,
            len(skipped),
            len(missing),
        )
        return {
            "studies": studies,
            "imported": sum(s["added"] for s in studies),
            "duplicates": duplicates,
            "skipped": skipped,
            "dicomdir": {
                "found": index.found,
                "referenced": len(index.referenced),
                "missing": [r.file_id for r in missing],
            },
        }

    # -- reports ------------------------------------------------------------------------------

    def attach_report(
        self, study_id: str, file: str | Path, *, title: str = "Radiology report"
    ) -> dict[str, Any]:
        """Add a radiology report (PDF or plain text) to the study as a new DICOM instance.

        A PDF becomes an Encapsulated PDF instance, text a Basic Text SR, in a new series of the
        same study. Returns ``{"study_id", "sop_instance_uid", "kind"}``. Blocking.

        Raises:
            InputError: unknown study, unreadable file, or neither PDF nor text.
        """
        with self._lock:
            self._record(study_id)
            template = self._any_instance(study_id)
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise InputError(
                f"the report {file} cannot be read ({(exc.strerror or 'error').lower()})"
            ) from None
        encoded, kind = report.build(data, template, title=title)
        stored = self.store_bytes(encoded, "upload")
        return {
            "study_id": stored.study_id,
            "sop_instance_uid": stored.sop_instance_uid,
            "kind": kind,
        }

    # -- internals ----------------------------------------------------------------------------

    def _record(self, study_id: str) -> dict[str, Any]:
        record = self._records.get(study_id)
        if record is None:
            raise InputError(
                f"no study with id '{study_id}' in this node's library; list them with "
                "`p2pshare studies`"
            )
        return record

    def _files(self, study_id: str) -> Path:
        return self.root / study_id / "files"

    def _any_instance(self, study_id: str) -> Path:
        for path in sorted(self._files(study_id).rglob("*.dcm")):
            return path
        raise InputError(f"study '{study_id}' holds no instances to attach a report to")

    def _sops_of(self, study_id: str) -> set[str]:
        sops = self._sops.get(study_id)
        if sops is None:
            sops = {p.name[:-4] for p in self._files(study_id).rglob("*.dcm")}
            self._sops[study_id] = sops
        return sops

    def _new_record(self, sid: str, study_uid: str, source: str, now: float) -> dict[str, Any]:
        return {
            "study_id": sid,
            "study_instance_uid": study_uid,
            "source": source,
            "state": RECEIVING,
            "created": now,
            "updated": now,
            "last_instance_at": now,
            "study_date": "",
            "study_description": "",
            "modalities": [],
            "series": [],
            "instances": 0,
            "bytes": 0,
            "duplicates": 0,
        }

    def _save(self, record: dict[str, Any]) -> None:
        folder = self.root / record["study_id"]
        folder.mkdir(exist_ok=True)
        tmp = folder / "study.json.tmp"
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, folder / "study.json")

    def _load(self) -> None:
        for entry in sorted(self.root.iterdir()):
            meta = entry / "study.json"
            if entry.name.startswith(".") or not meta.is_file():
                continue
            try:
                record = json.loads(meta.read_text())
            except (OSError, ValueError):
                log.warning("library entry %s has an unreadable study.json; ignored", entry.name)
                continue
            if isinstance(record, dict) and record.get("study_id") == entry.name:
                self._records[entry.name] = record
        # Leftovers of a crash. Only old ones: another process (a CLI import next to a running
        # node) may be writing its own temporary files here right now.
        stale = time.time() - STALE_TMP_S
        for leftover in self._tmp.iterdir():
            try:
                if leftover.stat().st_mtime > stale:
                    continue
            except OSError:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    @contextmanager
    def _temp_file(self) -> Iterator[tuple[Path, BinaryIO]]:
        fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".part")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "w+b") as out:
                yield tmp, out
        finally:
            tmp.unlink(missing_ok=True)  # gone already when it was put in place


def _count(record: dict[str, Any], header: Header, size: int) -> None:
    """Fold one new instance into the study's patient-free summary."""
    record["instances"] += 1
    record["bytes"] += size
    record["study_date"] = record["study_date"] or header.study_date
    record["study_description"] = record["study_description"] or header.study_description
    if header.modality and header.modality not in record["modalities"]:
        record["modalities"] = sorted([*record["modalities"], header.modality])
    for series in record["series"]:
        if series["series_instance_uid"] == header.series_instance_uid:
            series["instances"] += 1
            return
    record["series"].append(
        {
            "series_instance_uid": header.series_instance_uid,
            "modality": header.modality,
            "description": header.series_description,
            "number": header.series_number,
            "instances": 1,
        }
    )
    record["series"].sort(key=lambda s: (s["number"] is None, s["number"] or 0))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shown(path: str, member: str | None) -> str:
    return f"{Path(path).name}:{member}" if member else Path(path).name

