"""The receiving side of one connection: pair, check the manifest, stage, verify, sign."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pshare import codes, crypto
from p2pshare.errors import (
    CodeRejected,
    ConnectionLost,
    ConsentStopped,
    IntegrityError,
    OfferUnavailable,
    P2PShareError,
    PeerKeyChanged,
    ReceiverCancelled,
    RemoteProtocolError,
    TransferAborted,
    TransferError,
    TrustError,
)
from p2pshare.jobs import PROGRESS_EVERY_S, Job
from p2pshare.manifest import Manifest
from p2pshare.protocol import consent as consent_record
from p2pshare.protocol import events as ev
from p2pshare.protocol.receiver import ReceiverSession, open_chunk
from p2pshare.staging import ChunkUnreadable, Staging
from p2pshare.transfer.channel import Channel

if TYPE_CHECKING:
    from p2pshare.transfer.engine import Engine

log = logging.getLogger(__name__)

#: After signing the receipt, how long to wait for the sender's orderly CLOSE.
CLOSE_WAIT_S = 10.0
#: How long a cancelled receive tries to tell the sender before it lets the connection go.
TELL_CANCELLED_S = 2.0
#: What the sender is told when this node's staff cancel, and the job event once it was sent.
CANCELLED_MESSAGE = "the receiving node's staff cancelled the transfer"
SENDER_TOLD = "sender-told"
#: Job event: the receipt went out but the sender's CLOSE never came back.
RECEIPT_UNCONFIRMED = "receipt-unconfirmed"


@dataclass(frozen=True)
class Resume:
    """What the receiving node kept of an interrupted transfer, to reconnect with."""

    ticket: str
    secret: bytes
    offer_id: str
    sender_fingerprint: str
    manifest_digest: str
    address: str
    #: (chunks held, prefix hashes, instances placed), worked out before reconnecting so the
    #: new connection does not wait for it (see staging.held_chunks)
    held: Any = field(default=None, compare=False, repr=False)


class ReceiverRun:
    def __init__(
        self,
        engine: Engine,
        channel: Channel,
        code: codes.SpokenCode | codes.QrOffer | Resume,
        out_dir: Path,
        job: Job,
    ) -> None:
        e = engine
        self.e = e
        self.ch = channel
        self.job = job
        self.out_dir = out_dir
        self.resume = code if isinstance(code, Resume) else None
        if isinstance(code, Resume):
            ref, password, spoken = code.ticket, code.secret, False
        elif isinstance(code, codes.SpokenCode):
            ref, password, spoken = str(code.number), code.password, True
        else:
            ref, password, spoken = code.offer_id, code.password, False
        self.s = ReceiverSession(
            name=e.config.name,
            public_key=e.identity.public_key,
            sign=e.identity.sign,
            offer_ref=ref,
            spoken=spoken,
            password=password,
            entropy=e.entropy,
            resume_offer=code.offer_id if isinstance(code, Resume) else "",
            deferred=True,  # chunks are opened and hashed on the staging write threads
        )
        #: keep the staged chunks when the connection is lost (the transfer can be resumed)
        self.keep_staging = False
        self._paired = False
        self.staging: Staging | None = None
        self._bytes = 0
        self._last_progress = 0.0
        self._first_verified_at: float | None = None
        self._started = time.monotonic()
        self.receipt: dict[str, Any] | None = None
        self._closed = False
        #: the sender fingerprint a QR code names; the node that answers must have it
        self._expected_fp = (
            code.fingerprint
            if isinstance(code, codes.QrOffer)
            else (code.sender_fingerprint if isinstance(code, Resume) else "")
        )

    @property
    def manifest(self) -> Manifest:
        assert self.s.manifest is not None
        return self.s.manifest

    async def run(self) -> dict[str, Any]:
        self.s.start()
        await self._flush()
        lost = True  # until something other than a lost connection ends the run
        cancelled = False
        try:
            while not self._closed:
                if self.receipt is not None:
                    # Everything is in place and signed for; wait only briefly for CLOSE.
                    try:
                        async with asyncio.timeout(CLOSE_WAIT_S):
                            data = await self.ch.recv()
                    except TimeoutError:
                        break
                else:
                    data = await self.ch.recv()
                if data is None:
                    break
                self.s.receive_data(data)
                try:
                    await self._pump()
                finally:
                    await self._flush()
        except RemoteProtocolError as exc:
            lost = False
            if self.receipt is None:
                raise self._as_transfer_error(exc) from exc
            # signed for already: only the CLOSE was owed, and it may not have sent the receipt
            log.warning("after the receipt, the sender's side broke the protocol (%s)", exc.code)
        except ConnectionLost:
            # After the receipt the study is complete whatever the connection does. Before it,
            # a loss noticed while sending an acknowledgement rather than while reading still
            # owes the person how much arrived and what to do (below).
            if self.receipt is None and self.s.manifest is None:
                raise
        except asyncio.CancelledError:
            cancelled = True
            lost = self.e.stopping  # a node shutting down keeps what arrived, for a resume
            if not self.e.stopping and self._paired:
                await self._tell_cancelled()
            raise
        except BaseException:
            lost = False
            raise
        finally:
            #: what the write threads found before the stream ended: an altered chunk or a
            #: failed disk explains the end better than the cut that followed
            found: P2PShareError | None = None
            if self.staging is not None and self.receipt is None:
                try:
                    found = await self._salvage()
                except Exception as exc:  # noqa: BLE001 - winding up must still close staging
                    log.warning(
                        "files that arrived before the end were not placed (%s)", type(exc).__name__
                    )
            explains = found is not None and lost and not cancelled
            if found is not None:
                lost = False  # altered or not written: nothing of it may be resumed
            if self.staging is not None:
                # A lost connection keeps what arrived for a resume (private staging folder);
                # every other ending removes partial patient data.
                self.keep_staging = lost and self.receipt is None and self._resumable()
                await self.staging.close(remove_staging=not self.keep_staging)
                if self.receipt is None and self.staging.placed:
                    # however it ended, the record says how many instances are in place (a
                    # resume stopped before it counted them keeps the last count)
                    self.e.store.update_transfer(self.job.id, verified=self.staging.placed)
            if explains:
                assert found is not None
                raise found
        if self.receipt is None:
            total = len(self.manifest.instances) if self.s.manifest else 0
            if total:
                done = self.staging.placed if self.staging else 0
                then = "" if self.keep_staging else ". Ask the sender to offer the study again"
                raise ConnectionLost(
                    f"the connection was lost after {done} of {total} instances; nothing "
                    f"partial was marked complete{then}"
                )
            raise ConnectionLost("the sender closed the connection before pairing finished")
        if not self._closed:
            # no CLOSE: the receipt may not have reached the sender (see send_receipt_again)
            self.job.emit(RECEIPT_UNCONFIRMED)
        return self.receipt

    async def _pump(self) -> None:
        """Handle the session's events, and the digests of files the write threads finished
        (which the session turns into FileVerified or FileRejected events)."""
        while True:
            while (event := self.s.next_event()) is not None:
                await self._on_event(event)
            if self.staging is None:
                return
            try:
                done = self.staging.finished()
            except ChunkUnreadable as exc:
                self.s.chunk_unreadable(exc.file_index, exc.chunk_index)  # raises
            if not done:
                return
            for fi, digest in done:
                if digest is not None:  # always: every file's first chunk came with a hasher
                    self.s.file_hashed(fi, digest)

    async def _salvage(self) -> P2PShareError | None:
        """The stream ended early: files whose every chunk had arrived, up to the first chunk
        that failed, still count. Their digests are reported once their writes finish, and
        the verified ones are placed, as they would have been a moment later.

        Returns what the write threads found, if anything: a chunk that failed to open (as the
        integrity error it is) or a disk error. Safe to call again.
        """
        staging = self.staging
        assert staging is not None
        found: P2PShareError | None = None
        with contextlib.suppress(TransferError):  # finished() reports it, in stream order
            await staging.drain()
        try:
            while done := staging.finished():
                for fi, digest in done:
                    if digest is not None:
                        self.s.file_hashed(fi, digest)
        except ChunkUnreadable as exc:
            try:
                self.s.chunk_unreadable(exc.file_index, exc.chunk_index)
            except RemoteProtocolError as err:
                found = self._as_transfer_error(err)
        except TransferError as exc:
            found = exc
        for event in self.s.take_events():
            if isinstance(event, ev.FileVerified):
                staging.verified(event.file_index)
            elif isinstance(event, ev.FileRejected):
                await staging.rejected(event.file_index, event.reason)
        return found

    def _keep_ticket(self) -> None:
        e = self.e
        ticket, secret = self.s.resume_ticket()
        e.store.set_resume(
            "transfers",
            self.job.id,
            ticket,
            secret,
            e.now() + e.config.resume_ttl_s,
            offer_id=self.s.offer_id,
            sender_address=self.ch.peer_address,
            staging=str(self._staging_dir()),
        )

    def _staging_dir(self) -> Path:
        """Stable per receive job, so a resumed connection finds what the last one staged."""
        return self.out_dir / ".p2pshare-partial" / self.job.id

    async def _resume_manifest(self, event: ev.ManifestOffer) -> None:
        """Reconnected: the same signed manifest, then accept from what is already held."""
        assert self.resume is not None
        if not self.resume.manifest_digest:  # the last connection ended before the manifest
            self._check_room(event.manifest)
            self.e.store.update_transfer(self.job.id, manifest=event.manifest.to_bytes())
        elif event.digest != self.resume.manifest_digest:
            self.s.refuse("resume-refused", "this is not the manifest of the interrupted transfer")
            await self._flush()
            raise IntegrityError(
                "on reconnecting, the sender offered a different study than the interrupted "
                "transfer; nothing was added"
            )
        self.staging = Staging(
            self.out_dir, self._staging_dir(), event.manifest, self._on_placed
        )
        if self.resume.held is not None and self.resume.manifest_digest:
            have, held_prefix, placed = self.resume.held
            # copies: the session extends them, and a failed attempt's caller may reuse these
            prefix = {fi: h.copy() for fi, h in held_prefix.items()}
        else:
            have, prefix, placed = await asyncio.to_thread(self.staging.resume_state)
        self.staging.placed = placed
        held = sum(
            event.manifest.chunk_length(fi, ci) for fi, n in have.items() for ci in range(n)
        )
        self._bytes = held
        self.e.store.update_transfer(self.job.id, state="receiving")
        self.job.emit(
            "resuming",
            files_verified=placed,
            files_total=len(event.manifest.instances),
            bytes_held=held,
            bytes_total=event.manifest.total_bytes,
        )
        log.info(
            "transfer %s resumed: %d instances in place, %d bytes held",
            self.s.transfer_id.hex()[:8],
            placed,
            held,
        )
        self.s.accept(have, prefix)

    def _resumable(self) -> bool:
        return self.e.store.resume_secret("transfers", self.job.id, self.e.now()) is not None

    async def _tell_cancelled(self) -> None:
        """This node's staff cancelled the transfer: say so to the sender (sealed), so that it
        ends the offer rather than keep it open for a resume. Best effort, briefly."""
        self.s.refuse(ReceiverCancelled.code, CANCELLED_MESSAGE)
        out = self.s.data_to_send()
        if not out:
            return  # the session had already failed: nothing can be said on this connection
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(TELL_CANCELLED_S):
                await self.ch.send(out)
                self.job.emit(SENDER_TOLD)

    async def _flush(self) -> None:
        out = self.s.data_to_send()
        if out:
            await self.ch.send(out)

    def _as_transfer_error(self, exc: RemoteProtocolError) -> P2PShareError:
        if exc.code in ("integrity", "out-of-order", "size-mismatch", "truncated"):
            return IntegrityError(f"{exc.message}. Nothing unverified was kept.")
        return exc

    async def _on_event(self, event: ev.Event) -> None:
        e = self.e
        if isinstance(event, ev.SealedChunk):
            assert self.staging is not None
            await self.staging.write(
                event.file_index,
                event.chunk_index,
                functools.partial(open_chunk, event),
                event.last,
                event.hasher,
            )
            self._bytes += event.length
            t = time.monotonic()
            if t - self._last_progress >= PROGRESS_EVERY_S:
                self._last_progress = t
                self._progress()
        elif isinstance(event, ev.FileVerified):
            assert self.staging is not None
            self.staging.verified(event.file_index)
        elif isinstance(event, ev.FileRejected):
            assert self.staging is not None
            log.warning("file #%d rejected: hash mismatch", event.file_index)
            await self.staging.rejected(event.file_index, event.reason)
        elif isinstance(event, ev.PeerIdentity):
            if self._expected_fp and event.fingerprint != self._expected_fp:
                e.audit(
                    "peer-key-changed",
                    "refused",
                    name=event.name,
                    fingerprint=event.fingerprint,
                    expected=self._expected_fp,
                    address=self.ch.peer_address,
                )
                self.s.refuse("wrong-node", "the receiving node expected another sending node")
                await self._flush()
                raise TrustError(
                    f"the node that answered ({event.name} [{event.fingerprint}]) is not the one "
                    f"in the QR code [{self._expected_fp}]; nothing was received. Check with the "
                    f"sender and scan their QR code again"
                )
            try:
                first = e.pin_peer(event, self.ch.peer_address)
            except PeerKeyChanged:
                self.s.refuse(
                    "peer-key-changed",
                    "the receiving node refused the sender's "
                    "identity: it differs from the one pinned on first contact",
                )
                await self._flush()
                raise
            self.job.emit(
                "paired",
                peer=event.name,
                fingerprint=event.fingerprint,
                first_contact=first,
                address=self.ch.peer_address,
            )
            self.s.trust_peer()
        elif isinstance(event, ev.Paired):
            self._paired = True
            self._started = time.monotonic()
            if self.resume is None:
                self._keep_ticket()  # the first connection: there is no earlier ticket
            e.store.update_transfer(
                self.job.id,
                state="paired",
                peer_name=self.s.peer_name,
                peer_fingerprint=crypto.fingerprint(self.s.peer_key),
                transfer_id=event.transfer_id.hex(),
            )
            if self.resume is not None:
                e.audit("transfer-resumed", "ok", transfer=event.transfer_id.hex(),
                        job=self.job.id, peer=crypto.fingerprint(self.s.peer_key))  # fmt: skip
                self.job.emit("resumed", address=self.ch.peer_address)
            e.audit(
                "pairing",
                "ok",
                transfer=event.transfer_id.hex(),
                peer=crypto.fingerprint(self.s.peer_key),
                address=self.ch.peer_address,
            )
        elif isinstance(event, ev.ManifestOffer):
            if self.resume is not None:
                # A reconnection's ticket is kept only now: the sender stored it before it sent
                # the manifest (a cut during the handshake leaves this side with the previous
                # ticket, which the sender still honours until it sees our ACCEPT).
                self._keep_ticket()
                await self._resume_manifest(event)
                return
            self._check_room(event.manifest)
            self.staging = Staging(
                self.out_dir, self._staging_dir(), event.manifest, self._on_placed
            )
            e.store.update_transfer(
                self.job.id, state="receiving", manifest=event.manifest.to_bytes()
            )
            e.audit(
                "transfer-started",
                "ok",
                transfer=self.s.transfer_id.hex(),
                study=event.manifest.study_instance_uid,
                manifest_sha256=event.digest,
                instances=len(event.manifest.instances),
            )
            log.info(
                "transfer %s: manifest %s accepted (%d instances, %d bytes)",
                self.s.transfer_id.hex()[:8],
                event.digest[:12],
                len(event.manifest.instances),
                event.manifest.total_bytes,
            )
            self.job.emit("manifest", manifest_sha256=event.digest, **event.manifest.summary())
            self.s.accept()
        elif isinstance(event, ev.ConsentGranted):
            rec = event.record
            text = consent_record.describe(rec)
            e.store.update_transfer(self.job.id, consent=rec)
            e.audit(
                "consent-record-received",
                "ok",
                transfer=self.s.transfer_id.hex(),
                decision=rec["decision"],
                method=rec["method"],
                policy=rec["policy"],
            )
            self.job.emit(
                "consent",
                decision=rec["decision"],
                method=rec["method"],
                policy=rec["policy"],
                decided_by=rec["decided_by"],
                at=rec["at"],
                valid_until=rec["valid_until"],
                text=text,
            )
        elif isinstance(event, ev.Status):
            self.job.emit("status", state=event.state, detail=event.detail)
        elif isinstance(event, ev.SenderDone):
            await self._conclude()
        elif isinstance(event, ev.Closed):
            self._closed = True
        elif isinstance(event, ev.RemoteError):
            if event.code.startswith("consent") and self.staging is not None:
                # the count below includes what was still being written and placed
                await self._salvage()
                with contextlib.suppress(TransferError):
                    await self.staging.settle()
            raise self._remote_error(event)

    async def _conclude(self) -> None:
        """Everything arrived: make it durable, then sign — or say what failed."""
        e, staging = self.e, self.staging
        assert staging is not None
        await staging.drain()
        await self._pump()  # the last files' digests, and placing the verified ones
        await staging.sync()
        missing = len(self.manifest.instances) - staging.placed - len(staging.failures)
        if missing:
            raise TransferError(
                f"{missing} verified instance(s) could not be put in place in {self.out_dir}; "
                f"nothing was reported complete. Check the disk and ask for the study again"
            )
        if staging.failures:
            first = next(iter(staging.failures.values()))
            n = len(staging.failures)
            self.s.refuse("incomplete", f"{n} instance(s) failed verification")
            await self._flush()
            e.audit("transfer-failed", "integrity", transfer=self.s.transfer_id.hex(), failed=n)
            raise IntegrityError(
                f"{n} of {len(self.manifest.instances)} instances failed verification and were "
                f"not kept (first: {first}). Ask the sender to offer the study again"
            )
        self._progress()
        self.receipt = self.s.send_receipt(e.now())
        e.store.update_transfer(
            self.job.id,
            state="complete",
            verified=staging.placed,
            receipt=self.receipt,
            finished=e.now(),
        )
        log.info(
            "transfer %s complete: %d instances verified, receipt for manifest %s signed",
            self.s.transfer_id.hex()[:8],
            staging.placed,
            self.receipt["manifest_sha256"][:12],
        )
        e.audit(
            "receipt-signed",
            "ok",
            transfer=self.s.transfer_id.hex(),
            manifest_sha256=self.receipt["manifest_sha256"],
            instances=self.receipt["instances"],
        )

    def _on_placed(self, file_index: int) -> None:
        if self._first_verified_at is None:
            self._first_verified_at = time.monotonic()
            self.job.emit(
                "first-instance",
                file_index=file_index,
                seconds=round(self._first_verified_at - self._started, 3),
            )

    def _remote_error(self, event: ev.RemoteError) -> P2PShareError:
        if self.resume is not None and not self._paired:
            # Before the keys exist an ERROR is not authenticated (anyone on the path, or the
            # relay, could forge "resume-unknown"), and "busy" passes: try again later rather
            # than give up the data already held.
            return ConnectionLost(f"the sending node did not take the reconnection: {event.message}")
        if event.code == "code-rejected":
            return CodeRejected(event.tries_left or 0)
        if event.code.startswith("offer-"):
            return OfferUnavailable(event.code[len("offer-") :])
        if event.code == "peer-key-changed":
            return TrustError(f"the sender refused this node: {event.message}")
        if event.code.startswith("consent"):
            done = self.staging.placed if self.staging else 0
            total = len(self.manifest.instances) if self.s.manifest else 0
            after = (
                f" The study is incomplete: {done} of {total} instances had arrived and were "
                f"verified."
                if done
                else " No images were received."
            )
            self.e.audit(
                "transfer-failed", event.code, transfer=self.s.transfer_id.hex(), verified=done
            )
            return ConsentStopped(f"{event.message}.{after}", event.code)
        return TransferAborted(f"the sender stopped the transfer: {event.message}")

    def _check_room(self, manifest: Manifest) -> None:
        cfg = self.e.config
        if manifest.total_bytes > cfg.max_study_bytes:
            msg = (
                f"the study is {manifest.total_bytes / 1e9:.1f} GB, more than this node "
                f"accepts ({cfg.max_study_bytes / 1e9:.1f} GB)"
            )
            self.s.refuse("too-large", msg)
            raise TransferAborted(msg)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.out_dir).free
        if free - manifest.total_bytes < cfg.min_free_bytes:
            msg = (
                f"not enough disk space in {self.out_dir}: the study needs "
                f"{manifest.total_bytes / 1e6:.0f} MB and {free / 1e6:.0f} MB are free"
            )
            self.s.refuse("no-space", "the receiving node does not have enough disk space")
            raise TransferAborted(msg)

    def _progress(self) -> None:
        placed = self.staging.placed if self.staging else 0
        self.job.emit(
            "progress",
            bytes_received=self._bytes,
            bytes_total=self.manifest.total_bytes,
            files_verified=placed,
            files_total=len(self.manifest.instances),
        )


@dataclass(frozen=True)
class Settled:
    """How a reconnection made only to settle an ended transfer went (:func:`tell_cancelled`,
    :func:`send_receipt_again`)."""

    #: "ok"; "refused" (the sender answered with an ERROR, ``code``); "wrong-node" (another
    #: node answered the ticket); "manifest-mismatch"; "protocol-violation"
    outcome: str
    code: str = ""
    #: whether the keys existed: an ERROR before them is not authenticated (a busy sender, or
    #: anyone on the path), so it is worth another try; one after them is the sender's word
    paired: bool = False
    receipt: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        """Trying again cannot change it. An ERROR before the keys is retried, but for
        ``resume-unknown``: what a sender with nothing to resume says (it ended the offer, or
        had the receipt after all); someone on the path who forged it could as well have cut
        every connection."""
        return self.outcome != "refused" or self.paired or self.code == "resume-unknown"


async def tell_cancelled(engine: Engine, channel: Channel, resume: Resume) -> Settled:
    """Reconnect with an interrupted transfer's ticket only to say that this node's staff
    cancelled it, so the sender ends its offer instead of waiting for a resume until the ticket
    expires. Raises ConnectionLost if the connection ended first."""

    def on_event(s: ReceiverSession, event: ev.Event) -> Settled | None:
        if isinstance(event, ev.Paired):
            s.refuse(ReceiverCancelled.code, CANCELLED_MESSAGE)
            return Settled("ok", paired=True)
        return None

    return await _afterwards(engine, channel, resume, on_event)


async def send_receipt_again(
    engine: Engine,
    channel: Channel,
    resume: Resume,
    keep_ticket: Callable[[str, bytes], None] = lambda _ticket, _secret: None,
) -> Settled:
    """Reconnect with a complete transfer's ticket to send its receipt again: the connection
    that carried it ended before the sender's CLOSE, so the sender may never have had it and
    would wait for a resume until its ticket expires. Every instance is declared held (they are
    in place), the sender sends nothing and declares the study complete, and this node signs a
    receipt for the connection (in ``Settled.receipt`` once the sender CLOSEs). Raises
    ConnectionLost if the connection ended before that CLOSE (the receipt may be lost again).

    ``keep_ticket`` stores the ticket this connection rolled to, as a resume keeps it: once the
    sender sees the ACCEPT, only that ticket opens the offer again."""

    signed: list[dict[str, Any]] = []

    def on_event(s: ReceiverSession, event: ev.Event) -> Settled | None:
        if isinstance(event, ev.ManifestOffer):
            if event.digest != resume.manifest_digest:
                s.refuse("resume-refused", "this is not the manifest of the transfer")
                return Settled("manifest-mismatch", paired=True)
            keep_ticket(*s.resume_ticket())
            m = event.manifest
            s.accept({fi: m.chunk_count(fi) for fi in range(len(m.instances))})
        elif isinstance(event, ev.SenderDone):
            signed.append(s.send_receipt(engine.now()))
        elif isinstance(event, ev.Closed):
            if not signed:  # closed before it declared the study complete
                return Settled("protocol-violation", "closed-early", paired=True)
            return Settled("ok", paired=True, receipt=signed[0])
        return None

    return await _afterwards(engine, channel, resume, on_event)


#: After the message that settles it, how long to let the sender read it before closing.
SETTLE_LINGER_S = 2.0


async def _afterwards(
    engine: Engine,
    channel: Channel,
    resume: Resume,
    on_event: Callable[[ReceiverSession, ev.Event], Settled | None],
) -> Settled:
    """Pair as a resume does (the ticket's secret as the password; the node that answers must
    be the one that paired before), hand every later event to ``on_event`` until it returns how
    it went, and send what it queued. Raises ConnectionLost when the connection ended first."""
    s = ReceiverSession(
        name=engine.config.name,
        public_key=engine.identity.public_key,
        sign=engine.identity.sign,
        offer_ref=resume.ticket,
        spoken=False,
        password=resume.secret,
        resume_offer=resume.offer_id,
    )
    paired = False

    async def flush() -> None:
        if out := s.data_to_send():
            await channel.send(out)

    async def settle(result: Settled) -> Settled:
        await flush()
        if result.outcome == "ok":
            # let the sender read it and close first, rather than race it with our close
            with contextlib.suppress(P2PShareError, TimeoutError):
                async with asyncio.timeout(SETTLE_LINGER_S):
                    while await channel.recv() is not None:
                        pass
        return result

    s.start()
    await flush()
    while (data := await channel.recv()) is not None:
        s.receive_data(data)
        try:
            while (event := s.next_event()) is not None:
                if isinstance(event, ev.PeerIdentity):
                    if event.fingerprint != resume.sender_fingerprint:
                        s.refuse("wrong-node", "the receiving node expected another sending node")
                        return await settle(Settled("wrong-node"))
                    s.trust_peer()
                elif isinstance(event, ev.Paired):
                    paired = True
                if isinstance(event, ev.RemoteError):
                    return Settled("refused", event.code, paired=paired)
                if (result := on_event(s, event)) is not None:
                    return await settle(result)
        except RemoteProtocolError as exc:
            return await settle(Settled("protocol-violation", exc.code, paired=paired))
        await flush()
    raise ConnectionLost("the sending node closed the connection")
