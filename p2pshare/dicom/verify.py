"""Check that a received file really is the DICOM instance the manifest named.

A matching SHA-256 proves the bytes are the ones the sender hashed, but the manifest's UIDs are
the sender's claim about those bytes. Before a file is filed under its SOP Instance UID (and
shown to a radiologist as part of a study), the receiver reads the UIDs back from the file
itself. This reuses the sender's header parser, so both sides agree on what a file "is",
including for old files without the 128-byte preamble.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from p2pshare.dicom.header import MEDIA_STORAGE_DIRECTORY, parse_header, quiet_pydicom
from p2pshare.errors import DicomError
from p2pshare.manifest import is_uid

__all__ = ["Identity", "read_identity", "read_identity_of_verified"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """The four UIDs that say which instance, of which class, study and series a file is."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str


def read_identity(path: str | Path) -> Identity:
    """Read a file's identifying UIDs from its header (pixel data is not read).

    Raises :class:`DicomError` with a sentence for the user when the file cannot be read or
    lacks a valid UID.
    """
    try:
        with open(path, "rb") as fp:
            header = parse_header(fp)
    except DicomError as exc:
        raise DicomError(f"the received file cannot be used as DICOM: {exc.message}") from None
    except OSError as exc:
        raise DicomError(
            f"the received file cannot be read back ({exc.strerror or 'read error'})"
        ) from None
    return Identity(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
    )


_ID_TAGS = ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"]


def read_identity_of_verified(path: str | Path) -> Identity:
    """:func:`read_identity` for a file already known to be complete (its SHA-256 matched).

    The receiver calls this for every instance, so the common case asks pydicom for the four
    UIDs only, in about half the time. That shortcut is safe only because the bytes cannot be
    cut short (a truncated header could otherwise yield a shortened UID that still looks valid,
    which :func:`read_identity` guards against). Anything unusual goes through
    :func:`read_identity`, which words the reason for the person.
    """
    try:
        with quiet_pydicom(), open(path, "rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True, force=True, specific_tags=_ID_TAGS)
            values = [str(ds.get(tag, "") or "") for tag in _ID_TAGS]
            is_dicomdir = ds.file_meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY
    except Exception:  # noqa: BLE001 - anything odd is the full parser's to explain
        return read_identity(path)
    if is_dicomdir or not all(is_uid(v) for v in values):
        return read_identity(path)
    return Identity(*values)
