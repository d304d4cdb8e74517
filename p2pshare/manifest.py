"""The study manifest: what is about to be sent, as pure data.

The sender builds it from the files it ingested; the receiver gets it (signed) before a byte of
pixel data and uses it to show what is coming, to bound every size it will accept, to name the
files it writes and to verify each one. ``from_dict`` is therefore hostile-input parsing: every
field is type-checked and bounded, every UID must be a syntactically valid DICOM UID, and the
on-disk names are derived only from those UIDs (never from a name the peer chose).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from p2pshare.errors import ManifestError

MANIFEST_VERSION = 2
#: Version 1 carried SHA-256 per file (key "sha256"); nodes still read it from their own
#: database (transfers received before the change), never from a peer.
_DIGEST_KEY = {1: "sha256", 2: "blake3"}
_DIGEST_NAME = {1: "SHA-256", 2: "BLAKE3"}

#: DICOM PS3.5 §9.1: digits and dots, components without leading zeros, at most 64 characters.
#: Always use ``fullmatch``: with ``match``, ``$`` also matches before a trailing newline.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

MAX_INSTANCES = 100_000
MAX_FILE_BYTES = 4 * 1024**3  # a single DICOM instance larger than 4 GiB is not plausible
MAX_STUDY_BYTES = 256 * 1024**3
MIN_CHUNK = 4 * 1024
MAX_CHUNK = 4 * 1024 * 1024
MAX_TEXT = 256


def is_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.fullmatch(value))


def uid_filename(uid: str) -> str:
    """The file name an instance is stored under: its SOP Instance UID, sanitised.

    Valid UIDs contain only digits and dots, so they are safe as they are; anything else
    (which ``from_dict`` already refuses) is replaced by a hash so that it can never form a path.
    """
    if is_uid(uid) and uid not in {".", ".."}:
        return f"{uid}.dcm"
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40] + ".dcm"


@dataclass(frozen=True)
class Instance:
    """One DICOM file, identified by its UIDs, moved byte for byte."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size: int
    #: BLAKE3-256 of the file, hex (see p2pshare.digest)
    digest: str
    instance_number: int | None = None

    def relpath(self, study_uid: str) -> str:
        """Path below the destination folder, built only from validated UIDs."""
        return "/".join(
            [
                uid_filename(study_uid)[: -len(".dcm")],
                uid_filename(self.series_instance_uid)[: -len(".dcm")],
                uid_filename(self.sop_instance_uid),
            ]
        )


@dataclass(frozen=True)
class Series:
    series_instance_uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None


