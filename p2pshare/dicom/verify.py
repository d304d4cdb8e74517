"""Check that a received file really is the DICOM instance the manifest named.

A matching digest proves the bytes are the ones the sender hashed, but the manifest's UIDs are
the sender's claim about those bytes. Before a file is filed under its SOP Instance UID (and
shown to a radiologist as part of a study), the receiver reads the UIDs back from the file
itself. This reuses the sender's header parser, so both sides agree on what a file "is",
including for old files without the 128-byte preamble.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.filereader import data_element_generator, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.values import convert_value, converters

from p2pshare.dicom.header import (
    MEDIA_STORAGE_DIRECTORY,
    _uid_text,
    parse_header,
    quiet_pydicom,
)
from p2pshare.errors import DicomError
from p2pshare.manifest import is_uid

__all__ = ["Identity", "identity_from_head", "read_identity", "read_identity_of_verified"]

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
    """:func:`read_identity` for a file already known to be complete (its digest matched).

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


# ------------------------------------------------------------------ identity from memory (fast)

#: pydicom's own "stop before pixels" tags: (7FE0,0008) Float, (7FE0,0009) Double Float and
#: (7FE0,0010) Pixel Data. ``dcmread(stop_before_pixels=True)`` reads up to the first of them.
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: (data set tag, the file meta tag that may stand in for it), in Identity order.
_IDENTITY_TAGS = (
    (0x00080018, 0x00020003),  # SOPInstanceUID, MediaStorageSOPInstanceUID
    (0x00080016, 0x00020002),  # SOPClassUID, MediaStorageSOPClassUID
    (0x0020000D, None),  # StudyInstanceUID
    (0x0020000E, None),  # SeriesInstanceUID
)
_SPECIFIC_TAGS: list[BaseTag | int] = [tag for tag, _ in _IDENTITY_TAGS]
_SPECIFIC_CHARACTER_SET = 0x00080005
_GROUP_LENGTH = 0x00020000
_TRANSFER_SYNTAX = 0x00020010
_MEDIA_STORAGE_SOP_CLASS = 0x00020002
#: Transfer syntaxes whose data set is deflated. pydicom inflates only the first of them; this
#: shortcut inflates none and leaves them to the file-based reader.
_DEFLATED_DATA_SET = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)
#: A bytearray or memoryview head is copied to bytes: this much first (a header is ~2 KB).
_FIRST_WINDOW = 64 * 1024

#: Elements by tag. Plain int keys: pydicom's BaseTag compares in Python, int in C.
_Elements = dict[int, RawDataElement | DataElement]


class _Unusual(Exception):
    """Something the shortcut does not vouch for: the caller uses the file-based reader."""


def identity_from_head(head: bytes | bytearray | memoryview, file_size: int) -> Identity | None:
    """The identity of a received file, read from its first bytes in memory, or None.

    ``head`` is the start of the file as received (often all of it) and ``file_size`` the
    whole file's size. A non-None answer is what :func:`read_identity_of_verified` reads from
    the complete file. None means "not certain from these bytes": no preamble, a deflated or
    big-endian data set, a header running past ``head``, a missing or invalid UID, a DICOMDIR,
    anything else unusual. None is always safe: the caller then reads the file with
    :func:`read_identity_of_verified`, which words the reason for the person.

    pydicom does the parsing, with public functions only: ``read_preamble``, then
    ``data_element_generator`` for the file meta and the data set, called as ``dcmread``'s
    own reader calls it (see :func:`_read_file_meta` and :func:`_read_data_set`). It reads up
    to the pixel data, as ``dcmread(stop_before_pixels=True)`` does, not just past (0020,000E)
    SeriesInstanceUID: that costs about a fifth more, but then a repeated, out-of-order UID
    element or a damaged element further on has the same effect as in the file-based reader
    (the last copy wins; the file is refused) instead of a different one.
    """
    if isinstance(head, bytes):  # io.BytesIO shares a bytes object: no copy
        if not 0 < len(head) <= file_size:
            return None
        return _identity(head, whole=len(head) == file_size)
    try:
        view = memoryview(head).cast("B")
    except (TypeError, ValueError):
        return None
    size = view.nbytes
    if not 0 < size <= file_size:
        return None
    whole = size == file_size
    if size > _FIRST_WINDOW:
        # Read like a head shorter than the file: an answer is final, None means "more".
        found = _identity(bytes(view[:_FIRST_WINDOW]), whole=False)
        if found is not None:
            return found
    return _identity(bytes(view), whole)


