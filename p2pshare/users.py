"""Staff accounts and browser sessions, in the node's SQLite database.

Passwords are hashed with Argon2id (libsodium through PyNaCl, its own random salt per hash).
After ``max_failures`` wrong passwords in a row an account is locked for ``lockout_s`` seconds;
the lock also refuses the right password, so guessing cannot go on in the background.

A session id is 256 random bits handed to the browser in a cookie; the database keeps only its
SHA-256, so a copy of the database does not let anyone sign in as a member of staff. A session
ends after ``idle_s`` without a request or ``absolute_s`` after sign-in, whichever comes first.
Each session has its own CSRF token, which the browser must echo in ``X-CSRF-Token`` on every
request that changes something.

Floods: a locked account is refused before any password is hashed (``locked_until``), and
:class:`AttemptLimit` counts failed sign-ins per address so that one address cannot keep the
node hashing (the node also runs at most two Argon2 checks at once).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import nacl.exceptions
import nacl.pwhash

from p2pshare.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created INTEGER NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0,
    locked_until INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
"""

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


class Role(enum.Enum):
    SENDER = "sender"
    RECEIVER = "receiver"
    ADMIN = "admin"


class SignIn(enum.Enum):
    """How a sign-in attempt ended (the audit outcome)."""

    OK = "ok"
    FAILED = "failed"
    LOCKED = "locked"


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    created: int
    locked_until: int

    def may(self, role: Role) -> bool:
        """An admin may do everything; otherwise the role must match."""
        return self.role is Role.ADMIN or self.role is role


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    created: int


@dataclass(frozen=True)
class Attempt:
    outcome: SignIn
    #: Set when the outcome is OK: the cookie value (shown once, never stored) and the session.
    cookie: str = ""
    session: Session | None = None
    #: Set when the outcome is LOCKED: until when (epoch seconds).
    locked_until: int = 0


