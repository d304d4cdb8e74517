"""Both nodes' side of the relay: meet at a channel token, then it is an ordinary Channel.

The rendezvous token is ``derive(qr_secret, "p2ps relay rdv", offer_id)``: both nodes can
compute it from the QR code, the relay cannot reverse it to the secret, and it names one offer
only. Spoken codes are not offered over a relay (their 41 bits would be exposed to an offline
search if the token were derived from them, and the receiver of a spoken code knows nothing else
about the offer before pairing); see docs/relay.md.

The sending node registers each live offer at its relay (:class:`RelayRegistrar`): it connects
out, waits, and when a receiver is paired with it, hands the connection to
``Engine.serve_sender`` like any incoming connection, then registers again while the offer is
still live (a wrong code or a spoofed receiver does not use it up).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from p2pshare import crypto
from p2pshare.errors import ConfigError, ConnectionLost
from p2pshare.protocol.frames import MAX_FRAME
from p2pshare.store import ACTIVE, INTERRUPTED
from p2pshare.transfer.channel import Channel, WsChannel
from p2pshare.transfer.engine import Engine

log = logging.getLogger(__name__)

RELAY_PATH = "/relay"
AUTH_CONTEXT = b"p2pshare relay v1\0"
HANDSHAKE_TIMEOUT_S = 10.0
#: While waiting at the relay, the sender checks this often that the offer is still live.
CHECK_EVERY_S = 2.0
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]{1,253}):[0-9]{1,5}$")


def normalise(relay: str) -> str:
    """``ws://host:port`` or ``host:port`` → ``host:port``; ConfigError otherwise."""
    text = relay.strip()
    if text.startswith("ws://"):
        text = text[len("ws://") :].rstrip("/")
    if not _HOSTPORT.fullmatch(text):
        raise ConfigError(f"'{relay}' is not a relay address; use ws://HOST:PORT")
    return text


def rendezvous_token(offer_id: str, qr_secret: bytes) -> str:
    """The channel token both nodes give the relay for one QR offer."""
    return crypto.derive(qr_secret, "p2ps relay rdv", offer_id.encode("ascii")).hex()


def resume_token(ticket: str, secret: bytes) -> str:
    """The channel token for reconnecting an interrupted transfer through the relay: derived
    from the resume secret, itself derived from the session key (the relay learns neither)."""
    return crypto.derive(secret, "p2ps relay rsm", ticket.encode("ascii")).hex()


class RelayRefused(ConnectionLost):
    code = "relay-refused"


