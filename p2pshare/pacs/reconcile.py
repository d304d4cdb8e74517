"""IHE Import Reconciliation Workflow: the trauma centre's identifiers in, the originals kept.

Before a received study goes into the local PACS, the receiving team enters (or confirms) the
patient's local record number, the issuer of that number, optionally the name as the local
record has it, and optionally a local accession number. :func:`reconcile` produces a modified
copy of one received instance:

* Patient ID, Issuer of Patient ID and (when given) Patient's Name as given;
* Accession Number replaced by the local one when given, else rewritten by the node's rule
  (``prefix``: the configured prefix, e.g. the sender's code, in front of the foreign number;
  ``keep``: unchanged);
* the foreign Patient ID and its issuer appended to Other Patient IDs Sequence (0010,1002);
* one item appended to Original Attributes Sequence (0400,0561) holding, in its Modified
  Attributes Sequence, the original values of every attribute changed, with Modifying System,
  Source of Previous Values, Reason for the Attribute Modification ("COERCE") and Attribute
  Modification DateTime.

Everything else — pixel data, UIDs, the transfer syntax — is left exactly as received, and the
received file itself is never written to: the copy goes elsewhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence

from p2pshare.dicom.header import quiet_pydicom
from p2pshare.errors import ConfigError, DicomError

__all__ = ["RECONCILED", "Identity", "Rules", "reconcile", "reconcile_file"]

#: The attributes an export may change; everything else must come out as it went in.
RECONCILED = (
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "AccessionNumber",
    "SpecificCharacterSet",
    "OtherPatientIDsSequence",
    "OriginalAttributesSequence",
)

MAX_LO, MAX_SH, MAX_PN = 64, 16, 64 * 5


@dataclass(frozen=True)
class Identity:
    """What the receiving team entered. ``mrn`` is required; the rest may be empty."""

    mrn: str
    issuer: str = ""
    name: str = ""
    accession: str = ""

    def __post_init__(self) -> None:
        _check(self.mrn, "the local MRN", MAX_LO, required=True)
        _check(self.issuer, "the issuer of the MRN", MAX_LO)
        _check(self.name, "the patient's name", MAX_PN)
        _check(self.accession, "the local accession number", MAX_SH)


@dataclass(frozen=True)
class Rules:
    """The node's reconciliation rules (from its configuration)."""

    #: text put in front of a foreign accession number when no local one is given ("" = keep)
    accession_prefix: str = ""
    #: Modifying System written into Original Attributes Sequence (the node's name)
    modifying_system: str = "p2pshare"
    #: Source of Previous Values: the sending institution, as pinned
    source: str = ""

    def __post_init__(self) -> None:
        _check(self.accession_prefix, "the accession prefix", MAX_SH)


def _check(value: str, what: str, limit: int, *, required: bool = False) -> None:
    if required and not value.strip():
        raise ConfigError(f"{what} is required: enter the patient's local record number")
    if len(value) > limit or not value.isprintable() or "\\" in value:
        raise ConfigError(
            f"{what} must be at most {limit} printable characters without a backslash"
        )


def reconcile(ds: Dataset, who: Identity, rules: Rules, now: datetime | None = None) -> Dataset:
    """Apply the reconciliation to ``ds`` in place and return it.

    Raises:
        ConfigError: the prefixed accession number would not fit (16 characters); enter a
            local accession number instead.
    """
    when = now or datetime.now()
    original = Dataset()
    changed: list[str] = []

    def change(keyword: str, value: str) -> None:
        old = ds.get(keyword)
        if old is not None and str(old) == value:
            return
        element = ds.data_element(keyword) if keyword in ds else None
        if element is not None:
            original.add(copy.deepcopy(element))
        else:
            setattr(original, keyword, "")  # was absent: record it as empty (PS3.3 C.12.1.1.9)
        setattr(ds, keyword, value)
        changed.append(keyword)

    foreign_id = str(ds.get("PatientID", "") or "")
    foreign_issuer = str(ds.get("IssuerOfPatientID", "") or "") or rules.source

    if who.name and not who.name.isascii():
        charset = ds.get("SpecificCharacterSet")
        if charset is None or "ISO_IR 192" not in (
            [charset] if isinstance(charset, str) else list(charset)
        ):
            change("SpecificCharacterSet", "ISO_IR 192")
    change("PatientID", who.mrn)
    change("IssuerOfPatientID", who.issuer)
    if who.name:
        change("PatientName", who.name)
    accession = str(ds.get("AccessionNumber", "") or "")
    if who.accession:
        change("AccessionNumber", who.accession)
    elif rules.accession_prefix and accession and not accession.startswith(rules.accession_prefix):
        prefixed = rules.accession_prefix + accession
        if len(prefixed) > MAX_SH:
            raise ConfigError(
                f"the accession number with the prefix '{rules.accession_prefix}' would be "
                f"longer than {MAX_SH} characters; enter a local accession number"
            )
        change("AccessionNumber", prefixed)

    if foreign_id and (foreign_id, foreign_issuer) != (who.mrn, who.issuer):
        other = Dataset()
        other.PatientID = foreign_id
        other.IssuerOfPatientID = foreign_issuer[:MAX_LO]
        other.TypeOfPatientID = "TEXT"
        ids = ds.get("OtherPatientIDsSequence")
        if ids is None:
            ds.OtherPatientIDsSequence = Sequence([other])
        elif not any(
            str(i.get("PatientID", "")) == foreign_id
            and str(i.get("IssuerOfPatientID", "")) == other.IssuerOfPatientID
            for i in ids
        ):
            ids.append(other)

    if changed:
        item = Dataset()
        item.ModifiedAttributesSequence = Sequence([original])
        item.AttributeModificationDateTime = when.strftime("%Y%m%d%H%M%S")
        item.ModifyingSystem = rules.modifying_system[:MAX_LO]
        item.SourceOfPreviousValues = rules.source[:MAX_LO]
        item.ReasonForTheAttributeModification = "COERCE"
        seq = ds.get("OriginalAttributesSequence")
        if seq is None:
            ds.OriginalAttributesSequence = Sequence([item])
        else:
            seq.append(item)
    return ds


def reconcile_file(src: Path, dest: Path, who: Identity, rules: Rules) -> None:
    """Write a reconciled copy of the received file ``src`` to ``dest`` (same transfer syntax).

    Raises:
        DicomError: ``src`` cannot be read as DICOM.
        ConfigError: see :func:`reconcile`.
    """
    with quiet_pydicom():
        try:
            ds = dcmread(src)
        except Exception:  # noqa: BLE001 - pydicom raises all sorts; messages may quote values
            raise DicomError(f"the received instance {src.name} cannot be read") from None
        reconcile(ds, who, rules)
        tmp = dest.with_name(dest.name + ".part")
        dcmwrite(tmp, ds, enforce_file_format=True)
        tmp.replace(dest)
