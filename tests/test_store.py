"""The node's SQLite state: offers and their one-time use, pinned peers, transfers."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pshare import crypto
from p2pshare import digest as file_digest
from p2pshare.errors import ManifestError, PeerKeyChanged
from p2pshare.manifest import Instance, Manifest, Series
from p2pshare.store import MAX_FAILED_ATTEMPTS, Offer, Store

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.10.1"
NOW = 1_700_000_000
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def manifest(n: int = 2) -> Manifest:
    return Manifest(
        study_instance_uid=STUDY,
        study_description="CT HEAD",
        study_date="20240101",
        accession_number="ACC1",
        patient={"name": "TEST^PATIENT", "id": "P-1"},
        series=(Series(SERIES, "CT", "Axial", 1),),
        chunk_size=64 * 1024,
        instances=tuple(
            Instance(
                sop_instance_uid=f"{SERIES}.{i + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=SERIES,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size=1000 + i,
                digest=file_digest.of_bytes(bytes([i])),
                instance_number=i + 1,
            )
            for i in range(n)
        ),
    )


SOURCES: list[dict[str, Any]] = [
    {"path": "/srv/study/1/IM0001.dcm", "member": None},
    {"path": "/z.zip", "member": "b"},
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "data")
    yield s
    s.close()


def offer(
    store: Store,
    offer_id: str,
    number: int,
    *,
    created: int = NOW,
    expires: int = NOW + 900,
) -> None:
    store.add_offer(
        offer_id=offer_id,
        number=number,
        spoken_code=f"{number}-aardvark-abacus-abbey-abdomen",
        qr_secret=offer_id.encode() * 2,
        manifest=manifest(),
        sources=SOURCES,
        created=created,
        expires=expires,
    )


def state(store: Store, offer_id: str) -> str:
    found = store.get_offer(offer_id)
    assert found is not None
    return found.state


# -- files -------------------------------------------------------------------------------------


def test_data_dir_and_database_are_private_to_the_node_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = Store(data)
    try:
        offer(s, "o1", 1)  # make sqlite create its WAL files too
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "node.sqlite3").stat().st_mode) == 0o600
        for f in data.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f.name
    finally:
        s.close()


def test_an_existing_open_data_dir_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    Store(data).close()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_state_survives_reopening_the_database(tmp_path: Path) -> None:
    s = Store(tmp_path / "data")
    offer(s, "o1", 1)
    s.check_pin("Trauma Centre", KEY_A, NOW)
    s.audit.append(NOW, "offer-created", offer="o1")
    s.close()
    again = Store(tmp_path / "data")
    try:
        assert state(again, "o1") == "active"
        assert [p["name"] for p in again.list_peers()] == ["Trauma Centre"]
        assert again.audit.verify().ok and again.audit.verify().records == 1
    finally:
        again.close()


# -- offers ------------------------------------------------------------------------------------


def test_an_offer_round_trips_with_manifest_and_sources(store: Store) -> None:
    offer(store, "o1", 4)
    got = store.get_offer("o1")
    assert got == Offer(
        id="o1",
        number=4,
        spoken_code="4-aardvark-abacus-abbey-abdomen",
        qr_secret=b"o1o1",
        study_uid=STUDY,
        manifest=manifest(),
        sources=SOURCES,
        created=NOW,
        expires=NOW + 900,
        state="active",
        failed_attempts=0,
        peer_name=None,
        peer_fingerprint=None,
        receipt=None,
        error=None,
    )
    assert got.manifest.to_bytes() == manifest().to_bytes()
    assert got.tries_left == MAX_FAILED_ATTEMPTS == 3
    assert store.get_offer("nope") is None


def test_set_offer_state_stores_fields_and_a_receipt_dict(store: Store) -> None:
    offer(store, "o1", 1)
    receipt = {"manifest_sha256": "ab" * 32, "instances": 2, "signature": "xyz"}
    store.set_offer_state("o1", "paired", peer_name="Trauma Centre", peer_fingerprint="FP-1")
    store.set_offer_state("o1", "completed", receipt=receipt)
    got = store.get_offer("o1")
    assert got is not None
    assert (got.state, got.peer_name, got.peer_fingerprint, got.receipt, got.error) == (
        "completed",
        "Trauma Centre",
        "FP-1",
        receipt,
        None,
    )


def test_list_offers_is_newest_first_and_limited(store: Store) -> None:
    offer(store, "old", 1, created=NOW)
    offer(store, "mid", 2, created=NOW + 1)
    offer(store, "new", 3, created=NOW + 2)
    assert [o.id for o in store.list_offers()] == ["new", "mid", "old"]
    assert [o.id for o in store.list_offers(limit=2)] == ["new", "mid"]


def test_free_offer_number_starts_at_one_and_counts_up(store: Store) -> None:
    assert store.free_offer_number(NOW) == 1
    offer(store, "o1", 1)
    assert store.free_offer_number(NOW) == 2
    offer(store, "o2", 2)
    assert store.free_offer_number(NOW) == 3


def test_free_offer_number_reuses_the_smallest_number_no_live_offer_uses(store: Store) -> None:
    for i in (1, 2, 3, 4):
        offer(store, f"o{i}", i)
    store.set_offer_state("o3", "completed")
    store.set_offer_state("o2", "cancelled")
    assert store.free_offer_number(NOW) == 2
    offer(store, "o2b", 2)
    assert store.free_offer_number(NOW) == 3
    for ended in ("burnt", "paired", "sending", "failed"):
        store.set_offer_state("o1", ended)
        assert store.free_offer_number(NOW) == 1, ended


def test_free_offer_number_skips_expired_offers_and_marks_them_expired(store: Store) -> None:
    offer(store, "o1", 1, expires=NOW + 10)
    offer(store, "o2", 2, expires=NOW + 100)
    assert store.free_offer_number(NOW + 9) == 3
    assert store.free_offer_number(NOW + 10) == 1  # expires is the first second it is dead
    assert state(store, "o1") == "expired"
    assert state(store, "o2") == "active"


def test_wrong_codes_count_down_and_burn_the_offer_at_zero(store: Store) -> None:
    offer(store, "o1", 1)
    assert store.record_failed_attempt("o1") == 2
    assert state(store, "o1") == "active"
    assert store.record_failed_attempt("o1") == 1
    assert state(store, "o1") == "active"
    assert store.record_failed_attempt("o1") == 0
    got = store.get_offer("o1")
    assert got is not None
    assert (got.state, got.failed_attempts, got.tries_left) == ("burnt", 3, 0)
    # Further guesses against a burnt offer count nothing and never revive it.
    assert store.record_failed_attempt("o1") is None
    assert state(store, "o1") == "burnt"
    assert store.get_offer("o1").failed_attempts == 3  # type: ignore[union-attr]
    assert store.claim_offer("o1", NOW) is False


def test_wrong_codes_for_one_offer_do_not_touch_another(store: Store) -> None:
    offer(store, "o1", 1)
    offer(store, "o2", 2)
    store.record_failed_attempt("o1")
    store.record_failed_attempt("o1")
    got = store.get_offer("o2")
    assert got is not None and got.failed_attempts == 0 and got.tries_left == 3


def test_a_wrong_code_does_not_turn_a_cancelled_offer_into_a_burnt_one(store: Store) -> None:
    offer(store, "o1", 1)
    store.set_offer_state("o1", "cancelled")
    for _ in range(3):
        assert store.record_failed_attempt("o1") is None
    assert state(store, "o1") == "cancelled"


def test_a_late_wrong_code_cannot_burn_an_offer_another_receiver_claimed(store: Store) -> None:
    offer(store, "o1", 1)
    assert store.claim_offer("o1", NOW)
    for _ in range(3):
        assert store.record_failed_attempt("o1") is None
    got = store.get_offer("o1")
    assert got is not None and (got.state, got.failed_attempts) == ("paired", 0)


def test_claim_offer_is_single_use(store: Store) -> None:
    offer(store, "o1", 1)
    assert store.claim_offer("o1", NOW) is True
    assert state(store, "o1") == "paired"
    assert store.claim_offer("o1", NOW) is False
    assert state(store, "o1") == "paired"


def test_claim_offer_refuses_an_expired_offer(store: Store) -> None:
    offer(store, "o1", 1, expires=NOW + 60)
    assert store.claim_offer("o1", NOW + 60) is False
    assert state(store, "o1") == "active"  # expiring is expire_offers' job
    assert store.claim_offer("o1", NOW + 59) is True


@pytest.mark.parametrize("final", ["cancelled", "burnt", "expired", "completed", "failed"])
def test_claim_offer_refuses_an_offer_that_ended(store: Store, final: str) -> None:
    offer(store, "o1", 1)
    store.set_offer_state("o1", final)
    assert store.claim_offer("o1", NOW) is False
    assert state(store, "o1") == final


def test_claim_offer_of_an_unknown_offer_is_false(store: Store) -> None:
    assert store.claim_offer("nope", NOW) is False


def test_find_offer_by_id(store: Store) -> None:
    offer(store, "o1", 1)
    found = store.find_offer("o1", spoken=False)
    assert found is not None and found.id == "o1"
    assert store.find_offer("1", spoken=False) is None  # an id is not a number
    assert store.find_offer("nope", spoken=False) is None


def test_find_offer_by_spoken_number_prefers_the_active_offer(store: Store) -> None:
    offer(store, "active", 5, created=NOW)
    offer(store, "used-later", 5, created=NOW + 50)
    store.set_offer_state("used-later", "completed")
    offer(store, "other", 6, created=NOW + 60)
    found = store.find_offer("5", spoken=True)
    assert found is not None and found.id == "active"


def test_find_offer_by_spoken_number_still_finds_a_used_offer(store: Store) -> None:
    offer(store, "older", 5, created=NOW)
    store.set_offer_state("older", "cancelled")
    offer(store, "used", 5, created=NOW + 10)
    assert store.claim_offer("used", NOW + 11)
    found = store.find_offer("5", spoken=True)
    # The newest offer with that number, so the receiver hears "used", not "unknown".
    assert found is not None and (found.id, found.state) == ("used", "paired")


@pytest.mark.parametrize("ref", ["9", "x", "", "-5", "5a", "o1"])
def test_find_offer_by_spoken_number_that_no_offer_has_is_none(store: Store, ref: str) -> None:
    offer(store, "o1", 5)
    assert store.find_offer(ref, spoken=True) is None


def test_expire_offers_ends_only_active_offers_past_their_time(store: Store) -> None:
    offer(store, "due", 1, expires=NOW)
    offer(store, "overdue", 2, expires=NOW - 100)
    offer(store, "later", 3, expires=NOW + 1)
    offer(store, "claimed", 4, expires=NOW - 1)
    store.set_offer_state("claimed", "sending")
    assert sorted(store.expire_offers(NOW)) == ["due", "overdue"]
    assert [state(store, i) for i in ("due", "overdue", "later", "claimed")] == [
        "expired",
        "expired",
        "active",
        "sending",
    ]
    assert store.expire_offers(NOW) == []


# -- peers (trust on first use) ------------------------------------------------------------------


def test_first_contact_pins_the_peer(store: Store) -> None:
    assert store.check_pin("Trauma Centre", KEY_A, NOW, "10.0.0.5:8700") is True
    assert store.list_peers() == [
        {
            "name": "Trauma Centre",
            "fingerprint": crypto.fingerprint(KEY_A),
            "first_seen": NOW,
            "last_seen": NOW,
            "last_address": "10.0.0.5:8700",
        }
    ]


def test_the_same_key_again_is_not_first_contact_and_updates_last_seen(store: Store) -> None:
    store.check_pin("Trauma Centre", KEY_A, NOW, "10.0.0.5:8700")
    assert store.check_pin("Trauma Centre", KEY_A, NOW + 60, "10.0.0.9:8701") is False
    assert store.list_peers() == [
        {
            "name": "Trauma Centre",
            "fingerprint": crypto.fingerprint(KEY_A),
            "first_seen": NOW,
            "last_seen": NOW + 60,
            "last_address": "10.0.0.9:8701",
        }
    ]


def test_another_key_for_a_pinned_name_is_refused_naming_both_fingerprints(
    store: Store,
) -> None:
    store.check_pin("Trauma Centre", KEY_A, NOW, "10.0.0.5:8700")
    with pytest.raises(PeerKeyChanged) as info:
        store.check_pin("Trauma Centre", KEY_B, NOW + 60, "10.6.6.6:8700")
    exc = info.value
    fa, fb = crypto.fingerprint(KEY_A), crypto.fingerprint(KEY_B)
    assert (exc.name, exc.pinned, exc.presented, exc.code) == (
        "Trauma Centre",
        fa,
        fb,
        "peer-key-changed",
    )
    assert fa in exc.message and fb in exc.message
    assert 'p2pshare peers forget "Trauma Centre"' in exc.message
    assert str(exc) == exc.message
    # The refused contact changes nothing about the pin.
    assert store.list_peers()[0]["last_seen"] == NOW
    assert store.list_peers()[0]["last_address"] == "10.0.0.5:8700"
    assert store.list_peers()[0]["fingerprint"] == fa


def test_pins_are_per_name(store: Store) -> None:
    assert store.check_pin("B Hospital", KEY_B, NOW) is True
    assert store.check_pin("A Hospital", KEY_A, NOW) is True
    assert [(p["name"], p["fingerprint"], p["last_address"]) for p in store.list_peers()] == [
        ("A Hospital", crypto.fingerprint(KEY_A), ""),
        ("B Hospital", crypto.fingerprint(KEY_B), ""),
    ]


def test_forget_peer_allows_a_new_key_to_be_pinned(store: Store) -> None:
    store.check_pin("Trauma Centre", KEY_A, NOW)
    assert store.forget_peer("Trauma Centre") is True
    assert store.list_peers() == []
    assert store.forget_peer("Trauma Centre") is False
    assert store.check_pin("Trauma Centre", KEY_B, NOW + 5) is True
    assert store.list_peers()[0]["fingerprint"] == crypto.fingerprint(KEY_B)
    assert store.list_peers()[0]["first_seen"] == NOW + 5


# -- receiving transfers ---------------------------------------------------------------------------


def test_transfers_round_trip_with_a_receipt_dict(store: Store) -> None:
    store.add_transfer("job1", NOW, "/srv/incoming")
    assert store.get_transfer("job1") == {
        "id": "job1",
        "created": NOW,
        "state": "connecting",
        "out_dir": "/srv/incoming",
        "peer_name": None,
        "peer_fingerprint": None,
        "transfer_id": None,
        "verified": 0,
        "receipt": None,
        "error": None,
        "finished": None,
        "consent": None,
        "path": None,
        "resume_id": None,
        "resume_expires": None,
        "offer_id": None,
        "sender_address": None,
        "staging": None,
    }
    receipt = {"manifest_sha256": "cd" * 32, "instances": 2, "bytes": 2001}
    store.update_transfer("job1", state="receiving", manifest=manifest().to_bytes())
    store.update_transfer(
        "job1", state="complete", verified=2, receipt=receipt, finished=NOW + 30, peer_name="ED"
    )
    got = store.get_transfer("job1")
    assert got == {
        "id": "job1",
        "created": NOW,
        "state": "complete",
        "out_dir": "/srv/incoming",
        "peer_name": "ED",
        "peer_fingerprint": None,
        "transfer_id": None,
        "verified": 2,
        "receipt": receipt,
        "error": None,
        "finished": NOW + 30,
        "consent": None,
        "path": None,
        "resume_id": None,
        "resume_expires": None,
        "offer_id": None,
        "sender_address": None,
        "staging": None,
    }
    assert "manifest" not in got  # bulky and holds patient data: never shown


def test_get_transfer_of_an_unknown_job_is_none(store: Store) -> None:
    assert store.get_transfer("nope") is None


def test_live_offers_lists_only_waiting_offers(tmp_path: Path) -> None:
    from tests.protocol.helpers import make_files, make_manifest

    store = Store(tmp_path / "live")
    try:
        assert store.live_offers() == []
        manifest = make_manifest(make_files(1, 100))
        for i, state in enumerate(["active", "completed", "active"]):
            store.add_offer(
                offer_id=f"{i:032x}",
                number=i + 1,
                spoken_code=f"{i + 1}-a-b-c-d",
                qr_secret=b"s" * 32,
                manifest=manifest,
                sources=[],
                created=0,
                expires=100 + i,
            )
            if state != "active":
                store.set_offer_state(f"{i:032x}", state)
        assert sorted(store.live_offers()) == [(f"{0:032x}", 100), (f"{2:032x}", 102)]
    finally:
        store.close()


@pytest.mark.parametrize("ref", ["²", "1" * 40, "-1", " 1", ""])
def test_odd_spoken_offer_numbers_find_nothing_and_raise_nothing(store: Store, ref: str) -> None:
    offer(store, "o1", 1)
    assert store.find_offer(ref, spoken=True) is None


@pytest.mark.parametrize("end", ["claim", "expire", "burn", "cancel"])
def test_an_offer_forgets_its_code_once_it_can_no_longer_be_paired(store: Store, end: str) -> None:
    offer(store, "o1", 1)
    assert store.get_offer("o1").spoken_code  # type: ignore[union-attr]  # kept while waiting
    if end == "claim":
        assert store.claim_offer("o1", NOW)
    elif end == "expire":
        store.expire_offers(10**12)
    elif end == "burn":
        for _ in range(MAX_FAILED_ATTEMPTS):
            store.record_failed_attempt("o1")
    else:
        store.set_offer_state("o1", "cancelled")
    got = store.get_offer("o1")
    assert got is not None and got.state != "active"
    assert (got.spoken_code, got.qr_secret) == ("", b"")
    raw = store.db.execute("SELECT spoken_code, qr_secret FROM offers WHERE id='o1'").fetchone()
    assert (raw[0], bytes(raw[1])) == ("", b"")


def test_a_resume_ticket_is_kept_but_never_shown(store: Store) -> None:
    store.add_transfer("job1", NOW, "/srv/incoming")
    store.set_resume("transfers", "job1", "ab" * 16, b"s" * 32, NOW + 60, offer_id="o1")
    assert store.resume_secret("transfers", "job1", NOW) == ("ab" * 16, b"s" * 32)
    assert store.resume_secret("transfers", "job1", NOW + 60) is None  # expired
    shown = store.get_transfer("job1")
    assert shown is not None and "resume_secret" not in shown and shown["offer_id"] == "o1"


def test_receives_that_can_no_longer_resume_are_failed_and_their_staging_given_back(
    store: Store,
) -> None:
    for job, expires in (("live", NOW + 60), ("stale", NOW - 1)):
        store.add_transfer(job, NOW, "/srv/incoming")
        store.update_transfer(job, state="receiving")
        store.set_resume("transfers", job, job * 4, b"s" * 32, expires,
                         staging=f"/srv/incoming/.p2pshare-partial/{job}")  # fmt: skip
    # after a restart: the live one waits for a resume, the stale one is over
    assert store.receives_on_start(NOW) == ["/srv/incoming/.p2pshare-partial/stale"]
    assert store.get_transfer("live")["state"] == "interrupted"  # type: ignore[index]
    assert store.get_transfer("stale")["state"] == "failed"  # type: ignore[index]
    # later, the sweep ends the other one once its ticket expired
    assert store.expire_receives(NOW + 61) == ["/srv/incoming/.p2pshare-partial/live"]
    assert store.resume_secret("transfers", "live", NOW) is None


def _as_version_1(m: Manifest) -> bytes:
    """The same study as a node before per-file BLAKE3 stored it: version 1, SHA-256 per file."""
    d = m.to_dict()
    d["version"] = 1
    for inst in d["instances"]:
        inst["sha256"] = inst.pop("blake3")
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def test_a_transfer_stored_with_a_version_1_manifest_still_reads(store: Store) -> None:
    # Received before the upgrade: history, viewer and PACS export read it from the database.
    old = _as_version_1(manifest(3))
    store.add_transfer("old", NOW, "/srv/incoming")
    store.update_transfer("old", state="complete", manifest=old)
    m = store.get_transfer_manifest("old")
    assert m is not None and m.version == 1 and m.digest_algorithm == "sha256"
    assert m.to_bytes() == old  # the signed bytes, unchanged
    listed = store.list_transfers()
    assert [t["id"] for t in listed] == ["old"] and listed[0]["study"]["instances"] == 3
    # but a peer may not send one
    with pytest.raises(ManifestError, match="reads version 2"):
        Manifest.from_bytes(old)
