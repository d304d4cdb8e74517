"""Consent for each offer: the patient's decision on their phone, or a clinician's break-glass.

Policies (per node, overridable per offer):

``patient``
    the default: the patient (or a representative) must approve on the phone page;
``patient-or-break-glass``
    as above, or a clinician may invoke an audited, time-boxed break-glass;
``none``
    no consent is asked (tests and demos only); every record and audit row says so.

States of one offer's consent::

    pending ──approve──► approved ──revoke──► revoked
       │  └─decline──► declined
       ├──break-glass──► break-glass (valid until …)
       └──5 wrong dates of birth──► dead
    not-required (policy none)

The phone link is a 256-bit random token; only its BLAKE2b hash is stored. The patient's date of
birth is never stored either: a salted, keyed BLAKE2b of it is, and the page compares against
that. A verified date of birth gives the page a second random token (the "verifier"), again
stored only as a hash, which every decision must carry.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any

from nacl.encoding import RawEncoder
from nacl.hash import blake2b

from p2pshare.errors import ConfigError, InputError

POLICIES = ("patient", "patient-or-break-glass", "none")
DEFAULT_POLICY = "patient"
MAX_DOB_ATTEMPTS = 5
BREAK_GLASS_MINUTES = 60
MAX_BREAK_GLASS_MINUTES = 24 * 60

PENDING, APPROVED, DECLINED, REVOKED = "pending", "approved", "declined", "revoked"
BREAK_GLASS, DEAD, NOT_REQUIRED = "break-glass", "dead", "not-required"
#: states in which images may flow
GRANTED = (APPROVED, BREAK_GLASS, NOT_REQUIRED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS consents (
    offer_id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    state TEXT NOT NULL,
    intended TEXT,
    link_hash BLOB UNIQUE,
    dob_salt BLOB,
    dob_hash BLOB,
    dob_attempts INTEGER NOT NULL DEFAULT 0,
    verifier_hash BLOB,
    viewed_at INTEGER,
    decided_at INTEGER,
    decided_by TEXT,
    shown TEXT,
    valid_until INTEGER,
    dead_reason TEXT,
    revoked_at INTEGER
);
"""

#: Reasons too thin to justify overriding a patient's right to decide.
_TRIVIAL_REASONS = {
    "emergency", "urgent", "asap", "n/a", "na", "none", "test", "testing", "trauma",
    "needed", "required", "because", "transfer", "patient transfer", "emergency transfer",
}  # fmt: skip
MIN_REASON_CHARS = 20
MIN_REASON_WORDS = 4
ROLES = ("patient", "representative")


def _h(value: bytes) -> bytes:
    return blake2b(value, digest_size=32, person=b"p2ps-consent", encoder=RawEncoder)


def _dob_hash(salt: bytes, dob: str) -> bytes:
    return blake2b(dob.encode(), key=salt, digest_size=32, person=b"p2ps-dob", encoder=RawEncoder)


def normalise_dob(text: str) -> str | None:
    """YYYYMMDD from what a person or a date field gives (2024-03-01, 20240301, 01.03.2024)."""
    t = text.strip()
    if m := re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})", t):
        y, mo, d = m.groups()
    elif m := re.fullmatch(r"(\d{1,2})[./](\d{1,2})[./](\d{4})", t):
        d, mo, y = m.group(1).zfill(2), m.group(2).zfill(2), m.group(3)
    else:
        return None
    if not (1 <= int(mo) <= 12 and 1 <= int(d) <= 31 and 1850 <= int(y) <= 2200):
        return None
    return f"{y}{mo}{d}"


#: how much each policy protects the patient; an offer may only be looser with the operator
STRICTNESS = {"none": 0, "patient-or-break-glass": 1, "patient": 2}


def looser(policy: str, than: str) -> bool:
    return STRICTNESS[policy] < STRICTNESS[than]


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(f"unknown consent policy '{policy}'; use one of {', '.join(POLICIES)}")
    return policy


def check_break_glass(clinician: str, reason: str) -> tuple[str, str]:
    """Refuse an empty name or a reason that is not at least a real sentence."""
    who = " ".join(clinician.split())
    why = " ".join(reason.split())
    if len(who) < 3:
        raise InputError("break-glass needs the invoking clinician's full name and role")
    words = re.findall(r"[A-Za-z\u00c0-\u024f]{2,}", why)
    if (
        len(why) < MIN_REASON_CHARS
        or len(words) < MIN_REASON_WORDS
        or why.lower().strip(" .!") in _TRIVIAL_REASONS
        or len({w.lower() for w in words}) < 3
    ):
        raise InputError(
            "break-glass needs a reason of at least one full sentence saying why the patient "
            "cannot decide and why the images are needed now (for example: 'Patient "
            "unconscious after a road accident, CT needed for neurosurgical planning')"
        )
    if len(who) > 200 or len(why) > 1000:
        raise InputError("keep the clinician's name under 200 and the reason under 1000 characters")
    return who, why


