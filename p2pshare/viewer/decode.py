"""Decode one received DICOM instance for the browser: header facts, pixels, thumbnails.

Decoding goes through pydicom and the pylibjpeg plugins (JPEG lossless and baseline, JPEG-LS,
JPEG 2000, RLE), never through a codec of our own. The browser gets each frame once, after the
modality LUT (so CT values are Hounsfield units), in a compact binary form, and does window/level
itself; the server does windowing only for thumbnails.

Wire form of a frame (``encode``)::

    "P2PX" | header length: u32 little-endian | header JSON, space-padded so the pixels start
    at a multiple of 8 | pixels: rows × columns × samples, little-endian ``dtype``

with the header ``{rows, columns, samples, dtype: int16|float32|uint8, photometric, invert,
center, width, slope, intercept, min, max, frame, frames}``. Monochrome frames are ``int16`` when
every value is a whole number that fits, else ``float32``; colour frames (RGB, YBR, palette) are
8-bit RGB. ``invert`` is true for MONOCHROME1 (low values white): windowing happens first, then
inversion, exactly as in the thumbnail.

pydicom quotes element values (patient names) in its warnings and log records, so every read
runs inside :func:`~p2pshare.dicom.header.quiet_pydicom`; its exceptions become
:class:`~p2pshare.errors.DicomError` with a sentence for the person looking at the screen.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from p2pshare.dicom.header import element_text, element_value, quiet_pydicom
from p2pshare.errors import DicomError, InputError

__all__ = [
    "MAGIC",
    "MAX_FILE_BYTES",
    "MAX_FRAME_BYTES",
    "THUMBNAIL_PX",
    "Frame",
    "ImageTooLarge",
    "InstanceInfo",
    "check_size",
    "decode_frame",
    "encode",
    "frame_bytes",
    "read_info",
    "thumbnail_png",
    "windowed",
]

MAGIC = b"P2PX"
THUMBNAIL_PX = 128
#: The largest decoded frame the viewer accepts (rows × columns × samples × bytes per sample).
#: Decoding and the modality LUT need several times this again (float64 intermediates), so a
#: small file declaring a huge image (8192 × 8192 × 16 bits = 128 MiB) must be refused before
#: any pixel is decoded. The largest ordinary images (a 4k × 5k mammogram, a 4k × 3k RGB
#: photograph) are well below it.
MAX_FRAME_BYTES = 64 * 1024**2
#: The most pixel data decoded at once when a file can only be decoded whole (deflated).
MAX_FILE_BYTES = 1024**3
#: Values longer than this are read from the file only when used (the pixel data never is).
_DEFER_BYTES = 64 * 1024
_PATIENT = {"name": "PatientName", "id": "PatientID", "birth_date": "PatientBirthDate",
            "sex": "PatientSex"}  # fmt: skip
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}

_NO_IMAGE = (
    "this instance holds no image (a report, structured document or other non-image object); "
    "open it in a PACS workstation"
)
_DAMAGED = (
    "this image's pixel data could not be decoded (it may be damaged at the source); the file "
    "itself arrived exactly as the sender had it"
)


class ImageTooLarge(DicomError):
    """The header declares an image larger than the viewer decodes (the file is fine)."""

    code = "image-too-large"


@dataclass(frozen=True)
class InstanceInfo:
    """What the series list needs from one file's header. Patient fields are for the screen
    only: never log them."""

    sop_instance_uid: str
    series_instance_uid: str
    instance_number: int | None
    series_number: int | None
    series_description: str
    modality: str
    rows: int
    columns: int
    frames: int
    photometric: str
    transfer_syntax: str
    study_description: str
    study_date: str
    patient: dict[str, str] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.rows > 0 and self.columns > 0


@dataclass(frozen=True)
class Frame:
    """One decoded frame, modality LUT applied (monochrome) or 8-bit RGB (colour)."""

    pixels: NDArray[Any]
    photometric: str
    invert: bool
    center: float
    width: float
    slope: float
    intercept: float
    minimum: float
    maximum: float
    index: int
    frames: int

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def samples(self) -> int:
        return 3 if self.pixels.ndim == 3 else 1

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)


# ------------------------------------------------------------------------------ header


def read_info(path: Path) -> InstanceInfo:
    """The header facts of one placed file (pixel data is not read).

    Raises:
        DicomError: the file cannot be read as DICOM.
    """
    try:
        with quiet_pydicom():
            ds = dcmread(path, stop_before_pixels=True)
            meta = getattr(ds, "file_meta", None) or Dataset()
            return InstanceInfo(
                sop_instance_uid=element_text(ds, "SOPInstanceUID"),
                series_instance_uid=element_text(ds, "SeriesInstanceUID"),
                instance_number=_int(ds, "InstanceNumber"),
                series_number=_int(ds, "SeriesNumber"),
                series_description=element_text(ds, "SeriesDescription"),
                modality=element_text(ds, "Modality"),
                rows=_int(ds, "Rows") or 0,
                columns=_int(ds, "Columns") or 0,
                frames=max(1, _int(ds, "NumberOfFrames") or 1),
                photometric=element_text(ds, "PhotometricInterpretation").upper(),
                transfer_syntax=element_text(meta, "TransferSyntaxUID"),
                study_description=element_text(ds, "StudyDescription"),
                study_date=element_text(ds, "StudyDate"),
                patient={k: v for k, kw in _PATIENT.items() if (v := element_text(ds, kw))},
            )
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom fails in many ways on broken files
        raise DicomError("this file could not be read as DICOM") from exc


# ------------------------------------------------------------------------------ pixels


def decode_frame(path: Path, index: int = 0) -> Frame:
    """Decode frame ``index`` of the file at ``path``.

    Only that frame's pixel data is read and decoded, and only after the header's image size
    has been checked against :data:`MAX_FRAME_BYTES` (see :func:`check_size`).

    Raises:
        ImageTooLarge: the header declares an image larger than this viewer decodes.
        DicomError: no image, a compression this node cannot decode, or damaged pixel data.
        InputError: ``index`` is not a frame of this image.
    """
    with quiet_pydicom():
        try:
            # Large values (the pixel data above all) stay on disk until asked for.
            ds = dcmread(path, defer_size=_DEFER_BYTES)
        except Exception as exc:  # noqa: BLE001
            raise DicomError("this file could not be read as DICOM") from exc
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise DicomError(_NO_IMAGE)
        frames = max(1, _int(ds, "NumberOfFrames") or 1)
        if not 0 <= index < frames:
            raise InputError(
                f"frame {index} does not exist: this image has {frames} frame(s), from 0"
            )
        meta = getattr(ds, "file_meta", None) or Dataset()
        syntax = UID(element_text(meta, "TransferSyntaxUID") or "1.2.840.10008.1.2")
        if syntax.is_compressed and not _decodable(syntax):
            raise DicomError(
                f"this image's compression ({syntax.name}) is not supported by this node's "
                f"viewer; the file itself arrived intact: open it in a PACS workstation"
            )
        photometric = element_text(ds, "PhotometricInterpretation").upper()
        # A deflated file can only be inflated whole: then every frame counts.
        whole = syntax.is_deflated
        check_size(ds, frames if whole else 1)
        try:
            if whole:
                arr = pixel_array(dcmread(path), index=index if frames > 1 else None)
            else:
                arr = pixel_array(path, index=index if frames > 1 else None)
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
            elif photometric not in _COLOUR:
                arr = apply_modality_lut(arr, ds)
        except Exception as exc:  # noqa: BLE001 - decoders and LUTs raise anything
            raise DicomError(_DAMAGED) from exc
        if frames > 1 and arr.ndim == (4 if arr.shape[-1] == 3 else 3):
            arr = arr[0]  # a decoder that ignored ``index``
        if arr.ndim == 3 and arr.shape[-1] == 3:
            return _colour_frame(arr, ds, photometric, index, frames)
        if arr.ndim != 2:
            raise DicomError(_DAMAGED)
        return _mono_frame(arr, ds, photometric, index, frames)


def frame_bytes(ds: Dataset) -> int:
    """What one decoded frame of ``ds`` takes in memory, from its header alone:
    rows × columns × samples per pixel × bytes per sample (a palette becomes RGB)."""
    rows = max(0, _int(ds, "Rows") or 0)
    columns = max(0, _int(ds, "Columns") or 0)
    samples = max(1, _int(ds, "SamplesPerPixel") or 1)
    if element_text(ds, "PhotometricInterpretation").upper() == "PALETTE COLOR":
        samples = max(samples, 3)
    bits = _int(ds, "BitsAllocated") or 16
    if "FloatPixelData" in ds:
        bits = max(bits, 32)
    return rows * columns * samples * max(1, (bits + 7) // 8)


def check_size(ds: Dataset, frames: int = 1) -> None:
    """Refuse an image whose decoding would take more memory than the viewer allows: one frame
    above :data:`MAX_FRAME_BYTES`, or ``frames`` frames (decoded together) above
    :data:`MAX_FILE_BYTES`.

    Raises:
        ImageTooLarge: with the declared size in the message.
    """
    per_frame = frame_bytes(ds)
    rows, columns = _int(ds, "Rows") or 0, _int(ds, "Columns") or 0
    if per_frame > MAX_FRAME_BYTES:
        raise ImageTooLarge(
            f"this image is too large to display here ({columns} × {rows} pixels, "
            f"{_mib(per_frame)} per frame; this viewer decodes up to {_mib(MAX_FRAME_BYTES)}); "
            "the file itself arrived intact: open it in a PACS workstation"
        )
    if per_frame * frames > MAX_FILE_BYTES:
        raise ImageTooLarge(
            f"this image is too large to display here ({frames} frames of {columns} × {rows} "
            f"pixels, {_mib(per_frame * frames)} decoded; this viewer decodes up to "
            f"{_mib(MAX_FILE_BYTES)} per file); the file itself arrived intact: open it in a "
            "PACS workstation"
        )


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB"


def _decodable(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def _mono_frame(arr: NDArray[Any], ds: Dataset, photometric: str, index: int, frames: int) -> Frame:
    values = np.asarray(arr)
    if values.size == 0:
        raise DicomError(_DAMAGED)
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    whole = np.issubdtype(values.dtype, np.integer) or bool(np.all(values == np.round(values)))
    if whole and lo >= -32768 and hi <= 32767:
        pixels: NDArray[Any] = values.astype("<i2")
    else:
        pixels = values.astype("<f4")
    center, width = _window(ds)
    if center is None or width is None:
        center, width = (lo + hi) / 2, max(hi - lo, 1.0)
    return Frame(
        pixels=np.ascontiguousarray(pixels),
        photometric=photometric or "MONOCHROME2",
        invert=photometric == "MONOCHROME1",
        center=center,
        width=width,
        slope=_float(ds, "RescaleSlope", 1.0),
        intercept=_float(ds, "RescaleIntercept", 0.0),
        minimum=lo,
        maximum=hi,
        index=index,
        frames=frames,
    )


def _colour_frame(
    arr: NDArray[Any], ds: Dataset, photometric: str, index: int, frames: int
) -> Frame:
    if arr.dtype != np.uint8:
        # 16-bit RGB or a 16-bit palette: scale the full range of the stored bits to 8 bits
        bits = 16 if photometric == "PALETTE COLOR" else (_int(ds, "BitsStored") or 16)
        top = float(2**bits - 1)
        arr = np.clip(np.asarray(arr, dtype=np.float64) * (255.0 / top) + 0.5, 0, 255)
    pixels = np.ascontiguousarray(arr, dtype=np.uint8)
    return Frame(
        pixels=pixels,
        photometric=photometric,
        invert=False,
        center=127.5,
        width=256.0,
        slope=1.0,
        intercept=0.0,
        minimum=float(pixels.min()),
        maximum=float(pixels.max()),
        index=index,
        frames=frames,
    )


def _window(ds: Dataset) -> tuple[float | None, float | None]:
    center = _first_float(ds, "WindowCenter")
    width = _first_float(ds, "WindowWidth")
    if center is None or width is None or width < 1:
        return None, None
    return center, width


# ------------------------------------------------------------------------------ output


def encode(frame: Frame) -> bytes:
    """The frame in the wire form described at the top of this module."""
    dtype = {np.dtype("<i2"): "int16", np.dtype("<f4"): "float32", np.dtype("u1"): "uint8"}
    header = {
        "rows": frame.rows,
        "columns": frame.columns,
        "samples": frame.samples,
        "dtype": dtype[frame.pixels.dtype],
        "photometric": frame.photometric,
        "invert": frame.invert,
        "center": frame.center,
        "width": frame.width,
        "slope": frame.slope,
        "intercept": frame.intercept,
        "min": frame.minimum,
        "max": frame.maximum,
        "frame": frame.index,
        "frames": frame.frames,
    }
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    raw += b" " * (-(len(MAGIC) + 4 + len(raw)) % 8)
    return MAGIC + struct.pack("<I", len(raw)) + raw + frame.pixels.tobytes()


def windowed(frame: Frame, center: float | None = None, width: float | None = None) -> NDArray[Any]:
    """8-bit display values: DICOM's linear window (PS3.3 C.11.2.1.2.1, rounded down), then
    MONOCHROME1 inversion. ``web/viewer.js`` computes exactly the same."""
    c = frame.center if center is None else center
    w = frame.width if width is None else width
    scale = 255.0 / max(w - 1.0, 1.0)
    out = np.floor(((frame.pixels.astype(np.float64) - (c - 0.5)) * scale) + 127.5)
    out = np.clip(out, 0, 255)
    if frame.invert:
        out = 255 - out
    result: NDArray[Any] = out.astype(np.uint8)
    return result


def thumbnail_png(frame: Frame, size: int = THUMBNAIL_PX) -> bytes:
    """A PNG of at most ``size`` × ``size`` pixels at the frame's default window."""
    image = Image.fromarray(windowed(frame), "RGB" if frame.samples == 3 else "L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------ helpers


def _first(value: Any) -> Any:
    if isinstance(value, MultiValue | list):
        return value[0] if len(value) else None
    return value


def _first_float(ds: Dataset, keyword: str) -> float | None:
    value = _first(element_value(ds, keyword))
    try:
        number = float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _float(ds: Dataset, keyword: str, default: float) -> float:
    number = _first_float(ds, keyword)
    return default if number is None else number


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _first(element_value(ds, keyword))
    try:
        number = int(float(value)) if value is not None and value != "" else None
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and -(2**31) <= number < 2**31 else None
