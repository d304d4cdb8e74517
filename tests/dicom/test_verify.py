from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet

from p2pshare.dicom.ingest import scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.dicom.verify import Identity, read_identity
from p2pshare.errors import DicomError

SPECS = [SeriesSpec("A", 2, 16, 16, 5.0, "head"), SeriesSpec("B", 2, 16, 16, 5.0, "chest")]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_ct_study(tmp_path_factory.mktemp("study"), seed=4, series=SPECS)


def test_identity_matches_the_header_and_the_manifest(study: list[Path]) -> None:
    scanned = scan(study[0].parent.parent).study(None)
    for inst, source in zip(scanned.manifest.instances, scanned.sources, strict=True):
        identity = read_identity(source.path)
        assert identity == Identity(
            sop_instance_uid=inst.sop_instance_uid,
            sop_class_uid=inst.sop_class_uid,
            study_instance_uid=scanned.manifest.study_instance_uid,
            series_instance_uid=inst.series_instance_uid,
        )
    ds = dcmread(study[-1])
    identity = read_identity(str(study[-1]))
    assert identity.sop_instance_uid == ds.SOPInstanceUID
    assert identity.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert identity.study_instance_uid == ds.StudyInstanceUID
    assert identity.series_instance_uid == ds.SeriesInstanceUID
    assert all(isinstance(v, str) and type(v) is str for v in vars(identity).values())


def test_file_without_preamble_is_identified(study: list[Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    cut.write_bytes(study[0].read_bytes()[132:])
    assert read_identity(cut) == read_identity(study[0])
    found = get_testdata_file("rtstruct.dcm", download=False)
    if isinstance(found, str):  # bundled: a preamble-less implicit VR file
        ds = dcmread(found, force=True)
        assert read_identity(found).sop_instance_uid == ds.SOPInstanceUID


def test_junk_raises_dicom_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_text("this is a radiology report, not an image\n")
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_identity(junk)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DicomError, match="empty"):
        read_identity(empty)
    with pytest.raises(DicomError, match="cannot be read"):
        read_identity(tmp_path / "missing.dcm")
    with pytest.raises(DicomError):
        read_identity(tmp_path)  # a folder
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(40))
    with pytest.raises(DicomError) as excinfo:
        read_identity(damaged)
    assert str(excinfo.value).startswith("the received file cannot be used as DICOM")
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_missing_or_invalid_uids_are_named(study: list[Path], tmp_path: Path) -> None:
    ds = dcmread(study[0])
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "nostudy.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match="missing StudyInstanceUID"):
        read_identity(tmp_path / "nostudy.dcm")
    ds = dcmread(study[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SeriesInstanceUID = "1.2.03.4"  # leading zero: not a valid UID
    ds.save_as(tmp_path / "badseries.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match="invalid SeriesInstanceUID"):
        read_identity(tmp_path / "badseries.dcm")


def test_file_cut_inside_a_uid_is_refused_not_misidentified(
    study: list[Path], tmp_path: Path
) -> None:
    data = study[0].read_bytes()
    uid = str(dcmread(study[0]).SOPInstanceUID).encode()
    start = data.index(uid, 132 + 100)  # the data set's copy, after the file meta
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: start + len(uid) // 2])
    # pydicom alone would accept the shortened value as a (valid) UID.
    assert dcmread(cut, stop_before_pixels=True).SOPInstanceUID == uid[: len(uid) // 2].decode()
    with pytest.raises(DicomError, match="ends inside its header"):
        read_identity(cut)
    (tmp_path / "folder").mkdir()
    cut.rename(tmp_path / "folder" / "cut.dcm")
    report = scan(tmp_path / "folder")
    assert report.reasons() == {"unreadable": 1}


def test_dicomdir_is_not_an_instance(study: list[Path], tmp_path: Path) -> None:
    fs = FileSet()
    for f in study:
        fs.add(f)
    fs.write(tmp_path / "cd")
    shutil.copy(tmp_path / "cd" / "DICOMDIR", tmp_path / "received.dcm")
    with pytest.raises(DicomError, match="DICOMDIR"):
        read_identity(tmp_path / "received.dcm")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.sampled_from([b"", b"\x00" * 128 + b"DICM", b"\x08\x00", b"\x02\x00", b"\x00\x08"]),
    body=st.binary(max_size=600),
)
def test_random_bytes_never_escape_as_anything_but_dicom_error(
    tmp_path: Path, prefix: bytes, body: bytes
) -> None:
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(prefix + body)
    try:
        identity = read_identity(path)
    except DicomError:
        return
    assert all(identity.__dict__.values())


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(min_value=0, max_value=2500), flip=st.none() | st.integers(0, 2000))
def test_truncated_or_corrupted_headers_give_the_right_identity_or_dicom_error(
    study: list[Path], tmp_path: Path, cut: int, flip: int | None
) -> None:
    original = study[1].read_bytes()
    truth = read_identity(study[1])
    data = bytearray(original[:cut] if flip is None else original)
    if flip is not None:
        data[flip % len(data)] ^= 0xA5
    path = tmp_path / "broken.dcm"
    path.write_bytes(bytes(data))
    try:
        identity = read_identity(path)
    except DicomError:
        return
    if flip is None:
        # A truncated file is either refused or, if the UIDs survived, identified correctly.
        assert identity == truth
    else:
        # A flipped byte may turn a UID into another valid one, never into an invalid one.
        assert all(isinstance(v, str) and v for v in vars(identity).values())


def test_verified_shortcut_agrees_with_the_full_parser(study: list[Path], tmp_path: Path) -> None:
    """The receiver's fast path gives the same identity, and the same words when it fails."""
    from p2pshare.dicom.verify import read_identity_of_verified

    for f in study:
        assert read_identity_of_verified(f) == read_identity(f)
    cut = tmp_path / "nopreamble.dcm"
    cut.write_bytes(study[0].read_bytes()[132:])
    assert read_identity_of_verified(cut) == read_identity(study[0])
    junk = tmp_path / "junk.dcm"
    junk.write_text("not an image")
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_identity_of_verified(junk)
    ds = dcmread(study[0])
    del ds.StudyInstanceUID
    ds.save_as(tmp_path / "nostudy.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match="missing StudyInstanceUID"):
        read_identity_of_verified(tmp_path / "nostudy.dcm")
    fs = FileSet()
    for f in study:
        fs.add(f)
    fs.write(tmp_path / "cd")
    with pytest.raises(DicomError, match="DICOMDIR"):
        read_identity_of_verified(tmp_path / "cd" / "DICOMDIR")
