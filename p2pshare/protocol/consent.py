"""The consent record: who authorised this transfer, of which study, to which destination.

The sending node builds the record just before the first image leaves, from its consent
decision (the patient or a representative on the phone page, a clinician's break-glass, or a
node policy that needs none), signs it with its identity key and seals it to the receiver as a
CONSENT message. The record binds the manifest digest, the offer and the destination's identity
key, so it can neither be replayed for another study nor shown to another institution.

The receiver refuses any image that arrives before a valid record (see ``receiver.py``), so a
sender that skipped its consent gate is caught on the other side too.
"""

from __future__ import annotations

from typing import Any

from p2pshare import crypto
from p2pshare.errors import CryptoError, RemoteProtocolError
from p2pshare.protocol.frames import dump_json, load_json

SIGNATURE_LABEL = b"p2pshare/1 consent\0"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 8192

#: decision → the method that may carry it
DECISIONS = {
    "approved": {"phone-link"},
    "break-glass": {"break-glass"},
    "not-required": {"policy-none"},
}
ROLES = {"patient", "representative", "clinician", "policy"}


def build(
    *,
    offer_id: str,
    manifest_sha256: str,
    sender_fingerprint: str,
    destination_fingerprint: str,
    destination_name: str,
    intended_destination: str | None,
    shown_to_decider: str,
    decision: str,
    decided_by: dict[str, str],
    method: str,
    policy: str,
    at: int,
    valid_until: int | None = None,
) -> bytes:
    """The canonical bytes of a consent record (sign them with :func:`sign_bytes`)."""
    record: dict[str, Any] = {
        "v": RECORD_VERSION,
        "offer_id": offer_id,
        "manifest_sha256": manifest_sha256,
        "sender": sender_fingerprint,
        "destination": {
            "fingerprint": destination_fingerprint,
            "name": destination_name,
            "intended": intended_destination,
            "shown_to_decider": shown_to_decider,
        },
        "decision": decision,
        "decided_by": decided_by,
        "method": method,
        "policy": policy,
        "at": at,
        "valid_until": valid_until,
    }
    _check_shape(record)
    return dump_json(record)


def sign_bytes(record: bytes) -> bytes:
    """What the sending node's identity key signs."""
    return SIGNATURE_LABEL + record


def check(
    record: bytes,
    signature: bytes,
    *,
    sender_key: bytes,
    receiver_key: bytes,
    offer_id: str,
    manifest_sha256: str,
) -> dict[str, Any]:
    """Verify a received record; returns it parsed or raises RemoteProtocolError."""
    if len(record) > MAX_RECORD_BYTES:
        raise RemoteProtocolError("the sender sent an oversized consent record")
    try:
        crypto.verify_signature(sender_key, sign_bytes(record), signature)
    except CryptoError:
        raise RemoteProtocolError(
            "the consent record's signature is invalid", "integrity"
        ) from None
    parsed = load_json(record, "consent record")
    _check_shape(parsed)
    if parsed["offer_id"] != offer_id or parsed["manifest_sha256"] != manifest_sha256:
        raise RemoteProtocolError("the consent record is for another study or offer", "consent")
    if parsed["sender"] != crypto.fingerprint(sender_key):
        raise RemoteProtocolError("the consent record names another sending node", "consent")
    if parsed["destination"]["fingerprint"] != crypto.fingerprint(receiver_key):
        raise RemoteProtocolError(
            "the consent record authorises another destination, not this node", "consent"
        )
    return parsed


def _text(value: object, limit: int, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, str) and 0 < len(value) <= limit


def _check_shape(r: dict[str, Any]) -> None:
    """Every field present, of the right type and bounded; nothing else."""
    bad = RemoteProtocolError("the sender sent a malformed consent record", "consent")
    expected = {
        "v", "offer_id", "manifest_sha256", "sender", "destination", "decision",
        "decided_by", "method", "policy", "at", "valid_until",
    }  # fmt: skip
    if set(r) != expected or r["v"] != RECORD_VERSION:
        raise bad
    dest, by = r["destination"], r["decided_by"]
    if not (
        _text(r["offer_id"], 64)
        and _text(r["manifest_sha256"], 64)
        and _text(r["sender"], 128)
        and isinstance(dest, dict)
        and set(dest) == {"fingerprint", "name", "intended", "shown_to_decider"}
        and _text(dest["fingerprint"], 128)
        and _text(dest["name"], 128)
        and _text(dest["intended"], 128, optional=True)
        and dest["shown_to_decider"] in ("verified", "intended", "none")
        and r["method"] in DECISIONS.get(r["decision"], set())
        and _text(r["policy"], 32)
        and isinstance(r["at"], int)
        and not isinstance(r["at"], bool)
        and (r["valid_until"] is None or isinstance(r["valid_until"], int))
        and isinstance(by, dict)
        and len(by) <= 4
        and by.get("role") in ROLES
        and all(isinstance(k, str) and _text(v, 1000) for k, v in by.items())
    ):
        raise bad


def describe(record: dict[str, Any]) -> str:
    """One line a person reads on the receiving side."""
    by = record["decided_by"]
    if record["decision"] == "break-glass":
        return f"BREAK-GLASS by {by.get('name', 'a clinician')}: {by.get('reason', '')}"
    if record["decision"] == "not-required":
        return "no consent asked: the sending node's policy is 'none' (tests and demos only)"
    if by.get("role") == "representative":
        who = f"{by.get('name', '')} ({by.get('relationship', 'representative')})"
        return f"authorised by the patient's representative {who}"
    return "authorised by the patient"
