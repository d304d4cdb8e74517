"""What a node gives both sides of a transfer: identity, store, clock, audit, pinning."""

from __future__ import annotations

import asyncio
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
from p2pshare.transfer.receiving import ReceiverRun
from p2pshare.transfer.sending import SenderRun

log = logging.getLogger(__name__)


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
        run = SenderRun(self, channel)
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
        run = ReceiverRun(self, channel, code, out_dir, job)
        try:
            return await run.run()
        finally:
            await channel.close()
