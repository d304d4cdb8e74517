"""Fixtures for the staff web app: two real nodes, accounts made with the real CLI, Chromium.

Everything is synchronous (Playwright's sync API, subprocess nodes, urllib) so that the
session-scoped browser and nodes need no shared event loop. Chromium is Debian's, launched
headless with a fake camera whose video file the tests write (from the QR the send page shows)
before the receive page opens the camera: Chromium reads the file when capture starts.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from p2pshare.demo import free_port
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
SENDER_NAME, RECEIVER_NAME = "Referring Hospital ED", "Trauma Centre Radiology"
PASSWORD = "correct horse battery staple"


@dataclass
class Node:
    name: str
    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, http.client.HTTPResponse]:
        """One HTTP request; returns (status, parsed JSON body or text, response)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        res = conn.getresponse()
        text = res.read().decode("utf-8", "replace")
        conn.close()
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text
        return res.status, parsed, res

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One API call with the node's bearer token (the CLI's way in)."""
        status, parsed, _ = self.request(
            method, path, body, headers={"Authorization": f"Bearer {self.token}"}
        )
        return status, parsed

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "p2pshare", *args, "--data-dir", str(self.data_dir)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def add_user(self, name: str, role: str, password: str = PASSWORD) -> None:
        res = self.cli("user", "add", name, "--role", role, "--password-stdin", stdin=password)
        assert res.returncode == 0, res.stderr

    def sign_in(self, name: str, password: str = PASSWORD) -> tuple[str, str]:
        """(cookie header value, CSRF token) of a new session."""
        status, body, res = self.request(
            "POST", "/api/v1/session", {"name": name, "password": password}
        )
        assert status == 200, body
        cookie = res.getheader("Set-Cookie") or ""
        return cookie.split(";", 1)[0], body["csrf"]


def spawn(name: str, data_dir: Path, *extra: str) -> Node:
    """`p2pshare serve` on a free loopback port (``extra``: more serve options)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(data_dir / "serve.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pshare", "serve", "--data-dir", str(data_dir), "--name", name,
         "--host", "127.0.0.1", "--port", str(port), *extra],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    node = Node(name, data_dir, port, proc)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            log_text = (data_dir / "serve.log").read_text()[-2000:]
            raise RuntimeError(f"node {name} exited: {log_text}")
        with contextlib.suppress(OSError):
            status, body, _ = node.request("GET", "/api/v1/info")
            if status == 200:
                node.info = body
                return node
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"node {name} did not start")
        time.sleep(0.1)


def stop(node: Node) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(10)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


@pytest.fixture(scope="session")
def web_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CT study (two series, 14 images) as the .zip a technologist would upload."""
    root = tmp_path_factory.mktemp("web-study")
    files = generate_ct_study(
        root / "study",
        seed=11,
        series=[
            SeriesSpec("Head", slices=6, rows=128, columns=128, region="head"),
            SeriesSpec("Chest", slices=8, rows=128, columns=128, region="chest"),
        ],
    )
    archive = root / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f.relative_to(root / "study").as_posix())
    return archive


@pytest.fixture(scope="session")
def web_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    """A referring hospital's node and a trauma centre's node, each with staff accounts."""
    base = tmp_path_factory.mktemp("web-nodes")
    # Staff flows are under test here; the patient's consent has its own browser tests
    # (tests/e2e/test_consent_phone.py). An offer may only loosen a node's policy with the
    # operator's token, so these nodes run with policy 'none' for the browser to use it.
    sender = spawn(SENDER_NAME, base / "sender", "--consent-policy", "none")
    receiver = spawn(RECEIVER_NAME, base / "receiver", "--consent-policy", "none")
    try:
        sender.add_user("tech", "sender")
        receiver.add_user("rad", "receiver")
        sender.add_user("guard", "admin")
        yield sender, receiver
    finally:
        stop(sender)
        stop(receiver)


def write_y4m(picture: Image.Image, path: Path, frames: int = 10) -> None:
    """A YUV4MPEG2 video (4:2:0) showing ``picture``: Chromium's fake camera plays it in a loop.

    Y4M is a header line, then per frame "FRAME\\n" and the planar Y, U and V samples; the
    colour conversion is BT.601 full range, as JPEG uses (C420jpeg).
    """
    img = picture.convert("RGB")
    w, h = img.size
    img = img.crop((0, 0, w - w % 2, h - h % 2))
    w, h = img.size
    rgb = np.asarray(img, dtype=np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    v = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(p, 0, 255).round().astype(np.uint8) for p in (y, sub(u), sub(v))]
    frame = b"FRAME\n" + b"".join(p.tobytes() for p in planes)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        fh.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            fh.write(frame)
    os.replace(tmp, path)


def qr_scene(qr_png: bytes, size: tuple[int, int] = (1280, 720)) -> Image.Image:
    """The QR screenshot as a camera would see it: smaller, off-centre, on a grey desk."""
    qr = Image.open(io.BytesIO(qr_png)).convert("RGB")
    scene = Image.new("RGB", size, (120, 124, 130))
    side = int(size[1] * 0.8)
    qr = qr.resize((side, side), Image.Resampling.BILINEAR)
    scene.paste(qr, (size[0] // 2 - side // 2 + 90, (size[1] - side) // 2))
    return scene


@pytest.fixture(scope="session")
def camera_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake camera's video: a blank placeholder until a test writes the QR into it."""
    path = tmp_path_factory.mktemp("camera") / "camera.y4m"
    write_y4m(Image.new("RGB", (640, 360), (90, 90, 90)), path, frames=2)
    return path


# Package scope: the sync Playwright driver runs an event loop of its own, so it must be closed
# before any asyncio test of another package runs in the same pytest process, in any order.
@pytest.fixture(scope="package")
def browser(camera_file: Path) -> Iterator[Any]:
    # scripts/setup.sh installs it: a missing browser is a broken setup, not a reason to skip
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run scripts/setup.sh"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={camera_file}",
                "--no-sandbox",
            ],
        )
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, node: Node) -> Any:
    """A page in its own context (both nodes share 127.0.0.1, and cookies ignore ports)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000}, base_url=node.url)
    ctx.grant_permissions(["camera"], origin=node.url)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    return page


def sign_in(page: Any, user: str, password: str = PASSWORD, next_path: str = "/") -> None:
    page.goto(next_path)
    page.wait_for_url(re.compile(r".*/login\?next="))
    page.fill("#name", user)
    page.fill("#password", password)
    page.click("#sign-in")
    page.wait_for_url(re.compile(".*" + re.escape(next_path) + "$"))
    page.wait_for_selector("nav.nav")


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
