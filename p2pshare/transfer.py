"""The asyncio engine: drives protocol sessions over a channel, reads and writes the files.

One loop per connection, the same shape on both sides::

    bytes in → session.receive_data → session.next_event → act (store, disk, jobs) → bytes out

The sender additionally fills the session's window with chunks read from the study's sources.
The receiver writes chunks to a private staging folder, and only after a file's SHA-256 matched
the signed manifest (and its DICOM header names the instance the manifest promised) is it synced
and renamed into place. Nothing unverified is ever moved to the destination or reported
complete; the receipt is signed only when every instance is in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import aiohttp
from aiohttp import web

from p2pshare import codes, crypto
from p2pshare.config import NodeConfig
from p2pshare.dicom.ingest import Source
from p2pshare.errors import (
    CodeRejected,
    ConnectionLost,
    IntegrityError,
    OfferUnavailable,
    P2PShareError,
    PeerKeyChanged,
    RemoteProtocolError,
    TransferAborted,
    TransferError,
    TrustError,
)
from p2pshare.jobs import Job
from p2pshare.manifest import Manifest
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import MAX_FRAME
from p2pshare.protocol.session import ReceiverSession, SenderSession
from p2pshare.staging import Staging
from p2pshare.store import BURNT, CANCELLED, COMPLETED, EXPIRED, FAILED, SENDING, Store

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.25
WS_PATH = "/p2p"
IDLE_TIMEOUT_S = 120.0


class Channel(Protocol):
    """A reliable, ordered byte pipe to the peer (a WebSocket, or an in-memory fake)."""

    peer_address: str

    async def send(self, data: bytes | bytearray) -> None: ...

    async def recv(self) -> bytes | None:
        """Next bytes, or None once the peer closed."""

    async def close(self) -> None: ...


class WsChannel:
    """A WebSocket (either side) as a Channel; every binary message is a run of bytes."""

    def __init__(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, peer_address: str
    ) -> None:
        self._ws = ws
        self.peer_address = peer_address

    async def send(self, data: bytes | bytearray) -> None:
        try:
            # A peer that stops reading must not hold this connection (and its memory) forever.
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                # aiohttp takes any bytes-like object (it checks at run time); its hint says bytes.
                await self._ws.send_bytes(cast(bytes, data))
        except TimeoutError as exc:
            raise ConnectionLost(
                f"the peer stopped reading for {IDLE_TIMEOUT_S:.0f} seconds"
            ) from exc
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise ConnectionLost("the connection to the peer was lost") from exc

    async def recv(self) -> bytes | None:
        try:
            msg = await self._ws.receive(timeout=IDLE_TIMEOUT_S)
        except TimeoutError as exc:
            raise ConnectionLost(f"the peer sent nothing for {IDLE_TIMEOUT_S:.0f} seconds") from exc
        if msg.type == aiohttp.WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ):
            return None
        if msg.type == aiohttp.WSMsgType.ERROR:
            return None
        raise ConnectionLost("the peer sent a non-binary WebSocket message")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()


@dataclass
class Engine:
    """What both sides of a transfer need from their node."""

    config: NodeConfig
    identity: crypto.Identity
    store: Store
    clock: Callable[[], float] = time.time
    entropy: crypto.Entropy = os.urandom
    #: job lookup for offers: the sending side reports into the offer's job
    offer_job: Callable[[str], Job | None] = field(default=lambda _id: None)
    #: offer id → the task serving it, so that cancelling an offer stops its stream
    running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    def now(self) -> int:
        return int(self.clock())

    def audit(self, action: str, outcome: str = "ok", **detail: Any) -> None:
        self.store.audit.append(self.now(), action, outcome, **detail)

    def pin_peer(self, peer: ev.PeerIdentity, address: str, **context: Any) -> bool:
        """Trust an institution on first use; True on first contact. Both outcomes audited.

        Raises:
            PeerKeyChanged: the name is pinned to another key (the caller refuses the peer).
        """
        try:
            first = self.store.check_pin(peer.name, peer.public_key, self.now(), address)
        except PeerKeyChanged:
            self.audit(
                "peer-key-changed",
                "refused",
                name=peer.name,
                fingerprint=peer.fingerprint,
                address=address,
                **context,
            )
            raise
        if first:
            self.audit("peer-pinned", "ok", name=peer.name, fingerprint=peer.fingerprint)
        return first

    # -- sending side ---------------------------------------------------------------------------

    async def serve_sender(self, channel: Channel) -> None:
        """Handle one receiver that connected to this node's peer endpoint."""
        run = _SenderRun(self, channel)
        try:
            await run.run()
        except P2PShareError as exc:
            run.fail(exc)
        except Exception as exc:  # never let one peer take the node down
            log.exception("sender connection from %s failed unexpectedly", channel.peer_address)
            run.fail(TransferError(f"internal error on the sending node ({type(exc).__name__})"))
        finally:
            run.close_files()
            if run.offer_id and self.running.get(run.offer_id) is asyncio.current_task():
                del self.running[run.offer_id]
            await channel.close()

    # -- receiving side -------------------------------------------------------------------------

    async def receive(
        self, channel: Channel, code: codes.SpokenCode | codes.QrOffer, out_dir: Path, job: Job
    ) -> dict[str, Any]:
        """Pair with the sender over ``channel`` and receive the study into ``out_dir``.

        Returns the signed receipt. Raises a P2PShareError subclass saying what went wrong.
        """
        run = _ReceiverRun(self, channel, code, out_dir, job)
        try:
            return await run.run()
        finally:
            await channel.close()


