"""The whole PACS path with real peers: dcmtk storescu → referring node's SCP → offer →
encrypted transfer to the trauma centre's node → reconciled C-STORE export → dcmtk storescp.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from pydicom import dcmread

from p2pshare.demo import spawn_node, stop_node
from tests.e2e.conftest import Cli
from tests.pacs import flow
from tests.pacs.peers import free_port, storescp, storescu

pytestmark = pytest.mark.e2e


async def test_push_offer_receive_export_to_storescp(study: Path, tmp_path: Path) -> None:
    dicom_port = free_port()
    with storescp(tmp_path / "pacs", "TRAUMAPACS") as pacs_port:
        referring = await spawn_node(
            "Referring Hospital ED",
            tmp_path / "referring",
            extra_args=["--dicom-port", str(dicom_port), "--ae-title", "REFNODE",
                        "--dicom-quiet", "1"],
        )
        trauma = await spawn_node(
            "Trauma Centre Radiology",
            tmp_path / "trauma",
            extra_args=["--pacs", f"TRAUMAPACS@127.0.0.1:{pacs_port}", "--ae-title", "TRAUMANODE",
                        "--accession-prefix", "RH-"],
        )
        try:
            async with aiohttp.ClientSession() as http:
                s_api, r_api = await flow.api(referring, http), await flow.api(trauma, http)
                storescu(dicom_port, "REFNODE", study)
                record = await flow.wait_complete_study(s_api)
                assert record["source"] == "scp"
                assert record["instances"] == 20
                assert {s["instances"] for s in record["series"]} == {8, 12}

                job = await flow.transfer(s_api, r_api, referring, record["path"],
                                          tmp_path / "received")
                last, export = await flow.export(
                    r_api, job,
                    {"target": "pacs", "mrn": "TC-778812", "issuer": "TRAUMA-CENTRE",
                     "name": "Doe^Jane"},
                )
                assert last["event"] == "complete", last
                assert export["stored"] == 20 and export["failed"] == 0
                assert all(i["ok"] and i["status"] == 0 for i in export["instances"])
        finally:
            await stop_node(trauma)
            await stop_node(referring)

    originals = flow.by_sop(study)
    exported = flow.by_sop(tmp_path / "pacs")
    assert exported.keys() == originals.keys()
    for sop, path in originals.items():
        flow.assert_reconciled_copy(
            path,
            exported[sop],
            {"PatientID": "TC-778812", "IssuerOfPatientID": "TRAUMA-CENTRE",
             "PatientName": "Doe^Jane"},
        )
    # the accession rule: a foreign accession number gets the configured prefix
    sample = next(iter(exported.values()))
    original_accession = dcmread(next(iter(originals.values()))).AccessionNumber
    assert dcmread(sample).AccessionNumber == "RH-" + original_accession
    # the received originals stay untouched in the trauma node's store: byte for byte what the
    # referring node's library held (the SCP keeps each instance as it came off the wire)
    offered = flow.by_sop(Path(record["path"]))
    received = flow.by_sop(tmp_path / "received")
    assert received.keys() == offered.keys() == originals.keys()
    for sop, path in received.items():
        assert path.read_bytes() == offered[sop].read_bytes()


async def test_cli_import_studies_and_export(study: Path, tmp_path: Path, cli: Cli) -> None:
    """`p2pshare import --report`, `studies`, `export` as real CLI processes against real nodes;
    the API's send-now and delete; an export refused for a transfer that is not complete."""
    report = tmp_path / "report.txt"
    report.write_text("CT trauma: no acute injury.")
    dicom_port = free_port()
    with storescp(tmp_path / "pacs", "TRAUMAPACS") as pacs_port:
        referring = await spawn_node(
            "Referring Hospital ED",
            tmp_path / "referring",
            extra_args=["--dicom-port", str(dicom_port), "--dicom-quiet", "3600"],
        )
        trauma = await spawn_node(
            "Trauma Centre Radiology",
            tmp_path / "trauma",
            extra_args=["--pacs", f"TRAUMAPACS@127.0.0.1:{pacs_port}"],
        )
        node_args = ["--node", referring.url, "--data-dir", str(referring.data_dir), "--json"]
        try:
            res = await cli.run("import", str(study), "--report", str(report), *node_args)
            assert res.code == 0, res.stderr
            (imported,) = res.events("import")
            assert imported["imported"] == 20
            assert res.events("report")[0]["kind"] == "text"
            res = await cli.run("studies", *node_args)
            (listed,) = res.events("study")
            assert listed["instances"] == 21 and "SR" in listed["modalities"]

            async with aiohttp.ClientSession() as http:
                s_api, r_api = await flow.api(referring, http), await flow.api(trauma, http)
                # a pushed study stays "receiving" (quiet period of an hour) until "send now"
                storescu(dicom_port, "P2PSHARE", _one(study))
                pushed = [s for s in await s_api._call("GET", "/api/v1/studies")
                          if s["source"] == "scp"]
                assert pushed == []  # same study: the pushed instance was a duplicate
                sid = listed["study_id"]
                assert (await s_api._call("GET", f"/api/v1/studies/{sid}"))["duplicates"] >= 1
                done = await s_api._call("POST", f"/api/v1/studies/{sid}/complete")
                assert done["state"] == "complete"

                job = await flow.transfer(s_api, r_api, referring, listed["path"],
                                          tmp_path / "received")
                with pytest.raises(Exception, match="not-found|no such transfer"):
                    await r_api._call("POST", "/api/v1/transfers/nope/export", {"mrn": "X"})
            res = await cli.run(
                "export", job, "--mrn", "TC-5", "--issuer", "TRAUMA", "--accession", "L1",
                "--node", trauma.url, "--data-dir", str(trauma.data_dir), "--json",
            )
            assert res.code == 0, res.stdout + res.stderr
            assert res.events("complete")[0]["stored"] == 21
            async with aiohttp.ClientSession() as http:
                s_api = await flow.api(referring, http)
                await s_api._call("DELETE", f"/api/v1/studies/{sid}")
                assert await s_api._call("GET", "/api/v1/studies") == []
        finally:
            await stop_node(trauma)
            await stop_node(referring)
    exported = flow.by_sop(tmp_path / "pacs")
    assert len(exported) == 21
    assert {str(dcmread(p).AccessionNumber) for p in exported.values()} == {"L1"}


