"""The viewer's pixel service: decoding (against pydicom's own arrays) and its HTTP routes.

Decoding is checked on pydicom's bundled test files (CT, MR, JPEG lossless, JPEG 2000, JPEG-LS,
RLE, RGB, YBR, palette, multi-frame), on a CT made JPEG lossless by dcmtk's ``dcmcjpeg`` and on a
MONOCHROME1 image; values must equal pydicom's ``pixel_array`` after rescale, to the bit. The
routes are checked on a real node app (aiohttp test client) whose transfer has some instances in
place, some still staged and a file of another study in the same destination.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, JPEG2000Lossless

from p2pshare.config import NodeConfig
from p2pshare.dicom.ingest import scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.errors import DicomError, InputError
from p2pshare.library import Library, study_id_for
from p2pshare.manifest import Manifest
from p2pshare.node.app import create_app
from p2pshare.node.keys import store_key
from p2pshare.viewer.decode import MAGIC, decode_frame, encode, read_info, thumbnail_png, windowed


def data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def reference(path: Path, index: int | None = None) -> np.ndarray:
    """pydicom's own array with the rescale applied: what the viewer must send."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array if index is None else ds.pixel_array[index]
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr.astype(np.float64) * slope + intercept


def unpack(blob: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """Parse the wire form the browser parses."""
    assert blob[:4] == MAGIC
    (n,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8 : 8 + n])
    assert (8 + n) % 8 == 0  # typed arrays need aligned pixels
    dtype = {"int16": "<i2", "float32": "<f4", "uint8": "u1"}[header["dtype"]]
    shape = (header["rows"], header["columns"]) + ((3,) if header["samples"] == 3 else ())
    return header, np.frombuffer(blob[8 + n :], dtype=dtype).reshape(shape)


# -- monochrome ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit little endian, rescale intercept
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG2000.dcm",
        "JPGExtended.dcm",
        "693_J2KI.dcm",  # JPEG 2000 CT, 512 × 512
    ],
)
def test_monochrome_values_equal_pydicoms_after_rescale(name: str) -> None:
    path = data(name)
    frame = decode_frame(path)
    header, pixels = unpack(encode(frame))
    np.testing.assert_array_equal(pixels.astype(np.float64), reference(path))
    assert header["samples"] == 1 and header["invert"] is False
    assert header["dtype"] == "int16"  # whole numbers that fit: the compact form
    assert pixels.std() > 0


def test_ct_values_are_hounsfield_units_and_the_window_comes_from_the_file() -> None:
    path = data("CT_small.dcm")
    ds = pydicom.dcmread(path)
    frame = decode_frame(path)
    assert float(ds.RescaleIntercept) != 0  # so the rescale really is tested
    assert frame.intercept == float(ds.RescaleIntercept)
    assert frame.minimum == reference(path).min() < 0  # air is negative HU
    # no window in this file: the full range of values
    assert "WindowCenter" not in ds
    assert frame.center == (frame.minimum + frame.maximum) / 2
    assert frame.width == frame.maximum - frame.minimum
    mr = pydicom.dcmread(data("MR_small.dcm"))
    mr_frame = decode_frame(data("MR_small.dcm"))
    assert (mr_frame.center, mr_frame.width) == (float(mr.WindowCenter), float(mr.WindowWidth))


def test_lossless_compressions_decode_to_the_same_values_as_the_uncompressed_original() -> None:
    plain = decode_frame(data("MR_small.dcm")).pixels
    for name in ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]:
        np.testing.assert_array_equal(decode_frame(data(name)).pixels, plain)


def test_jpeg_lossless_ct_made_by_dcmtk_decodes_to_the_original(tmp_path: Path) -> None:
    src = data("CT_small.dcm")
    out = tmp_path / "ct_jpeg_ll.dcm"
    # +e1: JPEG lossless, first-order prediction (process 14, selection value 1)
    subprocess.run(["dcmcjpeg", "+e1", str(src), str(out)], check=True, capture_output=True)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    np.testing.assert_array_equal(decode_frame(out).pixels, decode_frame(src).pixels)


