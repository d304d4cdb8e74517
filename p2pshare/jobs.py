"""Live progress of offers and transfers, for the CLI, the API and (later) the web UI.

A job is an append-only list of small JSON events with increasing sequence numbers. Readers
long-poll for events after the last one they saw. Progress events replace the previous progress
event instead of piling up, so a job's memory stays small whatever the study size.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

MAX_EVENTS = 500
#: How often a transfer reports progress (its events replace each other).
PROGRESS_EVERY_S = 0.25
MAX_JOBS = 1000
#: Events of which only the latest matters: each replaces its predecessor.
_LATEST_ONLY = ("progress", "status")


class Job:
    def __init__(self, job_id: str, kind: str, clock: Callable[[], float] = time.time) -> None:
        self.id = job_id
        self.kind = kind
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.result: dict[str, Any] | None = None
        self._seq = 0
        self._clock = clock
        self._changed = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        #: the node is stopping: long-polls answer at once instead of holding up the shutdown
        self.closing = False
        #: someone asked to cancel it and its task is winding up
        self.cancelling = False

    def emit(self, event: str, **fields: Any) -> None:
        self._seq += 1
        # Our keys last: a field (some come from the peer) can never replace seq or event.
        record = {**fields, "seq": self._seq, "event": event, "at": round(self._clock(), 3)}
        if event in _LATEST_ONLY and self.events and self.events[-1]["event"] == event:
            self.events[-1] = record
        else:
            self.events.append(record)
            if len(self.events) > MAX_EVENTS:
                del self.events[1 : len(self.events) - MAX_EVENTS + 1]
        self._changed.set()

    def finish(self, event: str, **fields: Any) -> None:
        """The last event of a job: ``complete`` or ``error``."""
        self.emit(event, **fields)
        self.result = self.events[-1]
        self.done = True

    def since(self, after: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e["seq"] > after]

    async def wait(self, after: int, timeout: float) -> list[dict[str, Any]]:
        """Events after ``after``; waits up to ``timeout`` seconds for the first one."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = self.since(after)
            if found or self.done or self.closing:
                return found
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return []
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return []


class Jobs:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def create(self, kind: str, job_id: str | None = None) -> Job:
        job = Job(job_id or uuid.uuid4().hex, kind)
        self._jobs[job.id] = job
        if len(self._jobs) > MAX_JOBS:
            # Forget the oldest finished jobs; their outcome stays in the database.
            for old in [j.id for j in self._jobs.values() if j.done][: len(self._jobs) - MAX_JOBS]:
                del self._jobs[old]
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def end_waits(self) -> None:
        """The node is stopping: answer every long-poll now (a web page or a command may be
        waiting up to its full timeout, and the server waits for it before it can stop)."""
        for job in self._jobs.values():
            job.closing = True
            job._changed.set()