def _one(study: Path) -> Path:
    return sorted(study.rglob("*.dcm"))[0]


async def test_auto_export_keeps_the_foreign_id_qualified_by_the_sender(
    study: Path, tmp_path: Path
) -> None:
    """--auto-export: on completion, exported with the received Patient ID, the sender's name as
    its issuer, and the accession prefix rule; no one typed anything."""
    with storescp(tmp_path / "pacs", "TRAUMAPACS") as pacs_port:
        referring = await spawn_node("Referring Hospital ED", tmp_path / "referring")
        trauma = await spawn_node(
            "Trauma Centre Radiology",
            tmp_path / "trauma",
            extra_args=["--pacs", f"TRAUMAPACS@127.0.0.1:{pacs_port}", "--auto-export",
                        "--accession-prefix", "RH-"],
        )
        try:
            async with aiohttp.ClientSession() as http:
                s_api, r_api = await flow.api(referring, http), await flow.api(trauma, http)
                imported = await s_api._call("POST", "/api/v1/studies/import",
                                             {"path": str(study)})
                sid = imported["studies"][0]["study_id"]
                path = (await s_api._call("GET", f"/api/v1/studies/{sid}"))["path"]
                await flow.transfer(s_api, r_api, referring, path, tmp_path / "received")
                deadline = time.monotonic() + 60
                exports: list[dict[str, object]] = []
                while not any(e.get("state") == "complete" for e in exports):
                    assert time.monotonic() < deadline, exports
                    await asyncio.sleep(0.2)
                    exports = await r_api._call("GET", "/api/v1/exports")
                assert exports[0]["stored"] == 20 and exports[0]["reconciled"] is False
        finally:
            await stop_node(trauma)
            await stop_node(referring)
    exported = flow.by_sop(tmp_path / "pacs")
    assert len(exported) == 20
    original = dcmread(_one(study))
    ds = dcmread(next(iter(exported.values())))
    assert ds.PatientID == original.PatientID
    assert ds.IssuerOfPatientID == "Referring Hospital ED"
    assert ds.AccessionNumber == "RH-" + original.AccessionNumber
    assert ds.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].IssuerOfPatientID == ""
