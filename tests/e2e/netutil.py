"""Helpers shared by the network end-to-end tests (discovery, paths, relay, concurrency)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc


@asynccontextmanager
async def api(*nodes: NodeProc) -> AsyncIterator[list[NodeClient]]:
    async with aiohttp.ClientSession() as http:
        yield [NodeClient(n.url, n.token, http) for n in nodes]


async def offer(client: NodeClient, study: Path, **extra: Any) -> dict[str, Any]:
    return await client.create_offer(str(study), None, None, consent="none", **extra)


async def receive(
    client: NodeClient, code: str, out: Path, sources: list[str] | None = None
) -> list[dict[str, Any]]:
    """Start a receive on the node and follow its job to the end; returns every event."""
    job = await client.receive(code, str(out), sources or [])
    return [e async for e in client.events(job)]


def last(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1]


def first(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(e for e in events if e["event"] == kind)


async def offer_view(client: NodeClient, offer_id: str) -> dict[str, Any]:
    data: dict[str, Any] = await client._call("GET", f"/api/v1/offers/{offer_id}")
    return data
