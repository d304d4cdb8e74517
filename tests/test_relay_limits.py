"""The relay cannot be filled: waiting channels per address, a wait timeout, a bounded rate table.

A real relay on 127.0.0.1 (port 0) and the node's own relay client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from p2pshare import crypto
from p2pshare.errors import ConfigError, ConnectionLost
from p2pshare.relay import RateLimit, RelayConfig, relay_key, start_relay
from p2pshare.transfer.relay_client import RelayRefused, open_channel


def token(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture
async def relay(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Any]]:
    config = RelayConfig(port=0, **getattr(request, "param", {}))
    runner, app = await start_relay(config)
    host, port = runner.addresses[0][:2]
    try:
        yield f"{host}:{port}", app[relay_key]
    finally:
        await runner.cleanup()


async def _until(check: Any) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the relay never got there")


@pytest.mark.parametrize("relay", [{"max_waiting_per_address": 2}], indirect=True)
async def test_one_address_may_keep_only_a_few_channels_waiting(relay: tuple[str, Any]) -> None:
    address, state = relay
    me = crypto.Identity.generate()
    async with aiohttp.ClientSession() as http:
        waiting = [
            asyncio.create_task(open_channel(address, token(i), "sender", me, http))
            for i in (1, 2)
        ]
        await _until(lambda: state.waiting("127.0.0.1") == 2)
        with pytest.raises(RelayRefused, match="too many channels waiting"):
            await open_channel(address, token(3), "sender", me, http, wait_s=10)
        # the other side of a waiting channel still gets in, and pairing frees a place
        receiver = await open_channel(address, token(1), "receiver", me, http, wait_s=10)
        sender = await waiting[0]
        await _until(lambda: state.waiting("127.0.0.1") == 1)
        third = asyncio.create_task(open_channel(address, token(3), "sender", me, http))
        await _until(lambda: state.waiting("127.0.0.1") == 2)
        for task in (waiting[1], third):
            task.cancel()
        await asyncio.gather(waiting[1], third, return_exceptions=True)
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("relay", [{"wait_timeout": 0.3}], indirect=True)
async def test_a_channel_whose_other_side_never_comes_is_closed(relay: tuple[str, Any]) -> None:
    address, state = relay
    async with aiohttp.ClientSession() as http:
        with pytest.raises(ConnectionLost):
            await open_channel(
                address, token(7), "sender", crypto.Identity.generate(), http, wait_s=30
            )
    assert state.channels == {}
    assert state.waiting("127.0.0.1") == 0


def test_rate_table_forgets_addresses_that_went_quiet() -> None:
    now = [0.0]
    rate = RateLimit(5, clock=lambda: now[0])
    for i in range(10_001):
        assert rate.allow(f"10.0.{i // 250}.{i % 250}")
    now[0] = 61.0
    assert rate.allow("192.0.2.1")  # the table is over its size: the quiet ones are dropped
    assert rate.prune() == 1
    now[0] = 200.0
    assert rate.prune() == 0


def test_relay_config_refuses_nonsense_waiting_limits() -> None:
    with pytest.raises(ConfigError):
        RelayConfig(max_waiting_per_address=0)
    with pytest.raises(ConfigError):
        RelayConfig(wait_timeout=0)
