"""Export into Debian's Orthanc by C-STORE and by STOW-RS; read back through Orthanc's REST API."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from p2pshare.demo import spawn_node, stop_node
from tests.pacs import flow
from tests.pacs.peers import orthanc

pytestmark = pytest.mark.e2e


async def test_export_to_orthanc_by_cstore_and_stow(study: Path, tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc-a") as pacs, orthanc(tmp_path / "orthanc-b") as web:
        referring = await spawn_node("Referring Hospital ED", tmp_path / "referring")
        trauma = await spawn_node(
            "Trauma Centre Radiology",
            tmp_path / "trauma",
            extra_args=[
                "--pacs", f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}",
                "--stow", f"{web.url}/dicom-web",
                "--accession-prefix", "RH-",
            ],
        )
        try:
            async with aiohttp.ClientSession() as http:
                s_api, r_api = await flow.api(referring, http), await flow.api(trauma, http)
                imported = await s_api._call("POST", "/api/v1/studies/import",
                                             {"path": str(study)})
                sid = imported["studies"][0]["study_id"]
                record = await s_api._call("GET", f"/api/v1/studies/{sid}")
                job = await flow.transfer(s_api, r_api, referring, record["path"],
                                          tmp_path / "received")
                last, by_cstore = await flow.export(
                    r_api, job,
                    {"target": "pacs", "mrn": "TC-1001", "issuer": "TRAUMA",
                     "accession": "TC-A77"},
                )
                assert last["event"] == "complete", last
                assert by_cstore["stored"] == 20
                last, by_stow = await flow.export(
                    r_api, job, {"target": "stow", "mrn": "TC-1002", "issuer": "TRAUMA"}
                )
                assert last["event"] == "complete", last
                assert by_stow["stored"] == 20 and by_stow["destination"].endswith("dicom-web")
        finally:
            await stop_node(trauma)
            await stop_node(referring)

        for peer, mrn, accession in ((pacs, "TC-1001", "TC-A77"), (web, "TC-1002", None)):
            patients = peer.get("/patients?expand")
            assert [p["MainDicomTags"]["PatientID"] for p in patients] == [mrn]
            studies = peer.get("/studies?expand")
            assert len(studies) == 1
            if accession:
                assert studies[0]["MainDicomTags"]["AccessionNumber"] == accession
            else:
                assert studies[0]["MainDicomTags"]["AccessionNumber"].startswith("RH-")
            instances = peer.get("/instances")
            assert len(instances) == 20
            tags = peer.get(f"/instances/{instances[0]}/tags?simplify")
            assert tags["PatientID"] == mrn and tags["IssuerOfPatientID"] == "TRAUMA"
            assert tags["OtherPatientIDsSequence"][0]["PatientID"] == "DEMO-0001"
            original = tags["OriginalAttributesSequence"][0]
            assert original["ReasonForTheAttributeModification"] == "COERCE"
            assert original["ModifiedAttributesSequence"][0]["PatientID"] == "DEMO-0001"