async def open_channel(
    relay: str,
    token: str,
    role: str,
    identity: crypto.Identity,
    http: aiohttp.ClientSession,
    *,
    keep_waiting: Callable[[], bool] | None = None,
    wait_s: float | None = None,
) -> WsChannel:
    """Connect to the relay, authenticate, and wait until the other side is there.

    ``keep_waiting`` is polled every few seconds while waiting (the sender stops when its offer
    is no longer live); ``wait_s`` bounds the wait. Raises ConnectionLost (RelayRefused when the
    relay said no).
    """
    url = f"ws://{relay}{RELAY_PATH}"
    try:
        ws = await http.ws_connect(
            url,
            max_msg_size=MAX_FRAME + 1024,
            heartbeat=30.0,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 429:
            raise RelayRefused("the relay refused: too many connections from here") from exc
        raise ConnectionLost(f"the relay at {relay} refused the connection") from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ConnectionLost(f"could not reach the relay at {relay}") from exc
    try:
        hello = await _control(ws, HANDSHAKE_TIMEOUT_S)
        challenge = base64.b64decode(str(hello.get("challenge", "")))
        sig = identity.sign(AUTH_CONTEXT + challenge + token.encode() + role.encode())
        await ws.send_str(
            json.dumps(
                {
                    "token": token,
                    "role": role,
                    "pk": base64.b64encode(identity.public_key).decode(),
                    "sig": base64.b64encode(sig).decode(),
                }
            )
        )
        reply = await _control(ws, HANDSHAKE_TIMEOUT_S)
        if reply.get("ok") != "waiting":
            raise ConnectionLost("the relay answered the handshake unexpectedly")
        loop = asyncio.get_running_loop()
        until = None if wait_s is None else loop.time() + wait_s
        while True:
            step = CHECK_EVERY_S if until is None else min(CHECK_EVERY_S, until - loop.time())
            if step <= 0:
                raise ConnectionLost("nobody came to the relay in time")
            try:
                reply = await _control(ws, step)
            except TimeoutError:
                if keep_waiting is not None and not keep_waiting():
                    raise ConnectionLost("stopped waiting at the relay") from None
                continue
            if reply.get("ok") == "paired":
                return WsChannel(ws, f"relay:{relay}")
            raise ConnectionLost("the relay answered unexpectedly")
    except BaseException:
        await ws.close()
        raise


async def _control(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> dict[str, Any]:
    """One control message from the relay (TimeoutError when none came in time)."""
    try:
        msg = await ws.receive(timeout=timeout)
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise ConnectionLost("the connection to the relay was lost") from exc
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise ConnectionLost("the relay closed the connection")
    try:
        obj = json.loads(msg.data)
    except ValueError:
        raise ConnectionLost("the relay sent a malformed control message") from None
    if not isinstance(obj, dict):
        raise ConnectionLost("the relay sent a malformed control message")
    if "error" in obj:
        raise RelayRefused(f"the relay refused: {str(obj.get('message', obj['error']))[:200]}")
    return obj


class RelayRegistrar:
    """The sending node's waiting connections at its relay, one per live QR offer."""

    def __init__(
        self,
        engine: Engine,
        relay: str,
        wrap: Callable[[Channel], Channel] = lambda ch: ch,
    ) -> None:
        self.engine = engine
        self.relay = relay
        self.wrap = wrap
        self._offers: dict[str, asyncio.Task[None]] = {}

    def register(self, offer_id: str) -> None:
        if offer_id not in self._offers:
            task = asyncio.create_task(self._keep_registered(offer_id))
            self._offers[offer_id] = task
            task.add_done_callback(lambda _t: self._offers.pop(offer_id, None))

    def register_resume(self, offer_id: str) -> None:
        """Wait at the relay for the receiver of an interrupted transfer to come back: under
        the current ticket's token and, during a handover, the previous ticket's."""
        for ticket, _secret in self.engine.store.offer_tickets(offer_id, self.engine.now()):
            key = f"resume:{offer_id}:{ticket}"
            if key not in self._offers:
                task = asyncio.create_task(self._keep_registered_for_resume(offer_id, ticket))
                self._offers[key] = task
                task.add_done_callback(functools.partial(self._forget, key))

    def _forget(self, key: str, _task: asyncio.Task[None]) -> None:
        self._offers.pop(key, None)

    def _resumable(self, offer_id: str, ticket: str) -> tuple[str, bytes] | None:
        offer = self.engine.store.get_offer(offer_id)
        if offer is None or offer.state != INTERRUPTED:
            return None
        tickets = dict(self.engine.store.offer_tickets(offer_id, self.engine.now()))
        return (ticket, tickets[ticket]) if ticket in tickets else None

    async def _keep_registered_for_resume(self, offer_id: str, ticket_id: str) -> None:
        backoff = 1.0
        async with aiohttp.ClientSession() as http:
            while (ticket := self._resumable(offer_id, ticket_id)) is not None:
                try:
                    channel = await open_channel(
                        self.relay,
                        resume_token(*ticket),
                        "sender",
                        self.engine.identity,
                        http,
                        keep_waiting=lambda: self._resumable(offer_id, ticket_id) is not None,
                    )
                except ConnectionLost as exc:
                    if self._resumable(offer_id, ticket_id) is None:
                        break
                    log.info("offer %s: relay (resume): %s", offer_id[:8], exc.code)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                log.info("offer %s: the receiver came back through the relay", offer_id[:8])
                await self.engine.serve_sender(self.wrap(channel))
                # Whoever came may have gone again at once (or never paired): do not spin.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _live(self, offer_id: str) -> bool:
        offer = self.engine.store.get_offer(offer_id)
        return offer is not None and offer.state == ACTIVE and offer.expires > self.engine.now()

    async def _keep_registered(self, offer_id: str) -> None:
        """Wait at the relay for this offer's receiver; one receiver at a time, while live."""
        backoff = 1.0
        async with aiohttp.ClientSession() as http:
            while self._live(offer_id):
                offer = self.engine.store.get_offer(offer_id)
                assert offer is not None
                token = rendezvous_token(offer_id, offer.qr_secret)
                try:
                    channel = await open_channel(
                        self.relay,
                        token,
                        "sender",
                        self.engine.identity,
                        http,
                        keep_waiting=lambda: self._live(offer_id),
                    )
                except ConnectionLost as exc:
                    if not self._live(offer_id):
                        break
                    log.info("offer %s: relay: %s", offer_id[:8], exc.code)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 1.0
                log.info("offer %s: a receiver came through the relay", offer_id[:8])
                # The relay keeps one sender per channel: serve this receiver to the end (a
                # wrong code or a spoofed receiver ends quickly), then wait for the next one
                # if the offer is still live.
                await self.engine.serve_sender(self.wrap(channel))

    async def close(self) -> None:
        tasks = list(self._offers.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


#: the node's registrar, present only when the node has a relay configured
registrar_key = web.AppKey("registrar_key", RelayRegistrar)
