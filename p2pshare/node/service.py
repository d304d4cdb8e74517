"""What the node does when asked: create an offer, start a receive. Handlers stay thin."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from p2pshare import codes
from p2pshare.config import MAX_EXPIRY_S
from p2pshare.dicom.ingest import scan
from p2pshare.errors import ConfigError, ConnectionLost, P2PShareError
from p2pshare.jobs import Job
from p2pshare.node.keys import config_key, engine_key, jobs_key, store_key
from p2pshare.store import CANCELLED, SENDING
from p2pshare.transfer import WsChannel, connect

log = logging.getLogger(__name__)

addresses_key = web.AppKey("addresses_key", list)
receive_tasks_key = web.AppKey("receive_tasks_key", set)


def advertised_addresses(app: web.Application) -> list[str]:
    """Where receivers should connect: configured, else the bound host and port."""
    cfg = app[config_key]
    if cfg.advertise:
        return list(cfg.advertise)
    out: list[str] = []
    for host, port in app[addresses_key]:
        if host in ("0.0.0.0", "::", ""):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


async def create_offer(
    app: web.Application, path: str, study_uid: str | None, expires_s: int | None
) -> dict[str, Any]:
    cfg, store, engine, jobs = app[config_key], app[store_key], app[engine_key], app[jobs_key]
    if expires_s is not None and not 1 <= expires_s <= MAX_EXPIRY_S:
        raise ConfigError(f"an offer must expire within 1 to {MAX_EXPIRY_S} seconds")
    report = await asyncio.to_thread(scan, path, chunk_size=cfg.chunk_size)
    study = report.study(study_uid)
    manifest = study.manifest
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
    engine.audit(
        "offer-created",
        offer=offer_id,
        study=manifest.study_instance_uid,
        instances=len(manifest.instances),
        expires=expires,
    )
    job = jobs.create("offer", offer_id)
    job.emit("waiting", expires=expires)
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
    }


def cancel_offer(app: web.Application, offer_id: str) -> bool:
    store, engine, jobs = app[store_key], app[engine_key], app[jobs_key]
    offer = store.get_offer(offer_id)
    if offer is None or offer.state not in ("active", "paired", SENDING):
        return False
    store.set_offer_state(offer_id, CANCELLED)
    engine.audit("offer-cancelled", offer=offer_id)
    task = engine.running.get(offer_id)
    if task is not None:
        task.cancel()
    job = jobs.get(offer_id)
    if job is not None and not job.done:
        job.finish("error", code="cancelled", message="the offer was cancelled on this node")
    return True


def start_receive(app: web.Application, code_text: str, out_dir: str, addresses: list[str]) -> Job:
    store, engine, jobs = app[store_key], app[engine_key], app[jobs_key]
    code = codes.parse_any(code_text)
    targets: list[str] = []
    for a in addresses:
        if codes.is_address(a):
            targets.append(a)
        else:
            peer = next((p for p in store.list_peers() if p["name"] == a), None)
            if peer is None or not peer["last_address"]:
                raise ConfigError(
                    f"'{a}' is neither host:port nor a known institution; give the sending "
                    f"node's address as HOST:PORT"
                )
            targets.append(peer["last_address"])
    if isinstance(code, codes.QrOffer):
        targets.extend(a for a in code.addresses if a not in targets)
    if not targets:
        raise ConfigError(
            "a spoken code does not say where the sending node is: add --from HOST:PORT "
            "(the sender's node address, or the name of an institution you received from before)"
        )
    out = Path(out_dir).expanduser().resolve()
    job = jobs.create("receive")
    store.add_transfer(job.id, engine.now(), str(out))
    job.emit("connecting", addresses=targets)
    task = asyncio.create_task(_receive(app, code, out, targets, job))
    app[receive_tasks_key].add(task)
    task.add_done_callback(app[receive_tasks_key].discard)
    job.task = task
    return job


async def _receive(
    app: web.Application,
    code: codes.SpokenCode | codes.QrOffer,
    out: Path,
    targets: list[str],
    job: Job,
) -> None:
    store, engine = app[store_key], app[engine_key]
    try:
        async with aiohttp.ClientSession() as http:
            channel: WsChannel | None = None
            last_error: P2PShareError | None = None
            for address in targets:
                try:
                    channel = await connect(address, http)
                    break
                except ConnectionLost as exc:
                    last_error = exc
            if channel is None:
                assert last_error is not None
                raise last_error
            receipt = await engine.receive(channel, code, out, job)
        job.finish(
            "complete",
            receipt=receipt,
            out_dir=str(out),
            instances=receipt["instances"],
            bytes=receipt["bytes"],
        )
    except P2PShareError as exc:
        store.update_transfer(job.id, state="failed", error=exc.message, finished=engine.now())
        engine.audit("transfer-failed", exc.code, job=job.id)
        job.finish("error", code=exc.code, message=exc.message)
    except asyncio.CancelledError:
        store.update_transfer(job.id, state="cancelled", finished=engine.now())
        job.finish("error", code="cancelled", message="the transfer was cancelled on this node")
        raise
    except Exception as exc:
        log.exception("receive job %s failed unexpectedly", job.id[:8])
        store.update_transfer(job.id, state="failed", error=type(exc).__name__)
        job.finish(
            "error",
            code="internal",
            message="internal error on the receiving node; see its log",
        )
