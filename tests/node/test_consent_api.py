"""Consent through a real node app: the phone link's API, policies, break-glass, notifications."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from p2pshare.config import NodeConfig
from p2pshare.dicom.synthetic import generate_ct_study
from p2pshare.node.app import create_app
from p2pshare.node.keys import jobs_key, store_key
from tests.node.test_api import NAME, SMALL, Node

DOB = "1970-01-01"  # the synthetic study's PatientBirthDate (19700101)
GOOD_REASON = "Patient unconscious after a road accident; CT needed for neurosurgical planning now."


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("consent-study")
    generate_ct_study(root, seed=41, series=SMALL[:1])
    return root


async def _node(tmp_path: Path, **cfg: Any) -> tuple[Node, TestClient[Any, Any]]:
    config = NodeConfig(
        data_dir=tmp_path / "node", name=NAME, advertise=("127.0.0.1:8700",), **cfg
    )
    app = create_app(config)
    client = TestClient(TestServer(app))
    await client.start_server()
    token = (config.data_dir / "api-token").read_text().strip()
    return Node(app, client, config, token), client


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n, client = await _node(tmp_path)
    try:
        yield n
    finally:
        await client.close()


async def make_offer(node: Node, study: Path, **extra: Any) -> dict[str, Any]:
    res = await node.call("POST", "/api/v1/offers", body={"path": str(study), **extra})
    assert res.status == 201, res.text
    body: dict[str, Any] = res.body
    return body


def link_path(offer: dict[str, Any]) -> str:
    link = offer["consent"]["link"]
    assert link.startswith("http://127.0.0.1:8700/consent/")
    return link[len("http://127.0.0.1:8700") :]


async def phone(node: Node, method: str, path: str, body: Any = None, verifier: str = "") -> Any:
    headers = {"X-Consent-Verifier": verifier} if verifier else {}
    async with node.client.request(method, path, json=body, headers=headers) as resp:
        text = await resp.text()
        assert "Traceback" not in text
        assert resp.headers.get("Referrer-Policy") == "no-referrer"
        assert resp.headers.get("Cache-Control") == "no-store"
        return resp.status, (json.loads(text) if resp.content_type == "application/json" else text)


def actions(node: Node) -> list[str]:
    return [r["action"] for r in node.app[store_key].audit.records()]


def job_events(node: Node, offer_id: str) -> list[dict[str, Any]]:
    job = node.app[jobs_key].get(offer_id)
    assert job is not None
    return list(job.events)


# -- the default: the patient decides ------------------------------------------------------------


async def test_default_policy_needs_the_patient_and_the_link_shows_little_before_the_dob(
    node: Node, study: Path
) -> None:
    offer = await make_offer(node, study)
    c = offer["consent"]
    assert c["policy"] == "patient" and c["state"] == "pending" and c["dob_tries_left"] == 5
    path = link_path(offer)
    status, html = await phone(node, "GET", path)
    assert status == 200 and "consent.js" in html
    status, state = await phone(node, "GET", path + "/state")
    assert status == 200
    assert state["sender"] == NAME and state["state"] == "pending" and state["needs_dob"]
    assert "study" not in state  # no study details before the date of birth matched
    assert not state["can_approve_now"]  # nobody paired, no intended destination given
    assert "consent-requested" in actions(node) and "consent-viewed" in actions(node)
    # the staff view of the offer never carries the link or the date of birth
    res = await node.call("GET", f"/api/v1/offers/{offer['offer_id']}")
    assert res.body["consent"]["state"] == "pending"
    assert "link" not in res.body["consent"] and "1970" not in res.text


async def test_five_wrong_dates_of_birth_kill_the_link_and_end_a_patient_only_offer(
    node: Node, study: Path
) -> None:
    offer = await make_offer(node, study)
    path = link_path(offer)
    for left in (4, 3, 2, 1):
        status, body = await phone(node, "POST", path + "/verify", {"dob": "1980-02-03"})
        assert status == 403 and body["tries_left"] == left, body
    status, body = await phone(node, "POST", path + "/verify", {"dob": "not a date"})
    assert status == 410 and "closed" in body["message"]
    # right date now: too late, the link is dead
    status, _ = await phone(node, "POST", path + "/verify", {"dob": DOB})
    assert status == 404
    stored = node.app[store_key].get_offer(offer["offer_id"])
    assert stored is not None and stored.state == "declined"
    events = job_events(node, offer["offer_id"])
    assert events[-1]["event"] == "error" and events[-1]["code"] == "consent-failed"
    assert actions(node).count("consent-dob-mismatch") == 5
    assert "consent-link-dead" in actions(node)


async def test_right_dob_shows_the_study_and_gates_every_decision(node: Node, study: Path) -> None:
    offer = await make_offer(node, study, destination="Trauma Centre Radiology")
    path = link_path(offer)
    status, body = await phone(node, "POST", path + "/decision", {"decision": "approve"})
    assert status == 403  # no verifier: confirm the date of birth first
    status, body = await phone(node, "POST", path + "/verify", {"dob": "01.01.1970"})
    assert status == 200, body
    verifier = body["verifier"]
    assert body["study"]["images"] == offer["study"]["instances"]
    assert body["destination"] == {"verified": False, "intended": "Trauma Centre Radiology"}
    assert body["can_approve_now"]
    status, body = await phone(
        node, "POST", path + "/decision", {"decision": "approve", "verifier": "x" * 43}
    )
    assert status == 403
    status, body = await phone(
        node,
        "POST",
        path + "/decision",
        {"decision": "approve", "verifier": verifier, "by": "representative", "name": "A"},
    )
    assert status == 400 and "related to the patient" in body["message"]
    status, body = await phone(
        node,
        "POST",
        path + "/decision",
        {
            "decision": "approve",
            "verifier": verifier,
            "by": "representative",
            "name": "Next of kin",
            "relationship": "daughter",
        },
    )
    assert status == 200 and body["state"] == "approved"
    status, body = await phone(
        node, "POST", path + "/decision", {"decision": "decline", "verifier": verifier}
    )
    assert status == 409  # decided once
    rec = [r for r in node.app[store_key].audit.records() if r["action"] == "consent-approved"]
    assert rec[0]["detail"]["by"] == "representative"
    assert rec[0]["detail"]["relationship"] == "daughter"
    assert rec[0]["detail"]["shown"] == "intended"
    c = node.app[store_key].consents.get(offer["offer_id"])
    assert c is not None and c.decided_by == {
        "role": "representative",
        "name": "Next of kin",
        "relationship": "daughter",
    }


async def test_approve_waits_for_a_destination_and_decline_ends_the_offer(
    node: Node, study: Path
) -> None:
    offer = await make_offer(node, study)
    path = link_path(offer)
    _, body = await phone(node, "POST", path + "/verify", {"dob": DOB})
    verifier = body["verifier"]
    status, body = await phone(
        node, "POST", path + "/decision", {"decision": "approve", "verifier": verifier}
    )
    assert status == 409 and body["error"] == "wait"
    status, body = await phone(
        node, "POST", path + "/decision", {"decision": "decline", "verifier": verifier}
    )
    assert status == 200 and body["state"] == "declined"
    stored = node.app[store_key].get_offer(offer["offer_id"])
    assert stored is not None and stored.state == "declined"
    assert job_events(node, offer["offer_id"])[-1]["code"] == "consent-declined"
    status, _ = await phone(node, "GET", path + "/state")
    assert status == 404  # the link ended with the offer


async def test_unknown_and_cancelled_links_say_so(node: Node, study: Path) -> None:
    status, body = await phone(node, "GET", "/consent/" + "A" * 43 + "/state")
    assert status == 404 and "not valid" in body["message"]
    offer = await make_offer(node, study)
    path = link_path(offer)
    res = await node.call("DELETE", f"/api/v1/offers/{offer['offer_id']}")
    assert res.status == 200
    status, _ = await phone(node, "GET", path + "/state")
    assert status == 404


async def test_a_study_without_birth_date_cannot_use_the_patient_policy(
    node: Node, tmp_path: Path
) -> None:
    root = tmp_path / "nodob"
    generate_ct_study(root, seed=42, series=SMALL[:1], birth_date="")
    res = await node.call("POST", "/api/v1/offers", body={"path": str(root)})
    assert res.status == 400 and "date of birth" in res.body["message"]
    res = await node.call(
        "POST", "/api/v1/offers", body={"path": str(root), "consent": "patient-or-break-glass"}
    )
    assert res.status == 201 and res.body["consent"]["dob_tries_left"] is None


async def test_policy_none_is_flagged(node: Node, study: Path) -> None:
    offer = await make_offer(node, study, consent="none")
    assert offer["consent"]["state"] == "not-required" and offer["consent"]["link"] is None
    rows = [r for r in node.app[store_key].audit.records() if r["action"] == "consent-not-required"]
    assert rows and rows[0]["outcome"] == "flagged"
    res = await node.call("POST", "/api/v1/offers", body={"path": str(study), "consent": "maybe"})
    assert res.status == 400 and "unknown consent policy" in res.body["message"]


# -- break-glass -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reason",
    ["", "emergency", "   urgent!  ", "needed now now now now", "x" * 30],
)
async def test_break_glass_refuses_an_empty_or_trivial_reason(
    node: Node, study: Path, reason: str
) -> None:
    offer = await make_offer(node, study, consent="patient-or-break-glass")
    res = await node.call(
        "POST",
        f"/api/v1/offers/{offer['offer_id']}/break-glass",
        body={"clinician": "ED consultant on call", "reason": reason},
    )
    assert res.status == 400, res.text
    assert "reason" in res.body["message"]
    assert "break-glass" not in actions(node)


async def test_break_glass_is_refused_under_the_patient_policy(node: Node, study: Path) -> None:
    offer = await make_offer(node, study)
    res = await node.call(
        "POST",
        f"/api/v1/offers/{offer['offer_id']}/break-glass",
        body={"clinician": "ED consultant on call", "reason": GOOD_REASON},
    )
    assert res.status == 400 and "only the patient" in res.body["message"]


async def test_break_glass_is_audited_time_boxed_and_notified_by_webhook(
    tmp_path: Path, study: Path
) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": True})

    hook_app = web.Application()
    hook_app.router.add_post("/privacy", hook)
    hook_server = TestServer(hook_app)
    await hook_server.start_server()
    url = str(hook_server.make_url("/privacy"))
    n, client = await _node(
        tmp_path,
        privacy_webhook=url,
        privacy_contact="privacy-office@referring.example",
        break_glass_minutes=30,
    )
    try:
        offer = await make_offer(n, study, consent="patient-or-break-glass")
        path = link_path(offer)
        res = await n.call(
            "POST",
            f"/api/v1/offers/{offer['offer_id']}/break-glass",
            body={"clinician": "ED consultant on call", "reason": GOOD_REASON},
        )
        assert res.status == 200, res.text
        assert res.body["state"] == "break-glass"
        assert res.body["decided_by"]["reason"] == GOOD_REASON
        assert res.body["valid_until"] - res.body["decided_at"] == 30 * 60
        for _ in range(100):
            if received:
                break
            import asyncio

            await asyncio.sleep(0.05)
        assert len(received) == 1
        note = received[0]
        assert note["kind"] == "break-glass" and note["offer_id"] == offer["offer_id"]
        assert note["recipient"] == "privacy-office@referring.example"
        assert note["clinician"] == "ED consultant on call" and note["reason"] == GOOD_REASON
        assert "DEMO" not in json.dumps(note)  # no patient name travels to the webhook
        outbox = n.app[store_key].notifications.entries()
        assert outbox[0]["state"] == "sent"
        assert {"break-glass", "notification-queued", "notification-sent"} <= set(actions(n))
        events = [e["event"] for e in job_events(n, offer["offer_id"])]
        assert "break-glass" in events
        # the phone link no longer decides anything
        status, _ = await phone(n, "POST", path + "/verify", {"dob": DOB})
        assert status == 404
        # a second break-glass is refused: it is already authorised
        res = await n.call(
            "POST",
            f"/api/v1/offers/{offer['offer_id']}/break-glass",
            body={"clinician": "ED consultant on call", "reason": GOOD_REASON},
        )
        assert res.status == 400
    finally:
        await client.close()
        await hook_server.close()


async def test_break_glass_without_a_webhook_stays_queued_in_the_outbox(
    node: Node, study: Path
) -> None:
    offer = await make_offer(
        node,
        study,
        consent="patient-or-break-glass",
        break_glass={"clinician": "Trauma team leader", "reason": GOOD_REASON},
    )
    assert offer["consent"]["state"] == "break-glass"
    res = await node.call("GET", "/api/v1/notifications")
    assert res.status == 200 and res.body[0]["state"] == "queued"
    assert res.body[0]["payload"]["offer_id"] == offer["offer_id"]


async def test_nothing_about_the_patient_is_stored_in_clear(node: Node, study: Path) -> None:
    offer = await make_offer(node, study)
    path = link_path(offer)
    await phone(node, "POST", path + "/verify", {"dob": "1990-05-05"})
    await phone(node, "POST", path + "/verify", {"dob": DOB})
    db = sqlite3.connect(node.config.data_dir / "node.sqlite3")
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    for secret in ("19700101", "1970-01-01", "1990-05-05", path.rsplit("/", 1)[1]):
        assert secret not in dump


async def test_an_approval_is_for_the_destination_the_page_showed(node: Node, study: Path) -> None:
    offer = await make_offer(node, study, destination="Trauma Centre Radiology")
    path = link_path(offer)
    _, body = await phone(node, "POST", path + "/verify", {"dob": DOB})
    verifier = body["verifier"]
    # a receiving node pairs after the page was drawn (as if between two polls)
    node.app[store_key].set_offer_state(
        offer["offer_id"], "paired", peer_name="Other Hospital", peer_fingerprint="AAAA-BBBB"
    )
    status, body = await phone(
        node, "POST", path + "/decision", {"decision": "approve", "verifier": verifier}
    )
    assert status == 409 and body["error"] == "changed"
    status, state = await phone(node, "GET", path + "/state", verifier=verifier)
    assert state["destination"] == {
        "verified": True, "name": "Other Hospital", "fingerprint": "AAAA-BBBB"
    }  # fmt: skip
    status, body = await phone(
        node,
        "POST",
        path + "/decision",
        {"decision": "approve", "verifier": verifier, "shown_fingerprint": "AAAA-BBBB"},
    )
    assert status == 200 and body["state"] == "approved"
    c = node.app[store_key].consents.get(offer["offer_id"])
    assert c is not None and c.shown == "verified"


async def test_a_browser_session_may_not_loosen_the_node_policy_but_the_operator_may(
    node: Node, study: Path
) -> None:
    from p2pshare.node import service

    with pytest.raises(Exception) as info:
        await service.create_offer(node.app, str(study), None, None, consent_policy="none")
    assert "stricter, never looser" in str(info.value)
    offer = await make_offer(node, study, consent="none")  # the API token: the operator
    assert offer["consent"]["state"] == "not-required"
    offers = await service.create_offer(
        node.app, str(study), None, None, consent_policy="patient", actor="nurse1"
    )
    assert offers["consent"]["policy"] == "patient"
    created = [r for r in node.app[store_key].audit.records() if r["action"] == "offer-created"]
    assert [r["detail"]["user"] for r in created] == ["api-token", "nurse1"]


async def test_the_manifest_offered_names_no_patient(node: Node, study: Path) -> None:
    offer = await make_offer(node, study)
    stored = node.app[store_key].get_offer(offer["offer_id"])
    assert stored is not None and stored.manifest.patient == {}
    assert "DEMO" not in stored.manifest.to_bytes().decode()


async def test_the_patient_can_revoke_while_the_transfer_is_interrupted(
    node: Node, study: Path
) -> None:
    """A cut transfer waits for its receiver to resume; the patient's revocation must end it,
    so that no reconnection can carry the images on."""
    offer = await make_offer(node, study, destination="Trauma Centre Radiology")
    path = link_path(offer)
    _, body = await phone(node, "POST", path + "/verify", {"dob": DOB})
    verifier = body["verifier"]
    status, _ = await phone(
        node, "POST", path + "/decision", {"decision": "approve", "verifier": verifier}
    )
    assert status == 200
    store = node.app[store_key]
    oid = offer["offer_id"]
    store.set_offer_state(oid, "interrupted", peer_name="Trauma Centre Radiology",
                          peer_fingerprint="AAAA-BBBB")  # fmt: skip
    store.roll_offer_ticket(oid, "cd" * 16, b"s" * 32, 2**40)
    assert store.find_resumable_offer("cd" * 16, 0) is not None
    status, state = await phone(node, "GET", path + "/state", verifier=verifier)
    assert status == 200 and state["transfer"] == "interrupted"  # the page still works
    status, body = await phone(node, "POST", path + "/revoke", {"verifier": verifier})
    assert status == 200 and body["state"] == "revoked"
    stored = store.get_offer(oid)
    assert stored is not None and stored.state == "failed"
    assert store.find_resumable_offer("cd" * 16, 0) is None  # the ticket no longer works
    assert job_events(node, oid)[-1]["code"] == "consent-revoked"
