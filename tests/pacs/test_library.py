"""The study library: imports from CD (DICOMDIR), zip and folders, duplicates, reports."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.fileset import FileSet
from pydicom.uid import (
    JPEG2000,
    BasicTextSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
)

from p2pshare.dicom.ingest import scan
from p2pshare.errors import InputError
from p2pshare.library import COMPLETE, Library, study_id_for


def make_cd(ct_study: Path, root: Path) -> Path:
    """A disc as a PDI exporter writes it: DICOMDIR + PT/ST/SE/IM files, plus the usual junk."""
    fs = FileSet()
    for f in sorted(ct_study.rglob("*.dcm")):
        fs.add(f)
    fs.write(root)
    (root / "AUTORUN.INF").write_text("[autorun]\nopen=viewer.exe\n")
    (root / "VIEWER").mkdir()
    (root / "VIEWER" / "viewer.exe").write_bytes(b"MZ" + b"\0" * 300)
    (root / "README.TXT").write_text("Images for the patient's doctor")
    (root / "EMPTY").write_bytes(b"")
    return root


def test_cd_with_dicomdir_and_junk(ct_study: Path, tmp_path: Path) -> None:
    cd = make_cd(ct_study, tmp_path / "cd")
    lib = Library(tmp_path / "data")
    report = lib.import_path(cd)
    assert report["imported"] == 7 and report["duplicates"] == 0
    assert report["dicomdir"] == {"found": True, "referenced": 7, "missing": []}
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"AUTORUN.INF", "VIEWER/viewer.exe", "README.TXT", "EMPTY", "DICOMDIR"}
    (study,) = report["studies"]
    record = lib.get(study["study_id"])
    assert record["state"] == COMPLETE and record["source"] == "import"
    assert record["instances"] == 7 and sorted(s["instances"] for s in record["series"]) == [3, 4]
    assert "patient" not in str(record).lower()  # the summary is patient-free
    # what the library holds is exactly the study, readable by the offer's scan
    offered = scan(lib.path_of(study["study_id"])).study(None)
    assert sorted(i.digest for i in offered.manifest.instances) == sorted(
        scan(ct_study).study(None).manifest.instances[i].digest for i in range(7)
    )


def test_cd_missing_a_listed_file_is_reported(ct_study: Path, tmp_path: Path) -> None:
    cd = make_cd(ct_study, tmp_path / "cd")
    victim = sorted((cd / "PT000000").rglob("IM*"))[0]
    victim.unlink()
    report = Library(tmp_path / "data").import_path(cd)
    assert report["imported"] == 6
    assert report["dicomdir"]["referenced"] == 7
    assert report["dicomdir"]["missing"] == [victim.relative_to(cd).as_posix()]


def test_damaged_dicomdir_is_reported_not_fatal(ct_study: Path, tmp_path: Path) -> None:
    folder = tmp_path / "disc"
    shutil.copytree(ct_study, folder)
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    report = Library(tmp_path / "data").import_path(folder)
    assert report["imported"] == 7
    assert any("DICOMDIR unreadable" in s["reason"] for s in report["skipped"])


def test_zip_with_nested_folders_and_duplicates(ct_study: Path, tmp_path: Path) -> None:
    archive = tmp_path / "study.zip"
    files = sorted(ct_study.rglob("*.dcm"))
    with zipfile.ZipFile(archive, "w") as z:
        for n, f in enumerate(files):
            z.write(f, f"export/patient/{'a/b' if n % 2 else 'c'}/{f.name}")
        z.write(files[0], "export/again/copy.dcm")  # the same instance twice
        z.writestr("export/notes.txt", "not an image")
        z.writestr("export/broken.dcm", files[1].read_bytes()[:200])
    lib = Library(tmp_path / "data")
    report = lib.import_path(archive)
    assert report["imported"] == 7
    assert report["duplicates"] == 1
    assert {s["name"] for s in report["skipped"]} == {"export/notes.txt", "export/broken.dcm"}
    again = lib.import_path(archive)  # importing the same zip twice adds nothing
    assert again["imported"] == 0 and again["duplicates"] == 8
    assert lib.get(report["studies"][0]["study_id"])["instances"] == 7


def test_pydicom_examples_in_different_transfer_syntaxes(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    names = {
        "CT_small.dcm": "a",
        "MR_small.dcm": "b",  # the MR files share one SOP Instance UID: one kept, 3 duplicates
        "MR_small_bigendian.dcm": "c",
        "MR_small_jp2klossless.dcm": "d",
        "MR_small_RLE.dcm": "e",
        "SC_rgb_jpeg_gdcm.dcm": "f",
        "JPEG2000.dcm": "g",
        "rtplan.dcm": "h/i",
    }
    for name, sub in names.items():
        path = get_testdata_file(name)
        assert path is not None, name
        (folder / sub).mkdir(parents=True)
        shutil.copy(path, folder / sub / name)
    lib = Library(tmp_path / "data")
    report = lib.import_path(folder)
    assert report["imported"] == 5 and report["duplicates"] == 3
    assert report["skipped"] == []
    assert len(report["studies"]) == 5
    syntaxes = set()
    for s in lib.list():
        for f in lib.path_of(s["study_id"]).rglob("*.dcm"):
            syntaxes.add(str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID))
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1, JPEG2000} <= syntaxes
    assert syntaxes & {ExplicitVRLittleEndian, ExplicitVRBigEndian}
    # files are kept byte for byte
    ct = lib.path_of(study_id_for("1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"))
    (stored,) = list(ct.rglob("*.dcm"))
    assert stored.read_bytes() == Path(get_testdata_file("CT_small.dcm") or "").read_bytes()


def test_attach_pdf_and_text_reports(ct_study: Path, tmp_path: Path) -> None:
    lib = Library(tmp_path / "data")
    sid = lib.import_path(ct_study)["studies"][0]["study_id"]
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n")
    text = tmp_path / "report.txt"
    text.write_text("CT head: no acute haemorrhage.\nBefund: unauffällig.", encoding="utf-8")
    as_pdf = lib.attach_report(sid, pdf)
    as_sr = lib.attach_report(sid, text)
    assert (as_pdf["kind"], as_sr["kind"]) == ("pdf", "text")
    assert lib.get(sid)["instances"] == 9
    image = dcmread(sorted(ct_study.rglob("*.dcm"))[0])
    by_sop = {
        str(dcmread(p).SOPInstanceUID): dcmread(p) for p in lib.path_of(sid).rglob("*.dcm")
    }
    doc, sr = by_sop[as_pdf["sop_instance_uid"]], by_sop[as_sr["sop_instance_uid"]]
    assert doc.SOPClassUID == EncapsulatedPDFStorage and sr.SOPClassUID == BasicTextSRStorage
    assert doc.EncapsulatedDocument.rstrip(b"\0") == pdf.read_bytes()
    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert sr.ContentSequence[0].TextValue == text.read_text(encoding="utf-8")
    for ds in (doc, sr):
        assert ds.StudyInstanceUID == image.StudyInstanceUID
        assert ds.PatientID == image.PatientID and ds.PatientName == image.PatientName
        assert ds.SeriesInstanceUID != image.SeriesInstanceUID
    # it travels with the study: the offer's scan sees the report in the same study
    assert len(scan(lib.path_of(sid)).study(None).manifest.instances) == 9


def test_report_that_is_neither_pdf_nor_text(ct_study: Path, tmp_path: Path) -> None:
    lib = Library(tmp_path / "data")
    sid = lib.import_path(ct_study)["studies"][0]["study_id"]
    junk = tmp_path / "scan.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    with pytest.raises(InputError, match="neither a PDF nor plain text"):
        lib.attach_report(sid, junk)
    assert lib.get(sid)["instances"] == 7


def test_unknown_study_and_delete(ct_study: Path, tmp_path: Path) -> None:
    lib = Library(tmp_path / "data")
    with pytest.raises(InputError, match="no study with id"):
        lib.path_of("0" * 20)
    sid = lib.import_path(ct_study)["studies"][0]["study_id"]
    folder = lib.path_of(sid)
    lib.delete(sid)
    assert not folder.exists() and lib.list() == []
    with pytest.raises(InputError):
        lib.get(sid)


def test_records_survive_a_restart_and_quiet_period(ct_study: Path, tmp_path: Path) -> None:
    now = [1000.0]
    lib = Library(tmp_path / "data", clock=lambda: now[0])
    for f in sorted(ct_study.rglob("*.dcm")):
        stored = lib.store_bytes(f.read_bytes(), "scp")
    assert lib.get(stored.study_id)["state"] == "receiving"
    assert lib.due(10.0) == []
    now[0] += 10.0
    assert lib.due(10.0) == [stored.study_id]
    lib.mark_complete(stored.study_id)
    again = Library(tmp_path / "data", clock=lambda: now[0])
    assert again.get(stored.study_id)["state"] == COMPLETE
    # a late instance of a complete study reopens it; a repeated one is a duplicate
    assert again.store_bytes(f.read_bytes(), "scp").outcome == "duplicate"
    assert again.get(stored.study_id)["duplicates"] == 1


def test_import_of_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Library(tmp_path / "data").import_path(tmp_path / "nope")
