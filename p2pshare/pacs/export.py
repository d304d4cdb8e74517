"""Send instances to the local PACS: C-STORE (pynetdicom SCU) or STOW-RS (aiohttp).

Both senders take a list of :class:`Item` (a file plus the UIDs that decide how it may be sent)
and return one :class:`Outcome` per instance: the DICOM status (or HTTP failure), whether it was
stored, and how many attempts it took. They never raise for a refused instance — a PACS that
takes 597 of 600 images must be reported as such — only for a target that is misconfigured.

C-STORE: the association proposes exactly the study's SOP classes × transfer syntaxes, one
presentation context per pair, so what the PACS accepts is visible per pair; an instance whose
pair was refused fails with a clear reason (nothing is transcoded). Failures and dropped
associations are retried with exponential backoff on a new association.

STOW-RS (PS3.18 §10.5): ``POST <base>/studies`` with ``multipart/related;
type="application/dicom"``, streamed from disk in batches so memory stays flat; the response's
Referenced/Failed SOP Sequences give the per-instance outcome.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from p2pshare.errors import ConfigError

__all__ = ["Item", "Outcome", "PacsTarget", "cstore", "stow"]

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: presentation context ids are odd numbers 1..255
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
STOW_BATCH_BYTES = 32 * 1024**2
READ_SIZE = 1024 * 1024

Progress = Callable[[int, int], None]  # (instances done, bytes done)


@dataclass(frozen=True)
class PacsTarget:
    """A DICOM peer: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> PacsTarget:
        m = re.fullmatch(r"([^@\\]{1,16})@(\[[0-9a-fA-F:.]+\]|[^:@\s]+):(\d{1,5})", text.strip())
        if not m or not 0 < int(m.group(3)) < 65536 or not m.group(1).strip():
            raise ConfigError(
                f"'{text}' is not a PACS address; use AE@HOST:PORT, e.g. PACS@10.0.0.5:104"
            )
        return cls(m.group(1).strip(), m.group(2).strip("[]"), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Item:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int


@dataclass
class Outcome:
    sop_instance_uid: str
    ok: bool = False
    #: the DICOM status (C-STORE) or HTTP status (STOW-RS) of the last attempt; -1 = none
    status: int = -1
    attempts: int = 0
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ C-STORE


def check_ae_title(title: str) -> str:
    if not 0 < len(title.strip()) <= 16 or not title.isascii() or "\\" in title:
        raise ConfigError(f"'{title}' is not an AE title: 1 to 16 ASCII characters")
    if not title.isprintable():
        raise ConfigError(f"'{title}' is not an AE title: printable characters only")
    return title.strip()


def cstore(
    items: list[Item],
    target: PacsTarget,
    calling_ae: str,
    *,
    retries: int = 3,
    backoff_s: float = 0.5,
    progress: Progress | None = None,
    timeout_s: float = 60.0,
) -> list[Outcome]:
    """Store ``items`` on ``target`` by C-STORE. Blocking: run it in a thread."""
    from pynetdicom import AE

    outcomes = {i.sop_instance_uid: Outcome(i.sop_instance_uid) for i in items}
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in items})
    groups = [pairs[n : n + MAX_CONTEXTS] for n in range(0, len(pairs), MAX_CONTEXTS)]
    done = [0, 0]

    def report(item: Item) -> None:
        done[0] += 1
        done[1] += item.size
        if progress is not None:
            progress(done[0], done[1])

    for group in groups:
        wanted = set(group)
        pending = [i for i in items if (i.sop_class_uid, i.transfer_syntax_uid) in wanted]
        for attempt in range(retries + 1):
            if not pending:
                break
            if attempt:
                time.sleep(backoff_s * 2 ** (attempt - 1))
            ae = AE(ae_title=calling_ae)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
            for sop_class, syntax in group:
                ae.add_requested_context(sop_class, syntax)
            assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
            if not assoc.is_established:
                why = "rejected the association" if assoc.is_rejected else "could not be reached"
                for item in pending:
                    o = outcomes[item.sop_instance_uid]
                    o.attempts += 1
                    o.message = f"{target} {why}"
                log.warning("export: %s %s (attempt %d)", target, why, attempt + 1)
                continue
            accepted = {
                (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            }
            retry: list[Item] = []
            try:
                for item in pending:
                    o = outcomes[item.sop_instance_uid]
                    if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                        o.attempts += 1
                        o.message = (
                            f"the PACS does not accept SOP class {item.sop_class_uid} in "
                            f"transfer syntax {item.transfer_syntax_uid}"
                        )
                        report(item)
                        continue
                    if not assoc.is_established:
                        retry.append(item)
                        continue
                    o.attempts += 1
                    rsp = assoc.send_c_store(item.path)
                    status = int(rsp.get("Status", -1)) if rsp else -1
                    o.status = status
                    if status in SUCCESS_OR_WARNING:
                        o.ok, o.message = True, "stored" if status == 0 else "stored with warning"
                        report(item)
                    else:
                        o.message = (
                            "no response (association lost)"
                            if status == -1
                            else f"refused with status 0x{status:04X}"
                        )
                        retry.append(item)
            finally:
                if assoc.is_established:
                    assoc.release()
            pending = retry
        for item in pending:  # gave up on these
            report(item)
    return [outcomes[i.sop_instance_uid] for i in items]


# ------------------------------------------------------------------------------ STOW-RS


async def stow(
    items: list[Item],
    base_url: str,
    http: aiohttp.ClientSession,
    *,
    retries: int = 3,
    backoff_s: float = 0.5,
    progress: Progress | None = None,
    batch_bytes: int = STOW_BATCH_BYTES,
) -> list[Outcome]:
    """Store ``items`` with STOW-RS at ``<base_url>/studies``, in batches."""
    import asyncio

    url = base_url.rstrip("/") + "/studies"
    outcomes = {i.sop_instance_uid: Outcome(i.sop_instance_uid) for i in items}
    done = [0, 0]
    for batch in _batches(items, batch_bytes):
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s * 2 ** (attempt - 1))
            for item in batch:
                outcomes[item.sop_instance_uid].attempts += 1
            try:
                status, body = await _post(http, url, batch)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                for item in batch:
                    outcomes[item.sop_instance_uid].message = (
                        f"the DICOMweb server could not be reached ({type(exc).__name__})"
                    )
                continue
            _apply(status, body, batch, outcomes)
            if status < 500:
                break
        for item in batch:
            done[0] += 1
            done[1] += item.size
        if progress is not None:
            progress(done[0], done[1])
    return [outcomes[i.sop_instance_uid] for i in items]


