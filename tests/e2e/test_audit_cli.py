"""The audit of real nodes after a real transfer: `p2pshare audit verify|export` as subprocesses.

Two `p2pshare serve` nodes move a study with the CLI (one wrong code first). Then, on the
running nodes' databases: `audit verify` holds; a copy of the database edited with the sqlite3
program (one row edited, the last row deleted, a middle row deleted, two rows swapped) fails
naming the record; the exports parse and hold the transfer's events; and neither the audit nor
the nodes' logs hold the patient's name or the spoken code.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
import pytest_asyncio

from p2pshare.demo import NodeProc, approve_as_patient, two_nodes

from ..test_audit_export import check_dicom_document, check_fhir_bundle
from .conftest import NAMES, Cli

SQLITE3 = shutil.which("sqlite3")


@dataclass
class Moved:
    sender: NodeProc
    receiver: NodeProc
    offer: dict[str, Any]
    words: list[str]
    patient_name: str
    birth_date: str


#: One transfer between one pair of nodes serves every test here (they only read, or tamper
#: with copies), so the module shares an event loop with the node processes.
pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[NodeProc, NodeProc]]:
    async with two_nodes(tmp_path_factory.mktemp("audit-nodes"), *NAMES) as nodes:
        yield nodes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def moved(
    pair: tuple[NodeProc, NodeProc], study: Path, tmp_path_factory: pytest.TempPathFactory
) -> Moved:
    """A study sent with the CLI between two running nodes: the patient first types a wrong
    date of birth, then approves on the consent page; the receiver first types a wrong code."""
    sender, receiver = pair
    tmp_path = tmp_path_factory.mktemp("audit-moved")
    cli = Cli(tmp_path)
    ds = pydicom.dcmread(next(iter(sorted(study.rglob("*.dcm")))), stop_before_pixels=True)
    dob = str(ds.PatientBirthDate)
    birth_date = f"{dob[:4]}-{dob[4:6]}-{dob[6:8]}"
    send = await cli.start(
        "send", str(study), "--node", sender.url, "--data-dir", str(sender.data_dir),
        "--to", receiver.name, "--json",
    )
    offer = await cli.first_json(send, "offer")
    link = offer["consent"]["link"]
    async with aiohttp.ClientSession() as http:
        async with http.post(link + "/verify", json={"dob": "1901-02-03"}) as resp:
            assert resp.status != 200
        await approve_as_patient(http, link, birth_date)
    number, *words = offer["code"].split("-")
    wrong = "-".join([number, *reversed(words)])
    bad = await cli.receive_at(receiver, wrong, str(tmp_path / "in"), "--from", sender.address)
    assert bad.code == 2, bad.stdout + bad.stderr
    good = await cli.receive_at(
        receiver, offer["code"], str(tmp_path / "in"), "--from", sender.address
    )
    assert good.code == 0, good.stdout + good.stderr
    assert (await cli.finish(send, seen=[offer])).code == 0
    return Moved(sender, receiver, offer, words, str(ds.PatientName), birth_date)


def snapshot(node: NodeProc, dest: Path) -> Path:
    """A consistent copy of a running node's database and key, to tamper with."""
    dest.mkdir(mode=0o700)
    shutil.copy2(node.data_dir / "identity.key", dest / "identity.key")
    shutil.copy2(node.data_dir / "name", dest / "name")
    src = sqlite3.connect(f"{(node.data_dir / 'node.sqlite3').as_uri()}?mode=ro", uri=True)
    copy = sqlite3.connect(dest / "node.sqlite3")
    try:
        src.backup(copy)
    finally:
        src.close()
        copy.close()
    return dest


