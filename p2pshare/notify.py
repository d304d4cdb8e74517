"""The notifications outbox: messages the node owes to people outside it (the privacy contact).

A break-glass writes a notification into the ``notifications`` table in the same database as
the audit, so it is never lost even if delivery fails or the node stops. The node then delivers
each queued one by webhook (JSON POST to the configured URL), retrying with backoff; the outbox
row keeps the state (queued, sent, failed), attempts and the last error. A node without a webhook
keeps them queued for an operator or a mail relay to collect (``GET /api/v1/notifications``).

Payloads carry identifiers (offer id, Study Instance UID, clinician, reason, destination), never
the patient's name.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY,
    created INTEGER NOT NULL,
    kind TEXT NOT NULL,
    recipient TEXT,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try INTEGER NOT NULL,
    last_error TEXT,
    sent_at INTEGER
);
"""

MAX_ATTEMPTS = 8
WEBHOOK_TIMEOUT_S = 10.0


class Outbox:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def queue(self, kind: str, recipient: str | None, payload: dict[str, Any], now: int) -> int:
        cur = self.db.execute(
            "INSERT INTO notifications (created, kind, recipient, payload, state, next_try) "
            "VALUES (?, ?, ?, ?, 'queued', ?)",
            (now, kind, recipient, json.dumps(payload, sort_keys=True), now),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def entries(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM notifications ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]

    def due(self, now: int) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM notifications WHERE state = 'queued' AND next_try <= ? ORDER BY id",
            (now,),
        ).fetchall()

    def mark_sent(self, nid: int, now: int) -> None:
        self.db.execute(
            "UPDATE notifications SET state = 'sent', sent_at = ?, attempts = attempts + 1, "
            "last_error = NULL WHERE id = ?",
            (now, nid),
        )

    def mark_failed(self, nid: int, error: str, now: int) -> bool:
        """Record a failed try; True when it will not be tried again."""
        row = self.db.execute("SELECT attempts FROM notifications WHERE id = ?", (nid,)).fetchone()
        attempts = (row["attempts"] if row else 0) + 1
        final = attempts >= MAX_ATTEMPTS
        self.db.execute(
            "UPDATE notifications SET attempts = ?, last_error = ?, next_try = ?, state = ? "
            "WHERE id = ?",
            (attempts, error[:300], now + min(3600, 5 * 2**attempts), "failed" if final else
             "queued", nid),
        )
        return final


async def deliver(outbox: Outbox, webhook: str | None, now: int) -> list[tuple[int, str, str]]:
    """Try every due notification once; returns (id, kind, outcome) for each attempt."""
    if not webhook:
        return []
    results: list[tuple[int, str, str]] = []
    timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for row in outbox.due(now):
            body = {
                "id": row["id"],
                "kind": row["kind"],
                "recipient": row["recipient"],
                "created": row["created"],
                **json.loads(row["payload"]),
            }
            try:
                async with http.post(webhook, json=body) as resp:
                    if 200 <= resp.status < 300:
                        outbox.mark_sent(row["id"], now)
                        results.append((row["id"], row["kind"], "sent"))
                        continue
                    error = f"webhook answered HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"webhook unreachable ({type(exc).__name__})"
            final = outbox.mark_failed(row["id"], error, now)
            log.warning("notification %d not delivered: %s", row["id"], error)
            results.append((row["id"], row["kind"], "failed" if final else "retry"))
    return results
