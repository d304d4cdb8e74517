"""Talking to a node's API: a running one (``--node URL``) or a temporary one in this process.

The CLI front ends (``send``, ``receive``) always speak HTTP to a node; without ``--node`` they
first start a node inside the CLI process (like magic-wormhole's one-shot mode) and then talk to
it exactly as they would to a remote one. One code path, tested both ways.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from p2pshare.config import NodeConfig
from p2pshare.errors import (
    CodeFormatError,
    ConfigError,
    InputError,
    P2PShareError,
    StudyChoiceError,
)

TERMINAL_EVENTS = ("complete", "error")


class ApiError(P2PShareError):
    """An error the node reported, carried through to the person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class NodeClient:
    base_url: str
    token: str
    http: aiohttp.ClientSession

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with self.http.request(
                method,
                self.base_url.rstrip("/") + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
            ) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    raise ConfigError(
                        f"{self.base_url} answered, but it is not a p2pshare node; check --node"
                    ) from None
                if resp.status >= 400:
                    code = data.get("error", "error") if isinstance(data, dict) else "error"
                    msg = (
                        data.get("message", f"HTTP {resp.status}") if isinstance(data, dict) else ""
                    )
                    if code == "study-choice":
                        raise StudyChoiceError(msg, data.get("studies", []))
                    if code == "unauthorized":
                        raise ConfigError(
                            "the node refused the API token: pass its data directory with "
                            "--data-dir or set P2PSHARE_TOKEN"
                        )
                    if code == "code-format":
                        raise CodeFormatError(msg)
                    if code == "input":
                        raise InputError(msg)
                    if code == "config":
                        raise ConfigError(msg)
                    raise ApiError(code, msg)
                return data
        except aiohttp.ClientConnectionError as exc:
            raise ConfigError(
                f"cannot reach the node at {self.base_url}: is `p2pshare serve` running there?"
            ) from exc

    async def info(self) -> dict[str, Any]:
        data: dict[str, Any] = await self._call("GET", "/api/v1/info")
        return data

    async def create_offer(
        self,
        path: str,
        study_uid: str | None,
        expires_s: int | None,
        **extra: Any,
    ) -> dict[str, Any]:
        """``extra``: consent, destination, break_glass ({clinician, reason}) — see the API."""
        data: dict[str, Any] = await self._call(
            "POST",
            "/api/v1/offers",
            {
                "path": str(Path(path).expanduser().resolve()),
                "study_uid": study_uid,
                "expires_s": expires_s,
                **{k: v for k, v in extra.items() if v is not None},
            },
        )
        return data

    async def break_glass(
        self, offer_id: str, clinician: str, reason: str, minutes: int | None = None
    ) -> dict[str, Any]:
        data: dict[str, Any] = await self._call(
            "POST",
            f"/api/v1/offers/{offer_id}/break-glass",
            {"clinician": clinician, "reason": reason, "minutes": minutes},
        )
        return data

    async def cancel_offer(self, offer_id: str) -> None:
        with contextlib.suppress(P2PShareError):
            await self._call("DELETE", f"/api/v1/offers/{offer_id}")

    async def cancel_receive(self, job: str) -> bool:
        """Cancel a running or interrupted receive job; False if it had already ended."""
        try:
            await self._call("POST", f"/api/v1/transfers/{job}/cancel")
        except ApiError as exc:
            if exc.code == "not-cancellable":
                return False
            raise
        return True

    async def resume(self, job: str) -> str:
        """Reconnect an interrupted receive job; returns the job id to follow."""
        data = await self._call("POST", "/api/v1/receive/resume", {"job": job})
        return str(data["job"])

    async def receive(self, code: str, out: str, sources: list[str]) -> str:
        data = await self._call(
            "POST",
            "/api/v1/receive",
            {"code": code, "out": str(Path(out).expanduser().resolve()), "from": sources},
        )
        return str(data["job"])

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every event of a job, as it happens, until its complete/error event."""
        after = 0
        while True:
            data = await self._call("GET", f"/api/v1/jobs/{job_id}/events?after={after}&wait=20")
            for event in data["events"]:
                after = event["seq"]
                yield event
                if event["event"] in TERMINAL_EVENTS:
                    return
            if data["done"] and not data["events"]:
                return

    async def peers(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = await self._call("GET", "/api/v1/peers")
        return data

    async def forget_peer(self, name: str) -> None:
        from urllib.parse import quote

        await self._call("DELETE", f"/api/v1/peers/{quote(name, safe='')}")


def read_token(data_dir: Path) -> str:
    env = os.environ.get("P2PSHARE_TOKEN")
    if env:
        return env.strip()
    path = data_dir / "api-token"
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"no API token at {path}: pass the node's --data-dir or set P2PSHARE_TOKEN"
        ) from exc


@contextlib.asynccontextmanager
async def connect_node(
    node_url: str | None, data_dir: Path, local: NodeConfig | None
) -> AsyncIterator[NodeClient]:
    """A client for ``node_url``, or for a temporary in-process node built from ``local``."""
    from p2pshare.node.app import start

    async with aiohttp.ClientSession() as http:
        if node_url:
            yield NodeClient(node_url, read_token(data_dir), http)
            return
        assert local is not None
        runner, app = await start(local)
        try:
            host, port = next(iter(runner.addresses))[:2]
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            token = (local.data_dir / "api-token").read_text().strip()
            yield NodeClient(f"http://{host}:{port}", token, http)
        finally:
            await runner.cleanup()
