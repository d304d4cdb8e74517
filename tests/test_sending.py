"""The sending side's bookkeeping rules that no end-to-end run can time reliably."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from p2pshare import crypto
from p2pshare.config import NodeConfig
from p2pshare.errors import RemoteProtocolError
from p2pshare.jobs import Jobs
from p2pshare.store import SENDING, Store
from p2pshare.transfer.engine import Engine
from p2pshare.transfer.sending import SenderRun
from tests.protocol.helpers import make_files, make_manifest


class _NoChannel:
    peer_address = "127.0.0.1"

    async def send(self, data: bytes | bytearray) -> None:  # pragma: no cover - unused
        raise AssertionError("nothing should be sent")

    async def recv(self) -> bytes | None:  # pragma: no cover - unused
        return None

    async def close(self) -> None:  # pragma: no cover - unused
        return None


def _engine(tmp_path: Path) -> tuple[Engine, Jobs, str]:
    store = Store(tmp_path / "node")
    jobs = Jobs()
    engine = Engine(
        config=NodeConfig(data_dir=tmp_path / "node", name="Referring Hospital ED"),
        identity=crypto.Identity.generate(),
        store=store,
        offer_job=jobs.get,
    )
    offer_id = "ab" * 16
    store.add_offer(
        offer_id=offer_id,
        number=1,
        spoken_code="1-aardvark-asparagus-cinnamon-dominoes",
        qr_secret=b"k" * 32,
        manifest=make_manifest(make_files(1, 100)),
        sources=[],
        created=0,
        expires=10**10,
    )
    jobs.create("offer", offer_id).emit("waiting")
    return engine, jobs, offer_id


def test_a_connection_that_did_not_claim_the_offer_cannot_fail_it(tmp_path: Path) -> None:
    """A second (hostile) connection naming an offer another connection is streaming must
    not mark that offer failed or end the sender's job when it breaks the protocol."""
    engine, jobs, offer_id = _engine(tmp_path)
    engine.store.set_offer_state(offer_id, SENDING)  # claimed and streaming elsewhere
    intruder = SenderRun(engine, _NoChannel())
    intruder.offer_id = offer_id
    intruder.job = jobs.get(offer_id)
    intruder.fail(RemoteProtocolError("garbage", "protocol-violation"))
    offer = engine.store.get_offer(offer_id)
    assert offer is not None and offer.state == SENDING and offer.error is None
    job = jobs.get(offer_id)
    assert job is not None and not job.done
    engine.store.close()


def test_the_connection_that_claimed_the_offer_records_its_failure(tmp_path: Path) -> None:
    engine, jobs, offer_id = _engine(tmp_path)
    assert engine.store.claim_offer(offer_id, now=1)
    run = SenderRun(engine, _NoChannel())
    run.offer_id = offer_id
    run.job = jobs.get(offer_id)
    run._claimed = True  # what winning the claim in the Paired handler sets
    run.fail(RemoteProtocolError("garbage", "protocol-violation"))
    offer = engine.store.get_offer(offer_id)
    assert offer is not None and offer.state == "failed" and offer.error == "garbage"
    job = jobs.get(offer_id)
    assert job is not None and job.done and job.result is not None
    assert job.result["event"] == "error" and job.result["code"] == "protocol-violation"
    assert ("transfer-failed", "protocol-violation") in [
        (r["action"], r["outcome"]) for r in engine.store.audit.records()
    ]
    engine.store.close()


class _RecordingChannel:
    """Records what the node sends; recv() waits forever (a peer that never speaks)."""

    peer_address = "192.0.2.7"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    async def send(self, data: bytes | bytearray) -> None:
        self.sent.append(bytes(data))

    async def recv(self) -> bytes | None:
        await asyncio.Event().wait()
        return None

    async def close(self) -> None:
        self.closed = True


async def test_too_many_pairing_connections_are_refused_as_busy(tmp_path: Path) -> None:
    from p2pshare.protocol.frames import FrameBuffer, FrameType, load_json
    from p2pshare.transfer import engine as engine_module

    engine, _, _ = _engine(tmp_path)
    engine.unpaired = engine_module.MAX_UNPAIRED
    ch = _RecordingChannel()
    await asyncio.wait_for(engine.serve_sender(ch), 5)
    buf = FrameBuffer()
    buf.feed(b"".join(ch.sent))
    frame = buf.next_frame()
    assert frame is not None and frame[0] == FrameType.ERROR
    assert load_json(frame[1], "error")["code"] == "busy"
    assert ch.closed and engine.unpaired == engine_module.MAX_UNPAIRED
    assert ("pairing-attempt", "busy") in [
        (r["action"], r["outcome"]) for r in engine.store.audit.records()
    ]
    engine.store.close()


async def test_a_peer_that_never_pairs_is_dropped_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pshare.transfer import engine as engine_module

    monkeypatch.setattr(engine_module, "PAIRING_DEADLINE_S", 0.2)
    engine, _, _ = _engine(tmp_path)
    ch = _RecordingChannel()
    # recv() never returns: only the pairing deadline can end this (wait_for is a safety net)
    await asyncio.wait_for(engine.serve_sender(ch), 5)
    assert ch.closed and engine.unpaired == 0  # its pairing slot was given back
    engine.store.close()


def test_a_resume_that_needs_nothing_more_sends_no_consent_record_and_does_not_fail(
    tmp_path: Path,
) -> None:
    """The receiver already holds every file (e.g. it stopped after the last one was placed):
    its ACCEPT leaves nothing to send, the session goes straight to waiting for the receipt,
    and the driver must not try to send a consent record (no image will flow)."""
    from p2pshare.protocol import events as ev
    from p2pshare.protocol.sender import SenderState

    engine, jobs, offer_id = _engine(tmp_path)
    engine.store.consents.create(offer_id, "none", None, None)
    run = SenderRun(engine, _NoChannel())
    run.offer_id, run._claimed = offer_id, True
    run.job = jobs.get(offer_id)
    peer = crypto.Identity.generate()
    run.s.peer_key, run.s.peer_name = peer.public_key, "Trauma Centre Radiology"
    run.s.manifest = make_manifest(make_files(1, 100))
    run.s.state = SenderState.AWAIT_RECEIPT  # what ACCEPT with an empty plan leaves
    run._on_event(ev.Accepted({0: 1}))
    offer = engine.store.get_offer(offer_id)
    assert offer is not None and offer.state == SENDING
    assert not run.s.consent_sent
