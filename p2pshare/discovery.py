"""LAN discovery with mDNS/DNS-SD: advertise this node, list the others (``_p2pshare._tcp``).

A node's advertisement carries its display name, fingerprint, protocol version and port —
nothing else: never a patient detail, an offer or a code. Discovery is only a hint of where a
node might be. Anyone on the LAN can advertise anything, so nothing is trusted from it: a
receiver still runs the PAKE with whatever answers, a QR code still pins the sender's
fingerprint, and pinned institutions are still checked by key after pairing.

Interfaces follow the address the node listens on: a node bound to 127.0.0.1 advertises and
browses on loopback only, one bound to a LAN address on that interface, one bound to 0.0.0.0 on
all interfaces. zeroconf's exceptions are translated here; when multicast is unavailable the node
runs on without discovery and says so in its log.

The table of nodes seen is bounded so that fake adverts cannot crowd out real nodes: an entry
not confirmed for ``expire_s`` is dropped (entries are re-resolved in the background before
that, so a node still answering stays), at most ``max_per_host`` entries may share an address,
and when the table (or an address's share) is full a node whose fingerprint is pinned takes the
place of the stalest unpinned entry while anything else is turned away. Advertised addresses are
themselves only claims, so the per-address cap slows a flood from one machine; expiry and the
preference for pinned institutions are what keep the nodes that matter listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import ifaddr
from aiohttp import web
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import (
    Error as ZeroconfError,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_p2pshare._tcp.local."
TXT_VERSION = "1"
RESOLVE_TIMEOUT_MS = 3000
#: A fingerprint as crypto.fingerprint writes it: 24 base32 characters in groups of four.
_FP_RE = re.compile(r"^[A-Z2-7]{4}(-[A-Z2-7]{4}){5}$")
MAX_PEERS = 256
#: entries that may share one advertised address (several nodes on one machine are rare)
MAX_PER_HOST = 8
#: an entry not confirmed for this long is dropped; it is re-resolved after half of it
EXPIRE_S = 10 * 60.0
#: re-resolutions running at once during a refresh
_REFRESHING = 8


@dataclass(frozen=True)
class Discovered:
    """A node seen on the LAN (a hint: nothing here is verified)."""

    name: str
    fingerprint: str
    hosts: tuple[str, ...]
    port: int
    seen: float

    @property
    def addresses(self) -> list[str]:
        return [f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}" for h in self.hosts]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "addresses": self.addresses,
            "seen": round(self.seen, 3),
        }


def interfaces_for(host: str) -> tuple[InterfaceChoice | list[str], list[str]]:
    """Where to run mDNS, and which addresses to advertise, for a node listening on ``host``."""
    if host in ("", "0.0.0.0"):
        hosts = [
            str(ip.ip)
            for adapter in ifaddr.get_adapters()
            for ip in adapter.ips
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback
        ]
        return InterfaceChoice.All, hosts or ["127.0.0.1"]
    if host == "localhost":
        host = "127.0.0.1"
    return [host], [host]


def parse_txt(properties: dict[bytes, bytes | None]) -> tuple[str, str, int] | None:
    """(name, fingerprint, port) from an advertisement's TXT record, or None if it is not ours."""
    try:
        props = {k.decode("ascii"): (v or b"").decode("utf-8") for k, v in properties.items()}
        name, fp, version, port = props["name"], props["fp"], props["v"], int(props["port"])
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    if version != TXT_VERSION or not _FP_RE.fullmatch(fp) or not 0 < port < 65536:
        return None
    if not name.strip() or len(name) > 200 or not name.isprintable():
        return None
    return name, fp, port


