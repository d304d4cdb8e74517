"""The audit over the node's API: records for one offer or transfer job, and the chain check.

``GET /api/v1/audit?offer=ID`` returns the records that name an offer (or a receiving job, or
the protocol transfer either ran), oldest first; without ``offer`` the latest ``limit`` records.
Reading the audit through the API is itself audited (``audit-log-used``).
``GET /api/v1/audit/verify`` returns what ``p2pshare audit verify`` prints, as JSON. Both sit
under ``/api/`` and so need the node's token like every other API route.
"""

from __future__ import annotations

from aiohttp import web

from p2pshare.errors import ConfigError
from p2pshare.node.keys import engine_key, store_key
from p2pshare.node.web_routes import staff_key

DEFAULT_LIMIT = 1000


def _refs(request: web.Request, ref: str) -> tuple[str, ...]:
    """The ids an offer or job is recorded under: itself and the transfer it ran."""
    db = request.app[store_key].db
    refs = [ref]
    for table in ("offers", "transfers"):
        row = db.execute(f"SELECT transfer_id FROM {table} WHERE id = ?", (ref,)).fetchone()
        if row is not None and row[0]:
            refs.append(str(row[0]))
    return tuple(refs)


async def list_audit(request: web.Request) -> web.Response:
    log = request.app[store_key].audit
    ref = request.query.get("offer", "").strip()
    try:
        limit = int(request.query.get("limit", str(DEFAULT_LIMIT)))
    except ValueError:
        raise ConfigError("'limit' must be a whole number") from None
    if not 1 <= limit <= 100_000:
        raise ConfigError("'limit' must be from 1 to 100000")
    if ref:
        if len(ref) > 128 or not ref.isprintable():
            raise ConfigError("'offer' must be an offer or transfer job id")
        records = log.records(refs=_refs(request, ref))
    else:
        records = log.records()[-limit:]
    session = request.get(staff_key)  # a signed-in member of staff, or None for the API token
    request.app[engine_key].audit(
        "audit-log-used",
        user=session.user.name if session is not None else None,
        query=ref or "latest",
        records=len(records),
    )
    return web.json_response({"records": records})


async def verify_audit(request: web.Request) -> web.Response:
    report = request.app[store_key].audit.verify()
    return web.json_response(report.as_dict())


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v1/audit", list_audit)
    app.router.add_get("/api/v1/audit/verify", verify_audit)
