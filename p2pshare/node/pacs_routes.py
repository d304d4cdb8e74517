"""The node's PACS side: study library, DICOM listener and export, as API routes and resources.

``setup(app)`` adds the routes below and one ``cleanup_ctx`` that opens the library, starts the
Storage SCP (when ``--dicom-port`` is set), the quiet-period sweep that completes pushed studies,
and the automatic export watcher (``--auto-export``), and stops them all on shutdown.

Handlers stay thin: parse, call the library or the export job, translate errors (the app's
error middleware turns :class:`~p2pshare.errors.P2PShareError` into JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from p2pshare.errors import ConfigError, InputError
from p2pshare.library import Library, Stored
from p2pshare.node.httputil import actor, read_json, require_operator
from p2pshare.node.keys import config_key, engine_key, jobs_key, store_key
from p2pshare.pacs.export import PacsTarget, check_ae_title
from p2pshare.pacs.exporting import ExportRequest, Exports, Received, run_export
from p2pshare.pacs.reconcile import Identity, Rules
from p2pshare.pacs.scp import StorageScp

__all__ = ["exports_key", "library_key", "setup"]

log = logging.getLogger(__name__)

library_key = web.AppKey("library_key", Library)
exports_key = web.AppKey("exports_key", Exports)
scp_key = web.AppKey("scp_key", StorageScp)
export_tasks_key = web.AppKey("export_tasks_key", set)
AUTO_EXPORT_POLL_S = 0.5
MAX_REPORT_BYTES = 64 * 1024**2

routes = web.RouteTableDef()


def setup(app: web.Application) -> None:
    app[export_tasks_key] = set()
    app.cleanup_ctx.append(_resources)
    app.add_routes(routes)


# ------------------------------------------------------------------------------ resources


async def _resources(app: web.Application) -> AsyncIterator[None]:
    cfg, engine = app[config_key], app[engine_key]
    if cfg.pacs_target:
        PacsTarget.parse(cfg.pacs_target)
    check_ae_title(cfg.ae_title)
    library = await asyncio.to_thread(
        functools.partial(Library, cfg.data_dir, min_free_bytes=cfg.min_free_bytes)
    )
    app[library_key] = library
    app[exports_key] = Exports(cfg.data_dir)
    background: list[asyncio.Task[None]] = [asyncio.create_task(_sweep_quiet(app))]
    scp: StorageScp | None = None
    if cfg.dicom_port is not None:
        loop = asyncio.get_running_loop()

        def stored(s: Stored) -> None:
            if s.reopened:
                loop.call_soon_threadsafe(
                    lambda: engine.audit("study-reopened", study_id=s.study_id)
                )

        scp = StorageScp(
            library,
            ae_title=cfg.ae_title,
            host=cfg.host,
            port=cfg.dicom_port,
            allow=cfg.dicom_allow,
            on_stored=stored,
            max_instance_bytes=cfg.dicom_max_instance_bytes,
        )
        scp.start()
        app[scp_key] = scp
    if cfg.auto_export:
        background.append(asyncio.create_task(_auto_export(app)))
    yield
    if scp is not None:
        await asyncio.to_thread(scp.stop)
    tasks = [*background, *app[export_tasks_key]]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _sweep_quiet(app: web.Application) -> None:
    """Pushed studies are complete once no instance came for the quiet period."""
    cfg, library = app[config_key], app[library_key]
    interval = max(0.05, min(1.0, cfg.dicom_quiet_s / 4))
    while True:
        await asyncio.sleep(interval)
        for sid in library.due(cfg.dicom_quiet_s):
            record = library.mark_complete(sid)
            _audit_received(app, record, "quiet-period")


def _audit_received(app: web.Application, record: dict[str, Any], trigger: str) -> None:
    app[engine_key].audit(
        "study-received-dicom",
        study_id=record["study_id"],
        study=record["study_instance_uid"],
        instances=record["instances"],
        trigger=trigger,
    )
    log.info("study %s complete (%s): %d instances", record["study_id"], trigger,
             record["instances"])


async def _auto_export(app: web.Application) -> None:
    """Export every transfer this node finishes receiving (rule: see docs/pacs.md)."""
    jobs, cfg = app[jobs_key], app[config_key]
    handled = {j.id for j in jobs.all()}
    while True:
        await asyncio.sleep(AUTO_EXPORT_POLL_S)
        for job in jobs.all():
            if job.id in handled or job.kind != "receive" or not job.done:
                continue
            handled.add(job.id)
            if job.result is None or job.result.get("event") != "complete":
                continue
            target = "pacs" if cfg.pacs_target else "stow" if cfg.stow_url else None
            if target is None:
                log.warning("auto-export: no --pacs or --stow configured; nothing exported")
                continue
            start_export(app, ExportRequest(job.id, target, None))


# ------------------------------------------------------------------------------ export


def start_export(app: web.Application, request: ExportRequest) -> str:
    """Start an export job; returns its id (also the job id for /api/v1/jobs/{id}/events)."""
    cfg, store, engine, jobs = app[config_key], app[store_key], app[engine_key], app[jobs_key]
    if request.target == "pacs" and not cfg.pacs_target:
        raise ConfigError("this node has no PACS configured: start it with --pacs AE@HOST:PORT")
    if request.target == "stow" and not cfg.stow_url:
        raise ConfigError("this node has no DICOMweb server configured: start it with --stow URL")
    transfer = store.get_transfer(request.transfer_job)
    if transfer is None:
        raise web.HTTPNotFound(
            text='{"error": "not-found", "message": "no such transfer on this node"}',
            content_type="application/json",
        )
    received = Received(
        state=str(transfer["state"]),
        out_dir=Path(transfer["out_dir"]),
        manifest=store.get_transfer_manifest(request.transfer_job),
        peer_name=str(transfer.get("peer_name") or ""),
    )
    job = jobs.create("export")
    job.emit("queued", transfer=request.transfer_job, target=request.target)
    rules = Rules(
        accession_prefix=cfg.accession_prefix,
        modifying_system=cfg.name[:64],
        source=received.peer_name,
    )
    task = asyncio.create_task(
        run_export(
            export_id=job.id,
            request=request,
            received=received,
            exports=app[exports_key],
            job=job,
            rules=rules,
            pacs=PacsTarget.parse(cfg.pacs_target) if cfg.pacs_target else None,
            stow_url=cfg.stow_url,
            calling_ae=cfg.ae_title,
            audit=engine.audit,
        )
    )
    app[export_tasks_key].add(task)
    task.add_done_callback(app[export_tasks_key].discard)
    job.task = task
    return job.id


# ------------------------------------------------------------------------------ routes


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"'{key}' must be a string")
    return value.strip()


@routes.get("/api/v1/pacs")
async def pacs_info(request: web.Request) -> web.Response:
    cfg = request.app[config_key]
    scp = request.app.get(scp_key)
    return web.json_response(
        {
            "ae_title": cfg.ae_title,
            "dicom_port": scp.port if scp is not None else None,
            "pacs": cfg.pacs_target,
            "stow": cfg.stow_url,
            "auto_export": cfg.auto_export,
            "accession_prefix": cfg.accession_prefix,
            "quiet_s": cfg.dicom_quiet_s,
        }
    )


def _with_path(library: Library, record: dict[str, Any]) -> dict[str, Any]:
    """A study record plus the folder to offer (``POST /api/v1/offers {"path": ...}``)."""
    return record | {"path": str(library.path_of(record["study_id"]))}


@routes.get("/api/v1/studies")
async def list_studies(request: web.Request) -> web.Response:
    library = request.app[library_key]
    return web.json_response([_with_path(library, r) for r in library.list()])


@routes.get("/api/v1/studies/{study_id}")
async def get_study(request: web.Request) -> web.Response:
    library = request.app[library_key]
    return web.json_response(_with_path(library, library.get(request.match_info["study_id"])))


@routes.post("/api/v1/studies/import")
async def import_studies(request: web.Request) -> web.Response:
    """Import from a path on the node's own disk: the operator's call (the CLI with the node's
    token), never a browser's (a browser uploads the study instead)."""

    require_operator(request)
    body = await read_json(request)
    path = _text(body, "path")
    if not path:
        raise ConfigError("give the CD/DVD folder, folder or .zip to import as 'path'")
    report = await asyncio.to_thread(request.app[library_key].import_path, path)
    request.app[engine_key].audit(
        "study-imported",
        studies=[s["study_id"] for s in report["studies"]],
        imported=report["imported"],
        duplicates=report["duplicates"],
        skipped=len(report["skipped"]),
        dicomdir_missing=len(report["dicomdir"]["missing"]),
        user=actor(request),
    )
    return web.json_response(report, status=201 if report["studies"] else 200)


