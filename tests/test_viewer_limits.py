"""The viewer refuses images whose header declares more pixels than it may decode.

A small file can declare a huge image (an RLE or native file saying 8192 × 8192): the size is
checked from the header before any pixel is read, the route answers a JSON error, and the
frame's wire form is built off the event loop.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from p2pshare.config import NodeConfig
from p2pshare.dicom.ingest import scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.library import Library, study_id_for
from p2pshare.node.app import create_app
from p2pshare.viewer import decode
from p2pshare.viewer.decode import ImageTooLarge, decode_frame


def _ct() -> pydicom.Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return pydicom.dcmread(path)


def _huge(path: Path, rows: int, columns: int, frames: int = 1, deflate: bool = False) -> Path:
    """A small file whose header declares ``frames`` frames of ``rows`` × ``columns`` 16-bit."""
    ds = _ct()
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = b"\0" * 4096  # far less than declared: decoding it would fail or balloon
    ds.file_meta.TransferSyntaxUID = (
        DeflatedExplicitVRLittleEndian if deflate else ExplicitVRLittleEndian
    )
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_frame_declared_too_large_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _huge(tmp_path / "huge.dcm", 8192, 8192)
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(ImageTooLarge) as info:
        decode_frame(path)
    assert info.value.code == "image-too-large"
    assert info.value.message.startswith("this image is too large to display here")
    assert "8192 × 8192 pixels, 128 MiB per frame" in info.value.message


def test_one_frame_of_a_large_multi_frame_file_is_within_the_limit(tmp_path: Path) -> None:
    # Frames are decoded one at a time: the limit is per frame, not per file.
    ds = _ct()
    frame = (np.arange(1024 * 1024, dtype=np.int16) % 2000).reshape(1024, 1024)
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([frame, frame + 1]).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    decoded = decode_frame(path, 1)
    assert decoded.frames == 2 and decoded.rows == 1024
    np.testing.assert_array_equal(
        decoded.pixels, (frame + 1).astype(np.float64) * float(ds.RescaleSlope)
        + float(ds.RescaleIntercept)
    )
    # 600 such frames (1.2 GiB) pass too: the per-file limit is for files decoded whole
    ds.NumberOfFrames = 600
    assert decode.frame_bytes(ds) * 600 > decode.MAX_FILE_BYTES
    decode.check_size(ds)


def test_a_deflated_file_counts_all_its_frames(tmp_path: Path) -> None:
    path = _huge(tmp_path / "deflated.dcm", 2048, 2048, frames=200, deflate=True)
    with pytest.raises(ImageTooLarge, match="200 frames of 2048 × 2048 pixels, 1600 MiB"):
        decode_frame(path, 0)


def test_a_deflated_image_within_the_limits_still_decodes(tmp_path: Path) -> None:
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "ct-deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope)
    expected += float(ds.RescaleIntercept)
    np.testing.assert_array_equal(decode_frame(path).pixels, expected)


async def test_the_pixels_route_answers_json_and_encodes_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "study"
    generate_ct_study(src, seed=9, series=[SeriesSpec("HEAD", 2, 32, 32, 5.0, "head")])
    manifest = scan(src).study(None).manifest
    config = NodeConfig(data_dir=tmp_path / "node", name="Trauma Centre Radiology")
    config.data_dir.mkdir(parents=True)
    Library(config.data_dir).import_path(src)
    sid = study_id_for(manifest.study_instance_uid)
    files = sorted((config.data_dir / "library" / sid / "files").rglob("*.dcm"))
    # one placed instance is replaced by a file of the same UIDs declaring 8192 × 8192
    big = pydicom.dcmread(files[0])
    big.Rows = big.Columns = 8192
    big.PixelData = b"\0" * 4096
    big.save_as(files[0], enforce_file_format=True)
    big_sop, small_sop = (str(pydicom.dcmread(f).SOPInstanceUID) for f in files)

    threads: list[int] = []
    real_encode = decode.encode

    def encode(frame: decode.Frame) -> bytes:
        threads.append(threading.get_ident())
        return real_encode(frame)

    monkeypatch.setattr(decode, "encode", encode)
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config)))
    await client.start_server()
    try:
        headers = {"Authorization": f"Bearer {config.token_path.read_text().strip()}"}
        base = f"/api/v1/studies/{sid}/instances"
        async with client.get(f"{base}/{big_sop}/pixels", headers=headers) as r:
            assert (r.status, r.content_type) == (422, "application/json")
            body = json.loads(await r.read())
        assert body["error"] == "image-too-large"
        assert body["message"].startswith("this image is too large to display here (8192 × 8192")
        async with client.get(f"{base}/{small_sop}/pixels", headers=headers) as r:
            assert r.status == 200
            assert (await r.read())[:4] == decode.MAGIC
    finally:
        await client.close()
    assert threads and threading.get_ident() not in threads
