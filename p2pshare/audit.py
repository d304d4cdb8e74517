"""Append-only, hash-chained, signed audit records.

Audit is not logging: every security-relevant action (offer created, pairing attempt, wrong
code, offer burnt, peer pinned or refused, transfer started/completed/failed, receipt signed,
consent, break-glass, staff sign-in, …) is appended as a row whose hash covers the previous
row's hash, so an edit, a deletion or a reordering breaks the chain at that row. Records hold
identifiers (offer id, UIDs, fingerprints, addresses, staff user names), never patient names and
never codes or secrets.

Theory of operation
-------------------
A hash chain alone cannot tell a log whose last records were deleted from a shorter log, and
anyone who can write the database can recompute SHA-256. So a node that knows its identity key
also *seals* the chain with it (Ed25519):

* every record it appends gets a signature over ``(seq, hash)`` in ``audit_seal``;
* the chain's **head** — the last record's ``(seq, hash)``, signed under another label — is kept
  in ``meta`` under ``audit_head`` and moved in the same transaction as each append;
* the first signed append to a chain writes an ``audit-sealed`` record: from there on every
  record must carry a valid signature and the head must exist, so deleting the head (or the
  signatures) is itself detected, while a database written before sealing still verifies.

``verify`` walks the chain from record 1 and names the first record that is missing, out of
place, altered, unsigned or signed wrongly, or the record after the head when the log was cut
short. A writer that finds the head not matching the log before it appends (someone truncated
the log and removed the head) does not quietly cover that up: it appends an
``audit-chain-broken`` record first, and ``verify`` reports that record from then on.

What sealing cannot detect: someone holding the node's identity key, a wipe of the whole table,
or a restore of an entire older copy of the database; exports held elsewhere are the answer.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pshare import crypto
from p2pshare.errors import ConfigError, CryptoError

GENESIS = "0" * 64

#: The action that starts the signed part of a chain, and the one that records found tampering.
SEALED = "audit-sealed"
CHAIN_BROKEN = "audit-chain-broken"
HEAD_KEY = "audit_head"

_RECORD_LABEL = b"p2pshare audit record v1\0"
_HEAD_LABEL = b"p2pshare audit head v1\0"

#: Detail keys whose values never belong in the audit (defence in depth: callers pass ids only).
WITHHELD_KEYS = frozenset(
    {
        "patient_name",
        "patient_birth_date",
        "birth_date",
        "dob",
        "spoken_code",
        "secret",
        "qr_secret",
        "password",
        "pin",
        "token",
    }
)
WITHHELD = "[withheld]"

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_seal (seq INTEGER PRIMARY KEY, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

ALTERED = "the record was altered"
BROKEN = "the chain link to the previous record is broken"
MISSING = "a record is missing"
UNSIGNED = "the record is not signed by this node"
BAD_SIGNATURE = "the record's signature does not verify"
HEAD_MISSING = "the signed chain head is missing: records from here on may have been deleted"
HEAD_FORGED = "the signed chain head does not verify: it was altered"


def record_hash(prev_hash: str, seq: int, at: int, action: str, outcome: str, detail: str) -> str:
    payload = json.dumps([prev_hash, seq, at, action, outcome, detail], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _decode(detail: str) -> Any:
    """A record's detail; text that is not JSON (someone edited it) is shown as it is."""
    try:
        return json.loads(detail)
    except ValueError:
        return {"unreadable": detail}


