"""``p2pshare audit verify`` and ``p2pshare audit export``: the privacy officer's commands.

Both read the node's database read-only, so they work while the node is running, and neither
needs the node's API. ``verify`` exits 0 when the chain holds and 1 naming the first broken
record; ``export`` writes FHIR AuditEvent JSON or DICOM audit message XML (to a file only once
it is complete).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pshare import audit_export, crypto
from p2pshare.audit import AuditLog, open_readonly
from p2pshare.config import default_data_dir
from p2pshare.errors import ConfigError

if TYPE_CHECKING:
    from p2pshare.cli import Output

EXIT_OK, EXIT_FAILED = 0, 1


def register(sub: Any) -> None:
    """Add ``audit verify`` and ``audit export`` to the CLI's subparsers."""
    p = sub.add_parser("audit", help="verify the tamper-evident audit log or export it")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)

    v = audit_sub.add_parser("verify", help="prove the audit chain, or name its first bad record")
    v.add_argument("--data-dir", default=str(default_data_dir()), help="the node's data directory")
    v.add_argument("--json", action="store_true", help="print the result as one JSON object")
    v.set_defaults(func=cmd_verify)

    e = audit_sub.add_parser("export", help="write the audit as FHIR AuditEvent or DICOM XML")
    e.add_argument("--format", required=True, choices=["fhir", "dicom"])
    e.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    e.add_argument("--since", metavar="WHEN", help="records at or after: epoch seconds or ISO date")
    e.add_argument("--until", metavar="WHEN", help="records before: epoch seconds or ISO date")
    e.add_argument("--data-dir", default=str(default_data_dir()), help="the node's data directory")
    e.set_defaults(func=cmd_export, json=False)


def parse_when(text: str, option: str) -> int:
    """Epoch seconds, or an ISO 8601 date/time (local time unless it names a zone)."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise ConfigError(
            f"{option} '{text}' is not a time; give epoch seconds or a date like 2026-12-04 "
            "or 2026-12-04T08:30"
        ) from None


def _log(data_dir: Path) -> tuple[AuditLog, Any]:
    db = open_readonly(data_dir / "node.sqlite3")
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit'").fetchone():
            raise ConfigError(f"the node database in {data_dir} has no audit log yet")
    except BaseException:
        db.close()
        raise
    return AuditLog(db, data_dir / "identity.key", create=False), db


def source_of(data_dir: Path) -> audit_export.Source:
    """This node as the audit's observer: its remembered name and its key fingerprint."""
    name_path, key_path = data_dir / "name", data_dir / "identity.key"
    name = name_path.read_text().strip() if name_path.is_file() else socket.gethostname()
    fingerprint = "unknown"
    if key_path.is_file():
        fingerprint = crypto.Identity.load_or_create(key_path).fingerprint
    return audit_export.Source(name or socket.gethostname(), fingerprint)


async def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    data_dir = Path(args.data_dir).expanduser()
    log, db = _log(data_dir)
    try:
        report = log.verify()
    finally:
        db.close()
    out.json({"type": "audit-verify"} | report.as_dict())
    if not report.ok:
        if not out.as_json:
            print(f"audit chain broken at record {report.first_bad}: {report.reason}", file=sys.stderr)
        return EXIT_FAILED
    if report.sealed:
        out.say(f"audit chain holds: {report.records} records, signed by this node's key")
    else:
        out.say(
            f"audit chain holds: {report.records} records (not signed yet: a node of this "
            "version signs it on its next start; until then deleting the last records would "
            "not be detected)"
        )
    return EXIT_OK


async def cmd_export(args: argparse.Namespace, out: Output) -> int:
    data_dir = Path(args.data_dir).expanduser()
    since = parse_when(args.since, "--since") if args.since else None
    until = parse_when(args.until, "--until") if args.until else None
    log, db = _log(data_dir)
    try:
        records = log.records(since=since, until=until)
    finally:
        db.close()
    source = source_of(data_dir)
    if args.format == "fhir":
        body = audit_export.fhir_json(records, source)
    else:
        body = audit_export.dicom_audit_xml(records, source)
    if not args.out:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
        return EXIT_OK
    _write_whole(Path(args.out).expanduser(), body)
    print(f"wrote {len(records)} audit records as {args.format} to {args.out}", file=sys.stderr)
    return EXIT_OK


def _write_whole(path: Path, body: bytes) -> None:
    """Write to a private temporary file beside ``path``, then rename: never a partial file."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"the folder {folder} does not exist; create it or choose another --out")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise ConfigError(f"cannot write in {folder} ({exc.strerror}); choose another --out") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write {path} ({exc.strerror}); choose another --out") from exc
