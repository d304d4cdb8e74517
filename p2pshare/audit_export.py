"""Audit records in the standard vocabularies: DICOM audit messages and FHIR AuditEvent.

Each p2pshare audit action maps to a DICOM audit event (PS3.15 Annex A.5, codes from PS3.16
CID 400-403: EventID 110100-110114, EventTypeCode, EventActionCode C/R/U/D/E) and an outcome
(0 success, 4 minor failure, 8 serious failure, 12 major failure). The same mapping writes

* **FHIR R4**: a ``Bundle`` of type ``collection`` holding one ``AuditEvent`` per record
  (``type``, ``subtype``, ``action``, ``recorded``, ``outcome``, ``agent`` with ``requestor``,
  ``source.observer``, ``entity`` for studies, offers and transfers);
* **DICOM**: an ``AuditMessages`` document holding one ``AuditMessage`` per record, per the
  A.5.1 schema (``EventIdentification``, ``ActiveParticipant``, ``AuditSourceIdentification``,
  ``ParticipantObjectIdentification``).

Every record also carries its p2pshare action as an extra code (``urn:p2pshare:audit-action``),
so nothing is lost and an action this module does not know yet still exports: as Application
Activity when it succeeded, as a Security Alert when it did not.

Only identifiers leave: UIDs, offer/transfer ids, node fingerprints and names, network
addresses, staff user names, and a patient id where a detail names one (the DICOM messages
expect the patient as a participant object). Patient names, codes and secrets are never in the
audit to begin with.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DCM = "DCM"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ACTION_SYSTEM = "urn:p2pshare:audit-action"
OBJECT_SYSTEM = "urn:p2pshare:object"
NODE_SYSTEM = "urn:p2pshare:node-fingerprint"
ENTITY_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_TYPE_SYSTEM = "http://hl7.org/fhir/network-type"

# -- the DICOM vocabulary (PS3.16 CID 400-403, 402) --------------------------------------------

APPLICATION_ACTIVITY = ("110100", "Application Activity")
AUDIT_LOG_USED = ("110101", "Audit Log Used")
BEGIN_TRANSFERRING = ("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
EXPORT = ("110106", "Export")
IMPORT = ("110107", "Import")
NETWORK_ENTRY = ("110108", "Network Entry")
PATIENT_RECORD = ("110110", "Patient Record")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")

APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
LOGIN = ("110122", "Login")
LOGOUT = ("110123", "Logout")
ATTACH = ("110124", "Attach")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
EMERGENCY_OVERRIDE_STARTED = ("110127", "Emergency Override Started")
SECURITY_CONFIGURATION = ("110129", "Security Configuration")
USE_OF_RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")
AUDIT_RECORDING_STARTED = ("110134", "Audit Recording Started")

ROLE_APPLICATION = ("110150", "Application")
ROLE_DESTINATION = ("110152", "Destination Role ID")
ROLE_SOURCE = ("110153", "Source Role ID")

STUDY_UID_TYPE = ("110180", "Study Instance UID")
NODE_ID_TYPE = ("110182", "Node ID")

Code = tuple[str, str]

#: outcome indicators
SUCCESS, MINOR, SERIOUS, MAJOR = 0, 4, 8, 12

#: Record outcomes that mean "refused or wrong input" (minor) or "looks like an attack" (major);
#: any other outcome but "ok" is a serious failure.
MINOR_OUTCOMES = frozenset(
    {
        "wrong-code",
        "refused",
        "flagged",
        "busy",
        "declined",
        "denied",
        "mismatch",
        "expired",
        "cancelled",
        "unauthorized",
        "not-found",
        "wrong-password",
        "offer-expired",
        "offer-burnt",
        "offer-used",
        "offer-unknown",
        "offer-cancelled",
        "code",
        "code-format",
        "code-rejected",
        "offer-unavailable",
    }
)
MAJOR_OUTCOMES = frozenset(
    {"integrity", "peer-key-changed", "burnt", "wrong-node", "tampered", "protocol-violation"}
)


@dataclass(frozen=True)
class EventKind:
    """How one audit action reads in the DICOM vocabulary."""

    event_id: Code
    action: str  # EventActionCode: C, R, U, D or E
    type_code: Code | None = None
    #: Who asked for it: "local" (this node), "remote" (the peer or the phone), "user" (staff).
    requestor: str = "local"
    #: Forced outcome indicator (e.g. a burnt offer is a major alert however it is recorded).
    outcome: int | None = None
    #: Per-outcome overrides of the indicator for this action.
    outcomes: tuple[tuple[str, int], ...] = ()


def _alert(type_code: Code, outcome: int | None = None, requestor: str = "local") -> EventKind:
    return EventKind(SECURITY_ALERT, "E", type_code, requestor, outcome)


EVENTS: dict[str, EventKind] = {
    # node and audit
    "node-started": EventKind(APPLICATION_ACTIVITY, "E", APPLICATION_START),
    "node-stopped": EventKind(APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
    "audit-sealed": _alert(AUDIT_RECORDING_STARTED),
    "audit-chain-broken": _alert(USE_OF_RESTRICTED_FUNCTION, MAJOR),
    "audit-log-used": EventKind(AUDIT_LOG_USED, "R", requestor="user"),
    # offers
    "offer-created": EventKind(INSTANCES_ACCESSED, "C", requestor="user"),
    "offer-cancelled": EventKind(INSTANCES_ACCESSED, "U", requestor="user"),
    "offer-expired": EventKind(INSTANCES_ACCESSED, "U"),
    "offer-burnt": _alert(NODE_AUTHENTICATION, MAJOR, "remote"),
    # pairing and trust
    "pairing-attempt": EventKind(USER_AUTHENTICATION, "E", LOGIN, "remote"),
    "pairing": EventKind(USER_AUTHENTICATION, "E", LOGIN),
    "peer-pinned": _alert(SECURITY_CONFIGURATION),
    "peer-forgotten": _alert(SECURITY_CONFIGURATION, requestor="user"),
    "peer-key-changed": _alert(NODE_AUTHENTICATION, MAJOR, "remote"),
    "relay-channel": EventKind(NETWORK_ENTRY, "E", ATTACH),
    # transfers
    "transfer-started": EventKind(BEGIN_TRANSFERRING, "E"),
    "transfer-resumed": EventKind(BEGIN_TRANSFERRING, "E"),
    "transfer-interrupted": EventKind(INSTANCES_TRANSFERRED, "R"),
    "transfer-completed": EventKind(INSTANCES_TRANSFERRED, "R"),
    "transfer-failed": EventKind(INSTANCES_TRANSFERRED, "R"),
    "transfer-stopped": EventKind(INSTANCES_TRANSFERRED, "R"),
    # staff called it off: here ("ok"), or at the receiving node ("by-receiver", as the sender)
    "transfer-cancelled": EventKind(
        INSTANCES_TRANSFERRED, "R", requestor="user", outcomes=(("by-receiver", MINOR),)
    ),
    "cancel-notified": EventKind(INSTANCES_TRANSFERRED, "R", outcomes=(("unreachable", MINOR),)),
    "receipt-resent": EventKind(INSTANCES_TRANSFERRED, "C", outcomes=(("unreachable", MINOR),)),
    "staff-receive": EventKind(BEGIN_TRANSFERRING, "E", requestor="user"),
    "receipt-signed": EventKind(INSTANCES_TRANSFERRED, "C"),
    "receipt-received": EventKind(INSTANCES_TRANSFERRED, "R"),
    # consent (the patient's phone) and break-glass
    "consent-requested": EventKind(PATIENT_RECORD, "C", requestor="user"),
    "consent-viewed": EventKind(PATIENT_RECORD, "R", requestor="remote"),
    "consent-approved": EventKind(PATIENT_RECORD, "U", requestor="remote"),
    "consent-declined": EventKind(PATIENT_RECORD, "U", requestor="remote"),
    "consent-revoked": EventKind(PATIENT_RECORD, "U", requestor="remote"),
    "consent-not-required": _alert(USE_OF_RESTRICTED_FUNCTION, requestor="user"),
    "consent-record-sent": EventKind(PATIENT_RECORD, "R"),
    "consent-record-received": EventKind(PATIENT_RECORD, "C", requestor="remote"),
    "consent-dob-mismatch": EventKind(USER_AUTHENTICATION, "E", LOGIN, "remote", MINOR),
    "consent-link-dead": _alert(USE_OF_RESTRICTED_FUNCTION, MINOR, "remote"),
    "break-glass": _alert(EMERGENCY_OVERRIDE_STARTED, requestor="user"),
    "notification-queued": EventKind(EXPORT, "R"),
    "notification-sent": EventKind(EXPORT, "R"),
    "notification-failed": EventKind(EXPORT, "R"),
    # staff
    "staff-sign-in": EventKind(
        USER_AUTHENTICATION,
        "E",
        LOGIN,
        "user",
        outcomes=(("failed", MINOR), ("locked", SERIOUS)),
    ),
    "staff-sign-out": EventKind(USER_AUTHENTICATION, "E", LOGOUT, "user"),
    # studies at the trauma centre
    "study-viewed": EventKind(INSTANCES_ACCESSED, "R", requestor="user"),
    "study-imported": EventKind(IMPORT, "C", requestor="user"),
    "study-uploaded": EventKind(IMPORT, "C", requestor="user"),
    "study-reopened": EventKind(INSTANCES_ACCESSED, "R"),
    "study-deleted": EventKind(STUDY_DELETED, "D", requestor="user"),
    "report-attached": EventKind(INSTANCES_ACCESSED, "C", requestor="user"),
    "study-received-dicom": EventKind(INSTANCES_TRANSFERRED, "C", requestor="remote"),
    "export-to-pacs": EventKind(INSTANCES_TRANSFERRED, "R", requestor="user"),
}

#: Detail keys naming what was acted on (entities); actors come from user, peer/fingerprint,
#: name and address; every other key becomes a detail of the entity (or of the description).
ENTITY_KEYS = (
    "study",
    "study_id",
    "offer",
    "transfer",
    "job",
    "consent",
    "notification",
    "patient_id",
)


def kind_of(action: str, outcome: str) -> EventKind:
    """The DICOM event for an action; unknown actions by outcome (never raises)."""
    known = EVENTS.get(action)
    if known is not None:
        return known
    if outcome == "ok":
        return EventKind(APPLICATION_ACTIVITY, "E")
    return _alert(USE_OF_RESTRICTED_FUNCTION)


def outcome_indicator(action: str, outcome: str) -> int:
    kind = kind_of(action, outcome)
    if kind.outcome is not None:
        return kind.outcome
    for name, value in kind.outcomes:
        if outcome == name:
            return value
    if outcome == "ok":
        return SUCCESS
    if outcome in MAJOR_OUTCOMES:
        return MAJOR
    if outcome in MINOR_OUTCOMES or outcome.startswith("offer-"):
        return MINOR
    return SERIOUS


@dataclass(frozen=True)
class Source:
    """The node that kept the audit (the observer)."""

    name: str
    fingerprint: str


@dataclass(frozen=True)
class Agent:
    user_id: str
    requestor: bool
    name: str | None = None
    address: str | None = None
    roles: tuple[Code, ...] = ()
    #: FHIR reference system for user_id
    system: str = NODE_SYSTEM


@dataclass(frozen=True)
class Entity:
    key: str  # one of ENTITY_KEYS
    value: str
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Event:
    """One audit record, mapped: everything both formats need."""

    seq: int
    at: int
    action: str
    outcome: str
    kind: EventKind
    indicator: int
    description: str
    agents: tuple[Agent, ...]
    entities: tuple[Entity, ...]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _sending_side(detail: dict[str, Any]) -> bool:
    """Records of the node that sends a study name the offer; the receiver's the transfer."""
    return "offer" in detail and "transfer" not in detail