def sql(data_dir: Path, statement: str) -> str:
    """Run ``statement`` with the sqlite3 program, as someone tampering by hand would."""
    assert SQLITE3 is not None, "the sqlite3 program is needed (Debian package sqlite3)"
    res = subprocess.run(
        [SQLITE3, str(data_dir / "node.sqlite3"), statement],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return res.stdout.strip()


def audit_rows(data_dir: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / "node.sqlite3")
    try:
        return db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
    finally:
        db.close()


async def test_verify_holds_on_running_nodes_and_names_the_first_tampered_record(
    moved: Moved, cli: Cli, tmp_path: Path
) -> None:
    for node in (moved.sender, moved.receiver):
        ok = await cli.run("audit", "verify", "--data-dir", str(node.data_dir))
        assert ok.code == 0, ok.stdout + ok.stderr
        assert "audit chain holds" in ok.stdout and "signed by this node's key" in ok.stdout
        as_json = await cli.run("audit", "verify", "--data-dir", str(node.data_dir), "--json")
        report = as_json.events("audit-verify")[0]
        assert as_json.code == 0 and report["ok"] is True and report["sealed"] is True
        assert report["records"] == len(audit_rows(node.data_dir))

    sender = moved.sender
    last = len(audit_rows(snapshot(sender, tmp_path / "probe")))
    assert last >= 8

    async def broken_at(case: str, statement: str) -> tuple[int, str]:
        copy = snapshot(sender, tmp_path / case)
        sql(copy, statement)
        res = await cli.run("audit", "verify", "--data-dir", str(copy))
        assert res.code == 1, f"{case}: {res.stdout}{res.stderr}"
        line = res.stderr.strip()
        assert line.startswith("audit chain broken at record "), line
        assert "Traceback" not in res.stderr
        seq, reason = line.removeprefix("audit chain broken at record ").split(": ", 1)
        return int(seq), reason

    assert await broken_at(
        "edit", "UPDATE audit SET outcome = 'ok' WHERE action = 'pairing-attempt' "
        "AND outcome = 'wrong-code'"
    ) == (
        int(sql(snapshot(sender, tmp_path / "which"), "SELECT seq FROM audit WHERE "
            "action = 'pairing-attempt' AND outcome = 'wrong-code'")),
        "the record was altered",
    )
    assert await broken_at("delete-last", f"DELETE FROM audit WHERE seq = {last}") == (
        last,
        f"a record is missing (the signed head says the log runs to {last})",
    )
    assert await broken_at("delete-middle", "DELETE FROM audit WHERE seq = 4") == (
        4,
        "a record is missing",
    )
    swap = (
        "UPDATE audit SET seq = -1 WHERE seq = 5; UPDATE audit SET seq = 5 WHERE seq = 6; "
        "UPDATE audit SET seq = 6 WHERE seq = -1;"
    )
    assert await broken_at("swap", swap) == (5, "the chain link to the previous record is broken")
    # Deleting the last record *and* the signed head does not hide it either.
    assert await broken_at(
        "delete-last-and-head",
        f"DELETE FROM audit WHERE seq = {last}; DELETE FROM meta WHERE key = 'audit_head';",
    ) == (last, "the signed chain head is missing: records from here on may have been deleted")


async def test_exports_of_a_running_node_parse_and_hold_the_transfer(
    moved: Moved, cli: Cli, tmp_path: Path
) -> None:
    sender, receiver = moved.sender, moved.receiver
    offer_id = moved.offer["offer_id"]

    out = tmp_path / "sender-fhir.json"
    res = await cli.run(
        "audit", "export", "--format", "fhir", "--out", str(out), "--data-dir", str(sender.data_dir)
    )
    assert res.code == 0, res.stderr
    assert out.stat().st_mode & 0o077 == 0
    events = check_fhir_bundle(json.loads(out.read_text()))
    actions = [
        (next(c["code"] for c in e["subtype"] if c["system"] == "urn:p2pshare:audit-action"),
         e["type"]["code"], e["outcome"])
        for e in events
    ]
    for expected in [
        ("node-started", "110100", "0"),
        ("offer-created", "110103", "0"),
        ("consent-requested", "110110", "0"),
        ("consent-dob-mismatch", "110114", "4"),
        ("consent-approved", "110110", "0"),
        ("pairing-attempt", "110114", "4"),  # the wrong code
        ("pairing-attempt", "110114", "0"),
        ("transfer-started", "110102", "0"),
        ("receipt-received", "110104", "0"),
    ]:
        assert expected in actions, expected
    assert all(
        e["source"]["observer"]["display"] == sender.name for e in events
    )
    started = next(e for e in events if e["type"]["code"] == "110102")
    assert {"system": "urn:p2pshare:object:offer", "value": offer_id} in [
        x["what"]["identifier"] for x in started["entity"]
    ]

    # standard output, DICOM XML, the receiving node
    res = await cli.run("audit", "export", "--format", "dicom", "--data-dir", str(receiver.data_dir))
    assert res.code == 0, res.stderr
    messages = check_dicom_document(res.stdout.encode())
    got = set()
    for m in messages:
        ident = m.find("EventIdentification")
        event_id = m.find("EventIdentification/EventID")
        assert ident is not None and event_id is not None
        got.add((event_id.get("csd-code"), ident.get("EventActionCode")))
    assert ("110104", "C") in got  # receipt signed: the instances were created here
    assert ("110102", "E") in got  # transfer started
    assert ("110114", "E") in got  # pairing

    # a window in time: nothing before the node existed, everything up to now
    empty = await cli.run(
        "audit", "export", "--format", "dicom", "--until", "2001-01-01",
        "--data-dir", str(receiver.data_dir),
    )
    assert empty.code == 0 and list(ET.fromstring(empty.stdout)) == []
    since = await cli.run(
        "audit", "export", "--format", "fhir", "--since", "2001-01-01T00:00Z",
        "--out", str(tmp_path / "since.json"), "--data-dir", str(receiver.data_dir),
    )
    assert since.code == 0, since.stderr
    assert len(json.loads((tmp_path / "since.json").read_text())["entry"]) == len(messages)


async def test_bad_audit_input_is_one_clear_line(cli: Cli, tmp_path: Path) -> None:
    missing = await cli.run("audit", "verify", "--data-dir", str(tmp_path / "nowhere"))
    assert missing.code == 2
    assert missing.stderr.strip().startswith("Error: there is no node database at ")
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = await cli.run(
        "audit", "export", "--format", "fhir", "--since", "yesterday", "--data-dir", str(tmp_path)
    )
    assert bad.code == 2 and "--since 'yesterday' is not a time" in bad.stderr
    assert "Traceback" not in missing.stderr + bad.stderr


async def test_audit_api_lists_one_offer_and_verifies(moved: Moved) -> None:
    sender = moved.sender
    offer_id = moved.offer["offer_id"]
    auth = {"Authorization": f"Bearer {sender.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sender.url}/api/v1/audit", params={"offer": offer_id}) as r:
            assert r.status == 401
        async with http.get(f"{sender.url}/api/v1/audit/verify") as r:
            assert r.status == 401
        async with http.get(
            f"{sender.url}/api/v1/audit", params={"offer": offer_id}, headers=auth
        ) as r:
            assert r.status == 200
            records = (await r.json())["records"]
        async with http.get(f"{sender.url}/api/v1/audit/verify", headers=auth) as r:
            assert r.status == 200
            report = await r.json()
    assert records and all(rec["detail"].get("offer") == offer_id for rec in records)
    assert [r["action"] for r in records][:1] == ["offer-created"]
    assert {"pairing-attempt", "transfer-started", "receipt-received"} <= {
        r["action"] for r in records
    }
    assert report["ok"] is True and report["sealed"] is True
    # the read itself was audited, and the chain still holds afterwards
    rows = audit_rows(sender.data_dir)
    assert rows[-1][2] == "audit-log-used"
    assert json.loads(rows[-1][4])["query"] == offer_id


async def test_no_patient_name_or_code_in_the_audit_or_the_logs(moved: Moved) -> None:
    name = moved.patient_name
    secret = moved.offer["uri"].split("#", 1)[1]
    link_token = moved.offer["consent"]["link"].rstrip("/").rsplit("/", 1)[1]
    needles = [
        name,
        name.replace("^", " "),
        secret,
        moved.offer["code"],
        *moved.words,
        link_token,
        moved.birth_date,
    ]
    assert name and all(needles)
    for node in (moved.sender, moved.receiver):
        table = json.dumps([list(r) for r in audit_rows(node.data_dir)])
        log = node.log_path.read_text()
        for needle in needles:
            assert needle not in table, f"{needle!r} is in {node.name}'s audit"
            assert needle not in log, f"{needle!r} is in {node.name}'s log"
