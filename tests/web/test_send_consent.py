"""The send page with the patient's consent: the consent QR next to the study, the patient's
phone approving from it, and the page following consent to the receipt (real browser, real
nodes)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from PIL import Image

from tests.web.conftest import Node, new_page, screenshot, sign_in

pytestmark = pytest.mark.e2e

BIRTH_DATE = "1970-01-01"  # the synthetic study's PatientBirthDate


def ensure_study(page: Any, study_zip: Path) -> None:
    page.goto("/send")
    page.wait_for_selector("#studies tbody tr, #no-studies:not([hidden])")
    if page.locator("#studies tbody tr").count() == 0:
        page.set_input_files("#files", str(study_zip))
        page.click("#upload")
        page.wait_for_selector("#studies tbody tr")


def test_the_patient_approves_from_the_qr_on_the_send_page(
    browser: Any, web_nodes: tuple[Node, Node], web_study: Path
) -> None:
    sender, receiver = web_nodes
    send = new_page(browser, sender)
    recv = new_page(browser, receiver)
    sign_in(send, "tech", next_path="/send")
    ensure_study(send, web_study)
    send.select_option("#consent", "patient")
    send.fill("#destination", receiver.name)
    send.click("#create")
    send.wait_for_selector("#consent-link-box:not([hidden])")
    send.wait_for_function(
        "(q => q.complete && q.naturalWidth > 0)(document.querySelector('#consent-qr'))"
    )
    assert "waiting" in send.inner_text("#consent-state").lower() or "pending" in (
        send.inner_text("#consent-state").lower()
    )
    screenshot(send, "send-consent-pending")

    # the patient's phone scans the consent QR the staff screen shows
    qr_png = send.locator("#consent-qr").screenshot()
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(qr_png)).convert("L"))
    assert found, "the consent QR on the send page does not decode"
    link = found[0].text
    assert link == send.get_attribute("#consent-link", "href")
    assert link.startswith(sender.url + "/consent/")
    phone_ctx = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    phone = phone_ctx.new_page()
    phone.goto(link)
    phone.fill("#dob", BIRTH_DATE)
    phone.click("#dob-submit")
    phone.wait_for_selector("#step-decide:not([hidden])")
    assert receiver.name in phone.inner_text("#intro")
    phone.click("#approve")
    phone.wait_for_selector("#step-done:not([hidden])")
    send.wait_for_function(
        "document.querySelector('#consent-step').textContent.includes('pending') === false"
        " && document.querySelector('#consent-state').textContent.length > 0"
    )

    # the trauma centre types the code; the images flow only now, and arrive verified
    code = send.get_attribute("#code", "data-code") or ""
    sign_in(recv, "rad", next_path="/receive")
    recv.fill("#code", code)
    recv.fill("#from", send.inner_text("#address"))
    recv.click("#receive-code")
    recv.wait_for_selector("#state.message.ok", timeout=60_000)
    assert recv.inner_text("#state").startswith("Received and verified")
    # the receiving staff see who authorised it, from the signed consent record
    assert recv.inner_text("#consent-line").startswith("Consent: authorised by the patient at ")
    send.wait_for_selector("#steps li[data-step=receipt].done")
    assert "approved" in send.inner_text("#consent-state").lower() or "patient" in (
        send.inner_text("#consent-state").lower()
    )
    screenshot(send, "send-consent-complete")
    phone_ctx.close()