def map_record(record: dict[str, Any], source: Source) -> Event:
    """Map one record (as ``AuditLog.records`` returns it) to the DICOM vocabulary."""
    action, outcome = str(record["action"]), str(record["outcome"])
    raw = record.get("detail")
    detail: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind = kind_of(action, outcome)
    transfer_like = kind.event_id in (BEGIN_TRANSFERRING, INSTANCES_TRANSFERRED)
    sending = _sending_side(detail) or action in ("export-to-pacs", "receipt-received")

    local_roles: list[Code] = [ROLE_APPLICATION]
    remote_roles: list[Code] = []
    if transfer_like:
        local_roles.append(ROLE_SOURCE if sending else ROLE_DESTINATION)
        remote_roles.append(ROLE_DESTINATION if sending else ROLE_SOURCE)
    user = detail.get("user")
    peer_fp = detail.get("peer") or detail.get("fingerprint")
    if peer_fp == source.fingerprint:  # e.g. node-started names this node itself
        peer_fp = None
    address = detail.get("address")
    requestor = kind.requestor
    if requestor == "user" and not user:
        requestor = "local"
    if requestor == "remote" and not (peer_fp or address):
        requestor = "local"

    used = set()
    agents = [Agent(source.fingerprint, requestor == "local", source.name, roles=tuple(local_roles))]
    if user:
        used.add("user")
        agents.append(Agent(_text(user), requestor == "user", system="urn:p2pshare:staff-user"))
    if peer_fp or address:
        peer_name = detail.get("name") if peer_fp else None
        used.update(k for k in ("peer", "fingerprint", "address") if detail.get(k))
        if peer_name:
            used.add("name")
        agents.append(
            Agent(
                _text(peer_fp) if peer_fp else _text(address),
                requestor == "remote",
                _text(peer_name) if peer_name else None,
                _text(address) if address else None,
                tuple(remote_roles),
                NODE_SYSTEM if peer_fp else "urn:p2pshare:network-address",
            )
        )

    leftovers = tuple(
        (k, _text(v))
        for k, v in sorted(detail.items())
        if k not in used and k not in ENTITY_KEYS and v is not None
    )
    entities = [Entity(k, _text(detail[k])) for k in ENTITY_KEYS if detail.get(k)]
    if entities and leftovers:
        # the details describe the job (offer/transfer) rather than the study where both exist
        main = next((i for i, e in enumerate(entities) if e.key != "study"), 0)
        entities[main] = Entity(entities[main].key, entities[main].value, leftovers)
    description = f"{action}: {outcome}"
    if leftovers and not entities:
        description += " (" + ", ".join(f"{k}={v}" for k, v in leftovers) + ")"
    return Event(
        seq=int(record["seq"]),
        at=int(record["at"]),
        action=action,
        outcome=outcome,
        kind=kind,
        indicator=outcome_indicator(action, outcome),
        description=description,
        agents=tuple(agents),
        entities=tuple(entities),
    )


