from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from p2pshare.dicom.synthetic import SeriesSpec, bench_series, demo_series, generate_ct_study
from p2pshare.errors import ConfigError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SPECS = [
    SeriesSpec("HEAD SMALL", 4, 64, 64, 5.0, "head"),
    SeriesSpec("CHEST SMALL", 5, 64, 64, 2.5, "chest"),
    SeriesSpec("ABDOMEN WIDE", 3, 48, 80, 7.5, "abdomen"),
]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def hu(path: Path) -> np.ndarray:
    ds = dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    a = generate_ct_study(tmp_path / "a", seed=7, series=SPECS)
    b = generate_ct_study(tmp_path / "b", seed=7, series=SPECS)
    c = generate_ct_study(tmp_path / "c", seed=8, series=SPECS)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    other = tree(tmp_path / "c")
    assert other.keys() == tree(tmp_path / "a").keys()
    assert all(other[k] != v for k, v in tree(tmp_path / "a").items())
    uids_a = {str(dcmread(p).SOPInstanceUID) for p in a}
    uids_c = {str(dcmread(p).SOPInstanceUID) for p in c}
    assert len(uids_a) == len(a) and not uids_a & uids_c
    # Same seed, another patient: different UIDs too (two demo patients never collide).
    d = generate_ct_study(tmp_path / "d", seed=7, series=SPECS, patient_id="OTHER")
    assert dcmread(d[0]).StudyInstanceUID != dcmread(a[0]).StudyInstanceUID


def test_layout_counts_and_study_level_headers(tmp_path: Path) -> None:
    files = generate_ct_study(
        tmp_path, seed=3, series=SPECS, patient_name="TEST^PATIENT", patient_id="T-9"
    )
    assert len(files) == sum(s.slices for s in SPECS)
    expected = [f"{n + 1}/IM{i + 1:04d}.dcm" for n, s in enumerate(SPECS) for i in range(s.slices)]
    assert [p.relative_to(tmp_path).as_posix() for p in files] == expected
    datasets = [dcmread(p) for p in files]
    first = datasets[0]
    assert first.preamble == b"\x00" * 128
    assert first.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert first.file_meta.ImplementationClassUID
    for ds in datasets:
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT"
        assert ds.StudyInstanceUID == first.StudyInstanceUID
        assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert ds.StudyDescription == "CT TRAUMA PAN-SCAN"
        assert ds.InstitutionName == "Synthetic Referring Hospital"
        assert ds.ReferringPhysicianName == ""
        assert ds.PatientName == "TEST^PATIENT" and ds.PatientID == "T-9"
        assert ds.PatientBirthDate == "19700101"
        assert ds.AccessionNumber and ds.StudyDate == first.StudyDate
        assert len(ds.StudyDate) == 8 and len(ds.StudyTime) == 6
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    series = {ds.SeriesInstanceUID: ds.SeriesNumber for ds in datasets}
    assert sorted(series.values()) == [1, 2, 3]
    descriptions = {int(ds.SeriesNumber): ds.SeriesDescription for ds in datasets}
    assert descriptions == {1: "HEAD SMALL", 2: "CHEST SMALL", 3: "ABDOMEN WIDE"}


@pytest.mark.parametrize("index", range(len(SPECS)))
def test_geometry_and_image_pixel_module(tmp_path: Path, index: int) -> None:
    spec = SPECS[index]
    files = generate_ct_study(tmp_path, series=[spec])
    datasets = [dcmread(p) for p in files]
    zs = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(zs), -spec.slice_thickness)
    for n, ds in enumerate(datasets, start=1):
        assert ds.InstanceNumber == n
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == spec.slice_thickness
        assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
        sx, sy = (float(v) for v in ds.PixelSpacing)
        assert sx == sy > 0
        # The image is centred on the table axis.
        x0, y0 = float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1])
        assert x0 == pytest.approx(-(spec.columns - 1) / 2 * sx, abs=1e-3)
        assert y0 == pytest.approx(-(spec.rows - 1) / 2 * sy, abs=1e-3)
        assert (ds.Rows, ds.Columns) == (spec.rows, spec.columns)
        assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16)
        assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation == 0
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.RescaleType == "HU"
        assert ds.WindowCenter is not None and ds.WindowWidth is not None
        assert float(ds.KVP) > 0
        assert ds.pixel_array.shape == (spec.rows, spec.columns)
        assert int(ds.pixel_array.max()) < 2**ds.BitsStored
        assert len(ds.PixelData) == spec.rows * spec.columns * 2