class Discovery:
    """Advertise this node and keep a table of the others seen on the LAN."""

    def __init__(
        self,
        name: str,
        fingerprint: str,
        host: str,
        *,
        pinned: Callable[[], Collection[str]] = frozenset,
        clock: Callable[[], float] = time.time,
        expire_s: float = EXPIRE_S,
        max_peers: int = MAX_PEERS,
        max_per_host: int = MAX_PER_HOST,
    ) -> None:
        """``pinned`` gives the fingerprints of the institutions this node has pinned (they
        are preferred when the table is full)."""
        self.name = name
        self.fingerprint = fingerprint
        self.host = host
        self.pinned = pinned
        self.clock = clock
        self.expire_s = expire_s
        self.max_peers = max_peers
        self.max_per_host = max_per_host
        self.active = False
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._peers: dict[str, Discovered] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    async def start(self, port: int | None) -> bool:
        """Advertise on ``port`` (None: browse only) and browse. False (and logged) if mDNS is
        unavailable here."""
        interfaces, hosts = interfaces_for(self.host)
        instance = f"p2pshare-{self.fingerprint}.{SERVICE_TYPE}"
        try:
            self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            if port is not None:
                # probing and announcing take a second or two: do not hold up the node's start
                task = asyncio.ensure_future(self._advertise(instance, hosts, port))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
            )
            refresher = asyncio.ensure_future(self._refresh_loop())
            self._tasks.add(refresher)
            refresher.add_done_callback(self._tasks.discard)
        except (ZeroconfError, OSError, ValueError) as exc:
            log.warning("LAN discovery is unavailable here (%s); running without it", exc)
            await self.close()
            return False
        self.active = True
        if port is not None:
            log.info("advertising on the LAN as %s", self.fingerprint)
        return True

    async def _advertise(self, instance: str, hosts: list[str], port: int) -> None:
        assert self._zc is not None
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            instance,
            addresses=[socket.inet_aton(h) for h in hosts if _is_v4(h)],
            port=port,
            properties={
                "name": self.name,
                "fp": self.fingerprint,
                "v": TXT_VERSION,
                "port": str(port),
            },
            server=f"p2pshare-{self.fingerprint.lower()}.local.",
        )
        try:
            await self._zc.async_register_service(self._info, allow_name_change=True)
        except (ZeroconfError, OSError, ValueError) as exc:
            log.warning("could not advertise this node on the LAN (%s)", exc)
            self._info = None

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            if self._peers.pop(name, None) is not None:
                self._changed.set()
            return
        task = asyncio.ensure_future(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            found = await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS)
        except (ZeroconfError, BadTypeInNameException, OSError):
            return
        if not found or info.port is None:
            return
        txt = parse_txt(info.properties)
        if txt is None:
            return
        peer_name, fp, port = txt
        if fp == self.fingerprint or port != info.port:
            return
        hosts = tuple(dict.fromkeys(info.parsed_addresses(IPVersion.V4Only)))[:8]
        if not hosts:
            return
        if self.admit(name, Discovered(peer_name, fp, hosts, port, self.clock())):
            self._changed.set()

    # -- the table ------------------------------------------------------------------------------

    def admit(self, key: str, peer: Discovered) -> bool:
        """Put (or refresh) ``peer`` under its service name ``key``; False when it is turned
        away (see the module docstring)."""
        self.expire()
        if key in self._peers:
            self._peers[key] = peer
            return True
        is_pinned: bool | None = None

        def pinned_peer() -> bool:
            nonlocal is_pinned
            if is_pinned is None:
                is_pinned = peer.fingerprint in self.pinned()
            return is_pinned

        hosts = set(peer.hosts)
        sharing = [k for k, p in self._peers.items() if hosts.intersection(p.hosts)]
        if len(sharing) >= self.max_per_host and not (pinned_peer() and self._evict(sharing)):
            return False
        if len(self._peers) >= self.max_peers and not (
            pinned_peer() and self._evict(list(self._peers))
        ):
            return False
        self._peers[key] = peer
        return True

    def _evict(self, keys: list[str]) -> bool:
        """Drop the stalest unpinned entry among ``keys``; False when all are pinned."""
        pinned = self.pinned()
        unpinned = [k for k in keys if self._peers[k].fingerprint not in pinned]
        if not unpinned:
            return False
        del self._peers[min(unpinned, key=lambda k: self._peers[k].seen)]
        return True

    def expire(self) -> int:
        """Drop entries not confirmed for ``expire_s``; returns how many."""
        cutoff = self.clock() - self.expire_s
        stale = [k for k, p in self._peers.items() if p.seen < cutoff]
        for key in stale:
            del self._peers[key]
        if stale:
            self._changed.set()
        return len(stale)

    async def _refresh_loop(self) -> None:
        """Re-resolve entries before they expire: a node still answering stays listed."""
        limit = asyncio.Semaphore(_REFRESHING)

        async def refresh(key: str) -> None:
            async with limit:
                await self._resolve(key)

        while True:
            await asyncio.sleep(self.expire_s / 4)
            due = self.clock() - self.expire_s / 2
            keys = [k for k, p in self._peers.items() if p.seen < due]
            if keys:
                await asyncio.gather(*(refresh(k) for k in keys), return_exceptions=True)
            self.expire()

    def peers(self) -> list[Discovered]:
        self.expire()
        return sorted(self._peers.values(), key=lambda p: (p.name, p.fingerprint))

    async def wait_for_peers(self, timeout: float, settle: float = 1.0) -> list[Discovered]:
        """The nodes seen so far; if none yet, wait up to ``timeout`` for the first, then
        ``settle`` seconds more for others answering the same query."""
        if not self.active:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._peers and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        if self._peers and settle > 0:
            await asyncio.sleep(settle)
        return self.peers()

    async def close(self) -> None:
        self.active = False
        for task in list(self._tasks):
            task.cancel()
        if self._zc is None:
            return
        with contextlib.suppress(ZeroconfError, OSError, RuntimeError):
            if self._browser is not None:
                await self._browser.async_cancel()
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
        self._zc = None


def _is_v4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


#: the node's Discovery (created by the node's resources, started once its port is bound)
discovery_key = web.AppKey("discovery_key", Discovery)


async def browse(host: str, seconds: float) -> list[Discovered]:
    """Look for nodes on the LAN for ``seconds`` without advertising (for ``p2pshare peers``)."""
    d = Discovery("p2pshare peers", "", host)
    if not await d.start(None):
        return []
    try:
        await asyncio.sleep(seconds)
        return d.peers()
    finally:
        await d.close()
