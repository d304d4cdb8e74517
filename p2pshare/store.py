"""A node's state in SQLite: offers, receiving transfers, pinned peers, receipts, audit.

SQLite is the embedded default so that nothing else has to run for a node to work. The database
file and the data directory are private to the node's user (0600 / 0700): a waiting offer holds
its code, so that a node restarted while waiting still honours it, and forgets it the moment it
is claimed, expires, is burnt or cancelled.

All methods are short, synchronous statements called from the event loop thread; nothing here
runs long enough to matter (no per-chunk writes).
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pshare import crypto
from p2pshare.audit import AuditLog
from p2pshare.consent import ConsentBook
from p2pshare.errors import PeerKeyChanged
from p2pshare.manifest import Manifest
from p2pshare.notify import Outbox

MAX_FAILED_ATTEMPTS = 3

SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS offers (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    spoken_code TEXT NOT NULL,
    qr_secret BLOB NOT NULL,
    study_uid TEXT NOT NULL,
    manifest BLOB NOT NULL,
    sources TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    state TEXT NOT NULL,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    peer_name TEXT,
    peer_fingerprint TEXT,
    transfer_id TEXT,
    receipt TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS offers_number ON offers (number, state);
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY,
    created INTEGER NOT NULL,
    state TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    peer_name TEXT,
    peer_fingerprint TEXT,
    transfer_id TEXT,
    manifest BLOB,
    verified INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    error TEXT,
    finished INTEGER
);
CREATE TABLE IF NOT EXISTS peers (
    name TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    last_address TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: Offer states. ACTIVE offers accept pairing; every other state is final except PAIRED/SENDING.
ACTIVE, PAIRED, SENDING, COMPLETED = "active", "paired", "sending", "completed"
EXPIRED, BURNT, CANCELLED, FAILED = "expired", "burnt", "cancelled", "failed"
#: the patient declined (or the consent link died under policy 'patient'): final
DECLINED = "declined"
#: the connection was lost mid-transfer; the receiver may reconnect with its resume ticket
INTERRUPTED = "interrupted"

_RESUME_COLUMNS = (
    ("offers", "resume_id", "TEXT"),
    ("offers", "resume_secret", "BLOB"),
    ("offers", "resume_expires", "INTEGER"),
    # the ticket before the last reconnection, until the receiver is known to hold the new one
    ("offers", "resume_prev_id", "TEXT"),
    ("offers", "resume_prev_secret", "BLOB"),
    ("transfers", "resume_id", "TEXT"),
    ("transfers", "resume_secret", "BLOB"),
    ("transfers", "resume_expires", "INTEGER"),
    ("transfers", "offer_id", "TEXT"),
    ("transfers", "sender_address", "TEXT"),
    ("transfers", "staging", "TEXT"),
)
_LIVE = (ACTIVE,)


@dataclass(frozen=True)
class Offer:
    id: str
    number: int
    spoken_code: str
    qr_secret: bytes
    study_uid: str
    manifest: Manifest
    sources: list[dict[str, Any]]
    created: int
    expires: int
    state: str
    failed_attempts: int
    peer_name: str | None
    peer_fingerprint: str | None
    receipt: dict[str, Any] | None
    error: str | None

    @property
    def tries_left(self) -> int:
        return max(0, MAX_FAILED_ATTEMPTS - self.failed_attempts)


def _offer(row: sqlite3.Row) -> Offer:
    return Offer(
        id=row["id"],
        number=row["number"],
        spoken_code=row["spoken_code"],
        qr_secret=row["qr_secret"],
        study_uid=row["study_uid"],
        manifest=Manifest.from_bytes(row["manifest"], stored=True),
        sources=json.loads(row["sources"]),
        created=row["created"],
        expires=row["expires"],
        state=row["state"],
        failed_attempts=row["failed_attempts"],
        peer_name=row["peer_name"],
        peer_fingerprint=row["peer_fingerprint"],
        receipt=json.loads(row["receipt"]) if row["receipt"] else None,
        error=row["error"],
    )


class Store:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        path = data_dir / "node.sqlite3"
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 5000")
        self.db.executescript(SCHEMA)
        # The audit chain is signed with the node's identity key (see p2pshare/audit.py).
        self.audit = AuditLog(self.db, data_dir / "identity.key")
        self.consents = ConsentBook(self.db)
        self.notifications = Outbox(self.db)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(transfers)")}
        if "consent" not in cols:  # databases from before consent records
            self.db.execute("ALTER TABLE transfers ADD COLUMN consent TEXT")
        if "path" not in cols:  # which path a transfer used: direct | lan | relay
            self.db.execute("ALTER TABLE transfers ADD COLUMN path TEXT")
        # Resume (both sides keep a ticket derived from the last connection's session key).
        for table, col, kind in _RESUME_COLUMNS:
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if col not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {kind}")

    def close(self) -> None:
        self.db.close()

    # -- offers -----------------------------------------------------------------------------

    def free_offer_number(self, now: int) -> int:
        """The smallest number no live offer uses: short codes stay short."""
        self.expire_offers(now)
        used = {r[0] for r in self.db.execute("SELECT number FROM offers WHERE state = ?", _LIVE)}
        n = 1
        while n in used:
            n += 1
        return n

    def add_offer(
        self,
        *,
        offer_id: str,
        number: int,
        spoken_code: str,
        qr_secret: bytes,
        manifest: Manifest,
        sources: list[dict[str, Any]],
        created: int,
        expires: int,
    ) -> None:
        self.db.execute(
            "INSERT INTO offers (id, number, spoken_code, qr_secret, study_uid, manifest, "
            "sources, created, expires, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                offer_id,
                number,
                spoken_code,
                qr_secret,
                manifest.study_instance_uid,
                manifest.to_bytes(),
                json.dumps(sources),
                created,
                expires,
                ACTIVE,
            ),
        )

    def get_offer(self, offer_id: str) -> Offer | None:
        row = self.db.execute("SELECT * FROM offers WHERE id = ?", (offer_id,)).fetchone()
        return _offer(row) if row else None

    def find_offer(self, ref: str, spoken: bool) -> Offer | None:
        """The offer a receiver names: by id (QR) or by number among live ones (spoken).

        For a spoken number the most recent offer with that number is returned even when it is
        no longer live, so that the receiver hears "expired" or "used" rather than "unknown".
        """
        if not spoken:
            return self.get_offer(ref)
        if not (ref.isascii() and ref.isdigit() and len(ref) <= 7):
            return None
        row = self.db.execute(
            "SELECT * FROM offers WHERE number = ? ORDER BY (state = 'active') DESC, created DESC "
            "LIMIT 1",
            (int(ref),),
        ).fetchone()
        return _offer(row) if row else None

    def live_offers(self) -> list[tuple[str, int]]:
        """(id, expiry) of every offer still waiting for its receiver, without parsing manifests."""
        rows = self.db.execute("SELECT id, expires FROM offers WHERE state = ?", _LIVE)
        return [(r[0], r[1]) for r in rows]

    def list_offers(self, limit: int = 100) -> list[Offer]:
        rows = self.db.execute("SELECT * FROM offers ORDER BY created DESC LIMIT ?", (limit,))
        return [_offer(r) for r in rows]

    def set_offer_state(self, offer_id: str, state: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in ["state", *fields])
        values = [state, *(json.dumps(v) if isinstance(v, dict) else v for v in fields.values())]
        self.db.execute(f"UPDATE offers SET {cols} WHERE id = ?", (*values, offer_id))
        self._forget_code(offer_id)

    def _forget_code(self, offer_id: str) -> None:
        """An offer that can no longer be paired with keeps no code or secret at rest."""
        self.db.execute(
            "UPDATE offers SET spoken_code = '', qr_secret = x'' WHERE id = ? AND state != ?",
            (offer_id, ACTIVE),
        )

    def claim_offer(self, offer_id: str, now: int) -> bool:
        """Atomically move a live, unexpired offer to PAIRED. False if someone else was first."""
        cur = self.db.execute(
            "UPDATE offers SET state = ? WHERE id = ? AND state = ? AND expires > ?",
            (PAIRED, offer_id, ACTIVE, now),
        )
        self._forget_code(offer_id)
        return cur.rowcount == 1

    # -- resume ----------------------------------------------------------------------------------

    def set_resume(
        self, table: str, key: str, ticket: str, secret: bytes, expires: int, **fields: Any
    ) -> None:
        """Keep the resume ticket of an offer (sender) or a transfer job (receiver)."""
        assert table in ("offers", "transfers")
        cols = ["resume_id", "resume_secret", "resume_expires", *fields]
        sets = ", ".join(f"{c} = ?" for c in cols)
        self.db.execute(
            f"UPDATE {table} SET {sets} WHERE id = ?",
            (ticket, secret, expires, *fields.values(), key),
        )

    def resume_secret(self, table: str, key: str, now: int) -> tuple[str, bytes] | None:
        """(ticket id, secret) while unexpired."""
        assert table in ("offers", "transfers")
        row = self.db.execute(
            f"SELECT resume_id, resume_secret, resume_expires FROM {table} WHERE id = ?", (key,)
        ).fetchone()
        if (
            row is None
            or not row["resume_id"]
            or row["resume_secret"] is None
            or (row["resume_expires"] or 0) <= now
        ):
            return None
        return row["resume_id"], bytes(row["resume_secret"])

    def roll_offer_ticket(self, offer_id: str, ticket: str, secret: bytes, expires: int) -> None:
        """A new connection paired: its ticket becomes current, and the one before stays valid
        until the receiver shows it holds the new one (it may not have it yet, if the new
        connection is cut during the handshake)."""
        with self.db:
            self.db.execute(
                "UPDATE offers SET resume_prev_id = resume_id, resume_prev_secret = "
                "resume_secret WHERE id = ? AND resume_id IS NOT NULL AND resume_id != ''",
                (offer_id,),
            )
            self.set_resume("offers", offer_id, ticket, secret, expires)

    def settle_offer_ticket(self, offer_id: str) -> None:
        """The receiver holds the current ticket: forget the previous one."""
        self.db.execute(
            "UPDATE offers SET resume_prev_id = NULL, resume_prev_secret = NULL WHERE id = ?",
            (offer_id,),
        )

    def find_resumable_offer(self, ticket: str, now: int) -> tuple[Offer, bytes] | None:
        """The offer an unexpired ticket (current or previous) names, and that ticket's secret."""
        row = self.db.execute(
            "SELECT * FROM offers WHERE (resume_id = ? OR resume_prev_id = ?) AND "
            "resume_expires > ? AND state IN (?, ?, ?)",
            (ticket, ticket, now, PAIRED, SENDING, INTERRUPTED),
        ).fetchone()
        if row is None or not ticket:
            return None
        secret = row["resume_secret"] if row["resume_id"] == ticket else row["resume_prev_secret"]
        return _offer(row), bytes(secret)

    def offer_tickets(self, offer_id: str, now: int) -> list[tuple[str, bytes]]:
        """Every ticket an interrupted offer can be resumed with (current first)."""
        row = self.db.execute(
            "SELECT resume_id, resume_secret, resume_prev_id, resume_prev_secret, "
            "resume_expires FROM offers WHERE id = ?",
            (offer_id,),
        ).fetchone()
        if row is None or not row["resume_id"] or (row["resume_expires"] or 0) <= now:
            return []
        out = [(row["resume_id"], bytes(row["resume_secret"]))]
        if row["resume_prev_id"]:
            out.append((row["resume_prev_id"], bytes(row["resume_prev_secret"])))
        return out

    def claim_resume(self, offer_id: str) -> bool:
        """Atomically take an interrupted (or not yet noticed as lost) transfer back."""
        cur = self.db.execute(
            "UPDATE offers SET state = ? WHERE id = ? AND state IN (?, ?, ?)",
            (PAIRED, offer_id, PAIRED, SENDING, INTERRUPTED),
        )
        return cur.rowcount == 1

    def interrupted_on_start(self, now: int) -> list[str]:
        """After a restart: transfers that were running are interrupted (or failed if their
        ticket expired); returns the offer ids that can still be resumed."""
        with self.db:
            self.db.execute(
                "UPDATE offers SET state = ?, error = ? WHERE state IN (?, ?) AND "
                "(resume_expires IS NULL OR resume_expires <= ?)",
                (FAILED, "the sending node stopped during the transfer", PAIRED, SENDING, now),
            )
            self.db.execute(
                "UPDATE offers SET state = ? WHERE state IN (?, ?)",
                (INTERRUPTED, PAIRED, SENDING),
            )
        return [
            r["id"]
            for r in self.db.execute(
                "SELECT id FROM offers WHERE state = ? AND resume_expires > ?",
                (INTERRUPTED, now),
            )
        ]

    def receives_on_start(self, now: int) -> list[str]:
        """After a restart: receives that were running are interrupted while their ticket is
        valid, else failed; returns the staging folders to delete (nothing will resume them)."""
        self.db.execute(
            "UPDATE transfers SET state = 'interrupted' WHERE state IN ('paired', 'receiving') "
            "AND resume_expires > ?",
            (now,),
        )
        return self.expire_receives(now, ("paired", "receiving", "interrupted", "connecting"))

    def expire_receives(
        self, now: int, states: tuple[str, ...] = ("interrupted",)
    ) -> list[str]:
        """Receives that can no longer resume are failed; returns their staging folders."""
        marks = ", ".join("?" for _ in states)
        rows = self.db.execute(
            f"SELECT id, staging FROM transfers WHERE state IN ({marks}) AND "
            f"(resume_expires IS NULL OR resume_expires <= ?)",
            (*states, now),
        ).fetchall()
        for row in rows:
            self.db.execute(
                "UPDATE transfers SET state = 'failed', error = ?, finished = ?, "
                "resume_id = NULL, resume_secret = NULL WHERE id = ?",
                ("the interrupted transfer was not resumed in time", now, row["id"]),
            )
        return [row["staging"] for row in rows if row["staging"]]

    def expire_resumes(self, now: int) -> list[str]:
        ids = [
            r["id"]
            for r in self.db.execute(
                "SELECT id FROM offers WHERE state = ? AND resume_expires <= ?",
                (INTERRUPTED, now),
            )
        ]
        for offer_id in ids:
            self.set_offer_state(
                offer_id, FAILED, error="the transfer was not resumed in time (ticket expired)"
            )
        return ids

    def record_failed_attempt(self, offer_id: str) -> int | None:
        """Count a wrong code against a live offer; burn it at the limit. Returns tries left.

        Returns None, counting nothing, when the offer is no longer live (another receiver has
        claimed it, or it ended): a late wrong code must not burn a transfer under way.
        """
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(
                "UPDATE offers SET failed_attempts = failed_attempts + 1 WHERE id = ? AND state = ?",
                (offer_id, ACTIVE),
            )
            if cur.rowcount != 1:
                return None
            row = self.db.execute(
                "SELECT failed_attempts FROM offers WHERE id = ?", (offer_id,)
            ).fetchone()
            left = max(0, MAX_FAILED_ATTEMPTS - int(row[0]))
            if left == 0:
                self.db.execute("UPDATE offers SET state = ? WHERE id = ?", (BURNT, offer_id))
                self._forget_code(offer_id)
        return left

    def expire_offers(self, now: int) -> list[str]:
        rows = self.db.execute(
            "SELECT id FROM offers WHERE state = ? AND expires <= ?", (ACTIVE, now)
        ).fetchall()
        ids = [r[0] for r in rows]
        for offer_id in ids:
            self.set_offer_state(offer_id, EXPIRED)
        return ids

    # -- receiving transfers ------------------------------------------------------------------

    def add_transfer(self, transfer_job: str, created: int, out_dir: str) -> None:
        self.db.execute(
            "INSERT INTO transfers (id, created, state, out_dir) VALUES (?, ?, ?, ?)",
            (transfer_job, created, "connecting", out_dir),
        )

    def update_transfer(self, transfer_job: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v) if isinstance(v, dict) else v for v in fields.values()]
        self.db.execute(f"UPDATE transfers SET {cols} WHERE id = ?", (*values, transfer_job))

    def get_transfer(self, transfer_job: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM transfers WHERE id = ?", (transfer_job,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d.pop("manifest", None)
        d.pop("resume_secret", None)  # a credential: never shown
        d["receipt"] = json.loads(d["receipt"]) if d["receipt"] else None
        d["consent"] = json.loads(d["consent"]) if d.get("consent") else None
        return d

    def get_transfer_manifest(self, transfer_job: str) -> Manifest | None:
        """The signed manifest a receiving transfer accepted (None before the manifest came)."""
        row = self.db.execute(
            "SELECT manifest FROM transfers WHERE id = ?", (transfer_job,)
        ).fetchone()
        return Manifest.from_bytes(row[0], stored=True) if row is not None and row[0] else None

    def list_transfers(self, limit: int = 100) -> list[dict[str, Any]]:
        """Received transfers, newest first, with their study summary (for the staff web app)."""
        rows = self.db.execute("SELECT id FROM transfers ORDER BY created DESC LIMIT ?", (limit,))
        out: list[dict[str, Any]] = []
        for (job,) in rows.fetchall():
            row = self.db.execute("SELECT manifest FROM transfers WHERE id = ?", (job,)).fetchone()
            d = self.get_transfer(job)
            assert d is not None
            d["study"] = Manifest.from_bytes(row[0], stored=True).summary() if row[0] else None
            out.append(d)
        return out

    # -- peers (trust on first use) -------------------------------------------------------------

    def check_pin(self, name: str, public_key: bytes, now: int, address: str = "") -> bool:
        """Pin a new institution, or confirm a known one. Returns True on first contact.

        Raises:
            PeerKeyChanged: the name is pinned to another key.
        """
        row = self.db.execute("SELECT public_key FROM peers WHERE name = ?", (name,)).fetchone()
        fp = crypto.fingerprint(public_key)
        if row is None:
            self.db.execute(
                "INSERT INTO peers (name, public_key, fingerprint, first_seen, last_seen, "
                "last_address) VALUES (?, ?, ?, ?, ?, ?)",
                (name, public_key, fp, now, now, address),
            )
            return True
        if not crypto.equal(bytes(row[0]), public_key):
            raise PeerKeyChanged(name, crypto.fingerprint(bytes(row[0])), fp)
        self.db.execute(
            "UPDATE peers SET last_seen = ?, last_address = ? WHERE name = ?", (now, address, name)
        )
        return False

    def list_peers(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT name, fingerprint, first_seen, last_seen, last_address FROM peers ORDER BY name"
        )
        return [dict(r) for r in rows]

    def forget_peer(self, name: str) -> bool:
        return self.db.execute("DELETE FROM peers WHERE name = ?", (name,)).rowcount == 1
