"""The consent gate on the wire: no chunk without a valid, signed, bound consent record."""

from __future__ import annotations

import pytest

from p2pshare import crypto
from p2pshare.errors import LocalProtocolError, RemoteProtocolError
from p2pshare.protocol import consent
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import FrameType
from tests.protocol.helpers import (
    OFFER_ID,
    consent_record_for,
    forge_chunk,
    make_files,
    make_manifest,
    make_pair,
    run,
    seeded,
    wire_frames,
)

FILES = make_files(3, 9000)
MANIFEST = make_manifest(FILES)


def chunk_count(out) -> int:
    return sum(1 for f in wire_frames(out.wire_s2r) if f.ftype == FrameType.CHUNK)


def test_record_reaches_the_receiver_before_any_chunk_and_is_bound():
    sender, receiver, ids, idr = make_pair()
    out = run(sender, receiver, FILES, MANIFEST)
    assert out.receipt is not None
    granted = [e for e in out.receiver_events if isinstance(e, ev.ConsentGranted)]
    assert len(granted) == 1
    rec = granted[0].record
    assert rec["manifest_sha256"] == receiver.manifest_digest
    assert rec["destination"]["fingerprint"] == crypto.fingerprint(idr.public_key)
    assert rec["sender"] == crypto.fingerprint(ids.public_key)
    kinds = [type(e).__name__ for e in out.receiver_events]
    assert kinds.index("ConsentGranted") < kinds.index("Chunk")
    crypto.verify_signature(ids.public_key, consent.sign_bytes(granted[0].raw), granted[0].signature)


def test_without_consent_the_sender_sends_nothing_and_cannot_be_forced():
    sender, receiver, _, _ = make_pair()
    out = run(sender, receiver, FILES, MANIFEST, consent=False)
    assert chunk_count(out) == 0
    assert out.receipt is None and not out.files
    assert sender.awaiting_consent and not sender.window_open
    with pytest.raises(LocalProtocolError):
        sender.send_chunk(0, 0, FILES[0][:4096])


def test_a_chunk_before_the_record_is_refused_and_nothing_is_kept():
    sender, receiver, _, _ = make_pair()

    def skip_consent(s, e):
        if isinstance(e, ev.Accepted):
            s._out.append(forge_chunk(s, 0, 0, FILES[0][:4096], 0))
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=skip_consent)
    assert out.receiver_error is not None and out.receiver_error.code == "consent"
    assert not any(isinstance(e, ev.Chunk) for e in out.receiver_events)


def _run_with_record(make_record):
    sender, receiver, ids, idr = make_pair()

    def send_bad(s, e):
        if isinstance(e, ev.Accepted):
            s.send_consent(*make_record(s, ids, idr))
            return True
        return False

    return run(sender, receiver, FILES, MANIFEST, on_sender_event=send_bad)


def _signed(s, fields):
    record = consent.build(**fields)
    return record, s._sign(consent.sign_bytes(record))


def _fields(s, **changes):
    base = {
        "offer_id": OFFER_ID,
        "manifest_sha256": s.manifest_digest,
        "sender_fingerprint": crypto.fingerprint(s._pk),
        "destination_fingerprint": crypto.fingerprint(s.peer_key),
        "destination_name": s.peer_name,
        "intended_destination": None,
        "shown_to_decider": "verified",
        "decision": "approved",
        "decided_by": {"role": "patient"},
        "method": "phone-link",
        "policy": "patient",
        "at": 1,
    }
    return base | changes


