"""What every route module needs from a request: its JSON body, and who is asking.

A request is made either by the node's operator (the bearer token: the command line) or by a
member of staff signed in to the web app; the auth gate in ``web_routes`` puts the staff session
under :data:`staff_key`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from p2pshare.errors import ConfigError
from p2pshare.users import Session

#: where the auth gate keeps a signed-in staff session (absent for the operator's token)
staff_key = web.RequestKey("p2pshare.staff", Session)
#: who the operator is, in the audit
OPERATOR = "api-token"


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ConfigError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    return body


def actor(request: web.Request) -> str:
    """Who asked, for the audit: the staff account's name, or the operator's token."""
    session = request.get(staff_key)
    return str(session.user.name) if session is not None else OPERATOR


def require_operator(request: web.Request) -> None:
    """Let only the node's operator (the bearer token: the CLI) make this call, never a staff
    browser session: for API calls that name a path on the node's own disk.

    Raises:
        web.HTTPForbidden: the request is authenticated by a staff session cookie.
    """
    if request.get(staff_key) is not None:
        raise web.HTTPForbidden(
            text=json.dumps(
                {
                    "error": "operator-only",
                    "message": "this call names a path on the node's own disk, so only the "
                    "node's operator may make it (the p2pshare command line, with the node's "
                    "token), not a browser session; in the web app, use the study library "
                    "(upload on the send page) and the receive page instead",
                }
            ),
            content_type="application/json",
        )


async def listen(app: web.Application, host: str, port: int, busy_hint: str) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; a port that cannot be had is a ConfigError that says
    ``busy_hint`` (what to do), not a traceback."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); {busy_hint}") from exc
    return runner
