"""What of a study is viewable so far, and where its files are; with the caches behind it.

A receiving node puts an instance at ``<out>/<study UID>/<series UID>/<SOP UID>.dcm`` only
once it is verified (``staging.py``), so "viewable" means exactly "present under its final
name". The signed manifest says which names to look for: files of other transfers that share the
destination are never listed, and every path is built from manifest UIDs (validated when the
manifest was parsed) and checked to lie inside the destination before it is opened.

The page polls the listing every second while a study arrives, so it must stay cheap: one
``scandir`` per series folder, and each file's header read once (keyed by path and inode: a
placed file is never replaced in place).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

from p2pshare.errors import DicomError
from p2pshare.manifest import Manifest, is_uid, uid_filename
from p2pshare.viewer.decode import InstanceInfo, read_info

__all__ = [
    "InfoCache",
    "SizedLru",
    "instance_path",
    "library_instance_path",
    "library_listing",
    "listing",
    "placed",
]

V = TypeVar("V")


class InfoCache:
    """Header facts per placed file, read once. Thread-safe (listings run in worker threads)."""

    def __init__(self, limit: int = 200_000, reader: Callable[[Path], InstanceInfo] = read_info):
        self._limit = limit
        self._read = reader
        self._items: OrderedDict[tuple[str, int], InstanceInfo | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, inode: int) -> InstanceInfo | None:
        """The file's header facts, or None when it cannot be read as DICOM."""
        key = (str(path), inode)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        try:
            info: InstanceInfo | None = self._read(path)
        except DicomError:
            info = None
        with self._lock:
            self._items[key] = info
            while len(self._items) > self._limit:
                self._items.popitem(last=False)
        return info


class SizedLru(Generic[V]):
    """Least recently used first out, bounded in bytes (decoded frames, thumbnails)."""

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self._max = max_bytes
        self._sizeof = size
        self._size = 0
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        size = self._sizeof(value)
        if size > self._max:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= self._sizeof(old)
            self._items[key] = value
            self._size += size
            while self._size > self._max:
                _, evicted = self._items.popitem(last=False)
                self._size -= self._sizeof(evicted)


def _folder(name: str) -> str:
    return uid_filename(name)[: -len(".dcm")]


def placed(out_dir: Path, manifest: Manifest) -> dict[str, tuple[Path, int]]:
    """SOP UID → (path, inode) of every manifest instance present under its final name."""
    wanted: dict[str, set[str]] = {}
    for inst in manifest.instances:
        wanted.setdefault(inst.series_instance_uid, set()).add(uid_filename(inst.sop_instance_uid))
    study = out_dir / _folder(manifest.study_instance_uid)
    found: dict[str, tuple[Path, int]] = {}
    for series_uid, names in wanted.items():
        folder = study / _folder(series_uid)
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name in names and entry.is_file(follow_symlinks=False):
                        found[entry.name[: -len(".dcm")]] = (Path(entry.path), entry.inode())
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found


def instance_path(out_dir: Path, manifest: Manifest, sop_uid: str) -> Path | None:
    """The placed file of ``sop_uid`` in this transfer, or None (not listed, not there yet, or
    not inside ``out_dir``)."""
    if not is_uid(sop_uid):
        return None
    inst = next((i for i in manifest.instances if i.sop_instance_uid == sop_uid), None)
    if inst is None:
        return None
    root = out_dir.resolve()
    path = (root / inst.relpath(manifest.study_instance_uid)).resolve()
    if not path.is_relative_to(root) or not path.is_file() or path.is_symlink():
        return None
    return path


def _series_key(number: int | None, uid: str) -> tuple[bool, int, str]:
    return (number is None, number or 0, uid)