@dataclass(frozen=True)
class Consent:
    offer_id: str
    policy: str
    state: str
    intended: str | None
    has_dob: bool
    dob_attempts: int
    viewed_at: int | None
    decided_at: int | None
    decided_by: dict[str, str] | None
    shown: str | None
    valid_until: int | None
    dead_reason: str | None
    revoked_at: int | None

    @property
    def dob_tries_left(self) -> int:
        return max(0, MAX_DOB_ATTEMPTS - self.dob_attempts)

    def granted(self, now: int) -> bool:
        if self.state == BREAK_GLASS:
            return self.valid_until is None or now <= self.valid_until
        return self.state in GRANTED

    def view(self) -> dict[str, Any]:
        """What staff see (never the link, never the date of birth)."""
        return {
            "policy": self.policy,
            "state": self.state,
            "intended_destination": self.intended,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "valid_until": self.valid_until,
            "dob_tries_left": self.dob_tries_left if self.has_dob else None,
            "dead_reason": self.dead_reason,
            "viewed": self.viewed_at is not None,
        }


def _row(r: sqlite3.Row) -> Consent:
    return Consent(
        offer_id=r["offer_id"],
        policy=r["policy"],
        state=r["state"],
        intended=r["intended"],
        has_dob=r["dob_hash"] is not None,
        dob_attempts=r["dob_attempts"],
        viewed_at=r["viewed_at"],
        decided_at=r["decided_at"],
        decided_by=json.loads(r["decided_by"]) if r["decided_by"] else None,
        shown=r["shown"],
        valid_until=r["valid_until"],
        dead_reason=r["dead_reason"],
        revoked_at=r["revoked_at"],
    )


