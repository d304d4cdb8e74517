"""LAN discovery between real nodes over loopback mDNS, spoken codes without an address, and a
spoofed advertisement that gets nowhere.

Multicast on the loopback interface works in this environment (the nodes listen on 127.0.0.1,
so they advertise and browse on loopback only). The module first probes that with a plain
multicast datagram: only where the kernel does not loop multicast back on lo are these tests
skipped, with that reason; where it does, a node that is not discovered is a failure.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from p2pshare.demo import NodeProc, spawn_node, stop_node, tree_hashes
from p2pshare.discovery import SERVICE_TYPE

from .conftest import NAMES, Cli
from .netutil import api, first, last, offer, offer_view, receive


def _loopback_multicast_works() -> bool:
    """Send one datagram to the mDNS group on lo and see whether it comes back."""
    group, port = "224.0.0.251", 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM
    ) as tx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", port))
        port = rx.getsockname()[1]
        mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
        try:
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            tx.sendto(b"p2pshare-probe", (group, port))
        except OSError:
            return False
        rx.settimeout(2.0)
        try:
            return rx.recv(64) == b"p2pshare-probe"
        except OSError:
            return False


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        not _loopback_multicast_works(),
        reason="this kernel does not loop multicast back on lo, so mDNS cannot run here",
    ),
]


async def _discovered(node: NodeProc, fingerprint: str, timeout: float = 15.0) -> dict:
    """Wait until ``node`` lists a node with ``fingerprint`` (mDNS answers take a moment)."""
    async with api(node) as (client,):
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            data = await client._call("GET", "/api/v1/discovered")
            assert data["active"], "discovery is not running on the node"
            match = [n for n in data["nodes"] if n["fingerprint"] == fingerprint]
            if match:
                return match[0]
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{fingerprint} was not discovered within {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def _burn_numbers(client, study: Path, n: int) -> None:
    """Hold ``n`` live offers so the next one's number is n+1 (away from other tests' #1)."""
    for _ in range(n):
        await offer(client, study)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def trio(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[NodeProc]]:
    root = tmp_path_factory.mktemp("lan")
    nodes = []
    try:
        for name, sub in [(NAMES[0], "s"), (NAMES[1], "r"), ("Bystander Clinic", "b")]:
            nodes.append(await spawn_node(name, root / sub))
        yield nodes
    finally:
        for n in nodes:
            await stop_node(n)


async def test_nodes_discover_each_other_and_peers_lists_them(
    trio: list[NodeProc], cli: Cli
) -> None:
    sender, receiver, _ = trio
    fp = sender.extra["info"]["fingerprint"]
    seen = await _discovered(receiver, fp)
    # only name, fingerprint and where: nothing about offers or patients
    assert seen["name"] == sender.name
    assert seen["addresses"] == [sender.address]
    assert set(seen) == {"name", "fingerprint", "addresses", "seen"}

    res = await cli.run(
        "peers", "--node", receiver.url, "--data-dir", str(receiver.data_dir), "--json"
    )
    assert res.code == 0, res.stderr
    lan = [p for p in res.events("peer") if p["fingerprint"] == fp]
    assert lan and lan[0]["source"] in ("lan", "pinned+lan")
    assert lan[0]["addresses"] == [sender.address]


async def test_spoken_code_without_address_finds_the_sender_on_the_lan(
    trio: list[NodeProc], study: Path, tmp_path: Path
) -> None:
    sender, receiver, bystander = trio
    await _discovered(receiver, sender.extra["info"]["fingerprint"])
    await _discovered(receiver, bystander.extra["info"]["fingerprint"])
    async with api(sender, receiver, bystander) as (s, r, b):
        await _burn_numbers(s, study, 4)
        mine = await offer(s, study)
        assert mine["code"].startswith("5-")
        # the bystander holds offers too, but none numbered 5: it answers "unknown offer"
        others = [await offer(b, study) for _ in range(2)]
        events = await receive(r, mine["code"], tmp_path / "out")
        done = last(events)
        assert done["event"] == "complete", done
        assert done["path"] == "lan"
        assert first(events, "path")["path"] == "lan"
        assert first(events, "paired")["fingerprint"] == sender.extra["info"]["fingerprint"]
        assert len(first(events, "discovered")["nodes"]) >= 2
        assert tree_hashes(tmp_path / "out") == tree_hashes(study)
        # no node that did not hold the offer counted a wrong code or changed state
        for o in others:
            view = await offer_view(b, o["offer_id"])
            assert view["state"] == "active" and view["failed_attempts"] == 0
        assert (await offer_view(s, mine["offer_id"]))["state"] == "completed"


async def test_spoofed_advertisement_gets_nowhere(
    trio: list[NodeProc], study: Path, tmp_path: Path
) -> None:
    """Someone advertises the sender's name and fingerprint, pointing at another node that holds
    an unrelated offer with the same number. The receiver still gets the study from the real
    sender only; the impostor's node never pairs and sends nothing."""
    sender, receiver, bystander = trio
    s_fp = sender.extra["info"]["fingerprint"]
    await _discovered(receiver, s_fp)
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    spoof = AsyncServiceInfo(
        SERVICE_TYPE,
        f"spoof-{s_fp}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=bystander.port,
        properties={"name": sender.name, "fp": s_fp, "v": "1", "port": str(bystander.port)},
        server="spoof.local.",
    )
    await zc.async_register_service(spoof)
    try:
        async with api(sender, receiver, bystander) as (s, r, b):
            # both hold a live offer numbered like the real one
            real = await offer(s, study)
            number = int(real["code"].split("-")[0])
            fakes = []
            while True:
                o = await offer(b, study)
                fakes.append(o)
                if int(o["code"].split("-")[0]) >= number:
                    break
            twin = fakes[-1]
            assert twin["code"].split("-")[0] == str(number)
            # wait until the receiver sees the spoofed record as well
            deadline = asyncio.get_running_loop().time() + 15
            while True:
                data = await r._call("GET", "/api/v1/discovered")
                ports = {a for n in data["nodes"] if n["fingerprint"] == s_fp for a in n["addresses"]}
                if bystander.address in ports:
                    break
                assert asyncio.get_running_loop().time() < deadline, data
                await asyncio.sleep(0.2)

            events = await receive(r, real["code"], tmp_path / "out")
            done = last(events)
            assert done["event"] == "complete", done
            paired = [e for e in events if e["event"] == "paired"]
            assert len(paired) == 1 and paired[0]["fingerprint"] == s_fp
            assert paired[0]["address"] == sender.address
            assert tree_hashes(tmp_path / "out") == tree_hashes(study)
            # the impostor's target never paired: its offer is live, at most one wrong try
            view = await offer_view(b, twin["offer_id"])
            assert view["state"] == "active" and view["failed_attempts"] <= 1
            assert view["peer"] is None

    finally:
        await zc.async_unregister_service(spoof)
        await zc.async_close()