def test_non_integer_rescale_is_sent_as_float32(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.RescaleSlope = "0.5"
    ds.RescaleIntercept = "-3.25"
    path = tmp_path / "float.dcm"
    ds.save_as(path)
    header, pixels = unpack(encode(decode_frame(path)))
    assert header["dtype"] == "float32"
    np.testing.assert_allclose(pixels, ds.pixel_array * 0.5 - 3.25, rtol=0, atol=1e-3)


def test_monochrome1_is_inverted_after_windowing(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    frame = decode_frame(path)
    normal = decode_frame(data("MR_small.dcm"))
    assert frame.invert and not normal.invert
    header, pixels = unpack(encode(frame))
    assert header["invert"] is True and header["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(pixels, normal.pixels)  # values untouched
    shown, plain = windowed(frame), windowed(normal)
    assert np.abs(shown.astype(int) - (255 - plain.astype(int))).max() <= 1  # rounding
    brightest = np.unravel_index(np.argmax(frame.pixels), frame.pixels.shape)
    assert shown[brightest] == 0  # the highest value is black in MONOCHROME1
    thumb = np.asarray(Image.open(io.BytesIO(thumbnail_png(frame))))
    thumb_plain = np.asarray(Image.open(io.BytesIO(thumbnail_png(normal))))
    assert abs(int(thumb.mean()) + int(thumb_plain.mean()) - 255) <= 2


# -- colour ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, RGB
        "SC_rgb_rle.dcm",
        "SC_rgb_gdcm_KY.dcm",  # JPEG 2000, RGB
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "examples_jpeg2k.dcm",  # JPEG 2000 lossless, YBR_RCT (ultrasound)
        "examples_rgb_color.dcm",
    ],
)
def test_colour_images_are_sent_as_8_bit_rgb_equal_to_pydicoms(name: str) -> None:
    path = data(name)
    header, pixels = unpack(encode(decode_frame(path)))
    assert header["dtype"] == "uint8" and header["samples"] == 3
    np.testing.assert_array_equal(pixels, pydicom.dcmread(path).pixel_array)


def test_16_bit_rgb_is_scaled_to_8_bits() -> None:
    path = data("SC_rgb_rle_16bit.dcm")
    header, pixels = unpack(encode(decode_frame(path)))
    ref = pydicom.dcmread(path).pixel_array.astype(np.float64) * 255 / 65535
    assert header["dtype"] == "uint8"
    np.testing.assert_allclose(pixels, ref, atol=0.51)


def test_palette_colour_is_looked_up() -> None:
    path = data("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    rgb16 = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    _, pixels = unpack(encode(decode_frame(path)))
    np.testing.assert_allclose(pixels, rgb16.astype(np.float64) * 255 / 65535, atol=0.51)
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::97]}) > 5  # really in colour


def test_one_frame_of_a_multi_frame_image() -> None:
    path = data("examples_ybr_color.dcm")  # 30 frames, JPEG baseline YBR
    frame = decode_frame(path, 5)
    assert frame.frames == 30 and frame.index == 5
    np.testing.assert_array_equal(frame.pixels, pydicom.dcmread(path).pixel_array[5])
    assert not np.array_equal(frame.pixels, decode_frame(path, 0).pixels)
    with pytest.raises(InputError, match="frame 30 does not exist"):
        decode_frame(path, 30)


# -- thumbnails and header facts --------------------------------------------------------------


def test_thumbnail_is_a_small_png_at_the_default_window() -> None:
    frame = decode_frame(data("693_J2KI.dcm"))
    image = Image.open(io.BytesIO(thumbnail_png(frame)))
    assert image.format == "PNG" and image.mode == "L"
    assert max(image.size) == 128 and image.size == (128, 128)
    pixels = np.asarray(image)
    assert pixels.std() > 10  # an image, not a flat square
    tall = Image.open(io.BytesIO(thumbnail_png(decode_frame(data("JPEG2000.dcm")))))
    assert tall.size == (32, 128)  # 1024 × 256 keeps its aspect


