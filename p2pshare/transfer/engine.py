"""What a node gives both sides of a transfer: identity, store, clock, audit, pinning."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pshare import codes, crypto
from p2pshare.config import NodeConfig
from p2pshare.errors import P2PShareError, PeerKeyChanged, TransferError
from p2pshare.jobs import Job
from p2pshare.protocol import events as ev
from p2pshare.store import Store
from p2pshare.transfer.channel import Channel
from p2pshare.transfer.receiving import ReceiverRun, Resume
from p2pshare.transfer.sending import SenderRun

log = logging.getLogger(__name__)

#: A connection must finish pairing within this many seconds.
PAIRING_DEADLINE_S = 30.0
#: At most this many connections may be pairing at once.
MAX_UNPAIRED = 64


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
    #: peer addresses of connections that have not paired yet (one entry per connection)
    unpaired: int = 0
    #: the node is shutting down: transfers it cancels are interrupted, not abandoned
    stopping: bool = False
    #: called with an offer id when its transfer was interrupted (e.g. to wait at the relay)
    on_interrupted: Callable[[str], None] | None = None
    #: offer id → set when the offer's consent changed (wakes the connection serving it)
    consent_signals: dict[str, asyncio.Event] = field(default_factory=dict)

    def now(self) -> int:
        return int(self.clock())

    def audit(self, action: str, outcome: str = "ok", **detail: Any) -> None:
        self.store.audit.append(self.now(), action, outcome, **detail)

    def consent_signal(self, offer_id: str) -> asyncio.Event:
        return self.consent_signals.setdefault(offer_id, asyncio.Event())

    def consent_changed(self, offer_id: str) -> None:
        """The offer's consent was decided, revoked or broken glass for: re-check it now."""
        self.consent_signal(offer_id).set()

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
        """Handle one receiver that connected to this node's peer endpoint.

        Anyone who can reach the port can connect, so connections that have not paired yet are
        capped (``MAX_UNPAIRED``) and must pair within ``PAIRING_DEADLINE_S``: a flood of idle
        connections cannot use up the node's sockets. (Limits per address belong to the relay.)
        """
        run = SenderRun(self, channel, deadline=time.monotonic() + PAIRING_DEADLINE_S)
        address = channel.peer_address
        if self.unpaired >= MAX_UNPAIRED:
            log.warning("refused a connection from %s: too many unpaired connections", address)
            self.audit("pairing-attempt", "busy", address=address)
            run.s.refuse("busy", "the sending node is busy with other pairings; try again shortly")
            with contextlib.suppress(P2PShareError):
                await run.flush()
            await channel.close()
            return
        self.unpaired += 1
        run.on_paired = self._paired
        try:
            await run.run()
        except P2PShareError as exc:
            run.fail(exc)
        except Exception as exc:  # never let one peer take the node down
            log.exception("sender connection from %s failed unexpectedly", channel.peer_address)
            run.fail(TransferError(f"internal error on the sending node ({type(exc).__name__})"))
        finally:
            if run.on_paired is not None:
                run.on_paired()
            run.close_files()
            if run.offer_id and self.running.get(run.offer_id) is asyncio.current_task():
                del self.running[run.offer_id]
            await channel.close()

    def _paired(self) -> None:
        self.unpaired -= 1

    # -- receiving side -------------------------------------------------------------------------

    async def receive(
        self,
        channel: Channel,
        code: codes.SpokenCode | codes.QrOffer | Resume,
        out_dir: Path,
        job: Job,
    ) -> dict[str, Any]:
        """Pair with the sender over ``channel`` and receive the study into ``out_dir``.

        Returns the signed receipt. Raises a P2PShareError subclass saying what went wrong.
        """
        run = ReceiverRun(self, channel, code, out_dir, job)
        try:
            return await run.run()
        finally:
            await channel.close()