def _identity(data: bytes, whole: bool) -> Identity | None:
    try:
        with quiet_pydicom():
            return _read_identity(io.BytesIO(data), len(data), whole)
    except Exception:  # noqa: BLE001 - unusual or hostile bytes: the file-based reader explains
        return None


def _read_identity(fp: io.BytesIO, size: int, whole: bool) -> Identity:
    """Raises (:class:`_Unusual` or whatever pydicom raises) instead of returning None."""
    read_preamble(fp, False)  # raises InvalidDicomError without the 128 bytes and 'DICM'
    meta = _read_file_meta(fp)
    implicit = _data_set_is_implicit_vr(meta)
    start = fp.tell()
    watch = _Watch()
    elements = _read_data_set(fp, implicit, watch)
    if watch.unusual:
        raise _Unusual
    # Every element before the one that stopped the read was complete. Without that stop, only
    # a whole file whose last element ends exactly at its end was read entirely: pydicom takes
    # a value cut short by the end of the data as it is, and it could still look like a UID.
    if not watch.reached_pixels and not (whole and _ends_cleanly(fp, start, implicit, size)):
        raise _Unusual
    if _uid_text(_ui_value(meta.get(_MEDIA_STORAGE_SOP_CLASS))) == MEDIA_STORAGE_DIRECTORY:
        raise _Unusual  # a DICOMDIR: the file-based reader says so
    values: list[str] = []
    for tag, meta_tag in _IDENTITY_TAGS:
        # As parse_header: the file meta stands in for a SOP UID missing from the data set.
        value = _uid_text(_ui_value(elements.get(tag)))
        if not value and meta_tag is not None:
            value = _uid_text(_ui_value(meta.get(meta_tag)))
        if not is_uid(value):
            raise _Unusual
        values.append(value)
    if values[1] == MEDIA_STORAGE_DIRECTORY:
        raise _Unusual
    return Identity(*values)


def _read_file_meta(fp: io.BytesIO) -> _Elements:
    """The file meta elements (group 0002), read the way pydicom's file meta reader does.

    That reader (``_read_file_meta_info``, private, so not called) reads group 0002 as
    explicit VR little endian, decodes the first element and re-reads the group as implicit VR
    when that fails with an unknown VR; it also decodes the group length. Here every element
    must have a VR pydicom knows, so the second pass never applies, and the same two elements
    are decoded, so that a value that makes ``dcmread`` fail makes this fail too.
    """
    meta: _Elements = {}
    for elem in data_element_generator(fp, False, True, stop_when=_outside_file_meta):
        if not isinstance(elem, RawDataElement) or elem.VR is None or elem.VR not in converters:
            raise _Unusual
        meta[int(elem.tag)] = elem  # the last one wins, as in pydicom
    for tag in {min(meta, default=_GROUP_LENGTH), _GROUP_LENGTH}:
        if (decoded := meta.get(tag)) is not None:
            convert_value(cast(str, decoded.VR), cast(RawDataElement, decoded))  # fails alike
    return meta


def _outside_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _data_set_is_implicit_vr(meta: _Elements) -> bool:
    """How pydicom's ``read_partial`` decodes the data set after this file meta.

    Only the little-endian, non-deflated transfer syntaxes pydicom knows are accepted.
    """
    syntax = _ui_value(meta.get(_TRANSFER_SYNTAX))  # decoded as pydicom decodes it
    if not isinstance(syntax, str) or not is_uid(syntax):
        raise _Unusual
    if syntax == ImplicitVRLittleEndian:
        return True
    if syntax == ExplicitVRLittleEndian:
        return False
    uid = UID(syntax)
    if uid.is_private or not uid.is_transfer_syntax or not uid.is_compressed:
        raise _Unusual  # big endian, private or unknown
    if syntax in _DEFLATED_DATA_SET:
        raise _Unusual
    return False  # encapsulated (JPEG, JPEG 2000, RLE, ...): explicit VR little endian


