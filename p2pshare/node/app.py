"""The node's aiohttp application: peer endpoint, staff API, static pages.

``create_app(config)`` builds everything; every resource is opened and closed by the
``cleanup_ctx`` below. The API needs the node's bearer token (``<data dir>/api-token``, mode
0600), so nobody who merely reaches the port can read or start anything. The peer endpoint
(``/p2p``) is open by design: a connecting node proves itself through the PAKE, not the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pshare import __version__, crypto
from p2pshare.config import NodeConfig
from p2pshare.discovery import Discovery, discovery_key
from p2pshare.errors import (
    CodeError,
    ConfigError,
    InputError,
    P2PShareError,
    StudyChoiceError,
)
from p2pshare.jobs import Jobs
from p2pshare.node import (
    audit_routes,
    consent_routes,
    pacs_routes,
    service,
    viewer_routes,
    web_routes,
)
from p2pshare.node.httputil import actor, listen, read_json, require_operator
from p2pshare.node.keys import config_key, engine_key, jobs_key, store_key, token_key
from p2pshare.protocol.frames import MAX_FRAME
from p2pshare.store import Store
from p2pshare.transfer import Engine, WsChannel
from p2pshare.transfer.paths import BoundedChannel
from p2pshare.transfer.relay_client import RelayRegistrar, registrar_key

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
EXPIRY_SWEEP_S = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_token(path: Path) -> str:
    """The API bearer token, created (0600) on first start."""
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def _lock_data_dir(data_dir: Path) -> int:
    """One node per data folder: a second one (e.g. a temporary CLI node next to a running
    `serve`) would rewrite the first one's transfer states on start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another node is already running with the data folder {data_dir}: drive it with "
            f"--node URL (its address), or give this one another --data-dir"
        ) from None
    return fd


async def _locked(app: web.Application) -> AsyncIterator[None]:
    """Hold the data folder's lock for the node's whole life (released when it stops)."""
    fd = _lock_data_dir(app[config_key].data_dir)
    try:
        yield
    finally:
        os.close(fd)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    cfg = app[config_key]
    store = Store(cfg.data_dir)
    identity = crypto.Identity.load_or_create(cfg.identity_path)
    jobs = Jobs()
    engine = Engine(config=cfg, identity=identity, store=store, offer_job=jobs.get)
    app[store_key] = store
    app[engine_key] = engine
    app[jobs_key] = jobs
    app[token_key] = load_token(cfg.token_path)
    # Offers survive a restart: give each live one a job again so progress can be watched.
    for offer_id, expires in store.live_offers():
        jobs.create("offer", offer_id).emit("waiting", expires=expires)
    # Transfers that were running when the node stopped can resume with their tickets.
    interrupted = store.interrupted_on_start(engine.now())
    for offer_id in interrupted:
        jobs.create("offer", offer_id).emit(
            "interrupted", message="the sending node restarted; the receiver may resume"
        )
    for staging in store.receives_on_start(engine.now()):
        shutil.rmtree(staging, ignore_errors=True)
    engine.audit("node-started", name=cfg.name, fingerprint=identity.fingerprint)
    # LAN discovery (started by start() once the port is bound) and the relay registrar
    app[discovery_key] = Discovery(
        cfg.name,
        identity.fingerprint,
        cfg.host,
        pinned=lambda: {p["fingerprint"] for p in store.list_peers()},
    )
    if cfg.relay:
        app[registrar_key] = RelayRegistrar(
            engine, cfg.relay, wrap=lambda ch: BoundedChannel(ch, cfg.idle_timeout_s)
        )
        for offer_id, _expires in store.live_offers():
            app[registrar_key].register(offer_id)
        engine.on_interrupted = app[registrar_key].register_resume
        for offer_id in interrupted:
            app[registrar_key].register_resume(offer_id)
    sweeper = asyncio.create_task(_sweep_expired(app))
    yield
    await app[discovery_key].close()
    if registrar_key in app:
        await app[registrar_key].close()
    sweeper.cancel()
    engine.stopping = True  # what is cancelled now is interrupted, and can resume
    tasks = [*app[service.receive_tasks_key], *engine.running.values()]
    for task in tasks:
        task.cancel()
    for task in [sweeper, *tasks]:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    store.close()


async def _sweep_expired(app: web.Application) -> None:
    store, engine, jobs = app[store_key], app[engine_key], app[jobs_key]
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_S)
        service.kick_notifications(app, only_due=True)
        for staging in store.expire_receives(engine.now()):
            shutil.rmtree(staging, ignore_errors=True)  # no partial patient data left behind
        for offer_id in store.expire_resumes(engine.now()):
            engine.audit("transfer-failed", "resume-expired", offer=offer_id)
            job = jobs.get(offer_id)
            if job is not None and not job.done:
                job.finish(
                    "error",
                    code="resume-expired",
                    message="the interrupted transfer was not resumed in time",
                )
        for offer_id in store.expire_offers(engine.now()):
            store.consents.end_link(offer_id)
            engine.audit("offer-expired", offer=offer_id)
            job = jobs.get(offer_id)
            if job is not None and not job.done:
                job.finish("error", code="offer-expired", message="the offer expired unused")