def listing(out_dir: Path | None, manifest: Manifest | None, infos: InfoCache) -> dict[str, Any]:
    """Header and series list of what is viewable now (see the module docstring).

    Patient fields are for the staff's screen only; never log them.
    """
    if manifest is None or out_dir is None:
        return {"study": None, "patient": {}, "series": [], "expected": 0, "received": 0}
    files = placed(out_dir, manifest)
    numbers: dict[str, int | None] = {}
    by_series: dict[str, list[dict[str, Any]]] = {}
    expected: dict[str, int] = {}
    patient: dict[str, str] = dict(manifest.patient)
    first_info: InstanceInfo | None = None
    for inst in manifest.instances:
        uid = inst.series_instance_uid
        expected[uid] = expected.get(uid, 0) + 1
        where = files.get(inst.sop_instance_uid)
        if where is None:
            continue
        info = infos.get(*where)
        if info is not None and first_info is None:
            first_info = info
        if info is not None and numbers.get(uid) is None:
            numbers[uid] = info.series_number
        number = inst.instance_number
        if number is None and info is not None:
            number = info.instance_number
        by_series.setdefault(uid, []).append(
            {
                "sop_instance_uid": inst.sop_instance_uid,
                "instance_number": number,
                "frames": info.frames if info else 1,
                "rows": info.rows if info else 0,
                "columns": info.columns if info else 0,
                "image": bool(info and info.has_image),
            }
        )
    if first_info is not None and first_info.patient:
        patient = dict(first_info.patient)
    meta = {s.series_instance_uid: s for s in manifest.series}
    series: list[dict[str, Any]] = []
    for uid in expected:
        s = meta.get(uid)
        number = s.number if s and s.number is not None else numbers.get(uid)
        instances = sorted(
            by_series.get(uid, []),
            key=lambda i: (i["instance_number"] is None, i["instance_number"] or 0),
        )
        images = [i for i in instances if i["image"]]
        series.append(
            {
                "series_instance_uid": uid,
                "number": number,
                "modality": s.modality if s else "",
                "description": s.description if s else "",
                "expected": expected[uid],
                "instances": instances,
                "thumbnail": images[len(images) // 2]["sop_instance_uid"] if images else None,
            }
        )
    series.sort(key=lambda x: _series_key(x["number"], x["series_instance_uid"]))
    return {
        "study": {
            "study_instance_uid": manifest.study_instance_uid,
            "description": manifest.study_description,
            "date": manifest.study_date,
            "accession_number": manifest.accession_number,
            "modalities": manifest.modalities,
        },
        "patient": {k: patient.get(k, "") for k in ("name", "id", "birth_date", "sex")},
        "series": series,
        "expected": len(manifest.instances),
        "received": len(files),
    }


# ------------------------------------------------------------------------------ library studies


def _library_files(files_dir: Path) -> dict[str, tuple[Path, int]]:
    found: dict[str, tuple[Path, int]] = {}
    try:
        with os.scandir(files_dir) as series_dirs:
            folders = [e.path for e in series_dirs if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return found
    for folder in folders:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False):
                    found[entry.name[: -len(".dcm")]] = (Path(entry.path), entry.inode())
    return found


def library_listing(files_dir: Path, study_uid: str, infos: InfoCache) -> dict[str, Any]:
    """The same listing for a study in the node's library (``<study>/files/<series>/<sop>.dcm``,
    see ``library.py``): there is no manifest, so series come from the files' headers and what
    is expected is what is there."""
    series: dict[str, dict[str, Any]] = {}
    patient: dict[str, str] = {}
    description, date, modalities = "", "", set()
    files = _library_files(files_dir)
    for sop, where in sorted(files.items()):
        info = infos.get(*where)
        if info is None:
            continue
        if not patient and info.patient:
            patient = dict(info.patient)
        description = description or info.study_description
        date = date or info.study_date
        if info.modality:
            modalities.add(info.modality)
        s = series.setdefault(
            info.series_instance_uid,
            {
                "series_instance_uid": info.series_instance_uid,
                "number": info.series_number,
                "modality": info.modality,
                "description": info.series_description,
                "instances": [],
            },
        )
        s["instances"].append(
            {
                "sop_instance_uid": sop,
                "instance_number": info.instance_number,
                "frames": info.frames,
                "rows": info.rows,
                "columns": info.columns,
                "image": info.has_image,
            }
        )
    out: list[dict[str, Any]] = []
    for s in series.values():
        s["instances"].sort(key=lambda i: (i["instance_number"] is None, i["instance_number"] or 0))
        images = [i for i in s["instances"] if i["image"]]
        s["expected"] = len(s["instances"])
        s["thumbnail"] = images[len(images) // 2]["sop_instance_uid"] if images else None
        out.append(s)
    out.sort(key=lambda x: _series_key(x["number"], x["series_instance_uid"]))
    received = sum(len(s["instances"]) for s in out)
    return {
        "study": {
            "study_instance_uid": study_uid,
            "description": description,
            "date": date,
            "accession_number": "",
            "modalities": sorted(modalities),
        },
        "patient": {k: patient.get(k, "") for k in ("name", "id", "birth_date", "sex")},
        "series": out,
        "expected": received,
        "received": received,
    }


def library_instance_path(files_dir: Path, sop_uid: str) -> Path | None:
    """The file of ``sop_uid`` in a library study, or None (absent or outside ``files_dir``)."""
    if not is_uid(sop_uid):
        return None
    root = files_dir.resolve()
    try:
        with os.scandir(root) as it:
            folders = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    for folder in folders:
        path = folder / uid_filename(sop_uid)
        if path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(root):
            return path
    return None
