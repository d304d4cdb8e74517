from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.fileset import FileSet
from pydicom.filewriter import dcmwrite
from pydicom.uid import ImplicitVRLittleEndian

from p2pshare import digest as file_digest
from p2pshare.dicom import ingest
from p2pshare.dicom.ingest import ScanReport, Skipped, Source, scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.errors import ConfigError, InputError, StudyChoiceError
from p2pshare.manifest import Manifest

SMALL = [
    SeriesSpec("HEAD SMALL", 3, 32, 32, 5.0, "head"),
    SeriesSpec("CHEST SMALL", 4, 32, 32, 5.0, "chest"),
]


def make_study(folder: Path, seed: int = 1, patient_id: str = "P-1", **kw: object) -> list[Path]:
    return generate_ct_study(folder, seed=seed, series=SMALL, patient_id=patient_id, **kw)  # type: ignore[arg-type]


def digest(path: Path) -> str:
    return file_digest.of_file(path)


def bundled(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(found)


# --------------------------------------------------------------------------- folders


def test_folder_scan_finds_every_instance_with_size_hash_and_header_fields(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study", seed=3, patient_id="ID-42", birth_date="19650412")
    report = scan(tmp_path / "study", chunk_size=256 * 1024)

    assert report.skipped == () and report.duplicates == 0
    assert len(report.studies) == 1
    study = report.study(None)
    m = study.manifest
    assert len(m.instances) == len(files) == 7
    assert len(study.sources) == len(m.instances)
    assert m.chunk_size == 256 * 1024
    assert [s.number for s in m.series] == [1, 2]
    assert [s.description for s in m.series] == ["HEAD SMALL", "CHEST SMALL"]
    assert {s.modality for s in m.series} == {"CT"}
    assert m.study_description == "CT TRAUMA PAN-SCAN"
    assert m.accession_number.startswith("SYN")
    assert len(m.study_date) == 8 and m.study_date.isdigit()
    assert m.patient == {
        "name": "DEMO^TRAUMA PATIENT",
        "id": "ID-42",
        "birth_date": "19650412",
        "sex": "O",
    }
    # Sorted by series number, then instance number.
    keys = [
        (
            next(s.number for s in m.series if s.series_instance_uid == i.series_instance_uid),
            i.instance_number,
        )
        for i in m.instances
    ]
    assert keys == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (2, 4)]
    # Every source is the file whose bytes were hashed, and it is the instance it claims to be.
    for inst, source in zip(m.instances, study.sources, strict=True):
        path = Path(source.path)
        assert source.member is None and path.is_absolute()
        assert inst.size == path.stat().st_size
        assert inst.digest == digest(path)
        ds = dcmread(path, stop_before_pixels=True)
        assert inst.sop_instance_uid == ds.SOPInstanceUID
        assert inst.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
        assert inst.series_instance_uid == ds.SeriesInstanceUID
        assert m.study_instance_uid == ds.StudyInstanceUID
        assert inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert inst.instance_number == ds.InstanceNumber
        with source.open() as fp:
            assert fp.read() == path.read_bytes()
    # The manifest is one the receiver's hostile-input parser accepts unchanged.
    again = Manifest.from_bytes(m.to_bytes())
    assert again == m and again.digest() == m.digest()


def test_single_file_can_be_scanned(tmp_path: Path) -> None:
    first = make_study(tmp_path)[0]
    study = scan(first).study(None)
    assert len(study.manifest.instances) == 1
    assert study.sources == (Source(os.path.abspath(first)),)


def test_junk_empty_symlink_fifo_and_dicomdir_are_skipped_with_reasons(tmp_path: Path) -> None:
    files = make_study(tmp_path / "export")
    root = tmp_path / "export"
    (root / "notes.txt").write_text("radiology report follows\n" * 20)
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (root / "empty.dcm").write_bytes(b"")
    (root / "link.dcm").symlink_to(files[0])
    (root / "looplink").symlink_to(root)
    os.mkfifo(root / "pipe")
    # Preamble-less bytes that start like a data set (Specific Character Set) but hold no UIDs.
    (root / "fake.dcm").write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")
    # A real DICOMDIR written by pydicom's File-set API, plus a renamed copy of it.
    fs = FileSet()
    for f in files:
        fs.add(f)
    fs.write(tmp_path / "cd")
    shutil.copy(tmp_path / "cd" / "DICOMDIR", root / "INDEX")
    shutil.copy(tmp_path / "cd" / "DICOMDIR", root / "DICOMDIR")
    with zipfile.ZipFile(root / "nested.zip", "w") as zf:
        zf.write(files[0], "IM1.dcm")

    report = scan(root)

    assert len(report.study(None).manifest.instances) == len(files)
    assert report.reasons() == {
        "not a DICOM file": 4,
        "DICOMDIR index, not an image": 2,
        "symbolic link": 2,
        "empty file": 1,
        "not a regular file": 1,
        "zip archive inside the folder": 1,
    }
    by_name = {s.name: s.reason for s in report.skipped}
    assert by_name["empty.dcm"] == "empty file"
    assert by_name["link.dcm"] == by_name["looplink"] == "symbolic link"
    assert by_name["DICOMDIR"] == by_name["INDEX"] == "DICOMDIR index, not an image"
    assert by_name["fake.dcm"] == by_name["notes.txt"] == "not a DICOM file"
    assert by_name["pipe"] == "not a regular file"


def test_a_pydicom_written_file_set_is_read_through_its_dicomdir_folder(tmp_path: Path) -> None:
    files = make_study(tmp_path / "src")
    fs = FileSet()
    for f in files:
        fs.add(f)
    fs.write(tmp_path / "cd")
    report = scan(tmp_path / "cd")
    assert [s.reason for s in report.skipped] == ["DICOMDIR index, not an image"]
    names = sorted(i.sop_instance_uid for i in report.study(None).manifest.instances)
    assert names == sorted(str(dcmread(f).SOPInstanceUID) for f in files)


def test_files_without_preamble_are_accepted_only_with_their_uids(tmp_path: Path) -> None:
    src = make_study(tmp_path / "src")
    root = tmp_path / "in"
    root.mkdir()
    # 1. A bare data set, as old ACR-NEMA style software writes it: no preamble, no meta.
    ds = dcmread(src[0])
    del ds.file_meta
    ds.preamble = None
    dcmwrite(root / "bare", ds, implicit_vr=True, little_endian=True)
    assert (root / "bare").read_bytes()[:2] == b"\x08\x00"
    # 2. A conformant file with its preamble and "DICM" cut off (the meta group comes first).
    (root / "cut").write_bytes(src[1].read_bytes()[132:])
    # 3. A bare data set without a StudyInstanceUID is not accepted.
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = "1.2.3.4.5"
    dcmwrite(root / "nostudy", ds, implicit_vr=True, little_endian=True)

    report = scan(root)
    m = report.study(None).manifest
    by_sop = {i.sop_instance_uid: i for i in m.instances}
    bare = by_sop[str(dcmread(src[0]).SOPInstanceUID)]
    assert bare.transfer_syntax_uid == "1.2.840.10008.1.2"
    assert bare.digest == digest(root / "bare")
    cut = by_sop[str(dcmread(src[1]).SOPInstanceUID)]
    assert cut.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert cut.size == src[1].stat().st_size - 132
    assert [(s.name, s.reason) for s in report.skipped] == [("nostudy", "not a DICOM file")]


def test_conformant_file_missing_a_uid_is_skipped_with_the_uid_named(tmp_path: Path) -> None:
    src = make_study(tmp_path / "src")
    ds = dcmread(src[0])
    del ds.SeriesInstanceUID
    ds.save_as(src[0], enforce_file_format=True)
    report = scan(tmp_path / "src")
    assert len(report.study(None).manifest.instances) == len(src) - 1
    assert [s.reason for s in report.skipped] == ["missing SeriesInstanceUID"]


def test_identical_duplicates_are_counted_and_conflicting_ones_skipped(tmp_path: Path) -> None:
    files = make_study(tmp_path / "a")
    copies = tmp_path / "a" / "z-copies"
    copies.mkdir()
    shutil.copy(files[0], copies / "same1.dcm")
    shutil.copy(files[1], copies / "same2.dcm")
    data = bytearray(files[2].read_bytes())
    data[-1] ^= 0xFF  # same header, one pixel different
    (copies / "changed.dcm").write_bytes(bytes(data))

    report = scan(tmp_path / "a")

    m = report.study(None).manifest
    assert len(m.instances) == len(files)
    assert report.duplicates == 2
    assert len(report.skipped) == 1
    conflict = report.skipped[0]
    assert conflict.name == "z-copies/changed.dcm"  # the first file in name order is kept
    assert conflict.category == "conflicting duplicate"
    assert str(dcmread(files[2]).SOPInstanceUID) in conflict.reason
    kept = next(i for i in m.instances if i.sop_instance_uid == dcmread(files[2]).SOPInstanceUID)
    assert kept.digest == digest(files[2])
    assert report.reasons() == {"conflicting duplicate": 1}


# --------------------------------------------------------------------------- zip archives


def test_zip_with_nested_folders_matches_the_folder_scan(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("EXPORT/", "")
        for n, f in enumerate(files):
            zf.write(f, f"EXPORT/PATIENT/STUDY/SER{f.parent.name}/{n:03d}")
        zf.writestr("EXPORT/README.TXT", "Burned by the PACS export tool\n")
        zf.writestr("EXPORT/EMPTY", b"")

    folder = scan(tmp_path / "study").study(None)
    report = scan(archive)
    study = report.study(None)

    assert study.manifest == folder.manifest  # same sizes and hashes, byte for byte
    assert {s.path for s in study.sources} == {os.path.abspath(archive)}
    assert all(s.member and s.member.startswith("EXPORT/PATIENT/") for s in study.sources)
    assert sorted((s.name, s.reason) for s in report.skipped) == [
        ("EXPORT/EMPTY", "empty file"),
        ("EXPORT/README.TXT", "not a DICOM file"),
    ]
    for inst, source in zip(study.manifest.instances, study.sources, strict=True):
        with source.open() as fp:
            data = fp.read()
        assert len(data) == inst.size
        assert file_digest.of_bytes(data) == inst.digest
        # Persisting the source in SQLite and reading it back gives the same bytes.
        restored = Source.from_json(json.loads(json.dumps(source.to_json())))
        assert restored == source


def test_zip_dicomdir_member_and_damaged_member_are_skipped(tmp_path: Path) -> None:
    files = make_study(tmp_path / "study")
    fs = FileSet()
    for f in files:
        fs.add(f)
    fs.write(tmp_path / "cd")
    archive = tmp_path / "cd.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((tmp_path / "cd").rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(tmp_path).as_posix())
        zf.writestr("cd/zzz/broken.dcm", files[0].read_bytes())
    # Corrupt the compressed bytes of the last member: its CRC no longer matches.
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("cd/zzz/broken.dcm")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for k in range(start + info.compress_size // 2, start + info.compress_size // 2 + 8):
        raw[k] ^= 0x55
    archive.write_bytes(bytes(raw))

    report = scan(archive)

    assert len(report.study(None).manifest.instances) == len(files)
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["cd/DICOMDIR"] == "DICOMDIR index, not an image"
    assert reasons["cd/zzz/broken.dcm"].startswith("unreadable:")


def test_zip_members_compressed_with_bzip2_or_lzma_are_skipped_unopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zipfile inflates those methods without a bound (a few kilobytes of bzip2 can become
    gigabytes in memory), so they are refused by their header, never decompressed."""
    files = make_study(tmp_path / "study")
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(files[0], "a.dcm", compress_type=zipfile.ZIP_DEFLATED)
        zf.write(files[1], "b.dcm", compress_type=zipfile.ZIP_STORED)
        zf.write(files[2], "c.dcm", compress_type=zipfile.ZIP_BZIP2)
        zf.write(files[3], "d.dcm", compress_type=zipfile.ZIP_LZMA)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def watch(
        self: zipfile.ZipFile, name: str | zipfile.ZipInfo, *a: object, **kw: object
    ) -> object:
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", watch)

    report = scan(archive)

    assert len(report.study(None).manifest.instances) == 2
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {"c.dcm": ingest.REASON_ZIP_METHOD, "d.dcm": ingest.REASON_ZIP_METHOD}
    assert "extract the archive" in ingest.REASON_ZIP_METHOD
    assert sorted(opened) == ["a.dcm", "b.dcm"]


def test_source_open_fails_with_input_error_when_the_file_is_gone(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="scan the study again"):
        Source(str(tmp_path / "gone.dcm")).open()
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("x", b"1")
    with pytest.raises(InputError):
        Source(str(tmp_path / "a.zip"), "missing-member").open()
    with pytest.raises(InputError):
        Source.from_json({"path": 3})
    with pytest.raises(InputError):
        Source.from_json({"path": "/x", "member": 1})


# --------------------------------------------------------------------------- studies


def test_two_studies_need_a_choice_and_study_uid_picks_one(tmp_path: Path) -> None:
    make_study(tmp_path / "in" / "second", seed=40, patient_id="P-2")
    make_study(tmp_path / "in" / "first", seed=5, patient_id="P-1")
    report = scan(tmp_path / "in")

    assert len(report.studies) == 2
    dates = [s.manifest.study_date for s in report.studies]
    assert dates == sorted(dates) and dates[0] != dates[1]
    with pytest.raises(StudyChoiceError) as excinfo:
        report.study(None)
    listed = excinfo.value.studies
    assert [d["uid"] for d in listed] == [s.manifest.study_instance_uid for s in report.studies]
    for entry in listed:
        assert set(entry) >= {"uid", "description", "date", "modalities", "instances", "bytes"}
        assert entry["instances"] == 7 and entry["modalities"] == ["CT"]
        assert entry["description"] == "CT TRAUMA PAN-SCAN"
        assert isinstance(entry["bytes"], int) and entry["bytes"] > 0
        assert str(entry["uid"]) in str(excinfo.value)
    for s in report.studies:
        uid = s.manifest.study_instance_uid
        chosen = report.study(uid)
        assert chosen.manifest.study_instance_uid == uid
        assert {i.sop_instance_uid for i in chosen.manifest.instances} == {
            str(dcmread(src.path, stop_before_pixels=True).SOPInstanceUID) for src in chosen.sources
        }
    assert report.study(listed[1]["uid"]).manifest.patient["id"] in {"P-1", "P-2"}  # type: ignore[arg-type]
    with pytest.raises(InputError, match="not in"):
        report.study("1.2.3.999")


def test_nothing_usable_explains_what_was_skipped(tmp_path: Path) -> None:
    root = tmp_path / "stuff"
    root.mkdir()
    (root / "a.txt").write_text("hello")
    (root / "b.txt").write_text("world")
    (root / "c").write_bytes(b"")
    report = scan(root)
    assert report.studies == ()
    with pytest.raises(InputError) as excinfo:
        report.study(None)
    message = str(excinfo.value)
    assert message.startswith(f"no DICOM images found in {root}: 3 files skipped")
    assert "2 not a DICOM file" in message and "1 empty file" in message
    assert not isinstance(excinfo.value, StudyChoiceError)

    (tmp_path / "void").mkdir()
    with pytest.raises(InputError, match="no DICOM images found"):
        scan(tmp_path / "void").study(None)


def test_bad_paths_raise_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this was never finished")
    with pytest.raises(InputError, match="zip archive"):
        scan(tmp_path / "broken.zip")
    (tmp_path / "renamed.zip").write_bytes(b"not a zip at all")
    with pytest.raises(InputError, match="zip archive"):
        scan(tmp_path / "renamed.zip")
    with pytest.raises(ConfigError):
        scan(tmp_path, chunk_size=10)


def test_long_text_is_truncated_and_bad_numbers_do_not_cost_the_file(tmp_path: Path) -> None:
    src = make_study(tmp_path / "s")
    ds = dcmread(src[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.StudyDescription = "X" * 400
        ds.SeriesDescription = "Y" * 300
    ds.save_as(src[0], enforce_file_format=True)
    m = scan(tmp_path / "s").study(None).manifest
    assert m.study_description == "X" * 256
    assert m.series[0].description == "Y" * 256
    Manifest.from_dict(m.to_dict())


def test_pydicom_never_leaks_values_into_logs_or_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "ZZPRIVATEZZ"
    folder = tmp_path / f"DOE^{secret}"
    src = make_study(folder, patient_name=f"DOE^{secret}", transfer_syntax=ImplicitVRLittleEndian)
    ds = dcmread(src[0])
    # Implicit VR: the reader takes IS from the dictionary and must reject this value.
    ds[0x00200013] = DataElement(0x00200013, "LO", secret)
    ds.save_as(src[0], enforce_file_format=True)
    # Control: plain pydicom does quote the value when it reads this file.
    with pytest.warns(UserWarning, match=secret), contextlib.suppress(Exception):
        _ = dcmread(src[0]).InstanceNumber
    assert secret in caplog.text

    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = scan(folder)
    m = report.study(None).manifest
    assert len(m.instances) == len(src)
    assert None in {i.instance_number for i in m.instances}
    assert secret not in caplog.text
    assert not [w for w in caught if secret in str(w.message)]
    assert caplog.records  # the scan itself did log (counts only)


def test_hashing_streams_the_file_in_bounded_memory(tmp_path: Path) -> None:
    big = generate_ct_study(
        tmp_path / "big", series=[SeriesSpec("BIG", 1, 2048, 2048, 1.0, "abdomen")]
    )[0]
    assert big.stat().st_size > ingest.WHOLE_READ_BYTES  # streamed, not read whole
    tracemalloc.start()
    try:
        report = scan(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.study(None).manifest.instances[0].digest == digest(big)
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize("listed", ["smaller", "larger"])
def test_a_file_that_changed_size_since_it_was_listed_is_hashed_as_it_is_now(
    tmp_path: Path, listed: str
) -> None:
    """An ordinary file is read once, whole, at the size the listing gave; one that grew since
    is streamed instead, so its digest and size always cover the bytes that will be sent."""
    path = make_study(tmp_path / "s")[0]
    size = path.stat().st_size
    item = ingest._Candidate(
        path.name,
        Source(str(path)),
        functools.partial(path.open, "rb"),
        size - 100 if listed == "smaller" else size + 100,
    )
    found = ingest._inspect(item)
    assert isinstance(found, ingest._Found)
    assert (found.size, found.digest) == (size, digest(path))
    assert found.header.sop_instance_uid == dcmread(path).SOPInstanceUID


def test_report_reasons_use_the_text_before_the_colon() -> None:
    report = ScanReport(
        studies=(),
        skipped=(
            Skipped("a", "unreadable: permission denied"),
            Skipped("b", "unreadable: damaged DICOM header"),
            Skipped("c", "not a DICOM file"),
        ),
        duplicates=0,
    )
    assert report.reasons() == {"unreadable": 2, "not a DICOM file": 1}


# --------------------------------------------------------------------------- other encodings

BUNDLED = [
    ("CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    # No file meta at all: the encoding pydicom detected.
    ("ExplVR_LitEndNoMeta.dcm", "1.2.840.10008.1.2.1"),
    ("ExplVR_BigEndNoMeta.dcm", "1.2.840.10008.1.2.2"),
    ("rtstruct.dcm", "1.2.840.10008.1.2"),
]


@pytest.mark.parametrize(("name", "transfer_syntax"), BUNDLED)
def test_bundled_files_keep_their_transfer_syntax_and_bytes(
    tmp_path: Path, name: str, transfer_syntax: str
) -> None:
    original = bundled(name)
    copy = tmp_path / "in" / "sub" / name
    copy.parent.mkdir(parents=True)
    shutil.copy(original, copy)
    report = scan(tmp_path / "in")
    assert report.skipped == ()
    study = report.study(None)
    (inst,) = study.manifest.instances
    assert inst.transfer_syntax_uid == transfer_syntax
    assert inst.size == original.stat().st_size
    assert inst.digest == digest(original)
    ds = dcmread(original, force=True, stop_before_pixels=True)
    assert inst.sop_instance_uid == ds.SOPInstanceUID
    assert study.manifest.study_instance_uid == ds.StudyInstanceUID
    Manifest.from_dict(study.manifest.to_dict())


def test_many_encodings_in_one_folder_share_a_study_scan(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    root.mkdir()
    for name, _ in BUNDLED:
        with contextlib.suppress(pytest.skip.Exception):
            shutil.copy(bundled(name), root / name)
    shutil.copy(bundled("JPEGLSNearLossless_08.dcm"), root / "nostudy.dcm")
    report = scan(root)
    found = {i.transfer_syntax_uid for s in report.studies for i in s.manifest.instances}
    assert found >= {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.1.99"}
    # The MR_small variants are the same instance in different encodings: different bytes.
    assert report.reasons().get("conflicting duplicate", 0) >= 1
    assert ("nostudy.dcm", "missing StudyInstanceUID") in {
        (s.name, s.reason) for s in report.skipped
    }
    with pytest.raises(StudyChoiceError):
        report.study(None)
