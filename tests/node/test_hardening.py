"""Limits of the node's HTTP side, through aiohttp's test client on the real app.

Operator-only calls refuse browser sessions, the audit is for admins and read off the event
loop, sign-in floods are refused before any password is hashed, and uploads are bounded in
number and by the free disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application

from p2pshare.audit import AuditLog
from p2pshare.config import NodeConfig
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.node import web_routes
from p2pshare.node.app import create_app
from p2pshare.node.keys import store_key
from p2pshare.users import Role, Users

PASSWORD = "correct horse battery staple"


@dataclass
class Node:
    app: Application
    client: TestClient[Any, Any]
    config: NodeConfig
    token: str

    async def call(
        self,
        method: str,
        path: str,
        *,
        session: tuple[str, str] | None = None,
        body: Any = None,
        data: Any = None,
    ) -> tuple[int, Any, Any]:
        headers: dict[str, str] = {}
        if session is None:
            headers["Authorization"] = f"Bearer {self.token}"
        else:
            headers["Cookie"] = f"{web_routes.SESSION_COOKIE}={session[0]}"
            headers[web_routes.CSRF_HEADER] = session[1]
        async with self.client.request(
            method, path, headers=headers, json=body, data=data
        ) as resp:
            text = await resp.text()
            assert "Traceback" not in text
            parsed = await resp.json() if resp.content_type == "application/json" else text
            return resp.status, parsed, resp.headers

    async def sign_in(self, name: str, password: str = PASSWORD) -> tuple[int, Any, Any]:
        async with self.client.post(
            "/api/v1/session", json={"name": name, "password": password}
        ) as resp:
            return resp.status, await resp.json(), resp

    async def session(self, name: str) -> tuple[str, str]:
        status, body, resp = await self.sign_in(name)
        assert status == 200, body
        return resp.cookies[web_routes.SESSION_COOKIE].value, body["csrf"]


def make_node(tmp_path: Path, **config: Any) -> NodeConfig:
    return NodeConfig(
        data_dir=tmp_path / "node", name="Referring Hospital ED", discovery=False, **config
    )


@pytest.fixture
def node_config(tmp_path: Path) -> NodeConfig:
    return make_node(tmp_path)


@pytest.fixture
async def node(node_config: NodeConfig) -> AsyncIterator[Node]:
    app = create_app(node_config)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    users = app[web_routes.users_key]
    for name, role in (("tech", Role.SENDER), ("rad", Role.RECEIVER), ("boss", Role.ADMIN)):
        users.add(name, role, PASSWORD)
    try:
        yield Node(app, client, node_config, node_config.token_path.read_text().strip())
    finally:
        await client.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study")
    generate_ct_study(root, seed=3, series=[SeriesSpec("HEAD", 2, 16, 16, 5.0, "head")])
    return root


# -- operator-only ------------------------------------------------------------------------------


async def test_import_from_a_node_path_is_for_the_operator_only(node: Node, study: Path) -> None:
    for who in ("tech", "boss"):  # not even an admin's browser
        status, body, _ = await node.call(
            "POST", "/api/v1/studies/import", session=await node.session(who),
            body={"path": str(study)},
        )
        assert status == 403, body
        assert body["error"] == "operator-only" and "node's operator" in body["message"]
    assert node.app[store_key].db.execute(
        "SELECT count(*) FROM audit WHERE action = 'study-imported'"
    ).fetchone()[0] == 0
    status, body, _ = await node.call("POST", "/api/v1/studies/import", body={"path": str(study)})
    assert status == 201 and body["imported"] == 2


# -- audit ----------------------------------------------------------------------------------------


async def test_audit_is_for_admins_and_the_token(node: Node) -> None:
    for who in ("tech", "rad"):
        session = await node.session(who)
        for path in ("/api/v1/audit", "/api/v1/audit/verify"):
            status, body, _ = await node.call("GET", path, session=session)
            assert status == 403 and "audit" in body["message"], (who, path)
        # one transfer's own trail stays on the transfers page of every member of staff
        status, body, _ = await node.call("GET", "/api/v1/audit?offer=x", session=session)
        assert status == 200 and body["records"] == []
    admin = await node.session("boss")
    for session in (admin, None):
        status, body, _ = await node.call("GET", "/api/v1/audit/verify", session=session)
        assert status == 200 and body["ok"] is True
        status, body, _ = await node.call("GET", "/api/v1/audit?limit=3", session=session)
        assert status == 200 and len(body["records"]) == 3


async def test_audit_reads_the_latest_records_on_its_own_connection_off_the_loop(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, sqlite3.Connection]] = []
    real_records: Callable[..., Any] = AuditLog.records
    real_verify: Callable[..., Any] = AuditLog.verify

    def records(self: AuditLog, *args: Any, **kw: Any) -> Any:
        seen.append((threading.get_ident(), self._db))
        return real_records(self, *args, **kw)

    def verify(self: AuditLog) -> Any:
        seen.append((threading.get_ident(), self._db))
        return real_verify(self)

    monkeypatch.setattr(AuditLog, "records", records)
    monkeypatch.setattr(AuditLog, "verify", verify)
    store = node.app[store_key]
    for i in range(5):
        store.audit.append(1000 + i, "test-event", n=i)
    last = store.db.execute("SELECT max(seq) FROM audit").fetchone()[0]
    status, body, _ = await node.call("GET", "/api/v1/audit?limit=2")
    assert status == 200
    assert [r["seq"] for r in body["records"]] == [last - 1, last]  # the latest, oldest first
    status, body, _ = await node.call("GET", "/api/v1/audit/verify")
    assert status == 200 and body["ok"] is True
    assert len(seen) == 2
    for ident, db in seen:
        assert ident != threading.get_ident() and db is not store.db


# -- sign-in floods ---------------------------------------------------------------------------------


async def test_failed_sign_ins_from_one_address_are_limited(node: Node) -> None:
    for i in range(web_routes.SIGN_IN_PER_MIN):
        status, body, _ = await node.sign_in(f"nobody{i}", "wrong password!")
        assert status == 401, body
    status, body, resp = await node.sign_in("tech")  # even the right password waits now
    assert status == 429 and body["error"] == "too-many-attempts"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60


async def test_a_locked_account_is_refused_before_any_hashing(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = node.app[web_routes.users_key]
    for _ in range(users.max_failures):
        await node.sign_in("rad", "wrong password!")
    hashed: list[str] = []
    real = Users.verify

    def verify(stored: str | None, password: str) -> bool:
        hashed.append(password)
        return real(stored, password)

    monkeypatch.setattr(users, "verify", verify)
    status, body, resp = await node.sign_in("rad")
    assert status == 429 and body["error"] == "locked" and int(resp.headers["Retry-After"]) > 60
    assert hashed == []


async def test_at_most_two_password_checks_run_at_once(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = node.app[web_routes.users_key]
    release = threading.Event()
    started = threading.Semaphore(0)
    real = Users.verify

    def verify(stored: str | None, password: str) -> bool:
        started.release()
        release.wait(30)
        return real(stored, password)

    monkeypatch.setattr(users, "verify", verify)
    first = [asyncio.create_task(node.sign_in(n)) for n in ("tech", "boss")]
    for _ in first:
        assert await asyncio.to_thread(started.acquire, True, 30)
    status, body, resp = await node.sign_in("rad")
    assert status == 429 and body["error"] == "busy" and resp.headers["Retry-After"] == "1"
    release.set()
    assert [(await t)[0] for t in first] == [200, 200]
    assert (await node.sign_in("rad"))[0] == 200  # a place is free again


# -- uploads ------------------------------------------------------------------------------------


def _form(payload: Any) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", payload, filename="study.zip", content_type="application/zip")
    return form


async def test_uploads_at_once_are_limited(node: Node) -> None:
    gate = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * 1024
        await gate.wait()
        yield b"y"

    session = await node.session("tech")
    running = [
        asyncio.create_task(
            node.call("POST", "/api/v1/uploads", session=session, data=_form(slow()))
        )
        for _ in range(web_routes.MAX_UPLOADS)
    ]
    slots = node.app[web_routes.uploads_key]
    for _ in range(500):
        if slots.busy == web_routes.MAX_UPLOADS:
            break
        await asyncio.sleep(0.01)
    status, body, headers = await node.call(
        "POST", "/api/v1/uploads", session=session, data=_form(b"zip")
    )
    assert status == 429 and body["error"] == "busy" and headers["Retry-After"]
    gate.set()
    for task in running:
        assert (await task)[0] == 400  # not a study, but each was let in
    assert slots.busy == 0


async def test_an_upload_that_would_fill_the_disk_is_refused(tmp_path: Path) -> None:
    config = make_node(tmp_path, min_free_bytes=1 << 62)
    app = create_app(config)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        node = Node(app, client, config, config.token_path.read_text().strip())
        status, body, _ = await node.call("POST", "/api/v1/uploads", data=_form(b"z" * 4096))
        assert status == 507 and body["error"] == "disk-full"
        assert "too full" in body["message"]
        assert list((config.data_dir / "uploads").iterdir()) == []
    finally:
        await client.close()
