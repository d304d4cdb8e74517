"""Shared steps of the PACS end-to-end tests: push, wait, offer, receive, export, compare."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from pydicom import dcmread

from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc
from p2pshare.pacs.reconcile import RECONCILED


async def api(node: NodeProc, http: aiohttp.ClientSession) -> NodeClient:
    return NodeClient(node.url, node.token, http)


async def wait_complete_study(client: NodeClient, timeout: float = 60) -> dict[str, Any]:
    """The first library study whose state is complete (polls; no timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        studies = await client._call("GET", "/api/v1/studies")
        done = [s for s in studies if s["state"] == "complete"]
        if done:
            return dict(done[0])
        assert time.monotonic() < deadline, f"no study completed: {studies}"
        await asyncio.sleep(0.2)


async def transfer(
    sender: NodeClient, receiver: NodeClient, sender_node: NodeProc, path: str, out: Path
) -> str:
    """Offer ``path`` on the sender, receive it with the spoken code; returns the receive job."""
    offer = await sender._call(
        "POST", "/api/v1/offers", {"path": path, "consent": "none", "expires_s": 600}
    )
    job = await receiver.receive(offer["code"], str(out), [sender_node.address])
    last: dict[str, Any] = {}
    async for event in receiver.events(job):
        last = event
    assert last["event"] == "complete", last
    return job


async def export(
    receiver: NodeClient, job: str, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start an export and follow it to its end; returns (last event, export record)."""
    started = await receiver._call("POST", f"/api/v1/transfers/{job}/export", body)
    last: dict[str, Any] = {}
    async for event in receiver.events(started["export_id"]):
        last = event
    record = await receiver._call("GET", f"/api/v1/exports/{started['export_id']}")
    return last, record


def by_sop(folder: Path) -> dict[str, Path]:
    out = {}
    for path in folder.rglob("*"):
        if path.is_file():
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            out[str(ds.SOPInstanceUID)] = path
    return out


def assert_reconciled_copy(original: Path, exported: Path, expect: dict[str, str]) -> None:
    """Identical except the reconciled attributes, whose originals are in the sequences."""
    a, b = dcmread(original), dcmread(exported)
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    untouched_a = {e.tag: e for e in a if e.keyword not in RECONCILED}
    untouched_b = {e.tag: e for e in b if e.keyword not in RECONCILED}
    assert untouched_a.keys() == untouched_b.keys()
    for tag, elem in untouched_a.items():
        assert untouched_b[tag].value == elem.value, f"{elem.keyword} changed"
    for keyword, value in expect.items():
        assert str(b.get(keyword)) == value, keyword
    item = b.OriginalAttributesSequence[-1]
    assert item.ReasonForTheAttributeModification == "COERCE"
    assert item.ModifyingSystem and item.AttributeModificationDateTime
    old = item.ModifiedAttributesSequence[0]
    assert old.PatientID == a.PatientID
    if "PatientName" in expect:
        assert str(old.PatientName) == str(a.PatientName)
    if "AccessionNumber" in expect:
        assert old.AccessionNumber == a.AccessionNumber
    others = [(o.PatientID, o.IssuerOfPatientID) for o in b.OtherPatientIDsSequence]
    assert any(pid == a.PatientID for pid, _ in others)