def _iso(at: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _network_type(address: str) -> str:
    """RFC 3881 / FHIR network type: 2 for an IP address, 1 for a machine name."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "1"
    return "2"


# -- FHIR R4 -------------------------------------------------------------------------------------

_ENTITY_ROLE = {
    "study": ("3", "Report"),
    "study_id": ("3", "Report"),
    "patient_id": ("1", "Patient"),
    "consent": ("4", "Resource"),
}


def _fhir_entity(e: Entity) -> dict[str, Any]:
    if e.key == "study":
        what = {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{e.value}"}}
        type_ = {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"}
    elif e.key == "patient_id":
        what = {"identifier": {"value": e.value}}
        type_ = {"system": ENTITY_TYPE_SYSTEM, "code": "1", "display": "Person"}
    else:
        what = {"identifier": {"system": f"{OBJECT_SYSTEM}:{e.key}", "value": e.value}}
        type_ = {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"}
    code, display = _ENTITY_ROLE.get(e.key, ("20", "Job"))
    out: dict[str, Any] = {
        "what": what,
        "type": type_,
        "role": {"system": OBJECT_ROLE_SYSTEM, "code": code, "display": display},
    }
    if e.details:
        out["detail"] = [{"type": k, "valueString": v} for k, v in e.details]
    return out


def _coding(system: str, code: Code) -> dict[str, str]:
    return {"system": system, "code": code[0], "display": code[1]}


def fhir_audit_event(event: Event, source: Source) -> dict[str, Any]:
    """One FHIR R4 AuditEvent resource."""
    subtype = [{"system": ACTION_SYSTEM, "code": event.action, "display": event.action}]
    if event.kind.type_code is not None:
        subtype.insert(0, _coding(DCM_SYSTEM, event.kind.type_code))
    agents: list[dict[str, Any]] = []
    for a in event.agents:
        agent: dict[str, Any] = {
            "who": {"identifier": {"system": a.system, "value": a.user_id}},
            "requestor": a.requestor,
        }
        if a.roles:
            agent["type"] = {"coding": [_coding(DCM_SYSTEM, r) for r in a.roles]}
        if a.name:
            agent["name"] = a.name
            agent["who"]["display"] = a.name
        if a.address:
            agent["network"] = {"address": a.address, "type": _network_type(a.address)}
        agents.append(agent)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"p2pshare-{source.fingerprint.replace('-', '').lower()}-{event.seq}",
        "type": _coding(DCM_SYSTEM, event.kind.event_id),
        "subtype": subtype,
        "action": event.kind.action,
        "recorded": _iso(event.at),
        "outcome": str(event.indicator),
        "outcomeDesc": event.description,
        "agent": agents,
        "source": {
            "site": source.name,
            "observer": {
                "identifier": {"system": NODE_SYSTEM, "value": source.fingerprint},
                "display": source.name,
            },
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
    }
    if event.entities:
        resource["entity"] = [_fhir_entity(e) for e in event.entities]
    return resource


def fhir_bundle(records: Iterable[dict[str, Any]], source: Source) -> dict[str, Any]:
    """A FHIR R4 Bundle (type collection) of AuditEvents, one per record, in order."""
    entries = []
    for record in records:
        resource = fhir_audit_event(map_record(record, source), source)
        entries.append({"fullUrl": f"urn:uuid:{_uuid_for(resource['id'])}", "resource": resource})
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": _iso(int(time.time())),
        "entry": entries,
    }


def _uuid_for(text: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:p2pshare:audit:" + text))


# -- DICOM PS3.15 A.5 ------------------------------------------------------------------------


def _coded(parent: ET.Element, tag: str, code: Code, system: str = DCM) -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": system, "originalText": code[1]}
    )


def _id_type(key: str) -> tuple[Code, str]:
    if key == "study":
        return STUDY_UID_TYPE, DCM
    if key == "patient_id":
        return ("2", "Patient Number"), "RFC-3881"
    return (key, f"p2pshare {key} id"), OBJECT_SYSTEM


def dicom_audit_message(event: Event, source: Source) -> ET.Element:
    """One ``AuditMessage`` element (PS3.15 A.5.1)."""
    msg = ET.Element("AuditMessage")
    ident = ET.SubElement(
        msg,
        "EventIdentification",
        {
            "EventActionCode": event.kind.action,
            "EventDateTime": _iso(event.at),
            "EventOutcomeIndicator": str(event.indicator),
        },
    )
    _coded(ident, "EventID", event.kind.event_id)
    if event.kind.type_code is not None:
        _coded(ident, "EventTypeCode", event.kind.type_code)
    _coded(ident, "EventTypeCode", (event.action, event.action), ACTION_SYSTEM)
    ET.SubElement(ident, "EventOutcomeDescription").text = event.description
    for a in event.agents:
        attrs = {"UserID": a.user_id, "UserIsRequestor": "true" if a.requestor else "false"}
        if a.name:
            attrs["UserName"] = a.name
        if a.address:
            attrs["NetworkAccessPointID"] = a.address
            attrs["NetworkAccessPointTypeCode"] = _network_type(a.address)
        participant = ET.SubElement(msg, "ActiveParticipant", attrs)
        for role in a.roles:
            _coded(participant, "RoleIDCode", role)
    src = ET.SubElement(
        msg,
        "AuditSourceIdentification",
        {"AuditEnterpriseSiteID": source.name, "AuditSourceID": source.fingerprint},
    )
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})
    for e in event.entities:
        type_code = "1" if e.key == "patient_id" else "2"
        object_role = _ENTITY_ROLE.get(e.key, ("20", "Job"))[0]
        obj = ET.SubElement(
            msg,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": e.value,
                "ParticipantObjectTypeCode": type_code,
                "ParticipantObjectTypeCodeRole": object_role,
            },
        )
        code, system = _id_type(e.key)
        _coded(obj, "ParticipantObjectIDTypeCode", code, system)
        for k, v in e.details:
            value = base64.b64encode(v.encode("utf-8")).decode("ascii")
            ET.SubElement(obj, "ParticipantObjectDetail", {"type": k, "value": value})
    return msg


def dicom_audit_xml(records: Iterable[dict[str, Any]], source: Source) -> bytes:
    """An XML document: ``<AuditMessages>`` holding one ``AuditMessage`` per record."""
    root = ET.Element("AuditMessages")
    for record in records:
        root.append(dicom_audit_message(map_record(record, source), source))
    ET.indent(root)
    text: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return text + b"\n"


def fhir_json(records: Iterable[dict[str, Any]], source: Source) -> bytes:
    return (json.dumps(fhir_bundle(records, source), indent=2) + "\n").encode("utf-8")
