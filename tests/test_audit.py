"""The hash-chained audit log: appends link up, and any tampering names the first bad record."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from p2pshare import crypto
from p2pshare.audit import (
    BAD_SIGNATURE,
    CHAIN_BROKEN,
    GENESIS,
    HEAD_FORGED,
    HEAD_MISSING,
    SEALED,
    UNSIGNED,
    AuditLog,
    ChainReport,
    open_readonly,
)
from p2pshare.errors import ConfigError

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


# -- the signed chain (sealed with the node's identity key) -----------------------------------

NODE = crypto.Identity.generate(lambda n: b"\x07" * n)
OTHER = crypto.Identity.generate(lambda n: b"\x09" * n)


@pytest.fixture
def signed(db: sqlite3.Connection) -> AuditLog:
    """A node's log: the seal record, then created, two wrong codes, burnt (seq 1-5)."""
    audit = AuditLog(db, identity=NODE)
    audit.append(1000, "offer-created", offer="a" * 32, instances=7)
    audit.append(1010, "pairing-attempt", "wrong-code", offer="a" * 32, tries_left=2)
    audit.append(1020, "pairing-attempt", "wrong-code", offer="a" * 32, tries_left=1)
    audit.append(1030, "offer-burnt", offer="a" * 32)
    return audit


def head(db: sqlite3.Connection) -> dict[str, Any]:
    row = db.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    assert row is not None
    value: dict[str, Any] = json.loads(row[0])
    return value


def test_the_first_signed_append_seals_the_chain_and_every_record_is_signed(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    stored = rows(db)
    assert [r[2] for r in stored] == [
        SEALED,
        "offer-created",
        "pairing-attempt",
        "pairing-attempt",
        "offer-burnt",
    ]
    assert json.loads(stored[0][4]) == {"key": NODE.fingerprint}
    # Each record's signature is the node's over (seq, hash), checked here with PyNaCl directly.
    seals = dict(db.execute("SELECT seq, signature FROM audit_seal"))
    for seq, *_, digest in stored:
        message = b"p2pshare audit record v1\0" + f"{seq}:{digest}".encode()
        nacl.signing.VerifyKey(NODE.public_key).verify(message, bytes.fromhex(seals[seq]))
    h = head(db)
    assert (h["seq"], h["hash"]) == (5, stored[-1][6])
    message = b"p2pshare audit head v1\0" + f"5:{stored[-1][6]}".encode()
    nacl.signing.VerifyKey(NODE.public_key).verify(message, bytes.fromhex(h["signature"]))
    assert signed.verify() == ChainReport(True, 5, None, "", sealed=True)


def test_a_record_signature_cannot_serve_as_the_head(db: sqlite3.Connection, signed: AuditLog) -> None:
    # Delete record 5 and present record 4's own signature as the head: the labels differ.
    seal4 = db.execute("SELECT signature FROM audit_seal WHERE seq = 4").fetchone()[0]
    db.execute("DELETE FROM audit WHERE seq = 5")
    forged = {"seq": 4, "hash": rows(db)[-1][6], "signature": seal4}
    db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (json.dumps(forged),))
    assert signed.verify() == ChainReport(False, 4, 5, HEAD_FORGED, sealed=True)


