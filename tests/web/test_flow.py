"""The whole staff flow in a real browser against two real nodes.

A technologist signs in on the referring node, uploads a study and creates an offer; at the
trauma centre a radiographer receives it three ways: scanning the QR with the (fake) camera,
uploading a photo of it, and typing the spoken code. Every transfer must complete with every
image verified; the transfers page and the audit trail must show it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from PIL import Image

from tests.web.conftest import (
    Node,
    new_page,
    qr_scene,
    screenshot,
    sign_in,
    write_y4m,
)

pytestmark = pytest.mark.e2e

QR_LOADED = "(q => q.complete && q.naturalWidth > 0)(document.querySelector('#qr'))"


def create_offer(page: Any, consent: str = "none") -> dict[str, str]:
    page.goto("/send")
    page.wait_for_selector("#studies tbody tr")
    page.select_option("#consent", consent)
    page.click("#create")
    page.wait_for_selector("#offer:not([hidden])")
    page.wait_for_function(QR_LOADED)
    code = page.get_attribute("#code", "data-code")
    return {"code": code or "", "address": page.inner_text("#address")}


def wait_received(page: Any) -> str:
    page.wait_for_selector("#state.message.ok", timeout=60_000)
    text = page.inner_text("#state")
    assert text.startswith("Received and verified"), text
    return str(page.get_attribute("#transfer", "data-job"))


def received_files(receiver: Node) -> int:
    return len(list((receiver.data_dir / "received").rglob("*.dcm")))


def test_send_and_receive_three_ways(
    browser: Any, web_nodes: tuple[Node, Node], web_study: Path, camera_file: Path
) -> None:
    sender, receiver = web_nodes
    send = new_page(browser, sender)
    recv = new_page(browser, receiver)

    # -- sign in, upload, offer --------------------------------------------------------------
    send.goto("/login")
    screenshot(send, "login")
    sign_in(send, "tech", next_path="/send")
    send.set_input_files("#files", str(web_study))
    send.click("#upload")
    send.wait_for_function(
        "document.querySelector('#upload-status').textContent.startsWith('Imported')"
    )
    assert "Imported 14 image(s) in 1 study" in send.inner_text("#upload-status")
    rows = send.locator("#studies tbody tr")
    assert rows.count() == 1 and "14" in rows.first.inner_text()

    offer = create_offer(send)
    # The QR on the page is the offer's: decode the pixels the browser drew.
    qr_png = send.locator("#qr").screenshot()
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(qr_png)).convert("L"))
    assert found and found[0].text.startswith("p2pshare://offer/")
    box = send.locator("#qr").bounding_box()
    assert box is not None and box["width"] >= 300 and box["height"] >= 300
    words = send.locator("#code .word").all_inner_texts()
    assert "-".join(words) == offer["code"] and len(words) == 5
    assert re.fullmatch(r"\d+:\d\d", send.inner_text("#countdown"))
    screenshot(send, "send-offer")

    # -- 1: scan the QR through the fake camera ----------------------------------------------
    write_y4m(qr_scene(qr_png), camera_file)
    sign_in(recv, "rad", next_path="/receive")
    screenshot(recv, "receive")
    recv.click("#camera-start")
    recv.wait_for_selector("#transfer:not([hidden])", timeout=30_000)
    job = wait_received(recv)
    assert recv.inner_text("#peer") == sender.name
    assert recv.inner_text("#peer-fp") == f"[{sender.info['fingerprint']}]"
    assert "14 images" in recv.inner_text("#study-counts")
    assert recv.locator("#series progress").count() == 2
    assert received_files(receiver) == 14
    screenshot(recv, "receive-complete")
    # The sender's page followed it to the receipt.
    send.wait_for_selector("#steps li[data-step=receipt].done")
    assert receiver.name in send.inner_text("#peer")
    assert "14 images" in send.inner_text("#receipt")
    screenshot(send, "send-complete")

    # -- 2: upload a photo of a new code -----------------------------------------------------
    send.click("#new-code")
    send.wait_for_selector("#steps li[data-step=waiting].now")
    send.wait_for_function(QR_LOADED)
    photo = camera_file.parent / "photo.jpg"
    qr_scene(send.locator("#qr").screenshot(), (1600, 1200)).save(photo, quality=85)
    recv.goto("/receive")
    recv.set_input_files("#photo", str(photo))
    wait_received(recv)
    assert received_files(receiver) == 28

    # -- 3: type the spoken code, as a person would ------------------------------------------
    offer = create_offer(send)
    typed = "  " + offer["code"].upper().replace("-", " ", 2) + " "
    recv.goto("/receive")
    recv.fill("#code", typed)
    recv.fill("#from", offer["address"])
    recv.click("#receive-code")
    wait_received(recv)
    assert received_files(receiver) == 42

    # -- the transfers page and the audit trail ----------------------------------------------
    recv.goto("/transfers")
    recv.wait_for_selector("#received tbody tr")
    texts = recv.locator("#received tbody tr").all_inner_texts()
    assert sum(sender.name in t and "complete" in t for t in texts) == 3, texts
    first = recv.locator("#received tbody tr").first
    assert "complete" in first.inner_text() and sender.name in first.inner_text()
    first.locator("button.details").click()
    recv.wait_for_selector(".audit-row table")
    assert "receipt-signed" in recv.inner_text(".audit-row")
    screenshot(recv, "transfers-received")
    send.goto("/transfers")
    send.wait_for_selector("#sent tbody tr")
    states = send.locator("#sent tbody tr td:nth-child(2)").all_inner_texts()
    assert states == ["completed"] * 3, states
    row = send.locator("#sent tbody tr").first
    row.locator("button.details").click()
    send.wait_for_selector(".audit-row")
    send.wait_for_selector(".audit-row table")
    audit_text = send.inner_text(".audit-row")
    assert "offer-created" in audit_text and "receipt-received" in audit_text
    screenshot(send, "transfers-sent")

    # -- the viewer: an image, and window/level changes it -------------------------------------
    recv.goto(f"/viewer?job={job}")
    recv.wait_for_function("window.p2pFirstImageAt !== undefined", timeout=30_000)
    before = canvas_pixels(recv)
    assert before["nonzero"] > 1000, before
    recv.click("[data-preset=lung]")
    recv.wait_for_timeout(300)
    after = canvas_pixels(recv)
    assert after["hash"] != before["hash"]
    screenshot(recv, "viewer-after-transfer")


def canvas_pixels(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => {
          const c = document.querySelector('canvas#image');
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let h = 0, nonzero = 0;
          for (let i = 0; i < d.length; i += 4) {
            h = (h * 31 + d[i] + d[i + 1] * 7 + d[i + 2] * 13) | 0;
            if (d[i] || d[i + 1] || d[i + 2]) nonzero++;
          }
          return {hash: h, nonzero};
        }"""
    )