@dataclass(frozen=True)
class Manifest:
    """Everything the receiver learns about a study before its bytes arrive."""

    study_instance_uid: str
    instances: tuple[Instance, ...]
    series: tuple[Series, ...] = ()
    study_description: str = ""
    study_date: str = ""
    accession_number: str = ""
    #: Demographics shown to the receiving team so they can match the patient. The manifest only
    #: ever travels sealed; these values must never be logged.
    patient: dict[str, str] = field(default_factory=dict)
    chunk_size: int = 1024 * 1024
    version: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.instances)

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series if s.modality})

    def chunk_count(self, index: int) -> int:
        """How many chunks file ``index`` is sent in (an empty file still has one)."""
        size = self.instances[index].size
        return max(1, -(-size // self.chunk_size))

    def chunk_length(self, index: int, chunk: int) -> int:
        """The exact plaintext length of one chunk: the receiver accepts no other."""
        size = self.instances[index].size
        return min(self.chunk_size, size - chunk * self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "study_instance_uid": self.study_instance_uid,
            "study_description": self.study_description,
            "study_date": self.study_date,
            "accession_number": self.accession_number,
            "patient": dict(sorted(self.patient.items())),
            "chunk_size": self.chunk_size,
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "modality": s.modality,
                    "description": s.description,
                    "number": s.number,
                }
                for s in self.series
            ],
            "instances": [
                {
                    "sop_instance_uid": i.sop_instance_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "series_instance_uid": i.series_instance_uid,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "size": i.size,
                    _DIGEST_KEY[self.version]: i.digest,
                    "instance_number": i.instance_number,
                }
                for i in self.instances
            ],
        }

    def to_bytes(self) -> bytes:
        """Canonical encoding: the bytes that are signed and hashed."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def digest_algorithm(self) -> str:
        """What each instance's ``digest`` is: "blake3", or "sha256" for a version-1 manifest."""
        return _DIGEST_KEY[self.version]

    def summary(self) -> dict[str, Any]:
        """What a person sees before accepting: counts and descriptions, no UIDs per file."""
        per_series: dict[str, int] = {}
        for inst in self.instances:
            per_series[inst.series_instance_uid] = per_series.get(inst.series_instance_uid, 0) + 1
        return {
            "study_instance_uid": self.study_instance_uid,
            "study_description": self.study_description,
            "study_date": self.study_date,
            "modalities": self.modalities,
            "instances": len(self.instances),
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "description": s.description,
                    "modality": s.modality,
                    "number": s.number,
                    "instances": per_series.get(s.series_instance_uid, 0),
                }
                for s in self.series
            ],
            "bytes": self.total_bytes,
            "transfer_syntaxes": sorted({i.transfer_syntax_uid for i in self.instances}),
        }

    @classmethod
    def from_bytes(cls, data: bytes, *, stored: bool = False) -> Manifest:
        """``stored``: read from this node's own database, where a version-1 manifest (of a
        transfer from before per-file digests were BLAKE3) is still valid."""
        try:
            raw = json.loads(data.decode("utf-8"))
        # ValueError also covers integers beyond Python's 4300-digit limit; RecursionError
        # deeply nested arrays
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError("it is not valid JSON") from exc
        return cls.from_dict(raw, stored=stored)

    @classmethod
    def from_dict(cls, raw: object, *, stored: bool = False) -> Manifest:
        """Parse and bound a manifest from the peer (or, ``stored``, from this node's database).
        Raises ManifestError on anything odd."""
        d = _obj(raw, "manifest")
        version = d.get("version")
        readable = {MANIFEST_VERSION, 1} if stored else {MANIFEST_VERSION}
        if isinstance(version, bool) or version not in readable:
            raise ManifestError(
                f"it is manifest version {str(version)[:8]}, and this node reads version "
                f"{MANIFEST_VERSION}: both nodes need a p2pshare release of the same manifest version"
            )
        chunk_size = _int(d.get("chunk_size"), "chunk_size", MIN_CHUNK, MAX_CHUNK)
        study_uid = _uid(d.get("study_instance_uid"), "study_instance_uid")
        patient_raw = _obj(d.get("patient", {}), "patient")
        if len(patient_raw) > 16:
            raise ManifestError("too many patient fields")
        patient = {
            _text(k, "patient key"): _text(v, "patient value") for k, v in patient_raw.items()
        }
        series_raw = _list(d.get("series", []), "series", MAX_INSTANCES)
        series = tuple(
            Series(
                series_instance_uid=_uid(s.get("series_instance_uid"), "series_instance_uid"),
                modality=_text(s.get("modality", ""), "modality"),
                description=_text(s.get("description", ""), "series description"),
                number=_opt_int(s.get("number"), "series number"),
            )
            for s in (_obj(x, "series entry") for x in series_raw)
        )
        inst_raw = _list(d.get("instances"), "instances", MAX_INSTANCES)
        if not inst_raw:
            raise ManifestError("it lists no instances")
        instances: list[Instance] = []
        seen: set[str] = set()
        for x in inst_raw:
            e = _obj(x, "instance entry")
            sop = _uid(e.get("sop_instance_uid"), "sop_instance_uid")
            if sop in seen:
                raise ManifestError(f"instance {sop} is listed twice")
            seen.add(sop)
            sha = e.get(_DIGEST_KEY[version])
            if not isinstance(sha, str) or not _DIGEST_RE.fullmatch(sha):
                raise ManifestError(f"instance {sop} has no valid {_DIGEST_NAME[version]} digest")
            instances.append(
                Instance(
                    sop_instance_uid=sop,
                    sop_class_uid=_uid(e.get("sop_class_uid"), "sop_class_uid"),
                    series_instance_uid=_uid(e.get("series_instance_uid"), "series_instance_uid"),
                    transfer_syntax_uid=_uid(e.get("transfer_syntax_uid"), "transfer_syntax_uid"),
                    size=_int(e.get("size"), f"size of {sop}", 1, MAX_FILE_BYTES),
                    digest=sha,
                    instance_number=_opt_int(e.get("instance_number"), "instance_number"),
                )
            )
        m = cls(
            study_instance_uid=study_uid,
            instances=tuple(instances),
            series=series,
            study_description=_text(d.get("study_description", ""), "study_description"),
            study_date=_text(d.get("study_date", ""), "study_date"),
            accession_number=_text(d.get("accession_number", ""), "accession_number"),
            patient=patient,
            chunk_size=chunk_size,
            version=version,
        )
        if m.total_bytes > MAX_STUDY_BYTES:
            raise ManifestError(f"it claims {m.total_bytes} bytes, more than any study may hold")
        return m


def _obj(v: object, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"{what} is not an object")
    return v


def _list(v: object, what: str, limit: int) -> list[Any]:
    if not isinstance(v, list):
        raise ManifestError(f"{what} is not a list")
    if len(v) > limit:
        raise ManifestError(f"{what} has {len(v)} entries, more than {limit}")
    return v


def _int(v: object, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ManifestError(f"{what} must be a whole number from {lo} to {hi}")
    return v


def _opt_int(v: object, what: str) -> int | None:
    if v is None:
        return None
    return _int(v, what, -(2**31), 2**31 - 1)


def _text(v: object, what: str) -> str:
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise ManifestError(f"{what} must be text of at most {MAX_TEXT} characters")
    return v


def _uid(v: object, what: str) -> str:
    if not is_uid(v):
        raise ManifestError(f"{what} is not a valid DICOM UID")
    assert isinstance(v, str)
    return v
