"""Seeded, synthetic CT studies: something realistic to send without touching patient data.

``p2pshare demo`` and the benchmarks need a study that behaves like a real emergency CT: hundreds
of 512x512 16-bit slices, several series, complete DICOM headers (patient, study, series, frame
of reference, geometry, rescale and windowing) and pixel data a viewer shows as recognisable
anatomy. Real studies cannot be bundled, so this module builds one: it holds the series presets,
builds the headers and writes the files, and leaves drawing the pixels to
:mod:`p2pshare.dicom.phantom`.

Two properties matter more than anatomical accuracy:

* **Determinism.** The same seed and parameters give byte-identical files: UIDs are hashed from
  the inputs (``generate_uid(entropy_srcs=...)``), dates and times are derived from the seed, and
  the noise comes from a generator seeded per series. Benchmarks and end-to-end tests can
  therefore compare hashes across runs and machines.
* **Speed.** A 600-slice, ~300 MB study must be produced in seconds: the phantom paints cheaply,
  and the header is built once per series and only the per-slice elements are replaced before
  each write.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from p2pshare.dicom.phantom import FOV, INTERCEPT, Painter
from p2pshare.errors import ConfigError

__all__ = [
    "SeriesSpec",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "bench_series",
    "demo_series",
    "generate_ct_study",
]

logger = logging.getLogger(__name__)

SUPPORTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
)

_REGIONS = ("head", "chest", "abdomen")
#: Table position (mm) of the most superior slice of each region; slices step towards the feet.
_Z_TOP = {"head": 0.0, "chest": -250.0, "abdomen": -560.0}
_BODY_PART = {"head": "HEAD", "chest": "CHEST", "abdomen": "ABDOMEN"}
_KERNEL = {"head": "H30 BRAIN", "chest": "B35 SOFT", "abdomen": "B30 SOFT"}
_WINDOWS = {
    "head": (["40", "600"], ["80", "2800"], ["BRAIN", "BONE"]),
    "chest": (["40", "-600"], ["400", "1500"], ["MEDIASTINUM", "LUNG"]),
    "abdomen": (["50", "400"], ["400", "1800"], ["ABDOMEN", "BONE"]),
}


@dataclass(frozen=True)
class SeriesSpec:
    """One axial CT series: how many slices, their matrix and thickness, and the body region."""

    description: str
    slices: int
    rows: int = 512
    columns: int = 512
    slice_thickness: float = 2.5
    region: str = "chest"  # "head" | "chest" | "abdomen"

    @property
    def pixel_bytes(self) -> int:
        """Bytes of uncompressed 16-bit pixel data in the whole series."""
        return self.slices * self.rows * self.columns * 2


def demo_series() -> list[SeriesSpec]:
    """A small trauma pan-scan (about 14 MB) that generates and transfers in a moment."""
    return [
        SeriesSpec("HEAD 5.0 BRAIN", 30, 256, 256, 5.0, "head"),
        SeriesSpec("CHEST 7.5 SOFT TISSUE", 40, 256, 256, 7.5, "chest"),
        SeriesSpec("ABDOMEN 7.5 SOFT TISSUE", 40, 256, 256, 7.5, "abdomen"),
    ]


def bench_series(slices: int = 600) -> list[SeriesSpec]:
    """A full-size pan-scan of ``slices`` 512x512 slices (~300 MB for 600) in up to 3 series."""
    if slices < 1:
        raise ConfigError("a benchmark study needs at least one slice")
    if slices < 3:
        return [SeriesSpec("CHEST 1.25 SOFT TISSUE", slices, slice_thickness=1.25)]
    head = max(1, slices // 5)
    chest = max(1, (slices * 2) // 5)
    abdomen = slices - head - chest
    return [
        SeriesSpec("HEAD 1.25 BRAIN", head, slice_thickness=1.25, region="head"),
        SeriesSpec("CHEST 1.25 SOFT TISSUE", chest, slice_thickness=1.25, region="chest"),
        SeriesSpec("ABDOMEN 1.25 SOFT TISSUE", abdomen, slice_thickness=1.25, region="abdomen"),
    ]


def generate_ct_study(
    out_dir: str | Path,
    *,
    seed: int = 1,
    series: Sequence[SeriesSpec] | None = None,
    patient_name: str = "DEMO^TRAUMA PATIENT",
    patient_id: str = "DEMO-0001",
    birth_date: str = "19700101",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write one synthetic CT study below ``out_dir`` and return the files in series/slice order.

    Files are ``out_dir/<series number>/IM<nnnn>.dcm``; existing files of the same name are
    overwritten. The same arguments always produce byte-identical files.
    """
    specs = list(series) if series is not None else demo_series()
    _check(specs, transfer_syntax)
    out = Path(out_dir)
    fingerprint = _fingerprint(seed, specs, patient_name, patient_id, birth_date, transfer_syntax)
    study_uid = _uid(fingerprint, "study")
    frame_uid = _uid(fingerprint, "frame-of-reference")
    start = datetime(2024, 1, 1, 0, 0, 0) + timedelta(
        days=seed % 366, seconds=(seed * 7919) % 86_400
    )
    study = _study_dataset(seed, start, study_uid, frame_uid, patient_name, patient_id, birth_date)
    written: list[Path] = []
    for index, spec in enumerate(specs):
        number = index + 1
        series_uid = _uid(fingerprint, "series", str(number))
        when = start + timedelta(minutes=2 * index + 1)
        folder = out / str(number)
        folder.mkdir(parents=True, exist_ok=True)
        ds = _series_dataset(study, spec, number, series_uid, when, transfer_syntax)
        rng = np.random.default_rng([seed & 0xFFFFFFFF, number, 0xC7])
        painter = Painter(spec, rng)
        for i in range(spec.slices):
            u = i / (spec.slices - 1) if spec.slices > 1 else 0.5
            z = _Z_TOP[spec.region] - i * spec.slice_thickness
            pixels = painter.slice(u, z)
            sop_uid = _uid(fingerprint, "instance", str(number), str(i + 1))
            path = folder / f"IM{i + 1:04d}.dcm"
            _write_slice(ds, path, sop_uid, i + 1, z, pixels, transfer_syntax)
            written.append(path)
    logger.info(
        "generated synthetic CT study %s: %d series, %d files",
        study_uid,
        len(specs),
        len(written),
    )
    return written


