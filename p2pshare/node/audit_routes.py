"""The audit over the node's API: records for one offer or transfer job, and the chain check.

``GET /api/v1/audit?offer=ID`` returns the records that name an offer (or a receiving job, or
the protocol transfer either ran), oldest first; without ``offer`` the latest ``limit`` records.
Reading the audit through the API is itself audited (``audit-log-used``).
``GET /api/v1/audit/verify`` returns what ``p2pshare audit verify`` prints, as JSON. The chain
check and the unscoped listing need the node's token or a signed-in admin (other staff roles get
403); the trail of one offer or job stays open to signed-in staff, whose transfers page shows it.

Both read through their own read-only connection in a worker thread: walking a long chain (one
signature check per record) must not stall the event loop, and the node's own connection is
left to the loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pshare.audit import AuditLog, ChainReport, open_readonly
from p2pshare.errors import ConfigError
from p2pshare.node.httputil import staff_key
from p2pshare.node.keys import config_key, engine_key, store_key
from p2pshare.users import Role

DEFAULT_LIMIT = 1000


def _require_admin(request: web.Request) -> None:
    session = request.get(staff_key)  # a signed-in member of staff, or None for the API token
    if session is not None and not session.user.may(Role.ADMIN):
        raise web.HTTPForbidden(
            text=web.json_response(
                {
                    "error": "forbidden",
                    "message": f"your account ({session.user.role.value}) may not read the "
                    "whole audit log or check it; ask an admin (a transfer's own trail is on "
                    "the transfers page)",
                }
            ).text,
            content_type="application/json",
        )


def _db_path(request: web.Request) -> Path:
    """The file of the node's database (as its own connection opened it)."""
    row = request.app[store_key].db.execute("PRAGMA database_list").fetchone()
    return Path(row[2])


def _refs(db: sqlite3.Connection, ref: str) -> tuple[str, ...]:
    """The ids an offer or job is recorded under: itself and the transfer it ran."""
    refs = [ref]
    for table in ("offers", "transfers"):
        row = db.execute(f"SELECT transfer_id FROM {table} WHERE id = ?", (ref,)).fetchone()
        if row is not None and row[0]:
            refs.append(str(row[0]))
    return tuple(refs)


def _read(path: Path, identity: Path, ref: str, limit: int) -> list[dict[str, Any]]:
    db = open_readonly(path)
    try:
        log = AuditLog(db, identity, create=False)
        if ref:
            return log.records(refs=_refs(db, ref), limit=limit)
        return log.records(limit=limit)
    finally:
        db.close()


def _verify(path: Path, identity: Path) -> ChainReport:
    db = open_readonly(path)
    try:
        return AuditLog(db, identity, create=False).verify()
    finally:
        db.close()


async def list_audit(request: web.Request) -> web.Response:
    ref = request.query.get("offer", "").strip()
    if not ref:
        _require_admin(request)
    try:
        limit = int(request.query.get("limit", str(DEFAULT_LIMIT)))
    except ValueError:
        raise ConfigError("'limit' must be a whole number") from None
    if not 1 <= limit <= 100_000:
        raise ConfigError("'limit' must be from 1 to 100000")
    if ref and (len(ref) > 128 or not ref.isprintable()):
        raise ConfigError("'offer' must be an offer or transfer job id")
    identity = request.app[config_key].identity_path
    records = await asyncio.to_thread(_read, _db_path(request), identity, ref, limit)
    session = request.get(staff_key)
    request.app[engine_key].audit(
        "audit-log-used",
        user=session.user.name if session is not None else None,
        query=ref or "latest",
        records=len(records),
    )
    return web.json_response({"records": records})


async def verify_audit(request: web.Request) -> web.Response:
    _require_admin(request)
    identity = request.app[config_key].identity_path
    report = await asyncio.to_thread(_verify, _db_path(request), identity)
    return web.json_response(report.as_dict())


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v1/audit", list_audit)
    app.router.add_get("/api/v1/audit/verify", verify_audit)
