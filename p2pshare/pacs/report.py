"""A radiology report as a DICOM instance of the same study, so it travels with the images.

* a PDF becomes an **Encapsulated PDF** instance (PS3.3 A.45.1, SOP class 1.2.840.10008.5.1.4.1.1.104.1);
* plain text (UTF-8, or Latin-1 as a fallback) becomes a **Basic Text SR** (PS3.3 A.35.1) with
  one TEXT content item under a "Diagnostic Imaging Report" container.

Each gets a new series and new SOP Instance UID (``pydicom.uid.generate_uid``); patient and
study attributes are copied from an instance already in the study, so the PACS at the other end
files the report with its images.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    BasicTextSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from p2pshare import __version__
from p2pshare.dicom.header import quiet_pydicom
from p2pshare.errors import InputError

__all__ = ["MAX_PDF_BYTES", "MAX_TEXT_BYTES", "build"]

MAX_PDF_BYTES = 64 * 1024**2
MAX_TEXT_BYTES = 1024**2

#: Attributes copied from the study's images (Patient, General Study, Patient Study modules).
COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "InstitutionName",
)

SERIES_NUMBER = 9901


def build(data: bytes, template: Path, *, title: str, now: datetime | None = None) -> tuple[bytes, str]:
    """Encode ``data`` (a PDF or text) as a DICOM file in the study of ``template``.

    Returns (the encoded file, "pdf" or "text").

    Raises:
        InputError: empty, too large, or neither PDF nor text.
    """
    if not data:
        raise InputError("the report file is empty; choose the PDF or text of the report")
    with quiet_pydicom():
        try:
            source = dcmread(template, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the study's own file; any failure means the same
            raise InputError("the study's images cannot be read to file the report with") from None
    when = now or datetime.now()
    ds = _common(source, when, title)
    if data.startswith(b"%PDF-"):
        if len(data) > MAX_PDF_BYTES:
            raise InputError("the PDF report is larger than 64 MB; attach a smaller export")
        _pdf(ds, data, title)
        kind = "pdf"
    else:
        _text(ds, _decode(data))
        kind = "text"
    ds.file_meta = _meta(ds)
    buf = io.BytesIO()
    with quiet_pydicom():
        dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue(), kind


def _decode(data: bytes) -> str:
    if len(data) > MAX_TEXT_BYTES:
        raise InputError("the text report is larger than 1 MB; attach it as a PDF")
    if b"\0" in data:
        raise InputError("the report is neither a PDF nor plain text; attach a PDF or .txt file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise InputError("the text report is empty; choose the file that holds the report")
    return text


def _common(source: Dataset, when: datetime, title: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names and report text in any language
    for keyword in COPIED:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
        ds.setdefault(keyword, "")
    for keyword in ("StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        ds.setdefault(keyword, "")
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesNumber = SERIES_NUMBER
    ds.InstanceNumber = 1
    ds.SeriesDescription = title[:64]
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.Manufacturer = "p2pshare"
    ds.SoftwareVersions = __version__
    return ds


def _pdf(ds: Dataset, data: bytes, title: str) -> None:
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.Modality = "DOC"
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.AcquisitionDateTime = ds.ContentDate + ds.ContentTime
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(data)
    ds.EncapsulatedDocument = data + (b"\0" if len(data) % 2 else b"")


def _text(ds: Dataset, text: str) -> None:
    ds.SOPClassUID = BasicTextSRStorage
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    item.TextValue = text
    ds.ContentSequence = Sequence([item])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta
