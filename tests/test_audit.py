"""The hash-chained audit log: appends link up, and any tampering names the first bad record."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pshare.audit import GENESIS, AuditLog, ChainReport

ALTERED = "the record was altered"
BROKEN = "the chain link to the previous record is broken"
MISSING = "a record is missing"


def expected_hash(prev: str, seq: int, at: int, action: str, outcome: str, detail: str) -> str:
    """The documented record hash, computed independently of the module under test."""
    payload = json.dumps([prev, seq, at, action, outcome, detail], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    yield conn
    conn.close()


@pytest.fixture
def log(db: sqlite3.Connection) -> AuditLog:
    """Four records: created, two pairing attempts, burnt."""
    audit = AuditLog(db)
    audit.append(1000, "offer-created", offer="a" * 32, instances=7)
    audit.append(1010, "pairing-attempt", "wrong-code", offer="a" * 32, tries_left=2)
    audit.append(1020, "pairing-attempt", "wrong-code", offer="a" * 32, tries_left=1)
    audit.append(1030, "offer-burnt", offer="a" * 32)
    return audit


def rows(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT seq, at, action, outcome, detail, prev_hash, hash FROM audit ORDER BY seq"
    ).fetchall()


# -- appending ---------------------------------------------------------------------------------


def test_append_numbers_records_from_one_and_chains_each_to_the_previous_hash(
    db: sqlite3.Connection,
) -> None:
    audit = AuditLog(db)
    assert audit.append(100, "node-started", name="ED", fingerprint="ABCD") == 1
    assert audit.append(101, "offer-created", offer="f" * 32) == 2
    assert audit.append(102, "offer-expired", "ok") == 3

    stored = rows(db)
    assert [r[0] for r in stored] == [1, 2, 3]
    assert stored[0][5] == GENESIS == "0" * 64
    assert stored[1][5] == stored[0][6]
    assert stored[2][5] == stored[1][6]
    for seq, at, action, outcome, detail, prev, digest in stored:
        assert digest == expected_hash(prev, seq, at, action, outcome, detail)
    # Detail is canonical JSON: sorted keys, no spaces.
    assert stored[0][1:5] == (100, "node-started", "ok", '{"fingerprint":"ABCD","name":"ED"}')
    assert stored[2][4] == "{}"


def test_detail_values_that_are_not_json_are_stored_as_text(db: sqlite3.Connection) -> None:
    audit = AuditLog(db)
    audit.append(5, "transfer-started", out=Path("/srv/in"), files=(1, 2))
    assert audit.records() == [
        {
            "seq": 1,
            "at": 5,
            "action": "transfer-started",
            "outcome": "ok",
            "detail": {"files": [1, 2], "out": "/srv/in"},
        }
    ]
    assert audit.verify() == ChainReport(True, 1)


def test_a_second_log_on_the_same_database_continues_the_chain(db: sqlite3.Connection) -> None:
    AuditLog(db).append(1, "node-started")
    again = AuditLog(db)  # e.g. after a restart: the schema is not recreated
    assert again.append(2, "node-started") == 2
    assert again.verify() == ChainReport(True, 2)


# -- verifying ---------------------------------------------------------------------------------


def test_verify_is_ok_on_an_empty_log(db: sqlite3.Connection) -> None:
    assert AuditLog(db).verify() == ChainReport(True, 0, None, "")


def test_verify_is_ok_on_an_untouched_chain(log: AuditLog) -> None:
    assert log.verify() == ChainReport(True, 4, None, "")


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("at", 999, ALTERED),
        ("action", "offer-cancelled", ALTERED),
        ("outcome", "ok", ALTERED),
        ("detail", '{"offer":"bbbb","tries_left":2}', ALTERED),
        ("hash", "f" * 64, ALTERED),
        ("prev_hash", "e" * 64, BROKEN),
        ("seq", 99, MISSING),
    ],
)
def test_editing_any_column_of_one_record_names_that_record(
    db: sqlite3.Connection, log: AuditLog, column: str, value: object, reason: str
) -> None:
    db.execute(f"UPDATE audit SET {column} = ? WHERE seq = 2", (value,))
    assert log.verify() == ChainReport(False, 2, 2, reason)


def test_editing_the_last_record_is_detected(db: sqlite3.Connection, log: AuditLog) -> None:
    db.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 4")
    assert log.verify() == ChainReport(False, 4, 4, ALTERED)


def test_an_edit_whose_hash_was_recomputed_breaks_the_link_of_the_next_record(
    db: sqlite3.Connection, log: AuditLog
) -> None:
    seq, at, action, _, detail, prev, _ = rows(db)[1]
    forged = expected_hash(prev, seq, at, action, "ok", detail)
    db.execute("UPDATE audit SET outcome = 'ok', hash = ? WHERE seq = 2", (forged,))
    assert log.verify() == ChainReport(False, 3, 3, BROKEN)


def test_deleting_a_record_is_detected_where_it_was(db: sqlite3.Connection, log: AuditLog) -> None:
    db.execute("DELETE FROM audit WHERE seq = 2")
    assert log.verify() == ChainReport(False, 2, 2, MISSING)


def test_deleting_the_first_record_is_detected(db: sqlite3.Connection, log: AuditLog) -> None:
    db.execute("DELETE FROM audit WHERE seq = 1")
    assert log.verify() == ChainReport(False, 1, 1, MISSING)


def test_deleting_and_renumbering_is_still_detected(db: sqlite3.Connection, log: AuditLog) -> None:
    db.execute("DELETE FROM audit WHERE seq = 2")
    db.execute("UPDATE audit SET seq = 2 WHERE seq = 3")
    db.execute("UPDATE audit SET seq = 3 WHERE seq = 4")
    assert log.verify() == ChainReport(False, 2, 2, BROKEN)


def test_swapping_two_records_contents_is_detected(db: sqlite3.Connection, log: AuditLog) -> None:
    r2, r3 = rows(db)[1], rows(db)[2]
    update = (
        "UPDATE audit SET at = ?, action = ?, outcome = ?, detail = ?, prev_hash = ?, hash = ? "
        "WHERE seq = ?"
    )
    db.execute(update, (*r3[1:], 2))
    db.execute(update, (*r2[1:], 3))
    assert log.verify() == ChainReport(False, 2, 2, BROKEN)


def test_swapping_two_records_payload_but_not_their_hashes_is_detected(
    db: sqlite3.Connection, log: AuditLog
) -> None:
    r2, r3 = rows(db)[1], rows(db)[2]
    update = "UPDATE audit SET at = ?, action = ?, outcome = ?, detail = ? WHERE seq = ?"
    db.execute(update, (*r3[1:5], 2))
    db.execute(update, (*r2[1:5], 3))
    assert log.verify() == ChainReport(False, 2, 2, ALTERED)


def test_a_forged_record_inserted_in_the_middle_is_detected_at_the_next_record(
    db: sqlite3.Connection, log: AuditLog
) -> None:
    # Make room at seq 2 (highest first: seq is the primary key), then insert a record whose
    # own hash and link are perfectly consistent with record 1.
    for seq in (4, 3, 2):
        db.execute("UPDATE audit SET seq = ? WHERE seq = ?", (seq + 1, seq))
    prev = rows(db)[0][6]
    detail = '{"offer":"' + "a" * 32 + '"}'
    digest = expected_hash(prev, 2, 1005, "offer-cancelled", "ok", detail)
    db.execute(
        "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
        (2, 1005, "offer-cancelled", "ok", detail, prev, digest),
    )
    # Record 2 (the forgery) is self-consistent; the moved record 3 no longer links to it.
    assert log.verify() == ChainReport(False, 3, 3, BROKEN)


def test_a_forged_record_appended_with_a_made_up_hash_is_detected(
    db: sqlite3.Connection, log: AuditLog
) -> None:
    prev = rows(db)[-1][6]
    db.execute(
        "INSERT INTO audit VALUES (5, 1040, 'receipt-signed', 'ok', '{}', ?, ?)", (prev, "0" * 64)
    )
    assert log.verify() == ChainReport(False, 5, 5, ALTERED)


def test_a_forged_record_with_a_gap_in_numbering_is_detected(
    db: sqlite3.Connection, log: AuditLog
) -> None:
    prev = rows(db)[-1][6]
    digest = expected_hash(prev, 7, 1040, "receipt-signed", "ok", "{}")
    db.execute(
        "INSERT INTO audit VALUES (7, 1040, 'receipt-signed', 'ok', '{}', ?, ?)", (prev, digest)
    )
    assert log.verify() == ChainReport(False, 5, 5, MISSING)


# -- reading -----------------------------------------------------------------------------------


def test_records_returns_every_record_in_order_with_detail_decoded(log: AuditLog) -> None:
    assert log.records() == [
        {
            "seq": 1,
            "at": 1000,
            "action": "offer-created",
            "outcome": "ok",
            "detail": {"offer": "a" * 32, "instances": 7},
        },
        {
            "seq": 2,
            "at": 1010,
            "action": "pairing-attempt",
            "outcome": "wrong-code",
            "detail": {"offer": "a" * 32, "tries_left": 2},
        },
        {
            "seq": 3,
            "at": 1020,
            "action": "pairing-attempt",
            "outcome": "wrong-code",
            "detail": {"offer": "a" * 32, "tries_left": 1},
        },
        {
            "seq": 4,
            "at": 1030,
            "action": "offer-burnt",
            "outcome": "ok",
            "detail": {"offer": "a" * 32},
        },
    ]


def test_records_filters_by_action(log: AuditLog) -> None:
    assert [r["seq"] for r in log.records("pairing-attempt")] == [2, 3]
    assert [r["detail"]["tries_left"] for r in log.records("pairing-attempt")] == [2, 1]
    assert [r["seq"] for r in log.records("offer-burnt")] == [4]
    assert log.records("receipt-signed") == []
    assert [r["seq"] for r in log.records(None)] == [1, 2, 3, 4]