def _read_data_set(fp: io.BytesIO, implicit: bool, watch: _Watch) -> _Elements:
    """The data set's identity elements, as pydicom's ``read_dataset`` reads them.

    ``read_dataset`` first looks at the first element and reads the data set with the other VR
    encoding if it looks like one (with a warning). That case is refused here: the first
    element, read as explicit VR by pydicom, must have a VR pydicom knows (explicit VR) or
    none at all (implicit VR), as the transfer syntax says. Then it runs the same element
    generator with the same arguments and keeps the last copy of each element, as here. It
    also decodes (0008,0005) Specific Character Set; here too, so that it fails alike. Unlike
    ``read_dataset``, errors are not swallowed (the file-based reader deals with them).
    """
    start = fp.tell()
    first = _FirstVR()
    for _ in data_element_generator(fp, False, True, stop_when=first.stop_when):
        pass  # yields nothing: stops at the first element
    fp.seek(start)
    if (first.vr is None) != implicit or not (implicit or first.vr in converters):
        raise _Unusual  # pydicom would switch VR encoding, or there is no element
    elements: _Elements = {
        int(elem.tag): elem
        for elem in data_element_generator(
            fp, implicit, True, stop_when=watch.stop_when, specific_tags=_SPECIFIC_TAGS
        )
    }
    charset = elements.get(_SPECIFIC_CHARACTER_SET)
    if charset is not None:
        if not isinstance(charset, RawDataElement):
            raise _Unusual
        convert_encodings(convert_raw_data_element(charset).value)
    return elements


class _FirstVR:
    """``stop_when`` that stops at once, noting the first element's VR (read as explicit)."""

    __slots__ = ("vr",)

    def __init__(self) -> None:
        self.vr: object = _NO_ELEMENT

    def stop_when(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        self.vr = vr
        return True


_NO_ELEMENT = object()


class _Watch:
    """``stop_when`` for the data set: stops at the pixel data and notes what it saw.

    pydicom calls it with each top-level element's tag, VR and declared length, the stream
    positioned at the element's value.
    """

    __slots__ = ("reached_pixels", "unusual")

    def __init__(self) -> None:
        self.reached_pixels = False
        self.unusual = False

    def stop_when(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_DATA_TAGS:
            self.reached_pixels = True
            return True
        if tag >> 16 < 0x0008:
            # Command (0000) or directory (0004) elements: pydicom's file reader takes group
            # 0000 apart from the data set, and a received image has neither.
            self.unusual = True
            return True
        return False


class _EndWatch(_Watch):
    """:class:`_Watch` that also notes where the last element seen ends."""

    __slots__ = ("_tell", "end")

    def __init__(self, fp: io.BytesIO) -> None:
        super().__init__()
        self._tell = fp.tell
        self.end = -1  # -1: undefined length (or nothing seen)

    def stop_when(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if super().stop_when(tag, vr, length):
            return True
        self.end = -1 if length == _UNDEFINED_LENGTH else self._tell() + length
        return False


def _ends_cleanly(fp: io.BytesIO, start: int, implicit: bool, size: int) -> bool:
    """True when the data set from ``start`` ends with a complete element at ``size``.

    Only for a whole file without pixel data (rare: the data set is read a second time).
    """
    fp.seek(start)
    watch = _EndWatch(fp)
    _read_data_set(fp, implicit, watch)
    return not watch.unusual and watch.end == size == fp.tell()


def _ui_value(elem: RawDataElement | DataElement | None) -> object:
    """A UI element's value as pydicom decodes it (None when absent).

    Raises :class:`_Unusual` unless it is a plain, complete UI element (the file-based reader
    might decode another VR, a sequence or a deferred value differently).
    """
    if elem is None:
        return None
    if not isinstance(elem, RawDataElement) or elem.VR not in (None, "UI"):
        raise _Unusual  # None: implicit VR, where pydicom's dictionary says UI for these tags
    if elem.length != (0 if elem.value is None else len(elem.value)):
        raise _Unusual  # cut short, undefined length or deferred
    return convert_value("UI", elem)
