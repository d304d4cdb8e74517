"""The byte pipe between two nodes: a WebSocket in production, any ``Channel`` in tests.

aiohttp's exceptions are translated here into :class:`p2pshare.errors.ConnectionLost`, with a
time limit both ways so a silent or non-reading peer cannot hold a connection forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol, cast

import aiohttp
from aiohttp import web

from p2pshare.errors import ConnectionLost
from p2pshare.protocol.frames import MAX_FRAME

WS_PATH = "/p2p"
IDLE_TIMEOUT_S = 120.0


class Channel(Protocol):
    """A reliable, ordered byte pipe to the peer (a WebSocket, or an in-memory fake)."""

    peer_address: str

    async def send(self, data: bytes | bytearray) -> None: ...

    async def recv(self) -> bytes | None:
        """Next bytes, or None once the peer closed."""

    async def close(self) -> None: ...


class WsChannel:
    """A WebSocket (either side) as a Channel; every binary message is a run of bytes."""

    def __init__(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, peer_address: str
    ) -> None:
        self._ws = ws
        self.peer_address = peer_address

    async def send(self, data: bytes | bytearray) -> None:
        try:
            # A peer that stops reading must not hold this connection (and its memory) forever.
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                # aiohttp takes any bytes-like object (it checks at run time); its hint says bytes.
                await self._ws.send_bytes(cast(bytes, data))
        except TimeoutError as exc:
            raise ConnectionLost(
                f"the peer stopped reading for {IDLE_TIMEOUT_S:.0f} seconds"
            ) from exc
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise ConnectionLost("the connection to the peer was lost") from exc

    async def recv(self) -> bytes | None:
        try:
            msg = await self._ws.receive(timeout=IDLE_TIMEOUT_S)
        except TimeoutError as exc:
            raise ConnectionLost(f"the peer sent nothing for {IDLE_TIMEOUT_S:.0f} seconds") from exc
        if msg.type == aiohttp.WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ):
            return None
        if msg.type == aiohttp.WSMsgType.ERROR:
            return None
        raise ConnectionLost("the peer sent a non-binary WebSocket message")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()


async def connect(address: str, session: aiohttp.ClientSession) -> WsChannel:
    """Open the peer channel to a sending node at ``host:port``."""
    url = f"ws://{address}{WS_PATH}"
    try:
        ws = await session.ws_connect(
            url,
            max_msg_size=MAX_FRAME + 1024,
            autoping=True,
            heartbeat=30.0,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ConnectionLost(
            f"could not reach the sending node at {address}: check the address and that its "
            f"node is running"
        ) from exc
    return WsChannel(ws, address)
