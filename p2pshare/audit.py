"""Append-only, hash-chained audit records.

Audit is not logging: every security-relevant action (offer created, pairing attempt, wrong
code, offer burnt, peer pinned or refused, transfer started/completed/failed, receipt signed)
is appended as a row whose hash covers the previous row's hash, so an edit, a deletion or a
reordering breaks the chain at that row. Records hold identifiers (offer id, UIDs,
fingerprints, addresses), never patient names and never codes or secrets.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64

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
"""


def record_hash(prev_hash: str, seq: int, at: int, action: str, outcome: str, detail: str) -> str:
    payload = json.dumps([prev_hash, seq, at, action, outcome, detail], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    records: int
    first_bad: int | None = None
    reason: str = ""


class AuditLog:
    """Appends to and verifies the ``audit`` table of a node's database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.executescript(SCHEMA)

    def append(self, at: int, action: str, outcome: str = "ok", **detail: Any) -> int:
        row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        digest = record_hash(prev, seq, at, action, outcome, text)
        with self._db:
            self._db.execute(
                "INSERT INTO audit (seq, at, action, outcome, detail, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, at, action, outcome, text, prev, digest),
            )
        return seq

    def records(self, action: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT seq, at, action, outcome, detail FROM audit"
        args: tuple[Any, ...] = ()
        if action:
            query += " WHERE action = ?"
            args = (action,)
        return [
            {"seq": s, "at": at, "action": a, "outcome": o, "detail": json.loads(d)}
            for s, at, a, o, d in self._db.execute(query + " ORDER BY seq", args)
        ]

    def verify(self) -> ChainReport:
        prev, expected_seq, count = GENESIS, 1, 0
        for seq, at, action, outcome, detail, prev_hash, digest in self._db.execute(
            "SELECT seq, at, action, outcome, detail, prev_hash, hash FROM audit ORDER BY seq"
        ):
            count += 1
            if seq != expected_seq:
                return ChainReport(False, count, expected_seq, "a record is missing")
            if prev_hash != prev:
                return ChainReport(
                    False, count, seq, "the chain link to the previous record is broken"
                )
            if record_hash(prev, seq, at, action, outcome, detail) != digest:
                return ChainReport(False, count, seq, "the record was altered")
            prev, expected_seq = digest, seq + 1
        return ChainReport(True, count)
