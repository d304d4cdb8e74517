"""A man in the middle between two real nodes: every tampering is detected, nothing leaks.

The receiving node is told the proxy's address instead of the sender's; the proxy (see
``proxy.py``) flips, drops, replays, reorders, cuts or re-frames one message of the sender's
stream. For each attack the receive job must end in a clear error naming the cause (and the
instance, where the protocol can know it), the sender must hold no receipt, and the
destination must hold only files that verified — exactly the instances before the attacked
one. Then the same proxy, disarmed, carries a normal transfer byte for byte, which proves the
proxy itself is faithful, and that the stream it saw was ciphertext only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
import pytest_asyncio

from p2pshare import digest as file_digest
from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc, spawn_node, stop_node, tree_hashes, two_nodes
from p2pshare.dicom.ingest import scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.manifest import Manifest

from .conftest import NAMES, Cli
from .proxy import (
    CHUNK_FRAME,
    CUT,
    DROP,
    FLIP,
    LENGTH,
    OFF_CHUNK_INDEX,
    OFF_FILE_INDEX,
    OFF_FLAGS,
    PROTO_HEADER,
    REORDER,
    REPLAY,
    Attack,
    MitmProxy,
)

# One pair of real nodes (and one 4 KiB-chunk sender) serves every test of this module: each
# test makes its own offers, and each attack is followed by a clean run through the same proxy,
# which also shows that the nodes keep working after an attack.
pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

PATIENT_NAME = "MITM^PROBE PATIENT"
PATIENT_ID = "MITM-4711"
SMALL_CHUNK = 4096  # the smallest chunk size a manifest may use
#: every 128x128 slice is ~33 kB: one chunk per file at the default 1 MiB, ~9 at 4 KiB
CHUNK_MESSAGE = 16 * 1024  # larger than any handshake message of this study, smaller than a chunk
ATTACKED = 6  # the file index the attacks aim at (0-based, in manifest order)


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mitm_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty one-slice 128x128 series (20 files), with a recognisable patient.

    One slice per series keeps the stream order (the middle slice of every series first, then
    the series in order) equal to manifest order, so "the 7th chunk message" is file #6.
    """
    root = tmp_path_factory.mktemp("mitm-study")
    generate_ct_study(
        root,
        seed=4711,
        series=[
            SeriesSpec(f"S{i:02d}", slices=1, rows=128, columns=128, region=region)
            for i, region in enumerate(["head", "chest"] * 10)
        ],
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
    )
    return root


def manifest_of(study: Path, chunk_size: int = 1024 * 1024) -> Manifest:
    """The manifest a node builds for ``study`` (same scanner, same order)."""
    return scan(study, chunk_size=chunk_size).study(None).manifest


def digest(path: Path) -> str:
    return file_digest.of_file(path)


def destination_files(out: Path) -> list[Path]:
    """Every regular file below ``out`` outside the staging folder."""
    if not out.exists():
        return []
    return sorted(
        p
        for p in out.rglob("*")
        if p.is_file() and ".p2pshare-partial" not in p.relative_to(out).parts
    )


def assert_only_verified(out: Path, manifest: Manifest, expected_placed: int) -> None:
    """The destination holds exactly the first ``expected_placed`` instances, each intact."""
    by_path = {out / inst.relpath(manifest.study_instance_uid): inst for inst in manifest.instances}
    files = destination_files(out)
    for f in files:
        assert f.suffix == ".dcm", f"{f} is not a verified instance (a staged .part escaped?)"
        assert f in by_path, f"{f} is not named after an instance of the manifest"
        assert digest(f) == by_path[f].digest, f"{f} differs from the original"
    assert len(files) < len(manifest.instances)
    placed = {f.relative_to(out).as_posix() for f in files}
    expected = {
        inst.relpath(manifest.study_instance_uid) for inst in manifest.instances[:expected_placed]
    }
    assert placed == expected
    # whatever was staged stays in the staging folder
    assert not any(p.suffix == ".part" for p in files)


