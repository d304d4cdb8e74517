"""The real CLI as subprocesses: send/receive with temporary nodes and against `serve` nodes."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import aiohttp

from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc, spawn_node, stop_node, tree_hashes

from .conftest import Cli


def received_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and ".p2pshare-partial" not in p.parts)


async def test_send_and_receive_with_spoken_code_between_temporary_nodes(
    cli: Cli, study: Path, tmp_path: Path
) -> None:
    out = tmp_path / "received"
    sender = await cli.start(
        "send", "--consent", "none",
        str(study),
        "--json",
        "--data-dir",
        str(tmp_path / "a"),
        "--name",
        "Referring Hospital ED",
        "--qr-png",
        str(tmp_path / "offer.png"),
        "--qr-svg",
        str(tmp_path / "offer.svg"),
    )
    offer = await cli.first_json(sender, "offer")
    assert offer["code"].split("-")[0].isdigit() and len(offer["code"].split("-")) == 5
    assert offer["uri"].startswith("p2pshare://offer/") and "#" in offer["uri"]
    assert (tmp_path / "offer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "offer.svg").read_bytes()

    received = await cli.run(
        "receive",
        offer["code"],
        "--from",
        offer["addresses"][0],
        "--out",
        str(out),
        "--json",
        "--data-dir",
        str(tmp_path / "b"),
        "--name",
        "Trauma Centre Radiology",
    )
    sent = await cli.finish(sender, seen=[offer])

    assert received.code == 0, received.stderr + received.stdout
    assert sent.code == 0, sent.stderr + sent.stdout
    # byte for byte, every instance, stored under UID-derived names
    assert tree_hashes(out) == tree_hashes(study)
    for f in received_files(out):
        assert f.suffix == ".dcm" and all(c.isdigit() or c == "." for c in f.stem)
    # each side saw which institution was on the other end
    paired_r = received.events("paired")[0]
    assert paired_r["peer"] == "Referring Hospital ED"
    assert paired_r["fingerprint"] == offer["fingerprint"]
    assert sent.events("paired")[0]["peer"] == "Trauma Centre Radiology"
    # the sender stored and printed the same signed receipt the receiver produced
    r_receipt = received.events("complete")[0]["receipt"]
    assert sent.events("complete")[0]["receipt"] == r_receipt
    assert r_receipt["instances"] == 20
    manifest = received.events("manifest")[0]
    assert manifest["instances"] == 20 and len(manifest["series"]) == 2
    # nothing left in staging
    assert not (out / ".p2pshare-partial").exists()


async def test_qr_uri_through_running_nodes(
    nodes: tuple[NodeProc, NodeProc], cli: Cli, study: Path, tmp_path: Path
) -> None:
    sender, receiver = nodes
    out = tmp_path / "in"
    send = await cli.start(
        "send", "--consent", "none", str(study), "--node", sender.url, "--data-dir", str(sender.data_dir), "--json"
    )
    offer = await cli.first_json(send, "offer")
    received = await cli.receive_at(receiver, offer["uri"], str(out))
    sent = await cli.finish(send, seen=[offer])
    assert received.code == 0, received.stdout + received.stderr
    assert sent.code == 0
    assert tree_hashes(out) == tree_hashes(study)
    # the offer is now used: the same link gets a clear refusal and writes nothing
    again = await cli.receive_at(receiver, offer["uri"], str(tmp_path / "again"))
    assert again.code == 2
    err = again.events("error")[-1]
    assert "already been used" in err["message"]
    assert not received_files(tmp_path / "again") if (tmp_path / "again").exists() else True


async def test_wrong_codes_are_counted_and_burn_the_offer(
    nodes: tuple[NodeProc, NodeProc], study: Path, tmp_path: Path
) -> None:
    sender, receiver = nodes
    out = tmp_path / "out"
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        offer = await s_api.create_offer(str(study), None, None, consent="none")
        number, *words = offer["code"].split("-")
        wrong = (
            "-".join([number, *reversed(words)])
            if words[0] != words[-1]
            else f"{number}-aardvark-asparagus-cinnamon-dominoes"
        )
        messages = []
        for _ in range(3):
            job = await r_api.receive(wrong, str(out), [sender.address])
            events = [e async for e in r_api.events(job)]
            assert events[-1]["event"] == "error"
            messages.append(events[-1]["message"])
            assert not any(e["event"] in ("manifest", "paired") for e in events)
        assert messages[0].startswith("code not accepted (2 tries left)")
        assert messages[1].startswith("code not accepted (1 try left)")
        assert "no tries left" in messages[2]
        # now even the right code is refused: the offer is burnt
        job = await r_api.receive(offer["code"], str(out), [sender.address])
        events = [e async for e in r_api.events(job)]
        assert "burnt" in events[-1]["message"]
        state = (await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}"))["state"]
        assert state == "burnt"
        # the sending side is told too, and its job ends (a waiting `send` exits)
        sent = [e async for e in s_api.events(offer["offer_id"])]
        assert [e["tries_left"] for e in sent if e["event"] == "wrong-code"] == [2, 1]
        assert sent[-1]["event"] == "error" and sent[-1]["code"] == "offer-burnt"
    assert not out.exists() or not received_files(out)


async def test_expired_offer_is_refused(
    nodes: tuple[NodeProc, NodeProc], study: Path, tmp_path: Path
) -> None:
    sender, receiver = nodes
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        offer = await s_api.create_offer(str(study), None, 1, consent="none")
        await asyncio.sleep(1.5)
        job = await r_api.receive(offer["code"], str(tmp_path / "o"), [sender.address])
        events = [e async for e in r_api.events(job)]
    assert events[-1]["event"] == "error"
    assert events[-1]["code"] == "offer-unavailable"
    assert "expired" in events[-1]["message"]


async def test_changed_identity_of_a_pinned_sender_is_refused_until_forgotten(
    cli: Cli, study: Path, tmp_path: Path
) -> None:
    trauma = await spawn_node("Trauma Centre Radiology", tmp_path / "trauma")
    try:
        for attempt in range(3):
            sender = await spawn_node("Referring Hospital ED", tmp_path / f"referring-{attempt}")
            try:
                send = await cli.start(
                    "send", "--consent", "none",
                    str(study),
                    "--node",
                    sender.url,
                    "--data-dir",
                    str(sender.data_dir),
                    "--json",
                )
                offer = await cli.first_json(send, "offer")
                got = await cli.receive_at(
                    trauma,
                    offer["code"],
                    str(tmp_path / f"out-{attempt}"),
                    "--from",
                    sender.address,
                )
                if send.returncode is None:
                    send.kill()
                await send.wait()
            finally:
                await stop_node(sender)
            if attempt == 0:
                assert got.code == 0, got.stdout
            elif attempt == 1:
                # same name, new key (a different data directory): refused loudly
                assert got.code == 1
                msg = got.events("error")[-1]["message"]
                assert "pinned" in msg and "p2pshare peers forget" in msg
                assert not (tmp_path / "out-1").exists() or not received_files(tmp_path / "out-1")
                forgot = await cli.run(
                    "peers",
                    "forget",
                    "Referring Hospital ED",
                    "--node",
                    trauma.url,
                    "--data-dir",
                    str(trauma.data_dir),
                )
                assert forgot.code == 0, forgot.stderr
            else:
                assert got.code == 0, got.stdout
    finally:
        await stop_node(trauma)


async def test_several_studies_need_a_choice(cli: Cli, study: Path, tmp_path: Path) -> None:
    from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study

    both = tmp_path / "both"
    shutil.copytree(study, both / "one")
    generate_ct_study(
        both / "two", seed=99, series=[SeriesSpec("Spine", slices=3, rows=32, columns=32)]
    )
    (both / "notes.txt").write_text("not an image")
    res = await cli.run(
        "send", "--consent", "none", str(both), "--json", "--data-dir", str(tmp_path / "a"), "--name", "Ref"
    )
    assert res.code == 2
    err = res.events("error")[0]
    assert err["code"] == "study-choice" and len(err["studies"]) == 2


async def test_not_dicom_input_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hello")
    (junk / "empty.dcm").write_bytes(b"")
    t = time.monotonic()
    res = await cli.run("send", "--consent", "none", str(junk), "--data-dir", str(tmp_path / "a"), "--name", "Ref")
    assert res.code == 2
    assert "Error:" in res.stderr and "Traceback" not in res.stderr
    assert time.monotonic() - t < 60
    missing = await cli.run(
        "send", "--consent", "none", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "a"), "--name", "Ref"
    )
    assert missing.code == 2 and "Traceback" not in missing.stderr


async def test_garbled_code_is_explained_without_traceback(cli: Cli, tmp_path: Path) -> None:
    res = await cli.run(
        "receive",
        "seven-alpha",
        "--from",
        "127.0.0.1:9",
        "--out",
        str(tmp_path / "o"),
        "--data-dir",
        str(tmp_path / "b"),
        "--name",
        "T",
    )
    assert res.code == 2
    assert "offer number" in res.stderr and "Traceback" not in res.stderr
    unreachable = await cli.run(
        "receive",
        "3-aardvark-asparagus-cinnamon-dominoes",
        "--from",
        "127.0.0.1:9",
        "--out",
        str(tmp_path / "o"),
        "--data-dir",
        str(tmp_path / "b"),
        "--name",
        "T",
    )
    assert unreachable.code != 0
    assert "could not reach" in unreachable.stderr + unreachable.stdout
    assert "Traceback" not in unreachable.stderr


async def test_api_needs_the_token(nodes: tuple[NodeProc, NodeProc]) -> None:
    sender, _ = nodes
    async with aiohttp.ClientSession() as http:
        for method, path in [
            ("GET", "/api/v1/offers"),
            ("POST", "/api/v1/offers"),
            ("POST", "/api/v1/receive"),
            ("GET", "/api/v1/peers"),
            ("GET", "/api/v1/jobs/x/events"),
        ]:
            async with http.request(method, sender.url + path, json={}) as r:
                assert r.status == 401, path
            async with http.request(
                method, sender.url + path, json={}, headers={"Authorization": "Bearer wrong"}
            ) as r:
                assert r.status == 401, path
        async with http.get(sender.url + "/api/v1/info") as r:
            assert r.status == 200 and (await r.json())["name"] == "Referring Hospital ED"


async def test_offer_survives_a_restart_of_the_sending_node(
    cli: Cli, study: Path, tmp_path: Path
) -> None:
    sender = await spawn_node("Referring Hospital ED", tmp_path / "referring")
    async with aiohttp.ClientSession() as http:
        offer = await NodeClient(sender.url, sender.token, http).create_offer(
            str(study), None, None, consent="none"
        )
    await stop_node(sender)
    # same data directory (a new port here): the waiting offer is still there after the restart
    restarted = await spawn_node("Referring Hospital ED", tmp_path / "referring")
    try:
        got = await cli.run(
            "receive",
            offer["code"],
            "--from",
            restarted.address,
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--data-dir",
            str(tmp_path / "trauma"),
            "--name",
            "Trauma Centre Radiology",
        )
        assert got.code == 0, got.stdout + got.stderr
        assert tree_hashes(tmp_path / "out") == tree_hashes(study)
        assert got.events("paired")[0]["fingerprint"] == offer["fingerprint"]
    finally:
        await stop_node(restarted)


async def test_demo_runs_end_to_end(cli: Cli, tmp_path: Path) -> None:
    res = await cli.run("demo", "--json", "--workdir", str(tmp_path / "demo"), timeout=180)
    assert res.code == 0, res.stdout + res.stderr
    result = res.events("result")[0]
    assert result["verified"] is True
    assert result["instances"] > 50
    assert result["mb_per_s"] > 0 and result["pairing_s"] > 0
    assert all(v > 0 for v in result["peak_rss_mb"].values())
    received = tmp_path / "demo" / "received"
    assert tree_hashes(received) == tree_hashes(tmp_path / "demo" / "study")


async def test_logs_hold_no_code_or_patient_name_and_audit_chain_holds(
    nodes: tuple[NodeProc, NodeProc], cli: Cli, study: Path, tmp_path: Path
) -> None:
    """Operator logs never carry codes, secrets or patient names; every step is audited."""
    import pydicom

    from p2pshare.store import Store

    sender, receiver = nodes
    first = next(p for p in sorted(study.rglob("*.dcm")))
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    patient_name, patient_id = str(ds.PatientName), str(ds.PatientID)
    send = await cli.start(
        "send", "--consent", "none", str(study), "--node", sender.url, "--data-dir", str(sender.data_dir), "--json"
    )
    offer = await cli.first_json(send, "offer")
    number, *words = offer["code"].split("-")
    wrong = "-".join([number, *reversed(words)])
    bad = await cli.receive_at(receiver, wrong, str(tmp_path / "o"), "--from", sender.address)
    assert bad.code == 2
    good = await cli.receive_at(
        receiver, offer["code"], str(tmp_path / "o"), "--from", sender.address
    )
    assert good.code == 0, good.stdout
    assert (await cli.finish(send, seen=[offer])).code == 0

    secret = offer["uri"].split("#", 1)[1]
    for node in (sender, receiver):
        text = node.log_path.read_text()
        assert "manifest" in text  # the node did log its work…
        for needle in [patient_name, patient_name.replace("^", " "), patient_id, secret, *words]:
            assert needle not in text, f"{needle!r} leaked into {node.name}'s log"

    s_store, r_store = Store(sender.data_dir), Store(receiver.data_dir)
    try:
        s_actions = [(r["action"], r["outcome"]) for r in s_store.audit.records()]
        r_actions = [(r["action"], r["outcome"]) for r in r_store.audit.records()]
        assert s_store.audit.verify().ok and r_store.audit.verify().ok
        for step in [
            ("offer-created", "ok"),
            ("pairing-attempt", "wrong-code"),
            ("pairing-attempt", "ok"),
            ("transfer-started", "ok"),
            ("receipt-received", "ok"),
        ]:
            assert step in s_actions, step
        for step in [("pairing", "ok"), ("transfer-started", "ok"), ("receipt-signed", "ok")]:
            assert step in r_actions, step
        for rec in s_store.audit.records() + r_store.audit.records():
            flat = str(rec)
            assert patient_name not in flat and secret not in flat and words[0] not in flat
    finally:
        s_store.close()
        r_store.close()


async def test_spoken_code_can_name_a_known_institution_instead_of_an_address(
    nodes: tuple[NodeProc, NodeProc], cli: Cli, study: Path, tmp_path: Path
) -> None:
    sender, receiver = nodes
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        # unknown yet: a clear refusal, nothing started
        unknown = await cli.receive_at(
            receiver,
            "97-aardvark-asparagus-cinnamon-dominoes",  # a number no offer of this node has
            str(tmp_path / "x"),
            "--from",
            "Referring Hospital ED",
            as_json=False,
        )
        # not pinned yet: refused as unknown, or, once the node has seen it on the LAN (mDNS,
        # a matter of timing), asked there and refused because it holds no such offer
        said = unknown.stdout + unknown.stderr
        assert unknown.code == 2, said
        assert (
            "neither host:port nor a known institution" in said
            or "no offer with this number" in said
        ), said
        first = await s_api.create_offer(str(study), None, None, consent="none")
        job = await r_api.receive(first["code"], str(tmp_path / "one"), [sender.address])
        assert [e async for e in r_api.events(job)][-1]["event"] == "complete"
        # second time, the name is enough: its last address was remembered with the pin
        second = await s_api.create_offer(str(study), None, None, consent="none")
        got = await cli.receive_at(
            receiver, second["code"], str(tmp_path / "two"), "--from", "Referring Hospital ED"
        )
        assert got.code == 0, got.stdout + got.stderr
        assert tree_hashes(tmp_path / "two") == tree_hashes(study)


async def test_a_qr_code_only_pairs_with_the_node_whose_fingerprint_it_carries(
    nodes: tuple[NodeProc, NodeProc], cli: Cli, study: Path, tmp_path: Path
) -> None:
    from urllib.parse import parse_qs, urlencode, urlsplit

    sender, receiver = nodes
    send = await cli.start(
        "send", "--consent", "none", str(study), "--node", sender.url, "--data-dir", str(sender.data_dir), "--json"
    )
    offer = await cli.first_json(send, "offer")
    parts = urlsplit(offer["uri"])
    query = parse_qs(parts.query)
    query["fp"] = ["AAAA-AAAA-AAAA-AAAA-AAAA-AAAA"]  # a QR printed for another node
    forged = parts._replace(query=urlencode(query, doseq=True)).geturl()
    got = await cli.receive_at(receiver, forged, str(tmp_path / "out"))
    assert got.code == 1
    assert "is not the one in the QR code" in got.events("error")[-1]["message"]
    assert not (tmp_path / "out").exists() or not received_files(tmp_path / "out")
    # the offer itself is untouched: the genuine QR code still works
    ok = await cli.receive_at(receiver, offer["uri"], str(tmp_path / "out2"))
    assert ok.code == 0, ok.stdout
    assert (await cli.finish(send, seen=[offer])).code == 0