@pytest.mark.parametrize(
    ("name", "make_record", "code"),
    [
        (
            "signed by another key",
            lambda s, ids, idr: (
                consent_record_for(s)[0],
                crypto.Identity.generate(seeded(77)).sign(
                    consent.sign_bytes(consent_record_for(s)[0])
                ),
            ),
            "integrity",
        ),
        (
            "for another manifest",
            lambda s, ids, idr: _signed(s, _fields(s, manifest_sha256="0" * 64)),
            "consent",
        ),
        (
            "for another destination",
            lambda s, ids, idr: _signed(
                s,
                _fields(
                    s,
                    destination_fingerprint=crypto.fingerprint(
                        crypto.Identity.generate(seeded(5)).public_key
                    ),
                ),
            ),
            "consent",
        ),
        (
            "for another offer",
            lambda s, ids, idr: _signed(s, _fields(s, offer_id="f" * 32)),
            "consent",
        ),
        (
            "a decision with the wrong method",
            lambda s, ids, idr: (
                (raw := consent_record_for(s)[0].replace(b'"phone-link"', b'"break-glass"')),
                s._sign(consent.sign_bytes(raw)),
            ),
            "consent",
        ),
        (
            "truncated signature",
            lambda s, ids, idr: (consent_record_for(s)[0], consent_record_for(s)[1][:40]),
            "consent",
        ),
    ],
)
def test_a_bad_record_stops_the_transfer_before_any_image(name, make_record, code):
    out = _run_with_record(make_record)
    assert out.receiver_error is not None, name
    assert out.receiver_error.code == code, (name, out.receiver_error.message)
    assert not any(isinstance(e, ev.ConsentGranted) for e in out.receiver_events)
    assert not out.files


def test_a_second_record_is_a_protocol_violation():
    sender, receiver, _, _ = make_pair()

    def twice(s, e):
        if isinstance(e, ev.Accepted):
            record, sig = consent_record_for(s)
            s.send_consent(record, sig)
            s.consent_sent = False  # a hostile sender re-arms its own guard
            s.send_consent(record, sig)
            return True
        return False

    out = run(sender, receiver, FILES, MANIFEST, on_sender_event=twice)
    assert out.receiver_error is not None and "second consent" in out.receiver_error.message


def test_send_consent_refuses_twice_and_before_the_manifest():
    sender, receiver, _, _ = make_pair()
    with pytest.raises(LocalProtocolError):
        sender.send_consent(b"{}", b"x" * 64)
    run(sender, receiver, FILES, MANIFEST)
    with pytest.raises(LocalProtocolError):
        sender.send_consent(*consent_record_for(sender))


def test_revocation_mid_stream_reaches_the_receiver_as_a_consent_error():
    files = make_files(3, 40_000)
    manifest = make_manifest(files)
    sender, receiver, _, _ = make_pair(window=2)
    state = {"acks": 0}

    def on_sender(s, e):
        if isinstance(e, ev.Accepted):
            s.send_consent(*consent_record_for(s))
            # two chunks go out, then the patient revokes: the driver refuses with a sealed error
            for _ in range(2):
                fi, ci, off, length = s.next_chunk()
                s.send_chunk(fi, ci, files[fi][off : off + length])
            s.refuse("consent-revoked", "the patient revoked consent at the sending hospital")
            state["acks"] += 1
            return True
        return False

    out = run(sender, receiver, files, manifest, on_sender_event=on_sender)
    assert state["acks"] == 1
    assert sum(isinstance(e, ev.Chunk) for e in out.receiver_events) == 2
    errors = [e for e in out.receiver_events if isinstance(e, ev.RemoteError)]
    assert errors and errors[0].code == "consent-revoked"
    assert out.receipt is None and not out.verified


def test_describe_says_who_decided():
    base = {"decided_by": {"role": "patient"}, "decision": "approved"}
    assert consent.describe(base) == "authorised by the patient"
    rep = {"decided_by": {"role": "representative", "name": "A Person", "relationship": "son"},
           "decision": "approved"}  # fmt: skip
    assert "representative A Person (son)" in consent.describe(rep)
    glass = {"decided_by": {"role": "clinician", "name": "ED consultant", "reason": "Unconscious."},
             "decision": "break-glass"}  # fmt: skip
    assert consent.describe(glass).startswith("BREAK-GLASS by ED consultant: Unconscious.")
    with pytest.raises(RemoteProtocolError):
        consent.check(b"x" * 9000, b"s" * 64, sender_key=b"k" * 32, receiver_key=b"r" * 32,
                      offer_id="o", manifest_sha256="m")  # fmt: skip
