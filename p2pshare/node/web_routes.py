"""The staff web app's side of the node: sign-in, pages, and the API calls only browsers need.

Staff sign in with a name and password (:mod:`p2pshare.users`) and get a session cookie
(HttpOnly, SameSite=Strict, Secure over https). ``gate`` is called by the app's auth
middleware for every ``/api/`` request that does not carry the node's bearer token (the CLI's
way in): it wants a live session, the session's CSRF token in ``X-CSRF-Token`` on every request
that changes something, and a role that may make the call (``ROLE_RULES``). Staff pages
redirect to ``/login`` when nobody is signed in. The peer endpoint, ``/api/v1/info``, sign-in,
the patient's ``/consent/`` pages and static assets stay public.

The browser never names a path on the node: uploads land in a folder the node picks, received
studies go to ``<data dir>/received/<id>``, and offers are made from the node's study library.
The API calls that do take a path are for the node's operator only (``require_operator``).

Limits: failed sign-ins per address (``SIGN_IN_PER_MIN``) and Argon2 checks at once
(``MAX_HASHING``), uploads at once (``MAX_UPLOADS``); each answers 429 with ``Retry-After``.
An upload is refused (507) when it would leave less than the node's ``min_free_bytes`` free.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import qrcode
import qrcode.image.svg
import zxingcpp
from aiohttp import BodyPartReader, web
from PIL import Image, UnidentifiedImageError

from p2pshare import codes
from p2pshare.errors import CodeError, ConfigError, InputError
from p2pshare.library import Library
from p2pshare.node import service
from p2pshare.node.httputil import actor, read_json, staff_key
from p2pshare.node.keys import config_key, engine_key, store_key
from p2pshare.node.pacs_routes import library_key
from p2pshare.users import AttemptLimit, Role, Session, SignIn, Users, csrf_matches

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
SESSION_COOKIE = "p2pshare_session"
CSRF_HEADER = "X-CSRF-Token"
#: Largest camera frame or photo the QR decoder accepts.
MAX_IMAGE_BYTES = 12 * 1024**2
MAX_IMAGE_PIXELS = 40_000_000
SWEEP_EVERY_S = 300.0
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: Failed sign-ins one address may make per minute (then 429 until the oldest is a minute old).
SIGN_IN_PER_MIN = 10
#: Argon2 password checks running at once (each takes a core and 64 MiB for a moment).
MAX_HASHING = 2
#: Uploads streaming at once.
MAX_UPLOADS = 2


class Slots:
    """At most ``size`` holders at once; ``take`` answers False rather than waiting (the
    event loop's own counter: no lock needed)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0

    def take(self) -> bool:
        if self.busy >= self.size:
            return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy = max(0, self.busy - 1)


users_key = web.AppKey("users_key", Users)
sign_in_limit_key = web.AppKey("sign_in_limit_key", AttemptLimit)
hashing_key = web.AppKey("hashing_key", Slots)
uploads_key = web.AppKey("uploads_key", Slots)

#: Pages that need a signed-in member of staff (file in web/, or None when another module
#: serves the route, like the viewer).
STAFF_PAGES: dict[str, str | None] = {
    "/": "index.html",
    "/send": "send.html",
    "/receive": "receive.html",
    "/transfers": "transfers.html",
    "/viewer": None,
}

#: Which role may make a request that changes something, by path prefix (first match wins).
#: Reading (GET) is open to every signed-in role; unsafe requests no rule names need an admin.
ROLE_RULES: tuple[tuple[str, Role | None], ...] = (
    ("/api/v1/session", None),
    ("/api/v1/offers", Role.SENDER),
    ("/api/v1/web/offers", Role.SENDER),
    ("/api/v1/uploads", Role.SENDER),
    ("/api/v1/studies", Role.SENDER),
    ("/api/v1/receive", Role.RECEIVER),
    ("/api/v1/web/receive", Role.RECEIVER),
    ("/api/v1/qr/", Role.RECEIVER),
    ("/api/v1/transfers", Role.RECEIVER),
    ("/api/v1/exports", Role.RECEIVER),
)


def is_public(request: web.Request) -> bool:
    """API calls anyone may make: node info and signing in."""
    return request.path == "/api/v1/info" or (
        request.path == "/api/v1/session" and request.method == "POST"
    )


def is_staff_page(path: str) -> bool:
    return path in STAFF_PAGES


def required_role(method: str, path: str) -> Role | None:
    """The role a request needs; None when any signed-in member of staff may make it."""
    if method in SAFE_METHODS:
        return None
    for prefix, role in ROLE_RULES:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            return role
    return Role.ADMIN


def _error(
    status: int, code: str, message: str, *, retry_after: float | None = None
) -> web.Response:
    res = web.json_response({"error": code, "message": message}, status=status)
    if retry_after is not None:
        res.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return res


def staff_session(request: web.Request) -> Session | None:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return request.app[users_key].session(cookie) if cookie else None


async def gate(request: web.Request) -> web.StreamResponse | None:
    """Let a cookie-authenticated API request through (None), or say why not."""
    session = staff_session(request)
    if session is None:
        return _error(401, "session-ended", "your session has ended; sign in again")
    if request.method not in SAFE_METHODS and not csrf_matches(
        session, request.headers.get(CSRF_HEADER, "")
    ):
        return _error(
            403, "csrf", "the request lacks this session's CSRF token; reload the page and retry"
        )
    role = required_role(request.method, request.path)
    if role is not None and not session.user.may(role):
        return _error(
            403,
            "forbidden",
            f"your account ({session.user.role.value}) may not do this; ask an admin for a "
            f"{role.value} account",
        )
    request[staff_key] = session
    return None


async def page_gate(request: web.Request) -> None:
    """Staff pages send a visitor without a session to the sign-in page."""
    if staff_session(request) is not None:
        return
    target = request.path_qs
    raise web.HTTPFound("/login?next=" + quote(target, safe="/?=&"))


# -- sign-in -----------------------------------------------------------------------------------

routes = web.RouteTableDef()


def _audit(request: web.Request, action: str, outcome: str = "ok", **detail: Any) -> None:
    request.app[engine_key].audit(action, outcome, address=request.remote or "unknown", **detail)


@routes.post("/api/v1/session")
async def sign_in(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ConfigError("send the name and password as JSON: {\"name\": …, \"password\": …}")
    name, password = body.get("name"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or not name or not password:
        raise ConfigError("give both the user name and the password")
    app = request.app
    users = app[users_key]
    shown = name[:64]
    address = request.remote or "unknown"
    wait = app[sign_in_limit_key].wait(address)
    if wait:
        return _error(
            429,
            "too-many-attempts",
            f"too many sign-in attempts from this address; wait {int(wait + 0.999)} seconds "
            "and try again",
            retry_after=wait,
        )
    # A locked account is refused before any password is hashed.
    locked_until = users.locked_until(name)
    if not locked_until:
        if not app[hashing_key].take():
            return _error(
                429, "busy", "the node is busy checking other sign-ins; try again in a moment",
                retry_after=1,
            )
        try:
            stored = users.password_record(name)
            ok = await asyncio.to_thread(users.verify, stored, password)
        finally:
            app[hashing_key].give()
        attempt = users.conclude(name, stored, ok)
        if attempt.outcome is not SignIn.OK:
            app[sign_in_limit_key].failed(address)
        locked_until = attempt.locked_until if attempt.outcome is SignIn.LOCKED else 0
    if locked_until:
        _audit(request, "staff-sign-in", "locked", user=shown)
        minutes = max(1, round((locked_until - time.time()) / 60))
        return _error(
            429,
            "locked",
            f"too many wrong passwords: this account is locked for about {minutes} minute(s); "
            f"an admin can lift it with 'p2pshare user passwd {shown}'",
            retry_after=max(1.0, locked_until - time.time()),
        )
    if attempt.outcome is SignIn.FAILED or attempt.session is None:
        _audit(request, "staff-sign-in", "failed", user=shown)
        return _error(401, "sign-in-failed", "wrong user name or password")
    _audit(request, "staff-sign-in", "ok", user=shown, role=attempt.session.user.role.value)
    log.info("staff sign-in from %s", request.remote)
    res = web.json_response(_whoami(request, attempt.session))
    res.set_cookie(
        SESSION_COOKIE,
        attempt.cookie,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
    )
    return res


def _whoami(request: web.Request, session: Session | None) -> dict[str, Any]:
    cfg, engine = request.app[config_key], request.app[engine_key]
    node = {"name": cfg.name, "fingerprint": engine.identity.fingerprint}
    if session is None:  # the bearer token: the CLI or an integration, not a person
        return {"user": None, "role": Role.ADMIN.value, "csrf": None, "node": node}
    return {
        "user": session.user.name,
        "role": session.user.role.value,
        "csrf": session.csrf,
        "node": node,
    }


@routes.get("/api/v1/session")
async def who_am_i(request: web.Request) -> web.Response:
    return web.json_response(_whoami(request, request.get(staff_key)))


@routes.delete("/api/v1/session")
async def sign_out(request: web.Request) -> web.Response:
    session: Session | None = request.get(staff_key)
    if session is not None:
        request.app[users_key].sign_out(request.cookies.get(SESSION_COOKIE, ""))
        _audit(request, "staff-sign-out", user=session.user.name)
    res = web.json_response({"signed_out": session is not None})
    res.del_cookie(SESSION_COOKIE, path="/")
    return res


# -- pages -------------------------------------------------------------------------------------


def _page(name: str) -> web.FileResponse:
    res = web.FileResponse(WEB_DIR / name)
    res.headers["Cache-Control"] = "no-store"
    res.headers["X-Frame-Options"] = "DENY"
    return res


@routes.get("/login")
async def login_page(request: web.Request) -> web.FileResponse:
    return _page("login.html")


@routes.get("/send")
async def send_page(request: web.Request) -> web.FileResponse:
    return _page("send.html")


@routes.get("/receive")
async def receive_page(request: web.Request) -> web.FileResponse:
    return _page("receive.html")


@routes.get("/transfers")
async def transfers_page(request: web.Request) -> web.FileResponse:
    return _page("transfers.html")


# -- offers: QR image, studies from the library ------------------------------------------------


@routes.get("/api/v1/offers/{offer_id}/qr.svg")
async def offer_qr(request: web.Request) -> web.Response:
    """The offer's QR code as SVG, while the offer waits for its receiver."""
    app = request.app
    offer = app[store_key].get_offer(request.match_info["offer_id"])
    if offer is None or offer.state != "active" or not offer.qr_secret:
        return _error(404, "not-found", "no waiting offer with this id; create a new code")
    uri = codes.QrOffer(
        offer_id=offer.id,
        secret=bytes(offer.qr_secret),
        sender_name=app[config_key].name,
        fingerprint=app[engine_key].identity.fingerprint,
        expires=offer.expires,
        addresses=tuple(service.advertised_addresses(app)),
    ).uri()
    qr = qrcode.QRCode(
        border=4,
        error_correction=qrcode.constants.ERROR_CORRECT_M,
        image_factory=qrcode.image.svg.SvgPathImage,
    )
    qr.add_data(uri)
    svg = qr.make_image().to_string()
    # The image carries the offer's secret: never cached, never framed by another site.
    return web.Response(
        body=svg,
        content_type="image/svg+xml",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def _library(app: web.Application) -> Library:
    """The node's study library (the one the PACS side fills, so both see the same studies)."""
    return app[library_key]


@routes.get("/api/v1/web/studies")
async def list_studies(request: web.Request) -> web.Response:
    return web.json_response(_library(request.app).list())


@routes.post("/api/v1/web/offers")
async def offer_study(request: web.Request) -> web.Response:
    """An offer for a study of the library.

    Body: ``{"study_id", "expires_s"?, "consent"?, "destination"?}`` — the browser names the
    study, the node finds its files (``POST /api/v1/offers`` takes a path, for the CLI).
    """
    body = await read_json(request)
    study_id, expires = body.get("study_id"), body.get("expires_s")
    policy, destination = body.get("consent"), body.get("destination")
    if not isinstance(study_id, str) or not study_id:
        raise ConfigError("choose a study of this node's library ('study_id')")
    path = _library(request.app).path_of(study_id)
    offer = await service.create_offer(
        request.app,
        str(path),
        None,
        expires if isinstance(expires, int) else None,
        consent_policy=policy if isinstance(policy, str) else None,
        destination=destination if isinstance(destination, str) and destination else None,
        actor=actor(request),
    )
    offer["study_id"] = study_id
    return web.json_response(offer, status=201)


# -- uploads -----------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(index: int, given: str | None) -> str:
    base = (given or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _SAFE_NAME.sub("_", base).strip("._")[:80] or "file"
    return f"{index:06d}-{base}"


@routes.post("/api/v1/uploads")
async def upload(request: web.Request) -> web.Response:
    """A study from the browser: multipart, one .zip or many files, streamed to disk, imported."""
    if not request.content_type.startswith("multipart/"):
        raise ConfigError("upload the study as multipart/form-data (a .zip or its files)")
    slots = request.app[uploads_key]
    if not slots.take():
        return _error(
            429,
            "busy",
            f"{slots.size} uploads are already running on this node; wait for one to finish "
            "and upload again",
            retry_after=10,
        )
    try:
        return await _upload(request)
    finally:
        slots.give()


async def _upload(request: web.Request) -> web.Response:
    cfg = request.app[config_key]
    uploads = cfg.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_disk(uploads, cfg.min_free_bytes, request.content_length or 0)
    folder = uploads / secrets.token_hex(8)
    folder.mkdir(mode=0o700)
    try:
        files, total = await _receive_parts(
            request, folder, cfg.max_study_bytes, cfg.min_free_bytes
        )
        if not files:
            raise InputError("the upload held no files; choose the study's .zip or its files")
        target = files[0] if len(files) == 1 else folder
        library = _library(request.app)
        result: dict[str, Any] = await asyncio.to_thread(library.import_path, target)
    finally:
        # The library has its own copy; the upload itself is not kept.
        await asyncio.to_thread(shutil.rmtree, folder, True)
    session: Session | None = request.get(staff_key)
    request.app[engine_key].audit(
        "study-uploaded",
        "ok",
        user=session.user.name if session else None,
        files=len(files),
        bytes=total,
        studies=[s["study_id"] for s in result.get("studies", [])],
    )
    result["files"] = len(files)
    result["bytes"] = total
    return web.json_response(result, status=201)


def _check_disk(folder: Path, keep_free: int, incoming: int) -> None:
    """Refuse (507) what would leave less than ``keep_free`` bytes free on ``folder``'s disk."""
    if shutil.disk_usage(folder).free - incoming < keep_free:
        raise web.HTTPInsufficientStorage(
            text=json.dumps(
                {
                    "error": "disk-full",
                    "message": "this node's disk is too full to take the upload (it keeps "
                    f"{keep_free / 1e6:.0f} MB free); ask the node's operator to free space",
                }
            ),
            content_type="application/json",
        )


async def _receive_parts(
    request: web.Request, folder: Path, limit: int, keep_free: int
) -> tuple[list[Path], int]:
    reader = await request.multipart()
    files: list[Path] = []
    total = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader) or part.filename is None:
            continue  # form fields are ignored; only files count
        path = folder / _safe_name(len(files), part.filename)
        with path.open("xb") as fh:
            while chunk := await part.read_chunk(1024 * 1024):
                total += len(chunk)
                if total > limit:
                    raise InputError(
                        f"the upload is larger than this node accepts ({limit / 1e9:.0f} GB)"
                    )
                _check_disk(folder, keep_free, len(chunk))
                await asyncio.to_thread(fh.write, chunk)
        files.append(path)
    return files, total


# -- receiving: QR decoding and a node-chosen destination -------------------------------------


def _decode_qr(data: bytes) -> list[str]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError("the picture is too large; send a smaller photo of the QR code")
            gray = img.convert("L")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise InputError(
            "the file is not a picture this node can read; send a JPEG or PNG photo of the QR code"
        ) from None
    qr_only = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)
    found = zxingcpp.read_barcodes(gray, formats=qr_only)
    return [r.text for r in found if r.valid]


@routes.post("/api/v1/qr/decode")
async def decode_qr(request: web.Request) -> web.Response:
    """Find a p2pshare offer QR code in a camera frame or a photo (JPEG/PNG body)."""
    if request.content_length is not None and request.content_length > MAX_IMAGE_BYTES:
        raise InputError(f"the picture is larger than {MAX_IMAGE_BYTES // 1024**2} MB")
    data = bytearray()
    while chunk := await request.content.read(256 * 1024):
        data += chunk
        if len(data) > MAX_IMAGE_BYTES:
            raise InputError(f"the picture is larger than {MAX_IMAGE_BYTES // 1024**2} MB")
    if not data:
        raise InputError("send the picture of the QR code as the request body")
    texts = await asyncio.to_thread(_decode_qr, bytes(data))
    if not texts:
        return _error(
            422, "no-qr-code", "no QR code found in the picture; hold the code steady and closer"
        )
    for text in texts:
        if text.strip().lower().startswith(codes.URI_SCHEME + ":"):
            try:
                offer = codes.parse_qr_uri(text)
            except CodeError as exc:
                return _error(422, exc.code, exc.message)
            return web.json_response(
                {
                    "uri": text,
                    "sender": offer.sender_name,
                    "fingerprint": offer.fingerprint,
                    "expires": offer.expires,
                }
            )
    return _error(
        422,
        "not-p2pshare",
        "the picture holds a QR code, but not a p2pshare offer; scan the code on the sender's "
        "send page",
    )


@routes.post("/api/v1/web/receive")
async def receive(request: web.Request) -> web.Response:
    """Start receiving into a folder the node chooses: ``{"code", "from"?}``."""
    body = await read_json(request)
    code = body.get("code")
    if not isinstance(code, str) or not code.strip():
        raise ConfigError("give the spoken code or the scanned QR link as 'code'")
    raw_from = body.get("from", [])
    if isinstance(raw_from, str):
        raw_from = [raw_from] if raw_from.strip() else []
    addresses = [a.strip() for a in raw_from if isinstance(a, str)] if isinstance(
        raw_from, list
    ) else []
    out = request.app[config_key].data_dir / "received" / secrets.token_hex(8)
    job = service.start_receive(request.app, code, str(out), addresses)
    session: Session | None = request.get(staff_key)
    if session is not None:
        request.app[engine_key].audit("staff-receive", "ok", user=session.user.name, job=job.id)
    return web.json_response({"job": job.id}, status=202)


@routes.get("/api/v1/web/transfers")
async def list_transfers(request: web.Request) -> web.Response:
    """Received transfers, newest first (offers are at GET /api/v1/offers)."""
    return web.json_response(request.app[store_key].list_transfers())


# -- wiring ------------------------------------------------------------------------------------


async def _users(app: web.Application) -> AsyncIterator[None]:
    users = Users(app[store_key].db)
    app[users_key] = users
    sweeper = asyncio.create_task(_sweep(users))
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper


async def _sweep(users: Users) -> None:
    while True:
        await asyncio.sleep(SWEEP_EVERY_S)
        users.sweep()


def setup(app: web.Application) -> None:
    """Add the web app's routes and the accounts (after the store exists)."""
    app[sign_in_limit_key] = AttemptLimit(SIGN_IN_PER_MIN)
    app[hashing_key] = Slots(MAX_HASHING)
    app[uploads_key] = Slots(MAX_UPLOADS)
    app.cleanup_ctx.append(_users)
    app.add_routes(routes)
