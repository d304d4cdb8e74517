"""One export of a received study to the local PACS, from the check to the record.

1. **Complete?** The transfer must have ended with a signed receipt, and every instance of its
   signed manifest must be in place with the size and digest (BLAKE3) the manifest names. Nothing is
   guessed from timers; a study with one instance missing or changed is not exported at all.
2. **Reconcile** each instance into a private working copy (:mod:`p2pshare.pacs.reconcile`);
   the received originals are only read.
3. **Send** by C-STORE (in a worker thread) or STOW-RS, with per-instance outcomes.
4. **Record** the result (``<data dir>/exports/<id>.json``), audit it (identifiers and counts
   only) and remove the working copies.

Progress goes to the export's job (``/api/v1/jobs/{id}/events``) as ``progress`` events with
``bytes_sent``/``bytes_total``, like a transfer's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from p2pshare import digest as file_digest
from p2pshare.dicom.header import parse_header
from p2pshare.errors import DicomError, InputError, P2PShareError
from p2pshare.jobs import Job
from p2pshare.manifest import Manifest
from p2pshare.pacs.export import Item, Outcome, PacsTarget, cstore, stow
from p2pshare.pacs.reconcile import Identity, Rules, reconcile_file

__all__ = ["ExportRequest", "Exports", "run_export"]

log = logging.getLogger(__name__)

SHOW_FAILED = 20


@dataclass(frozen=True)
class ExportRequest:
    transfer_job: str
    #: "pacs" (C-STORE) or "stow" (STOW-RS)
    target: str
    #: the reconciled identity; None = automatic export with the received identifiers
    identity: Identity | None


@dataclass(frozen=True)
class Received:
    """A finished transfer as the store knows it."""

    state: str
    out_dir: Path
    manifest: Manifest | None
    peer_name: str


class Exports:
    """Export records, one JSON file each under ``<data dir>/exports/`` (0600)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "exports"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def work_dir(self, export_id: str) -> Path:
        return self.root / f"{export_id}.work"

    def save(self, record: dict[str, Any]) -> None:
        tmp = self.root / f"{record['export_id']}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, sort_keys=True)
        os.replace(tmp, self.root / f"{record['export_id']}.json")

    def get(self, export_id: str) -> dict[str, Any] | None:
        if not (export_id.isalnum() and len(export_id) <= 64):
            return None
        try:
            data: dict[str, Any] = json.loads((self.root / f"{export_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return data

    def list(self) -> list[dict[str, Any]]:
        out = []
        for path in self.root.glob("*.json"):
            record = self.get(path.stem)
            if record is not None:
                record.pop("instances", None)
                out.append(record)
        return sorted(out, key=lambda r: -float(r.get("started", 0)))


def check_complete(received: Received, transfer_job: str) -> list[tuple[Path, Any]]:
    """Every instance of the signed manifest, in place and unchanged. Blocking.

    Returns [(path, manifest instance)] in manifest order.

    Raises:
        InputError: the transfer is not complete, or an instance is missing or changed.
    """
    if received.state != "complete" or received.manifest is None:
        raise InputError(
            f"transfer {transfer_job} is not complete (state: {received.state}); only a study "
            "whose every instance was verified and signed for can be exported"
        )
    m = received.manifest
    found: list[tuple[Path, Any]] = []
    bad = 0
    for inst in m.instances:
        path = received.out_dir / inst.relpath(m.study_instance_uid)
        if not _matches(path, inst.size, inst.digest, m.digest_algorithm):
            bad += 1
            continue
        found.append((path, inst))
    if bad:
        raise InputError(
            f"{bad} of {len(m.instances)} instances of transfer {transfer_job} are missing or "
            f"changed in {received.out_dir}; nothing was exported. Receive the study again"
        )
    return found


def _matches(path: Path, size: int, digest: str, algorithm: str) -> bool:
    try:
        return path.stat().st_size == size and file_digest.of_file(path, algorithm) == digest
    except OSError:
        return False


def _foreign_identity(path: Path, peer_name: str) -> Identity:
    """Automatic export: keep the received Patient ID, qualified by the sender as issuer."""
    with open(path, "rb") as fh:
        header = parse_header(fh)
    mrn = header.patient.get("id", "")
    if not mrn:
        raise InputError(
            "the received study carries no Patient ID, so it cannot be exported automatically; "
            "enter the local MRN and export it"
        )
    return Identity(mrn=mrn, issuer=peer_name[:64])


def _prepare(
    found: list[tuple[Path, Any]],
    work: Path,
    identity: Identity | None,
    rules: Rules,
    peer_name: str,
) -> list[Item]:
    """Reconciled working copies of every instance. Blocking."""
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    who = identity or _foreign_identity(found[0][0], peer_name)
    items: list[Item] = []
    for n, (path, inst) in enumerate(found):
        dest = work / f"{n:06d}.dcm"
        reconcile_file(path, dest, who, rules)
        items.append(
            Item(
                dest,
                inst.sop_class_uid,
                inst.sop_instance_uid,
                inst.transfer_syntax_uid,
                dest.stat().st_size,
            )
        )
    return items


async def run_export(
    *,
    export_id: str,
    request: ExportRequest,
    received: Received,
    exports: Exports,
    job: Job,
    rules: Rules,
    pacs: PacsTarget | None,
    stow_url: str | None,
    calling_ae: str,
    audit: Callable[..., None],
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Check, reconcile, send and record one export; returns the record. Never raises."""
    target = str(pacs) if request.target == "pacs" else (stow_url or "")
    record: dict[str, Any] = {
        "export_id": export_id,
        "transfer": request.transfer_job,
        "target": request.target,
        "destination": target,
        "reconciled": request.identity is not None,
        "state": "running",
        "started": clock(),
        "study_instance_uid": received.manifest.study_instance_uid if received.manifest else "",
    }
    exports.save(record)
    work = exports.work_dir(export_id)
    loop = asyncio.get_running_loop()
    try:
        job.emit("checking")
        found = await asyncio.to_thread(check_complete, received, request.transfer_job)
        total_bytes = sum(inst.size for _, inst in found)
        job.emit("reconciling", instances=len(found))
        items = await asyncio.to_thread(
            _prepare, found, work, request.identity, rules, received.peer_name
        )
        total = sum(i.size for i in items)
        job.emit("exporting", instances=len(items), bytes=total, destination=target)

        def progress(done: int, sent: int) -> None:
            loop.call_soon_threadsafe(
                lambda: job.emit(
                    "progress",
                    instances_done=done,
                    instances_total=len(items),
                    bytes_sent=sent,
                    bytes_total=total,
                )
            )

        outcomes: list[Outcome]
        if request.target == "pacs":
            assert pacs is not None
            outcomes = await asyncio.to_thread(cstore, items, pacs, calling_ae, progress=progress)
        else:
            assert stow_url is not None
            async with aiohttp.ClientSession() as http:
                outcomes = await stow(items, stow_url, http, progress=progress)
        await asyncio.sleep(0)  # let the last progress callback run before the final event
        stored = sum(1 for o in outcomes if o.ok)
        failed = [o for o in outcomes if not o.ok]
        record.update(
            state="complete" if not failed else "failed",
            instances_total=len(outcomes),
            stored=stored,
            failed=len(failed),
            bytes=total_bytes,
            finished=clock(),
            instances=[o.to_json() for o in outcomes],
        )
        audit(
            "export-to-pacs",
            "ok" if not failed else "failed",
            export=export_id,
            transfer=request.transfer_job,
            study=record["study_instance_uid"],
            target=request.target,
            destination=target,
            stored=stored,
            failed=len(failed),
            reconciled=request.identity is not None,
        )
        exports.save(record)
        if failed:
            first = failed[0].message
            log.warning("export %s: %d of %d instances failed", export_id[:8], len(failed),
                        len(outcomes))
            job.finish(
                "error",
                code="export-failed",
                export_id=export_id,
                stored=stored,
                failed=len(failed),
                message=(
                    f"{len(failed)} of {len(outcomes)} instances were not stored on {target} "
                    f"(first: {first}); check the PACS and export again"
                ),
            )
        else:
            log.info("export %s: %d instances stored on %s", export_id[:8], stored, request.target)
            job.finish(
                "complete",
                export_id=export_id,
                stored=stored,
                failed=0,
                instances=stored,
                bytes=total_bytes,
                destination=target,
            )
    except (P2PShareError, DicomError) as exc:
        record.update(state="failed", error=exc.message, finished=clock())
        exports.save(record)
        audit(
            "export-to-pacs",
            "failed",
            export=export_id,
            transfer=request.transfer_job,
            target=request.target,
            error=exc.code,
        )
        job.finish("error", code=exc.code, export_id=export_id, message=exc.message)
    except Exception as exc:
        log.exception("export %s failed unexpectedly", export_id[:8])
        record.update(state="failed", error=type(exc).__name__, finished=clock())
        exports.save(record)
        audit("export-to-pacs", "failed", export=export_id, transfer=request.transfer_job)
        job.finish("error", code="internal", export_id=export_id,
                   message="internal error during the export; see the node's log")
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    return record
