"""Benchmark: one study between two local p2pshare nodes, optionally against baselines.

Run by hand (never from the test suite)::

    .venv/bin/python bench/transfer.py                 # ~300 MB, 600-slice CT study
    .venv/bin/python bench/transfer.py --compare       # + plaintext aiohttp upload + dcmtk
    .venv/bin/python bench/transfer.py --slices 4000   # ~2 GB: is memory flat?
    .venv/bin/python bench/transfer.py --compare --floor  # + the same work with no protocol

Reports, per p2pshare transfer: MB/s of the stream, seconds from pairing to the first verified
instance, pairing latency and the peak RSS (VmHWM) of each node process. With ``--compare`` the
rounds are interleaved, each round starting with the next contestant, so that a noisy neighbour
or what ran just before hurts all of them alike; medians and ratios are printed.

dcmtk as Debian ships it (3.6.7) leaves Nagle's algorithm on and crawls at ~12 MB/s; its
programs honour ``TCP_NODELAY=1`` in the environment, and we give both a 128 KiB PDU, which is
its best. Every receiver writes to the same filesystem.

Every contestant starts from the same state (:func:`start_clean`): earlier output deleted and
flushed, the kernel's caches dropped when the benchmark runs as root, the study and the programs
read back into the page cache. Without that, on a journal-less ext4 (this machine's), whoever
runs right after 600 files were deleted pays for them: for a minute the kernel checks every
recently freed inode before it hands out a new one (``perf`` showed half of file creation in
``recently_deleted``), and writing the same 316 MB cost 0.1 s or 0.8 s depending on what ran
before. See docs/throughput.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pshare.demo import free_port, spawn_node, stop_node, transfer, tree_hashes  # noqa: E402
from p2pshare.dicom.synthetic import BENCH_CACHE, cached_bench_study, study_files  # noqa: E402


def start_clean(study: Path, programs: tuple[str, ...] = ()) -> bool:
    """Put the machine in the same state before each contestant; True if caches were dropped.

    Dirty pages are flushed and, as root, the page, dentry and inode caches dropped, so no
    contestant pays for the files a previous one wrote or deleted. The study and ``programs``
    are then read back, so every sender reads from memory, as it would a study it just scanned.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        dropped = True
    except OSError:
        dropped = False
    paths: list[str | Path] = [*study_files(study), *(shutil.which(p) or p for p in programs)]
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    return dropped


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used so far (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_p2pshare(study: Path, work: Path, round_no: int) -> dict[str, Any]:
    start_clean(study)
    sender = await spawn_node("Bench Referring", work / f"s{round_no}")
    receiver = await spawn_node("Bench Trauma", work / f"r{round_no}")
    out = work / f"out-p2p-{round_no}"
    before: list[float] = []

    def at_offer() -> None:  # CPU readings once the study is scanned, before the receive
        before.extend((cpu_seconds(sender.proc.pid), cpu_seconds(receiver.proc.pid)))

    try:
        figures = await transfer(sender, receiver, study, out, spoken=True, on_offer=at_offer)
        figures["cpu_sender_s"] = cpu_seconds(sender.proc.pid) - before[0]
        figures["cpu_receiver_s"] = cpu_seconds(receiver.proc.pid) - before[1]
        figures["rss_sender_mb"] = sender.peak_rss_mb()
        figures["rss_receiver_mb"] = receiver.peak_rss_mb()
    finally:
        await stop_node(receiver)
        await stop_node(sender)
    figures["identical"] = tree_hashes(out) == tree_hashes(study)
    shutil.rmtree(out, ignore_errors=True)
    return figures


async def run_plain_http(study: Path, work: Path, round_no: int) -> float:
    """Plaintext baseline: the same files PUT one after another over one keep-alive connection."""
    start_clean(study)
    out = work / f"out-http-{round_no}"
    out.mkdir(parents=True)

    async def put(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        with open(out / name, "wb") as fh:
            async for block in request.content.iter_chunked(1 << 20):
                fh.write(block)
        return web.Response(status=201)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_put("/f/{name}", put)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    files = study_files(study)
    os.sync()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        for i, path in enumerate(files):
            with open(path, "rb") as fh:
                async with http.put(f"http://127.0.0.1:{port}/f/{i}.dcm", data=fh.read()) as r:
                    assert r.status == 201
    seconds = time.perf_counter() - t0
    await runner.cleanup()
    nbytes = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return nbytes / 1e6 / seconds


def run_dcmtk(
    study: Path, work: Path, round_no: int
) -> tuple[float, float, float, float] | None:
    """dcmtk storescu → storescp, Nagle off, 128 KiB PDU; None when dcmtk is missing.

    Returns (MB/s until storescu returns, MB/s until the files are also on disk, CPU seconds of
    storescu, of storescp). storescp never flushes, while p2pshare flushes every instance
    before calling it received, so the second figure is the like-for-like one.
    """
    if not shutil.which("storescu") or not shutil.which("storescp"):
        return None
    # storescp, started below, loads the libraries storescu shares with it
    start_clean(study, ("storescu", "storescp"))
    out = work / f"out-dcmtk-{round_no}"
    out.mkdir(parents=True)
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    scp = subprocess.Popen(
        ["storescp", "--max-pdu", "131072", "-od", str(out), "-aet", "BENCHSCP", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        os.sync()
        scp_before = cpu_seconds(scp.pid)
        t0 = time.perf_counter()
        scu = subprocess.Popen(
            [
                "storescu",
                "--max-pdu",
                "131072",
                "-aec",
                "BENCHSCP",
                "+sd",
                "+r",
                "127.0.0.1",
                str(port),
                str(study),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(scu.pid, 0)
        seconds = time.perf_counter() - t0
        scu.returncode = os.waitstatus_to_exitcode(status)
        if scu.returncode != 0:
            raise RuntimeError(f"storescu failed (exit status {scu.returncode})")
        scp_cpu = cpu_seconds(scp.pid) - scp_before
        os.sync()
        durable = time.perf_counter() - t0
    finally:
        scp.terminate()
        scp.wait()
    nbytes = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    scu_cpu = usage.ru_utime + usage.ru_stime
    return nbytes / 1e6 / seconds, nbytes / 1e6 / durable, scu_cpu, scp_cpu


#: bench/floor.py's transports, as the table names them
FLOOR_TRANSPORTS = {
    "ws": "aiohttp WebSocket",
    "http": "aiohttp HTTP stream",
    "stream": "plain asyncio stream",
}


def run_floor(study: Path, work: Path, round_no: int, transport: str) -> float:
    """bench/floor.py over ``transport``: the work a transfer needs, with no protocol (see its
    docstring); MB/s until every instance is durably in place."""
    start_clean(study)
    out = work / f"out-floor-{transport}-{round_no}"
    port = free_port()
    common = ["--transport", transport, "--port", str(port), "--study", str(study)]
    common += ["--key", os.urandom(32).hex()]
    script = str(ROOT / "bench" / "floor.py")
    sender = subprocess.Popen(
        [sys.executable, script, "send", *common], stdout=subprocess.PIPE, text=True
    )
    try:
        if sender.stdout is None or sender.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the floor's sender ({transport}) did not start")
        done = subprocess.run(
            [sys.executable, script, "receive", *common, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the floor's receiver ({transport}) failed: {done.stderr.strip()}")
        sender.wait(timeout=30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        shutil.rmtree(out, ignore_errors=True)
    return float(json.loads(done.stdout.splitlines()[-1])["mb_per_s"])


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=600, help="CT slices of 512x512 (600 ≈ 300 MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", action="store_true", help="also plaintext HTTP and dcmtk")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also bench/floor.py: the work a transfer needs with no protocol, over aiohttp's "
        "WebSocket, an aiohttp HTTP stream and a plain asyncio stream",
    )
    ap.add_argument(
        "--cache",
        default=str(BENCH_CACHE),
        help="where the generated study is kept between runs",
    )
    args = ap.parse_args()

    study = cached_bench_study(Path(args.cache), args.slices)
    size = dir_bytes(study)
    print(f"study: {len(study_files(study))} files, {size / 1e6:.0f} MB")

    if not start_clean(study):
        print(
            "note: not root, so the kernel's caches are not dropped between contestants; "
            "figures depend on what ran in the last minute (see docs/throughput.md)"
        )
    work = Path(tempfile.mkdtemp(prefix="p2pshare-bench-", dir=args.cache))
    p2p: list[dict[str, Any]] = []
    plain: list[float] = []
    dcmtk: list[float] = []
    dcmtk_durable: list[float] = []
    dcmtk_cpu: list[tuple[float, float]] = []  # (storescu, storescp) CPU seconds
    floors: dict[str, list[float]] = {t: [] for t in FLOOR_TRANSPORTS}

    async def p2pshare_round(i: int) -> str:
        p2p.append(await run_p2pshare(study, work, i))
        f = p2p[-1]
        return (
            f"p2pshare {f['mb_per_s']:.0f} MB/s (pairing {f['pairing_s'] * 1000:.0f} ms, first "
            f"instance {f['first_instance_s'] * 1000:.0f} ms, RSS {f['rss_sender_mb']:.0f}/"
            f"{f['rss_receiver_mb']:.0f} MB, CPU {f['cpu_sender_s']:.2f}+"
            f"{f['cpu_receiver_s']:.2f} s, identical={f['identical']})"
        )

    async def plain_round(i: int) -> str:
        plain.append(await run_plain_http(study, work, i))
        return f"plain HTTP {plain[-1]:.0f} MB/s"

    async def dcmtk_round(i: int) -> str:
        d = run_dcmtk(study, work, i)
        if d is None:
            return "dcmtk not installed"
        dcmtk.append(d[0])
        dcmtk_durable.append(d[1])
        dcmtk_cpu.append((d[2], d[3]))
        return f"dcmtk {d[0]:.0f} MB/s ({d[1]:.0f} MB/s on disk, CPU {d[2]:.2f}+{d[3]:.2f} s)"

    def floor_round(transport: str) -> Callable[[int], Awaitable[str]]:
        async def one(i: int) -> str:
            floors[transport].append(run_floor(study, work, i, transport))
            return f"floor over {FLOOR_TRANSPORTS[transport]} {floors[transport][-1]:.0f} MB/s"

        return one

    contestants: list[Callable[[int], Awaitable[str]]] = [p2pshare_round]
    if args.compare:
        contestants += [plain_round, dcmtk_round]
    if args.floor:
        contestants += [floor_round(t) for t in FLOOR_TRANSPORTS]
    try:
        for i in range(args.rounds):
            # each round starts with the next contestant, so none always follows the same one
            k = i % len(contestants)
            for run in contestants[k:] + contestants[:k]:
                print(f"round {i + 1}: {await run(i)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    mbps = med(f["mb_per_s"] for f in p2p)
    print()
    print(f"| measure (median of {args.rounds}) | value |")
    print("|---|---|")
    print(f"| study | {len(study_files(study))} instances, {size / 1e6:.0f} MB |")
    print(f"| p2pshare encrypted stream | {mbps:.0f} MB/s |")
    print(f"| pairing latency | {med(f['pairing_s'] for f in p2p) * 1000:.0f} ms |")
    print(
        f"| pairing → first verified instance | {med(f['first_instance_s'] for f in p2p) * 1000:.0f} ms |"
    )
    print(
        f"| peak RSS sender / receiver | {max(f['rss_sender_mb'] for f in p2p):.0f} / "
        f"{max(f['rss_receiver_mb'] for f in p2p):.0f} MB |"
    )
    print(f"| byte-identical every round | {all(f['identical'] for f in p2p)} |")
    cpu_p2p = med(f["cpu_sender_s"] + f["cpu_receiver_s"] for f in p2p)
    print(
        f"| CPU seconds, sender + receiver | {med(f['cpu_sender_s'] for f in p2p):.2f} + "
        f"{med(f['cpu_receiver_s'] for f in p2p):.2f} (total {cpu_p2p:.2f}) |"
    )
    if plain:
        print(
            f"| plaintext aiohttp upload | {med(plain):.0f} MB/s (p2pshare ratio {mbps / med(plain):.2f}) |"
        )
    if dcmtk:
        print(
            f"| dcmtk storescu→storescp (TCP_NODELAY, 128 KiB PDU) | {med(dcmtk):.0f} MB/s "
            f"(p2pshare ratio {mbps / med(dcmtk):.2f}) |"
        )
        print(
            f"| dcmtk, until its files are on disk too | {med(dcmtk_durable):.0f} MB/s "
            f"(p2pshare ratio {mbps / med(dcmtk_durable):.2f}) |"
        )
        # What the machine can give in the time dcmtk takes: every core, the whole time. An
        # encrypted transfer as fast as dcmtk has to fit all its CPU time into that.
        seconds = size / 1e6 / med(dcmtk)
        capacity = (os.cpu_count() or 1) * seconds
        cpu_dcmtk = med(a + b for a, b in dcmtk_cpu)
        print(
            f"| CPU seconds, storescu + storescp | {med(a for a, _ in dcmtk_cpu):.2f} + "
            f"{med(b for _, b in dcmtk_cpu):.2f} (total {cpu_dcmtk:.2f}) |"
        )
        print(
            f"| CPU the machine has in dcmtk's time ({os.cpu_count()} cores × {seconds:.2f} s) | "
            f"{capacity:.2f} s: dcmtk uses {cpu_dcmtk / capacity:.0%}, p2pshare needs "
            f"{cpu_p2p / capacity:.0%} |"
        )
    for transport, label in FLOOR_TRANSPORTS.items():
        if floors[transport]:
            floor = med(floors[transport])
            versus = (
                f"; ratio to dcmtk {floor / med(dcmtk):.2f}, to dcmtk on disk "
                f"{floor / med(dcmtk_durable):.2f}"
                if dcmtk
                else ""
            )
            print(
                f"| floor (no protocol) over {label} | {floor:.0f} MB/s "
                f"(p2pshare ratio {mbps / floor:.2f}{versus}) |"
            )


if __name__ == "__main__":
    asyncio.run(main())