def test_window_level_changes_the_display_values() -> None:
    frame = decode_frame(data("CT_small.dcm"))
    soft, bone = windowed(frame, 40, 400), windowed(frame, 300, 2000)
    assert not np.array_equal(soft, bone)
    low = np.unravel_index(np.argmin(frame.pixels), frame.pixels.shape)
    assert soft[low] == 0 and bone[low] == 0  # air is black in both


def test_read_info_gives_the_series_list_facts() -> None:
    info = read_info(data("examples_ybr_color.dcm"))
    assert (info.rows, info.columns, info.frames) == (240, 320, 30)
    assert info.modality == "US" and info.has_image
    ct = read_info(data("CT_small.dcm"))
    assert ct.patient["name"] and ct.photometric == "MONOCHROME2" and ct.frames == 1


# -- errors a person can act on ---------------------------------------------------------------


def test_an_instance_without_an_image_says_so() -> None:
    with pytest.raises(DicomError, match="holds no image"):
        decode_frame(data("reportsi.dcm"))


def test_an_unsupported_compression_is_named(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match=r"compression \(MPEG2 .*\) is not supported"):
        decode_frame(path)


def test_damaged_compressed_pixel_data_is_a_clear_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match="could not be decoded"):
        decode_frame(path)


def test_a_file_that_is_not_dicom_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello")
    with pytest.raises(DicomError, match="could not be read as DICOM"):
        decode_frame(path)


# -- the routes on a real node app --------------------------------------------------------------


SERIES = [
    SeriesSpec("HEAD", 4, 48, 48, 5.0, "head"),
    SeriesSpec("CHEST", 5, 64, 64, 5.0, "chest"),
]


