"""POST /api/v1/qr/decode on a real node: offers only, clear errors for everything else."""

from __future__ import annotations

import io

import pytest
import qrcode
from PIL import Image

from p2pshare import codes
from tests.web.conftest import Node

pytestmark = pytest.mark.e2e


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_decode(web_nodes: tuple[Node, Node]) -> None:
    _, receiver = web_nodes
    cookie, csrf = receiver.sign_in("rad")
    h = {"Cookie": cookie, "X-CSRF-Token": csrf, "Content-Type": "image/png"}
    uri = codes.QrOffer(
        "ab" * 16, b"s" * 20, "Mercy General ED", "AAAA-BBBB", 1_900_000_000, ("10.0.0.1:8700",)
    ).uri()
    status, body, _ = receiver.request(
        "POST", "/api/v1/qr/decode", headers=h, raw=png(qrcode.make(uri).get_image())
    )
    assert status == 200 and body["uri"] == uri
    assert (body["sender"], body["fingerprint"]) == ("Mercy General ED", "AAAA-BBBB")

    # A QR code that is not an offer is never handed on as a code.
    other = png(qrcode.make("https://example.org/phish").get_image())
    status, body, _ = receiver.request("POST", "/api/v1/qr/decode", headers=h, raw=other)
    assert (status, body["error"]) == (422, "not-p2pshare") and "uri" not in body

    blank = png(Image.new("L", (400, 300), 255))
    status, body, _ = receiver.request("POST", "/api/v1/qr/decode", headers=h, raw=blank)
    assert (status, body["error"]) == (422, "no-qr-code")
    assert body["message"].startswith("no QR code found")

    status, body, _ = receiver.request("POST", "/api/v1/qr/decode", headers=h, raw=b"")
    assert status == 400 and "picture" in body["message"]

    huge = b"\xff" * (13 * 1024 * 1024)
    status, body, _ = receiver.request("POST", "/api/v1/qr/decode", headers=h, raw=huge)
    assert status == 400 and "larger than 12 MB" in body["message"]
