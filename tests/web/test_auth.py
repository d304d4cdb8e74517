"""Sign-in, lock-out, CSRF, roles and 401s against a real node (subprocess) over HTTP.

Every API route under /api/ is enumerated from the app's router, so a route added later is
covered without touching this file; only the documented public ones are exempt.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from p2pshare.config import NodeConfig
from p2pshare.node.app import create_app
from tests.web.conftest import PASSWORD, Node

pytestmark = pytest.mark.e2e

#: Reachable without a session or token (documented in docs/web.md).
PUBLIC = {("GET", "/api/v1/info"), ("POST", "/api/v1/session")}


def api_routes(tmp_path: Path) -> set[tuple[str, str]]:
    app = create_app(NodeConfig(data_dir=tmp_path / "x", name="Route Census"))
    found: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = str(info.get("path") or info.get("formatter") or "")
        if not path.startswith("/api/"):
            continue
        for route in resource:
            if route.method not in ("HEAD", "*"):
                found.add((route.method, path))
    return found


def audit(node: Node, action: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(node.data_dir / "node.sqlite3")
    try:
        rows = db.execute(
            "SELECT outcome, detail FROM audit WHERE action = ? ORDER BY seq", (action,)
        ).fetchall()
    finally:
        db.close()
    return [{"outcome": o, **json.loads(d)} for o, d in rows]


def test_every_staff_api_needs_a_session_or_the_token(
    web_nodes: tuple[Node, Node], tmp_path: Path
) -> None:
    sender, _ = web_nodes
    routes = api_routes(tmp_path)
    assert ("POST", "/api/v1/web/receive") in routes and ("POST", "/api/v1/uploads") in routes
    assert len(routes - PUBLIC) >= 15
    for method, path in sorted(routes - PUBLIC):
        url = re.sub(r"\{[^}]+\}", "x", path)
        for headers in ({}, {"Cookie": "p2pshare_session=forged"}):
            status, body, _ = sender.request(method, url, body={}, headers=headers)
            assert status == 401, (method, path, headers, status, body)
            assert set(body) == {"error", "message"}, (method, path, body)
    # Staff pages send the visitor to sign in; the consent page and sign-in stay reachable.
    for page in ("/", "/send", "/receive", "/transfers", "/viewer?job=x"):
        status, _, res = sender.request("GET", page)
        assert status == 302 and res.getheader("Location", "").startswith("/login?next="), page
    assert sender.request("GET", "/login")[0] == 200
    assert sender.request("GET", "/api/v1/info")[0] == 200


def test_sign_in_sets_a_strict_http_only_cookie_and_is_audited(
    web_nodes: tuple[Node, Node],
) -> None:
    sender, _ = web_nodes
    status, body, res = sender.request(
        "POST", "/api/v1/session", {"name": "tech", "password": PASSWORD}
    )
    assert status == 200 and body["user"] == "tech" and body["role"] == "sender"
    cookie = res.getheader("Set-Cookie") or ""
    assert cookie.startswith("p2pshare_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    session = cookie.split(";", 1)[0]
    # The database keeps only a hash of the session id.
    raw = session.split("=", 1)[1]
    db = sqlite3.connect(sender.data_dir / "node.sqlite3")
    try:
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    assert raw not in dump and PASSWORD not in dump
    status, me, _ = sender.request("GET", "/api/v1/session", headers={"Cookie": session})
    assert (status, me["user"], me["csrf"]) == (200, "tech", body["csrf"])
    assert any(r["user"] == "tech" and r["outcome"] == "ok" for r in audit(sender, "staff-sign-in"))
    # Signing out ends the session on the node, not just in the browser.
    status, _, _ = sender.request(
        "DELETE", "/api/v1/session", headers={"Cookie": session, "X-CSRF-Token": body["csrf"]}
    )
    assert status == 200
    assert sender.request("GET", "/api/v1/session", headers={"Cookie": session})[0] == 401
    assert any(r["user"] == "tech" for r in audit(sender, "staff-sign-out"))


def test_wrong_passwords_lock_the_account(web_nodes: tuple[Node, Node]) -> None:
    sender, _ = web_nodes
    sender.add_user("victim", "sender")
    outcomes = []
    for _ in range(5):
        status, body, _ = sender.request(
            "POST", "/api/v1/session", {"name": "victim", "password": "wrong password!"}
        )
        outcomes.append((status, body["error"]))
    assert outcomes == [(401, "sign-in-failed")] * 4 + [(429, "locked")]
    # Locked: even the right password is refused, and says so.
    status, body, res = sender.request(
        "POST", "/api/v1/session", {"name": "victim", "password": PASSWORD}
    )
    assert (status, body["error"]) == (429, "locked") and "locked" in body["message"]
    assert res.getheader("Set-Cookie") is None
    records = [r for r in audit(sender, "staff-sign-in") if r["user"] == "victim"]
    assert [r["outcome"] for r in records] == ["failed"] * 4 + ["locked", "locked"]
    assert all(r["address"] == "127.0.0.1" for r in records)
    # An admin lifts it by setting a new password.
    res2 = sender.cli("user", "passwd", "victim", "--password-stdin", stdin=PASSWORD + "!")
    assert res2.returncode == 0, res2.stderr
    assert sender.request(
        "POST", "/api/v1/session", {"name": "victim", "password": PASSWORD + "!"}
    )[0] == 200


def test_unknown_user_and_wrong_password_look_the_same(web_nodes: tuple[Node, Node]) -> None:
    sender, _ = web_nodes
    a = sender.request("POST", "/api/v1/session", {"name": "nobody", "password": "x" * 12})
    b = sender.request("POST", "/api/v1/session", {"name": "guard", "password": "x" * 12})
    refused = {"error": "sign-in-failed", "message": "wrong user name or password"}
    assert (a[0], a[1]) == (b[0], b[1]) == (401, refused)


def test_unsafe_requests_need_the_sessions_csrf_token(web_nodes: tuple[Node, Node]) -> None:
    _, receiver = web_nodes
    cookie, csrf = receiver.sign_in("rad")
    other_cookie, other_csrf = receiver.sign_in("rad")
    body = {"code": "1-glisten-ivory-sardine-utility", "from": "127.0.0.1:9"}
    for headers in (
        {"Cookie": cookie},
        {"Cookie": cookie, "X-CSRF-Token": ""},
        {"Cookie": cookie, "X-CSRF-Token": csrf[:-1]},
        {"Cookie": cookie, "X-CSRF-Token": other_csrf},  # another session's token
    ):
        status, res, _ = receiver.request("POST", "/api/v1/web/receive", body, headers)
        assert (status, res["error"]) == (403, "csrf"), headers
    assert receiver.request("GET", "/api/v1/web/transfers", headers={"Cookie": cookie})[0] == 200
    # With its own token the request gets through to the handler (which starts a receive).
    status, res, _ = receiver.request(
        "POST", "/api/v1/web/receive", body, {"Cookie": cookie, "X-CSRF-Token": csrf}
    )
    assert status == 202 and "job" in res
    assert receiver.request(
        "DELETE", "/api/v1/session", headers={"Cookie": other_cookie, "X-CSRF-Token": other_csrf}
    )[0] == 200


def test_roles_limit_what_staff_may_do(web_nodes: tuple[Node, Node]) -> None:
    sender, receiver = web_nodes
    cookie, csrf = receiver.sign_in("rad")
    h = {"Cookie": cookie, "X-CSRF-Token": csrf}
    status, res, _ = receiver.request("POST", "/api/v1/web/offers", {"study_id": "x"}, h)
    assert (status, res["error"]) == (403, "forbidden")
    status, res, _ = receiver.request("DELETE", "/api/v1/peers/someone", None, h)
    assert (status, res["error"]) == (403, "forbidden")  # admin only
    cookie, csrf = sender.sign_in("tech")
    h = {"Cookie": cookie, "X-CSRF-Token": csrf}
    status, res, _ = sender.request("POST", "/api/v1/web/receive", {"code": "1-a-b-c-d"}, h)
    assert (status, res["error"]) == (403, "forbidden")
    status, res, _ = sender.request("POST", "/api/v1/qr/decode", None, h, raw=b"x")
    assert (status, res["error"]) == (403, "forbidden")
    # An admin may do both.
    cookie, csrf = sender.sign_in("guard")
    h = {"Cookie": cookie, "X-CSRF-Token": csrf}
    status, res, _ = sender.request("POST", "/api/v1/qr/decode", None, h, raw=b"not a picture")
    assert (status, res["error"]) == (400, "input")
    # The CLI's bearer token keeps working for everything.
    status, _, _ = sender.request(
        "GET", "/api/v1/web/transfers", headers={"Authorization": "Bearer " + sender.token}
    )
    assert status == 200
