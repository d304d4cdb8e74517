"""The audit in the standard vocabularies: the DICOM mapping, FHIR R4 AuditEvent, DICOM XML.

The FHIR resources are checked structurally against the R4 AuditEvent definition (elements,
cardinalities, value sets, primitive formats; unknown elements are refused as FHIR JSON
requires), and the DICOM messages against the PS3.15 A.5.1 schema's elements, order and
attributes. Both checkers are themselves shown to reject a broken document.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from p2pshare import audit_export as ax

SOURCE = ax.Source("Referring Hospital ED", "ABCD-EFGH-IJKL-MNOP-QRST-UVWX")
OFFER = "a" * 32
TRANSFER = "b" * 32
STUDY = "1.2.826.0.1.3680043.8.498.1"
PACKAGE = Path(__file__).resolve().parent.parent / "p2pshare"


def rec(seq: int, action: str, outcome: str = "ok", **detail: Any) -> dict[str, Any]:
    return {"seq": seq, "at": 1_780_000_000 + seq, "action": action, "outcome": outcome,
            "detail": detail}


RECORDS = [
    rec(1, "audit-sealed", key=SOURCE.fingerprint),
    rec(2, "node-started", name=SOURCE.name, fingerprint=SOURCE.fingerprint),
    rec(3, "offer-created", offer=OFFER, study=STUDY, instances=5, expires=1_780_000_900),
    rec(4, "pairing-attempt", "wrong-code", offer=OFFER, address="192.0.2.7", tries_left=2),
    rec(5, "pairing-attempt", "ok", offer=OFFER, address="192.0.2.7", peer="PEER-FP"),
    rec(6, "transfer-started", offer=OFFER, study=STUDY, peer="PEER-FP", resumed_files=0),
    rec(7, "receipt-received", offer=OFFER, manifest_sha256="c" * 64, peer="PEER-FP"),
    rec(8, "staff-sign-in", "locked", user="radiographer1", address="10.0.0.9"),
    rec(9, "break-glass", offer=OFFER, study=STUDY, user="dr-er", reason="unconscious"),
    rec(10, "peer-key-changed", "refused", name="Trauma Centre", fingerprint="NEW-FP",
        expected="OLD-FP", address="192.0.2.8"),
    rec(11, "a-future-action", "ok", something=[1, {"x": None}]),
    rec(12, "another-future-action", "exploded", job="j1"),
]


# -- the mapping -----------------------------------------------------------------------------------

# (action, outcome) → (EventID, EventActionCode, EventTypeCode or None, outcome indicator)
MAPPING = [
    ("node-started", "ok", "110100", "E", "110120", 0),
    ("audit-sealed", "ok", "110113", "E", "110134", 0),
    ("audit-chain-broken", "integrity", "110113", "E", "110132", 12),
    ("audit-log-used", "ok", "110101", "R", None, 0),
    ("offer-created", "ok", "110103", "C", None, 0),
    ("offer-expired", "ok", "110103", "U", None, 0),
    ("offer-cancelled", "ok", "110103", "U", None, 0),
    ("offer-burnt", "ok", "110113", "E", "110126", 12),
    ("pairing-attempt", "ok", "110114", "E", "110122", 0),
    ("pairing-attempt", "wrong-code", "110114", "E", "110122", 4),
    ("pairing-attempt", "busy", "110114", "E", "110122", 4),
    ("pairing-attempt", "offer-expired", "110114", "E", "110122", 4),
    ("pairing", "ok", "110114", "E", "110122", 0),
    ("peer-pinned", "ok", "110113", "E", "110129", 0),
    ("peer-key-changed", "refused", "110113", "E", "110126", 12),
    ("consent-requested", "ok", "110110", "C", None, 0),
    ("consent-viewed", "ok", "110110", "R", None, 0),
    ("consent-approved", "ok", "110110", "U", None, 0),
    ("consent-declined", "ok", "110110", "U", None, 0),
    ("consent-revoked", "ok", "110110", "U", None, 0),
    ("consent-dob-mismatch", "failed", "110114", "E", "110122", 4),
    ("consent-link-dead", "failed", "110113", "E", "110132", 4),
    ("break-glass", "ok", "110113", "E", "110127", 0),
    ("notification-queued", "ok", "110106", "R", None, 0),
    ("notification-sent", "ok", "110106", "R", None, 0),
    ("notification-failed", "failed", "110106", "R", None, 8),
    ("staff-sign-in", "ok", "110114", "E", "110122", 0),
    ("staff-sign-in", "failed", "110114", "E", "110122", 4),
    ("staff-sign-in", "locked", "110114", "E", "110122", 8),
    ("staff-sign-out", "ok", "110114", "E", "110123", 0),
    ("study-viewed", "ok", "110103", "R", None, 0),
    ("study-imported", "ok", "110107", "C", None, 0),
    ("study-received-dicom", "ok", "110104", "C", None, 0),
    ("export-to-pacs", "ok", "110104", "R", None, 0),
    ("transfer-started", "ok", "110102", "E", None, 0),
    ("transfer-resumed", "ok", "110102", "E", None, 0),
    ("transfer-failed", "connection-lost", "110104", "R", None, 8),
    ("transfer-failed", "integrity", "110104", "R", None, 12),
    ("receipt-signed", "ok", "110104", "C", None, 0),
    ("relay-channel", "ok", "110108", "E", "110124", 0),
    ("something-new", "ok", "110100", "E", None, 0),
    ("something-new", "failed", "110113", "E", "110132", 8),
]


@pytest.mark.parametrize(("action", "outcome", "event_id", "verb", "type_code", "indicator"), MAPPING)
def test_each_action_maps_to_the_dicom_vocabulary(
    action: str, outcome: str, event_id: str, verb: str, type_code: str | None, indicator: int
) -> None:
    event = ax.map_record(rec(1, action, outcome, offer=OFFER), SOURCE)
    assert event.kind.event_id[0] == event_id
    assert event.kind.action == verb
    assert (event.kind.type_code[0] if event.kind.type_code else None) == type_code
    assert event.indicator == indicator


def test_every_action_the_package_records_has_its_own_mapping() -> None:
    """Whoever adds an audit action adds its DICOM mapping to audit_export.EVENTS too."""
    used: set[str] = set()
    call = re.compile(r'(?:\.audit|_audit)\(\s*(?:request,\s*|app,\s*)?"([a-z][a-z-]+)"')
    either = re.compile(r'"([a-z]+-[a-z-]+)" if [^\n]* else "([a-z]+-[a-z-]+)"')
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        used.update(call.findall(text))
        for m in either.finditer(text):
            if "audit" in text[max(0, m.start() - 200) : m.start()]:
                used.update(m.groups())
    assert {"offer-created", "pairing-attempt", "transfer-started", "node-started"} <= used
    assert sorted(used - set(ax.EVENTS)) == []


def test_the_requestor_is_whoever_started_the_event() -> None:
    def requestors(r: dict[str, Any]) -> list[str]:
        return [a.user_id for a in ax.map_record(r, SOURCE).agents if a.requestor]

    assert requestors(RECORDS[3]) == ["192.0.2.7"]  # a receiver dialled in with a code
    assert requestors(RECORDS[7]) == ["radiographer1"]  # staff signing in
    assert requestors(RECORDS[8]) == ["dr-er"]  # the clinician who broke the glass
    assert requestors(RECORDS[1]) == [SOURCE.fingerprint]  # the node itself
    # node-started names this node's own fingerprint: it is not taken for a peer
    assert [a.user_id for a in ax.map_record(RECORDS[1], SOURCE).agents] == [SOURCE.fingerprint]
    # a user-started action without a user falls back to the node as requestor
    assert requestors(rec(1, "study-viewed", study=STUDY)) == [SOURCE.fingerprint]


def test_transfers_name_source_and_destination_by_side() -> None:
    sending = ax.map_record(RECORDS[5], SOURCE)
    receiving = ax.map_record(rec(1, "receipt-signed", transfer=TRANSFER, peer="PEER-FP"), SOURCE)
    roles = {a.user_id: [r[0] for r in a.roles] for a in sending.agents}
    assert roles == {SOURCE.fingerprint: ["110150", "110153"], "PEER-FP": ["110152"]}
    roles = {a.user_id: [r[0] for r in a.roles] for a in receiving.agents}
    assert roles == {SOURCE.fingerprint: ["110150", "110152"], "PEER-FP": ["110153"]}


@pytest.mark.parametrize(
    "record",
    [
        {"seq": 1, "at": 5, "action": "x", "outcome": "ok", "detail": None},
        {"seq": 1, "at": 5, "action": "x", "outcome": "weird", "detail": ["not", "a", "dict"]},
        rec(1, "x", "ok", study=None, offer=12345, user=["a"], address={"h": 1}),
        rec(1, "transfer-started", "ok", offer=OFFER, address="not an address at all"),
        rec(1, "y", "<&>\"'", note="<AuditMessage>&amp;\x7f"),
    ],
)
def test_odd_records_still_export_in_both_formats(record: dict[str, Any]) -> None:
    check_fhir_bundle(json.loads(ax.fhir_json([record], SOURCE)))
    check_dicom_document(ax.dicom_audit_xml([record], SOURCE))


# -- FHIR R4 AuditEvent ---------------------------------------------------------------------------

INSTANT = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
CODE = re.compile(r"[^\s]+( [^\s]+)*")
URI = re.compile(r"\S*")

# element → (min, max or None for *, type); types: a primitive name or a dict of sub-elements
CODING = {
    "system": (0, 1, "uri"),
    "version": (0, 1, "string"),
    "code": (0, 1, "code"),
    "display": (0, 1, "string"),
    "userSelected": (0, 1, "boolean"),
}
CODEABLE = {"coding": (0, None, CODING), "text": (0, 1, "string")}
IDENTIFIER = {
    "use": (0, 1, "code"),
    "type": (0, 1, CODEABLE),
    "system": (0, 1, "uri"),
    "value": (0, 1, "string"),
}
REFERENCE = {
    "reference": (0, 1, "string"),
    "type": (0, 1, "uri"),
    "identifier": (0, 1, IDENTIFIER),
    "display": (0, 1, "string"),
}
AUDIT_EVENT = {
    "resourceType": (1, 1, "string"),
    "id": (0, 1, "id"),
    "type": (1, 1, CODING),
    "subtype": (0, None, CODING),
    "action": (0, 1, "code"),
    "period": (0, 1, {"start": (0, 1, "instant"), "end": (0, 1, "instant")}),
    "recorded": (1, 1, "instant"),
    "outcome": (0, 1, "code"),
    "outcomeDesc": (0, 1, "string"),
    "purposeOfEvent": (0, None, CODEABLE),
    "agent": (
        1,
        None,
        {
            "type": (0, 1, CODEABLE),
            "role": (0, None, CODEABLE),
            "who": (0, 1, REFERENCE),
            "altId": (0, 1, "string"),
            "name": (0, 1, "string"),
            "requestor": (1, 1, "boolean"),
            "location": (0, 1, REFERENCE),
            "policy": (0, None, "uri"),
            "media": (0, 1, CODING),
            "network": (0, 1, {"address": (0, 1, "string"), "type": (0, 1, "code")}),
            "purposeOfUse": (0, None, CODEABLE),
        },
    ),
    "source": (
        1,
        1,
        {"site": (0, 1, "string"), "observer": (1, 1, REFERENCE), "type": (0, None, CODING)},
    ),
    "entity": (
        0,
        None,
        {
            "what": (0, 1, REFERENCE),
            "type": (0, 1, CODING),
            "role": (0, 1, CODING),
            "lifecycle": (0, 1, CODING),
            "securityLabel": (0, None, CODING),
            "name": (0, 1, "string"),
            "description": (0, 1, "string"),
            "query": (0, 1, "base64Binary"),
            "detail": (
                0,
                None,
                {
                    "type": (1, 1, "string"),
                    "valueString": (0, 1, "string"),
                    "valueBase64Binary": (0, 1, "base64Binary"),
                },
            ),
        },
    ),
}
VALUE_SETS = {
    ("action",): {"C", "R", "U", "D", "E"},
    ("outcome",): {"0", "4", "8", "12"},
    ("agent", "network", "type"): {"1", "2", "3", "4", "5"},
}


def _check_primitive(kind: str, value: Any, where: str) -> None:
    if kind == "boolean":
        assert isinstance(value, bool), where
        return
    assert isinstance(value, str) and value != "", where
    if kind == "instant":
        assert INSTANT.fullmatch(value), f"{where}: {value!r} is not an instant"
    elif kind == "code":
        assert CODE.fullmatch(value), f"{where}: {value!r} is not a code"
    elif kind == "uri":
        assert URI.fullmatch(value), f"{where}: {value!r} is not a uri"
    elif kind == "id":
        assert re.fullmatch(r"[A-Za-z0-9\-\.]{1,64}", value), f"{where}: {value!r} is not an id"
    elif kind == "base64Binary":
        base64.b64decode(value, validate=True)


def _check(obj: Any, spec: dict[str, Any], where: str, path: tuple[str, ...]) -> None:
    assert isinstance(obj, dict) and obj, f"{where} must be a non-empty object"
    unknown = set(obj) - set(spec)
    assert not unknown, f"{where} has elements AuditEvent does not define: {unknown}"
    for name, (low, high, kind) in spec.items():
        value = obj.get(name)
        values = [] if value is None else value if isinstance(value, list) else [value]
        if high != 1:
            assert value is None or isinstance(value, list), f"{where}.{name} must be an array"
        else:
            assert not isinstance(value, list), f"{where}.{name} must not be an array"
        assert len(values) >= low, f"{where}.{name} is required"
        for i, v in enumerate(values):
            at = f"{where}.{name}[{i}]"
            if isinstance(kind, dict):
                _check(v, kind, at, (*path, name))
            else:
                _check_primitive(kind, v, at)
                allowed = VALUE_SETS.get((*path, name))
                assert allowed is None or v in allowed, f"{at}: {v!r} not in {allowed}"


def check_audit_event(resource: dict[str, Any]) -> None:
    assert resource.get("resourceType") == "AuditEvent"
    _check(resource, AUDIT_EVENT, "AuditEvent", ())
    for e in resource.get("entity", []):
        assert not ("name" in e and "query" in e), "sev-1: an entity has a name or a query"
        for d in e.get("detail", []):
            assert ("valueString" in d) != ("valueBase64Binary" in d), "detail.value[x] is 1..1"


def check_fhir_bundle(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    assert INSTANT.fullmatch(bundle["timestamp"])
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(urls)) == len(urls) and all(u.startswith("urn:uuid:") for u in urls)
    resources = [e["resource"] for e in bundle["entry"]]
    for r in resources:
        check_audit_event(r)
    return resources


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: r.pop("type"), "type is required"),
        (lambda r: r.pop("recorded"), "recorded is required"),
        (lambda r: r.__setitem__("recorded", "2026-12-04"), "is not an instant"),
        (lambda r: r.pop("agent"), "agent is required"),
        (lambda r: r["agent"][0].pop("requestor"), "requestor is required"),
        (lambda r: r["agent"][0].__setitem__("requestor", "true"), "requestor"),
        (lambda r: r["source"].pop("observer"), "observer is required"),
        (lambda r: r.__setitem__("type", {"coding": [r["type"]]}), "does not define"),
        (lambda r: r.__setitem__("outcome", "1"), "not in"),
        (lambda r: r.__setitem__("action", "X"), "not in"),
        (lambda r: r.__setitem__("severity", "high"), "does not define"),
    ],
)
def test_the_fhir_checker_rejects_a_broken_audit_event(breakage: Any, message: str) -> None:
    resource = ax.fhir_audit_event(ax.map_record(RECORDS[5], SOURCE), SOURCE)
    check_audit_event(resource)
    breakage(resource)
    with pytest.raises(AssertionError, match=message):
        check_audit_event(resource)


def test_the_fhir_export_is_a_bundle_of_valid_audit_events_in_order() -> None:
    resources = check_fhir_bundle(json.loads(ax.fhir_json(RECORDS, SOURCE)))
    assert len(resources) == len(RECORDS)
    assert [r["type"]["code"] for r in resources] == [
        "110113", "110100", "110103", "110114", "110114", "110102", "110104", "110114",
        "110113", "110113", "110100", "110113",
    ]
    assert [r["outcome"] for r in resources] == [
        "0", "0", "0", "4", "0", "0", "0", "8", "0", "12", "0", "8",
    ]
    for r, record in zip(resources, RECORDS, strict=True):
        assert r["type"]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
        assert {"system": ax.ACTION_SYSTEM, "code": record["action"],
                "display": record["action"]} in r["subtype"]
        assert sum(a["requestor"] for a in r["agent"]) == 1
        assert r["source"]["observer"]["identifier"]["value"] == SOURCE.fingerprint
        assert r["recorded"] == ax._iso(record["at"])

    created = resources[2]
    assert created["action"] == "C"
    whats = [e["what"]["identifier"]["value"] for e in created["entity"]]
    assert whats == [f"urn:oid:{STUDY}", OFFER]
    assert created["entity"][1]["detail"] == [
        {"type": "expires", "valueString": "1780000900"},
        {"type": "instances", "valueString": "5"},
    ]
    glass = resources[8]
    assert glass["subtype"][0] == {"system": ax.DCM_SYSTEM, "code": "110127",
                                   "display": "Emergency Override Started"}
    assert [a["who"]["identifier"]["value"] for a in glass["agent"] if a["requestor"]] == ["dr-er"]
    pairing = resources[3]
    remote = [a for a in pairing["agent"] if a["requestor"]][0]
    assert remote["network"] == {"address": "192.0.2.7", "type": "2"}


# -- DICOM PS3.15 A.5.1 ------------------------------------------------------------------------------

CODED = {"csd-code", "codeSystemName", "originalText", "displayName"}
ATTRIBUTES: dict[str, tuple[set[str], set[str]]] = {  # element → (required, allowed)
    "EventIdentification": (
        {"EventDateTime", "EventOutcomeIndicator"},
        {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"},
    ),
    "EventID": ({"csd-code", "codeSystemName", "originalText"}, CODED),
    "EventTypeCode": ({"csd-code", "codeSystemName", "originalText"}, CODED),
    "EventOutcomeDescription": (set(), set()),
    "ActiveParticipant": (
        {"UserID", "UserIsRequestor"},
        {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor", "NetworkAccessPointID",
         "NetworkAccessPointTypeCode"},
    ),
    "RoleIDCode": ({"csd-code", "codeSystemName", "originalText"}, CODED),
    "AuditSourceIdentification": ({"AuditSourceID"}, {"AuditSourceID", "AuditEnterpriseSiteID"}),
    "AuditSourceTypeCode": ({"csd-code"}, CODED),
    "ParticipantObjectIdentification": (
        {"ParticipantObjectID"},
        {"ParticipantObjectID", "ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
         "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"},
    ),
    "ParticipantObjectIDTypeCode": ({"csd-code", "codeSystemName", "originalText"}, CODED),
    "ParticipantObjectDetail": ({"type", "value"}, {"type", "value"}),
}
CHILDREN = {  # element → regular expression over its child element names, in order
    "AuditMessage": r"EventIdentification (ActiveParticipant )+AuditSourceIdentification "
    r"(ParticipantObjectIdentification )*",
    "EventIdentification": r"EventID (EventTypeCode )*(EventOutcomeDescription )?",
    "ActiveParticipant": r"(RoleIDCode )*",
    "AuditSourceIdentification": r"(AuditSourceTypeCode )*",
    "ParticipantObjectIdentification": r"ParticipantObjectIDTypeCode "
    r"((ParticipantObjectName|ParticipantObjectQuery) )?(ParticipantObjectDetail )*",
}
ENUMS = {
    "EventActionCode": {"C", "R", "U", "D", "E"},
    "EventOutcomeIndicator": {"0", "4", "8", "12"},
    "UserIsRequestor": {"true", "false"},
    "NetworkAccessPointTypeCode": {"1", "2", "3", "4", "5"},
    "ParticipantObjectTypeCode": {"1", "2", "3", "4"},
    "ParticipantObjectTypeCodeRole": {str(n) for n in range(1, 27)},
}
XSD_DATETIME = re.compile(r"-?\d{4,}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?")


def check_audit_message(msg: ET.Element) -> None:
    assert msg.tag == "AuditMessage" and not msg.attrib
    for el in msg.iter():
        if el.tag in CHILDREN:
            names = "".join(c.tag + " " for c in el)
            assert re.fullmatch(CHILDREN[el.tag], names), f"{el.tag} children: {names}"
        if el.tag == "AuditMessage":
            continue
        assert el.tag in ATTRIBUTES, f"{el.tag} is not in the A.5.1 schema"
        required, allowed = ATTRIBUTES[el.tag]
        assert required <= set(el.attrib), f"{el.tag} lacks {required - set(el.attrib)}"
        assert set(el.attrib) <= allowed, f"{el.tag} has {set(el.attrib) - allowed}"
        for name, value in el.attrib.items():
            assert name not in ENUMS or value in ENUMS[name], f"{el.tag}@{name}={value!r}"
            assert value.strip() != "" or name == "AlternativeUserID", f"{el.tag}@{name} empty"
        if "EventDateTime" in el.attrib:
            assert XSD_DATETIME.fullmatch(el.attrib["EventDateTime"])
        if el.tag == "ParticipantObjectDetail":
            base64.b64decode(el.attrib["value"], validate=True)


def check_dicom_document(data: bytes) -> list[ET.Element]:
    assert data.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = ET.fromstring(data)
    assert root.tag == "AuditMessages"
    for msg in root:
        check_audit_message(msg)
    return list(root)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda m: m.remove(m.find("EventIdentification")), "children"),
        (lambda m: m.remove(m.find("AuditSourceIdentification")), "children"),
        (lambda m: m.find("ActiveParticipant").attrib.pop("UserIsRequestor"), "lacks"),
        (lambda m: m.find("EventIdentification").set("EventOutcomeIndicator", "2"), "="),
        (lambda m: m.find("EventIdentification/EventID").attrib.pop("originalText"), "lacks"),
        (lambda m: m.find("EventIdentification").set("Outcome", "0"), "has"),
    ],
)
def test_the_dicom_checker_rejects_a_broken_message(breakage: Any, message: str) -> None:
    msg = ax.dicom_audit_message(ax.map_record(RECORDS[5], SOURCE), SOURCE)
    check_audit_message(msg)
    breakage(msg)
    with pytest.raises(AssertionError, match=message):
        check_audit_message(msg)


def test_the_dicom_export_holds_one_valid_message_per_record() -> None:
    messages = check_dicom_document(ax.dicom_audit_xml(RECORDS, SOURCE))
    assert len(messages) == len(RECORDS)
    ids = [m.find("EventIdentification/EventID").get("csd-code") for m in messages]  # type: ignore[union-attr]
    assert ids == ["110113", "110100", "110103", "110114", "110114", "110102", "110104",
                   "110114", "110113", "110113", "110100", "110113"]
    started = messages[5]
    ident = started.find("EventIdentification")
    assert ident is not None
    assert ident.attrib == {"EventActionCode": "E", "EventDateTime": "2026-05-28T20:26:46Z",
                            "EventOutcomeIndicator": "0"}
    assert [(p.get("UserID"), p.get("UserIsRequestor"),
             [r.get("csd-code") for r in p.findall("RoleIDCode")])
            for p in started.findall("ActiveParticipant")] == [
        (SOURCE.fingerprint, "true", ["110150", "110153"]),
        ("PEER-FP", "false", ["110152"]),
    ]
    src = started.find("AuditSourceIdentification")
    assert src is not None and src.attrib == {"AuditEnterpriseSiteID": SOURCE.name,
                                              "AuditSourceID": SOURCE.fingerprint}
    objects = started.findall("ParticipantObjectIdentification")
    assert [(o.get("ParticipantObjectID"), o.get("ParticipantObjectTypeCode"),
             o.get("ParticipantObjectTypeCodeRole")) for o in objects] == [
        (STUDY, "2", "3"), (OFFER, "2", "20")]
    study_type = objects[0].find("ParticipantObjectIDTypeCode")
    assert study_type is not None and study_type.attrib == {
        "csd-code": "110180", "codeSystemName": "DCM", "originalText": "Study Instance UID"}
    detail = objects[1].find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "resumed_files"
    assert base64.b64decode(detail.get("value", "")) == b"0"
    pairing = messages[3]
    remote = pairing.findall("ActiveParticipant")[1]
    assert remote.attrib == {"UserID": "192.0.2.7", "UserIsRequestor": "true",
                             "NetworkAccessPointID": "192.0.2.7",
                             "NetworkAccessPointTypeCode": "2"}


# -- the command line's time window ---------------------------------------------------------------


def test_times_are_epoch_seconds_or_iso_dates() -> None:
    from p2pshare.cli_audit import parse_when
    from p2pshare.errors import ConfigError

    assert parse_when("1780000000", "--since") == 1_780_000_000
    assert parse_when("2026-12-04T08:30:00Z", "--since") == 1_796_373_000
    assert parse_when("2026-12-04T09:30:00+01:00", "--until") == 1_796_373_000
    assert parse_when(" 2026-12-04 ", "--until") == parse_when("2026-12-04T00:00", "--until")
    with pytest.raises(ConfigError, match="--until 'last week' is not a time; give epoch"):
        parse_when("last week", "--until")
