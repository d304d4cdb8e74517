"""The staff API of a real node app, through aiohttp's test client (no subprocess)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import shutil
import socket
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application

from p2pshare import __version__, codes, crypto
from p2pshare.config import MAX_EXPIRY_S, NodeConfig
from p2pshare.dicom.ingest import scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.node import service
from p2pshare.node.app import create_app
from p2pshare.node.keys import jobs_key, store_key

NAME = "Referring Hospital ED"
ADVERTISED = "10.1.2.3:8700"
SMALL = [
    SeriesSpec("HEAD", 2, 32, 32, 5.0, "head"),
    SeriesSpec("CHEST", 3, 32, 32, 5.0, "chest"),
]
UNAUTHORIZED = {"error": "unauthorized", "message": "this API needs the node's token"}
NOT_FOUND = {"error": "not-found"}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    generate_ct_study(root, seed=21, series=SMALL)
    return root


@pytest.fixture(scope="module")
def two_studies_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two")
    generate_ct_study(root / "a", seed=31, series=SMALL[:1], patient_id="A-1")
    generate_ct_study(root / "b", seed=32, series=SMALL[:1], patient_id="B-2")
    return root


@dataclass
class Response:
    status: int
    body: Any
    text: str


@dataclass
class Node:
    app: Application
    client: TestClient[Any, Any]
    config: NodeConfig
    token: str

    @property
    def fingerprint(self) -> str:
        return crypto.Identity.load_or_create(self.config.identity_path).fingerprint

    async def call(
        self,
        method: str,
        path: str,
        *,
        auth: str | None = "token",
        body: Any = None,
        data: str | None = None,
        params: dict[str, str] | None = None,
    ) -> Response:
        headers = {}
        if auth == "token":
            headers["Authorization"] = f"Bearer {self.token}"
        elif auth is not None:
            headers["Authorization"] = auth
        kwargs: dict[str, Any] = {"headers": headers, "params": params}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
            headers["Content-Type"] = "application/json"
        async with self.client.request(method, path, **kwargs) as resp:
            text = await resp.text()
            # Whatever happens, nobody who reaches the API sees the node's insides.
            assert "Traceback" not in text and 'File "' not in text, text
            parsed: Any = None
            if resp.content_type == "application/json":
                parsed = json.loads(text)
            return Response(resp.status, parsed, text)

    def offers(self) -> list[str]:
        return [o.id for o in self.app[store_key].list_offers()]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    # Consent has its own tests (test_consent_api.py); here the API itself is under test.
    config = NodeConfig(
        data_dir=tmp_path / "node", name=NAME, advertise=(ADVERTISED,), consent_policy="none"
    )
    app = create_app(config)
    client = TestClient(TestServer(app))
    await client.start_server()
    token = (config.data_dir / "api-token").read_text().strip()
    try:
        yield Node(app, client, config, token)
    finally:
        await client.close()


async def offer(node: Node, study_dir: Path, **extra: Any) -> dict[str, Any]:
    res = await node.call("POST", "/api/v1/offers", body={"path": str(study_dir), **extra})
    assert res.status == 201, res.text
    body: dict[str, Any] = res.body
    return body


# -- authentication ------------------------------------------------------------------------------

PROTECTED = {
    ("GET", "/api/v1/offers"),
    ("POST", "/api/v1/offers"),
    ("GET", "/api/v1/offers/{offer_id}"),
    ("DELETE", "/api/v1/offers/{offer_id}"),
    ("POST", "/api/v1/receive"),
    ("GET", "/api/v1/transfers/{job_id}"),
    ("GET", "/api/v1/jobs/{job_id}/events"),
    ("GET", "/api/v1/peers"),
    ("DELETE", "/api/v1/peers/{name}"),
}


def api_routes(app: Application) -> set[tuple[str, str]]:
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter") or ""
        if path.startswith("/api/") and route.method != "HEAD":
            found.add((route.method, path))
    return found


async def test_the_api_token_is_created_private_on_first_start(node: Node) -> None:
    path = node.config.data_dir / "api-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == node.token + "\n"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", node.token)


async def test_info_is_open_and_names_the_node(node: Node) -> None:
    for auth in (None, "Bearer wrong"):
        res = await node.call("GET", "/api/v1/info", auth=auth)
        assert res.status == 200
        assert res.body == {
            "name": NAME,
            "fingerprint": node.fingerprint,
            "version": __version__,
            "protocol": 1,
        }
    assert re.fullmatch(r"([A-Z2-7]{4}-){5}[A-Z2-7]{4}", node.fingerprint)


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        "Basic {token}",
        "bearer {token}",
        "{token}",
        "Bearer {token}x",
        "Bearer  {token}",
        "Bearer {short}",
    ],
)
async def test_every_api_route_but_info_needs_the_token(
    node: Node, study_dir: Path, auth: str | None
) -> None:
    routes = api_routes(node.app)
    assert routes >= PROTECTED
    assert ("GET", "/api/v1/info") in routes
    header = auth.format(token=node.token, short=node.token[:-1]) if auth is not None else None
    bodies = {
        "/api/v1/offers": {"path": str(study_dir)},
        "/api/v1/receive": {"code": "1-glisten-ivory-sardine-utility", "out": "/tmp/x"},
    }
    # info and signing in are public by design (sign-in has its own tests in tests/web)
    public = {("GET", "/api/v1/info"), ("POST", "/api/v1/session")}
    for method, path in sorted(routes - public):
        url = re.sub(r"\{[^}]+\}", "x", path)
        res = await node.call(method, url, auth=header, body=bodies.get(path))
        assert (res.status, res.body) == (401, UNAUTHORIZED), (method, path)
    # Nothing was done on the way.
    assert node.offers() == []
    assert node.app[jobs_key].all() == []


async def test_the_right_token_is_accepted(node: Node) -> None:
    res = await node.call("GET", "/api/v1/peers")
    assert (res.status, res.body) == (200, [])


# -- offers -----------------------------------------------------------------------------------------


async def test_post_offer_returns_code_uri_expiry_and_study_summary(
    node: Node, study_dir: Path
) -> None:
    before = int(time.time())
    body = await offer(node, study_dir)
    after = int(time.time())
    assert set(body) == {
        "offer_id",
        "code",
        "uri",
        "expires",
        "addresses",
        "sender",
        "fingerprint",
        "study",
        "skipped",
        "duplicates",
        "consent",
    }
    offer_id = body["offer_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", offer_id)
    # The spoken code: the offer number, then four words of the list.
    m = re.fullmatch(r"1-([a-z]+)-([a-z]+)-([a-z]+)-([a-z]+)", body["code"])
    assert m is not None, body["code"]
    assert all(w in codes.wordlist() for w in m.groups())
    assert codes.parse_spoken(body["code"]).text == body["code"]
    assert before + 900 <= body["expires"] <= after + 900
    assert body["addresses"] == [ADVERTISED]
    assert (body["sender"], body["fingerprint"]) == (NAME, node.fingerprint)
    # the offered manifest names no patient: that travels only in the images, after consent
    expected = dataclasses.replace(
        scan(study_dir, chunk_size=node.config.chunk_size).study(None).manifest, patient={}
    )
    assert body["study"] == expected.summary()
    assert body["study"]["instances"] == 5
    assert (body["skipped"], body["duplicates"]) == ([], 0)

    # The QR link: the secret only in the fragment, never in what an HTTP client would send.
    uri: str = body["uri"]
    visible, _, fragment = uri.partition("#")
    assert visible.startswith(f"p2pshare://offer/{offer_id}?")
    assert parse_qs(urlsplit(visible).query) == {
        "v": ["1"],
        "n": [NAME],
        "fp": [node.fingerprint],
        "exp": [str(body["expires"])],
        "a": [ADVERTISED],
    }
    secret = base64.urlsafe_b64decode(fragment + "=" * (-len(fragment) % 4))
    assert len(secret) == codes.QR_SECRET_BYTES
    assert fragment not in visible
    parsed = codes.parse_qr_uri(uri)
    assert (parsed.offer_id, parsed.secret) == (offer_id, secret)
    assert not any(w in uri for w in m.groups())

    stored = node.app[store_key].get_offer(offer_id)
    assert stored is not None
    assert (stored.state, stored.number, stored.spoken_code, stored.qr_secret) == (
        "active",
        1,
        body["code"],
        secret,
    )
    assert stored.manifest == expected


async def test_offers_are_audited_without_their_codes(node: Node, study_dir: Path) -> None:
    body = await offer(node, study_dir)
    audit = node.app[store_key].audit
    created = audit.records("offer-created")
    assert [r["detail"] for r in created] == [
        {
            "offer": body["offer_id"],
            "study": body["study"]["study_instance_uid"],
            "instances": 5,
            "expires": body["expires"],
            "consent_policy": "none",
            "user": "api-token",
        }
    ]
    dump = json.dumps(audit.records())
    secret_b64 = body["uri"].partition("#")[2]
    assert body["code"] not in dump and secret_b64 not in dump
    for word in body["code"].split("-")[1:]:
        assert word not in dump
    assert audit.verify().ok


async def test_each_live_offer_gets_its_own_number(node: Node, study_dir: Path) -> None:
    first = await offer(node, study_dir)
    second = await offer(node, study_dir)
    assert first["code"].split("-")[0] == "1"
    assert second["code"].split("-")[0] == "2"
    assert first["offer_id"] != second["offer_id"]


async def test_skipped_files_are_reported_with_the_offer(
    node: Node, study_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "with-notes"
    shutil.copytree(study_dir, folder)
    (folder / "notes.txt").write_text("call the trauma team\n")
    body = await offer(node, folder)
    assert body["skipped"] == [{"name": "notes.txt", "reason": "not a DICOM file"}]
    assert body["study"]["instances"] == 5


async def test_a_folder_with_two_studies_asks_which_one(node: Node, two_studies_dir: Path) -> None:
    res = await node.call("POST", "/api/v1/offers", body={"path": str(two_studies_dir)})
    report = scan(two_studies_dir, chunk_size=node.config.chunk_size)
    uids = [s.manifest.study_instance_uid for s in report.studies]
    assert res.status == 409
    assert set(res.body) == {"error", "message", "studies"}
    assert res.body["error"] == "study-choice"
    assert res.body["studies"] == [s.summary() for s in report.studies]
    assert [s["uid"] for s in res.body["studies"]] == uids and len(set(uids)) == 2
    assert res.body["message"].startswith(
        f"{two_studies_dir} holds 2 studies; choose one by its Study Instance UID: "
    )
    assert all(uid in res.body["message"] for uid in uids)
    assert node.offers() == []

    chosen = await offer(node, two_studies_dir, study_uid=uids[1])
    assert chosen["study"]["study_instance_uid"] == uids[1]


async def test_an_unknown_study_uid_is_refused(node: Node, two_studies_dir: Path) -> None:
    report = scan(two_studies_dir, chunk_size=node.config.chunk_size)
    known = ", ".join(s.manifest.study_instance_uid for s in report.studies)
    res = await node.call(
        "POST", "/api/v1/offers", body={"path": str(two_studies_dir), "study_uid": "1.2.3"}
    )
    assert (res.status, res.body) == (
        400,
        {
            "error": "input",
            "message": f"study 1.2.3 is not in {two_studies_dir}; it holds: {known}",
        },
    )


async def test_a_missing_path_is_refused_readably(node: Node, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-study"
    res = await node.call("POST", "/api/v1/offers", body={"path": str(missing)})
    assert (res.status, res.body) == (
        400,
        {
            "error": "input",
            "message": f"{missing} does not exist: check the path of the study folder, zip "
            "archive or file",
        },
    )
    assert node.offers() == []


async def test_a_folder_without_dicom_is_refused_readably(node: Node, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "empty.dat").write_bytes(b"")
    (junk / "notes.txt").write_text("not an image\n")
    res = await node.call("POST", "/api/v1/offers", body={"path": str(junk)})
    assert (res.status, res.body) == (
        400,
        {
            "error": "input",
            "message": f"no DICOM images found in {junk}: 2 files skipped (1 empty file, 1 not "
            "a DICOM file). Choose the folder, zip archive or file that holds the study",
        },
    )
    assert node.offers() == []


@pytest.mark.parametrize("body", [{}, {"path": ""}, {"path": 5}, {"path": None}])
async def test_an_offer_without_a_path_is_refused(node: Node, body: dict[str, Any]) -> None:
    res = await node.call("POST", "/api/v1/offers", body=body)
    assert (res.status, res.body) == (
        400,
        {"error": "config", "message": "give the study's folder or .zip as 'path'"},
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{", "the request body must be JSON"),
        ("", "the request body must be JSON"),
        ("[1, 2]", "the request body must be a JSON object"),
        ('"path"', "the request body must be a JSON object"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_refused(
    node: Node, data: str, message: str
) -> None:
    for path in ("/api/v1/offers", "/api/v1/receive"):
        res = await node.call("POST", path, data=data)
        assert (res.status, res.body) == (400, {"error": "config", "message": message}), path


@pytest.mark.parametrize("expires_s", [0, -1, MAX_EXPIRY_S + 1, 10**12])
async def test_an_expiry_out_of_range_is_refused(
    node: Node, study_dir: Path, expires_s: int
) -> None:
    res = await node.call(
        "POST", "/api/v1/offers", body={"path": str(study_dir), "expires_s": expires_s}
    )
    assert (res.status, res.body) == (
        400,
        {"error": "config", "message": f"an offer must expire within 1 to {MAX_EXPIRY_S} seconds"},
    )
    assert node.offers() == []


@pytest.mark.parametrize("expires_s", [1, 60, MAX_EXPIRY_S])
async def test_an_expiry_in_range_is_used(node: Node, study_dir: Path, expires_s: int) -> None:
    before = int(time.time())
    body = await offer(node, study_dir, expires_s=expires_s)
    assert before + expires_s <= body["expires"] <= int(time.time()) + expires_s


async def test_get_offer_shows_it_active(node: Node, study_dir: Path) -> None:
    body = await offer(node, study_dir)
    view = {
        "offer_id": body["offer_id"],
        "state": "active",
        "expires": body["expires"],
        "study": body["study"],
        "peer": None,
        "peer_fingerprint": None,
        "failed_attempts": 0,
        "receipt": None,
        "error": None,
        "consent": {
            k: v for k, v in body["consent"].items() if k not in ("link", "qr")
        },
    }
    res = await node.call("GET", f"/api/v1/offers/{body['offer_id']}")
    assert (res.status, res.body) == (200, view)
    res = await node.call("GET", "/api/v1/offers")
    assert (res.status, res.body) == (200, [view])


async def test_get_an_unknown_offer_is_404(node: Node) -> None:
    res = await node.call("GET", "/api/v1/offers/" + "0" * 32)
    assert (res.status, res.body) == (404, NOT_FOUND)


async def test_delete_cancels_an_offer_once(node: Node, study_dir: Path) -> None:
    body = await offer(node, study_dir)
    offer_id = body["offer_id"]
    res = await node.call("DELETE", f"/api/v1/offers/{offer_id}")
    assert (res.status, res.body) == (200, {"cancelled": True})

    res = await node.call("GET", f"/api/v1/offers/{offer_id}")
    assert res.body["state"] == "cancelled"
    res = await node.call("GET", f"/api/v1/jobs/{offer_id}/events", params={"wait": "0"})
    assert res.status == 200 and res.body["done"] is True
    last = res.body["events"][-1]
    assert {k: v for k, v in last.items() if k != "at"} == {
        "seq": 2,
        "event": "error",
        "code": "cancelled",
        "message": "the offer was cancelled on this node",
    }
    assert [r["detail"] for r in node.app[store_key].audit.records("offer-cancelled")] == [
        {"offer": offer_id, "user": "api-token"}
    ]

    again = await node.call("DELETE", f"/api/v1/offers/{offer_id}")
    assert (again.status, again.body) == (
        409,
        {"error": "not-cancellable", "message": "no such live offer"},
    )
    # A cancelled offer frees its number.
    assert (await offer(node, study_dir))["code"].startswith("1-")


async def test_delete_an_unknown_offer_is_409(node: Node) -> None:
    res = await node.call("DELETE", "/api/v1/offers/" + "0" * 32)
    assert (res.status, res.body) == (
        409,
        {"error": "not-cancellable", "message": "no such live offer"},
    )


# -- job events ----------------------------------------------------------------------------------


async def test_job_events_long_poll(node: Node, study_dir: Path) -> None:
    body = await offer(node, study_dir)
    url = f"/api/v1/jobs/{body['offer_id']}/events"
    res = await node.call("GET", url, params={"after": "0", "wait": "5"})
    assert res.status == 200
    assert res.body["done"] is False
    [waiting] = res.body["events"]
    assert {k: v for k, v in waiting.items() if k != "at"} == {
        "seq": 1,
        "event": "waiting",
        "expires": body["expires"],
    }
    assert isinstance(waiting["at"], float)

    loop = asyncio.get_running_loop()
    start = loop.time()
    res = await node.call("GET", url, params={"after": "1", "wait": "0.2"})
    assert (res.status, res.body) == (200, {"events": [], "done": False})
    assert 0.15 <= loop.time() - start < 3


async def test_a_waiting_poll_is_answered_as_soon_as_something_happens(
    node: Node, study_dir: Path
) -> None:
    body = await offer(node, study_dir)
    url = f"/api/v1/jobs/{body['offer_id']}/events"
    poll = asyncio.create_task(node.call("GET", url, params={"after": "1", "wait": "20"}))
    await asyncio.sleep(0.05)
    assert not poll.done()
    await node.call("DELETE", f"/api/v1/offers/{body['offer_id']}")
    res = await asyncio.wait_for(poll, 5)
    assert res.status == 200 and res.body["done"] is True
    assert [(e["seq"], e["event"], e["code"]) for e in res.body["events"]] == [
        (2, "error", "cancelled")
    ]


async def test_a_negative_wait_does_not_wait(node: Node, study_dir: Path) -> None:
    body = await offer(node, study_dir)
    url = f"/api/v1/jobs/{body['offer_id']}/events"
    res = await asyncio.wait_for(node.call("GET", url, params={"after": "1", "wait": "-9"}), 2)
    assert (res.status, res.body) == (200, {"events": [], "done": False})


@pytest.mark.parametrize("params", [{"after": "x"}, {"wait": "soon"}, {"after": "1.5"}])
async def test_job_event_parameters_must_be_numbers(
    node: Node, study_dir: Path, params: dict[str, str]
) -> None:
    body = await offer(node, study_dir)
    res = await node.call("GET", f"/api/v1/jobs/{body['offer_id']}/events", params=params)
    assert (res.status, res.body) == (
        400,
        {"error": "config", "message": "'after' and 'wait' must be numbers"},
    )


async def test_events_of_an_unknown_job_are_404(node: Node) -> None:
    res = await node.call("GET", "/api/v1/jobs/nope/events", params={"wait": "0"})
    assert (res.status, res.body) == (404, NOT_FOUND)


# -- receiving -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (
            "7-glisten-ivory",
            "the code has 2 words after the number; it should have 4. Ask the sender to read it "
            "again",
        ),
        (
            "glisten-ivory-sardine-utility",
            "a spoken code starts with the offer number, e.g. 7-glisten-ivory-sardine-utility",
        ),
        (
            "7-glisten-ivory-sardine-qqqq",
            "word 4 ('qqqq') is not in the code word list; ask the sender to spell it",
        ),
        (
            "p2pshare://offer/zzz#abc",
            "the offer link is damaged (bad offer id); scan it again",
        ),
    ],
)
async def test_a_garbled_code_is_refused_with_what_is_wrong(
    node: Node, tmp_path: Path, code: str, message: str
) -> None:
    res = await node.call(
        "POST",
        "/api/v1/receive",
        body={"code": code, "out": str(tmp_path / "in"), "from": ["127.0.0.1:9"]},
    )
    assert (res.status, res.body) == (400, {"error": "code-format", "message": message})
    assert node.app[jobs_key].all() == []


async def test_a_spoken_code_without_from_explains_from(node: Node, tmp_path: Path) -> None:
    extras: list[dict[str, Any]] = [{}, {"from": []}, {"from": "127.0.0.1:9"}, {"from": [5]}]
    for extra in extras:
        res = await node.call(
            "POST",
            "/api/v1/receive",
            body={"code": "7-glisten-ivory-sardine-utility", "out": str(tmp_path), **extra},
        )
        assert (res.status, res.body) == (
            400,
            {
                "error": "config",
                "message": "a spoken code does not say where the sending node is: add --from "
                "HOST:PORT (the sender's node address, or the name of an institution you "
                "received from before)",
            },
        ), extra
    assert node.app[jobs_key].all() == []


async def test_from_an_unknown_institution_is_refused(node: Node, tmp_path: Path) -> None:
    res = await node.call(
        "POST",
        "/api/v1/receive",
        body={
            "code": "7-glisten-ivory-sardine-utility",
            "out": str(tmp_path),
            "from": ["Nowhere General"],
        },
    )
    assert (res.status, res.body) == (
        400,
        {
            "error": "config",
            "message": "'Nowhere General' is neither host:port nor a known institution; give "
            "the sending node's address as HOST:PORT",
        },
    )


@pytest.mark.parametrize(
    "body",
    [
        {"out": "/tmp/in"},
        {"code": "7-glisten-ivory-sardine-utility"},
        {"code": "7-glisten-ivory-sardine-utility", "out": ""},
        {"code": 7, "out": "/tmp/in"},
    ],
)
async def test_receive_needs_code_and_out(node: Node, body: dict[str, Any]) -> None:
    res = await node.call("POST", "/api/v1/receive", body=body)
    assert (res.status, res.body) == (
        400,
        {
            "error": "config",
            "message": "give the code (or QR link) as 'code' and the destination as 'out'",
        },
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def events_until_done(node: Node, job: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(50):
        after = events[-1]["seq"] if events else 0
        res = await node.call(
            "GET", f"/api/v1/jobs/{job}/events", params={"after": str(after), "wait": "5"}
        )
        assert res.status == 200
        events += res.body["events"]
        if res.body["done"]:
            return events
    raise AssertionError(f"job {job} never finished: {events}")


async def test_receive_from_a_pinned_institution_that_is_down(node: Node, tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"
    node.app[store_key].check_pin("Trauma Centre", bytes(32), int(time.time()), address)
    out = tmp_path / "incoming"
    res = await node.call(
        "POST",
        "/api/v1/receive",
        body={
            "code": "3-glisten-ivory-sardine-utility",
            "out": str(out),
            "from": ["Trauma Centre"],
        },
    )
    assert res.status == 202 and set(res.body) == {"job"}
    job = res.body["job"]
    assert re.fullmatch(r"[0-9a-f]{32}", job)

    events = await events_until_done(node, job)
    message = (
        f"could not reach the sending node at {address}: check the address and that its node "
        "is running"
    )
    assert [{k: v for k, v in e.items() if k != "at"} for e in events] == [
        {"seq": 1, "event": "connecting", "addresses": [address]},
        {"seq": 2, "event": "error", "code": "connection-lost", "message": message},
    ]
    res = await node.call("GET", f"/api/v1/transfers/{job}")
    assert res.status == 200
    assert (res.body["state"], res.body["error"], res.body["out_dir"]) == (
        "failed",
        message,
        str(out.resolve()),
    )
    assert isinstance(res.body["finished"], int) and res.body["receipt"] is None
    assert [r["outcome"] for r in node.app[store_key].audit.records("transfer-failed")] == [
        "connection-lost"
    ]
    assert not out.exists()


async def test_an_unknown_transfer_is_404(node: Node) -> None:
    res = await node.call("GET", "/api/v1/transfers/nope")
    assert (res.status, res.body) == (404, NOT_FOUND)


# -- peers ---------------------------------------------------------------------------------------


async def test_peers_are_listed_and_forgotten(node: Node) -> None:
    name = "St. Mary's Hospital"
    key = bytes(range(32))
    node.app[store_key].check_pin(name, key, 1_700_000_000, "10.0.0.7:8700")
    res = await node.call("GET", "/api/v1/peers")
    assert (res.status, res.body) == (
        200,
        [
            {
                "name": name,
                "fingerprint": crypto.fingerprint(key),
                "first_seen": 1_700_000_000,
                "last_seen": 1_700_000_000,
                "last_address": "10.0.0.7:8700",
            }
        ],
    )
    url = "/api/v1/peers/" + quote(name)
    res = await node.call("DELETE", url)
    assert (res.status, res.body) == (200, {"forgotten": name})
    assert (await node.call("GET", "/api/v1/peers")).body == []
    assert [r["detail"] for r in node.app[store_key].audit.records("peer-forgotten")] == [
        {"name": name, "user": "api-token"}
    ]
    res = await node.call("DELETE", url)
    assert (res.status, res.body) == (404, NOT_FOUND)


# -- no insides ------------------------------------------------------------------------------------


async def test_an_unexpected_error_is_a_500_without_details(
    node: Node, study_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> dict[str, Any]:
        raise RuntimeError("secret detail: /srv/pacs/export/DOE^JOHN")

    monkeypatch.setattr(service, "create_offer", broken)
    res = await node.call("POST", "/api/v1/offers", body={"path": str(study_dir)})
    assert (res.status, res.body) == (
        500,
        {"error": "internal", "message": "internal error; see the node's log"},
    )
    assert "secret detail" not in res.text and "DOE^JOHN" not in res.text


async def test_client_explains_a_server_that_is_not_a_node() -> None:
    """`--node` pointing at some other web server: a sentence, not a JSON traceback."""
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from p2pshare.client import NodeClient
    from p2pshare.errors import ConfigError

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>")

    app = web.Application()
    app.router.add_get("/api/v1/info", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            client = NodeClient(str(server.make_url("/")), "token", http)
            with pytest.raises(ConfigError, match="not a p2pshare node"):
                await client.info()
    finally:
        await server.close()
