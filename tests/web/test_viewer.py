"""The viewer in a real browser, on a study really received between two real nodes.

Two ``p2pshare serve`` processes on 127.0.0.1; the study goes from one to the other through the
nodes' HTTP API (the same calls ``send --node`` / ``receive --node`` make); a receiving member of
staff (made with the real ``p2pshare user add``) signs in and Debian's Chromium (headless, the
``browser`` fixture of ``conftest.py``) opens ``/viewer?job=…``. Assertions are on the canvas's
pixels: the image is there, and a preset, a right-drag and the wheel change them. The window
arithmetic in the browser must match the node's thumbnails to within rounding.
"""

from __future__ import annotations

import base64
import io
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.viewer.decode import decode_frame, windowed
from tests.web.conftest import Node, spawn, stop

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
STAFF, STAFF_PASSWORD = "viewer-rad", "window level presets 40 400"
BIRTH_DATE = "19700101"
SERIES = [
    SeriesSpec("HEAD", slices=8, rows=96, columns=96, region="head"),
    SeriesSpec("CHEST", slices=12, rows=128, columns=128, region="chest"),
]
WAIT_S = 90  # a ceiling for a hung node, not a speed requirement


@dataclass
class Env:
    sender: Node
    receiver: Node
    study: Path
    base: Path

    def offer(self, **extra: Any) -> dict[str, Any]:
        status, body = self.sender.call(
            "POST", "/api/v1/offers", {"path": str(self.study), **extra}
        )
        assert status == 201, body
        return dict(body)

    def receive(self, offer: dict[str, Any], out: Path) -> str:
        status, body = self.receiver.call(
            "POST",
            "/api/v1/receive",
            {"code": offer["code"], "out": str(out), "from": [f"127.0.0.1:{self.sender.port}"]},
        )
        assert status == 202, body
        return str(body["job"])

    def wait_state(self, job: str, *states: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while True:
            status, t = self.receiver.call("GET", f"/api/v1/transfers/{job}")
            assert status == 200, t
            if t["state"] in states:
                return dict(t)
            assert t["state"] not in ("failed", "cancelled"), t
            assert time.monotonic() < deadline, f"transfer stuck in {t['state']}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("viewer")
    study = base / "study"
    generate_ct_study(study, seed=11, series=SERIES, birth_date=BIRTH_DATE)
    sender = spawn("Referring Hospital ED", base / "sender")
    try:
        receiver = spawn("Trauma Centre Radiology", base / "receiver")
        try:
            receiver.add_user(STAFF, "receiver", STAFF_PASSWORD)
            yield Env(sender, receiver, study, base)
        finally:
            stop(receiver)
    finally:
        stop(sender)


@pytest.fixture(scope="module")
def received(env: Env) -> tuple[str, Path]:
    """A study received completely (consent policy 'none'): (job id, destination)."""
    out = env.base / "incoming"
    job = env.receive(env.offer(consent="none"), out)
    env.wait_state(job, "complete")
    return job, out


def _page(browser: Any, env: Env) -> Any:
    ctx = browser.new_context(viewport={"width": 1200, "height": 900}, base_url=env.receiver.url)
    res = ctx.request.post("/api/v1/session", data={"name": STAFF, "password": STAFF_PASSWORD})
    assert res.status == 200, res.text()
    ctx.add_init_script(
        "window.addEventListener('p2p-first-image', () => { window.__firstImageEvents ="
        " (window.__firstImageEvents || 0) + 1; });"
    )
    page = ctx.new_page()
    page.set_default_timeout(WAIT_S * 1000)
    return page


def _png(page: Any, expression: str) -> np.ndarray:
    url = page.evaluate(expression)
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def _canvas(page: Any) -> np.ndarray:
    """The canvas's pixels as the screen shows them (RGB)."""
    return _png(page, "() => document.getElementById('image').toDataURL('image/png')")


def _bitmap(page: Any) -> np.ndarray:
    """The windowed frame at its native size, before scaling to the canvas (grey values)."""
    return _png(page, "() => window.p2pViewer.bitmap.toDataURL('image/png')")[..., 0]


def _shown(page: Any) -> dict[str, str]:
    return dict(page.evaluate("() => ({...document.getElementById('image').dataset})"))


def _file_of(out: Path, sop: str) -> Path:
    return next(out.rglob(f"{sop}.dcm"))


def _shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def test_viewer_shows_the_received_study_and_window_level_changes_the_pixels(
    browser: Any, env: Env, received: tuple[str, Path]
) -> None:
    job, out = received
    page = _page(browser, env)
    page.goto(f"/viewer?job={job}")
    page.wait_for_function("() => window.p2pFirstImageAt !== undefined")
    assert page.evaluate("() => window.__firstImageEvents") == 1
    assert page.evaluate("() => typeof window.p2pFirstImageAt") == "number"

    # an image, not a blank canvas
    first = _canvas(page)
    assert first.std() > 20, "the canvas is (nearly) blank"
    assert (first > 200).any() and (first < 30).any()

    # header and series list
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('Complete')"
    )
    assert page.text_content("#patient-name") == "DEMO, TRAUMA PATIENT"
    assert page.text_content("#patient-birth") == "1970-01-01"
    assert page.locator(".series").count() == 2
    labels = page.locator(".series .label").all_text_contents()
    assert "HEAD" in labels[0] and "CHEST" in labels[1]
    assert page.locator(".series .count").all_text_contents() == [
        "8 of 8 verified",
        "12 of 12 verified",
    ]
    page.wait_for_function(
        "() => [...document.querySelectorAll('.series img')].every(i => i.complete"
        " && i.naturalWidth > 0) && document.querySelectorAll('.series img').length === 2"
    )

    # the browser windows exactly like the node: compare with decode + windowed in Python
    shown = _shown(page)
    frame = decode_frame(_file_of(out, shown["sop"]))
    assert float(shown["center"]) == frame.center and float(shown["width"]) == frame.width
    diff = np.abs(_bitmap(page).astype(int) - windowed(frame).astype(int))
    assert diff.max() <= 1
    _shot(page, "viewer")

    # lung preset: other pixels, and exactly the lung window
    page.click('[data-preset="lung"]')
    page.wait_for_function("() => document.getElementById('image').dataset.center === '-600'")
    lung = _canvas(page)
    assert np.abs(lung.astype(int) - first.astype(int)).mean() > 5
    assert _shown(page)["width"] == "1500"
    assert np.abs(_bitmap(page).astype(int) - windowed(frame, -600, 1500).astype(int)).max() <= 1
    _shot(page, "viewer-lung")

    page.click('[data-preset="bone"]')
    page.wait_for_function("() => document.getElementById('image').dataset.center === '300'")
    assert not np.array_equal(_canvas(page), lung)

    # right-drag: horizontal changes the window width, vertical the level
    before = _shown(page)
    pixels = _canvas(page)
    box = page.locator("#image").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down(button="right")
    page.mouse.move(x - 120, y + 60, steps=5)
    page.mouse.up(button="right")
    after = _shown(page)
    assert float(after["width"]) < float(before["width"])
    assert float(after["center"]) > float(before["center"])
    assert not np.array_equal(_canvas(page), pixels)

    # the wheel scrolls to another slice: other pixels
    before_slice = int(after["slice"])
    pixels = _canvas(page)
    page.mouse.move(x, y)
    page.mouse.wheel(0, 120)
    page.wait_for_function(
        f"() => document.getElementById('image').dataset.slice === '{before_slice + 1}'"
    )
    assert _shown(page)["sop"] != after["sop"]
    assert not np.array_equal(_canvas(page), pixels)

    # arrow keys too
    page.keyboard.press("ArrowUp")
    page.wait_for_function(
        f"() => document.getElementById('image').dataset.slice === '{before_slice}'"
    )

    # zoom and reset
    pixels = _canvas(page)
    page.click("#zoom-in")
    assert not np.array_equal(_canvas(page), pixels)
    page.click("#reset")
    reset = _shown(page)
    assert float(reset["center"]) == decode_frame(_file_of(out, reset["sop"])).center

    # the other series: its thumbnail selects it
    page.click(".series >> nth=1")
    page.wait_for_function("() => window.p2pViewer.frame && window.p2pViewer.frame.rows === 128")
    assert _canvas(page).std() > 20
    _shot(page, "viewer-chest")
    page.context.close()


