"""The Storage SCP and the library cannot be made to hold a dataset in memory or fill the disk.

A real pynetdicom SCU pushes to the real SCP on 127.0.0.1. pynetdicom's temporary files go to a
folder of the test's own (``tempfile.tempdir``), so what is left behind can be checked.
"""

from __future__ import annotations

import errno
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from p2pshare.library import Library
from p2pshare.pacs.scp import STATUS_OUT_OF_RESOURCES, StorageScp


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def serve(library: Library, **kw: Any) -> StorageScp:
    server = StorageScp(library, ae_title="REFNODE", host="127.0.0.1", port=0, **kw)
    server.start()
    return server


def push(scp: StorageScp, ds: Any) -> tuple[Any, Any]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="REFNODE")
    assert assoc.is_established
    rsp = assoc.send_c_store(ds)
    if assoc.is_established:
        assoc.release()
    return rsp, assoc


@pytest.fixture
def ct() -> Any:
    return dcmread(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def library(tmp_path: Path) -> Iterator[Library]:
    yield Library(tmp_path / "data")


def test_an_instance_is_streamed_to_a_file_and_moved_into_the_library(
    library: Library, spool: Path, ct: Any
) -> None:
    scp = serve(library)
    try:
        rsp, _ = push(scp, ct)
    finally:
        scp.stop()
    assert rsp.Status == 0
    (record,) = library.list()
    (stored,) = library.path_of(record["study_id"]).rglob("*.dcm")
    assert dcmread(stored).PixelData == ct.PixelData
    assert list(spool.iterdir()) == []  # taken from pynetdicom's file, nothing left behind


def test_an_instance_over_the_size_limit_is_refused_out_of_resources(
    library: Library, spool: Path, ct: Any
) -> None:
    scp = serve(library, max_instance_bytes=20_000)  # CT_small is ~39 kB
    try:
        rsp, _ = push(scp, ct)
    finally:
        scp.stop()
    assert rsp.Status == STATUS_OUT_OF_RESOURCES
    assert library.list() == [] and list(spool.iterdir()) == []


def test_a_huge_instance_is_cut_off_while_it_streams(
    library: Library, spool: Path, ct: Any
) -> None:
    ct.Rows = ct.Columns = 1024
    ct.PixelData = b"\1\0" * (1024 * 1024)  # 2 MiB
    scp = serve(library, max_instance_bytes=20_000)
    try:
        rsp, assoc = push(scp, ct)
    finally:
        scp.stop()
    assert "Status" not in rsp and assoc.is_aborted  # the SCP aborted mid-stream
    assert library.list() == []
    assert list(spool.iterdir()) == []  # the partial file is gone too


def test_a_push_that_would_leave_too_little_disk_is_refused(
    tmp_path: Path, spool: Path, ct: Any
) -> None:
    full = Library(tmp_path / "data", min_free_bytes=1 << 62)  # more than any disk has
    scp = serve(full)
    try:
        rsp, _ = push(scp, ct)
    finally:
        scp.stop()
    assert rsp.Status == STATUS_OUT_OF_RESOURCES
    assert full.list() == [] and list(spool.iterdir()) == []


def test_library_writes_check_free_space(tmp_path: Path) -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    lib = Library(tmp_path / "data", min_free_bytes=1 << 62)
    with pytest.raises(OSError) as info:
        lib.store_bytes(path.read_bytes(), "upload")
    assert info.value.errno == errno.ENOSPC and "free disk space" in str(info.value.strerror)
    folder = tmp_path / "cd"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(path.read_bytes())
    report = lib.import_path(folder)
    assert report["imported"] == 0
    assert report["skipped"][0]["reason"].startswith("not imported: not enough free disk space")
    assert lib.list() == [] and list((lib.root / ".tmp").iterdir()) == []
    lib.min_free_bytes = 0
    assert lib.import_path(folder)["imported"] == 1