# --------------------------------------------------------------------------------- headers


def _check(specs: list[SeriesSpec], transfer_syntax: str) -> None:
    if not specs:
        raise ConfigError("a synthetic study needs at least one series")
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ConfigError(
            f"transfer syntax {transfer_syntax} is not supported by the synthetic generator; "
            f"use one of {', '.join(SUPPORTED_TRANSFER_SYNTAXES)}"
        )
    for spec in specs:
        if spec.region not in _REGIONS:
            raise ConfigError(f"unknown body region {spec.region!r}: use head, chest or abdomen")
        if not 1 <= spec.slices <= 10_000:
            raise ConfigError("a series needs between 1 and 10000 slices")
        if not (8 <= spec.rows <= 4096 and 8 <= spec.columns <= 4096):
            raise ConfigError("rows and columns must be between 8 and 4096")
        if not 0.1 <= spec.slice_thickness <= 50:
            raise ConfigError("slice thickness must be between 0.1 and 50 mm")


def _fingerprint(
    seed: int,
    specs: list[SeriesSpec],
    patient_name: str,
    patient_id: str,
    birth_date: str,
    transfer_syntax: str,
) -> str:
    parts = [str(seed), patient_name, patient_id, birth_date, transfer_syntax]
    parts += [repr(s) for s in specs]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _uid(fingerprint: str, *what: str) -> str:
    return str(generate_uid(entropy_srcs=["p2pshare-synthetic", fingerprint, *what]))


