"""Benchmark: p2pshare across awkward networks — via the relay, over a slow WAN, through cuts.

Run by hand (never from the test suite), as root for ``--wan`` with network namespaces::

    .venv/bin/python bench/network.py --relay            # ~200 MB direct vs via the relay
    .venv/bin/python bench/network.py --wan             # 150 MB over 50 Mbit/s, 40 ms RTT
    .venv/bin/python bench/network.py --cuts            # bytes re-sent per cut connection
    .venv/bin/python bench/network.py --relay --wan --cuts --json

``--relay``: the same study between two real nodes, directly and through ``p2pshare relay``,
rounds interleaved; the sending node of a relay round advertises a port nobody listens on and
runs without LAN discovery, so the relay is the only path (the receiver's ``path`` event is
checked). Reports MB/s of the encrypted stream each way and the ratio relay/direct.

``--wan``: an emulated link of ``--rate-mbit`` and ``--rtt-ms``. Preferred emulator: two network
namespaces joined by a veth pair, ``tc netem delay RTT/2 rate R`` on both ends, one node in each
(driven through a Unix-socket forwarder inside each namespace, so nothing is added to the root
namespace). Where the kernel has no netem (``--emulator auto`` probes it), a pacing TCP proxy on
127.0.0.1 stands in: a token bucket at the link rate charging every payload byte 1514/1448 (the
Ethernet + IPv4 + TCP-with-timestamps headers of a full 1500-byte-MTU segment, as netem would
count them), a queue of 2 BDP, and RTT/2 of delay in each direction. Goodput counts study bytes
only and is reported as % of the link rate; the wire overhead (everything the sender put on the
connection beyond the study bytes: handshake, framing, MACs) is reported beside it.

``--cuts``: a proxy on 127.0.0.1 closes the connection at ``--cut-count`` random offsets of the
sender→receiver stream. Bytes re-sent per cut = (bytes forwarded with cuts − bytes forwarded in
a clean run of the same study) / cuts. Needs resume; without it the figure is "resume not
available".
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pshare.client import NodeClient, read_token  # noqa: E402
from p2pshare.demo import free_port, spawn_node, stop_node, tree_hashes  # noqa: E402
from p2pshare.dicom.synthetic import BENCH_CACHE, cached_bench_study  # noqa: E402

#: a port nothing listens on: the direct path of a relay round leads nowhere
DEAD = "127.0.0.1:9"
#: a full-MTU TCP segment: 1448 payload bytes in 1514 bytes of Ethernet frame
SEGMENT_PAYLOAD, SEGMENT_FRAME = 1448, 1514
#: MB of study per 512x512 slice (bench_series: 600 slices ≈ 300 MB)
MB_PER_SLICE = 0.525


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def study_of(mb: float, cache: Path) -> Path:
    return cached_bench_study(cache, max(3, round(mb / MB_PER_SLICE)), log)


# -- driving two nodes through their APIs ------------------------------------------------------


async def drive(
    s_api: NodeClient, r_api: NodeClient, study: Path, out: Path, *, timeout: float = 3600
) -> dict[str, Any]:
    """Offer with consent policy 'none', receive with the QR link alone; the measured figures."""
    offer = await s_api.create_offer(str(study), None, None, consent="none")
    job = await r_api.receive(offer["uri"], str(out), [])
    r_events: list[dict[str, Any]] = []

    async def follow() -> None:
        async for e in r_api.events(job):
            r_events.append(e)

    try:
        await asyncio.wait_for(follow(), timeout)
    except TimeoutError:
        await s_api.cancel_offer(offer["offer_id"])
        raise RuntimeError(f"no result within {timeout:.0f} s") from None
    by = {e["event"]: e for e in r_events}
    if "complete" not in by:
        err = by.get("error", {"message": "no result"})
        raise RuntimeError(f"transfer failed: {err.get('message')}")
    t0 = r_events[0]["at"]
    stream_s = by["complete"]["at"] - by["manifest"]["at"]
    nbytes = by["complete"]["bytes"]
    return {
        "bytes": nbytes,
        "instances": by["complete"]["instances"],
        "path": by["complete"].get("path") or by.get("path", {}).get("path"),
        "pairing_s": by["paired"]["at"] - t0,
        "stream_s": stream_s,
        "total_s": by["complete"]["at"] - t0,
        "mb_per_s": nbytes / 1e6 / stream_s if stream_s > 0 else float("inf"),
    }


async def local_pair(
    work: Path, sender_args: list[str], receiver_args: list[str]
) -> tuple[Any, Any]:
    sender = await spawn_node("Bench Referring", work / "s", extra_args=sender_args)
    try:
        receiver = await spawn_node("Bench Trauma", work / "r", extra_args=receiver_args)
    except BaseException:
        await stop_node(sender)
        raise
    return sender, receiver


async def local_transfer(
    study: Path, work: Path, sender_args: list[str], *, timeout: float = 3600
) -> dict[str, Any]:
    """Two fresh nodes on 127.0.0.1, one transfer, stopped; figures + byte-identity."""
    os.sync()
    shutil.rmtree(work, ignore_errors=True)
    sender, receiver = await local_pair(work, [*sender_args, "--no-discovery"], ["--no-discovery"])
    out = work / "out"
    try:
        async with aiohttp.ClientSession() as http:
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            fig = await drive(s_api, r_api, study, out, timeout=timeout)
    finally:
        await stop_node(receiver)
        await stop_node(sender)
    fig["identical"] = tree_hashes(out) == tree_hashes(study)
    shutil.rmtree(work, ignore_errors=True)
    return fig


# -- a TCP proxy on 127.0.0.1: counting, pacing, cutting ----------------------------------------


@dataclass
class Proxy:
    """Forwards 127.0.0.1:port → 127.0.0.1:target; s2r is the upstream (sending node) side.

    ``rate_bps``/``one_way_s`` pace both directions like a link; ``cuts`` are offsets of the
    cumulative s2r stream at which both connections are closed.
    """

    target: int = 0
    rate_bps: float = 0.0
    one_way_s: float = 0.0
    queue_bytes: int = 0
    cuts: list[int] = field(default_factory=list)
    s2r: int = 0
    r2s: int = 0
    cuts_done: int = 0
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _busy: dict[str, float] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def reset(self, cuts: list[int] | None = None) -> None:
        self.s2r = self.r2s = self.cuts_done = self.connections = 0
        self.cuts = sorted(cuts or [])

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            c_writer.close()
            return
        for w in (c_writer, u_writer):
            with contextlib.suppress(OSError, AttributeError):
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writers = (c_writer, u_writer)

        def close_both() -> None:
            for w in writers:
                w.close()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(
                self._pump(u_reader, c_writer, "s2r", close_both),
                self._pump(c_reader, u_writer, "r2s", close_both),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # the proxy is stopping: a handler's end is not an error
        finally:
            self._tasks.discard(task)
            close_both()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        close_both: Callable[[], None],
    ) -> None:
        paced = self.rate_bps > 0
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(line, writer)) if paced else None
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(16384 if paced else 262144):
                if direction == "s2r" and self.cuts and self.s2r + len(data) >= self.cuts[0]:
                    keep = self.cuts.pop(0) - self.s2r
                    self.s2r += keep
                    self.cuts_done += 1
                    writer.write(data[:keep])
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    close_both()
                    return
                if direction == "s2r":
                    self.s2r += len(data)
                else:
                    self.r2s += len(data)
                if not paced:
                    writer.write(data)
                    await writer.drain()
                    continue
                now = loop.time()
                charge = len(data) * SEGMENT_FRAME / SEGMENT_PAYLOAD * 8 / self.rate_bps
                departs = max(now, self._busy.get(direction, 0.0)) + charge
                self._busy[direction] = departs
                line.put_nowait((departs + self.one_way_s, data))
                backlog = departs - now - self.queue_bytes * 8 / self.rate_bps
                if backlog > 0:  # the queue is full: stop reading, TCP pushes back on the sender
                    await asyncio.sleep(backlog)
        except OSError:
            close_both()
        finally:
            if deliver is not None:
                line.put_nowait(None)
                with contextlib.suppress(OSError):
                    await deliver

    @staticmethod
    async def _deliver(
        line: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while (item := await line.get()) is not None:
            at, data = item
            if (wait := at - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


# -- --relay -----------------------------------------------------------------------------------


async def start_relay() -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2pshare", "relay", "--port", str(port), "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if b'"relay"' not in line:
        proc.kill()
        raise RuntimeError(f"the relay did not start: {line[:200]!r}")
    return proc, port


async def bench_relay(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    study = study_of(args.mb, Path(args.cache))
    relay, port = await start_relay()
    direct: list[dict[str, Any]] = []
    relayed: list[dict[str, Any]] = []
    try:
        for i in range(args.rounds):
            direct.append(await local_transfer(study, work / f"direct-{i}", []))
            relay_args = ["--relay", f"ws://127.0.0.1:{port}", "--advertise", DEAD]
            relayed.append(await local_transfer(study, work / f"relay-{i}", relay_args))
            for name, f in (("direct", direct[-1]), ("relay", relayed[-1])):
                log(
                    f"round {i + 1} {name:6}: {f['mb_per_s']:6.1f} MB/s, path={f['path']}, "
                    f"pairing {f['pairing_s'] * 1000:.0f} ms, identical={f['identical']}"
                )
    finally:
        relay.terminate()
        await relay.wait()
    d = statistics.median(f["mb_per_s"] for f in direct)
    r = statistics.median(f["mb_per_s"] for f in relayed)
    return {
        "study_mb": round(dir_bytes(study) / 1e6, 1),
        "rounds": args.rounds,
        "direct_mb_s": round(d, 1),
        "relay_mb_s": round(r, 1),
        "ratio_relay_direct": round(r / d, 3),
        "direct_rounds_mb_s": [round(f["mb_per_s"], 1) for f in direct],
        "relay_rounds_mb_s": [round(f["mb_per_s"], 1) for f in relayed],
        "direct_pairing_ms": round(statistics.median(f["pairing_s"] for f in direct) * 1000),
        "relay_pairing_ms": round(statistics.median(f["pairing_s"] for f in relayed) * 1000),
        "paths": sorted({f["path"] for f in relayed}),
        "relay_path_every_round": all(f["path"] == "relay" for f in relayed),
        "direct_path_every_round": all(f["path"] == "direct" for f in direct),
        "identical": all(f["identical"] for f in direct + relayed),
    }


# -- --wan -------------------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Netns:
    """Two namespaces joined by a veth pair with netem on both ends; always torn down."""

    def __init__(self, rate_mbit: float, rtt_ms: float, allow_tbf: bool) -> None:
        suffix = secrets.token_hex(3)
        self.ns = (f"p2psbench-s-{suffix}", f"p2psbench-r-{suffix}")
        self.dev = (f"p2pbs{suffix}", f"p2pbr{suffix}")
        prefix = f"10.213.{random.randrange(256)}.{random.randrange(64) * 4}"  # a /30
        base, last = prefix.rsplit(".", 1)
        self.ip = (f"{base}.{int(last) + 1}", f"{base}.{int(last) + 2}")
        self.rate_mbit, self.rtt_ms, self.allow_tbf = rate_mbit, rtt_ms, allow_tbf
        self.shaper = ""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.created: list[str] = []
        atexit.register(self.teardown)

    def setup(self) -> None:
        for ns in self.ns:
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.dev[0], "netns", self.ns[0], "type", "veth",
           "peer", "name", self.dev[1], "netns", self.ns[1])  # fmt: skip
        bdp = self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1000
        limit = max(100, math.ceil(3 * bdp / SEGMENT_FRAME))  # in flight (1 BDP) + 2 BDP queue
        for ns, dev, ip in zip(self.ns, self.dev, self.ip, strict=True):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            # no offloads: netem must see MTU-sized packets, not 64 KB GSO super-packets
            sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off",
               "gro", "off", check=False)  # fmt: skip
            netem = sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem",
                       "delay", f"{self.rtt_ms / 2}ms", "rate", f"{self.rate_mbit}mbit",
                       "limit", str(limit), check=False)  # fmt: skip
            if netem.returncode == 0:
                self.shaper = f"netem delay {self.rtt_ms / 2}ms rate {self.rate_mbit}mbit limit {limit}"
                continue
            if not self.allow_tbf:
                raise RuntimeError(f"tc netem: {netem.stderr.strip()}")
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", f"{self.rate_mbit}mbit", "burst", "16kb", "limit", str(2 * int(bdp)))  # fmt: skip
            self.shaper = f"tbf rate {self.rate_mbit}mbit (no netem in this kernel: NO delay)"

    def popen(self, side: int, *cmd: str, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[side], *cmd],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        self.procs.append(p)
        return p

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        for ns in self.created:
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()


def netem_available() -> bool:
    ns = f"p2psbench-probe-{secrets.token_hex(3)}"
    if sh("ip", "netns", "add", ns, check=False).returncode != 0:
        return False
    try:
        sh("ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        r = sh("tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms",
               check=False)  # fmt: skip
        return r.returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


async def forward_unix(sock_path: str, target: str) -> None:
    """Inside a namespace: a Unix socket (reachable from every namespace) → HOST:PORT."""
    host, port = target.rsplit(":", 1)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    server = await asyncio.start_unix_server(handle, sock_path)
    async with server:
        await server.serve_forever()


@contextlib.asynccontextmanager
async def ns_nodes(
    link: Netns, work: Path
) -> AsyncIterator[tuple[NodeClient, NodeClient, aiohttp.ClientSession]]:
    """A node in each namespace and a client session to each through a Unix socket."""
    sessions: list[aiohttp.ClientSession] = []
    apis: list[NodeClient] = []
    try:
        for side, name in enumerate(("Bench Referring", "Bench Trauma")):
            data = work / f"node{side}"
            data.mkdir(parents=True)
            ip, port = link.ip[side], 8790
            link.popen(side, sys.executable, "-m", "p2pshare", "serve", "--data-dir", str(data),
                       "--name", name, "--host", ip, "--port", str(port), "--no-discovery",
                       log_path=data / "serve.log")  # fmt: skip
            sock = str(work / f"api{side}.sock")
            link.popen(side, sys.executable, str(Path(__file__).resolve()),
                       "--forward-unix", sock, "--to", f"{ip}:{port}")  # fmt: skip
            http = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock))
            sessions.append(http)
            url = f"http://{ip}:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(url + "/api/v1/info") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node in {link.ns[side]} did not start; see {data}")
                await asyncio.sleep(0.2)
            apis.append(NodeClient(url, read_token(data), http))
        yield apis[0], apis[1], sessions[0]
    finally:
        for http in sessions:
            await http.close()


async def wan_over_netns(study: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    link = Netns(args.rate_mbit, args.rtt_ms, allow_tbf=args.emulator == "netns")
    try:
        link.setup()
        work.mkdir(parents=True, exist_ok=True)
        stats0 = veth_tx_bytes(link)
        async with ns_nodes(link, work) as (s_api, r_api, _):
            os.sync()
            fig = await drive(s_api, r_api, study, work / "out")
        fig["wire_bytes"] = veth_tx_bytes(link) - stats0
        fig["wire_counts"] = "bytes the sender's veth sent (Ethernet frames, both connections)"
        fig["emulator"] = f"network namespaces + veth, {link.shaper} on each end"
    finally:
        link.teardown()
    fig["identical"] = tree_hashes(work / "out") == tree_hashes(study)
    return fig


def veth_tx_bytes(link: Netns) -> int:
    r = sh("ip", "netns", "exec", link.ns[0], "cat", f"/sys/class/net/{link.dev[0]}/statistics/tx_bytes")
    return int(r.stdout.strip())


async def wan_over_proxy(study: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    rate = args.rate_mbit * 1e6
    bdp = rate / 8 * args.rtt_ms / 1000
    proxy = Proxy(rate_bps=rate, one_way_s=args.rtt_ms / 2000, queue_bytes=int(2 * bdp))
    port = await proxy.start()
    try:
        sender, receiver = await local_pair(
            work, ["--advertise", f"127.0.0.1:{port}", "--no-discovery"], ["--no-discovery"]
        )
        proxy.target = sender.port
        try:
            async with aiohttp.ClientSession() as http:
                os.sync()
                fig = await drive(
                    NodeClient(sender.url, sender.token, http),
                    NodeClient(receiver.url, receiver.token, http),
                    study,
                    work / "out",
                )
        finally:
            await stop_node(receiver)
            await stop_node(sender)
    finally:
        await proxy.stop()
    fig["wire_bytes"] = proxy.s2r
    fig["wire_counts"] = "TCP payload bytes sender→receiver (headers charged by the pacer)"
    fig["emulator"] = (
        f"pacing TCP proxy on 127.0.0.1: {args.rate_mbit} Mbit/s token bucket charging "
        f"{SEGMENT_FRAME}/{SEGMENT_PAYLOAD} per payload byte, {args.rtt_ms / 2} ms each way, "
        f"queue {int(2 * bdp)} bytes"
    )
    fig["identical"] = tree_hashes(work / "out") == tree_hashes(study)
    return fig


async def bench_wan(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    study = study_of(args.wan_mb, Path(args.cache))
    emulator = args.emulator
    note = ""
    if emulator == "auto":
        if netem_available():
            emulator = "netns"
        else:
            emulator = "proxy"
            note = "tc netem is not available in this kernel: used the pacing proxy"
            log(note)
    if emulator == "netns":
        fig = await wan_over_netns(study, work / "wan", args)
    else:
        fig = await wan_over_proxy(study, work / "wan", args)
    link_bps = args.rate_mbit * 1e6
    goodput = fig["bytes"] * 8 / fig["stream_s"]
    # bytes the link carried: Ethernet frames (netns) or payload charged as full-MTU frames
    link_bytes = fig["wire_bytes"] if emulator == "netns" else (
        fig["wire_bytes"] * SEGMENT_FRAME / SEGMENT_PAYLOAD
    )
    delay = "NO delay" not in fig["emulator"]
    return {
        "emulator": fig["emulator"],
        "note": note,
        "rate_mbit": args.rate_mbit,
        "rtt_ms": args.rtt_ms if delay else 0.0,
        "study_mb": round(fig["bytes"] / 1e6, 1),
        "stream_s": round(fig["stream_s"], 2),
        "pairing_s": round(fig["pairing_s"], 3),
        "goodput_mbit": round(goodput / 1e6, 2),
        "goodput_pct_of_link": round(100 * goodput / link_bps, 1),
        "end_to_end_pct_of_link": round(100 * fig["bytes"] * 8 / fig["total_s"] / link_bps, 1),
        "wire_bytes": fig["wire_bytes"],
        "wire_counts": fig["wire_counts"],
        "wire_overhead_pct": round(100 * (fig["wire_bytes"] / fig["bytes"] - 1), 2),
        "link_overhead_pct": round(100 * (link_bytes / fig["bytes"] - 1), 2),
        "target_met": 100 * goodput / link_bps >= 90,
        "identical": fig["identical"],
    }


# -- --cuts ------------------------------------------------------------------------------------


async def bench_cuts(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    study = study_of(args.cuts_mb, Path(args.cache))
    proxy = Proxy()
    port = await proxy.start()
    out: dict[str, Any] = {"study_mb": round(dir_bytes(study) / 1e6, 1), "cuts": args.cut_count}
    try:
        sender, receiver = await local_pair(
            work / "cuts", ["--advertise", f"127.0.0.1:{port}", "--no-discovery"],
            ["--no-discovery"],
        )  # fmt: skip
        proxy.target = sender.port
        try:
            async with aiohttp.ClientSession() as http:
                s_api = NodeClient(sender.url, sender.token, http)
                r_api = NodeClient(receiver.url, receiver.token, http)
                clean = await drive(s_api, r_api, study, work / "cuts" / "clean")
                baseline = proxy.s2r
                out["clean_wire_bytes"] = baseline
                rng = random.Random(args.seed)
                offsets = [int(baseline * rng.uniform(0.1, 0.9)) for _ in range(args.cut_count)]
                proxy.reset(offsets)
                limit = max(120.0, 10 * clean["total_s"])
                try:
                    cut = await drive(s_api, r_api, study, work / "cuts" / "cut", timeout=limit)
                except RuntimeError as exc:
                    out.update(
                        resume="not available",
                        failed_after_cuts=proxy.cuts_done,
                        error=str(exc),
                    )
                    return out
        finally:
            await stop_node(receiver)
            await stop_node(sender)
    finally:
        await proxy.stop()
    done = max(1, proxy.cuts_done)
    out.update(
        resume="yes",
        cuts_done=proxy.cuts_done,
        connections=proxy.connections,
        cut_wire_bytes=proxy.s2r,
        resent_bytes_per_cut=round((proxy.s2r - baseline) / done),
        resent_mb_per_cut=round((proxy.s2r - baseline) / done / 1e6, 3),
        clean_s=round(clean["total_s"], 2),
        cut_s=round(cut["total_s"], 2),
        identical=tree_hashes(work / "cuts" / "cut") == tree_hashes(study),
    )
    return out


# -- report ------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    if r := results.get("relay"):
        rows += [
            ("study", f"{r['study_mb']} MB, median of {r['rounds']} interleaved rounds"),
            ("direct (127.0.0.1)", f"{r['direct_mb_s']} MB/s  {r['direct_rounds_mb_s']}"),
            ("via relay (127.0.0.1)", f"{r['relay_mb_s']} MB/s  {r['relay_rounds_mb_s']}"),
            ("ratio relay / direct", f"{r['ratio_relay_direct']:.2f}"),
            ("pairing direct / relay", f"{r['direct_pairing_ms']} / {r['relay_pairing_ms']} ms"),
            ("relay path used every round", str(r["relay_path_every_round"])),
            ("byte-identical every round", str(r["identical"])),
        ]
    if w := results.get("wan"):
        rows += [
            ("WAN emulator", w["emulator"]),
            ("WAN link", f"{w['rate_mbit']} Mbit/s, {w['rtt_ms']} ms RTT"),
            ("WAN study", f"{w['study_mb']} MB in {w['stream_s']} s of stream"),
            ("WAN goodput (study bytes)",
             f"{w['goodput_mbit']} Mbit/s = {w['goodput_pct_of_link']}% of the link "
             f"(target ≥ 90%: {'met' if w['target_met'] else 'NOT met'})"),
            ("WAN incl. pairing", f"{w['end_to_end_pct_of_link']}% (pairing {w['pairing_s']} s)"),
            ("WAN wire overhead", f"{w['wire_overhead_pct']}% ({w['wire_counts']})"),
            ("WAN overhead on the link", f"{w['link_overhead_pct']}% (incl. Ethernet/IP/TCP headers)"),
            ("WAN byte-identical", str(w["identical"])),
        ]  # fmt: skip
    if c := results.get("cuts"):
        if c["resume"] != "yes":
            rows += [("bytes re-sent per cut", f"resume not available ({c.get('error')})")]
        else:
            rows += [
                ("cuts", f"{c['cuts_done']} in a {c['study_mb']} MB study"),
                ("bytes re-sent per cut", f"{c['resent_bytes_per_cut']} ({c['resent_mb_per_cut']} MB)"),
                ("time clean / with cuts", f"{c['clean_s']} / {c['cut_s']} s"),
                ("byte-identical after cuts", str(c["identical"])),
            ]  # fmt: skip
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


async def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--relay", action="store_true", help="direct vs via the relay")
    ap.add_argument("--wan", action="store_true", help="goodput over an emulated WAN link")
    ap.add_argument("--cuts", action="store_true", help="bytes re-sent per cut connection")
    ap.add_argument("--mb", type=float, default=200, help="study size for --relay (MB)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --relay")
    ap.add_argument("--rate-mbit", type=float, default=50.0)
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--wan-mb", type=float, default=150, help="study size for --wan (MB)")
    ap.add_argument(
        "--emulator",
        choices=["auto", "netns", "proxy"],
        default="auto",
        help="auto: namespaces + netem if the kernel has netem, else the pacing proxy; "
        "netns without netem falls back to tbf (rate only, no delay)",
    )
    ap.add_argument("--cuts-mb", type=float, default=50, help="study size for --cuts (MB)")
    ap.add_argument("--cut-count", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1, help="where the cuts fall")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument(
        "--cache",
        default=str(BENCH_CACHE),
        help="where generated studies are kept between runs",
    )
    ap.add_argument("--forward-unix", help=argparse.SUPPRESS)
    ap.add_argument("--to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.forward_unix:
        await forward_unix(args.forward_unix, args.to)
        return 0
    if not (args.relay or args.wan or args.cuts):
        ap.error("choose at least one of --relay, --wan, --cuts")
    if args.wan and args.emulator != "proxy" and os.geteuid() != 0:
        ap.error("--wan with network namespaces needs root: run as root or add --emulator proxy")

    Path(args.cache).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="p2pshare-netbench-", dir=args.cache))
    results: dict[str, Any] = {}
    try:
        if args.relay:
            results["relay"] = await bench_relay(args, work)
        if args.wan:
            results["wan"] = await bench_wan(args, work)
        if args.cuts:
            results["cuts"] = await bench_cuts(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # run every finally (namespaces, nodes) as on Ctrl-C


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        log("interrupted; nodes stopped and namespaces removed")
        sys.exit(130)
