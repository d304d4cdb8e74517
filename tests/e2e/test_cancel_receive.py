"""Cancelling a receive on the receiving node (real nodes, real CLI, 127.0.0.1): mid-stream,
while waiting for the patient's consent (Ctrl-C on `receive --node`), and after a restart left
the transfer interrupted. What was not verified is deleted, the sender is told when it can be,
the transfer can no longer be resumed, and both nodes audit it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc, spawn_node, stop_node
from p2pshare.errors import P2PShareError
from tests.e2e.conftest import FAST, NAMES, Cli
from tests.e2e.proxy import HoldProxy

pytestmark = pytest.mark.e2e

FILES = 24  # in chunked_study


async def until(check: Any, timeout: float = 20.0) -> None:
    """Wait until ``check()`` (sync) is true."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def held_receive(
    s_api: NodeClient, r_api: NodeClient, study: Path, out: Path, proxy: HoldProxy, via: str
) -> tuple[dict[str, Any], str, Path]:
    """Start a receive through ``proxy`` (listening at ``via``) and wait until the stream is
    held, with unverified data staged: (offer, job, staging folder)."""
    offer = await s_api.create_offer(str(study), None, None, consent="none")
    job = await r_api.receive(offer["code"], str(out), [via])
    await asyncio.wait_for(proxy.held.wait(), 30)
    staging = out / ".p2pshare-partial" / job
    await until(lambda: any(staging.glob("*.part")))
    return offer, job, staging


async def audit_of(api: NodeClient, ref: str) -> list[dict[str, Any]]:
    data = await api._call("GET", f"/api/v1/audit?offer={ref}")
    records: list[dict[str, Any]] = data["records"]
    return records


async def last_event(api: NodeClient, job: str) -> dict[str, Any]:
    events = [e async for e in api.events(job)]
    return events[-1]


async def test_cancel_mid_stream_deletes_the_staged_data_and_the_sender_closes_its_offer(
    fast_nodes: tuple[NodeProc, NodeProc], chunked_study: Path, tmp_path: Path
) -> None:
    sender, receiver = fast_nodes
    proxy = HoldProxy(sender.port, hold_after=300_000)
    out = tmp_path / "in"
    try:
        via = await proxy.start()
        async with aiohttp.ClientSession() as http:
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            offer, job, staging = await held_receive(s_api, r_api, chunked_study, out, proxy, via)

            assert await r_api.cancel_receive(job) is True

            transfer = await r_api._call("GET", f"/api/v1/transfers/{job}")
            end = await last_event(r_api, job)
            # the sender reads the receiver's sealed ERROR, not a cut: the offer is closed
            sent = await asyncio.wait_for(last_event(s_api, offer["offer_id"]), 20)
            offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
            again = await r_api.cancel_receive(job)
            with pytest.raises(P2PShareError) as resume:
                await r_api.resume(job)
            r_audit = await audit_of(r_api, job)
            s_audit = await audit_of(s_api, offer["offer_id"])
    finally:
        await proxy.close()

    assert not staging.exists(), "the unverified chunks were kept"
    placed = sorted(p for p in out.rglob("*") if p.is_file())
    assert 0 < len(placed) < FILES, "the transfer finished before it was cancelled"
    assert transfer["state"] == "cancelled" and transfer["verified"] == len(placed)
    assert end["event"] == "error" and end["code"] == "cancelled"
    assert "what had not been verified was deleted" in end["message"]
    # the files that had arrived whole are verified and kept, byte for byte, listed as partial
    sent_files = {p.read_bytes() for p in chunked_study.rglob("*") if p.is_file()}
    assert all(p.read_bytes() in sent_files for p in placed)

    assert sent["event"] == "error" and sent["code"] == "receiver-cancelled", sent
    assert receiver.name in sent["message"] and "cancelled the transfer" in sent["message"]
    assert offer_now["state"] == "cancelled", offer_now
    assert again is False  # nothing left to cancel
    assert "cannot be resumed" in resume.value.message

    mine = [r for r in r_audit if r["action"] == "transfer-cancelled"]
    assert len(mine) == 1 and mine[0]["detail"]["state"] in ("paired", "receiving")
    assert mine[0]["detail"]["user"]  # who cancelled: here the node's operator
    theirs = [r for r in s_audit if r["action"] == "transfer-cancelled"]
    assert [r["outcome"] for r in theirs] == ["by-receiver"]


async def test_ctrl_c_on_receive_with_node_cancels_the_receive_while_consent_is_pending(
    fast_nodes: tuple[NodeProc, NodeProc], chunked_study: Path, cli: Cli, tmp_path: Path
) -> None:
    sender, receiver = fast_nodes
    send = await cli.start(
        "send", str(chunked_study), "--node", sender.url, "--data-dir", str(sender.data_dir),
        "--to", receiver.name, "--json",
    )  # fmt: skip
    offer = await cli.first_json(send, "offer")
    recv = await cli.start(
        "receive", offer["code"], "--from", sender.address, "--node", receiver.url,
        "--data-dir", str(receiver.data_dir), "--out", str(tmp_path / "in"), "--json",
    )  # fmt: skip
    job = (await cli.first_json(recv, "receiving"))["job"]
    waiting = await cli.first_json(recv, "status")
    assert waiting["state"] == "waiting-for-consent"

    recv.send_signal(signal.SIGINT)
    got = await cli.finish(recv, timeout=30)
    sent = await cli.finish(send, timeout=30, seen=[offer])

    assert got.code == 130, got.stderr
    assert "cancelled on the node" in got.stderr and "Traceback" not in got.stderr
    assert sent.code != 0 and "Traceback" not in sent.stderr
    errors = sent.events("error")
    assert errors and errors[-1]["code"] == "receiver-cancelled"
    assert receiver.name in sent.stdout or receiver.name in errors[-1]["message"]
    async with aiohttp.ClientSession() as http:
        r_api = NodeClient(receiver.url, receiver.token, http)
        s_api = NodeClient(sender.url, sender.token, http)
        transfer = await r_api._call("GET", f"/api/v1/transfers/{job}")
        offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
        # the patient's phone link ended with the offer
        async with http.get(offer["consent"]["link"] + "/state") as res:
            link_status = res.status
    assert transfer["state"] == "cancelled" and transfer["verified"] == 0
    assert offer_now["state"] == "cancelled"
    assert link_status == 404
    assert not any((tmp_path / "in").rglob("*.dcm"))


