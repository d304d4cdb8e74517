"""The Storage SCP with a real pynetdicom SCU on 127.0.0.1 (in-process, its own threads)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from p2pshare.library import Library
from p2pshare.pacs.scp import StorageScp


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageScp]:
    server = StorageScp(
        Library(tmp_path / "data"), ae_title="REFNODE", host="127.0.0.1", port=0,
        allow=("MODALITY",),
    )
    server.start()
    yield server
    server.stop()


def associate(scp: StorageScp, calling: str = "MODALITY", called: str = "REFNODE") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage, JPEG2000Lossless)
    ae.add_requested_context(MRImageStorage, RLELossless)
    return ae.associate("127.0.0.1", scp.port, ae_title=called)


def test_echo_and_store_compressed_and_uncompressed(scp: StorageScp) -> None:
    assoc = associate(scp)
    assert assoc.is_established  # type: ignore[attr-defined]
    assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
    for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        rsp = assoc.send_c_store(dcmread(get_testdata_file(name)))  # type: ignore[attr-defined]
        assert rsp.Status == 0, name
    assoc.release()  # type: ignore[attr-defined]
    studies = {s["study_instance_uid"]: s for s in scp.library.list()}
    assert len(studies) == 2
    mr = studies["1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"]
    assert mr["instances"] == 1 and mr["duplicates"] == 1 and mr["state"] == "receiving"
    (stored,) = list(scp.library.path_of(mr["study_id"]).rglob("*.dcm"))
    ds = dcmread(stored)
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless  # kept as sent, not decoded
    original = dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    assert ds.PixelData == original.PixelData


def test_unknown_calling_or_called_ae_is_rejected(scp: StorageScp) -> None:
    assert not associate(scp, calling="STRANGER").is_established  # type: ignore[attr-defined]
    assert not associate(scp, called="OTHERNODE").is_established  # type: ignore[attr-defined]
    assert scp.library.list() == []
