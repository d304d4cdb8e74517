"""A receipt that may not have reached the sender is sent again (real nodes, a proxy between).

The receiving node signs its receipt and waits for the sender's CLOSE. When the connection ends
first, the sender may never have had the receipt, and would show the study as interrupted until
its ticket expires. The receiving node then reconnects with the transfer's ticket, declares
every instance held, and signs the receipt again for the sender.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc, tree_hashes
from p2pshare.dicom.ingest import scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from tests.e2e.conftest import CHUNK, Cli
from tests.e2e.proxy import CHUNK_FRAME, CUT, DROP, FLIP, Attack, MitmProxy

pytestmark = pytest.mark.e2e

SEALED_FRAME = 0x10  # p2pshare.protocol.frames.FrameType.SEALED


@pytest.fixture(scope="module")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 files, 12 chunks of 16 KiB: fewer than the window, so the sender sends them all at
    once and its DONE goes out in the same message as the last chunk."""
    root = tmp_path_factory.mktemp("receipt-study")
    generate_ct_study(
        root, seed=11, series=[SeriesSpec("HEAD", slices=6, rows=96, columns=96, region="head")]
    )
    return root


async def audit_action(api: NodeClient, ref: str, action: str) -> list[dict[str, Any]]:
    data = await api._call("GET", f"/api/v1/audit?offer={ref}")
    return [r for r in data["records"] if r["action"] == action]


async def wait_for_audit(api: NodeClient, ref: str, action: str) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while not (found := await audit_action(api, ref, action)):
            await asyncio.sleep(0.1)
    [record] = found
    return record


async def receive_through(
    proxy: MitmProxy, s_api: NodeClient, r_api: NodeClient, study: Path, out: Path
) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    offer = await s_api.create_offer(str(study), None, None, consent="none")
    job = await r_api.receive(offer["code"], str(out), [proxy.address])
    events = [e async for e in r_api.events(job)]
    return offer, job, events


def cut_after_done(study: Path) -> Attack:
    """Cut right after the last CHUNK, which goes out with the sender's DONE: the receiver
    completes and signs, but its receipt finds the connection gone."""
    manifest = scan(study, chunk_size=CHUNK).study(None).manifest
    chunks = sum(manifest.chunk_count(i) for i in range(len(manifest.instances)))
    return Attack(CUT, frame_type=CHUNK_FRAME, index=chunks - 1)


async def test_a_receipt_cut_off_on_its_way_is_signed_again_and_the_sender_completes(
    fast_nodes: tuple[NodeProc, NodeProc], small_study: Path, tmp_path: Path
) -> None:
    sender, receiver = fast_nodes
    cut = cut_after_done(small_study)
    out = tmp_path / "in"
    async with aiohttp.ClientSession() as http, MitmProxy(sender.port, cut, cut_once=True) as proxy:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        offer, job, events = await receive_through(proxy, s_api, r_api, small_study, out)
        assert [a.kind for a in proxy.applied] == [CUT]
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "complete" and "receipt-unconfirmed" in kinds, kinds
        resent = await wait_for_audit(r_api, job, "receipt-resent")
        offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
        transfer = await r_api._call("GET", f"/api/v1/transfers/{job}")
        resumed = await audit_action(s_api, offer["offer_id"], "transfer-resumed")
    assert resent["outcome"] == "ok"
    assert proxy.connections == 2  # the transfer, then the reconnection for the receipt
    assert offer_now["state"] == "completed", offer_now
    # both sides hold the same receipt: the one signed on the reconnection
    assert offer_now["receipt"] == transfer["receipt"]
    assert transfer["state"] == "complete"
    assert len(resumed) == 1
    assert tree_hashes(out) == tree_hashes(small_study)


@pytest.mark.parametrize("attack", [DROP, FLIP])
async def test_a_lost_close_after_a_delivered_receipt_needs_no_second_receipt(
    fast_nodes: tuple[NodeProc, NodeProc], small_study: Path, tmp_path: Path, attack: str
) -> None:
    """Only the sender's CLOSE went missing (dropped), or arrived altered (a protocol error
    after the receipt): the study stays complete, the sender has the receipt and its offer is
    complete, so the reconnection is refused and nothing changes."""
    sender, receiver = fast_nodes
    async with aiohttp.ClientSession() as http, MitmProxy(sender.port) as proxy:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        # a control run says which sealed sender message is the CLOSE (the last one)
        await receive_through(proxy, s_api, r_api, small_study, tmp_path / "control")
        await proxy.wait_idle()
        sealed = [m for m in proxy.s2r_messages if len(m) > 4 and m[4] == SEALED_FRAME]
        proxy.reset(Attack(attack, frame_type=SEALED_FRAME, index=len(sealed) - 1, offset=8))
        offer, job, events = await receive_through(
            proxy, s_api, r_api, small_study, tmp_path / "in"
        )
        assert [a.kind for a in proxy.applied] == [attack]
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "complete" and "receipt-unconfirmed" in kinds, kinds
        resent = await wait_for_audit(r_api, job, "receipt-resent")
        offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
        transfer = await r_api._call("GET", f"/api/v1/transfers/{job}")
    assert resent["outcome"] == "refused" and resent["detail"]["code"] == "resume-unknown"
    assert transfer["state"] == "complete"
    assert offer_now["state"] == "completed"
    assert offer_now["receipt"] == transfer["receipt"]  # the one receipt, never re-signed
    assert tree_hashes(tmp_path / "in") == tree_hashes(small_study)


async def test_a_receive_without_node_sends_a_lost_receipt_again_before_it_ends(
    fast_nodes: tuple[NodeProc, NodeProc], small_study: Path, tmp_path: Path, cli: Cli
) -> None:
    """`receive` without --node stops its node with the command: it waits for the node's first
    tries, so a sender that lost the receipt still completes."""
    sender, _ = fast_nodes
    cut = cut_after_done(small_study)
    out = tmp_path / "in"
    async with aiohttp.ClientSession() as http, MitmProxy(sender.port, cut, cut_once=True) as proxy:
        s_api = NodeClient(sender.url, sender.token, http)
        offer = await s_api.create_offer(str(small_study), None, None, consent="none")
        res = await cli.run(
            "receive", offer["code"], "--from", proxy.address, "--data-dir", str(tmp_path / "own"),
            "--name", "Trauma Centre CT", "--out", str(out), "--json",
        )  # fmt: skip
        offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
    assert res.code == 0, res.stderr
    assert [a.kind for a in proxy.applied] == [CUT]
    assert res.events("receipt-unconfirmed")
    assert [e["outcome"] for e in res.events("receipt-resent")] == ["ok"]
    assert offer_now["state"] == "completed"
    assert tree_hashes(out) == tree_hashes(small_study)