@pytest.mark.parametrize("sender_up", [True, False], ids=["sender-told", "sender-down"])
async def test_an_interrupted_receive_can_be_cancelled_after_a_restart(
    tmp_path: Path, chunked_study: Path, sender_up: bool
) -> None:
    """The receiving node died mid-stream: after its restart the transfer waits to be resumed.
    Cancelling it deletes what was kept and the ticket no longer works; the node reconnects
    with the ticket only to tell the sender, whose offer then ends (or, with the sending node
    down, says in its audit that it could not)."""
    sender = await spawn_node(NAMES[0], tmp_path / "ref", extra_args=FAST)
    receiver = await spawn_node(NAMES[1], tmp_path / "tc", extra_args=FAST)
    proxy = HoldProxy(sender.port, hold_after=300_000)
    out = tmp_path / "in"
    try:
        via = await proxy.start()
        async with aiohttp.ClientSession() as http:
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            offer, job, staging = await held_receive(s_api, r_api, chunked_study, out, proxy, via)
            os.kill(receiver.proc.pid, signal.SIGKILL)
            await receiver.proc.wait()
            proxy.release()
            await until_state(s_api, offer["offer_id"], "interrupted")
            if not sender_up:
                await stop_node(sender)
            receiver = await spawn_node(NAMES[1], tmp_path / "tc", extra_args=FAST)
            r_api = NodeClient(receiver.url, receiver.token, http)
            before = await r_api._call("GET", f"/api/v1/transfers/{job}")
            assert before["state"] == "interrupted" and staging.is_dir()

            assert await r_api.cancel_receive(job) is True
            after = await r_api._call("GET", f"/api/v1/transfers/{job}")
            with pytest.raises(P2PShareError) as resume:
                await r_api.resume(job)
            # telling the sender happens in the background, after the answer
            async with asyncio.timeout(40):
                while not [
                    r for r in await audit_of(r_api, job) if r["action"] == "cancel-notified"
                ]:
                    await asyncio.sleep(0.1)
            r_audit = await audit_of(r_api, job)
            if sender_up:
                offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
                s_audit = await audit_of(s_api, offer["offer_id"])
    finally:
        await proxy.close()
        await stop_node(receiver)
        await stop_node(sender)
    assert after["state"] == "cancelled"
    assert not staging.exists()
    assert "cannot be resumed" in resume.value.message
    assert [r["detail"]["state"] for r in r_audit if r["action"] == "transfer-cancelled"] == [
        "interrupted"
    ]
    [notified] = [r for r in r_audit if r["action"] == "cancel-notified"]
    if sender_up:
        assert notified["outcome"] == "ok"
        assert offer_now["state"] == "cancelled" and NAMES[1] in offer_now["error"]
        assert [r["outcome"] for r in s_audit if r["action"] == "transfer-cancelled"] == [
            "by-receiver"
        ]
    else:
        assert notified["outcome"] == "unreachable"


async def test_ctrl_c_on_a_receive_without_node_says_how_to_resume(
    fast_nodes: tuple[NodeProc, NodeProc], chunked_study: Path, cli: Cli, tmp_path: Path
) -> None:
    """Without --node the receiving node lives in the command: Ctrl-C stops it, and the
    transfer waits to be resumed rather than being cancelled."""
    sender, _ = fast_nodes
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        offer = await s_api.create_offer(str(chunked_study), None, None)  # consent pending
        recv = await cli.start(
            "receive", offer["code"], "--from", sender.address, "--data-dir",
            str(tmp_path / "own"), "--name", "Trauma Centre CT", "--out", str(tmp_path / "in"),
            "--json",
        )  # fmt: skip
        job = (await cli.first_json(recv, "receiving"))["job"]
        assert (await cli.first_json(recv, "status"))["state"] == "waiting-for-consent"
        recv.send_signal(signal.SIGINT)
        got = await cli.finish(recv, timeout=30)
        await until_state(s_api, offer["offer_id"], "interrupted")
        await s_api.cancel_offer(offer["offer_id"])
    assert got.code == 130 and "Traceback" not in got.stderr
    assert f"p2pshare receive --resume {job}" in got.stderr
    assert "cancelled" not in got.stderr


async def until_state(api: NodeClient, offer_id: str, state: str) -> None:
    async with asyncio.timeout(20):
        while (await api._call("GET", f"/api/v1/offers/{offer_id}"))["state"] != state:
            await asyncio.sleep(0.1)
