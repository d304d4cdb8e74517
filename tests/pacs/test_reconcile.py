"""IHE Import Reconciliation: local identifiers in, originals kept in the right sequences."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from p2pshare.errors import ConfigError
from p2pshare.pacs.reconcile import Identity, Rules, reconcile, reconcile_file

WHEN = datetime(2026, 3, 1, 14, 30, 5)


def received() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Foreign^Patient"
    ds.PatientID = "RH-0042"
    ds.IssuerOfPatientID = "REFERRING"
    ds.AccessionNumber = "A123456"
    ds.StudyDescription = "CT HEAD"
    return ds


def test_local_identifiers_replace_and_originals_are_kept() -> None:
    ds = reconcile(
        received(),
        Identity(mrn="TC-9", issuer="TRAUMA", name="Local^Name", accession="L-77"),
        Rules(accession_prefix="RH-", modifying_system="Trauma Centre", source="Referring ED"),
        WHEN,
    )
    assert (ds.PatientID, ds.IssuerOfPatientID, str(ds.PatientName)) == (
        "TC-9",
        "TRAUMA",
        "Local^Name",
    )
    assert ds.AccessionNumber == "L-77"  # a local accession replaces; the prefix rule is moot
    assert ds.StudyDescription == "CT HEAD"
    other = ds.OtherPatientIDsSequence
    assert [(o.PatientID, o.IssuerOfPatientID, o.TypeOfPatientID) for o in other] == [
        ("RH-0042", "REFERRING", "TEXT")
    ]
    item = ds.OriginalAttributesSequence[0]
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem == "Trauma Centre"
    assert item.SourceOfPreviousValues == "Referring ED"
    assert item.AttributeModificationDateTime == "20260301143005"
    old = item.ModifiedAttributesSequence[0]
    assert old.PatientID == "RH-0042" and old.IssuerOfPatientID == "REFERRING"
    assert str(old.PatientName) == "Foreign^Patient" and old.AccessionNumber == "A123456"


def test_prefix_rule_for_foreign_accession_and_name_kept_when_not_given() -> None:
    ds = reconcile(received(), Identity(mrn="TC-9"), Rules(accession_prefix="RH-"), WHEN)
    assert ds.AccessionNumber == "RH-A123456"
    assert str(ds.PatientName) == "Foreign^Patient"
    old = ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]
    assert "PatientName" not in old
    assert old.AccessionNumber == "A123456"


def test_without_prefix_the_accession_is_kept() -> None:
    ds = reconcile(received(), Identity(mrn="TC-9"), Rules(), WHEN)
    assert ds.AccessionNumber == "A123456"
    assert "AccessionNumber" not in ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0]


def test_prefix_too_long_asks_for_a_local_accession() -> None:
    ds = received()
    ds.AccessionNumber = "1234567890123"
    with pytest.raises(ConfigError, match="local accession"):
        reconcile(ds, Identity(mrn="TC-9"), Rules(accession_prefix="RHOSP-"), WHEN)


def test_absent_attributes_are_recorded_as_empty_and_existing_sequences_appended() -> None:
    ds = received()
    del ds.IssuerOfPatientID
    earlier = Dataset()
    earlier.ModifyingSystem = "earlier"
    ds.OriginalAttributesSequence = Sequence([earlier])
    reconcile(ds, Identity(mrn="TC-9", issuer="TRAUMA"), Rules(source="Referring ED"), WHEN)
    assert len(ds.OriginalAttributesSequence) == 2
    old = ds.OriginalAttributesSequence[1].ModifiedAttributesSequence[0]
    assert old.IssuerOfPatientID == ""
    # the foreign ID had no issuer: the sending institution qualifies it
    assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID == "Referring ED"


def test_non_ascii_name_switches_to_utf8() -> None:
    ds = reconcile(received(), Identity(mrn="TC-9", name="Müller^Zoë"), Rules(), WHEN)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Zoë"


@pytest.mark.parametrize(
    "kwargs",
    [{"mrn": ""}, {"mrn": "   "}, {"mrn": "A\\B"}, {"mrn": "x" * 65}, {"mrn": "ok", "accession": "y" * 17}],
)
def test_bad_identity_is_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Identity(**kwargs)


def test_reconcile_file_never_touches_the_original(ct_study: Path, tmp_path: Path) -> None:
    src = sorted(ct_study.rglob("*.dcm"))[0]
    before = src.read_bytes()
    dest = tmp_path / "copy.dcm"
    reconcile_file(src, dest, Identity(mrn="TC-9", issuer="TRAUMA"), Rules())
    assert src.read_bytes() == before
    a, b = dcmread(src), dcmread(dest)
    assert b.PatientID == "TC-9" and a.PatientID != "TC-9"
    assert a.PixelData == b.PixelData
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    assert not list(tmp_path.glob("*.part"))
