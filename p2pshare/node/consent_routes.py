"""The patient's phone page and its small API, reachable only through the one-time link.

``/consent/<token>`` serves ``web/consent.html``; the page talks to ``/consent/<token>/…``. The
token is the only credential: it selects one offer's consent and nothing else on the node, is
stored only as a hash, and stops working when the offer ends. Study details are shown only after
the date of birth matched; every decision needs the verifier that match returned.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pshare import consent
from p2pshare.consent import Consent
from p2pshare.node.keys import config_key, engine_key, jobs_key, store_key
from p2pshare.store import (
    ACTIVE,
    COMPLETED,
    DECLINED,
    FAILED,
    INTERRUPTED,
    PAIRED,
    SENDING,
    Offer,
)

log = logging.getLogger(__name__)

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # The token is in the URL: never let it travel on as a referrer.
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
}
PURPOSE = "emergency transfer of care: your scans go ahead of you to the hospital treating you"

routes = web.RouteTableDef()
web_dir_key = web.AppKey("web_dir_key", Path)


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers=PAGE_HEADERS)


def _gone(message: str, status: int = 410) -> web.HTTPException:
    cls = web.HTTPGone if status == 410 else web.HTTPNotFound
    return cls(
        text=f'{{"error": "link", "message": "{message}"}}',
        content_type="application/json",
        headers=PAGE_HEADERS,
    )


def _lookup(request: web.Request, *, writable: bool = True) -> tuple[Consent, Offer]:
    store = request.app[store_key]
    c = store.consents.by_link(request.match_info["token"])
    if c is None:
        raise _gone("This link is not valid. Ask the hospital staff for a new one.", 404)
    offer = store.get_offer(c.offer_id)
    now = request.app[engine_key].now()
    # an interrupted transfer may still resume: the patient can still revoke it
    live = offer is not None and offer.state in (ACTIVE, PAIRED, SENDING, INTERRUPTED)
    finished = offer is not None and offer.state == COMPLETED and now <= offer.expires
    if offer is None or not (live or (finished and not writable)):
        raise _gone("This link has expired: the transfer it was for has ended.")
    if live and offer.state == ACTIVE and offer.expires <= now:
        raise _gone("This link has expired. Ask the hospital staff for a new one.")
    return c, offer


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error": "input", "message": "The page sent an unreadable request."}',
            content_type="application/json",
            headers=PAGE_HEADERS,
        )
    return body


def _require_verifier(request: web.Request, c: Consent, body: dict[str, Any]) -> None:
    verifier = body.get("verifier")
    if not isinstance(verifier, str) or not request.app[store_key].consents.verifier_ok(
        c.offer_id, verifier
    ):
        raise web.HTTPForbidden(
            text='{"error": "verify", "message": "Please confirm your date of birth first."}',
            content_type="application/json",
            headers=PAGE_HEADERS,
        )


def _state(request: web.Request, c: Consent, offer: Offer, details: bool) -> dict[str, Any]:
    cfg, engine = request.app[config_key], request.app[engine_key]
    if offer.peer_name:
        destination: dict[str, Any] = {
            "verified": True,
            "name": offer.peer_name,
            "fingerprint": offer.peer_fingerprint,
        }
    else:
        destination = {"verified": False, "intended": c.intended}
    out: dict[str, Any] = {
        "sender": cfg.name,
        "sender_fingerprint": engine.identity.fingerprint,
        "destination": destination,
        "purpose": PURPOSE,
        "expires": offer.expires,
        "state": c.state,
        "transfer": offer.state,
        "needs_dob": c.has_dob,
        "dob_tries_left": c.dob_tries_left,
        "decided_at": c.decided_at,
        "can_approve_now": bool(offer.peer_name or c.intended),
    }
    if details:
        m = offer.manifest
        out["study"] = {
            "date": m.study_date,
            "modalities": m.modalities,
            "description": m.study_description,
            "images": len(m.instances),
        }
    return out


@routes.get("/consent/{token}")
async def page(request: web.Request) -> web.StreamResponse:
    web_dir = request.app[web_dir_key]
    return web.FileResponse(web_dir / "consent.html", headers=PAGE_HEADERS)


@routes.get("/consent/{token}/state")
async def state(request: web.Request) -> web.Response:
    c, offer = _lookup(request, writable=False)
    engine = request.app[engine_key]
    if request.app[store_key].consents.mark_viewed(c.offer_id, engine.now()):
        engine.audit("consent-viewed", "ok", offer=c.offer_id, address=request.remote)
        _emit(request, c.offer_id, "consent-viewed")
    verifier = request.headers.get("X-Consent-Verifier", "")
    details = bool(verifier) and request.app[store_key].consents.verifier_ok(c.offer_id, verifier)
    return _json(_state(request, c, offer, details))


@routes.post("/consent/{token}/verify")
async def verify(request: web.Request) -> web.Response:
    c, offer = _lookup(request)
    body = await _body(request)
    store, engine = request.app[store_key], request.app[engine_key]
    if c.state != consent.PENDING:
        return _json({"error": "decided", "message": _decided_text(c)}, 409)
    if not c.has_dob:
        return _json(
            {
                "error": "no-dob",
                "message": "This study has no date of birth to check against. Please tell the "
                "hospital staff; they can authorise the transfer another way.",
            },
            409,
        )
    dob = body.get("dob")
    verifier, left = store.consents.check_dob(c.offer_id, dob if isinstance(dob, str) else "")
    if verifier is None:
        engine.audit(
            "consent-dob-mismatch", "failed", offer=c.offer_id, tries_left=left,
            address=request.remote,
        )  # fmt: skip
        if left == 0:
            _link_died(request, c, offer)
            return _json(
                {
                    "error": "dead",
                    "message": "The date of birth did not match five times, so this link has "
                    "been closed. Please speak to the hospital staff.",
                },
                410,
            )
        _emit(request, c.offer_id, "consent-dob-mismatch", tries_left=left)
        return _json(
            {
                "error": "dob-mismatch",
                "message": f"That date of birth does not match our records. {left} "
                f"{'try' if left == 1 else 'tries'} left.",
                "tries_left": left,
            },
            403,
        )
    fresh = store.consents.get(c.offer_id)
    assert fresh is not None
    return _json({"verifier": verifier, **_state(request, fresh, offer, True)})


@routes.post("/consent/{token}/decision")
async def decision(request: web.Request) -> web.Response:
    c, offer = _lookup(request)
    body = await _body(request)
    _require_verifier(request, c, body)
    store, engine = request.app[store_key], request.app[engine_key]
    choice = body.get("decision")
    if choice not in ("approve", "decline"):
        return _json({"error": "input", "message": "Choose Approve or Decline."}, 400)
    by: dict[str, str] = {"role": "patient"}
    if body.get("by") == "representative":
        name = " ".join(str(body.get("name", "")).split())
        relation = " ".join(str(body.get("relationship", "")).split())
        if not (2 <= len(name) <= 200 and 2 <= len(relation) <= 100):
            return _json(
                {
                    "error": "input",
                    "message": "As a representative, please give your full name and how you "
                    "are related to the patient.",
                },
                400,
            )
        by = {"role": "representative", "name": name, "relationship": relation}
    if choice == "approve" and not (offer.peer_name or c.intended):
        return _json(
            {
                "error": "wait",
                "message": "The receiving hospital has not connected yet. Keep this page open; "
                "you can approve as soon as it shows who will receive your scans.",
            },
            409,
        )
    # The decision is for the destination the page showed: if a receiving node paired (or
    # another one did) since, the person must look again before deciding.
    seen = body.get("shown_fingerprint")
    if choice == "approve" and (seen or None) != (offer.peer_fingerprint or None):
        return _json(
            {
                "error": "changed",
                "message": "The receiving hospital shown on this page has changed. Please check "
                "who will receive your scans, then decide again.",
            },
            409,
        )
    shown = "verified" if offer.peer_name else "intended"
    if not store.consents.decide(c.offer_id, choice == "approve", by, shown, engine.now()):
        fresh = store.consents.get(c.offer_id)
        return _json({"error": "decided", "message": _decided_text(fresh or c)}, 409)
    action = "consent-approved" if choice == "approve" else "consent-declined"
    # The audit keeps who decided by role; a representative's own name is expected there.
    engine.audit(
        action,
        "ok",
        offer=c.offer_id,
        by=by["role"],
        representative=by.get("name"),
        relationship=by.get("relationship"),
        destination=offer.peer_fingerprint or c.intended,
        shown=shown,
    )
    _emit(request, c.offer_id, action, by=by["role"])
    if choice == "decline":
        _end_offer(request, offer, "consent-declined", "the patient declined this transfer")
    engine.consent_changed(c.offer_id)
    fresh = store.consents.get(c.offer_id)
    assert fresh is not None
    return _json(_state(request, fresh, offer, True))


@routes.post("/consent/{token}/revoke")
async def revoke(request: web.Request) -> web.Response:
    c, offer = _lookup(request)
    body = await _body(request)
    _require_verifier(request, c, body)
    store, engine = request.app[store_key], request.app[engine_key]
    if not store.consents.revoke(c.offer_id, engine.now()):
        return _json({"error": "not-approved", "message": _decided_text(c)}, 409)
    engine.audit("consent-revoked", "ok", offer=c.offer_id, address=request.remote)
    _emit(request, c.offer_id, "consent-revoked")
    if offer.state == ACTIVE:
        _end_offer(request, offer, "consent-revoked", "the patient revoked consent")
    elif offer.state == INTERRUPTED:
        # no connection to stop: end the transfer so that no reconnection can carry it on
        store.set_offer_state(offer.id, FAILED, error="the patient revoked consent")
        store.set_resume("offers", offer.id, "", b"", 0)
        job = request.app[jobs_key].get(offer.id)
        if job is not None and not job.done:
            job.finish("error", code="consent-revoked", message="the patient revoked consent")
    engine.consent_changed(c.offer_id)
    fresh = store.consents.get(c.offer_id)
    assert fresh is not None
    return _json(_state(request, fresh, offer, True))


def _decided_text(c: Consent) -> str:
    return {
        consent.APPROVED: "You have already approved this transfer.",
        consent.DECLINED: "You declined this transfer. Nothing was sent.",
        consent.REVOKED: "You revoked your approval. The transfer was stopped.",
        consent.BREAK_GLASS: "A clinician authorised this transfer because you could not.",
        consent.DEAD: "This link has been closed. Please speak to the hospital staff.",
    }.get(c.state, "This transfer no longer needs a decision.")


def _emit(request: web.Request, offer_id: str, event: str, **fields: Any) -> None:
    job = request.app[jobs_key].get(offer_id)
    if job is not None and not job.done:
        job.emit(event, **fields)


def _end_offer(request: web.Request, offer: Offer, code: str, message: str) -> None:
    """End an offer that no connection is serving yet (a serving one stops itself)."""
    store = request.app[store_key]
    if offer.state != ACTIVE:
        return
    store.set_offer_state(offer.id, DECLINED, error=message)
    store.consents.end_link(offer.id)
    job = request.app[jobs_key].get(offer.id)
    if job is not None and not job.done:
        job.finish("error", code=code, message=f"{message}; nothing was sent")


def _link_died(request: web.Request, c: Consent, offer: Offer) -> None:
    engine = request.app[engine_key]
    engine.audit("consent-link-dead", "failed", offer=c.offer_id, reason="dob-attempts")
    _emit(
        request,
        c.offer_id,
        "consent-link-dead",
        reason="the date of birth was wrong 5 times on the consent page",
    )
    if c.policy == "patient":
        _end_offer(
            request,
            offer,
            "consent-failed",
            "the consent link closed after 5 wrong dates of birth; create a new offer",
        )
    engine.consent_changed(c.offer_id)


def setup(app: web.Application, web_dir: Path) -> None:
    app[web_dir_key] = web_dir
    app.add_routes(routes)