@dataclass
class Run:
    offer: dict[str, Any]
    events: list[dict[str, Any]]  # the receiving job's
    sender_events: list[dict[str, Any]]  # the offer's job on the sending node
    sender_view: dict[str, Any]  # GET /api/v1/offers/{id} with the sender's token
    job: str = ""  # the receiving job's id

    @property
    def result(self) -> dict[str, Any]:
        return self.events[-1]


async def _collect(it: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e async for e in it]


async def sender_outcome(
    s_api: NodeClient, offer_id: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Wait for the offer's job on the sending node to end (or to wait for a resume, after a
    cut); then read the offer back."""

    async def until_settled() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async for e in s_api.events(offer_id):
            out.append(e)
            if e["event"] == "interrupted":
                break
        return out

    events = await asyncio.wait_for(until_settled(), 30)
    view = await s_api._call("GET", f"/api/v1/offers/{offer_id}")
    return events, view


async def offer_and_receive(
    sender: NodeProc, receiver: NodeProc, study: Path, out: Path, via: str
) -> Run:
    """Offer ``study`` on ``sender``; ``receiver`` fetches it with the spoken code from ``via``."""
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        offer = await s_api.create_offer(str(study), None, None, consent="none")
        job = await r_api.receive(offer["code"], str(out), [via])
        events = await asyncio.wait_for(_collect(r_api.events(job)), 60)
        s_events, view = await sender_outcome(s_api, offer["offer_id"])
    return Run(offer, events, s_events, view, job)


def assert_no_receipt(view: dict[str, Any], sender_events: list[dict[str, Any]]) -> None:
    # failed, or (after a cut) interrupted: waiting for the receiver to resume
    assert view["state"] in ("failed", "interrupted"), view
    assert view["receipt"] is None
    assert view["error"]
    assert sender_events[-1]["event"] in ("error", "interrupted")
    assert not any(e["event"] == "complete" for e in sender_events)


async def assert_control_run(
    proxy: MitmProxy, sender: NodeProc, receiver: NodeProc, study: Path, out: Path
) -> Run:
    """The same proxy, disarmed: a normal transfer arrives byte for byte, with a receipt."""
    await proxy.wait_idle()
    proxy.reset(None)
    run = await offer_and_receive(sender, receiver, study, out, proxy.address)
    assert run.result["event"] == "complete", run.result
    assert tree_hashes(out) == tree_hashes(study)
    assert not (out / ".p2pshare-partial").exists()
    assert run.sender_view["state"] == "completed"
    assert run.sender_view["receipt"] == run.result["receipt"]
    assert proxy.connections == 1 and not proxy.applied and not proxy.errors
    return run


async def spawn_chunked_node(name: str, data_dir: Path, chunk_size: int) -> NodeProc:
    """A real `p2pshare serve` process with a small chunk size, so files span several chunks."""
    return await spawn_node(name, data_dir, extra_args=("--chunk-size", str(chunk_size)))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[NodeProc, NodeProc]]:
    """A referring hospital's node and a trauma centre's node (`p2pshare serve`)."""
    # A cut here must end the receive (these tests check what is kept and said); reconnecting
    # after a cut has its own tests (test_resume.py).
    async with two_nodes(
        tmp_path_factory.mktemp("mitm-nodes"),
        *NAMES,
        receiver_args=("--reconnect-attempts", "0"),
    ) as nodes:
        yield nodes


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chunked_sender(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NodeProc]:
    root = tmp_path_factory.mktemp("mitm-chunked")
    node = await spawn_chunked_node("Referring Hospital ED (4k)", root / "chunked", SMALL_CHUNK)
    try:
        yield node
    finally:
        await stop_node(node)


# -- the untampered run: faithful proxy, ciphertext only ------------------------------------


def _secrets(study: Path, manifest: Manifest) -> dict[str, bytes]:
    """What must never cross the wire in clear, read from the original files."""
    first = manifest.instances[0]
    first_path = next(
        p for p in study.rglob("*.dcm") if digest(p) == first.digest
    )  # the manifest's first file
    ds = pydicom.dcmread(first_path)
    assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID
    secrets = {
        "patient name": str(ds.PatientName).encode(),
        "patient id": str(ds.PatientID).encode(),
        "study uid": str(ds.StudyInstanceUID).encode(),
    }
    for inst in manifest.instances:
        secrets[f"series uid {inst.series_instance_uid}"] = inst.series_instance_uid.encode()
        secrets[f"sop uid {inst.sop_instance_uid}"] = inst.sop_instance_uid.encode()
    pixels = bytes(ds.PixelData)
    for at in (len(pixels) // 3, len(pixels) // 2, (2 * len(pixels)) // 3):
        run = pixels[at : at + 64]
        assert len(set(run)) > 8  # a varied run, not a stretch of air
        secrets[f"pixel data @{at}"] = run
    # the probes are real: each one is in the original file
    raw = first_path.read_bytes()
    for name in ("patient name", "patient id", "study uid", f"sop uid {first.sop_instance_uid}"):
        assert secrets[name] in raw
    assert all(secrets[k] in raw for k in secrets if k.startswith("pixel"))
    return secrets


async def test_untampered_proxy_is_faithful_and_sees_only_ciphertext(
    pair: tuple[NodeProc, NodeProc], mitm_study: Path, tmp_path: Path
) -> None:
    sender, receiver = pair
    manifest = manifest_of(mitm_study)
    async with MitmProxy(sender.port) as proxy:
        run = await assert_control_run(proxy, sender, receiver, mitm_study, tmp_path / "out")
        await proxy.wait_idle()
    assert run.result["instances"] == 20
    assert run.events[0]["event"] == "connecting"
    assert run.events[0]["addresses"] == [proxy.address]
    paired = next(e for e in run.events if e["event"] == "paired")
    assert paired["peer"] == sender.name and paired["address"] == proxy.address

    # the proxy saw the whole transfer: 20 chunk messages, at least the study's bytes
    chunks = [m for m in proxy.s2r_messages if len(m) > 4 and m[4] == CHUNK_FRAME]
    assert len(chunks) == 20
    assert all(len(m) >= CHUNK_MESSAGE for m in chunks)
    assert all(len(m) < CHUNK_MESSAGE for m in proxy.s2r_messages if m not in chunks)
    assert proxy.bytes_s2r == len(proxy.s2r_raw) > manifest.total_bytes
    assert proxy.bytes_r2s > 0 and proxy.r2s_messages

    s2r = bytes(proxy.s2r_raw)
    r2s = b"".join(proxy.r2s_messages)
    for name, secret in _secrets(mitm_study, manifest).items():
        assert secret not in s2r, f"{name} crossed the wire in clear (sender to receiver)"
        assert secret not in r2s, f"{name} crossed the wire in clear (receiver to sender)"
        assert not any(secret in m for m in proxy.s2r_messages), name


# -- one attack per test, through the node API ----------------------------------------------


@dataclass(frozen=True)
class Case:
    attack: Attack
    code: str
    #: a regular expression the error message must match; {uid} / {next_uid} are filled in
    message: str
    placed: int  # how many instances (from the first) end up in the destination
    chunk: tuple[int, int, int] | None = (ATTACKED, 0, 1)  # clear header of the hit message


def at_chunk(kind: str, **kw: Any) -> Attack:
    return Attack(kind, index=ATTACKED, min_size=CHUNK_MESSAGE, **kw)


API_CASES = {
    "flip-ciphertext-bit": Case(
        at_chunk(FLIP, offset=PROTO_HEADER + 1000, bit=3),
        "integrity",
        r"chunk 0 of instance {uid} failed authentication: it was altered",
        ATTACKED,
    ),
    # the connection is gone before the receiver has opened the altered chunk: still the
    # alteration, not a lost connection to resume
    "flip-then-cut": Case(
        at_chunk(FLIP, offset=PROTO_HEADER + 1000, bit=3, then_cut=True),
        "integrity",
        r"chunk 0 of instance {uid} failed authentication: it was altered",
        ATTACKED,
    ),
    "drop-chunk": Case(
        at_chunk(DROP),
        "integrity",
        rf"chunk 0 of file #{ATTACKED + 1} arrived where chunk 0 of instance {{uid}} was "
        r"expected: the stream was reordered, replayed or cut",
        ATTACKED,
    ),
    "reorder-chunks": Case(
        at_chunk(REORDER),
        "integrity",
        rf"chunk 0 of file #{ATTACKED + 1} arrived where chunk 0 of instance {{uid}} was expected",
        ATTACKED,
    ),
    "flip-clear-file-index": Case(
        at_chunk(FLIP, offset=OFF_FILE_INDEX, bit=0),
        "integrity",
        rf"chunk 0 of file #{ATTACKED ^ 1} arrived where chunk 0 of instance {{uid}} was expected",
        ATTACKED,
    ),
    "flip-clear-chunk-index": Case(
        at_chunk(FLIP, offset=OFF_CHUNK_INDEX, bit=0),
        "integrity",
        rf"chunk 1 of file #{ATTACKED} arrived where chunk 0 of instance {{uid}} was expected",
        ATTACKED,
    ),
    "flip-clear-last-flag": Case(
        at_chunk(FLIP, offset=OFF_FLAGS, bit=0),
        "integrity",
        r"chunk 0 of instance {uid} carries a wrong last-chunk flag",
        ATTACKED,
    ),
    "length-prefix-plus-one": Case(
        at_chunk(LENGTH, length_delta=1),
        "integrity",
        r"chunk 0 of instance {uid} failed authentication",
        ATTACKED,
    ),
    "length-prefix-minus-one": Case(
        at_chunk(LENGTH, length_delta=-1),
        "integrity",
        r"chunk 0 of instance {uid} failed authentication",
        ATTACKED,
    ),
    "length-prefix-huge": Case(
        at_chunk(LENGTH, length_delta=0x7F000000),
        "frame-too-large",
        r"the peer sent a \d+-byte frame, larger than the \d+-byte limit",
        ATTACKED,
    ),
}


@pytest.mark.parametrize("name", list(API_CASES))
async def test_tampering_is_detected_and_nothing_unverified_is_kept(
    name: str, pair: tuple[NodeProc, NodeProc], mitm_study: Path, tmp_path: Path
) -> None:
    case = API_CASES[name]
    sender, receiver = pair
    manifest = manifest_of(mitm_study)
    uid = manifest.instances[ATTACKED].sop_instance_uid
    out = tmp_path / "out"
    async with MitmProxy(sender.port, case.attack) as proxy:
        run = await offer_and_receive(sender, receiver, mitm_study, out, proxy.address)
        # the attack happened, once, on the message aimed at
        assert [a.kind for a in proxy.applied] == [case.attack.kind], proxy.applied
        assert proxy.applied[0].chunk == case.chunk
        assert not proxy.errors

        err = run.result
        assert err["event"] == "error", run.events
        assert err["code"] == case.code, err
        assert re.search(case.message.format(uid=re.escape(uid)), err["message"]), err["message"]
        if case.code == "integrity":
            assert uid in err["message"]
            assert err["message"].endswith("Nothing unverified was kept.")
            # altered data is never kept for a resume
            assert not (out / ".p2pshare-partial").exists()
        assert not any(e["event"] == "complete" for e in run.events)
        assert_no_receipt(run.sender_view, run.sender_events)
        assert_only_verified(out, manifest, case.placed)

        await assert_control_run(proxy, sender, receiver, mitm_study, tmp_path / "control")


# -- through the CLI ------------------------------------------------------------------------


async def test_replayed_chunk_fails_the_cli_receive(
    pair: tuple[NodeProc, NodeProc], mitm_study: Path, tmp_path: Path, cli: Cli
) -> None:
    sender, receiver = pair
    manifest = manifest_of(mitm_study)
    next_uid = manifest.instances[ATTACKED + 1].sop_instance_uid
    out = tmp_path / "out"
    async with aiohttp.ClientSession() as http, MitmProxy(sender.port, at_chunk(REPLAY)) as proxy:
        s_api = NodeClient(sender.url, sender.token, http)
        offer = await s_api.create_offer(str(mitm_study), None, None, consent="none")
        res = await cli.run(
            "receive",
            offer["code"],
            "--from",
            proxy.address,
            "--node",
            receiver.url,
            "--data-dir",
            str(receiver.data_dir),
            "--out",
            str(out),
            "--json",
        )
        s_events, view = await sender_outcome(s_api, offer["offer_id"])

        assert [(a.kind, a.chunk) for a in proxy.applied] == [(REPLAY, (ATTACKED, 0, 1))]
        assert res.code == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr + res.stdout
        assert not res.events("complete")
        (err,) = res.events("error")
        assert err["code"] == "integrity"
        # the replayed copy (file #6) arrived where the next instance was expected
        assert (
            f"chunk 0 of file #{ATTACKED} arrived where chunk 0 of instance {next_uid} was "
            f"expected" in err["message"]
        )
        assert_no_receipt(view, s_events)
        # the first copy verified and was kept; nothing after it
        assert_only_verified(out, manifest, ATTACKED + 1)

        await assert_control_run(proxy, sender, receiver, mitm_study, tmp_path / "control")


async def test_cut_connection_fails_the_cli_receive_with_one_line(
    pair: tuple[NodeProc, NodeProc], mitm_study: Path, tmp_path: Path, cli: Cli
) -> None:
    sender, receiver = pair
    manifest = manifest_of(mitm_study)
    out = tmp_path / "out"
    cut_after = manifest.total_bytes // 2 + 777  # in the middle of a chunk, mid-study
    async with (
        aiohttp.ClientSession() as http,
        MitmProxy(sender.port, Attack(CUT, cut_after=cut_after)) as proxy,
    ):
        s_api = NodeClient(sender.url, sender.token, http)
        offer = await s_api.create_offer(str(mitm_study), None, None, consent="none")
        res = await cli.run(
            "receive",
            offer["code"],
            "--from",
            proxy.address,
            "--node",
            receiver.url,
            "--data-dir",
            str(receiver.data_dir),
            "--out",
            str(out),
        )
        s_events, view = await sender_outcome(s_api, offer["offer_id"])

        assert [a.kind for a in proxy.applied] == [CUT]
        assert proxy.bytes_s2r == cut_after
        assert res.code == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr + res.stdout
        errors = [line for line in (res.stdout + res.stderr).splitlines() if "Error" in line]
        assert len(errors) == 1 and errors[0].startswith("Error: "), res.stdout + res.stderr
        # the wording depends on whether the receiver noticed on a read or on a write; how
        # much was kept is checked by test_cut_connection_says_how_much_was_kept
        assert re.search(r"connection (to the peer )?was lost", errors[0]), errors[0]
        assert "Received and verified" not in res.stdout
        assert_no_receipt(view, s_events)
        placed = len(destination_files(out))
        assert 0 < placed < 20
        assert_only_verified(out, manifest, placed)

        await assert_control_run(proxy, sender, receiver, mitm_study, tmp_path / "control")


async def test_cut_connection_says_how_much_was_kept(
    pair: tuple[NodeProc, NodeProc], mitm_study: Path, tmp_path: Path
) -> None:
    """Wherever the stream is cut, the receiver says how many instances it kept and what to do.

    transfer.py raises "the connection was lost after N of M instances; nothing partial was
    marked complete. Ask the sender to offer the study again" when the sender's stream ends
    early. The same loss must not turn into a bare "the connection to the peer was lost" just
    because the receiver noticed it while sending an acknowledgement (which it does when the
    cut comes right after the 16th chunk: it is still working through queued chunks then).
    """
    sender, receiver = pair
    manifest = manifest_of(mitm_study)
    cuts = {
        "mid-frame, 30% in": Attack(CUT, cut_after=int(manifest.total_bytes * 0.3)),
        "after chunk #6": Attack(CUT, index=ATTACKED, frame_type=CHUNK_FRAME),
        "after chunk #16": Attack(CUT, index=15, frame_type=CHUNK_FRAME),
        "after chunk #19": Attack(CUT, index=18, frame_type=CHUNK_FRAME),
    }
    got: dict[str, str] = {}
    want: dict[str, str] = {}
    for i, (where, attack) in enumerate(cuts.items()):
        out = tmp_path / f"out-{i}"
        async with MitmProxy(sender.port, attack) as proxy:
            run = await offer_and_receive(sender, receiver, mitm_study, out, proxy.address)
            assert [a.kind for a in proxy.applied] == [CUT]
        err = run.result
        assert err["event"] == "error" and err["code"] == "interrupted", err
        assert err["resumable"] is True
        assert_no_receipt(run.sender_view, run.sender_events)
        placed = len(destination_files(out))
        assert 0 < placed < 20
        assert_only_verified(out, manifest, placed)
        got[where] = err["message"]
        want[where] = (
            f"the connection was lost after {placed} of 20 instances; nothing partial was "
            f"marked complete. What arrived is kept: when the sending node is reachable again, "
            f"run `p2pshare receive --resume {run.job}` (possible until "
        )
        got[where] = got[where][: len(want[where])]
    assert got == want


# -- several chunks per file ----------------------------------------------------------------

@pytest.mark.parametrize(
    "kind, chunk_in_file",
    # chunk 0 too: a file whose first chunk fails must not be taken for a disk error
    [(FLIP, 3), (DROP, 3), (FLIP, 0)],
)
async def test_tampering_inside_a_multi_chunk_file(
    kind: str,
    chunk_in_file: int,
    chunked_sender: NodeProc,
    pair: tuple[NodeProc, NodeProc],
    mitm_study: Path,
    tmp_path: Path,
) -> None:
    _, receiver = pair
    sender = chunked_sender
    manifest = manifest_of(mitm_study, SMALL_CHUNK)
    assert manifest.chunk_count(ATTACKED) > chunk_in_file + 1
    uid = manifest.instances[ATTACKED].sop_instance_uid
    index = sum(manifest.chunk_count(i) for i in range(ATTACKED)) + chunk_in_file
    attack = Attack(kind, index=index, frame_type=CHUNK_FRAME, offset=PROTO_HEADER + 17, bit=7)
    out = tmp_path / "out"
    async with MitmProxy(sender.port, attack) as proxy:
        run = await offer_and_receive(sender, receiver, mitm_study, out, proxy.address)
        assert [(a.kind, a.chunk) for a in proxy.applied] == [(kind, (ATTACKED, chunk_in_file, 0))]
        err = run.result
        assert err["event"] == "error" and err["code"] == "integrity", err
        if kind == FLIP:
            expected = f"chunk {chunk_in_file} of instance {uid} failed authentication"
        else:
            expected = (
                f"chunk {chunk_in_file + 1} of file #{ATTACKED} arrived where chunk "
                f"{chunk_in_file} of instance {uid} was expected"
            )
        assert expected in err["message"]
        assert_no_receipt(run.sender_view, run.sender_events)
        assert_only_verified(out, manifest, ATTACKED)
        # the half-received file never reached the destination, and no partial patient data
        # is left behind: the private staging area is removed when the transfer ends
        assert not list(out.rglob("*.part"))
        assert not (out / ".p2pshare-partial").exists()

        await assert_control_run(proxy, sender, receiver, mitm_study, tmp_path / "control")
