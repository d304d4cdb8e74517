"""Completeness is checked against the signed manifest: nothing missing, nothing changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from p2pshare.dicom.ingest import scan
from p2pshare.errors import InputError
from p2pshare.pacs.export import PacsTarget
from p2pshare.pacs.exporting import Received, check_complete


def placed(ct_study: Path, out: Path) -> Received:
    study = scan(ct_study).study(None)
    m = study.manifest
    for inst, src in zip(m.instances, study.sources, strict=True):
        dest = out / inst.relpath(m.study_instance_uid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.path, dest)
    return Received("complete", out, m, "Referring ED")


def test_complete_study_passes(ct_study: Path, tmp_path: Path) -> None:
    found = check_complete(placed(ct_study, tmp_path / "out"), "job1")
    assert len(found) == 7 and all(p.is_file() for p, _ in found)


def test_missing_or_changed_instance_refuses_the_whole_export(
    ct_study: Path, tmp_path: Path
) -> None:
    received = placed(ct_study, tmp_path / "out")
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    files[0].unlink()
    with pytest.raises(InputError, match="1 of 7 instances .* missing or changed"):
        check_complete(received, "job1")
    received = placed(ct_study, tmp_path / "out2")
    victim = sorted((tmp_path / "out2").rglob("*.dcm"))[3]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(InputError, match="missing or changed"):
        check_complete(received, "job1")


def test_unfinished_transfer_is_refused(ct_study: Path, tmp_path: Path) -> None:
    received = placed(ct_study, tmp_path / "out")
    for state in ("receiving", "failed"):
        with pytest.raises(InputError, match="not complete"):
            check_complete(Received(state, received.out_dir, received.manifest, ""), "job1")


@pytest.mark.parametrize("text", ["PACS@host", "@h:104", "PACS@h:0", "A" * 17 + "@h:104", "x"])
def test_bad_pacs_address(text: str) -> None:
    from p2pshare.errors import ConfigError

    with pytest.raises(ConfigError, match="AE@HOST:PORT"):
        PacsTarget.parse(text)


def test_pacs_address() -> None:
    assert PacsTarget.parse("PACS@10.0.0.5:104") == PacsTarget("PACS", "10.0.0.5", 104)
    assert PacsTarget.parse("MAIN PACS@[::1]:11112").host == "::1"