def test_pixels_look_like_ct(tmp_path: Path) -> None:
    specs = [
        SeriesSpec("HEAD", 5, 128, 128, 5.0, "head"),
        SeriesSpec("CHEST", 5, 128, 128, 10.0, "chest"),
        SeriesSpec("ABDOMEN", 5, 128, 128, 10.0, "abdomen"),
    ]
    files = generate_ct_study(tmp_path, seed=11, series=specs)
    head, chest, abdomen = (hu(files[k * 5 + 2]) for k in range(3))
    for image in (head, chest, abdomen):
        assert image.min() < -900  # air around the patient
        assert image.max() > 300  # bone
        assert image[0, 0] == -1024  # outside the reconstruction circle
        assert (np.abs(image - 40) < 60).mean() > 0.05  # soft tissue
    assert ((chest > -950) & (chest < -750)).mean() > 0.05  # lungs
    assert ((head > 15) & (head < 50)).mean() > 0.15  # brain
    assert (head > 700).mean() > 0.01  # skull
    assert (abdomen > 300).mean() < 0.05  # mostly not bone
    # Anatomy changes smoothly: neighbouring slices are closer than distant ones.
    chest_slices = [np.clip(hu(p), -200, 300) for p in files[5:10]]
    near = np.abs(chest_slices[2] - chest_slices[1]).mean()
    far = np.abs(chest_slices[4] - chest_slices[0]).mean()
    assert 0 < near < far
    # Seeded noise: no two slices share their exact pixel values even where anatomy is equal.
    assert not np.array_equal(chest_slices[1], chest_slices[2])


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_other_transfer_syntaxes_hold_the_same_pixels(tmp_path: Path, syntax: str) -> None:
    spec = [SeriesSpec("CHEST", 2, 48, 48, 5.0, "chest")]
    plain = generate_ct_study(tmp_path / "plain", seed=5, series=spec)
    other = generate_ct_study(tmp_path / "other", seed=5, series=spec, transfer_syntax=syntax)
    generate_ct_study(tmp_path / "again", seed=5, series=spec, transfer_syntax=syntax)
    assert tree(tmp_path / "other") == tree(tmp_path / "again")
    for p, o in zip(plain, other, strict=True):
        ds = dcmread(o)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert np.array_equal(ds.pixel_array, dcmread(p).pixel_array)


def test_series_presets() -> None:
    demo = demo_series()
    assert {s.region for s in demo} == {"head", "chest", "abdomen"}
    demo_bytes = sum(s.slices * s.rows * s.columns * 2 for s in demo)
    assert 10_000_000 <= demo_bytes <= 20_000_000

    bench = bench_series(600)
    assert 2 <= len(bench) <= 3
    assert sum(s.slices for s in bench) == 600
    assert all((s.rows, s.columns) == (512, 512) for s in bench)
    bench_bytes = sum(s.slices * s.rows * s.columns * 2 for s in bench)
    assert bench_bytes == sum(s.pixel_bytes for s in bench) == 600 * 512 * 512 * 2
    assert 290_000_000 <= bench_bytes <= 330_000_000  # ~300 MB (plus ~2 KB of header a file)
    assert sum(s.slices for s in bench_series(1001)) == 1001
    assert sum(s.slices for s in bench_series(2)) == 2
    with pytest.raises(ConfigError):
        bench_series(0)


def test_full_size_slices_are_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    files = generate_ct_study(tmp_path, series=bench_series(20))
    elapsed = time.perf_counter() - start
    assert len(files) == 20
    assert all(p.stat().st_size > 512 * 512 * 2 for p in files)
    assert elapsed < 5.0  # ~0.1 s here; 600 slices must stay well under 20 s


def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="region"):
        generate_ct_study(tmp_path, series=[SeriesSpec("X", 1, 16, 16, region="knee")])
    with pytest.raises(ConfigError, match="transfer syntax"):
        generate_ct_study(tmp_path, transfer_syntax="1.2.840.10008.1.2.4.50")
    with pytest.raises(ConfigError):
        generate_ct_study(tmp_path, series=[SeriesSpec("X", 0)])
    with pytest.raises(ConfigError):
        generate_ct_study(tmp_path, series=[])
    assert not list(tmp_path.iterdir())