def _batches(items: list[Item], limit: int) -> list[list[Item]]:
    out: list[list[Item]] = []
    size = 0
    for item in items:
        if not out or size + item.size > limit:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.size
    return out


async def _post(http: aiohttp.ClientSession, url: str, batch: list[Item]) -> tuple[int, Any]:
    boundary = "p2pshare-" + secrets.token_hex(16)

    async def body() -> AsyncIterator[bytes]:
        for item in batch:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            with open(item.path, "rb") as fh:
                while block := fh.read(READ_SIZE):
                    yield block
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    async with http.post(
        url, data=body(), headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=300)
    ) as resp:
        raw = await resp.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return resp.status, parsed


def _sequence(body: Any, tag: str) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        return []
    element = body.get(tag)
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if isinstance(element, dict) and isinstance(element.get("Value"), list) and element["Value"]:
        return element["Value"][0]
    return None


def _apply(status: int, body: Any, batch: list[Item], outcomes: dict[str, Outcome]) -> None:
    """Per-instance outcome from a STOW-RS response (PS3.18 Table 10.5.3-1)."""
    stored = {_value(i, "00081155") for i in _sequence(body, "00081199")}
    failed = {_value(i, "00081155"): _value(i, "00081197") for i in _sequence(body, "00081198")}
    for item in batch:
        o = outcomes[item.sop_instance_uid]
        o.status = status
        if item.sop_instance_uid in failed:
            reason = failed[item.sop_instance_uid]
            o.ok = False
            o.message = f"refused with failure reason {reason}" if reason else "refused"
        elif item.sop_instance_uid in stored or (status == 200 and not failed and not stored):
            o.ok, o.message = True, "stored"
        else:
            o.ok = False
            o.message = f"not stored (HTTP {status})"
