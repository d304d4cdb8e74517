"""Several paths to one sender at once: direct addresses, LAN discovery, a relay.

The receiver opens every path concurrently and sends each the HELLO. What comes back tells it,
at no cost, which paths lead to a node that holds the offer: a PAKE message (the node holds a
live offer of that number or id) or an ERROR (unknown, expired, used…). Only then is the
receiver's IDENT_R — the message that proves (or disproves) the code, and that a node holding
another offer of the same number would count as a wrong try — released, on ONE path at a time:
the first to answer. If that path pairs, every other path is closed before it ever sent
IDENT_R, so no other node counts a wrong code and the offer is claimed exactly once. If it fails
(a spoofed advertisement, a node holding an unrelated offer with the same number), the next path
that answered is released, while the sender's pairing deadline allows.

So "the first connection whose pairing completes" wins, and parallel paths cost the offers of
other nodes nothing. The protocol state machines are untouched: the hold is a gate on the
channel (:class:`GatedChannel`) that lets the first message (HELLO) through and holds every
later one until the coordinator opens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from p2pshare import codes
from p2pshare.errors import (
    CodeError,
    ConfigError,
    ConnectionLost,
    OfferUnavailable,
    P2PShareError,
    TransferError,
)
from p2pshare.jobs import Job
from p2pshare.protocol.frames import HEADER, FrameType
from p2pshare.transfer import relay_client
from p2pshare.transfer.channel import Channel, connect
from p2pshare.transfer.engine import Engine

if TYPE_CHECKING:
    from p2pshare.discovery import Discovered

log = logging.getLogger(__name__)

DIRECT, LAN, RELAY = "direct", "lan", "relay"
#: How an address names a relay in an offer's address list (``relay:HOST:PORT``).
RELAY_PREFIX = "relay:"
#: Opening one path (TCP, WebSocket upgrade, relay rendezvous) may take at most this long.
CONNECT_TIMEOUT_S = 15.0
#: A spoken code without an address: how long to wait for the first node to show on the LAN.
DISCOVERY_WAIT_S = 5.0
#: How long a relay path waits for the sender's registered connection.
RELAY_WAIT_S = 20.0

@dataclass(frozen=True)
class Route:
    """One way to reach the sending node."""

    kind: str  # DIRECT | LAN | RELAY
    address: str  # host:port; for RELAY the relay's host:port
    name: str = ""  # for LAN: the name the node advertised (a hint, never trusted)

    @property
    def label(self) -> str:
        """The address as an offer lists it (``relay:HOST:PORT`` for a relay)."""
        return RELAY_PREFIX + self.address if self.kind == RELAY else self.address

    def to_json(self) -> dict[str, str]:
        out = {"path": self.kind, "address": self.address}
        if self.name:
            out["name"] = self.name
        return out


def classify(address: str, kind: str = DIRECT) -> Route:
    """An offer's or operator's address as a route (``relay:HOST:PORT`` is a relay)."""
    if address.startswith(RELAY_PREFIX):
        return Route(RELAY, address[len(RELAY_PREFIX) :])
    return Route(kind, address)


def merge(routes: list[Route]) -> list[Route]:
    """One route per address (the first wins: a given address before a discovered one)."""
    seen: set[str] = set()
    out: list[Route] = []
    for r in routes:
        if r.label not in seen:
            seen.add(r.label)
            out.append(r)
    return out


def plan(
    code: codes.SpokenCode | codes.QrOffer,
    given: list[str],
    pinned: list[dict[str, Any]],
    discovered: list[Discovered],
) -> list[Route]:
    """Every route to try, from what the person gave (``--from``: host:port, or the name of a
    pinned or discovered institution), the QR code's addresses, and the nodes seen on the LAN
    that carry the QR code's fingerprint. A spoken code without ``--from`` plans nothing here:
    the caller then asks every node on the LAN (see :func:`lan_routes`).

    Raises:
        ConfigError: a ``--from`` that is neither an address nor a known institution.
    """
    routes: list[Route] = []
    for a in given:
        if codes.is_address(a):
            routes.append(Route(DIRECT, a))
            continue
        peer = next((p for p in pinned if p["name"] == a), None)
        found = lan_routes([d for d in discovered if d.name == a])
        if (peer is None or not peer["last_address"]) and not found:
            raise ConfigError(
                f"'{a}' is neither host:port nor a known institution; give the sending "
                f"node's address as HOST:PORT"
            )
        if peer is not None and peer["last_address"]:
            routes.append(Route(DIRECT, peer["last_address"]))
        routes.extend(found)
    if isinstance(code, codes.QrOffer):
        routes.extend(classify(a) for a in code.addresses)
        routes.extend(lan_routes([d for d in discovered if d.fingerprint == code.fingerprint]))
    return merge(routes)


def lan_routes(nodes: list[Discovered]) -> list[Route]:
    return [Route(LAN, address, d.name) for d in nodes for address in d.addresses]


class BoundedChannel:
    """A channel whose peer must keep reading and sending: ``idle_s`` without progress either
    way (a send that cannot complete, a receive that brings nothing) drops the connection, so a
    stalled peer cannot hold a connection, its buffers or its task forever."""

    def __init__(self, inner: Channel, idle_s: float) -> None:
        self.inner = inner
        self.peer_address = inner.peer_address
        self.idle_s = idle_s

    async def send(self, data: bytes | bytearray) -> None:
        try:
            async with asyncio.timeout(self.idle_s):
                await self.inner.send(data)
        except TimeoutError:
            raise ConnectionLost(f"the peer stopped reading for {self.idle_s:.0f} seconds") from None

    async def recv(self) -> bytes | None:
        try:
            async with asyncio.timeout(self.idle_s):
                return await self.inner.recv()
        except TimeoutError:
            raise ConnectionLost(f"the peer sent nothing for {self.idle_s:.0f} seconds") from None

    async def close(self) -> None:
        await self.inner.close()


class GatedChannel:
    """A channel that lets the first message out and holds the rest until :meth:`release`.

    It also notes how the peer answered the first message: ``answered`` resolves True when the
    peer's first frame is a PAKE (it holds the offer), False for anything else.
    """

    def __init__(self, inner: Channel) -> None:
        self.inner = inner
        self.peer_address = inner.peer_address
        self.answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._released = asyncio.Event()
        self._sent_first = False
        self._head = bytearray()

    def release(self) -> None:
        self._released.set()

    async def send(self, data: bytes | bytearray) -> None:
        if self._sent_first:
            await self._released.wait()
        self._sent_first = True
        await self.inner.send(data)

    async def recv(self) -> bytes | None:
        try:
            data = await self.inner.recv()
        except BaseException:
            self._answer(False)
            raise
        if self.answered.done():
            return data
        if data is None:
            self._answer(False)
        else:
            self._head += data[: HEADER.size - len(self._head)]
            if len(self._head) >= HEADER.size:
                self._answer(self._head[4] == FrameType.PAKE)
        return data

    def _answer(self, holds: bool) -> None:
        if not self.answered.done():
            self.answered.set_result(holds)

    async def close(self) -> None:
        self._answer(False)
        await self.inner.close()


@dataclass(eq=False)
class _Attempt:
    route: Route
    task: asyncio.Task[dict[str, Any]] | None = None
    gate: GatedChannel | None = None
    holds: bool = False
    released: bool = False
    error: P2PShareError | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


async def _open(
    route: Route,
    engine: Engine,
    code: codes.SpokenCode | codes.QrOffer,
    http: aiohttp.ClientSession,
) -> Channel:
    if route.kind != RELAY:
        return await connect(route.address, http)
    if not isinstance(code, codes.QrOffer):
        raise ConnectionLost("a relay can only be used with the QR code, not a spoken code")
    token = relay_client.rendezvous_token(code.offer_id, code.secret)
    return await relay_client.open_channel(
        route.address, token, "receiver", engine.identity, http, wait_s=RELAY_WAIT_S
    )


async def receive_first(
    engine: Engine,
    routes: list[Route],
    code: codes.SpokenCode | codes.QrOffer,
    out: Path,
    job: Job,
    http: aiohttp.ClientSession,
) -> tuple[dict[str, Any], Route]:
    """Receive over whichever path pairs first; returns the receipt and the path used.

    Raises the most telling error of the paths when none pairs (a wrong code over an
    "unknown offer", that over "could not connect").
    """
    if not routes:
        raise ConfigError(
            "no way to reach the sending node: add --from HOST:PORT (or the name of an "
            "institution this node knows), or scan the QR code"
        )
    wake = asyncio.Event()
    attempts = [_Attempt(r) for r in routes]

    async def run(a: _Attempt) -> dict[str, Any]:
        try:
            limit = CONNECT_TIMEOUT_S + (RELAY_WAIT_S if a.route.kind == RELAY else 0.0)
            async with asyncio.timeout(limit):
                inner = await _open(a.route, engine, code, http)
        except TimeoutError:
            raise ConnectionLost(f"could not reach {a.route.label} in time") from None
        a.gate = GatedChannel(BoundedChannel(inner, engine.config.idle_timeout_s))
        a.gate.answered.add_done_callback(lambda f: _on_answer(a, f))
        return await engine.receive(a.gate, code, out, job)

    def _on_answer(a: _Attempt, fut: asyncio.Future[bool]) -> None:
        a.holds = not fut.cancelled() and fut.result()
        a.ready.set()
        wake.set()

    for a in attempts:
        a.task = asyncio.create_task(run(a))
        a.task.add_done_callback(lambda _t: wake.set())

    current: _Attempt | None = None
    paired_seen = False
    seq0 = job.events[-1]["seq"] if job.events else 0
    watcher = asyncio.create_task(_watch_paired(job, seq0, wake))
    try:
        while True:
            for a in attempts:
                assert a.task is not None
                if a.task.done() and a.error is None and a is not current:
                    a.error = _error_of(a.task)
            if current is not None:
                assert current.task is not None
                if current.task.done():
                    exc = current.task.exception() if not current.task.cancelled() else None
                    if exc is None and not current.task.cancelled():
                        return current.task.result(), current.route
                    current.error = _error_of(current.task)
                    log.info(
                        "path %s %s did not pair: %s",
                        current.route.kind,
                        current.route.address,
                        current.error.code,
                    )
                    if paired_seen:
                        raise current.error
                    current = None
                elif not paired_seen and _paired_since(job, seq0):
                    paired_seen = True
                    job.emit("path", **current.route.to_json())
                    for other in attempts:
                        if other is not current and other.task is not None:
                            other.task.cancel()
            if current is None:
                nxt = next(
                    (
                        a
                        for a in attempts
                        if a.holds and not a.released and a.task is not None and not a.task.done()
                    ),
                    None,
                )
                if nxt is not None:
                    assert nxt.gate is not None
                    current, nxt.released = nxt, True
                    nxt.gate.release()
                elif all(a.task is not None and a.task.done() for a in attempts):
                    raise _best_error(attempts)
            wake.clear()
            await wake.wait()
    finally:
        watcher.cancel()
        for a in attempts:
            if a.task is not None and not a.task.done():
                a.task.cancel()
        for a in attempts:
            if a.task is not None:
                with contextlib.suppress(BaseException):
                    await a.task


def _paired_since(job: Job, seq: int) -> bool:
    return any(e["event"] == "paired" for e in job.since(seq))


async def _watch_paired(job: Job, seq: int, wake: asyncio.Event) -> None:
    """Pairing shows up as a job event, not as a task ending: wake the coordinator on it."""
    after = seq
    while not job.done:
        events = await job.wait(after, 30.0)
        if events:
            after = events[-1]["seq"]
            if any(e["event"] == "paired" for e in events):
                wake.set()
                return


def _error_of(task: asyncio.Task[Any]) -> P2PShareError:
    if task.cancelled():
        return ConnectionLost("the path was closed")
    exc = task.exception()
    if isinstance(exc, P2PShareError):
        return exc
    log.error("a receive path failed unexpectedly: %r", exc)
    return TransferError(f"internal error on the receiving node ({type(exc).__name__})")


def _best_error(attempts: list[_Attempt]) -> P2PShareError:
    """What to tell the person when no path paired: the most specific thing any path learnt."""

    def rank(e: P2PShareError) -> int:
        if isinstance(e, OfferUnavailable):
            return 1 if e.state == "unknown" else 3
        if isinstance(e, CodeError):
            return 4
        if isinstance(e, ConnectionLost):
            return 0
        return 2

    errors = [a.error for a in attempts if a.error is not None]
    if not errors:
        return ConnectionLost("no path to the sending node could be opened")
    best = max(errors, key=rank)
    if isinstance(best, ConnectionLost) and len(attempts) > 1:
        return ConnectionLost(
            f"none of the {len(attempts)} ways to the sending node worked ({best.message})"
        )
    return best