class _SenderRun:
    def __init__(self, engine: Engine, channel: Channel) -> None:
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

    async def run(self) -> None:
        while not self._done:
            if self.s.window_open:
                self._send_one_chunk()
                await self._flush()
                continue
            data = await self.ch.recv()
            if data is None:
                if not self._done:
                    raise ConnectionLost("the receiver closed the connection before the receipt")
                return
            self.s.receive_data(data)
            try:
                while (event := self.s.next_event()) is not None:
                    self._on_event(event)
            finally:
                await self._flush()

    async def _flush(self) -> None:
        out = self.s.data_to_send()
        if out:
            await self.ch.send(out)

    def _on_event(self, event: ev.Event) -> None:
        e = self.e
        if isinstance(event, ev.OfferRequest):
            self._on_offer_request(event)
        elif isinstance(event, ev.CodeMismatch):
            left = e.store.record_failed_attempt(self.offer_id)
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
            if not e.store.claim_offer(self.offer_id, e.now()):
                offer = e.store.get_offer(self.offer_id)
                state = offer.state if offer else "unknown"
                self.s.refuse(f"offer-{state}", OfferUnavailable(state).message)
                self._done = True
                return
            # Only the connection that claimed the offer may be stopped by cancelling it; a
            # hostile connection naming the same offer never replaces it here.
            task = asyncio.current_task()
            if task is not None:
                e.running[self.offer_id] = task
            offer = e.store.get_offer(self.offer_id)
            assert offer is not None
            e.store.set_offer_state(
                self.offer_id,
                "paired",
                peer_name=self.s.peer_name,
                peer_fingerprint=crypto.fingerprint(self.s.peer_key),
                transfer_id=event.transfer_id.hex(),
            )
            e.audit(
                "pairing-attempt",
                "ok",
                offer=self.offer_id,
                address=self.ch.peer_address,
                peer=crypto.fingerprint(self.s.peer_key),
            )
            self._emit(
                "paired", peer=self.s.peer_name, fingerprint=crypto.fingerprint(self.s.peer_key)
            )
            self.sources = [Source.from_json(s) for s in offer.sources]
            self._total = offer.manifest.total_bytes
            digest = self.s.send_manifest(offer.manifest, {"sender": e.config.name})
            log.info("offer %s paired; manifest %s sent", self.offer_id[:8], digest[:12])
        elif isinstance(event, ev.Accepted):
            e.store.set_offer_state(self.offer_id, SENDING)
            e.audit(
                "transfer-started",
                "ok",
                offer=self.offer_id,
                study=self.s.manifest.study_instance_uid if self.s.manifest else "",
                peer=crypto.fingerprint(self.s.peer_key),
                resumed_files=len(event.have),
            )
            self._emit("streaming", files=len(self.sources))
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
            raise TransferAborted(f"the receiver stopped: {event.message}")
        elif isinstance(event, ev.Closed):
            self._done = True

    def _on_offer_request(self, event: ev.OfferRequest) -> None:
        e = self.e
        offer = e.store.find_offer(event.offer_ref, event.spoken)
        if offer is not None and offer.state == "active" and offer.expires <= e.now():
            e.store.set_offer_state(offer.id, EXPIRED)
            e.audit("offer-expired", "ok", offer=offer.id)
            offer = e.store.get_offer(offer.id)
        if offer is None or offer.state != "active":
            state = (
                "unknown"
                if offer is None
                else {
                    EXPIRED: "expired",
                    BURNT: "burnt",
                    CANCELLED: "cancelled",
                }.get(offer.state, "used")
            )
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
        if not self.offer_id:
            return
        offer = self.e.store.get_offer(self.offer_id)
        if offer is not None and offer.state in ("paired", SENDING):
            self.e.store.set_offer_state(self.offer_id, FAILED, error=exc.message)
            self.e.audit("transfer-failed", exc.code, offer=self.offer_id)
            self._finish("error", code=exc.code, message=exc.message)


