"""Benchmark: from the receive page's QR scan to the first image drawn in the viewer.

Run by hand (never from the test suite)::

    .venv/bin/python bench/first_image.py               # ~300 MB, 600-slice CT study
    .venv/bin/python bench/first_image.py --slices 60   # quick

Two real nodes on 127.0.0.1, Debian's Chromium (headless) with a fake camera playing a video of
the QR code the send page shows. The sending node imports the study through its API first (not
timed). Then, timed in the browser's clock: the receive page decodes the QR (``p2pScanAt``),
pairs, receives the manifest and the first verified instance, the "Open in the viewer" link
appears and is followed at once, and the viewer draws its first image (``p2pFirstImageAt``).
The target is under 2 seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pshare.dicom.synthetic import bench_series, generate_ct_study  # noqa: E402
from tests.web.conftest import (  # noqa: E402
    CHROMIUM,
    Node,
    new_page,
    qr_scene,
    sign_in,
    spawn,
    stop,
    write_y4m,
)

ABS = "performance.timeOrigin + "


def one_round(browser: Any, sender: Node, receiver: Node, camera: Path) -> dict[str, float]:
    send, recv = new_page(browser, sender), new_page(browser, receiver)
    try:
        sign_in(send, "tech", next_path="/send")
        send.wait_for_selector("#studies tbody tr")
        send.select_option("#consent", "none")
        send.click("#create")
        send.wait_for_function(
            "document.querySelector('#qr').complete && document.querySelector('#qr').naturalWidth"
        )
        write_y4m(qr_scene(send.locator("#qr").screenshot()), camera)
        sign_in(recv, "rad", next_path="/receive")
        clicked = recv.evaluate(ABS + "performance.now()")
        recv.click("#camera-start")
        recv.wait_for_selector("#viewer-link:not([hidden])", timeout=120_000)
        scanned = recv.evaluate(ABS + "window.p2pScanAt")
        job = recv.get_attribute("#transfer", "data-job")
        viewer = recv.context.new_page()
        viewer.goto(f"/viewer?job={job}")
        viewer.wait_for_function("window.p2pFirstImageAt !== undefined", timeout=120_000)
        first = viewer.evaluate(ABS + "window.p2pFirstImageAt")
        recv.wait_for_selector("#state.message.ok", timeout=300_000)
        return {
            "camera_to_scan_s": (scanned - clicked) / 1000,
            "scan_to_first_image_s": (first - scanned) / 1000,
        }
    finally:
        send.context.close()
        recv.context.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=600, help="CT slices (600 ≈ 300 MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="p2p-first-image-") as tmp:
        work = Path(tmp)
        study = work / "study"
        generate_ct_study(study, seed=1, series=bench_series(args.slices))
        size = sum(p.stat().st_size for p in study.rglob("*") if p.is_file())
        camera = work / "camera.y4m"
        from PIL import Image

        write_y4m(Image.new("RGB", (640, 360), (90, 90, 90)), camera, frames=2)
        sender = spawn("Bench Referring", work / "sender")
        receiver = spawn("Bench Trauma", work / "receiver")
        try:
            sender.add_user("tech", "sender")
            receiver.add_user("rad", "receiver")
            status, body, _ = sender.request(
                "POST",
                "/api/v1/studies/import",
                {"path": str(study)},
                {"Authorization": "Bearer " + sender.token},
            )
            assert status in (200, 201), body
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=CHROMIUM,
                    headless=True,
                    args=[
                        "--use-fake-ui-for-media-stream",
                        "--use-fake-device-for-media-stream",
                        f"--use-file-for-fake-video-capture={camera}",
                        "--no-sandbox",
                    ],
                )
                rounds = [one_round(browser, sender, receiver, camera) for _ in range(args.rounds)]
                browser.close()
        finally:
            stop(sender)
            stop(receiver)
    result = {
        "study_mb": round(size / 1e6, 1),
        "rounds": rounds,
        "median_scan_to_first_image_s": round(
            statistics.median(r["scan_to_first_image_s"] for r in rounds), 3
        ),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"study: {result['study_mb']} MB, {args.slices} slices")
        for i, r in enumerate(rounds, 1):
            print(
                f"round {i}: camera start → QR decoded {r['camera_to_scan_s']:.3f} s; "
                f"QR decoded → first image in the viewer {r['scan_to_first_image_s']:.3f} s"
            )
        print(f"median scan → first image: {result['median_scan_to_first_image_s']:.3f} s "
              f"(target < 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
