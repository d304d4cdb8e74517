"""Consent through the real CLI: the consent link the sender prints, break-glass, what the
receiver is shown."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from p2pshare.demo import NodeProc, approve_as_patient, tree_hashes
from tests.e2e.conftest import Cli

pytestmark = pytest.mark.e2e

REASON = "Patient intubated and sedated after a fall from height; CT needed by neurosurgery."


async def test_send_prints_a_consent_link_and_waits_for_the_patient(
    nodes: tuple[NodeProc, NodeProc], cli: Cli, study: Path, tmp_path: Path
) -> None:
    sender, receiver = nodes
    out = tmp_path / "in"
    send = await cli.start(
        "send", str(study), "--node", sender.url, "--data-dir", str(sender.data_dir),
        "--to", receiver.name, "--json",
    )  # fmt: skip
    offer = await cli.first_json(send, "offer")
    link = offer["consent"]["link"]
    assert offer["consent"]["policy"] == "patient" and link.startswith(sender.url + "/consent/")
    async with aiohttp.ClientSession() as http:
        await approve_as_patient(http, link, "19700101")
    received = await cli.receive_at(receiver, offer["code"], str(out), "--from", sender.address,
                                    as_json=False)  # fmt: skip
    sent = await cli.finish(send, seen=[offer])
    assert received.code == 0, received.stdout + received.stderr
    assert sent.code == 0, sent.stderr
    assert "Consent: authorised by the patient at " in received.stdout
    assert tree_hashes(out) == tree_hashes(study)
    kinds = [line["type"] for line in sent.lines]
    assert "consent-granted" in kinds


async def test_human_send_output_shows_the_consent_qr_and_link(
    cli: Cli, study: Path, tmp_path: Path
) -> None:
    send = await cli.start(
        "send", str(study), "--data-dir", str(tmp_path / "a"), "--name", "Ref", "--expires", "1m"
    )
    assert send.stdout is not None
    text = ""
    while "Consent link" not in text:
        line = await send.stdout.readline()
        assert line, "send ended before printing the consent link"
        text += line.decode()
    send.terminate()
    await send.wait()
    assert "PATIENT CONSENT" in text and "/consent/" in text
    assert text.count("█") > 200  # two QR codes: the offer and the consent link


async def test_break_glass_from_the_cli_is_refused_without_a_real_reason_then_shown_to_both(
    nodes: tuple[NodeProc, NodeProc], cli: Cli, study: Path, tmp_path: Path
) -> None:
    sender, receiver = nodes
    out = tmp_path / "in"
    send = await cli.start(
        "send", str(study), "--node", sender.url, "--data-dir", str(sender.data_dir),
        "--consent", "patient-or-break-glass", "--json",
    )  # fmt: skip
    offer = await cli.first_json(send, "offer")
    base = ["break-glass", offer["offer_id"], "--node", sender.url, "--data-dir",
            str(sender.data_dir), "--by", "ED consultant on call"]  # fmt: skip
    thin = await cli.run(*base, "--reason", "emergency")
    assert thin.code == 2 and "full sentence" in thin.stderr and "Traceback" not in thin.stderr
    ok = await cli.run(*base, "--reason", REASON)
    assert ok.code == 0, ok.stderr
    assert "BREAK-GLASS recorded" in ok.stdout
    received = await cli.receive_at(receiver, offer["uri"], str(out), as_json=False)
    sent = await cli.finish(send, seen=[offer])
    assert received.code == 0, received.stdout + received.stderr
    assert f"*** BREAK-GLASS by ED consultant on call: {REASON}" in received.stdout
    assert any(line["type"] == "break-glass" for line in sent.lines)
    assert sent.code == 0


async def test_break_glass_at_send_time_under_the_patient_policy_is_refused(
    cli: Cli, study: Path, tmp_path: Path
) -> None:
    res = await cli.run(
        "send", str(study), "--data-dir", str(tmp_path / "a"), "--name", "Ref",
        "--break-glass-by", "ED consultant", "--reason", REASON,
    )  # fmt: skip
    assert res.code == 2
    assert "patient-or-break-glass" in res.stderr and "Traceback" not in res.stderr