@routes.post("/api/v1/studies/{study_id}/report")
async def attach_report(request: web.Request) -> web.Response:
    library = request.app[library_key]
    study_id = request.match_info["study_id"]
    library.get(study_id)  # unknown id → 400 before reading the upload
    title = request.query.get("title", "Radiology report")
    fd, name = tempfile.mkstemp(dir=library.root / ".tmp", suffix=".report")
    try:
        with os.fdopen(fd, "wb") as out:
            size = 0
            if request.content_type.startswith("multipart/"):
                reader = await request.multipart()
                part = await reader.next()
                while part is not None and getattr(part, "name", None) != "file":
                    part = await reader.next()
                if part is None or not isinstance(part, aiohttp.BodyPartReader):
                    raise ConfigError("upload the report as the form field 'file'")
                while block := await part.read_chunk(1 << 20):
                    size += len(block)
                    if size > MAX_REPORT_BYTES:
                        raise InputError("the report is larger than 64 MB")
                    out.write(block)
            else:
                async for block in request.content.iter_chunked(1 << 20):
                    size += len(block)
                    if size > MAX_REPORT_BYTES:
                        raise InputError("the report is larger than 64 MB")
                    out.write(block)
        result = await asyncio.to_thread(library.attach_report, study_id, name, title=title)
    finally:
        Path(name).unlink(missing_ok=True)
    request.app[engine_key].audit(
        "report-attached",
        study_id=study_id,
        sop=result["sop_instance_uid"],
        kind=result["kind"],
        user=actor(request),
    )
    return web.json_response(result, status=201)