def check_name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not set(name) <= _NAME_OK:
        raise ConfigError(
            "a user name is 1–64 letters, digits, '.', '_', '-' or '@' (no spaces)"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password must be at least {MIN_PASSWORD} characters long")
    if len(password) > MAX_PASSWORD:
        raise ConfigError(f"the password must be at most {MAX_PASSWORD} characters long")
    return password


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise ConfigError("the role must be sender, receiver or admin") from None


#: Argon2id cost: OWASP's recommended setting (19 MiB, 2 passes). The node also streams studies
#: within a memory budget, and a sign-in must not cost more memory than a whole transfer; stored
#: hashes carry their own parameters, so raising these later keeps old passwords valid.
ARGON2_OPSLIMIT = 2
ARGON2_MEMLIMIT = 19 * 1024 * 1024


def hash_password(password: str) -> str:
    return nacl.pwhash.argon2id.str(
        password.encode("utf-8"), opslimit=ARGON2_OPSLIMIT, memlimit=ARGON2_MEMLIMIT
    ).decode("ascii")


def _session_hash(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8")).hexdigest()


_dummy_hash: str | None = None


def _dummy() -> str:
    """Verified against when the name is unknown, so that an unknown name costs as much time
    as a wrong password and the answer time does not tell which names exist (made on first use,
    not at import)."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_urlsafe(16))
    return _dummy_hash


class Users:
    """Accounts and sessions on one SQLite connection (the node's, or the CLI's own)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        *,
        clock: Callable[[], float] = time.time,
        max_failures: int = 5,
        lockout_s: int = 15 * 60,
        idle_s: int = 30 * 60,
        absolute_s: int = 12 * 3600,
    ) -> None:
        self._db = db
        self._clock = clock
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.idle_s = idle_s
        self.absolute_s = absolute_s
        db.executescript(SCHEMA)

    def _now(self) -> int:
        return int(self._clock())

    # -- accounts ---------------------------------------------------------------------------

    def add(self, name: str, role: Role, password: str) -> User:
        check_name(name)
        digest = hash_password(check_password(password))
        try:
            self._db.execute(
                "INSERT INTO users (name, role, password_hash, created) VALUES (?, ?, ?, ?)",
                (name, role.value, digest, self._now()),
            )
        except sqlite3.IntegrityError:
            raise ConfigError(
                f"there is already a user called '{name}'; choose another name or use "
                f"'p2pshare user passwd {name}'"
            ) from None
        user = self.get(name)
        assert user is not None
        return user

    def get(self, name: str) -> User | None:
        row = self._db.execute(
            "SELECT name, role, created, locked_until FROM users WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        return User(row[0], Role(row[1]), row[2], row[3])

    def all(self) -> list[User]:
        rows = self._db.execute("SELECT name, role, created, locked_until FROM users ORDER BY name")
        return [User(r[0], Role(r[1]), r[2], r[3]) for r in rows]

    def remove(self, name: str) -> bool:
        with self._db:
            self._db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
            return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 1

    def set_password(self, name: str, password: str) -> None:
        """A new password also lifts a lock-out and ends the user's sessions."""
        digest = hash_password(check_password(password))
        with self._db:
            cur = self._db.execute(
                "UPDATE users SET password_hash = ?, failed = 0, locked_until = 0 WHERE name = ?",
                (digest, name),
            )
            if cur.rowcount != 1:
                raise ConfigError(f"there is no user called '{name}'")
            self._db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))

    # -- sign-in ----------------------------------------------------------------------------

    def sign_in(self, name: str, password: str) -> Attempt:
        """Check a password (slow on purpose: Argon2id) and open a session when it is right.

        The node splits this in three so that the slow ``verify`` runs in a worker thread
        while the database is only touched from the event loop.
        """
        stored = self.password_record(name)
        return self.conclude(name, stored, self.verify(stored, password))

    def password_record(self, name: str) -> str | None:
        row = self._db.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else None

    @staticmethod
    def verify(stored: str | None, password: str) -> bool:
        """Argon2id check; an unknown user costs the same time as a wrong password."""
        try:
            return bool(
                nacl.pwhash.verify(
                    (stored or _dummy()).encode("ascii"), password.encode("utf-8")
                )
            ) and stored is not None
        except (nacl.exceptions.InvalidkeyError, nacl.exceptions.CryptoError):
            return False

    def locked_until(self, name: str) -> int:
        """Until when (epoch seconds) the account is locked; 0 when it is not (or unknown)."""
        row = self._db.execute("SELECT locked_until FROM users WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row is not None and row[0] > self._now() else 0

    def conclude(self, name: str, stored: str | None, ok: bool) -> Attempt:
        """Count the attempt, lock the account at the limit, or open a session."""
        now = self._now()
        row = self._db.execute(
            "SELECT password_hash, locked_until FROM users WHERE name = ?", (name,)
        ).fetchone()
        if row is None or stored is None:
            return Attempt(SignIn.FAILED)
        if row[1] > now:
            return Attempt(SignIn.LOCKED, locked_until=row[1])
        if not ok or row[0] != stored:  # a password changed meanwhile counts as wrong
            with self._db:
                self._db.execute("UPDATE users SET failed = failed + 1 WHERE name = ?", (name,))
                failed = self._db.execute(
                    "SELECT failed FROM users WHERE name = ?", (name,)
                ).fetchone()[0]
                if failed >= self.max_failures:
                    until = now + self.lockout_s
                    self._db.execute(
                        "UPDATE users SET failed = 0, locked_until = ? WHERE name = ?",
                        (until, name),
                    )
                    return Attempt(SignIn.LOCKED, locked_until=until)
            return Attempt(SignIn.FAILED)
        self._db.execute("UPDATE users SET failed = 0, locked_until = 0 WHERE name = ?", (name,))
        cookie = secrets.token_urlsafe(32)  # 256 bits
        csrf = secrets.token_urlsafe(32)
        self._db.execute(
            "INSERT INTO sessions (id_hash, user_name, csrf, created, last_seen) "
            "VALUES (?, ?, ?, ?, ?)",
            (_session_hash(cookie), name, csrf, now, now),
        )
        user = self.get(name)
        assert user is not None
        return Attempt(SignIn.OK, cookie=cookie, session=Session(user, csrf, now))

    def session(self, cookie: str) -> Session | None:
        """The live session a cookie names (and note the request), or None."""
        if not cookie or len(cookie) > 128:
            return None
        now = self._now()
        key = _session_hash(cookie)
        row = self._db.execute(
            "SELECT s.csrf, s.created, s.last_seen, u.name, u.role, u.created, u.locked_until "
            "FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.id_hash = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        csrf, created, last_seen = row[0], row[1], row[2]
        if now - last_seen > self.idle_s or now - created > self.absolute_s:
            self._db.execute("DELETE FROM sessions WHERE id_hash = ?", (key,))
            return None
        if now != last_seen:
            self._db.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", (now, key))
        return Session(User(row[3], Role(row[4]), row[5], row[6]), csrf, created)

    def sign_out(self, cookie: str) -> bool:
        return (
            self._db.execute(
                "DELETE FROM sessions WHERE id_hash = ?", (_session_hash(cookie),)
            ).rowcount
            == 1
        )

    def sweep(self) -> int:
        """Forget sessions that have ended; returns how many."""
        now = self._now()
        return self._db.execute(
            "DELETE FROM sessions WHERE last_seen < ? OR created < ?",
            (now - self.idle_s, now - self.absolute_s),
        ).rowcount


def csrf_matches(session: Session, given: str) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf.encode(), given.encode())


class AttemptLimit:
    """At most ``per_min`` failed sign-ins from one address in any 60 seconds; then that
    address is refused before any password is hashed until the oldest failure is a minute old.
    Successful sign-ins do not count (a ward behind one address signs in often).

    The table holds at most ``max_addresses`` addresses; the least recently seen are forgotten
    first, so a flood from many addresses cannot grow it.
    """

    def __init__(
        self,
        per_min: int = 10,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = 10_000,
    ) -> None:
        self.per_min = per_min
        self.max_addresses = max_addresses
        self._clock = clock
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, address: str) -> float:
        """0 when ``address`` may try to sign in now; otherwise the seconds until it may."""
        failed = self._failed.get(address)
        if failed is None:
            return 0.0
        now = self._clock()
        while failed and failed[0] <= now - 60.0:
            failed.popleft()
        if not failed:
            del self._failed[address]
            return 0.0
        if len(failed) < self.per_min:
            return 0.0
        return max(failed[0] + 60.0 - now, 0.001)

    def failed(self, address: str) -> None:
        """Count a failed sign-in from ``address``."""
        failed = self._failed.get(address)
        if failed is None:
            failed = self._failed[address] = deque()
            while len(self._failed) > self.max_addresses:
                self._failed.popitem(last=False)
        else:
            self._failed.move_to_end(address)
        failed.append(self._clock())
