"""The patient's phone page in real headless Chromium, against two real nodes on 127.0.0.1.

Wrong then right date of birth, approve → the study streams; decline → nothing is sent; revoke
mid-transfer → the stream stops and the receiving node reports it. Screenshots of the page at
360 px and 768 px go to docs/screenshots/ (the README points there).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc, approve_as_patient, spawn_node, stop_node, tree_hashes
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from tests.e2e.proxy import HoldProxy

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
DOB_WRONG, DOB_RIGHT = "1971-02-03", "1970-01-01"
PHONE = {"width": 360, "height": 740}
TABLET = {"width": 768, "height": 1024}

# scripts/setup.sh installs Debian's chromium; without it these tests fail, they never skip
assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run scripts/setup.sh"

from playwright.async_api import Browser, Page, async_playwright  # noqa: E402


@pytest.fixture(scope="module")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("consent-big")
    generate_ct_study(root, seed=61, series=[SeriesSpec("BODY", 40, 256, 256, 2.5, "chest")])
    return root


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            await b.close()


async def follow(api: NodeClient, job: str, sink: list[dict[str, Any]]) -> None:
    async for e in api.events(job):
        sink.append(e)


async def wait_for(sink: list[dict[str, Any]], event: str, timeout: float = 30.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            for e in sink:
                if e["event"] == event:
                    return e
            await asyncio.sleep(0.05)


async def phone_page(browser: Browser, link: str, viewport: dict[str, int]) -> Page:
    context = await browser.new_context(viewport=viewport, is_mobile=viewport is PHONE)
    page = await context.new_page()
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.goto(link)
    await page.wait_for_selector("#step-dob:not([hidden])")
    return page


async def fits_without_zoom(page: Page, width: int) -> None:
    scroll_width = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= width, f"the page is {scroll_width}px wide at a {width}px viewport"
    size = await page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")
    assert size >= 18, "large type: body text at least 18px"


async def test_wrong_then_right_birth_date_then_approve_streams_the_study(
    browser: Browser, nodes: tuple[NodeProc, NodeProc], tmp_path: Path, study: Path
) -> None:
    sender, receiver = nodes
    SHOTS.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "received"
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        offer = await s_api.create_offer(str(study), None, None)  # the node default: patient
        assert offer["consent"]["policy"] == "patient"
        r_events: list[dict[str, Any]] = []
        s_events: list[dict[str, Any]] = []
        job = await r_api.receive(offer["uri"], str(out), [])
        watchers = [
            asyncio.create_task(follow(r_api, job, r_events)),
            asyncio.create_task(follow(s_api, offer["offer_id"], s_events)),
        ]
        # Paired and told to wait: the receiver sees what is coming, but no image yet.
        await wait_for(r_events, "manifest")
        status = await wait_for(r_events, "status")
        assert status["state"] == "waiting-for-consent"

        page = await phone_page(browser, offer["consent"]["link"], PHONE)
        await fits_without_zoom(page, PHONE["width"])
        assert "Referring Hospital ED" in await page.inner_text("#intro")
        assert "Trauma Centre Radiology" in await page.inner_text("#intro")  # verified, paired
        await page.screenshot(path=str(SHOTS / "consent-360-dob.png"), full_page=True)

        await page.fill("#dob", DOB_WRONG)
        await page.click("#dob-submit")
        await page.wait_for_selector("#dob-error:not([hidden])")
        assert "4 tries left" in await page.inner_text("#dob-error")
        await wait_for(s_events, "consent-dob-mismatch")

        await page.fill("#dob", DOB_RIGHT)
        await page.click("#dob-submit")
        await page.wait_for_selector("#step-decide:not([hidden])")
        assert await page.inner_text("#study-images") == str(offer["study"]["instances"])
        assert "CT scan" in await page.inner_text("#study-modality")
        assert "identity" in await page.inner_text("#dest-full")  # the fingerprint is shown
        await fits_without_zoom(page, PHONE["width"])
        await page.screenshot(path=str(SHOTS / "consent-360-decide.png"), full_page=True)
        assert not [e for e in r_events if e["event"] == "progress" and e["bytes_received"]]

        await page.click("#approve")
        await page.wait_for_selector("#step-done:not([hidden])")
        assert "Approved at" in await page.inner_text("#done-title")
        await asyncio.wait_for(asyncio.gather(*watchers), 60)
        await page.wait_for_selector("text=Transfer complete", timeout=15000)
        await page.screenshot(path=str(SHOTS / "consent-360-done.png"), full_page=True)
        await page.context.close()

    kinds = [e["event"] for e in r_events]
    assert kinds[-1] == "complete", r_events[-1]
    consent = next(e for e in r_events if e["event"] == "consent")
    assert consent["text"] == "authorised by the patient" and consent["decision"] == "approved"
    assert kinds.index("consent") < kinds.index("first-instance")
    assert tree_hashes(study) == tree_hashes(out)


async def test_the_page_at_tablet_width_and_a_representative_approving(
    browser: Browser, nodes: tuple[NodeProc, NodeProc], tmp_path: Path, study: Path
) -> None:
    sender, _ = nodes
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        offer = await s_api.create_offer(
            str(study), None, None, destination="Trauma Centre Radiology"
        )
        page = await phone_page(browser, offer["consent"]["link"], TABLET)
        await fits_without_zoom(page, TABLET["width"])
        assert "(not yet connected)" in await page.inner_text("#intro")
        await page.screenshot(path=str(SHOTS / "consent-768-dob.png"), full_page=True)
        await page.fill("#dob", DOB_RIGHT)
        await page.click("#dob-submit")
        await page.wait_for_selector("#step-decide:not([hidden])")
        await page.check("input[value=representative]")
        await page.click("#approve")  # no name yet: refused with a plain message
        await page.wait_for_selector("#decide-error:not([hidden])")
        assert "related to the patient" in await page.inner_text("#decide-error")
        await page.fill("#rep-name", "Next of kin")
        await page.fill("#rep-rel", "husband")
        await page.screenshot(path=str(SHOTS / "consent-768-decide.png"), full_page=True)
        await page.click("#approve")
        await page.wait_for_selector("#step-done:not([hidden])")
        view = (await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}"))["consent"]
        assert view["state"] == "approved"
        assert view["decided_by"] == {
            "role": "representative",
            "name": "Next of kin",
            "relationship": "husband",
        }
        await page.context.close()


async def test_decline_sends_nothing_and_the_receiver_is_told(
    browser: Browser, nodes: tuple[NodeProc, NodeProc], tmp_path: Path, study: Path
) -> None:
    sender, receiver = nodes
    out = tmp_path / "received"
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        offer = await s_api.create_offer(str(study), None, None)
        r_events: list[dict[str, Any]] = []
        job = await r_api.receive(offer["code"], str(out), [sender.address])
        watcher = asyncio.create_task(follow(r_api, job, r_events))
        await wait_for(r_events, "manifest")
        page = await phone_page(browser, offer["consent"]["link"], PHONE)
        await page.fill("#dob", DOB_RIGHT)
        await page.click("#dob-submit")
        await page.wait_for_selector("#step-decide:not([hidden])")
        await page.click("#decline")
        await page.wait_for_selector("text=You declined")
        await asyncio.wait_for(watcher, 30)
        await page.context.close()
        offer_now = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
    err = r_events[-1]
    assert err["event"] == "error" and err["code"] == "consent-declined", err
    assert "declined" in err["message"] and "No images were received" in err["message"]
    assert not any(e["event"] in ("consent", "first-instance") for e in r_events)
    assert not list(out.rglob("*.dcm"))
    assert offer_now["state"] == "declined"


async def test_revoke_mid_transfer_stops_the_stream_and_the_receiver_reports_it(
    browser: Browser, tmp_path: Path, big_study: Path
) -> None:
    sender = await spawn_node(
        "Referring Hospital ED", tmp_path / "referring", extra_args=("--chunk-size", "65536")
    )
    receiver = await spawn_node("Trauma Centre Radiology", tmp_path / "trauma")
    proxy = HoldProxy(sender.port, hold_after=2_000_000)
    out = tmp_path / "received"
    try:
        via = await proxy.start()
        async with aiohttp.ClientSession() as http:
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            offer = await s_api.create_offer(
                str(big_study), None, None, destination="Trauma Centre Radiology"
            )
            page = await phone_page(browser, offer["consent"]["link"], PHONE)
            await page.fill("#dob", DOB_RIGHT)
            await page.click("#dob-submit")
            await page.wait_for_selector("#step-decide:not([hidden])")
            await page.click("#approve")
            await page.wait_for_selector("#revoke:not([hidden])")

            r_events: list[dict[str, Any]] = []
            s_events: list[dict[str, Any]] = []
            job = await r_api.receive(offer["code"], str(out), [via])
            watchers = [
                asyncio.create_task(follow(r_api, job, r_events)),
                asyncio.create_task(follow(s_api, offer["offer_id"], s_events)),
            ]
            await asyncio.wait_for(proxy.held.wait(), 30)  # images are flowing
            await page.click("#revoke")
            await page.wait_for_selector("text=You stopped the transfer")
            proxy.release()
            await asyncio.wait_for(asyncio.gather(*watchers), 30)
            await page.context.close()
    finally:
        await proxy.close()
        await stop_node(receiver)
        await stop_node(sender)
    err = r_events[-1]
    assert err["event"] == "error" and err["code"] == "consent-revoked", err
    assert "revoked" in err["message"] and "incomplete" in err["message"]
    assert any(e["event"] == "consent" for e in r_events)
    s_err = s_events[-1]
    assert s_err["event"] == "error" and s_err["code"] == "consent-revoked"
    total = len(list(big_study.rglob("*.dcm")))
    assert len(list(out.rglob("*.dcm"))) < total  # the stream stopped before the end


async def test_a_patient_who_takes_longer_than_the_idle_timeout_does_not_break_the_transfer(
    tmp_path: Path, study: Path
) -> None:
    """Both nodes time out silent peers after 2 s; the patient decides after 5 s."""
    idle = ("--idle-timeout", "2")
    sender = await spawn_node("Referring Hospital ED", tmp_path / "referring", extra_args=idle)
    receiver = await spawn_node("Trauma Centre Radiology", tmp_path / "trauma", extra_args=idle)
    out = tmp_path / "received"
    try:
        async with aiohttp.ClientSession() as http:
            s_api = NodeClient(sender.url, sender.token, http)
            r_api = NodeClient(receiver.url, receiver.token, http)
            offer = await s_api.create_offer(str(study), None, None)
            r_events: list[dict[str, Any]] = []
            job = await r_api.receive(offer["uri"], str(out), [])
            watcher = asyncio.create_task(follow(r_api, job, r_events))
            await wait_for(r_events, "status")
            await asyncio.sleep(5)  # longer than the idle timeout on both sides
            assert not any(e["event"] == "error" for e in r_events), r_events
            await approve_as_patient(http, offer["consent"]["link"], DOB_RIGHT)
            await asyncio.wait_for(watcher, 60)
    finally:
        await stop_node(receiver)
        await stop_node(sender)
    assert r_events[-1]["event"] == "complete", r_events[-1]
    assert tree_hashes(study) == tree_hashes(out)
