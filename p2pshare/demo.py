"""``p2pshare demo``: two real nodes on 127.0.0.1, one synthetic CT study, end to end.

The nodes are separate ``p2pshare serve`` processes, driven through their HTTP API exactly as
``send --node`` / ``receive --node`` would drive them; the receiver pairs with the spoken code.
The same helpers run the benchmark in ``bench/transfer.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from p2pshare import digest as file_digest
from p2pshare.client import NodeClient, read_token

if TYPE_CHECKING:
    from p2pshare.cli import Output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NodeProc:
    name: str
    data_dir: Path
    port: int
    proc: asyncio.subprocess.Process
    log_path: Path
    token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def peak_rss_mb(self) -> float:
        """High-water mark of the node's resident memory (VmHWM), in MB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


async def spawn_node(
    name: str,
    data_dir: Path,
    *,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> NodeProc:
    """Start ``p2pshare serve`` as a subprocess and wait until its API answers (on ``port``,
    e.g. the one it had before a restart, or a free one)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "serve.log"
    log_fh = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "p2pshare",
        "serve",
        "--data-dir",
        str(data_dir),
        "--name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
        stdout=log_fh,
        stderr=log_fh,
        stdin=asyncio.subprocess.DEVNULL,
    )
    log_fh.close()
    node = NodeProc(name, data_dir, port, proc, log_path)
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"node {name} exited: {log_path.read_text()[-2000:]}")
            try:
                async with http.get(node.url + "/api/v1/info") as r:
                    if r.status == 200:
                        node.extra["info"] = await r.json()
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"node {name} did not start within {timeout:.0f} s")
            await asyncio.sleep(0.1)
    node.token = read_token(data_dir)
    return node


async def stop_node(node: NodeProc) -> None:
    if node.proc.returncode is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(node.proc.wait(), 10)
        except TimeoutError:
            node.proc.kill()
            await node.proc.wait()


@contextlib.asynccontextmanager
async def two_nodes(
    workdir: Path,
    sender_name: str = "Referring Hospital ED (demo)",
    receiver_name: str = "Trauma Centre Radiology (demo)",
    receiver_args: Sequence[str] = (),
    sender_args: Sequence[str] = (),
) -> AsyncIterator[tuple[NodeProc, NodeProc]]:
    """A referring hospital's node and a trauma centre's node, stopped on exit."""
    sender = await spawn_node(sender_name, workdir / "referring-node", extra_args=sender_args)
    try:
        receiver = await spawn_node(
            receiver_name, workdir / "trauma-node", extra_args=receiver_args
        )
        try:
            yield sender, receiver
        finally:
            await stop_node(receiver)
    finally:
        await stop_node(sender)


def tree_hashes(root: Path) -> list[str]:
    """SHA-256 of every regular file below ``root`` (ignoring our staging folder)."""
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".p2pshare-partial" not in path.parts:
            out.append(file_digest.of_file(path, "sha256"))
    return sorted(out)


async def approve_as_patient(
    http: aiohttp.ClientSession, link: str, birth_date: str
) -> dict[str, Any]:
    """Do what the patient does on the phone page: confirm the date of birth, approve."""
    async with http.post(link + "/verify", json={"dob": birth_date}) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"consent page: {body.get('message')}")
    dest = body["destination"]  # approve for exactly what the page shows
    shown = dest["fingerprint"] if dest.get("verified") else None
    async with http.post(
        link + "/decision",
        json={"decision": "approve", "verifier": body["verifier"], "shown_fingerprint": shown},
    ) as resp:
        decided: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"consent page: {decided.get('message')}")
    return decided


async def transfer(
    sender: NodeProc,
    receiver: NodeProc,
    study_dir: Path,
    out_dir: Path,
    *,
    spoken: bool = True,
    patient_birth_date: str | None = None,
    on_offer: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One offer → receive between two running nodes; returns the measured figures.

    ``on_offer`` is called once the offer exists, before the receive starts (a benchmark
    takes its CPU readings there, so that scanning the study is left out).

    With ``patient_birth_date`` the offer needs the patient's consent, and this plays the
    patient on the phone page (for the intended destination, before pairing); without it the
    offer is made under consent policy 'none' (benchmarks and tests of the transfer itself).
    """
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        if patient_birth_date is None:
            offer = await s_api.create_offer(str(study_dir), None, None, consent="none")
        else:
            offer = await s_api.create_offer(
                str(study_dir), None, None, consent="patient", destination=receiver.name
            )
            await approve_as_patient(http, offer["consent"]["link"], patient_birth_date)
        code = offer["code"] if spoken else offer["uri"]
        if on_offer is not None:
            on_offer()
        job = await r_api.receive(code, str(out_dir), [sender.address] if spoken else [])
        r_events: list[dict[str, Any]] = []
        s_events: list[dict[str, Any]] = []

        async def follow(api: NodeClient, job_id: str, sink: list[dict[str, Any]]) -> None:
            async for e in api.events(job_id):
                sink.append(e)

        await asyncio.gather(
            follow(r_api, job, r_events), follow(s_api, offer["offer_id"], s_events)
        )
    by = {e["event"]: e for e in r_events}
    if "complete" not in by:
        err = by.get("error", {"message": "no result"})
        raise RuntimeError(f"transfer failed: {err.get('message')}")
    t0 = r_events[0]["at"]
    nbytes = by["complete"]["bytes"]
    stream_s = by["complete"]["at"] - by["manifest"]["at"]
    return {
        "offer": offer,
        "receipt": by["complete"]["receipt"],
        "sender_receipt": next((e for e in s_events if e["event"] == "complete"), {}).get(
            "receipt"
        ),
        "bytes": nbytes,
        "instances": by["complete"]["instances"],
        "pairing_s": by["paired"]["at"] - t0,
        "first_instance_s": by.get("first-instance", {}).get("seconds", float("nan")),
        "stream_s": stream_s,
        "total_s": by["complete"]["at"] - t0,
        "mb_per_s": nbytes / 1e6 / stream_s if stream_s > 0 else float("inf"),
        "peer_seen_by_receiver": by["paired"]["peer"],
        "consent": by.get("consent"),
    }


async def run_demo(out: Output, *, seed: int = 1, workdir: str | None = None) -> int:
    from p2pshare.dicom.synthetic import demo_series, generate_ct_study

    tmp = None
    if workdir:
        root = Path(workdir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="p2pshare-demo-")
        root = Path(tmp)
    try:
        study_dir, out_dir = root / "study", root / "received"
        for d in (study_dir, out_dir):
            shutil.rmtree(d, ignore_errors=True)
        out.say(f"Generating a synthetic CT study (seed {seed}) in {study_dir} …")
        files = await asyncio.to_thread(
            generate_ct_study, study_dir, seed=seed, series=demo_series()
        )
        out.say(f"  {len(files)} instances.")
        out.say("Starting two nodes on 127.0.0.1 …")
        async with two_nodes(root) as (sender, receiver):
            for n in (sender, receiver):
                out.say(f"  {n.name} [{n.extra['info']['fingerprint']}] at {n.address}")
            out.say(
                "Offering the study (consent policy 'patient'); the patient confirms their date "
                "of birth and approves on the phone page (played by the demo) …"
            )
            out.say("The trauma centre then pairs with the spoken code …")
            figures = await transfer(
                sender, receiver, study_dir, out_dir, spoken=True, patient_birth_date="1970-01-01"
            )
            out.say(f"  spoken code: {figures['offer']['code']}")
            if figures["consent"]:
                out.say(f"  the trauma centre sees: {figures['consent']['text']}")
            rss = {sender.name: sender.peak_rss_mb(), receiver.name: receiver.peak_rss_mb()}
        same = tree_hashes(study_dir) == tree_hashes(out_dir)
        receipt = figures["receipt"]
        sender_ok = figures["sender_receipt"] == receipt
        result = {
            "type": "result",
            "verified": same and sender_ok,
            "instances": figures["instances"],
            "bytes": figures["bytes"],
            "mb_per_s": round(figures["mb_per_s"], 1),
            "pairing_s": round(figures["pairing_s"], 3),
            "first_instance_s": figures["first_instance_s"],
            "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
            "manifest_sha256": receipt["manifest_sha256"],
            "received_in": str(out_dir),
            "consent": (figures["consent"] or {}).get("text"),
        }
        out.json(result)
        out.say("")
        out.say(
            f"Paired from {figures['peer_seen_by_receiver']}; receipt for manifest "
            f"{receipt['manifest_sha256'][:16]}… stored by the sender."
        )
        out.say(
            f"Byte-for-byte identical: {'yes' if same else 'NO'}; sender holds the same "
            f"signed receipt: {'yes' if sender_ok else 'NO'}"
        )
        out.say(f"  instances           {figures['instances']}")
        out.say(f"  study size          {figures['bytes'] / 1e6:.1f} MB")
        out.say(f"  throughput          {figures['mb_per_s']:.1f} MB/s")
        out.say(f"  pairing latency     {figures['pairing_s'] * 1000:.0f} ms")
        out.say(f"  first verified      {figures['first_instance_s'] * 1000:.0f} ms after pairing")
        for name, mb in rss.items():
            out.say(f"  peak RSS            {mb:.0f} MB  ({name})")
        return 0 if same and sender_ok else 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
