"""The relay: a ciphertext-only forwarder for nodes that cannot reach each other.

Both nodes connect OUT to the relay (``ws://HOST:PORT/relay``); the relay pairs the two
connections that name the same channel token, one as ``sender`` and one as ``receiver``, and
then pipes WebSocket messages between them without looking inside. The token is derived from the
offer's QR secret (``relay_client.rendezvous_token``), so the relay learns neither the code nor
the secret, and what it forwards is the protocol's sealed stream: ciphertext, sizes and timing.

Handshake (text messages, before any byte is piped)::

    relay → node   {"v": 1, "challenge": <b64 32 random bytes>}
    node  → relay  {"token": <64 hex>, "role": "sender"|"receiver", "pk": <b64 Ed25519 key>,
                    "sig": <b64 signature over "p2pshare relay v1\\0" ‖ challenge ‖ token ‖ role>}
    relay → node   {"ok": "waiting"}   then, once the other side is there, {"ok": "paired"}
                 | {"error": <code>, "message": <sentence>} and the connection is closed

The signature proves which node is connecting, so the relay can keep an allow-list of node
fingerprints. Limits (all configurable, :class:`RelayConfig`): open channels, channels waiting
for their other side per address, how long a channel waits for that side, bytes and seconds
per channel, idle time, connections per minute per address. See docs/relay.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from p2pshare import crypto
from p2pshare.errors import ConfigError, CryptoError
from p2pshare.node.httputil import listen
from p2pshare.protocol.frames import MAX_FRAME

log = logging.getLogger(__name__)

RELAY_PATH = "/relay"
ROLES = ("sender", "receiver")
AUTH_CONTEXT = b"p2pshare relay v1\0"
HANDSHAKE_TIMEOUT_S = 10.0
_TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")

#: ``tap(token_prefix, direction, data)`` sees every forwarded message (tests, audits)
Tap = Callable[[str, str, bytes], None]


@dataclass(frozen=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 8790
    #: channels (waiting or paired) open at once
    max_channels: int = 256
    #: bytes forwarded per channel, both directions together (a 64 GB study plus overhead)
    max_bytes: int = 70 * 1000**3
    #: lifetime of a channel from its first connection, waiting included
    max_seconds: float = 6 * 3600.0
    #: a paired channel with no message either way for this long is closed
    idle_timeout: float = 120.0
    #: node fingerprints allowed to use the relay; empty means any node
    allow: frozenset[str] = frozenset()
    #: new connections per minute from one address
    rate_per_min: int = 60
    #: channels one address may hold open while they wait for their other side
    max_waiting_per_address: int = 8
    #: a channel whose other side does not come within this many seconds is closed
    wait_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        if (
            self.max_channels < 1
            or self.max_bytes < 1
            or self.rate_per_min < 1
            or self.max_waiting_per_address < 1
        ):
            raise ConfigError("relay limits must be positive")
        if self.max_seconds <= 0 or self.idle_timeout <= 0 or self.wait_timeout <= 0:
            raise ConfigError("relay time limits must be positive")


@dataclass(eq=False)
class _Channel:
    token: str
    created: float
    #: the address of the side that opened the channel (its waiting counts against it)
    address: str = ""
    ends: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    paired: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    forwarded: int = 0
    last_activity: float = 0.0
    reason: str = ""


class RateLimit:
    """At most ``per_min`` events per address in any 60-second window."""

    def __init__(self, per_min: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_min = per_min
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    def allow(self, address: str) -> bool:
        now = self.clock()
        q = self._seen.setdefault(address, deque())
        while q and q[0] <= now - 60.0:
            q.popleft()
        if len(q) >= self.per_min:
            return False
        q.append(now)
        if len(self._seen) > 10_000:  # forget quiet addresses so the table stays small
            self.prune()
        return True

    def prune(self) -> int:
        """Drop what has left the window, and addresses with nothing left; returns how many
        addresses remain."""
        cutoff = self.clock() - 60.0
        for addr in list(self._seen):
            q = self._seen[addr]
            while q and q[0] <= cutoff:
                q.popleft()
            if not q:
                del self._seen[addr]
        return len(self._seen)


class Relay:
    """The relay's state: open channels by token, per-address rate, counters."""

    def __init__(self, config: RelayConfig, tap: Tap | None = None) -> None:
        self.config = config
        self.tap = tap
        self.channels: dict[str, _Channel] = {}
        self.rate = RateLimit(config.rate_per_min)
        self.stats = {"connections": 0, "paired": 0, "refused": 0, "bytes": 0}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        address = request.remote or "unknown"
        self.stats["connections"] += 1
        if not self.rate.allow(address):
            self.stats["refused"] += 1
            log.warning("relay: refused %s: too many connections per minute", address)
            return web.json_response(
                {"error": "rate", "message": "too many connections from this address"}, status=429
            )
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME + 1024, heartbeat=30.0)
        await ws.prepare(request)
        try:
            token, role, fp = await self._authenticate(ws)
        except _Refused as exc:
            self.stats["refused"] += 1
            log.info("relay: refused %s: %s", address, exc.code)
            with contextlib.suppress(Exception):
                await ws.send_str(json.dumps({"error": exc.code, "message": exc.message}))
            await ws.close()
            return ws
        ch = self.channels.get(token)
        if ch is None:
            if len(self.channels) >= cfg.max_channels:
                await self._refuse(ws, "busy", "the relay has too many open channels; try later")
                return ws
            if self.waiting(address) >= cfg.max_waiting_per_address:
                log.warning("relay: refused %s: too many waiting channels", address)
                await self._refuse(
                    ws,
                    "too-many-waiting",
                    "this address already has too many channels waiting for their other side; "
                    "try later",
                )
                return ws
            ch = _Channel(token, time.monotonic(), address)
            self.channels[token] = ch
        if role in ch.ends or ch.closed.is_set():
            await self._refuse(ws, "token-in-use", "this channel already has that side")
            return ws
        ch.ends[role] = ws
        log.info("relay: %s %s joined channel %s", role, fp, token[:8])
        try:
            await ws.send_str(json.dumps({"ok": "waiting"}))
            if len(ch.ends) == 2:
                ch.last_activity = time.monotonic()
                self.stats["paired"] += 1
                ch.paired.set()
            await self._serve(ch, role, ws)
        finally:
            await self._close_channel(ch, ch.reason or "ended")
        return ws

    def waiting(self, address: str) -> int:
        """Channels opened from ``address`` still waiting for their other side."""
        return sum(
            1
            for ch in self.channels.values()
            if ch.address == address and not ch.paired.is_set() and not ch.closed.is_set()
        )

    async def _refuse(self, ws: web.WebSocketResponse, code: str, message: str) -> None:
        self.stats["refused"] += 1
        with contextlib.suppress(Exception):
            await ws.send_str(json.dumps({"error": code, "message": message}))
        await ws.close()

    async def _authenticate(self, ws: web.WebSocketResponse) -> tuple[str, str, str]:
        challenge = os.urandom(32)
        await ws.send_str(json.dumps({"v": 1, "challenge": base64.b64encode(challenge).decode()}))
        try:
            msg = await ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            raise _Refused("timeout", "no relay handshake in time") from None
        if msg.type != aiohttp.WSMsgType.TEXT or len(msg.data) > 1024:
            raise _Refused("handshake", "expected the relay handshake")
        try:
            hello = json.loads(msg.data)
            token, role = hello["token"], hello["role"]
            pk = base64.b64decode(hello["pk"], validate=True)
            sig = base64.b64decode(hello["sig"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _Refused("handshake", "the relay handshake is malformed") from None
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token) or role not in ROLES:
            raise _Refused("handshake", "the relay handshake is malformed")
        if len(pk) != 32:
            raise _Refused("handshake", "the node key is malformed")
        try:
            crypto.verify_signature(
                pk, AUTH_CONTEXT + challenge + token.encode() + role.encode(), sig
            )
        except CryptoError:
            raise _Refused("auth", "the node's signature did not verify") from None
        fp = crypto.fingerprint(pk)
        if self.config.allow and fp not in self.config.allow:
            raise _Refused("not-allowed", f"node {fp} is not on this relay's allow-list")
        return token, role, fp

    async def _serve(self, ch: _Channel, role: str, ws: web.WebSocketResponse) -> None:
        cfg = self.config
        deadline = ch.created + cfg.max_seconds
        # Waiting: the other side's arrival, this side leaving, or the wait timeout ends it.
        wait_until = min(deadline, ch.created + cfg.wait_timeout)
        recv = asyncio.ensure_future(ws.receive())
        paired = asyncio.ensure_future(ch.paired.wait())
        try:
            done, _ = await asyncio.wait(
                {recv, paired},
                timeout=max(0.0, wait_until - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            paired.cancel()
        if not ch.paired.is_set():
            recv.cancel()
            ch.reason = "left before pairing" if recv in done else "wait-timeout"
            return
        await ws.send_str(json.dumps({"ok": "paired"}))
        other = ch.ends["receiver" if role == "sender" else "sender"]
        direction = "s2r" if role == "sender" else "r2s"
        while True:
            now = time.monotonic()
            wait = min(deadline - now, ch.last_activity + cfg.idle_timeout - now)
            if wait <= 0:
                ch.reason = "max-seconds" if deadline <= now else "idle"
                return
            done, _ = await asyncio.wait({recv}, timeout=wait)
            if not done:
                if ch.closed.is_set():
                    recv.cancel()
                    return
                continue  # re-check the idle/lifetime limits (the other side may be busy)
            msg = recv.result()
            if msg.type != aiohttp.WSMsgType.BINARY:
                ch.reason = "closed" if msg.type != aiohttp.WSMsgType.TEXT else "text"
                return
            data: bytes = msg.data
            ch.forwarded += len(data)
            self.stats["bytes"] += len(data)
            if ch.forwarded > cfg.max_bytes:
                ch.reason = "max-bytes"
                return
            ch.last_activity = time.monotonic()
            if self.tap is not None:
                self.tap(ch.token[:8], direction, data)
            try:
                await other.send_bytes(data)
            except (ConnectionError, RuntimeError):
                ch.reason = "peer-gone"
                return
            recv = asyncio.ensure_future(ws.receive())

    async def _close_channel(self, ch: _Channel, reason: str) -> None:
        if ch.closed.is_set():
            return
        ch.closed.set()
        if self.channels.get(ch.token) is ch:
            del self.channels[ch.token]
        self.rate.prune()
        log.info(
            "relay: channel %s closed (%s) after %d bytes", ch.token[:8], reason, ch.forwarded
        )
        for ws in list(ch.ends.values()):
            with contextlib.suppress(Exception):
                await ws.close()

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"channels": len(self.channels), **self.stats})


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


relay_key = web.AppKey("relay_key", Relay)


def create_relay_app(config: RelayConfig, tap: Tap | None = None) -> web.Application:
    relay = Relay(config, tap)
    app = web.Application()
    app[relay_key] = relay
    app.router.add_get(RELAY_PATH, relay.handle)
    app.router.add_get("/status", relay.status)

    async def close_all(app: web.Application) -> None:
        for ch in list(relay.channels.values()):
            await relay._close_channel(ch, "relay stopping")

    app.on_shutdown.append(close_all)
    return app


async def start_relay(
    config: RelayConfig, tap: Tap | None = None
) -> tuple[web.AppRunner, web.Application]:
    """Start a relay; returns its runner (``runner.addresses`` holds the bound port)."""
    app = create_relay_app(config, tap)
    runner = await listen(app, config.host, config.port, "choose another --port")
    return runner, app


# -- command line ---------------------------------------------------------------------------


def _rate(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(?:/\s*min)?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a rate; use e.g. 60/min")
    return int(m.group(1))


def register(sub: Any) -> None:
    """Add ``p2pshare relay`` to the CLI's sub-commands (``out`` is the CLI's Output)."""
    d = RelayConfig()
    p = sub.add_parser("relay", help="run a ciphertext-only relay for nodes that cannot meet")
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    p.add_argument("--max-channels", type=int, default=d.max_channels, metavar="N")
    p.add_argument(
        "--max-bytes", type=int, default=d.max_bytes, metavar="BYTES", help="per channel"
    )
    p.add_argument(
        "--max-seconds", type=float, default=d.max_seconds, metavar="S", help="per channel"
    )
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout, metavar="S")
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=d.wait_timeout,
        metavar="S",
        help="how long a channel waits for its other side",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=d.max_waiting_per_address,
        metavar="N",
        help="waiting channels per address",
    )
    p.add_argument(
        "--allow",
        nargs="+",
        action="extend",
        metavar="FP",
        help="only these node fingerprints may use the relay",
    )
    p.add_argument(
        "--rate", type=_rate, default=d.rate_per_min, metavar="N/min", help="per address"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    async def run(args: argparse.Namespace, out: Any) -> int:
        cfg = RelayConfig(
            host=args.host,
            port=args.port,
            max_channels=args.max_channels,
            max_bytes=args.max_bytes,
            max_seconds=args.max_seconds,
            idle_timeout=args.idle_timeout,
            allow=frozenset(args.allow or ()),
            rate_per_min=args.rate,
            max_waiting_per_address=args.max_waiting,
            wait_timeout=args.wait_timeout,
        )
        runner, _app = await start_relay(cfg)
        addrs = [f"{a[0]}:{a[1]}" for a in runner.addresses]
        out.json({"type": "relay", "addresses": addrs})
        out.say(f"relay listening on {', '.join(addrs)} (ciphertext only)")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
        return 0

    p.set_defaults(func=run)
