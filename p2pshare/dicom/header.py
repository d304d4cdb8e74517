"""Read the few header fields the manifest needs from one DICOM file, safely.

Every file a sender offers and every file a receiver files away goes through :func:`parse_header`,
so both sides agree on what a file "is" (its four identifying UIDs, transfer syntax and the
describing text), including for old files without the 128-byte preamble. The input is hostile
or merely broken as often as not: the parser reads only the handful of tags it needs, never the
pixel data, notices a file cut inside its header, and turns every failure into a
:class:`DicomError` with a short plain-words reason.

pydicom is owned here: its exceptions are translated into :mod:`p2pshare.errors`, and its
warnings and log records are silenced while it reads (:func:`quiet_pydicom`), because pydicom
quotes offending values in them and those values can be patient names.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from p2pshare.errors import DicomError
from p2pshare.manifest import MAX_TEXT, is_uid

__all__ = [
    "Header",
    "MEDIA_STORAGE_DIRECTORY",
    "REASON_DAMAGED",
    "REASON_DICOMDIR",
    "REASON_EMPTY",
    "REASON_NOT_DICOM",
    "REASON_TRUNCATED",
    "REASON_ZIP",
    "parse_header",
    "quiet_pydicom",
]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

REASON_EMPTY = "empty file"
REASON_NOT_DICOM = "not a DICOM file"
REASON_DICOMDIR = "DICOMDIR index, not an image"
REASON_ZIP = "zip archive inside the folder: scan it on its own"
REASON_DAMAGED = "unreadable: damaged DICOM header"
REASON_TRUNCATED = "unreadable: file ends inside its header"

_REQUIRED_UIDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
#: Where the file meta can stand in for a UID missing from the data set itself.
_META_FALLBACK = {
    "SOPInstanceUID": "MediaStorageSOPInstanceUID",
    "SOPClassUID": "MediaStorageSOPClassUID",
}
_PATIENT_FIELDS = {
    "name": "PatientName",
    "id": "PatientID",
    "birth_date": "PatientBirthDate",
    "sex": "PatientSex",
}
_TAGS = [
    *_REQUIRED_UIDS,
    "SpecificCharacterSet",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "StudyDescription",
    "StudyDate",
    "AccessionNumber",
    *_PATIENT_FIELDS.values(),
]


# ------------------------------------------------------------------------------ pydicom hygiene

_quiet = threading.local()


class _QuietWhileReading(logging.Filter):
    """Drops pydicom's log records emitted by a thread that is inside :func:`quiet_pydicom`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "depth", 0)


_pydicom_logger = logging.getLogger("pydicom")
if not any(isinstance(f, _QuietWhileReading) for f in _pydicom_logger.filters):
    _pydicom_logger.addFilter(_QuietWhileReading())


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records: they quote element values (patient names)."""
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet.depth -= 1


# ------------------------------------------------------------------------------ header parsing


@dataclass(frozen=True)
class Header:
    """What the manifest needs from one file's header, as plain, bounded strings."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    study_description: str = ""
    study_date: str = ""
    accession_number: str = ""
    patient: dict[str, str] = field(default_factory=dict)


def parse_header(fp: BinaryIO) -> Header:
    """Parse the header of the DICOM file open in ``fp`` (positioned at its start).

    Raises :class:`DicomError` whose message is a short reason ("not a DICOM file", "missing
    StudyInstanceUID", ...). Files without the 128-byte preamble are accepted only when they
    start like a data set and carry the four identifying UIDs. ``OSError`` from the underlying
    file is left to the caller. The file position is undefined afterwards.
    """
    head = fp.read(132)
    if not head:
        raise DicomError(REASON_EMPTY)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    if not has_preamble:
        if head[:4] == b"PK\x03\x04":
            raise DicomError(REASON_ZIP)
        if not _starts_like_dataset(head):
            raise DicomError(REASON_NOT_DICOM)
    fp.seek(0)
    watched = _TruncationWatch(fp)
    with quiet_pydicom():
        try:
            ds = dcmread(
                cast(BinaryIO, watched),
                stop_before_pixels=True,
                force=not has_preamble,
                specific_tags=_TAGS,
            )
            if watched.truncated:
                raise DicomError(REASON_TRUNCATED)
            return _header(ds, has_preamble)
        except DicomError:
            raise
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - hostile input: pydicom raises all sorts on bad bytes
            # Deliberately not chained: pydicom's messages can quote element values.
            raise DicomError(REASON_DAMAGED) from None