class Api:
    def __init__(self, client: TestClient[Any, Any], token: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"}

    async def get(self, path: str) -> tuple[int, str, bytes]:
        async with self.client.get(path, headers=self.headers) as r:
            body = await r.read()
            assert b"Traceback" not in body
            return r.status, r.content_type, body

    async def json(self, path: str, status: int = 200) -> Any:
        code, ctype, body = await self.get(path)
        assert (code, ctype) == (status, "application/json"), body[:300]
        return json.loads(body)


@pytest.fixture
async def transfer(tmp_path: Path) -> AsyncIterator[tuple[Api, str, Manifest, Path, list[str]]]:
    """A receive job whose destination holds 1 of 4 head and 3 of 5 chest instances."""
    study = tmp_path / "study"
    generate_ct_study(study, seed=5, series=SERIES)
    manifest = scan(study).study(None).manifest
    out = (tmp_path / "incoming").resolve()
    by_uid = {read_info(p).sop_instance_uid: p for p in study.rglob("*.dcm")}
    head, chest = manifest.series[0].series_instance_uid, manifest.series[1].series_instance_uid
    heads = [i for i in manifest.instances if i.series_instance_uid == head]
    chests = [i for i in manifest.instances if i.series_instance_uid == chest]
    placed = [heads[2], chests[0], chests[2], chests[4]]
    for inst in placed:
        target = out / inst.relpath(manifest.study_instance_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(by_uid[inst.sop_instance_uid], target)
    # still staged (not verified): must not be listed
    staged = out / ".p2pshare-partial" / "ab" / "1.part"
    staged.parent.mkdir(parents=True)
    shutil.copyfile(by_uid[heads[0].sop_instance_uid], staged)
    # another study's file in the same destination: not this transfer's
    other = tmp_path / "other"
    generate_ct_study(other, seed=6, series=SERIES[:1], patient_id="OTHER-1")
    o = scan(other).study(None).manifest
    target = out / o.instances[0].relpath(o.study_instance_uid)
    target.parent.mkdir(parents=True)
    shutil.copyfile(next(other.rglob("*.dcm")), target)

    config = NodeConfig(data_dir=tmp_path / "node", name="Trauma Centre Radiology")
    app = create_app(config)
    client = TestClient(TestServer(app))
    await client.start_server()
    store = app[store_key]
    store.add_transfer("job-1", 0, str(out))
    store.update_transfer("job-1", state="receiving", manifest=manifest.to_bytes())
    store.add_transfer("job-early", 0, str(out))
    token = config.token_path.read_text().strip()
    try:
        yield Api(client, token), "job-1", manifest, out, [i.sop_instance_uid for i in placed]
    finally:
        await client.close()


async def test_series_lists_only_placed_instances_of_this_transfer(transfer: Any) -> None:
    api, job, manifest, _, placed = transfer
    body = await api.json(f"/api/v1/transfers/{job}/series")
    listed = [i["sop_instance_uid"] for s in body["series"] for i in s["instances"]]
    assert sorted(listed) == sorted(placed)
    assert (body["expected"], body["received"], body["state"]) == (9, 4, "receiving")
    assert [s["description"] for s in body["series"]] == ["HEAD", "CHEST"]
    assert [s["expected"] for s in body["series"]] == [4, 5]
    chest = body["series"][1]
    numbers = [i["instance_number"] for i in chest["instances"]]
    assert numbers == sorted(numbers) == [1, 3, 5]
    assert chest["thumbnail"] == chest["instances"][1]["sop_instance_uid"]  # the middle one
    assert body["patient"]["name"] and body["patient"]["id"]
    assert body["study"]["study_instance_uid"] == manifest.study_instance_uid
    assert chest["instances"][0]["rows"] == 64 and chest["instances"][0]["frames"] == 1


async def test_viewing_a_study_is_audited_once_per_person(transfer: Any, tmp_path: Path) -> None:
    api, job, manifest, _, _ = transfer
    for _ in range(3):  # the viewer polls; the audit records the view once
        await api.json(f"/api/v1/transfers/{job}/series")
    db = sqlite3.connect(tmp_path / "node" / "node.sqlite3")
    try:
        rows = db.execute(
            "SELECT outcome, detail FROM audit WHERE action = 'study-viewed'"
        ).fetchall()
    finally:
        db.close()
    assert len(rows) == 1 and rows[0][0] == "ok"
    detail = json.loads(rows[0][1])
    assert detail["job"] == job and detail["user"] == "api-token"
    assert detail["study"] == manifest.study_instance_uid


async def test_series_of_a_transfer_without_a_manifest_yet_is_empty(transfer: Any) -> None:
    api = transfer[0]
    body = await api.json("/api/v1/transfers/job-early/series")
    assert body["series"] == [] and body["received"] == 0 and body["study"] is None


async def test_pixels_and_thumbnail_of_a_placed_instance(transfer: Any) -> None:
    api, job, manifest, out, placed = transfer
    sop = placed[1]
    code, ctype, blob = await api.get(f"/api/v1/transfers/{job}/instances/{sop}/pixels?frame=0")
    assert (code, ctype) == (200, "application/octet-stream")
    header, pixels = unpack(blob)
    inst = next(i for i in manifest.instances if i.sop_instance_uid == sop)
    path = out / inst.relpath(manifest.study_instance_uid)
    np.testing.assert_array_equal(pixels.astype(np.float64), reference(path))
    assert header["rows"] == 64 and pixels.std() > 0
    code, ctype, png = await api.get(f"/api/v1/transfers/{job}/instances/{sop}/thumbnail.png")
    assert (code, ctype) == (200, "image/png")
    assert np.asarray(Image.open(io.BytesIO(png))).std() > 0


async def test_instances_not_arrived_or_not_in_the_transfer_are_404(transfer: Any) -> None:
    api, job, manifest, _, placed = transfer
    missing = next(
        i.sop_instance_uid for i in manifest.instances if i.sop_instance_uid not in placed
    )
    for sop in [missing, "1.2.3.4", "x" * 70, "1.2.3%2F..%2F.."]:
        body = await api.json(f"/api/v1/transfers/{job}/instances/{sop}/pixels", 404)
        assert body["error"] == "not-arrived", sop
    for sop in ["..", "1.2.3/../.."]:  # cleaned up by the router: no route at all
        code, _, _ = await api.get(f"/api/v1/transfers/{job}/instances/{sop}/pixels")
        assert code == 404
    body = await api.json(f"/api/v1/transfers/nope/instances/{placed[0]}/pixels", 404)
    assert body["error"] == "not-found"
    body = await api.json(f"/api/v1/transfers/{job}/instances/{placed[0]}/pixels?frame=-1", 400)
    assert "frame" in body["message"]
    body = await api.json(f"/api/v1/transfers/{job}/instances/{placed[0]}/pixels?frame=3", 400)
    assert "frame 3 does not exist" in body["message"]


async def test_a_placed_file_that_escapes_the_destination_is_not_served(transfer: Any) -> None:
    api, job, manifest, out, placed = transfer
    inst = next(i for i in manifest.instances if i.sop_instance_uid == placed[0])
    path = out / inst.relpath(manifest.study_instance_uid)
    outside = out.parent / "outside.dcm"
    shutil.move(path, outside)
    path.symlink_to(outside)
    body = await api.json(f"/api/v1/transfers/{job}/instances/{placed[0]}/pixels", 404)
    assert body["error"] == "not-arrived"
    listed = await api.json(f"/api/v1/transfers/{job}/series")
    assert placed[0] not in [
        i["sop_instance_uid"] for s in listed["series"] for i in s["instances"]
    ]


async def test_viewer_api_needs_the_token(transfer: Any) -> None:
    api, job, _, _, placed = transfer
    for path in [
        f"/api/v1/transfers/{job}/series",
        f"/api/v1/transfers/{job}/instances/{placed[0]}/pixels",
        f"/api/v1/transfers/{job}/instances/{placed[0]}/thumbnail.png",
    ]:
        async with api.client.get(path) as r:
            assert r.status == 401, path


async def test_undecodable_instance_is_a_json_error(transfer: Any) -> None:
    api, job, manifest, out, placed = transfer
    inst = next(i for i in manifest.instances if i.sop_instance_uid == placed[2])
    path = out / inst.relpath(manifest.study_instance_uid)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    path.unlink()
    ds.save_as(path, enforce_file_format=True)
    body = await api.json(f"/api/v1/transfers/{job}/instances/{placed[2]}/pixels", 422)
    assert body["error"] == "dicom" and "is not supported" in body["message"]


# -- a study in the node's library ----------------------------------------------------------------


async def test_library_study_is_viewable_too(tmp_path: Path) -> None:
    src = tmp_path / "study"
    generate_ct_study(src, seed=8, series=SERIES)
    manifest = scan(src).study(None).manifest
    config = NodeConfig(data_dir=tmp_path / "node", name="Referring Hospital ED")
    config.data_dir.mkdir(parents=True)
    Library(config.data_dir).import_path(src)
    sid = study_id_for(manifest.study_instance_uid)
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    try:
        api = Api(client, config.token_path.read_text().strip())
        body = await api.json(f"/api/v1/studies/{sid}/series")
        assert [s["description"] for s in body["series"]] == ["HEAD", "CHEST"]
        assert [len(s["instances"]) for s in body["series"]] == [4, 5]
        assert body["received"] == body["expected"] == 9 and body["state"] == "complete"
        assert body["study"]["study_instance_uid"] == manifest.study_instance_uid
        sop = body["series"][1]["thumbnail"]
        code, _, blob = await api.get(f"/api/v1/studies/{sid}/instances/{sop}/pixels")
        assert code == 200
        header, pixels = unpack(blob)
        assert header["rows"] == 64 and pixels.std() > 0
        code, ctype, _ = await api.get(f"/api/v1/studies/{sid}/instances/{sop}/thumbnail.png")
        assert (code, ctype) == (200, "image/png")
        body = await api.json(f"/api/v1/studies/{sid}/instances/1.2.3.4/pixels", 404)
        assert body["error"] == "not-arrived"
        body = await api.json("/api/v1/studies/nope/series", 404)
        assert body["error"] == "not-found"
    finally:
        await client.close()
