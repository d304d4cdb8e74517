"""Accounts and sessions (p2pshare.users) with an in-memory database and a fake clock."""

from __future__ import annotations

import sqlite3

import pytest

from p2pshare.errors import ConfigError
from p2pshare.users import Role, SignIn, Users, csrf_matches

PW = "correct horse battery staple"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def users(clock: Clock) -> Users:
    db = sqlite3.connect(":memory:", isolation_level=None)
    u = Users(db, clock=clock)
    u.add("tech", Role.SENDER, PW)
    return u


def test_passwords_are_stored_as_argon2id_hashes(users: Users) -> None:
    stored = users.password_record("tech")
    assert stored is not None and stored.startswith("$argon2id$") and PW not in stored
    users.add("tech2", Role.SENDER, PW)
    assert users.password_record("tech2") != stored  # a salt per hash


def test_bad_names_passwords_and_duplicates_are_refused(users: Users) -> None:
    with pytest.raises(ConfigError, match="at least 10"):
        users.add("x", Role.ADMIN, "short")
    with pytest.raises(ConfigError, match="user name"):
        users.add("has space", Role.ADMIN, PW)
    with pytest.raises(ConfigError, match="already a user"):
        users.add("tech", Role.ADMIN, PW)


def test_five_wrong_passwords_lock_for_fifteen_minutes(users: Users, clock: Clock) -> None:
    outcomes = [users.sign_in("tech", "wrong-password").outcome for _ in range(5)]
    assert outcomes == [SignIn.FAILED] * 4 + [SignIn.LOCKED]
    assert users.sign_in("tech", PW).outcome is SignIn.LOCKED
    clock.t += 15 * 60 - 1
    assert users.sign_in("tech", PW).outcome is SignIn.LOCKED
    clock.t += 2
    assert users.sign_in("tech", PW).outcome is SignIn.OK


def test_a_right_password_resets_the_count(users: Users) -> None:
    for _ in range(4):
        assert users.sign_in("tech", "wrong-password").outcome is SignIn.FAILED
    assert users.sign_in("tech", PW).outcome is SignIn.OK
    for _ in range(4):
        assert users.sign_in("tech", "wrong-password").outcome is SignIn.FAILED


def test_sessions_end_when_idle_or_old(users: Users, clock: Clock) -> None:
    a = users.sign_in("tech", PW)
    assert a.outcome is SignIn.OK and a.session is not None and len(a.cookie) >= 43
    assert users.session(a.cookie) is not None
    clock.t += 30 * 60 + 1
    assert users.session(a.cookie) is None  # idle
    b = users.sign_in("tech", PW)
    assert b.session is not None
    # Busy all day, never idle for long: still ends 12 hours after sign-in.
    while clock.t + 29 * 60 - b.session.created <= 12 * 3600:
        clock.t += 29 * 60
        assert users.session(b.cookie) is not None
    clock.t += 29 * 60
    assert users.session(b.cookie) is None


def test_the_cookie_is_not_stored_and_csrf_is_per_session(users: Users) -> None:
    a, b = users.sign_in("tech", PW), users.sign_in("tech", PW)
    assert a.session and b.session and a.session.csrf != b.session.csrf
    dump = "\n".join(users._db.iterdump())
    assert a.cookie not in dump
    assert csrf_matches(a.session, a.session.csrf)
    assert not csrf_matches(a.session, b.session.csrf) and not csrf_matches(a.session, "")
    assert users.session("forged") is None


def test_removing_a_user_or_changing_the_password_ends_sessions(users: Users) -> None:
    a = users.sign_in("tech", PW)
    users.set_password("tech", PW + "!")
    assert users.session(a.cookie) is None
    assert users.sign_in("tech", PW).outcome is SignIn.FAILED
    b = users.sign_in("tech", PW + "!")
    assert users.remove("tech") and users.session(b.cookie) is None
    assert users.sign_in("tech", PW + "!").outcome is SignIn.FAILED


def test_roles() -> None:
    from p2pshare.users import User

    admin, sender = User("a", Role.ADMIN, 0, 0), User("s", Role.SENDER, 0, 0)
    assert admin.may(Role.SENDER) and admin.may(Role.RECEIVER)
    assert sender.may(Role.SENDER) and not sender.may(Role.RECEIVER)


def test_passwords_are_hashed_with_argon2id_at_owasp_cost_and_nothing_is_hashed_at_import() -> None:
    import subprocess
    import sys

    from p2pshare.users import hash_password

    probe = "import p2pshare.users as u, sys; sys.exit(0 if u._dummy_hash is None else 1)"
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
    assert hash_password("correct horse battery").startswith("$argon2id$v=19$m=19456,t=2,")