def _signed(label: bytes, seq: int, digest: str) -> bytes:
    return label + f"{seq}:{digest}".encode("ascii")


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open a node's database for reading only; works while the node is running (WAL).

    Raises:
        ConfigError: there is no database at ``path`` or it cannot be opened.
    """
    if not path.is_file():
        raise ConfigError(f"there is no node database at {path}; give the node's --data-dir")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read the node database {path} ({exc})") from exc
    return db


@dataclass(frozen=True)
class ChainReport:
    """What ``verify`` found. ``records`` counts the records examined (up to the bad one)."""

    ok: bool
    records: int
    first_bad: int | None = None
    reason: str = ""
    #: True when the chain is signed (so a deletion at its end would be detected too).
    sealed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad": self.first_bad,
            "reason": self.reason,
            "sealed": self.sealed,
        }


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str
    signature: bytes


class AuditLog:
    """Appends to and verifies the ``audit`` table of a node's database.

    Args:
        db: the node's database connection.
        identity_path: the node's identity key; appends are signed with it once it exists, and
            ``verify`` checks signatures against it.
        identity: the identity itself (instead of a path), e.g. in tests.
        create: create the tables (False for a read-only connection).
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        identity_path: Path | None = None,
        *,
        identity: crypto.Identity | None = None,
        create: bool = True,
    ) -> None:
        self._db = db
        self._identity_path = identity_path
        self._identity = identity
        if create:
            db.executescript(SCHEMA)

    # -- keys ---------------------------------------------------------------------------------

    def _signer(self) -> crypto.Identity | None:
        """The node identity to sign with, once the node has one (it creates it on start)."""
        path = self._identity_path
        if self._identity is None and path is not None and path.exists():
            self._identity = crypto.Identity.load_or_create(path)
        return self._identity

    def _public_key(self) -> bytes:
        identity = self._signer()
        if identity is None:
            where = self._identity_path or "the node's identity key"
            raise ConfigError(
                f"cannot check the audit chain's signatures: {where} is missing; "
                "give the node's --data-dir"
            )
        return identity.public_key

    # -- appending ----------------------------------------------------------------------------

    def append(self, at: int, action: str, outcome: str = "ok", **detail: Any) -> int:
        """Append one record (signed when the node has an identity); returns its seq."""
        identity = self._signer()
        own = not self._db.in_transaction
        if own:
            self._db.execute("BEGIN IMMEDIATE")
        try:
            if identity is not None:
                self._check_before_append(at, identity)
            seq = self._insert(at, action, outcome, detail, identity)
            if own:
                self._db.execute("COMMIT")
        except BaseException:
            if own:
                self._db.execute("ROLLBACK")
            raise
        return seq

    def _check_before_append(self, at: int, identity: crypto.Identity) -> None:
        """Start the signed part of the chain, or record that its end was tampered with."""
        last_seq, last_hash = self._last()
        head = self._head()
        if head is None and not self._is_sealed():
            self._insert(at, SEALED, "ok", {"key": identity.fingerprint}, identity)
            return
        problem = ""
        if head is None:
            problem = "the signed chain head was missing"
        elif not self._head_signature_ok(head, identity.public_key):
            problem = "the signed chain head did not verify"
        elif (head.seq, head.hash) != (last_seq, last_hash):
            problem = f"the signed chain head names record {head.seq}, the log ends at {last_seq}"
        if problem:
            self._insert(
                at,
                CHAIN_BROKEN,
                "integrity",
                {"found": problem, "log_ended_at": last_seq, "head": head.seq if head else None},
                identity,
            )

    def _insert(
        self,
        at: int,
        action: str,
        outcome: str,
        detail: dict[str, Any],
        identity: crypto.Identity | None,
    ) -> int:
        seq, prev = self._last()
        seq += 1
        clean = {k: (WITHHELD if k.lower() in WITHHELD_KEYS else v) for k, v in detail.items()}
        text = json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str)
        digest = record_hash(prev, seq, at, action, outcome, text)
        self._db.execute(
            "INSERT INTO audit (seq, at, action, outcome, detail, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, at, action, outcome, text, prev, digest),
        )
        if identity is not None:
            sig = identity.sign(_signed(_RECORD_LABEL, seq, digest))
            self._db.execute(
                "INSERT OR REPLACE INTO audit_seal (seq, signature) VALUES (?, ?)",
                (seq, sig.hex()),
            )
            head = {
                "seq": seq,
                "hash": digest,
                "signature": identity.sign(_signed(_HEAD_LABEL, seq, digest)).hex(),
            }
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (HEAD_KEY, json.dumps(head, sort_keys=True)),
            )
        return seq

    # -- reading ------------------------------------------------------------------------------

    def _has_table(self, name: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    def _last(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def _is_sealed(self) -> bool:
        if self._db.execute("SELECT 1 FROM audit WHERE action = ? LIMIT 1", (SEALED,)).fetchone():
            return True
        if not self._has_table("audit_seal"):
            return False
        return self._db.execute("SELECT 1 FROM audit_seal LIMIT 1").fetchone() is not None

    def _head(self) -> _Head | None:
        if not self._has_table("meta"):
            return None
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (HEAD_KEY,)).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
            return _Head(int(value["seq"]), str(value["hash"]), bytes.fromhex(value["signature"]))
        except (ValueError, KeyError, TypeError):
            return _Head(-1, "", b"")

    def _seals(self) -> dict[int, str]:
        if not self._has_table("audit_seal"):
            return {}
        return {int(s): str(sig) for s, sig in self._db.execute("SELECT * FROM audit_seal")}

    @staticmethod
    def _head_signature_ok(head: _Head, public_key: bytes) -> bool:
        try:
            crypto.verify_signature(
                public_key, _signed(_HEAD_LABEL, head.seq, head.hash), head.signature
            )
        except CryptoError:
            return False
        return True

    def records(
        self,
        action: str | None = None,
        *,
        since: int | None = None,
        until: int | None = None,
        refs: tuple[str, ...] = (),
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Records in order, detail decoded; optionally of one action, in a time window
        (``since <= at < until``), or naming one of ``refs`` as offer, job or transfer; with
        ``limit``, only the latest ``limit`` of those (still oldest first)."""
        query = "SELECT seq, at, action, outcome, detail FROM audit WHERE 1"
        args: list[Any] = []
        if action:
            query += " AND action = ?"
            args.append(action)
        if since is not None:
            query += " AND at >= ?"
            args.append(since)
        if until is not None:
            query += " AND at < ?"
            args.append(until)
        if refs:
            marks = ", ".join("?" * len(refs))
            query += " AND json_valid(detail) AND ("
            query += " OR ".join(
                f"json_extract(detail, '$.{key}') IN ({marks})" for key in ("offer", "job", "transfer")
            )
            query += ")"
            args.extend([*refs, *refs, *refs])
        if limit is not None:
            query += " ORDER BY seq DESC LIMIT ?"
            args.append(limit)
            rows = self._db.execute(query, args).fetchall()[::-1]
        else:
            rows = self._db.execute(query + " ORDER BY seq", args).fetchall()
        return [
            {"seq": s, "at": at, "action": a, "outcome": o, "detail": _decode(d)}
            for s, at, a, o, d in rows
        ]

    # -- verifying ----------------------------------------------------------------------------

    def verify(self) -> ChainReport:
        """Walk the chain; the first record that does not hold is named with a plain reason.

        Raises:
            ConfigError: the chain is signed but the node's identity key is not available.
        """
        seals = self._seals()
        sealed = self._is_sealed()
        public_key = self._public_key() if sealed else b""
        prev, expected_seq, count, signed_from = GENESIS, 1, 0, 0

        def bad(seq: int, reason: str) -> ChainReport:
            return ChainReport(False, count, seq, reason, sealed)

        for seq, at, action, outcome, detail, prev_hash, digest in self._db.execute(
            "SELECT seq, at, action, outcome, detail, prev_hash, hash FROM audit ORDER BY seq"
        ):
            count += 1
            if seq != expected_seq:
                return bad(expected_seq, MISSING)
            if prev_hash != prev:
                return bad(seq, BROKEN)
            if record_hash(prev, seq, at, action, outcome, detail) != digest:
                return bad(seq, ALTERED)
            if action == SEALED and not signed_from:
                signed_from = seq
            if signed_from:
                sig = seals.get(seq)
                if sig is None:
                    return bad(seq, UNSIGNED)
                try:
                    crypto.verify_signature(
                        public_key, _signed(_RECORD_LABEL, seq, digest), bytes.fromhex(sig)
                    )
                except (CryptoError, ValueError):
                    return bad(seq, BAD_SIGNATURE)
            if action == CHAIN_BROKEN:
                found = _decode(detail).get("found", "") if detail.startswith("{") else ""
                return bad(seq, f"the node found the log tampered with before this record ({found})")
            prev, expected_seq = digest, seq + 1
        last = expected_seq - 1
        if sealed:
            if not signed_from:  # signatures exist but the records they sign are gone
                return bad(min(seals) if seals else last + 1, MISSING)
            head = self._head()
            if head is None:
                return bad(last + 1, HEAD_MISSING)
            if not self._head_signature_ok(head, public_key):
                return bad(last + 1, HEAD_FORGED)
            if head.seq > last:
                return bad(last + 1, f"{MISSING} (the signed head says the log runs to {head.seq})")
            if head.seq < last:
                return bad(head.seq + 1, "the record is not covered by the signed chain head")
            if head.hash != prev:
                return bad(last, "the record does not match the signed chain head")
        return ChainReport(True, count, sealed=sealed)