def test_deleting_the_last_record_is_detected_by_the_signed_head(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    db.execute("DELETE FROM audit WHERE seq = 5")
    report = signed.verify()
    assert (report.ok, report.first_bad) == (False, 5)
    assert report.reason == "a record is missing (the signed head says the log runs to 5)"


def test_deleting_the_last_records_and_the_head_is_detected(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    db.execute("DELETE FROM audit WHERE seq >= 4")
    db.execute("DELETE FROM meta WHERE key = 'audit_head'")
    assert signed.verify() == ChainReport(False, 3, 4, HEAD_MISSING, sealed=True)


def test_deleting_everything_but_the_signatures_is_detected(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    db.execute("DELETE FROM audit")
    db.execute("DELETE FROM meta")
    assert signed.verify() == ChainReport(False, 0, 1, MISSING, sealed=True)


def test_deleting_the_seal_record_is_detected(db: sqlite3.Connection, signed: AuditLog) -> None:
    db.execute("DELETE FROM audit WHERE seq = 1")
    assert signed.verify() == ChainReport(False, 1, 1, MISSING, sealed=True)


def test_a_rewritten_chain_is_named_at_its_first_rewritten_record(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    # Whoever can write the database can recompute every hash after an edit, and the head's
    # seq/hash too; they cannot sign. The first rewritten record is named.
    prev = rows(db)[1][6]
    for seq, at, action, _, detail, _, _ in rows(db)[2:]:
        digest = expected_hash(prev, seq, at, action, "ok", detail)
        db.execute(
            "UPDATE audit SET outcome = 'ok', prev_hash = ?, hash = ? WHERE seq = ?",
            (prev, digest, seq),
        )
        prev = digest
    value = head(db) | {"hash": prev}
    db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (json.dumps(value),))
    assert signed.verify() == ChainReport(False, 3, 3, BAD_SIGNATURE, sealed=True)


def test_a_forged_record_inserted_in_a_signed_chain_is_named_itself(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    for seq in (5, 4, 3):
        db.execute("UPDATE audit SET seq = ? WHERE seq = ?", (seq + 1, seq))
    prev = rows(db)[1][6]
    digest = expected_hash(prev, 3, 1005, "offer-cancelled", "ok", "{}")
    db.execute(
        "INSERT INTO audit VALUES (3, 1005, 'offer-cancelled', 'ok', '{}', ?, ?)", (prev, digest)
    )
    assert signed.verify() == ChainReport(False, 3, 3, BAD_SIGNATURE, sealed=True)


def test_a_forged_record_appended_with_a_good_hash_is_unsigned(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    prev = rows(db)[-1][6]
    digest = expected_hash(prev, 6, 1040, "receipt-signed", "ok", "{}")
    db.execute(
        "INSERT INTO audit VALUES (6, 1040, 'receipt-signed', 'ok', '{}', ?, ?)", (prev, digest)
    )
    assert signed.verify() == ChainReport(False, 6, 6, UNSIGNED, sealed=True)


def test_removing_a_signature_is_detected(db: sqlite3.Connection, signed: AuditLog) -> None:
    db.execute("DELETE FROM audit_seal WHERE seq = 2")
    assert signed.verify() == ChainReport(False, 2, 2, UNSIGNED, sealed=True)


def test_another_key_does_not_verify_the_chain(db: sqlite3.Connection, signed: AuditLog) -> None:
    assert AuditLog(db, identity=OTHER).verify() == ChainReport(
        False, 1, 1, BAD_SIGNATURE, sealed=True
    )


def test_a_signed_chain_cannot_be_checked_without_the_identity_key(
    db: sqlite3.Connection, signed: AuditLog, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="identity.key is missing"):
        AuditLog(db, tmp_path / "identity.key").verify()


def test_a_chain_written_before_sealing_still_verifies_and_is_sealed_on_the_next_append(
    db: sqlite3.Connection, log: AuditLog
) -> None:
    assert log.verify() == ChainReport(True, 4, None, "", sealed=False)
    node = AuditLog(db, identity=NODE)  # the same database, opened by a signing node
    assert node.append(1100, "node-started") == 6
    assert [r[2] for r in rows(db)[3:]] == ["offer-burnt", SEALED, "node-started"]
    assert node.verify() == ChainReport(True, 6, None, "", sealed=True)
    # From the seal on, records must be signed; the four before it need not be.
    db.execute("DELETE FROM audit_seal WHERE seq = 6")
    assert node.verify() == ChainReport(False, 6, 6, UNSIGNED, sealed=True)


def test_a_node_that_finds_its_log_cut_short_records_it_instead_of_covering_it(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    db.execute("DELETE FROM audit WHERE seq = 5")
    db.execute("DELETE FROM meta WHERE key = 'audit_head'")
    assert signed.append(1100, "node-started") == 6
    assert [r[2] for r in rows(db)[-2:]] == [CHAIN_BROKEN, "node-started"]
    assert json.loads(rows(db)[-2][4]) == {
        "found": "the signed chain head was missing",
        "head": None,
        "log_ended_at": 4,
    }
    report = signed.verify()
    assert (report.ok, report.first_bad) == (False, 5)
    assert "tampered with before this record" in report.reason


def test_a_node_that_finds_a_stale_head_records_it(db: sqlite3.Connection, signed: AuditLog) -> None:
    db.execute("DELETE FROM audit WHERE seq = 5")
    signed.append(1100, "node-started")
    broken = signed.records(CHAIN_BROKEN)
    assert [r["detail"] for r in broken] == [
        {"found": "the signed chain head names record 5, the log ends at 4", "head": 5,
         "log_ended_at": 4}
    ]
    assert signed.verify().first_bad == 5


def test_identity_path_is_read_once_it_exists(db: sqlite3.Connection, tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    audit = AuditLog(db, key)
    audit.append(1, "before-the-node-had-a-key")
    crypto.Identity.load_or_create(key)
    audit.append(2, "node-started")
    assert [r["action"] for r in audit.records()] == [
        "before-the-node-had-a-key",
        SEALED,
        "node-started",
    ]
    assert audit.verify() == ChainReport(True, 3, None, "", sealed=True)


# -- what is kept --------------------------------------------------------------------------------


def test_values_that_never_belong_in_the_audit_are_withheld(log: AuditLog) -> None:
    log.append(
        2000,
        "consent-viewed",
        offer="o",
        patient_name="DOE^JANE",
        spoken_code="7-glisten-ivory-sardine-utility",
        DOB="1970-01-01",
    )
    detail = log.records("consent-viewed")[0]["detail"]
    assert detail == {
        "offer": "o",
        "patient_name": "[withheld]",
        "spoken_code": "[withheld]",
        "DOB": "[withheld]",
    }
    assert log.verify().ok


def test_records_filter_by_time_window_and_by_offer_or_transfer(log: AuditLog) -> None:
    log.append(1040, "transfer-started", transfer="t" * 32)
    log.append(1050, "transfer-failed", "integrity", job="j1")
    assert [r["seq"] for r in log.records(since=1010, until=1030)] == [2, 3]
    assert [r["seq"] for r in log.records(since=1030)] == [4, 5, 6]
    assert [r["seq"] for r in log.records(refs=("a" * 32,))] == [1, 2, 3, 4]
    assert [r["seq"] for r in log.records(refs=("t" * 32, "j1"))] == [5, 6]
    assert log.records(refs=("nothing",)) == []
    assert [r["seq"] for r in log.records("pairing-attempt", until=1020)] == [2]


# -- reading while the node writes ----------------------------------------------------------------


def test_a_read_only_connection_verifies_while_a_writer_holds_the_database(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    node = AuditLog(writer, identity=NODE)
    node.append(1, "node-started")
    writer.execute("BEGIN IMMEDIATE")  # the node is in the middle of a write
    node.append(2, "offer-created", offer="o")
    reader = open_readonly(path)
    try:
        outside = AuditLog(reader, identity=NODE, create=False)
        assert outside.verify() == ChainReport(True, 2, None, "", sealed=True)
        writer.execute("COMMIT")
        assert outside.verify() == ChainReport(True, 3, None, "", sealed=True)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("DELETE FROM audit")
    finally:
        reader.close()
        writer.close()


def test_open_readonly_says_what_to_do_without_a_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no node database at .* give the node's --data-dir"):
        open_readonly(tmp_path / "node.sqlite3")


def test_a_detail_edited_into_something_that_is_not_json_still_reads_and_is_named(
    db: sqlite3.Connection, signed: AuditLog
) -> None:
    db.execute("UPDATE audit SET detail = '{oops' WHERE seq = 3")
    assert signed.records()[2]["detail"] == {"unreadable": "{oops"}
    assert [r["seq"] for r in signed.records(refs=("a" * 32,))] == [2, 4, 5]
    assert signed.verify() == ChainReport(False, 3, 3, ALTERED, sealed=True)


def test_cutting_a_freshly_sealed_chain_back_to_before_its_seal_is_detected(
    db: sqlite3.Connection, log: AuditLog
) -> None:
    node = AuditLog(db, identity=NODE)
    node.append(1100, "node-started")  # seal at 5, node-started at 6
    db.execute("DELETE FROM audit WHERE seq >= 5")
    db.execute("DELETE FROM meta WHERE key = 'audit_head'")
    assert node.verify() == ChainReport(False, 4, 5, MISSING, sealed=True)