def test_viewer_follows_a_study_while_it_arrives(browser: Any, env: Env) -> None:
    """Opened before any pixel has left the sender (consent pending), the viewer waits, then
    shows the first image as soon as instances are verified, without a reload."""
    offer = env.offer(consent="patient", destination=env.receiver.name)
    out = env.base / "incoming-live"
    job = env.receive(offer, out)
    page = _page(browser, env)
    page.goto(f"/viewer?job={job}")
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('Arriving: 0 of 20')"
    )
    assert page.evaluate("() => window.p2pFirstImageAt") is None
    assert page.locator(".series").count() == 2  # known from the manifest, nothing arrived
    assert page.locator(".series img").count() == 0
    assert not list(out.rglob("*.dcm"))

    # the patient approves on their phone: the study flows
    link = offer["consent"]["link"]
    verify = page.context.request.post(link + "/verify", data={"dob": BIRTH_DATE})
    assert verify.status == 200, verify.text()
    shown = verify.json()["destination"]  # the paired node, as the page shows it
    decision = page.context.request.post(
        link + "/decision",
        data={
            "decision": "approve",
            "verifier": verify.json()["verifier"],
            "shown_fingerprint": shown["fingerprint"],
        },
    )
    assert decision.status == 200, decision.text()

    page.wait_for_function("() => window.p2pFirstImageAt !== undefined")
    assert _canvas(page).std() > 20
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('Complete')"
    )
    assert page.locator(".series img").count() == 2
    page.context.close()


def test_viewer_of_an_unknown_transfer_says_so(browser: Any, env: Env) -> None:
    page = _page(browser, env)
    page.goto("/viewer?job=no-such-job")
    page.wait_for_selector("#notice:not([hidden])")
    assert "no transfer with this id" in page.text_content("#notice")
    page.goto("/viewer")
    page.wait_for_selector("#notice:not([hidden])")
    assert "/viewer?job=" in page.text_content("#notice")
    page.context.close()


def test_viewer_page_needs_a_signed_in_member_of_staff(env: Env) -> None:
    req = urllib.request.Request(env.receiver.url + "/viewer?job=x")
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(req, timeout=10)
    assert caught.value.code == 302
    assert caught.value.headers["Location"].startswith("/login?next=")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
