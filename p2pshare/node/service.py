"""What the node does when asked: create an offer, start a receive. Handlers stay thin."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import logging
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from p2pshare import codes, consent, notify
from p2pshare.config import MAX_EXPIRY_S
from p2pshare.dicom.header import parse_header
from p2pshare.dicom.ingest import StudyScan, scan
from p2pshare.discovery import discovery_key
from p2pshare.errors import ConfigError, ConnectionLost, P2PShareError
from p2pshare.jobs import Job
from p2pshare.node.keys import config_key, engine_key, jobs_key, store_key
from p2pshare.staging import held_chunks
from p2pshare.store import CANCELLED, INTERRUPTED, SENDING, Store
from p2pshare.transfer import paths, receiving, relay_client
from p2pshare.transfer.channel import Channel, connect
from p2pshare.transfer.engine import Engine
from p2pshare.transfer.receiving import Resume
from p2pshare.transfer.relay_client import registrar_key

log = logging.getLogger(__name__)

addresses_key = web.AppKey("addresses_key", list)
receive_tasks_key = web.AppKey("receive_tasks_key", set)


def advertised_addresses(app: web.Application) -> list[str]:
    """Where receivers should connect: configured, else the bound host and port."""
    cfg = app[config_key]
    # The relay, if any, is listed last as relay:HOST:PORT (docs/relay.md).
    relay = [paths.RELAY_PREFIX + cfg.relay] if cfg.relay else []
    if cfg.advertise:
        return list(cfg.advertise) + relay
    out: list[str] = []
    for host, port in app[addresses_key]:
        if host in ("0.0.0.0", "::", ""):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out + relay


def consent_link(app: web.Application, token: str) -> str:
    """The URL the patient's phone opens (the node's public URL, else its first address)."""
    cfg = app[config_key]
    base = cfg.public_url or f"http://{(advertised_addresses(app) or ['127.0.0.1'])[0]}"
    return f"{base.rstrip('/')}/consent/{token}"


def _birth_date(study: StudyScan) -> str | None:
    """The patient's date of birth as the study records it (for the phone page's check)."""
    for source in study.sources[:3]:
        try:
            with source.open() as fh:
                value = parse_header(fh).patient.get("birth_date", "")
        except (P2PShareError, OSError):
            continue
        if value:
            return value
    return None


async def create_offer(
    app: web.Application,
    path: str,
    study_uid: str | None,
    expires_s: int | None,
    *,
    consent_policy: str | None = None,
    destination: str | None = None,
    break_glass: tuple[str, str] | None = None,
    actor: str = "api-token",
    may_loosen: bool = False,
) -> dict[str, Any]:
    """Offer a study. ``actor`` is who asked (a staff account, or the operator's API token).

    A per-offer consent policy may always be stricter than the node's; only the node's operator
    (``may_loosen``: the API token, never a browser session) may make it looser.
    """
    cfg, store, engine, jobs = app[config_key], app[store_key], app[engine_key], app[jobs_key]
    if expires_s is not None and not 1 <= expires_s <= MAX_EXPIRY_S:
        raise ConfigError(f"an offer must expire within 1 to {MAX_EXPIRY_S} seconds")
    policy = consent.check_policy(consent_policy or cfg.consent_policy)
    if not may_loosen and consent.looser(policy, cfg.consent_policy):
        raise ConfigError(
            f"this node requires consent policy '{cfg.consent_policy}'; an offer may be "
            f"stricter, never looser (ask the node's operator)"
        )
    if destination is not None:
        destination = " ".join(destination.split())
        if not 0 < len(destination) <= 128:
            raise ConfigError("the intended destination must be 1–128 characters")
    if break_glass is not None:
        if policy != "patient-or-break-glass":
            raise ConfigError(
                "break-glass needs the consent policy 'patient-or-break-glass' for this offer"
            )
        consent.check_break_glass(*break_glass)  # refuse a thin reason before any work
    report = await asyncio.to_thread(scan, path, chunk_size=cfg.chunk_size)
    study = report.study(study_uid)
    # Nothing identifying travels before the patient decides: the manifest names the study, its
    # series and files, not the patient (the images carry that, and they wait for consent).
    manifest = dataclasses.replace(study.manifest, patient={})
    birth_date = await asyncio.to_thread(_birth_date, study) if policy != "none" else None
    now = engine.now()
    expires = now + (expires_s or cfg.offer_expiry_s)
    number = store.free_offer_number(now)
    spoken = codes.new_spoken_code(number, engine.entropy)
    offer_id = engine.entropy(16).hex()
    secret = engine.entropy(codes.QR_SECRET_BYTES)
    store.add_offer(
        offer_id=offer_id,
        number=number,
        spoken_code=spoken,
        qr_secret=secret,
        manifest=manifest,
        sources=[s.to_json() for s in study.sources],
        created=now,
        expires=expires,
    )
    try:
        token = store.consents.create(offer_id, policy, destination, birth_date)
    except P2PShareError:
        store.set_offer_state(offer_id, CANCELLED, error="consent could not be set up")
        raise
    engine.audit(
        "offer-created",
        offer=offer_id,
        study=manifest.study_instance_uid,
        instances=len(manifest.instances),
        expires=expires,
        consent_policy=policy,
        user=actor,
    )
    job = jobs.create("offer", offer_id)
    job.emit("waiting", expires=expires)
    if registrar_key in app:  # net: wait for this offer's receiver at the relay (docs/relay.md)
        app[registrar_key].register(offer_id)
    link = consent_link(app, token) if token else None
    if token:
        engine.audit("consent-requested", offer=offer_id, policy=policy)
        job.emit("consent-pending", policy=policy, state=consent.PENDING)
    elif policy == "none":
        engine.audit("consent-not-required", "flagged", offer=offer_id, policy=policy)
    if break_glass is not None:
        invoke_break_glass(app, offer_id, *break_glass, actor=actor)
    addresses = advertised_addresses(app)
    qr = codes.QrOffer(
        offer_id=offer_id,
        secret=secret,
        sender_name=cfg.name,
        fingerprint=engine.identity.fingerprint,
        expires=expires,
        addresses=tuple(addresses),
    )
    log.info("offer %s created: %d instances", offer_id[:8], len(manifest.instances))
    return {
        "offer_id": offer_id,
        "code": spoken,
        "uri": qr.uri(),
        "expires": expires,
        "addresses": addresses,
        "sender": cfg.name,
        "fingerprint": engine.identity.fingerprint,
        "study": manifest.summary(),
        "skipped": [{"name": s.name, "reason": s.reason} for s in report.skipped],
        "duplicates": report.duplicates,
        "consent": {
            **consent_view(app, offer_id),
            "link": link,
            # the same link as a QR code, for the patient's phone to scan from the staff screen
            "qr": qr_data_uri(link) if link else None,
        },
    }


def qr_data_uri(text: str) -> str:
    """An SVG QR code of ``text`` as a data: URI (for an <img>, never inserted as markup)."""
    import qrcode
    import qrcode.image.svg

    buf = io.BytesIO()
    qrcode.make(
        text, image_factory=qrcode.image.svg.SvgPathFillImage, box_size=12, border=4
    ).save(buf)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def consent_view(app: web.Application, offer_id: str) -> dict[str, Any]:
    c = app[store_key].consents.get(offer_id)
    return c.view() if c else {}


def renew_consent_link(app: web.Application, offer_id: str) -> str:
    store, engine = app[store_key], app[engine_key]
    offer = store.get_offer(offer_id)
    token = store.consents.renew_link(offer_id)
    if offer is None or offer.state not in ("active", "paired") or token is None:
        raise ConfigError("a new consent link is only possible while the patient has not decided")
    engine.audit("consent-requested", offer=offer_id, renewed=True)
    return consent_link(app, token)


def invoke_break_glass(
    app: web.Application,
    offer_id: str,
    clinician: str,
    reason: str,
    minutes: int | None = None,
    actor: str = "api-token",
) -> dict[str, Any]:
    """A clinician authorises the offer because the patient cannot; audited and notified."""
    cfg, store, engine, jobs = app[config_key], app[store_key], app[engine_key], app[jobs_key]
    offer = store.get_offer(offer_id)
    if offer is None or offer.state not in ("active", "paired", SENDING, INTERRUPTED):
        raise ConfigError("break-glass needs a live offer; this one has ended")
    now = engine.now()
    c = store.consents.break_glass(
        offer_id, clinician, reason, minutes or cfg.break_glass_minutes, now
    )
    by = c.decided_by or {}
    engine.audit(
        "break-glass",
        "ok",
        offer=offer_id,
        study=offer.study_uid,
        clinician=by.get("name"),
        reason=by.get("reason"),
        valid_until=c.valid_until,
        user=actor,
    )
    nid = store.notifications.queue(
        "break-glass",
        cfg.privacy_contact,
        {
            "node": cfg.name,
            "node_fingerprint": engine.identity.fingerprint,
            "offer_id": offer_id,
            "study_instance_uid": offer.study_uid,
            "clinician": by.get("name"),
            "invoked_by": actor,
            "reason": by.get("reason"),
            "at": now,
            "valid_until": c.valid_until,
            "destination": offer.peer_name or c.intended,
        },
        now,
    )
    engine.audit("notification-queued", "ok", notification=nid, kind="break-glass")
    job = jobs.get(offer_id)
    if job is not None and not job.done:
        job.emit(
            "break-glass",
            clinician=by.get("name"),
            reason=by.get("reason"),
            valid_until=c.valid_until,
        )
    engine.consent_changed(offer_id)
    kick_notifications(app)
    return c.view()


notify_task_key = web.AppKey("notify_task_key", set)


def kick_notifications(app: web.Application, only_due: bool = False) -> None:
    """Deliver queued notifications now, in the background."""
    cfg, store, engine = app[config_key], app[store_key], app[engine_key]
    if not cfg.privacy_webhook or app[notify_task_key]:
        return
    if only_due and not store.notifications.due(engine.now()):
        return

    async def run() -> None:
        for nid, kind, outcome in await notify.deliver(
            store.notifications, cfg.privacy_webhook, engine.now()
        ):
            engine.audit(
                "notification-sent" if outcome == "sent" else "notification-failed",
                "ok" if outcome == "sent" else outcome,
                notification=nid,
                kind=kind,
            )

    task = asyncio.create_task(run())
    app[notify_task_key].add(task)
    task.add_done_callback(app[notify_task_key].discard)


def cancel_offer(app: web.Application, offer_id: str, actor: str = "api-token") -> bool:
    store, engine, jobs = app[store_key], app[engine_key], app[jobs_key]
    offer = store.get_offer(offer_id)
    if offer is None or offer.state not in ("active", "paired", SENDING, INTERRUPTED):
        return False
    store.set_offer_state(offer_id, CANCELLED)
    store.consents.end_link(offer_id)
    engine.audit("offer-cancelled", offer=offer_id, user=actor)
    task = engine.running.get(offer_id)
    if task is not None:
        task.cancel()
    job = jobs.get(offer_id)
    if job is not None and not job.done:
        job.finish("error", code="cancelled", message="the offer was cancelled on this node")
    return True


def load_resume(store: Store, job_id: str, now: int, *, complete: bool = False) -> Resume | None:
    """What is needed to reconnect an interrupted receive, while its ticket is valid (with
    ``complete``, also a complete one's: to send its receipt again)."""
    t = store.get_transfer(job_id)
    ticket = store.resume_secret("transfers", job_id, now)
    manifest = store.get_transfer_manifest(job_id)
    if t is None or ticket is None or (t["state"] == "complete" and not complete):
        return None
    address = t.get("sender_address") or ""
    reachable = codes.is_address(address.removeprefix("relay:"))
    if not (t.get("offer_id") and t.get("peer_fingerprint") and reachable):
        return None
    return Resume(
        ticket=ticket[0],
        secret=ticket[1],
        offer_id=t["offer_id"],
        sender_fingerprint=t["peer_fingerprint"],
        # cut before the manifest arrived: any manifest the same sender signs will do
        manifest_digest=hashlib.sha256(manifest.to_bytes()).hexdigest() if manifest else "",
        address=address,
    )


async def _reconnect(
    app: web.Application,
    job: Job,
    out: Path,
    http: aiohttp.ClientSession,
    lost: ConnectionLost,
) -> dict[str, Any]:
    """The connection was cut mid-transfer: reconnect with backoff and carry on from what is
    held, under a fresh connection key. Raises the last ConnectionLost if every try fails."""
    cfg, store, engine = app[config_key], app[store_key], app[engine_key]
    exc: P2PShareError = lost
    attempt = 0
    held: Any = None  # re-hashed once, and again only after a connection that made progress
    while attempt < cfg.reconnect_attempts:
        attempt += 1
        resume = load_resume(store, job.id, engine.now())
        if resume is None:
            raise exc
        delay = min(30.0, cfg.reconnect_delay_s * 2 ** (attempt - 1))
        job.emit("reconnecting", attempt=attempt, delay_s=delay, reason=exc.message)
        store.update_transfer(job.id, state="interrupted")
        await asyncio.sleep(delay)
        if held is None:
            resume = await _with_held(app, resume, job.id)
            held = resume.held
        else:
            resume = dataclasses.replace(resume, held=held)
        mark = job.events[-1]["seq"] if job.events else 0
        try:
            channel = await _open_resume(app, resume, http)
            bounded = paths.BoundedChannel(channel, cfg.idle_timeout_s)
            return await engine.receive(bounded, resume, out, job)
        except ConnectionLost as again:
            exc = again
            if any(e["event"] == "resuming" and e["seq"] > mark for e in job.events):
                attempt = 0  # that connection made progress: a fresh budget for the next cut
                held = None  # and more is held now
    raise exc


async def _with_held(app: web.Application, resume: Resume, job_id: str) -> Resume:
    """Work out what is already held (re-hashing it) before reconnecting, not while the
    sender waits for the answer to its manifest."""
    store = app[store_key]
    t, manifest = store.get_transfer(job_id), store.get_transfer_manifest(job_id)
    if t is None or manifest is None or not t.get("staging"):
        return resume
    held = await asyncio.to_thread(
        held_chunks, Path(t["out_dir"]), Path(t["staging"]), manifest
    )
    return dataclasses.replace(resume, held=held)


async def _open_resume(
    app: web.Application, resume: Resume, http: aiohttp.ClientSession
) -> Channel:
    """The way back to the sender: its address, or the relay the transfer went through (met
    there with a channel token derived from the resume secret, never from the code)."""
    if not resume.address.startswith("relay:"):
        return await connect(resume.address, http)
    relay = resume.address.removeprefix("relay:")
    try:
        async with asyncio.timeout(paths.CONNECT_TIMEOUT_S + paths.RELAY_WAIT_S):
            return await relay_client.open_channel(
                relay,
                relay_client.resume_token(resume.ticket, resume.secret),
                "receiver",
                app[engine_key].identity,
                http,
                wait_s=paths.RELAY_WAIT_S,
            )
    except TimeoutError:
        raise ConnectionLost(f"the sending node did not come to the relay at {relay}") from None


async def resume_receive(app: web.Application, job_id: str) -> Job:
    """`receive --resume JOB`: reconnect an interrupted receive (e.g. after a restart)."""
    store, engine, jobs = app[store_key], app[engine_key], app[jobs_key]
    running = jobs.get(job_id)
    if running is not None and not running.done:
        raise ConfigError("that transfer is still running on this node")
    resume = load_resume(store, job_id, engine.now())
    t = store.get_transfer(job_id)
    if resume is None or t is None:
        raise ConfigError(
            "that transfer cannot be resumed here (unknown, complete, or its resume ticket "
            "expired): ask the sender to offer the study again"
        )
    job = jobs.create("receive", job_id)
    job.emit("connecting", addresses=[resume.address], resume=True)
    task = asyncio.create_task(_resume(app, job, resume, Path(t["out_dir"])))
    app[receive_tasks_key].add(task)
    task.add_done_callback(app[receive_tasks_key].discard)
    job.task = task
    return job


async def _resume(app: web.Application, job: Job, resume: Resume, out: Path) -> None:
    cfg, engine = app[config_key], app[engine_key]

    async def first(http: aiohttp.ClientSession) -> tuple[dict[str, Any], str]:
        held = await _with_held(app, resume, job.id)
        channel = await _open_resume(app, held, http)
        bounded = paths.BoundedChannel(channel, cfg.idle_timeout_s)
        return await engine.receive(bounded, held, out, job), "direct"

    await _drive_receive(app, job, out, first)


class _InternalError(P2PShareError):
    code = "internal"

    def __init__(self) -> None:
        super().__init__("internal error on the receiving node; see its log")


async def _drive_receive(
    app: web.Application,
    job: Job,
    out: Path,
    first: Callable[[aiohttp.ClientSession], Awaitable[tuple[dict[str, Any], str]]],
) -> None:
    """Run a receive job's first connection, reconnect after a cut, and record how it ended."""
    try:
        async with aiohttp.ClientSession() as http:
            try:
                receipt, path = await first(http)
            except ConnectionLost as exc:
                receipt, path = await _reconnect(app, job, out, http, exc), "direct"
        _finish_receive(app, job, receipt, out, path)
    except P2PShareError as exc:
        _receive_failed(app, job, exc)
    except asyncio.CancelledError:
        _receive_cancelled(app, job)
        raise
    except Exception as exc:
        log.exception("receive job %s failed unexpectedly (%s)", job.id[:8], type(exc).__name__)
        _receive_failed(app, job, _InternalError())


def _finished_if_signed_for(app: web.Application, job: Job) -> bool:
    """A receive that ended badly after its receipt was signed (its wait for the sender's CLOSE
    was cancelled or broken) is still complete: finish the job so, and say True."""
    t = app[store_key].get_transfer(job.id)
    if t is None or t["state"] != "complete" or not t["receipt"]:
        return False
    _finish_receive(app, job, t["receipt"], Path(t["out_dir"]), t.get("path") or "direct")
    return True


def _receive_cancelled(app: web.Application, job: Job) -> None:
    """A receive task was cancelled: by its operator (partial data removed), or because the
    node is stopping (kept: the transfer is interrupted and can resume after the restart)."""
    store, engine = app[store_key], app[engine_key]
    if _finished_if_signed_for(app, job):
        return
    if engine.stopping and load_resume(store, job.id, engine.now()) is not None:
        store.update_transfer(job.id, state="interrupted")
        job.finish("error", code="interrupted", message="the node stopped; resume after restart")
        return
    _discard_receive(app, job.id)
    job.finish("error", code="cancelled", message=RECEIVE_CANCELLED)


#: What the receiving side is told when its own staff cancel a transfer.
RECEIVE_CANCELLED = (
    "the transfer was cancelled on this node and what had not been verified was deleted. Ask "
    "the sender to offer the study again if it is still needed"
)

#: How long cancelling waits for a running receive to tell the sender and remove its data.
CANCEL_WAIT_S = 5.0

#: The receive states a person may cancel: running, or waiting to be resumed.
CANCELLABLE_RECEIVES = ("connecting", "paired", "receiving", "interrupted")


def _discard_receive(app: web.Application, job_id: str) -> None:
    """End a receive for good: partial data removed, its resume ticket forgotten."""
    store, engine = app[store_key], app[engine_key]
    t = store.get_transfer(job_id)
    if t and t.get("staging"):
        shutil.rmtree(t["staging"], ignore_errors=True)
    store.update_transfer(
        job_id,
        state="cancelled",
        finished=engine.now(),
        error="cancelled on this node",
        resume_id=None,
        resume_secret=None,
    )


async def cancel_receive(app: web.Application, job_id: str, actor: str = "api-token") -> bool:
    """Cancel a receive that is running or waiting to be resumed; False if there is none.

    A running one is stopped: its task tells the sender (sealed, after pairing) that this node
    cancelled, so the sender ends its offer instead of waiting for a resume. A sender that was
    cut off is told over a reconnection with the resume ticket, in the background. Either way the
    staging folder (everything not yet verified and placed) is deleted and the transfer can no
    longer be resumed. Instances already verified and placed in the destination stay there,
    listed as what they are: a partial study, not a complete one.

    Returns once the receive has ended (a running one gets ``CANCEL_WAIT_S`` to wind up).
    """
    store, engine, jobs = app[store_key], app[engine_key], app[jobs_key]
    t = store.get_transfer(job_id)
    if t is None or t["state"] not in CANCELLABLE_RECEIVES:
        return False  # unknown, or ended (complete, failed, cancelled): nothing to call off
    job = jobs.get(job_id)
    running = job is not None and not job.done and job.task is not None and not job.task.done()
    if running and job is not None and job.cancelling:
        # asked twice (a double click, Ctrl-C and the web page): the first call does the work
        assert job.task is not None
        await asyncio.wait([job.task], timeout=CANCEL_WAIT_S)
        return True
    resume = load_resume(store, job_id, engine.now())  # before the ticket is forgotten
    engine.audit("transfer-cancelled", "ok", transfer=job_id, user=actor, state=t["state"])
    if running:
        assert job is not None and job.task is not None
        job.cancelling = True
        job.task.cancel()  # the node is not stopping: a connected run tells the sender
        await asyncio.wait([job.task], timeout=CANCEL_WAIT_S)
    else:
        _discard_receive(app, job_id)
        if job is not None and not job.done:
            job.finish("error", code="cancelled", message=RECEIVE_CANCELLED)
    told = job is not None and any(e["event"] == receiving.SENDER_TOLD for e in job.events)
    if resume is not None and not told:
        # cut off (interrupted, or between reconnections): the sender still waits for a resume
        _tell_sender(app, job_id, resume)
    return True


def _resend_receipt(app: web.Application, job_id: str) -> None:
    """In the background, reconnect with the transfer's ticket until the sender has the
    receipt; audited as ``receipt-resent``."""
    store, engine = app[store_key], app[engine_key]

    def keep_ticket(ticket: str, secret: bytes) -> None:
        expires = engine.now() + engine.config.resume_ttl_s
        store.set_resume("transfers", job_id, ticket, secret, expires)

    async def settle(e: Engine, ch: Channel, resume: Resume) -> receiving.Settled:
        return await receiving.send_receipt_again(e, ch, resume, keep_ticket)

    def done(result: receiving.Settled) -> None:
        assert result.receipt is not None
        store.update_transfer(job_id, receipt=result.receipt, resume_id=None, resume_secret=None)
        engine.audit(
            "receipt-signed",
            "ok",
            transfer=result.receipt["transfer_id"],
            job=job_id,
            manifest_sha256=result.receipt["manifest_sha256"],
            resent=True,
        )

    _settle_in_background(
        app,
        job_id,
        "receipt-resent",
        RESEND_RECEIPT_AT,
        lambda: load_resume(store, job_id, engine.now(), complete=True),
        settle,
        done,
    )


#: How long one reconnection to settle an ended transfer may take, connecting included.
TELL_TIMEOUT_S = 30.0
#: When to try to tell a cut-off sender about a cancel, in units of the node's first
#: reconnection delay (0.5 s by default: at once, after 5 s and after 30 s).
TELL_CANCEL_AT = (0.0, 10.0, 60.0)


def _tell_sender(app: web.Application, job_id: str, resume: Resume) -> None:
    """In the background, reconnect with the ticket only to tell the sending node that the
    transfer was cancelled here; audited either way (``cancel-notified``)."""
    _settle_in_background(
        app, job_id, "cancel-notified", TELL_CANCEL_AT, lambda: resume, receiving.tell_cancelled
    )


def _settle_in_background(
    app: web.Application,
    job_id: str,
    action: str,
    schedule: tuple[float, ...],
    resume_of: Callable[[], Resume | None],
    settle: Callable[[Engine, Channel, Resume], Awaitable[receiving.Settled]],
    on_ok: Callable[[receiving.Settled], None] | None = None,
) -> None:
    """Reconnect with an ended transfer's ticket to settle it with the sender (``settle``), at
    the times in ``schedule`` (in reconnection delays) until it is settled or cannot be; audit
    ``action`` with how it went. Not while the node stops: its clean-up has already taken its
    list of tasks."""
    cfg, engine = app[config_key], app[engine_key]
    if engine.stopping:
        return
    times = [at * cfg.reconnect_delay_s for at in schedule]

    async def attempt(resume: Resume) -> receiving.Settled:
        async with aiohttp.ClientSession() as http, asyncio.timeout(TELL_TIMEOUT_S):
            channel = await _open_resume(app, resume, http)
            try:
                bounded = paths.BoundedChannel(channel, cfg.idle_timeout_s)
                return await settle(engine, bounded, resume)
            finally:
                await channel.close()

    async def run() -> None:
        waited, outcome = 0.0, "unreachable"
        detail: dict[str, str] = {}
        for at in times:
            await asyncio.sleep(at - waited)
            waited = at
            resume = resume_of()
            if resume is None:
                outcome, detail = "expired", {}
                break
            try:
                result = await attempt(resume)
            except (P2PShareError, TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.info("%s: no answer from the sending node (%s)", action, type(exc).__name__)
                outcome, detail = "unreachable", {}
                continue
            outcome, detail = result.outcome, ({"code": result.code} if result.code else {})
            if result.outcome == "ok" and on_ok is not None:
                on_ok(result)
            if result.final:
                break
        engine.audit(action, outcome, transfer=job_id, **detail)
        job = app[jobs_key].get(job_id)
        if job is not None:  # for whoever still follows the (ended) job, e.g. the CLI
            job.emit(action, outcome=outcome, **detail)

    task = asyncio.create_task(run())
    app[receive_tasks_key].add(task)
    task.add_done_callback(app[receive_tasks_key].discard)


#: After a receipt whose CLOSE never came: when to reconnect to send it again, in units of the
#: node's first reconnection delay (0.5 s by default: after 1, 5, 30 and 120 s).
RESEND_RECEIPT_AT = (2.0, 10.0, 60.0, 240.0)


def _finish_receive(
    app: web.Application, job: Job, receipt: dict[str, Any], out: Path, path: str
) -> None:
    app[store_key].update_transfer(job.id, path=path)
    if any(e["event"] == receiving.RECEIPT_UNCONFIRMED for e in job.events):
        _resend_receipt(app, job.id)
    job.finish(
        "complete",
        receipt=receipt,
        out_dir=str(out),
        instances=receipt["instances"],
        bytes=receipt["bytes"],
        path=path,
    )


def _receive_failed(app: web.Application, job: Job, exc: P2PShareError) -> None:
    store, engine = app[store_key], app[engine_key]
    if _finished_if_signed_for(app, job):
        return
    t = store.get_transfer(job.id)
    resume = load_resume(store, job.id, engine.now()) if isinstance(exc, ConnectionLost) else None
    staging = Path(t["staging"]) if t and t.get("staging") else None
    if resume is not None and staging is not None and staging.is_dir():
        expires = store.db.execute(
            "SELECT resume_expires FROM transfers WHERE id = ?", (job.id,)
        ).fetchone()[0]
        until = time.strftime("%Y-%m-%d %H:%M", time.localtime(expires))
        message = (
            f"{exc.message}. What arrived is kept: when the sending node is reachable again, "
            f"run `p2pshare receive --resume {job.id}` (possible until {until})"
        )
        store.update_transfer(job.id, state="interrupted", error=exc.message)
        engine.audit("transfer-interrupted", exc.code, job=job.id)
        job.finish("error", code="interrupted", message=message, resumable=True)
        return
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)  # never leave partial patient data behind
    store.update_transfer(job.id, state="failed", error=exc.message, finished=engine.now())
    engine.audit("transfer-failed", exc.code, job=job.id)
    job.finish("error", code=exc.code, message=exc.message)


def start_receive(app: web.Application, code_text: str, out_dir: str, addresses: list[str]) -> Job:
    store, engine, jobs = app[store_key], app[engine_key], app[jobs_key]
    code = codes.parse_any(code_text)
    discovery = app[discovery_key]
    # every way to the sender at once (docs/discovery.md): given, QR, LAN, relay
    targets = paths.plan(code, addresses, store.list_peers(), discovery.peers())
    if not targets and not discovery.active:
        raise ConfigError(
            "a spoken code does not say where the sending node is: add --from HOST:PORT "
            "(the sender's node address, or the name of an institution you received from before)"
        )
    out = Path(out_dir).expanduser().resolve()
    job = jobs.create("receive")
    store.add_transfer(job.id, engine.now(), str(out))
    job.emit("connecting", addresses=[r.label for r in targets])
    task = asyncio.create_task(_receive(app, code, out, targets, job))
    app[receive_tasks_key].add(task)
    task.add_done_callback(app[receive_tasks_key].discard)
    job.task = task
    return job


async def _receive(
    app: web.Application,
    code: codes.SpokenCode | codes.QrOffer,
    out: Path,
    targets: list[paths.Route],
    job: Job,
) -> None:
    engine = app[engine_key]

    async def first(http: aiohttp.ClientSession) -> tuple[dict[str, Any], str]:
        routes = targets
        if not routes:  # a spoken code and no address: ask every node on the LAN
            found = await app[discovery_key].wait_for_peers(paths.DISCOVERY_WAIT_S)
            job.emit("discovered", nodes=[d.to_json() for d in found])
            routes = paths.lan_routes(found)
            if not routes:
                raise ConfigError(
                    "no p2pshare node was found on this network, and a spoken code does not say "
                    "where the sender is: add --from HOST:PORT (the sender's node address)"
                )
        receipt, route = await paths.receive_first(engine, routes, code, out, job, http)
        return receipt, route.kind

    await _drive_receive(app, job, out, first)