@routes.post("/api/v1/studies/{study_id}/complete")
async def complete_study(request: web.Request) -> web.Response:
    library = request.app[library_key]
    study_id = request.match_info["study_id"]
    was = library.get(study_id)["state"]
    record = library.mark_complete(study_id)
    if was != "complete" and record["source"] == "scp":
        _audit_received(request.app, record, "send-now")
    return web.json_response(record)


@routes.delete("/api/v1/studies/{study_id}")
async def delete_study(request: web.Request) -> web.Response:
    study_id = request.match_info["study_id"]
    await asyncio.to_thread(request.app[library_key].delete, study_id)
    request.app[engine_key].audit("study-deleted", study_id=study_id, user=actor(request))
    return web.json_response({"deleted": study_id})


@routes.post("/api/v1/transfers/{job_id}/export")
async def export_transfer(request: web.Request) -> web.Response:
    body = await read_json(request)
    target = _text(body, "target") or "pacs"
    if target not in ("pacs", "stow"):
        raise ConfigError("'target' must be 'pacs' (C-STORE) or 'stow' (STOW-RS)")
    identity = Identity(
        mrn=_text(body, "mrn"),
        issuer=_text(body, "issuer"),
        name=_text(body, "name"),
        accession=_text(body, "accession"),
    )
    export_id = start_export(request.app, ExportRequest(request.match_info["job_id"], target,
                                                        identity))
    return web.json_response({"export_id": export_id, "job": export_id}, status=202)


@routes.get("/api/v1/exports")
async def list_exports(request: web.Request) -> web.Response:
    return web.json_response(request.app[exports_key].list())


@routes.get("/api/v1/exports/{export_id}")
async def get_export(request: web.Request) -> web.Response:
    record = request.app[exports_key].get(request.match_info["export_id"])
    if record is None:
        raise web.HTTPNotFound(
            text='{"error": "not-found", "message": "no such export"}',
            content_type="application/json",
        )
    return web.json_response(record)
