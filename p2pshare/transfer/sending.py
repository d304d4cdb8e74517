"""The sending side of one connection: answer the receiver, then fill the window from disk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from p2pshare import codes, consent, crypto
from p2pshare.dicom.ingest import Source
from p2pshare.errors import (
    CodeRejected,
    ConnectionLost,
    OfferUnavailable,
    P2PShareError,
    PeerKeyChanged,
    ReceiverCancelled,
    RemoteProtocolError,
    TransferAborted,
    TransferError,
)
from p2pshare.jobs import PROGRESS_EVERY_S, Job
from p2pshare.protocol import consent as consent_record
from p2pshare.protocol import events as ev
from p2pshare.protocol.sender import SenderSession
from p2pshare.store import (
    BURNT,
    CANCELLED,
    COMPLETED,
    DECLINED,
    EXPIRED,
    FAILED,
    INTERRUPTED,
    SENDING,
    Offer,
)
from p2pshare.transfer.channel import Channel

if TYPE_CHECKING:
    from p2pshare.transfer.engine import Engine

log = logging.getLogger(__name__)

#: While consent is pending, tell the receiver so this often (also keeps the link alive).
CONSENT_KEEPALIVE_S = 20.0


class SenderRun:
    def __init__(self, engine: Engine, channel: Channel, deadline: float | None = None) -> None:
        e = engine
        self.e = e
        self.ch = channel
        self.s = SenderSession(
            name=e.config.name,
            public_key=e.identity.public_key,
            sign=e.identity.sign,
            entropy=e.entropy,
            window=e.config.window,
        )
        self.offer_id = ""
        self.sources: list[Source] = []
        self.job: Job | None = None
        self._fh: IO[bytes] | None = None
        self._fh_index = -1
        self._bytes_sent = 0
        self._total = 0
        self._last_progress = 0.0
        self._done = False
        #: True once this connection won the offer; only then may it fail or finish the offer.
        self._claimed = False
        #: monotonic time by which pairing must be complete
        self._deadline = deadline
        #: called once when this connection pairs (or ends unpaired): frees its pairing slot
        self.on_paired: Callable[[], None] | None = None
        #: set by the node when this offer's consent changes (once this connection claimed it)
        self._consent_signal: asyncio.Event | None = None
        #: a read started while waiting for consent, handed on to the next _recv
        self._pending_recv: asyncio.Future[bytes | None] | None = None
        self._pending_status_sent = False
        #: this connection resumes an interrupted transfer (with the paired node's ticket)
        self._resume = False
        self._resume_peer = ""

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._pending_recv is not None:
                self._pending_recv.cancel()

    async def _run(self) -> None:
        while not self._done:
            signal = self._consent_signal
            if signal is not None and signal.is_set():
                signal.clear()
                if self.s.awaiting_consent or self.s.consent_sent:
                    self._check_consent()
                    await self.flush()
                    continue
            if self.s.window_open:
                self._send_one_chunk()
                await self.flush()
                continue
            if self._consent_signal is not None and (
                self.s.awaiting_consent or self.s.consent_sent
            ):
                # Waiting for consent, or for acknowledgements while streaming: a consent
                # change (approved, declined, revoked) must wake this connection either way.
                got, data = await self._recv_or_consent(keepalive=self.s.awaiting_consent)
                if not got:
                    continue
            else:
                data = await self._recv()
            if data is None:
                if not self._done:
                    raise ConnectionLost("the receiver closed the connection before the receipt")
                return
            self.s.receive_data(data)
            try:
                while (event := self.s.next_event()) is not None:
                    self._on_event(event)
            except BaseException:
                # what the receiver said (a refusal, a cancel) explains the end better than a
                # connection it closed meanwhile
                with contextlib.suppress(P2PShareError):
                    await self.flush()
                raise
            await self.flush()

    async def _recv_or_consent(self, keepalive: bool) -> tuple[bool, bytes | None]:
        """Wait for the receiver or for a consent change; keep a waiting receiver informed."""
        assert self._consent_signal is not None
        if self._pending_recv is None:
            self._pending_recv = asyncio.ensure_future(self.ch.recv())
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._consent_signal.wait())
        pending: set[asyncio.Future[Any]] = {self._pending_recv, waiter}
        try:
            done, _ = await asyncio.wait(
                pending,
                timeout=self._keepalive_s() if keepalive else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()
        if self._pending_recv in done:
            task, self._pending_recv = self._pending_recv, None
            return True, task.result()
        if not done:
            # Still pending: a status both keeps the connection alive and tells the receiver.
            self.s.send_status("waiting-for-consent", self._consent_detail())
            await self.flush()
        return False, None

    def _keepalive_s(self) -> float:
        """Often enough that the receiver's answer beats either side's idle timeout."""
        return max(0.5, min(CONSENT_KEEPALIVE_S, self.e.config.idle_timeout_s / 3))

    async def _recv(self) -> bytes | None:
        if self._pending_recv is not None:
            task, self._pending_recv = self._pending_recv, None
            return await task
        if self._claimed or self._deadline is None:
            return await self.ch.recv()
        try:
            async with asyncio.timeout_at(
                asyncio.get_running_loop().time() + max(0.0, self._deadline - time.monotonic())
            ):
                return await self.ch.recv()
        except TimeoutError:
            raise ConnectionLost("the receiver did not finish pairing in time") from None

    async def flush(self) -> None:
        out = self.s.data_to_send()
        if out:
            await self.ch.send(out)

    def _on_event(self, event: ev.Event) -> None:
        e = self.e
        if isinstance(event, ev.OfferRequest):
            self._on_offer_request(event)
        elif isinstance(event, ev.CodeMismatch) and self._resume:
            # A wrong resume secret is no guess at a human code: nothing to count or burn.
            e.audit("pairing-attempt", "resume-refused", offer=self.offer_id,
                    address=self.ch.peer_address)  # fmt: skip
            self.s.refuse("resume-refused", "this transfer cannot be resumed from this node")
            self._done = True
        elif isinstance(event, ev.CodeMismatch):
            left = e.store.record_failed_attempt(self.offer_id)
            if left is None:  # claimed by another receiver meanwhile: not this one's to burn
                self.s.refuse("offer-used", OfferUnavailable("used").message)
                self._done = True
                return
            e.audit(
                "pairing-attempt",
                "wrong-code",
                offer=self.offer_id,
                address=self.ch.peer_address,
                tries_left=left,
            )
            if left == 0:
                e.audit("offer-burnt", "ok", offer=self.offer_id)
                self._finish(
                    "error",
                    code="offer-burnt",
                    message="the offer was burnt after 3 wrong codes; nothing was sent. "
                    "Create a new offer and read the new code slowly",
                )
            else:
                self._emit("wrong-code", tries_left=left)
            log.warning("wrong code for offer %s (%d tries left)", self.offer_id[:8], left)
            self.s.refuse("code-rejected", CodeRejected(left).message, tries_left=left)
            self._done = True
        elif isinstance(event, ev.PeerIdentity):
            if self._resume and event.fingerprint != self._resume_peer:
                e.audit("pairing-attempt", "resume-wrong-node", offer=self.offer_id,
                        address=self.ch.peer_address, peer=event.fingerprint)  # fmt: skip
                self.s.refuse("resume-refused", "another node started this transfer")
                self._done = True
                return
            try:
                e.pin_peer(event, self.ch.peer_address, offer=self.offer_id)
            except PeerKeyChanged as exc:
                # Not the end of the offer: the right receiver may still come.
                self._emit("peer-refused", code=exc.code, message=exc.message)
                self.s.refuse(
                    "peer-key-changed",
                    "the sending node does not trust this node's "
                    "identity key (it changed since first contact)",
                )
                self._done = True
                return
            self.s.trust_peer()
        elif isinstance(event, ev.Paired):
            claimed = (
                e.store.claim_resume(self.offer_id)
                if self._resume
                else e.store.claim_offer(self.offer_id, e.now())
            )
            if not claimed:
                state = _unavailable(e.store.get_offer(self.offer_id))
                self.s.refuse(f"offer-{state}", OfferUnavailable(state).message)
                self._done = True
                return
            self._claimed = True
            if self.on_paired is not None:
                self.on_paired()
                self.on_paired = None
            # Only the connection that claimed the offer may be stopped by cancelling it; a
            # hostile connection naming the same offer never replaces it here.
            task = asyncio.current_task()
            old = e.running.get(self.offer_id)
            if old is not None and old is not task and not old.done():
                # The receiver came back with the ticket: the old connection is a dead one
                # that has not noticed yet.
                old.cancel()
            if task is not None:
                e.running[self.offer_id] = task
            self._consent_signal = e.consent_signal(self.offer_id)
            offer = e.store.get_offer(self.offer_id)
            assert offer is not None
            e.store.set_offer_state(
                self.offer_id,
                "paired",
                peer_name=self.s.peer_name,
                peer_fingerprint=crypto.fingerprint(self.s.peer_key),
                transfer_id=event.transfer_id.hex(),
            )
            ticket, secret = self.s.resume_ticket()
            e.store.roll_offer_ticket(
                self.offer_id, ticket, secret, e.now() + e.config.resume_ttl_s
            )
            e.audit(
                "transfer-resumed" if self._resume else "pairing-attempt",
                "ok",
                offer=self.offer_id,
                address=self.ch.peer_address,
                peer=crypto.fingerprint(self.s.peer_key),
            )
            if self._resume:
                self._emit("resumed", address=self.ch.peer_address)
            self._emit(
                "paired", peer=self.s.peer_name, fingerprint=crypto.fingerprint(self.s.peer_key)
            )
            self.sources = [Source.from_json(s) for s in offer.sources]
            self._total = offer.manifest.total_bytes
            digest = self.s.send_manifest(offer.manifest, {"sender": e.config.name})
            log.info("offer %s paired; manifest %s sent", self.offer_id[:8], digest[:12])
        elif isinstance(event, ev.Accepted):
            # The receiver had the manifest, so it holds this connection's ticket now.
            e.store.settle_offer_ticket(self.offer_id)
            e.store.set_offer_state(self.offer_id, SENDING)
            e.audit(
                "transfer-started",
                "ok",
                offer=self.offer_id,
                study=self.s.manifest.study_instance_uid if self.s.manifest else "",
                peer=crypto.fingerprint(self.s.peer_key),
                resumed_files=len(event.have),
            )
            if self.s.awaiting_consent:  # nothing to send (all held) needs no consent record
                self._check_consent()
        elif isinstance(event, ev.Receipt):
            e.store.set_offer_state(self.offer_id, COMPLETED, receipt=event.body)
            e.audit(
                "receipt-received",
                "ok",
                offer=self.offer_id,
                manifest_sha256=event.body.get("manifest_sha256"),
                peer=crypto.fingerprint(self.s.peer_key),
            )
            log.info("offer %s delivered: signed receipt received", self.offer_id[:8])
            self._finish(
                "complete",
                receipt=event.body,
                peer=self.s.peer_name,
                fingerprint=crypto.fingerprint(self.s.peer_key),
            )
            self.s.close()
            self._done = True
        elif isinstance(event, ev.RemoteError):
            if event.code == ReceiverCancelled.code:
                raise ReceiverCancelled(self.s.peer_name or "the receiving node")
            raise TransferAborted(f"the receiver stopped: {event.message}")
        elif isinstance(event, ev.Closed):
            self._done = True

    def _on_offer_request(self, event: ev.OfferRequest) -> None:
        e = self.e
        if event.resume:
            self._on_resume_request(event)
            return
        offer = e.store.find_offer(event.offer_ref, event.spoken)
        if offer is not None and offer.state == "active" and offer.expires <= e.now():
            e.store.set_offer_state(offer.id, EXPIRED)
            e.audit("offer-expired", "ok", offer=offer.id)
            offer = e.store.get_offer(offer.id)
        if offer is None or offer.state != "active":
            state = _unavailable(offer)
            e.audit(
                "pairing-attempt",
                f"offer-{state}",
                address=self.ch.peer_address,
                offer=offer.id if offer else None,
            )
            self.s.refuse(f"offer-{state}", OfferUnavailable(state).message)
            self._done = True
            return
        self.offer_id = offer.id
        self.job = e.offer_job(offer.id)
        password = (
            codes.parse_spoken(offer.spoken_code).password
            if event.spoken
            else codes.QrOffer(offer.id, offer.qr_secret).password
        )
        self._emit("pairing", address=self.ch.peer_address)
        self.s.use_offer(offer.id, password)

    # -- consent -------------------------------------------------------------------------------

    def _consent_detail(self) -> dict[str, Any]:
        c = self.e.store.consents.get(self.offer_id)
        if c is None:
            return {}
        return {"policy": c.policy, "state": c.state}

    def _check_consent(self) -> None:
        """Open the stream if consent allows it, keep waiting, or stop the transfer."""
        e = self.e
        c = e.store.consents.get(self.offer_id)
        now = e.now()
        if self.s.consent_sent:
            if c is None or c.state == consent.REVOKED:
                e.audit("consent-revoked", "stopped-stream", offer=self.offer_id)
                self._stop_for_consent(
                    "consent-revoked",
                    "the patient revoked consent at the sending hospital; the transfer was "
                    "stopped",
                )
            return
        if c is None:
            self._stop_for_consent(
                "consent-missing", "the sending node has no consent record for this offer"
            )
        elif c.state == consent.REVOKED:  # e.g. while the transfer was interrupted
            e.audit("consent-revoked", "stopped-stream", offer=self.offer_id)
            self._stop_for_consent(
                "consent-revoked",
                "the patient revoked consent at the sending hospital; the transfer was stopped",
            )
        elif c.granted(now):
            self._send_consent(c, now)
        elif c.state == consent.DECLINED:
            self._stop_for_consent(
                "consent-declined", "the patient declined this transfer; no images were sent"
            )
        elif c.state == consent.DEAD and c.policy == "patient":
            self._stop_for_consent(
                "consent-failed",
                "the patient could not confirm their identity on the consent page; no images "
                "were sent",
            )
        elif not self._pending_status_sent:
            self._pending_status_sent = True
            self.s.send_status("waiting-for-consent", self._consent_detail())
            self._emit("consent-pending", policy=c.policy, state=c.state)
            e.store.set_offer_state(self.offer_id, "paired")

    def _send_consent(self, c: consent.Consent, now: int) -> None:
        e = self.e
        s = self.s
        if (
            c.shown == "intended"
            and c.intended
            and c.intended.casefold() != s.peer_name.casefold()
        ):
            self._stop_for_consent(
                "consent-destination",
                f"the patient authorised sending to '{c.intended}', not to '{s.peer_name}'; "
                f"no images were sent",
            )
            return
        decision = {
            consent.APPROVED: "approved",
            consent.BREAK_GLASS: "break-glass",
            consent.NOT_REQUIRED: "not-required",
        }[c.state]
        method = {"approved": "phone-link", "break-glass": "break-glass"}.get(
            decision, "policy-none"
        )
        record = consent_record.build(
            offer_id=self.offer_id,
            manifest_sha256=s.manifest_digest,
            sender_fingerprint=e.identity.fingerprint,
            destination_fingerprint=crypto.fingerprint(s.peer_key),
            destination_name=s.peer_name,
            intended_destination=c.intended,
            shown_to_decider=c.shown or "none",
            decision=decision,
            decided_by=c.decided_by or {"role": "policy"},
            method=method,
            policy=c.policy,
            at=c.decided_at or now,
            valid_until=c.valid_until,
        )
        s.send_consent(record, e.identity.sign(consent_record.sign_bytes(record)))
        e.store.set_offer_state(self.offer_id, SENDING)
        e.audit(
            "consent-record-sent",
            "ok",
            offer=self.offer_id,
            decision=decision,
            policy=c.policy,
            peer=crypto.fingerprint(s.peer_key),
        )
        self._emit("consent-granted", decision=decision, policy=c.policy)
        self._emit("streaming", files=len(self.sources))

    def _stop_for_consent(self, code: str, message: str) -> None:
        """Tell the receiver why (sealed), end this offer, and stop."""
        self.s.refuse(code, message)
        state = DECLINED if code in ("consent-declined", "consent-failed") else FAILED
        self.e.store.set_offer_state(self.offer_id, state, error=message)
        if state == DECLINED:
            self.e.store.consents.end_link(self.offer_id)
        self.e.audit("transfer-stopped", code, offer=self.offer_id)
        log.info("offer %s stopped: %s", self.offer_id[:8], code)
        self._finish("error", code=code, message=message)
        self._done = True

    def _on_resume_request(self, event: ev.OfferRequest) -> None:
        """The receiver reconnects with a resume ticket: the same handshake, its secret as the
        password; only the node that paired before can complete it."""
        e = self.e
        found = e.store.find_resumable_offer(event.offer_ref, e.now())
        offer, secret = found if found else (None, b"")
        if offer is None or not offer.peer_fingerprint:
            e.audit("pairing-attempt", "resume-unknown", address=self.ch.peer_address)
            self.s.refuse(
                "resume-unknown",
                "this transfer can no longer be resumed (it ended or its ticket expired): ask "
                "the sender to offer the study again",
            )
            self._done = True
            return
        self._resume = True
        self._resume_peer = offer.peer_fingerprint
        self.offer_id = offer.id
        self.job = e.offer_job(offer.id)
        self._emit("pairing", address=self.ch.peer_address, resume=True)
        self.s.use_offer(offer.id, secret)

    def _send_one_chunk(self) -> None:
        nxt = self.s.next_chunk()
        assert nxt is not None
        fi, ci, offset, length = nxt
        if fi != self._fh_index:
            self.close_files()
            self._fh = self.sources[fi].open()
            self._fh_index = fi
            if offset:
                self._fh.seek(offset)
        assert self._fh is not None
        data = self._fh.read(length)
        if len(data) != length:
            uid = self.s.manifest.instances[fi].sop_instance_uid if self.s.manifest else "?"
            raise TransferError(
                f"instance {uid} changed on disk since the offer was made (it is shorter now); "
                f"create a new offer"
            )
        self.s.send_chunk(fi, ci, data)
        self._bytes_sent += length
        t = time.monotonic()
        if t - self._last_progress >= PROGRESS_EVERY_S or not self.s.next_chunk():
            self._last_progress = t
            self._emit(
                "progress",
                bytes_sent=self._bytes_sent,
                bytes_total=self._total,
                files_total=len(self.sources),
                file_index=fi,
            )

    def close_files(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._fh_index = -1

    def _emit(self, event: str, **fields: Any) -> None:
        if self.job is not None and not self.job.done:
            self.job.emit(event, **fields)

    def _finish(self, event: str, **fields: Any) -> None:
        if self.job is not None and not self.job.done:
            self.job.finish(event, **fields)

    def fail(self, exc: P2PShareError) -> None:
        if isinstance(exc, RemoteProtocolError):
            log.warning("receiver at %s broke the protocol: %s", self.ch.peer_address, exc.code)
        else:
            log.info("sender connection from %s ended: %s", self.ch.peer_address, exc.code)
        if not self._claimed:
            return  # another connection naming this offer must not touch its state or job
        e = self.e
        offer = e.store.get_offer(self.offer_id)
        if offer is None or offer.state not in ("paired", SENDING):
            return
        if isinstance(exc, ConnectionLost) and e.store.resume_secret(
            "offers", self.offer_id, e.now()
        ):
            # A cut, not a refusal: the receiver may come back with its ticket and the
            # transfer goes on from what it holds.
            e.store.set_offer_state(self.offer_id, INTERRUPTED, error=exc.message)
            e.audit("transfer-interrupted", "ok", offer=self.offer_id, reason=exc.code,
                    peer=offer.peer_fingerprint)  # fmt: skip
            self._emit("interrupted", message=exc.message)
            if e.on_interrupted is not None:
                e.on_interrupted(self.offer_id)
            return
        if isinstance(exc, ReceiverCancelled):
            # Their decision, not a fault: the offer ends here, with no resume to wait for.
            e.store.set_offer_state(self.offer_id, CANCELLED, error=exc.message)
            e.store.consents.end_link(self.offer_id)
            e.audit("transfer-cancelled", "by-receiver", offer=self.offer_id,
                    peer=offer.peer_fingerprint)  # fmt: skip
        else:
            e.store.set_offer_state(self.offer_id, FAILED, error=exc.message)
            e.audit("transfer-failed", exc.code, offer=self.offer_id, peer=offer.peer_fingerprint)
        self._finish("error", code=exc.code, message=exc.message)


def _unavailable(offer: Offer | None) -> str:
    """Why an offer cannot be paired with, as the receiver will be told."""
    if offer is None:
        return "unknown"
    return {
        EXPIRED: "expired",
        BURNT: "burnt",
        CANCELLED: "cancelled",
        DECLINED: "declined",
    }.get(offer.state, "used")