class ConsentBook:
    """The ``consents`` table of a node's database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def create(
        self, offer_id: str, policy: str, intended: str | None, birth_date: str | None
    ) -> str | None:
        """Record the offer's consent needs; returns the phone link token, if one is needed."""
        check_policy(policy)
        if policy == "none":
            self.db.execute(
                "INSERT INTO consents (offer_id, policy, state, intended) VALUES (?, ?, ?, ?)",
                (offer_id, policy, NOT_REQUIRED, intended),
            )
            return None
        dob = normalise_dob(birth_date or "")
        if dob is None and policy == "patient":
            raise InputError(
                "the study carries no date of birth, so the patient cannot confirm it is theirs "
                "on the phone page; offer it with consent policy 'patient-or-break-glass'"
            )
        token = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        self.db.execute(
            "INSERT INTO consents (offer_id, policy, state, intended, link_hash, dob_salt, "
            "dob_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                offer_id,
                policy,
                PENDING,
                intended,
                _h(token.encode()),
                salt if dob else None,
                _dob_hash(salt, dob) if dob else None,
            ),
        )
        return token

    def get(self, offer_id: str) -> Consent | None:
        r = self.db.execute("SELECT * FROM consents WHERE offer_id = ?", (offer_id,)).fetchone()
        return _row(r) if r else None

    def by_link(self, token: str) -> Consent | None:
        if not 20 <= len(token) <= 100:
            return None
        r = self.db.execute(
            "SELECT * FROM consents WHERE link_hash = ?", (_h(token.encode()),)
        ).fetchone()
        return _row(r) if r else None

    def mark_viewed(self, offer_id: str, now: int) -> bool:
        """True the first time the page is opened."""
        cur = self.db.execute(
            "UPDATE consents SET viewed_at = ? WHERE offer_id = ? AND viewed_at IS NULL",
            (now, offer_id),
        )
        return cur.rowcount == 1

    def check_dob(self, offer_id: str, text: str) -> tuple[str | None, int]:
        """(verifier token or None, tries left). A wrong date counts; the fifth kills the link."""
        r = self.db.execute(
            "SELECT dob_salt, dob_hash, dob_attempts, state FROM consents WHERE offer_id = ?",
            (offer_id,),
        ).fetchone()
        if r is None or r["dob_hash"] is None:
            return None, 0
        dob = normalise_dob(text)
        if dob is not None and hmac.compare_digest(_dob_hash(r["dob_salt"], dob), r["dob_hash"]):
            verifier = secrets.token_urlsafe(32)
            self.db.execute(
                "UPDATE consents SET verifier_hash = ? WHERE offer_id = ?",
                (_h(verifier.encode()), offer_id),
            )
            return verifier, MAX_DOB_ATTEMPTS - r["dob_attempts"]
        with self.db:
            self.db.execute(
                "UPDATE consents SET dob_attempts = dob_attempts + 1 WHERE offer_id = ?",
                (offer_id,),
            )
            self.db.execute(
                "UPDATE consents SET state = ?, dead_reason = ?, link_hash = NULL, "
                "verifier_hash = NULL WHERE offer_id = ? AND dob_attempts >= ? AND state = ?",
                (DEAD, "dob-attempts", offer_id, MAX_DOB_ATTEMPTS, PENDING),
            )
        return None, max(0, MAX_DOB_ATTEMPTS - r["dob_attempts"] - 1)

    def verifier_ok(self, offer_id: str, verifier: str) -> bool:
        r = self.db.execute(
            "SELECT verifier_hash FROM consents WHERE offer_id = ?", (offer_id,)
        ).fetchone()
        return bool(
            r
            and r["verifier_hash"]
            and isinstance(verifier, str)
            and hmac.compare_digest(_h(verifier.encode()), r["verifier_hash"])
        )

    def decide(
        self, offer_id: str, approve: bool, by: dict[str, str], shown: str, now: int
    ) -> bool:
        """Approve or decline a pending consent; False if it is no longer pending."""
        cur = self.db.execute(
            "UPDATE consents SET state = ?, decided_at = ?, decided_by = ?, shown = ? "
            "WHERE offer_id = ? AND state = ?",
            (APPROVED if approve else DECLINED, now, json.dumps(by), shown, offer_id, PENDING),
        )
        return cur.rowcount == 1

    def revoke(self, offer_id: str, now: int) -> bool:
        cur = self.db.execute(
            "UPDATE consents SET state = ?, revoked_at = ? WHERE offer_id = ? AND state = ?",
            (REVOKED, now, offer_id, APPROVED),
        )
        return cur.rowcount == 1

    def break_glass(
        self, offer_id: str, clinician: str, reason: str, minutes: int, now: int
    ) -> Consent:
        c = self.get(offer_id)
        if c is None:
            raise InputError("no such offer")
        if c.policy != "patient-or-break-glass":
            raise InputError(
                "this offer's consent policy is 'patient': only the patient or a representative "
                "can authorise it. Create the offer with policy 'patient-or-break-glass' if the "
                "patient cannot decide"
            )
        lapsed = c.state == BREAK_GLASS and not c.granted(now)
        if c.state not in (PENDING, DEAD) and not lapsed:
            raise InputError(f"break-glass is not possible: consent is already {c.state}")
        if not 1 <= minutes <= MAX_BREAK_GLASS_MINUTES:
            raise ConfigError(f"break-glass lasts 1 to {MAX_BREAK_GLASS_MINUTES} minutes")
        who, why = check_break_glass(clinician, reason)
        self.db.execute(
            "UPDATE consents SET state = ?, decided_at = ?, decided_by = ?, shown = ?, "
            "valid_until = ?, link_hash = NULL, verifier_hash = NULL WHERE offer_id = ?",
            (
                BREAK_GLASS,
                now,
                json.dumps({"role": "clinician", "name": who, "reason": why}),
                "none",
                now + minutes * 60,
                offer_id,
            ),
        )
        c2 = self.get(offer_id)
        assert c2 is not None
        return c2

    def renew_link(self, offer_id: str) -> str | None:
        """A new phone link while the decision is pending (the old one stops working)."""
        token = secrets.token_urlsafe(32)
        cur = self.db.execute(
            "UPDATE consents SET link_hash = ?, verifier_hash = NULL WHERE offer_id = ? "
            "AND state = ?",
            (_h(token.encode()), offer_id, PENDING),
        )
        return token if cur.rowcount == 1 else None

    def end_link(self, offer_id: str) -> None:
        """The offer ended: the phone link stops working (its page then shows nothing)."""
        self.db.execute(
            "UPDATE consents SET link_hash = NULL, verifier_hash = NULL WHERE offer_id = ?",
            (offer_id,),
        )
