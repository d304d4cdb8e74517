"""Cancelling a receive through a real node app: what may be cancelled, and what a cancelled
task leaves behind (the transfers between real nodes are in tests/e2e/test_cancel_receive.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from p2pshare.config import NodeConfig
from p2pshare.node import service
from p2pshare.node.app import create_app
from p2pshare.node.keys import engine_key, jobs_key, store_key
from tests.node.test_api import NAME, Node

RECEIPT = {"instances": 3, "bytes": 1234, "manifest_sha256": "ab" * 32}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    config = NodeConfig(data_dir=tmp_path / "node", name=NAME)
    app = create_app(config)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Node(app, client, config, (config.data_dir / "api-token").read_text().strip())
    finally:
        await client.close()


def transfer(node: Node, job_id: str, state: str, tmp_path: Path) -> Path:
    store = node.app[store_key]
    staging = tmp_path / "out" / ".p2pshare-partial" / job_id
    staging.mkdir(parents=True)
    (staging / "0.part").write_bytes(b"partial")
    store.add_transfer(job_id, 1, str(tmp_path / "out"))
    store.update_transfer(job_id, state=state, staging=str(staging))
    return staging


async def test_only_a_receive_that_has_not_ended_can_be_cancelled(
    node: Node, tmp_path: Path
) -> None:
    unknown = await node.call("POST", "/api/v1/transfers/nope/cancel")
    assert unknown.status == 409 and unknown.body["error"] == "not-cancellable"
    for state in ("complete", "failed", "cancelled"):
        staging = transfer(node, f"job-{state}", state, tmp_path)
        res = await node.call("POST", f"/api/v1/transfers/job-{state}/cancel")
        assert res.status == 409, state
        assert node.app[store_key].get_transfer(f"job-{state}")["state"] == state
        assert staging.is_dir()  # nothing of an ended transfer is touched
    # signed for, only waiting for the sender's CLOSE: its task runs on, uncancelled
    job = node.app[jobs_key].create("receive", "job-complete")
    job.task = asyncio.create_task(asyncio.sleep(3600))
    res = await node.call("POST", "/api/v1/transfers/job-complete/cancel")
    assert res.status == 409 and not job.task.cancelled() and not job.task.done()
    job.task.cancel()
    audit = node.app[store_key].audit.records("transfer-cancelled")
    assert audit == []


async def test_an_interrupted_receive_with_no_task_is_cancelled_at_once(
    node: Node, tmp_path: Path
) -> None:
    staging = transfer(node, "job-i", "interrupted", tmp_path)
    node.app[store_key].set_resume("transfers", "job-i", "ticket", b"s" * 32, 2**40)
    res = await node.call("POST", "/api/v1/transfers/job-i/cancel")
    assert res.status == 200 and res.body == {"cancelled": True}
    t = node.app[store_key].get_transfer("job-i")
    assert t["state"] == "cancelled" and t["resume_id"] is None
    assert not staging.exists()
    [record] = node.app[store_key].audit.records("transfer-cancelled")
    assert record["detail"]["transfer"] == "job-i" and record["detail"]["state"] == "interrupted"


async def test_a_running_receive_is_cancelled_and_the_call_waits_for_its_end(
    node: Node, tmp_path: Path
) -> None:
    """The API answers once the task has wound up, so the state it reports is final."""
    app = node.app
    staging = transfer(node, "job-r", "receiving", tmp_path)
    job = app[jobs_key].create("receive", "job-r")
    wound_up = asyncio.Event()

    async def receive() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # telling the sender, closing staging
            service._receive_cancelled(app, job)
            wound_up.set()
            raise

    job.task = asyncio.create_task(receive())
    await asyncio.sleep(0)
    res = await node.call("POST", "/api/v1/transfers/job-r/cancel")
    assert res.status == 200
    assert wound_up.is_set()
    assert app[store_key].get_transfer("job-r")["state"] == "cancelled"
    assert job.done and job.result is not None and job.result["code"] == "cancelled"
    assert not staging.exists()


async def test_a_node_stopping_after_the_receipt_keeps_the_transfer_complete(
    node: Node, tmp_path: Path
) -> None:
    """Stopped while waiting for the sender's CLOSE: the study was signed for, so the job ends
    complete, not cancelled or interrupted."""
    app = node.app
    out = tmp_path / "out"
    out.mkdir()
    app[store_key].add_transfer("job-c", 1, str(out))
    app[store_key].update_transfer("job-c", state="complete", receipt=RECEIPT, verified=3)
    job = app[jobs_key].create("receive", "job-c")
    app[engine_key].stopping = True
    try:
        service._receive_cancelled(app, job)
    finally:
        app[engine_key].stopping = False
    t = app[store_key].get_transfer("job-c")
    assert t["state"] == "complete" and t["receipt"] == RECEIPT
    assert job.result is not None and job.result["event"] == "complete"
    assert job.result["instances"] == 3


async def test_a_second_cancel_while_the_first_winds_up_only_waits(
    node: Node, tmp_path: Path
) -> None:
    """A double click, or Ctrl-C and the web page at once: one cancel, one audit record, and
    the winding up (telling the sender, removing staging) is not interrupted."""
    app = node.app
    transfer(node, "job-d", "receiving", tmp_path)
    job = app[jobs_key].create("receive", "job-d")
    cancels = 0

    async def receive() -> None:
        nonlocal cancels
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancels += 1
            await asyncio.sleep(0.3)  # a second cancel here would cut this short
            service._receive_cancelled(app, job)
            raise

    job.task = asyncio.create_task(receive())
    await asyncio.sleep(0)
    first, second = await asyncio.gather(
        node.call("POST", "/api/v1/transfers/job-d/cancel"),
        node.call("POST", "/api/v1/transfers/job-d/cancel"),
    )
    assert (first.status, second.status) == (200, 200)
    assert cancels == 1 and job.task.cancelled()
    assert app[store_key].get_transfer("job-d")["state"] == "cancelled"
    assert len(app[store_key].audit.records("transfer-cancelled")) == 1