class _TruncationWatch:
    """Passes reads through to ``fp`` and notes when the file ended inside an element.

    pydicom accepts a value shorter than its declared length at the end of a file, so a file
    cut inside its header could otherwise yield a shortened, still well-formed UID. A clean end
    of file is an empty 8-byte read for the next element's tag; any other short read means the
    header was cut, unless pydicom then seeks back (it was only peeking, e.g. for a preamble).
    """

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self.truncated = False

    def read(self, size: int = -1) -> bytes:
        data = self._fp.read(size)
        if 0 <= len(data) < size and (data or size != 8):
            self.truncated = True
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        before = self._fp.tell()
        after = self._fp.seek(offset, whence)
        if after < before:
            self.truncated = False
        return after

    def tell(self) -> int:
        return self._fp.tell()

    def close(self) -> None:
        """The caller owns the file; pydicom must not close it."""


def _starts_like_dataset(head: bytes) -> bool:
    """True when the bytes begin like a preamble-less data set: group 0002 or 0008 first."""
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be == 0x0008


def _header(ds: Dataset, has_preamble: bool) -> Header:
    file_meta = getattr(ds, "file_meta", None) or Dataset()
    if _uid_text(element_value(file_meta, "MediaStorageSOPClassUID")) == MEDIA_STORAGE_DIRECTORY:
        raise DicomError(REASON_DICOMDIR)
    # Only a conformant file may lend its meta UIDs; a preamble-less one must carry its own.
    meta = file_meta if has_preamble else Dataset()
    uids: dict[str, str] = {}
    for keyword in _REQUIRED_UIDS:
        value = _uid_text(element_value(ds, keyword))
        if not value and keyword in _META_FALLBACK:
            value = _uid_text(element_value(meta, _META_FALLBACK[keyword]))
        if not is_uid(value):
            if not has_preamble:
                raise DicomError(REASON_NOT_DICOM)
            raise DicomError(f"missing {keyword}" if not value else f"invalid {keyword}")
        uids[keyword] = value
    transfer_syntax = _uid_text(element_value(file_meta, "TransferSyntaxUID"))
    if not transfer_syntax:
        transfer_syntax = _guessed_transfer_syntax(ds)
    elif not is_uid(transfer_syntax):
        raise DicomError("invalid transfer syntax UID")
    return Header(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        modality=element_text(ds, "Modality"),
        series_description=element_text(ds, "SeriesDescription"),
        series_number=_number(ds, "SeriesNumber"),
        instance_number=_number(ds, "InstanceNumber"),
        study_description=element_text(ds, "StudyDescription"),
        study_date=element_text(ds, "StudyDate"),
        accession_number=element_text(ds, "AccessionNumber"),
        patient={
            key: value for key, keyword in _PATIENT_FIELDS.items() if (value := element_text(ds, keyword))
        },
    )


def _guessed_transfer_syntax(ds: Dataset) -> str:
    """Without file meta, the encoding pydicom detected (implicit VR little endian if unsure)."""
    implicit, little = ds.original_encoding
    if implicit is False and little is True:
        return EXPLICIT_VR_LITTLE_ENDIAN
    if implicit is False and little is False:
        return EXPLICIT_VR_BIG_ENDIAN
    return IMPLICIT_VR_LITTLE_ENDIAN


def element_value(ds: Dataset, keyword: str) -> Any:
    """An element's value, or None when it is absent or cannot be decoded (optional fields
    must not cost the file its place in the study, nor the image its display)."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom value conversion fails in many ways
        return None


def _uid_text(value: object) -> str:
    if value is None or isinstance(value, MultiValue | list):
        return ""
    return str(value).strip(" \x00")


def element_text(ds: Dataset, keyword: str) -> str:
    """An element as bounded, printable-ish text ("" when absent or undecodable)."""
    value = element_value(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        value = "\\".join(str(v) for v in value)
    return str(value).replace("\x00", "").strip()[:MAX_TEXT]


def _number(ds: Dataset, keyword: str) -> int | None:
    value = element_value(ds, keyword)
    if value is None or isinstance(value, MultiValue | list):
        return None
    try:
        number = int(value) if isinstance(value, int) else int(float(str(value).strip()))
    except (ValueError, OverflowError):
        return None
    return number if -(2**31) <= number <= 2**31 - 1 else None
