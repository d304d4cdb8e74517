"""Jobs: numbered events, bounded memory, long-polling readers, a bounded registry."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest

from p2pshare import jobs as jobs_module
from p2pshare.jobs import MAX_EVENTS, Job, Jobs


def clock(start: float = 1000.0, step: float = 0.5) -> Callable[[], float]:
    t = [start - step]

    def now() -> float:
        t[0] += step
        return t[0]

    return now


# -- events ------------------------------------------------------------------------------------


def test_events_get_increasing_sequence_numbers_time_and_fields() -> None:
    job = Job("j1", "offer", clock=clock(1000.0, 0.25))
    job.emit("waiting", expires=2000)
    job.emit("pairing", address="10.0.0.5:8700")
    job.emit("paired", peer="Trauma Centre", fingerprint="ABCD")
    assert job.events == [
        {"seq": 1, "event": "waiting", "at": 1000.0, "expires": 2000},
        {"seq": 2, "event": "pairing", "at": 1000.25, "address": "10.0.0.5:8700"},
        {"seq": 3, "event": "paired", "at": 1000.5, "peer": "Trauma Centre", "fingerprint": "ABCD"},
    ]
    assert (job.id, job.kind, job.done, job.result) == ("j1", "offer", False, None)


def test_event_time_is_rounded_to_milliseconds() -> None:
    job = Job("j", "offer", clock=lambda: 12.3456789)
    job.emit("waiting")
    assert job.events[0]["at"] == 12.346


def test_consecutive_progress_events_replace_each_other() -> None:
    job = Job("j", "receive", clock=lambda: 1.0)
    job.emit("connecting")
    for i in range(1000):
        job.emit("progress", bytes_received=i)
    assert job.events == [
        {"seq": 1, "event": "connecting", "at": 1.0},
        {"seq": 1001, "event": "progress", "at": 1.0, "bytes_received": 999},
    ]


def test_progress_and_status_replace_their_own_kind_other_events_are_kept() -> None:
    job = Job("j", "receive", clock=lambda: 1.0)
    job.emit("progress", n=1)
    job.emit("progress", n=2)
    job.emit("first-instance", file_index=0)
    job.emit("progress", n=3)
    job.emit("status", state="x")
    job.emit("status", state="y")
    job.emit("progress", n=4)
    job.emit("progress", n=5)
    assert [(e["seq"], e["event"], e.get("n"), e.get("state")) for e in job.events] == [
        (2, "progress", 2, None),
        (3, "first-instance", None, None),
        (4, "progress", 3, None),
        (6, "status", None, "y"),  # only the sender's latest status matters
        (8, "progress", 5, None),
    ]


def test_peer_supplied_fields_cannot_replace_seq_or_event() -> None:
    job = Job("j", "receive", clock=lambda: 1.0)
    job.emit("status", **{"seq": 10**15, "at": 0})
    assert (job.events[-1]["seq"], job.events[-1]["event"], job.events[-1]["at"]) == (
        1,
        "status",
        1.0,
    )


def test_events_beyond_the_limit_drop_the_oldest_but_keep_the_first() -> None:
    job = Job("j", "offer", clock=lambda: 1.0)
    for i in range(MAX_EVENTS + 100):
        job.emit("wrong-code", i=i)
    assert len(job.events) == MAX_EVENTS == 500
    assert job.events[0]["seq"] == 1  # the first event (e.g. "waiting" with expiry) stays
    assert [e["seq"] for e in job.events[1:]] == list(range(102, 601))


def test_since_returns_events_after_a_sequence_number() -> None:
    job = Job("j", "offer", clock=lambda: 1.0)
    for name in ("a", "b", "c"):
        job.emit(name)
    assert [e["event"] for e in job.since(0)] == ["a", "b", "c"]
    assert [e["event"] for e in job.since(2)] == ["c"]
    assert job.since(3) == []
    assert job.since(99) == []


def test_finish_marks_the_job_done_with_its_last_event_as_result() -> None:
    job = Job("j", "receive", clock=lambda: 2.0)
    job.emit("progress", n=1)
    job.finish("complete", instances=7, bytes=123)
    assert job.done is True
    assert job.result == {"seq": 2, "event": "complete", "at": 2.0, "instances": 7, "bytes": 123}
    assert job.events[-1] is job.result


def test_finishing_after_progress_keeps_the_progress_event() -> None:
    job = Job("j", "receive", clock=lambda: 2.0)
    job.emit("progress", n=1)
    job.finish("error", code="cancelled", message="stopped")
    assert [e["event"] for e in job.events] == ["progress", "error"]
    assert job.result == {
        "seq": 2,
        "event": "error",
        "at": 2.0,
        "code": "cancelled",
        "message": "stopped",
    }


# -- long polling --------------------------------------------------------------------------------


async def test_wait_returns_pending_events_immediately() -> None:
    job = Job("j", "offer", clock=lambda: 1.0)
    job.emit("waiting")
    job.emit("pairing")
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = await job.wait(0, timeout=10)
    assert loop.time() - start < 0.5
    assert [e["seq"] for e in got] == [1, 2]
    assert [e["seq"] for e in await job.wait(1, timeout=10)] == [2]


async def test_wait_waits_for_an_event_emitted_by_another_task() -> None:
    job = Job("j", "offer", clock=lambda: 1.0)
    job.emit("waiting")
    waiter = asyncio.create_task(job.wait(1, timeout=10))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()

    async def later() -> None:
        await asyncio.sleep(0.01)
        job.emit("pairing", address="10.0.0.5:8700")

    emitter = asyncio.create_task(later())
    got = await asyncio.wait_for(waiter, 2)
    await emitter
    assert got == [{"seq": 2, "event": "pairing", "at": 1.0, "address": "10.0.0.5:8700"}]


async def test_wait_sees_a_progress_event_that_replaced_the_one_it_had_read() -> None:
    job = Job("j", "receive", clock=lambda: 1.0)
    job.emit("progress", n=1)
    waiter = asyncio.create_task(job.wait(1, timeout=10))
    await asyncio.sleep(0)
    job.emit("progress", n=2)
    got = await asyncio.wait_for(waiter, 2)
    assert got == [{"seq": 2, "event": "progress", "at": 1.0, "n": 2}]


async def test_wait_times_out_with_no_events() -> None:
    job = Job("j", "offer", clock=lambda: 1.0)
    job.emit("waiting")
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await job.wait(1, timeout=0.05) == []
    elapsed = loop.time() - start
    assert 0.04 <= elapsed < 1.0


async def test_wait_with_zero_timeout_does_not_wait() -> None:
    job = Job("j", "offer")
    assert await asyncio.wait_for(job.wait(0, timeout=0), 0.5) == []


async def test_wait_is_woken_by_finish() -> None:
    job = Job("j", "receive", clock=lambda: 1.0)
    job.emit("connecting")
    waiter = asyncio.create_task(job.wait(1, timeout=10))
    await asyncio.sleep(0)
    job.finish("error", code="connection-lost", message="gone")
    got = await asyncio.wait_for(waiter, 2)
    assert [(e["seq"], e["event"], e["code"]) for e in got] == [(2, "error", "connection-lost")]


async def test_wait_on_a_finished_job_returns_at_once_even_with_nothing_new() -> None:
    job = Job("j", "receive", clock=lambda: 1.0)
    job.finish("complete")
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await job.wait(1, timeout=10) == []
    assert loop.time() - start < 0.5


async def test_several_readers_are_all_woken() -> None:
    job = Job("j", "offer", clock=lambda: 1.0)
    readers = [asyncio.create_task(job.wait(0, timeout=10)) for _ in range(3)]
    await asyncio.sleep(0)
    job.emit("pairing")
    results = await asyncio.wait_for(asyncio.gather(*readers), 2)
    assert [[e["seq"] for e in r] for r in results] == [[1], [1], [1]]


# -- the registry ----------------------------------------------------------------------------------


def test_create_and_get() -> None:
    registry = Jobs()
    a = registry.create("offer", "offer-id")
    b = registry.create("receive")
    assert (a.id, a.kind) == ("offer-id", "offer")
    assert re.fullmatch(r"[0-9a-f]{32}", b.id) and b.kind == "receive"
    assert registry.get("offer-id") is a and registry.get(b.id) is b
    assert registry.get("nope") is None
    assert registry.all() == [a, b]
    assert registry.create("receive").id != b.id


def test_the_registry_forgets_the_oldest_finished_jobs_beyond_max_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jobs_module, "MAX_JOBS", 3)
    registry = Jobs()
    j1, j2, j3 = (registry.create("receive", f"j{i}") for i in (1, 2, 3))
    j2.finish("complete")
    j3.finish("complete")
    j4 = registry.create("receive", "j4")
    # j1 is older but unfinished: j2 is the oldest finished job and goes.
    assert [j.id for j in registry.all()] == ["j1", "j3", "j4"]
    assert registry.get("j2") is None and registry.get("j1") is j1
    j4.finish("error", code="x", message="y")
    registry.create("receive", "j5")
    assert [j.id for j in registry.all()] == ["j1", "j4", "j5"]


def test_the_registry_never_forgets_an_unfinished_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "MAX_JOBS", 2)
    registry = Jobs()
    for i in range(5):
        registry.create("receive", f"j{i}")
    assert [j.id for j in registry.all()] == ["j0", "j1", "j2", "j3", "j4"]
    for j in registry.all()[:3]:
        j.finish("complete")
    registry.create("receive", "j5")
    # Six jobs, at most two kept: all three finished ones go, the unfinished three stay.
    assert [j.id for j in registry.all()] == ["j3", "j4", "j5"]


async def test_a_stopping_node_answers_every_long_poll_at_once() -> None:
    """The server waits for open requests before it stops: a 20 s poll must not hold it up."""
    registry = Jobs()
    job = registry.create("receive", "j1")
    job.emit("connecting")
    polls = [asyncio.create_task(job.wait(1, 20.0)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(p.done() for p in polls)  # waiting for an event after seq 1
    registry.end_waits()
    answered = await asyncio.wait_for(asyncio.gather(*polls), 5)
    assert answered == [[], [], []]
    assert await asyncio.wait_for(job.wait(1, 20.0), 5) == []  # and any poll after that
