"""Resume: cut the connection anywhere, or kill -9 either node, and the study still arrives
byte for byte, re-sending at most one window of chunks per cut (real nodes, 127.0.0.1)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc, spawn_node, stop_node, tree_hashes
from p2pshare.dicom.ingest import scan
from tests.e2e.conftest import CHUNK, FAST, Cli
from tests.e2e.proxy import CUT, Attack, HoldProxy, MitmProxy, chunk_header

pytestmark = pytest.mark.e2e

WINDOW = 16  # the node's default window
RUNS = 50


async def events_of(api: NodeClient, job: str, timeout: float = 60) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [e async for e in api.events(job)]

    return await asyncio.wait_for(collect(), timeout)


def resent_chunks(proxy: MitmProxy) -> int:
    """CHUNK frames that crossed the proxy more than once (their clear header names them)."""
    seen = Counter(h[:2] for p in proxy.s2r_messages if (h := chunk_header(p)) is not None)
    return sum(n - 1 for n in seen.values())


async def test_fifty_cuts_at_random_offsets_each_resume_to_an_identical_study(
    fast_nodes: tuple[NodeProc, NodeProc], chunked_study: Path, tmp_path: Path
) -> None:
    sender, receiver = fast_nodes
    manifest = scan(chunked_study, chunk_size=CHUNK).study(None).manifest
    expected_chunks = sum(manifest.chunk_count(i) for i in range(len(manifest.instances)))
    rng = random.Random(20261204)
    worst = total_resent = 0
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        for run in range(RUNS):
            # anywhere: handshake, manifest, mid-chunk
            cut_after = rng.randrange(2_000, manifest.total_bytes)
            out = tmp_path / f"out-{run}"
            async with MitmProxy(
                sender.port, Attack(CUT, cut_after=cut_after, reset=run % 2 == 1), cut_once=True
            ) as proxy:
                offer = await s_api.create_offer(str(chunked_study), None, None, consent="none")
                job = await r_api.receive(offer["code"], str(out), [proxy.address])
                events = await events_of(r_api, job)
                assert events[-1]["event"] == "complete", (run, cut_after, events[-3:])
                assert [a.kind for a in proxy.applied] == [CUT], (run, proxy.applied)
                kinds = [e["event"] for e in events]
                if "paired" in kinds[: kinds.index("reconnecting")]:
                    assert "resumed" in kinds, (run, kinds)
                resent = resent_chunks(proxy)
                chunks = sum(1 for m in proxy.s2r_messages if chunk_header(m) is not None)
                assert chunks >= expected_chunks, (run, chunks)  # the count sees every chunk
                worst = max(worst, resent)
                total_resent += resent
                assert resent <= WINDOW, (run, cut_after, resent)
            assert tree_hashes(out) == tree_hashes(chunked_study), run
            assert not (out / ".p2pshare-partial").exists() or not any(
                (out / ".p2pshare-partial").iterdir()
            )
    print(f"\n{RUNS} cuts: {total_resent} chunks re-sent in all, at most {worst} per cut "
          f"(window {WINDOW})")  # fmt: skip


async def test_kill_9_of_the_receiver_then_receive_resume_after_restart(
    tmp_path: Path, chunked_study: Path, cli: Cli
) -> None:
    sender = await spawn_node("Referring Hospital ED", tmp_path / "ref", extra_args=FAST)
    receiver = await spawn_node("Trauma Centre Radiology", tmp_path / "tc", extra_args=FAST)
    proxy = HoldProxy(sender.port, hold_after=300_000)
    out = tmp_path / "out"
    try:
        via = await proxy.start()
        async with aiohttp.ClientSession() as http:
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            offer = await s_api.create_offer(str(chunked_study), None, None, consent="none")
            job = await r_api.receive(offer["code"], str(out), [via])
            await asyncio.wait_for(proxy.held.wait(), 30)
            await asyncio.sleep(0.5)  # let the receiver write what it got
            os.kill(receiver.proc.pid, signal.SIGKILL)
            await receiver.proc.wait()
            proxy.release()
            partial = list((out / ".p2pshare-partial" / job).glob("*.part"))
            placed_before = list(out.rglob("*.dcm"))
            assert partial or placed_before, "nothing was kept to resume from"
            assert len(placed_before) < 24
            receiver = await spawn_node("Trauma Centre Radiology", tmp_path / "tc", extra_args=FAST)
            res = await cli.run(
                "receive", "--resume", job, "--node", receiver.url, "--data-dir",
                str(receiver.data_dir), "--json",
            )  # fmt: skip
            assert res.code == 0, res.stdout + res.stderr
            resuming = res.events("resuming")
            assert resuming and resuming[0]["bytes_held"] > 0
            offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
        assert offer_now["state"] == "completed" and offer_now["receipt"]
        assert tree_hashes(out) == tree_hashes(chunked_study)
    finally:
        await proxy.close()
        await stop_node(receiver)
        await stop_node(sender)


async def test_kill_9_of_the_sender_then_restart_and_the_receiver_reconnects_by_itself(
    tmp_path: Path, chunked_study: Path
) -> None:
    sender = await spawn_node("Referring Hospital ED", tmp_path / "ref", extra_args=FAST)
    receiver = await spawn_node("Trauma Centre Radiology", tmp_path / "tc", extra_args=FAST)
    proxy = HoldProxy(sender.port, hold_after=300_000)
    out = tmp_path / "out"
    try:
        via = await proxy.start()
        async with aiohttp.ClientSession() as http:
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            offer = await s_api.create_offer(str(chunked_study), None, None, consent="none")
            job = await r_api.receive(offer["code"], str(out), [via])
            await asyncio.wait_for(proxy.held.wait(), 30)
            os.kill(sender.proc.pid, signal.SIGKILL)
            await sender.proc.wait()
            sender = await spawn_node(
                "Referring Hospital ED", tmp_path / "ref", extra_args=FAST, port=sender.port
            )
            proxy.release()
            events = await events_of(r_api, job, timeout=90)
            s_api = NodeClient(sender.url, sender.token, http)
            offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "complete", events[-3:]
        assert "reconnecting" in kinds and "resumed" in kinds
        assert offer_now["state"] == "completed"
        assert tree_hashes(out) == tree_hashes(chunked_study)
    finally:
        await proxy.close()
        await stop_node(receiver)
        await stop_node(sender)


async def test_a_node_that_did_not_pair_cannot_resume_with_a_guessed_ticket(
    fast_nodes: tuple[NodeProc, NodeProc], chunked_study: Path, tmp_path: Path, cli: Cli
) -> None:
    sender, receiver = fast_nodes
    res = await cli.run(
        "receive", "--resume", "f" * 32, "--node", receiver.url, "--data-dir",
        str(receiver.data_dir),
    )  # fmt: skip
    assert res.code == 2 and "cannot be resumed" in res.stderr, res.stdout + res.stderr


async def test_a_cut_on_a_relayed_transfer_resumes_through_the_relay(
    tmp_path: Path, chunked_study: Path
) -> None:
    """The receiver reaches the sender only through the relay; its connection to the relay is
    cut mid-stream. Both sides meet again at the relay with a channel token derived from the
    resume secret (so from the session key, not the code) and the transfer resumes."""
    from urllib.parse import quote

    from p2pshare.relay import RelayConfig, start_relay

    runner, _app = await start_relay(RelayConfig(port=0))
    relay = f"127.0.0.1:{runner.addresses[0][1]}"
    sender = await spawn_node(
        "Referring Hospital ED",
        tmp_path / "ref",
        extra_args=[*FAST, "--relay", f"ws://{relay}", "--advertise", "127.0.0.1:1",
                    "--no-discovery"],
    )  # fmt: skip
    receiver = await spawn_node(
        "Trauma Centre Radiology", tmp_path / "tc", extra_args=[*FAST, "--no-discovery"]
    )
    out = tmp_path / "out"
    try:
        async with (
            MitmProxy(
                runner.addresses[0][1], Attack(CUT, cut_after=400_000), cut_once=True
            ) as proxy,
            aiohttp.ClientSession() as http,
        ):
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            offer = await s_api.create_offer(str(chunked_study), None, None, consent="none")
            # the receiver is told the relay is where the proxy listens (only it gets cut)
            uri = offer["uri"].replace(quote(f"relay:{relay}"), quote(f"relay:{proxy.address}"))
            assert uri != offer["uri"]
            job = await r_api.receive(uri, str(out), [])
            events = await events_of(r_api, job, timeout=90)
            assert [a.kind for a in proxy.applied] == [CUT]
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "complete", events[-3:]
        assert "reconnecting" in kinds and "resumed" in kinds
        resumed = next(e for e in events if e["event"] == "resumed")
        assert resumed["address"] == f"relay:{proxy.address}"
        assert tree_hashes(out) == tree_hashes(chunked_study)
    finally:
        await stop_node(receiver)
        await stop_node(sender)
        await runner.cleanup()


async def test_a_second_node_on_the_same_data_folder_is_refused_and_changes_nothing(
    fast_nodes: tuple[NodeProc, NodeProc], chunked_study: Path, tmp_path: Path, cli: Cli
) -> None:
    """A temporary CLI node next to a running `serve` would rewrite its transfer states."""
    sender, _ = fast_nodes
    res = await cli.run(
        "send", str(chunked_study), "--consent", "none", "--data-dir", str(sender.data_dir)
    )
    assert res.code == 2, res.stdout + res.stderr
    assert "already running with the data folder" in res.stderr and "--node" in res.stderr
    assert "Traceback" not in res.stderr
