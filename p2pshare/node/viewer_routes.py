"""The viewer's routes: the page, the series list, pixels and thumbnails of received studies.

``setup(app)`` adds them. The page (``/viewer?job=<receive job id>``, or ``?study=<library
study id>`` for a study in the node's library) polls the series list while the study arrives;
only instances verified and in place are listed or served (see :mod:`p2pshare.viewer.study`).
Decoding (and encoding for the wire) runs in worker threads, at most two decodes at a time, with
decoded frames and thumbnails kept in small LRU caches; an image whose header declares more
than :data:`~p2pshare.viewer.decode.MAX_FRAME_BYTES` per frame is refused (422
``image-too-large``) before any pixel is decoded. Responses carry patient data for the staff's
screen: they are marked ``no-store`` and nothing here logs them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pshare.errors import InputError
from p2pshare.manifest import Manifest
from p2pshare.node.httputil import actor
from p2pshare.node.keys import engine_key, store_key
from p2pshare.node.pacs_routes import library_key
from p2pshare.viewer import decode, study

__all__ = ["setup", "viewer_key"]

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
MAX_JOB_ID = 128
NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class Viewer:
    """The viewer's caches and its decode limit, one per app."""

    infos: study.InfoCache = field(default_factory=study.InfoCache)
    frames: study.SizedLru[decode.Frame] = field(
        default_factory=lambda: study.SizedLru(192 * 1024**2, lambda f: f.nbytes)
    )
    thumbs: study.SizedLru[bytes] = field(default_factory=lambda: study.SizedLru(24 * 1024**2, len))
    decoding: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    #: (study reference, viewer) pairs already audited: a study viewed is recorded once per
    #: person and node run, not on every poll of the series list
    viewed: set[tuple[str, str]] = field(default_factory=set)
    # A transfer's manifest never changes once accepted; parse it once per job.
    manifests: OrderedDict[str, Manifest] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


viewer_key = web.AppKey("viewer_key", Viewer)
routes = web.RouteTableDef()


def _not_found(code: str, message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(
        text=web.json_response({"error": code, "message": message}).text,
        content_type="application/json",
    )


def _transfer(request: web.Request) -> tuple[dict[str, Any], Path, Manifest | None]:
    """(transfer row, destination, manifest) of the receive job named in the path."""
    job = request.match_info["job_id"]
    if not 0 < len(job) <= MAX_JOB_ID or not job.isprintable():
        raise _not_found("not-found", "no transfer with this id on this node")
    store = request.app[store_key]
    t = store.get_transfer(job)
    if t is None:
        raise _not_found("not-found", "no transfer with this id on this node")
    viewer = request.app[viewer_key]
    with viewer.lock:
        manifest = viewer.manifests.get(job)
    if manifest is None:
        manifest = store.get_transfer_manifest(job)
        if manifest is not None:
            with viewer.lock:
                viewer.manifests[job] = manifest
                while len(viewer.manifests) > 16:
                    viewer.manifests.popitem(last=False)
    return t, Path(t["out_dir"]), manifest


@routes.get("/viewer")
async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "viewer.html", headers=NO_STORE)


@routes.get("/api/v1/transfers/{job_id}/series")
async def series(request: web.Request) -> web.Response:
    t, out_dir, manifest = _transfer(request)
    body = await asyncio.to_thread(study.listing, out_dir, manifest, request.app[viewer_key].infos)
    body["job"] = request.match_info["job_id"]
    _audit_viewed(request, "job", request.match_info["job_id"], body)
    body["state"] = t["state"]
    body["error"] = t.get("error")
    return web.json_response(body, headers=NO_STORE)


def _audit_viewed(request: web.Request, kind: str, ref: str, body: dict[str, Any]) -> None:
    """Audit "study viewed" once per person (staff user, or the API token) and study."""
    who = actor(request)
    key = (f"{kind}:{ref}", who)
    viewed = request.app[viewer_key].viewed
    if key in viewed:
        return
    viewed.add(key)
    request.app[engine_key].audit(
        "study-viewed",
        "ok",
        user=who,
        address=request.remote,
        study=(body.get("study") or {}).get("study_instance_uid"),
        **{kind: ref},
    )


def _library_study(request: web.Request) -> tuple[dict[str, Any], Path]:
    """(library record, files folder) of the library study named in the path."""
    library = request.app[library_key]
    study_id = request.match_info["study_id"]
    try:
        return library.get(study_id), library.path_of(study_id)
    except InputError:
        raise _not_found("not-found", "no study with this id in this node's library") from None


@routes.get("/api/v1/studies/{study_id}/series")
async def library_series(request: web.Request) -> web.Response:
    record, files = _library_study(request)
    body = await asyncio.to_thread(
        study.library_listing, files, record["study_instance_uid"], request.app[viewer_key].infos
    )
    body["study_id"] = record["study_id"]
    _audit_viewed(request, "library_study", record["study_id"], body)
    body["state"] = record["state"]
    body["error"] = None
    return web.json_response(body, headers=NO_STORE)


def _frame_index(request: web.Request) -> int:
    raw = request.query.get("frame", "0")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
        raise InputError("'frame' must be a whole number from 0")
    return int(raw)


def _instance(request: web.Request) -> Path:
    sop = request.match_info["sop"]
    path: Path | None
    if "job_id" in request.match_info:
        _, out_dir, manifest = _transfer(request)
        path = study.instance_path(out_dir, manifest, sop) if manifest is not None else None
    else:
        _, files = _library_study(request)
        path = study.library_instance_path(files, sop)
    if path is None:
        raise _not_found(
            "not-arrived", "this instance is not in this study or has not arrived verified yet"
        )
    return path


async def _frame(request: web.Request) -> tuple[tuple[str, int, int], decode.Frame]:
    path = _instance(request)
    index = _frame_index(request)
    viewer = request.app[viewer_key]
    key = (str(path), path.stat().st_ino, index)
    frame = viewer.frames.get(key)
    if frame is None:
        async with viewer.decoding:
            frame = await asyncio.to_thread(decode.decode_frame, path, index)
        viewer.frames.put(key, frame)
    return key, frame


@routes.get("/api/v1/transfers/{job_id}/instances/{sop}/pixels")
@routes.get("/api/v1/studies/{study_id}/instances/{sop}/pixels")
async def pixels(request: web.Request) -> web.Response:
    _, frame = await _frame(request)
    # Copying a frame of up to 64 MiB (and more as float32) is not work for the event loop.
    body = await asyncio.to_thread(decode.encode, frame)
    return web.Response(body=body, content_type="application/octet-stream", headers=NO_STORE)


@routes.get("/api/v1/transfers/{job_id}/instances/{sop}/thumbnail.png")
@routes.get("/api/v1/studies/{study_id}/instances/{sop}/thumbnail.png")
async def thumbnail(request: web.Request) -> web.Response:
    viewer = request.app[viewer_key]
    key, frame = await _frame(request)
    png = viewer.thumbs.get(key)
    if png is None:
        png = await asyncio.to_thread(decode.thumbnail_png, frame)
        viewer.thumbs.put(key, png)
    return web.Response(body=png, content_type="image/png", headers=NO_STORE)


def setup(app: web.Application) -> None:
    """Add the viewer's page and API routes, and its caches."""
    app[viewer_key] = Viewer()
    app.add_routes(routes)