class _ReceiverRun:
    def __init__(
        self,
        engine: Engine,
        channel: Channel,
        code: codes.SpokenCode | codes.QrOffer,
        out_dir: Path,
        job: Job,
    ) -> None:
        e = engine
        self.e = e
        self.ch = channel
        self.job = job
        self.out_dir = out_dir
        spoken = isinstance(code, codes.SpokenCode)
        self.s = ReceiverSession(
            name=e.config.name,
            public_key=e.identity.public_key,
            sign=e.identity.sign,
            offer_ref=str(code.number) if isinstance(code, codes.SpokenCode) else code.offer_id,
            spoken=spoken,
            password=code.password,
            entropy=e.entropy,
        )
        self.staging: Staging | None = None
        self._bytes = 0
        self._last_progress = 0.0
        self._first_verified_at: float | None = None
        self._started = time.monotonic()
        self.receipt: dict[str, Any] | None = None
        self._closed = False

    @property
    def manifest(self) -> Manifest:
        assert self.s.manifest is not None
        return self.s.manifest

    async def run(self) -> dict[str, Any]:
        self.s.start()
        await self._flush()
        try:
            while not self._closed:
                data = await self.ch.recv()
                if data is None:
                    break
                self.s.receive_data(data)
                try:
                    while (event := self.s.next_event()) is not None:
                        await self._on_event(event)
                finally:
                    await self._flush()
        except RemoteProtocolError as exc:
            raise self._as_transfer_error(exc) from exc
        except ConnectionLost:
            # Noticed while sending an acknowledgement rather than while reading: the person
            # still needs to hear how much arrived and what to do.
            if self.receipt is not None or self.s.manifest is None:
                raise
        finally:
            if self.staging is not None:
                await self.staging.close(remove_staging=self.receipt is not None)
        if self.receipt is None:
            total = len(self.manifest.instances) if self.s.manifest else 0
            if total:
                done = self.staging.placed if self.staging else 0
                raise ConnectionLost(
                    f"the connection was lost after {done} of {total} instances; nothing "
                    f"partial was marked complete. Ask the sender to offer the study again"
                )
            raise ConnectionLost("the sender closed the connection before pairing finished")
        return self.receipt

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
        if isinstance(event, ev.Chunk):
            assert self.staging is not None
            await self.staging.write(event.file_index, event.chunk_index, event.data, event.last)
            self._bytes += len(event.data)
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
            self._started = time.monotonic()
            e.store.update_transfer(
                self.job.id,
                state="paired",
                peer_name=self.s.peer_name,
                peer_fingerprint=crypto.fingerprint(self.s.peer_key),
                transfer_id=event.transfer_id.hex(),
            )
            e.audit(
                "pairing",
                "ok",
                transfer=event.transfer_id.hex(),
                peer=crypto.fingerprint(self.s.peer_key),
                address=self.ch.peer_address,
            )
        elif isinstance(event, ev.ManifestOffer):
            self._check_room(event.manifest)
            self.staging = Staging(
                self.out_dir,
                self.out_dir / ".p2pshare-partial" / self.s.transfer_id.hex(),
                event.manifest,
                self._on_placed,
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
        elif isinstance(event, ev.Status):
            self.job.emit("status", state=event.state, **event.detail)
        elif isinstance(event, ev.SenderDone):
            await self._conclude()
        elif isinstance(event, ev.Closed):
            self._closed = True
        elif isinstance(event, ev.RemoteError):
            raise self._remote_error(event)

    async def _conclude(self) -> None:
        """Everything arrived: make it durable, then sign — or say what failed."""
        e, staging = self.e, self.staging
        assert staging is not None
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
        if event.code == "code-rejected":
            return CodeRejected(event.tries_left or 0)
        if event.code.startswith("offer-"):
            return OfferUnavailable(event.code[len("offer-") :])
        if event.code == "peer-key-changed":
            return TrustError(f"the sender refused this node: {event.message}")
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


async def connect(address: str, session: aiohttp.ClientSession) -> WsChannel:
    """Open the peer channel to a sending node at ``host:port``."""
    url = f"ws://{address}{WS_PATH}"
    try:
        ws = await session.ws_connect(
            url,
            max_msg_size=MAX_FRAME + 1024,
            autoping=True,
            heartbeat=30.0,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ConnectionLost(
            f"could not reach the sending node at {address}: check the address and that its "
            f"node is running"
        ) from exc
    return WsChannel(ws, address)