def _status_for(exc: P2PShareError) -> int:
    if isinstance(exc, StudyChoiceError):
        return 409
    if isinstance(exc, InputError | CodeError | ConfigError):
        return 400
    return 422


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors become JSON a person can read; nothing else leaks a traceback."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except P2PShareError as exc:
        body: dict[str, Any] = {"error": exc.code, "message": exc.message}
        if isinstance(exc, StudyChoiceError):
            body["studies"] = exc.studies
        return web.json_response(body, status=_status_for(exc))
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return web.json_response(
            {"error": "internal", "message": "internal error; see the node's log"}, status=500
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/") and not web_routes.is_public(request):
        given = request.headers.get("Authorization", "")
        expected = "Bearer " + request.app[token_key]
        if not hmac.compare_digest(given.encode(), expected.encode()):
            if web_routes.SESSION_COOKIE not in request.cookies:
                return web.json_response(
                    {"error": "unauthorized", "message": "this API needs the node's token"},
                    status=401,
                )
            # A staff browser: session cookie, CSRF token and role instead of the token.
            refused = await web_routes.gate(request)
            if refused is not None:
                return refused
    elif web_routes.is_staff_page(request.path):
        await web_routes.page_gate(request)
    return await handler(request)


routes = web.RouteTableDef()


@routes.get("/api/v1/info")
async def info(request: web.Request) -> web.Response:
    engine = request.app[engine_key]
    return web.json_response(
        {
            "name": request.app[config_key].name,
            "fingerprint": engine.identity.fingerprint,
            "version": __version__,
            "protocol": 1,
        }
    )


@routes.get("/p2p")
async def peer_endpoint(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME + 1024, heartbeat=30.0)
    await ws.prepare(request)
    peer = request.remote or "unknown"
    idle = request.app[config_key].idle_timeout_s
    await request.app[engine_key].serve_sender(BoundedChannel(WsChannel(ws, peer), idle))
    return ws


@routes.post("/api/v1/offers")
async def post_offer(request: web.Request) -> web.Response:
    require_operator(request)
    body = await read_json(request)
    path = body.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError("give the study's folder or .zip as 'path'")
    study = body.get("study_uid")
    expires = body.get("expires_s")
    policy, destination = body.get("consent"), body.get("destination")
    glass = body.get("break_glass")
    break_glass: tuple[str, str] | None = None
    if isinstance(glass, dict):
        break_glass = (str(glass.get("clinician", "")), str(glass.get("reason", "")))
    offer = await service.create_offer(
        request.app,
        path,
        study if isinstance(study, str) else None,
        expires if isinstance(expires, int) else None,
        consent_policy=policy if isinstance(policy, str) else None,
        destination=destination if isinstance(destination, str) else None,
        break_glass=break_glass,
        actor=actor(request),
        may_loosen=True,
    )
    return web.json_response(offer, status=201)


@routes.post("/api/v1/offers/{offer_id}/break-glass")
async def post_break_glass(request: web.Request) -> web.Response:
    body = await read_json(request)
    minutes = body.get("minutes")
    view = service.invoke_break_glass(
        request.app,
        request.match_info["offer_id"],
        str(body.get("clinician", "")),
        str(body.get("reason", "")),
        minutes if isinstance(minutes, int) and not isinstance(minutes, bool) else None,
        actor=actor(request),
    )
    return web.json_response(view)


@routes.post("/api/v1/offers/{offer_id}/consent-link")
async def post_consent_link(request: web.Request) -> web.Response:
    """A fresh phone link for a pending consent (the old one stops working)."""
    link = service.renew_consent_link(request.app, request.match_info["offer_id"])
    return web.json_response({"link": link})


@routes.get("/api/v1/notifications")
async def list_notifications(request: web.Request) -> web.Response:
    return web.json_response(request.app[store_key].notifications.entries())


def _offer_view(request: web.Request, offer_id: str) -> dict[str, Any]:
    offer = request.app[store_key].get_offer(offer_id)
    if offer is None:
        raise web.HTTPNotFound(text='{"error": "not-found"}', content_type="application/json")
    return {
        "offer_id": offer.id,
        "state": offer.state,
        "expires": offer.expires,
        "study": offer.manifest.summary(),
        "peer": offer.peer_name,
        "peer_fingerprint": offer.peer_fingerprint,
        "failed_attempts": offer.failed_attempts,
        "receipt": offer.receipt,
        "error": offer.error,
        "consent": service.consent_view(request.app, offer.id),
    }


@routes.get("/api/v1/offers")
async def list_offers(request: web.Request) -> web.Response:
    offers = request.app[store_key].list_offers()
    return web.json_response([_offer_view(request, o.id) for o in offers])


@routes.get("/api/v1/offers/{offer_id}")
async def get_offer(request: web.Request) -> web.Response:
    return web.json_response(_offer_view(request, request.match_info["offer_id"]))


@routes.delete("/api/v1/offers/{offer_id}")
async def delete_offer(request: web.Request) -> web.Response:
    if not service.cancel_offer(
        request.app, request.match_info["offer_id"], actor=actor(request)
    ):
        raise web.HTTPConflict(
            text='{"error": "not-cancellable", "message": "no such live offer"}',
            content_type="application/json",
        )
    return web.json_response({"cancelled": True})


@routes.post("/api/v1/receive/resume")
async def post_resume(request: web.Request) -> web.Response:
    """Reconnect an interrupted receive (``{"job": id}``), e.g. after this node restarted."""
    body = await read_json(request)
    job_id = body.get("job")
    if not isinstance(job_id, str) or not job_id:
        raise ConfigError("give the interrupted transfer's job id as 'job'")
    job = await service.resume_receive(request.app, job_id)
    return web.json_response({"job": job.id}, status=202)


@routes.post("/api/v1/receive")
async def post_receive(request: web.Request) -> web.Response:
    require_operator(request)
    body = await read_json(request)
    code, out = body.get("code"), body.get("out")
    if not isinstance(code, str) or not isinstance(out, str) or not out:
        raise ConfigError("give the code (or QR link) as 'code' and the destination as 'out'")
    raw_from = body.get("from", [])
    addresses = [a for a in raw_from if isinstance(a, str)] if isinstance(raw_from, list) else []
    job = service.start_receive(request.app, code, out, addresses)
    return web.json_response({"job": job.id}, status=202)


@routes.get("/api/v1/transfers/{job_id}")
async def get_transfer(request: web.Request) -> web.Response:
    t = request.app[store_key].get_transfer(request.match_info["job_id"])
    if t is None:
        raise web.HTTPNotFound(text='{"error": "not-found"}', content_type="application/json")
    return web.json_response(t)


@routes.post("/api/v1/transfers/{job_id}/cancel")
async def cancel_transfer(request: web.Request) -> web.Response:
    """Stop a receive that is running or waiting to be resumed: what had not been verified and
    placed is deleted, the sender is told, and it can no longer be resumed."""
    job_id = request.match_info["job_id"]
    if not await service.cancel_receive(request.app, job_id, actor=actor(request)):
        raise web.HTTPConflict(
            text='{"error": "not-cancellable", "message": "no running or interrupted transfer '
            'with that id on this node (it may have finished already)"}',
            content_type="application/json",
        )
    return web.json_response({"cancelled": True})


@routes.get("/api/v1/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.Response:
    job = request.app[jobs_key].get(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound(text='{"error": "not-found"}', content_type="application/json")
    try:
        after = int(request.query.get("after", "0"))
        wait = min(30.0, max(0.0, float(request.query.get("wait", "20"))))
    except ValueError:
        raise ConfigError("'after' and 'wait' must be numbers") from None
    events = await job.wait(after, wait)
    return web.json_response({"events": events, "done": job.done})


@routes.get("/api/v1/peers")
async def list_peers(request: web.Request) -> web.Response:
    return web.json_response(request.app[store_key].list_peers())


@routes.get("/api/v1/discovered")
async def list_discovered(request: web.Request) -> web.Response:
    """Nodes seen on the LAN (mDNS): hints only, nothing here is verified."""
    discovery = request.app[discovery_key]
    return web.json_response(
        {"active": discovery.active, "nodes": [p.to_json() for p in discovery.peers()]}
    )


@routes.delete("/api/v1/peers/{name}")
async def forget_peer(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not request.app[store_key].forget_peer(name):
        raise web.HTTPNotFound(text='{"error": "not-found"}', content_type="application/json")
    request.app[engine_key].audit("peer-forgotten", name=name, user=actor(request))
    return web.json_response({"forgotten": name})


@routes.get("/")
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def _end_waits(app: web.Application) -> None:
    """Stopping: answer the long-polls now. The server waits for every open request before it
    runs the clean-up, and a job's events are polled for up to 20 s at a time."""
    if jobs_key in app:
        app[jobs_key].end_waits()


def create_app(config: NodeConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1024**2)
    app[config_key] = config
    app[service.addresses_key] = []
    app[service.receive_tasks_key] = set()
    app[service.notify_task_key] = set()
    app.cleanup_ctx.append(_locked)
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_end_waits)
    app.add_routes(routes)
    consent_routes.setup(app, WEB_DIR)
    web_routes.setup(app)
    pacs_routes.setup(app)
    audit_routes.setup(app)
    viewer_routes.setup(app)
    if WEB_DIR.is_dir():
        app.router.add_static("/static/", WEB_DIR, show_index=False, follow_symlinks=False)
    return app


async def start(config: NodeConfig) -> tuple[web.AppRunner, web.Application]:
    """Start a node and return its runner; the bound addresses are filled in."""
    app = create_app(config)
    runner = await listen(
        app, config.host, config.port, "is another node running there? Choose another --port"
    )
    for addr in runner.addresses:
        app[service.addresses_key].append((addr[0], addr[1]))
    if config.discovery and app[service.addresses_key]:
        await app[discovery_key].start(app[service.addresses_key][0][1])
    return runner, app