def _age(birth_date: str, on: date) -> str | None:
    try:
        born = datetime.strptime(birth_date, "%Y%m%d").date()
    except ValueError:
        return None
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return f"{years:03d}Y" if 0 <= years <= 999 else None


def _study_dataset(
    seed: int,
    start: datetime,
    study_uid: str,
    frame_uid: str,
    patient_name: str,
    patient_id: str,
    birth_date: str,
) -> Dataset:
    ds = Dataset()
    if not (patient_name + patient_id).isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = start.strftime("%Y%m%d")
    ds.StudyTime = start.strftime("%H%M%S")
    ds.AccessionNumber = f"SYN{seed % 10**10:010d}"
    ds.Modality = "CT"
    ds.Manufacturer = "p2pshare"
    ds.InstitutionName = "Synthetic Referring Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTH-CT1"
    ds.StudyDescription = "CT TRAUMA PAN-SCAN"
    ds.ManufacturerModelName = "Synthetic CT"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "O"
    age = _age(birth_date, start.date())
    if age is not None:
        ds.PatientAge = age
    ds.KVP = "120"
    ds.SoftwareVersions = "p2pshare synthetic 1"
    ds.DataCollectionDiameter = "500"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 250
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = str(seed % 10**8)
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = str(int(INTERCEPT))
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _series_dataset(
    study: Dataset,
    spec: SeriesSpec,
    number: int,
    series_uid: str,
    when: datetime,
    transfer_syntax: str,
) -> Dataset:
    ds = copy.deepcopy(study)
    day, clock = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = clock
    ds.SeriesDescription = spec.description
    ds.BodyPartExamined = _BODY_PART[spec.region]
    ds.SliceThickness = _ds(spec.slice_thickness)
    ds.ReconstructionDiameter = _ds(FOV[spec.region])
    ds.ConvolutionKernel = _KERNEL[spec.region]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    spacing = FOV[spec.region] / max(spec.rows, spec.columns)
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    center, width, explanation = _WINDOWS[spec.region]
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = explanation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters, without float noise."""
    return f"{value:.6f}".rstrip("0").rstrip(".")[:16]


def _write_slice(
    ds: Dataset,
    path: Path,
    sop_uid: str,
    number: int,
    z: float,
    pixels: npt.NDArray[np.uint16],
    transfer_syntax: str,
) -> None:
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = number
    rows, columns = int(ds.Rows), int(ds.Columns)
    spacing = float(ds.PixelSpacing[0])
    ds.ImagePositionPatient = [
        _ds(-(columns - 1) / 2 * spacing),
        _ds(-(rows - 1) / 2 * spacing),
        _ds(z),
    ]
    ds.SliceLocation = _ds(z)
    if transfer_syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds[0x7FE00010] = DataElement(0x7FE00010, "OW", pixels.tobytes())
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    else:
        order = ">u2" if transfer_syntax == ExplicitVRBigEndian else "<u2"
        data = pixels.astype(order, copy=False).tobytes()
        ds[0x7FE00010] = DataElement(0x7FE00010, "OW", data)
    dcmwrite(path, ds, enforce_file_format=True)


#: where benchmarks keep their generated studies between runs (``--cache``)
BENCH_CACHE = Path(tempfile.gettempdir()) / "p2pshare-bench"


def study_files(study: Path) -> list[Path]:
    """Every file below ``study``, in the order benchmarks number them (sorted paths)."""
    return sorted(p for p in study.rglob("*") if p.is_file())


def cached_bench_study(cache: Path, slices: int, say: Callable[[str], None] = print) -> Path:
    """The seeded benchmark study of ``slices`` slices (:func:`bench_series`), generated once
    into ``cache/ct-<slices>`` and reused by later runs; a cut-short generation is not kept."""
    study = cache / f"ct-{slices}"
    if not study.exists():
        say(f"generating a {slices}-slice CT study in {study} …")
        tmp = study.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_ct_study(tmp, seed=1, series=bench_series(slices))
        tmp.rename(study)
    return study
