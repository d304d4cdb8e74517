"""Hostile peers against real nodes: the node refuses clearly, writes nothing, keeps serving.

* A hostile *receiver* is a raw WebSocket client on the sending node's ``/p2p``: oversized
  length, garbage JSON, a short SPAKE2 message, unknown frame types, random bytes. The node
  answers with an ERROR frame naming the problem (where the protocol can still speak), closes
  the connection, and goes on serving real receivers, also while 20 such peers hammer it.
* A hostile *sender* is a fake node built from the real :class:`SenderSession`: it pairs
  correctly (QR form), then lies in its manifest or its stream. The receiving node must end the
  job with a clear error, write nothing outside its destination and nothing for the bad
  instances, sign no receipt, and still receive from an honest node afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from p2pshare import codes, crypto
from p2pshare import digest as file_digest
from p2pshare.client import NodeClient
from p2pshare.demo import NodeProc, tree_hashes, two_nodes
from p2pshare.dicom.ingest import scan
from p2pshare.errors import ProtocolError
from p2pshare.manifest import MAX_FILE_BYTES, Manifest
from p2pshare.protocol import consent
from p2pshare.protocol import events as ev
from p2pshare.protocol.frames import (
    CHUNK_HEADER,
    FLAG_LAST,
    HEADER,
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    FrameType,
    Inner,
    dump_json,
    encode,
    encode_json,
)
from p2pshare.protocol.sender import SenderSession, SenderState
from p2pshare.protocol.session import DEFAULT_WINDOW, file_order

from .conftest import NAMES

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

WS_TIMEOUT = 10.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[NodeProc, NodeProc]]:
    """A referring hospital's node and a trauma centre's node, shared by this module."""
    async with two_nodes(tmp_path_factory.mktemp("hostile-nodes"), *NAMES) as nodes:
        yield nodes


async def _collect(it: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e async for e in it]


async def honest_transfer(
    sender: NodeProc,
    receiver: NodeProc,
    study: Path,
    out: Path,
    offer: dict[str, Any] | None = None,
    on_receiving: Callable[[str], Any] | None = None,
) -> list[dict[str, Any]]:
    """A normal offer → receive between two real nodes; asserts it arrived byte for byte."""
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        r_api = NodeClient(receiver.url, receiver.token, http)
        if offer is None:
            offer = await s_api.create_offer(str(study), None, None, consent="none")
        job = await r_api.receive(offer["code"], str(out), [sender.address])
        if on_receiving is not None:
            on_receiving(job)
        events = await asyncio.wait_for(_collect(r_api.events(job)), 60)
        s_events = await asyncio.wait_for(_collect(s_api.events(offer["offer_id"])), 30)
        view = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
    assert events[-1]["event"] == "complete", events[-1]
    assert tree_hashes(out) == tree_hashes(study)
    assert s_events[-1]["event"] == "complete"
    assert view["state"] == "completed" and view["receipt"] == events[-1]["receipt"]
    return events


def assert_clean_log(node: NodeProc) -> None:
    """Every hostile input took a designed path: no traceback, no 'unexpected' failure."""
    log = node.log_path.read_text()
    assert "Traceback" not in log
    assert "unexpectedly" not in log


# ===========================================================================================
# A hostile receiver: raw WebSocket clients on the sending node's peer endpoint
# ===========================================================================================


def decode_error_frame(data: bytes) -> dict[str, Any]:
    """``u32 len | u8 type=0x03 | JSON {code, message}``: the node's plaintext ERROR frame."""
    assert len(data) > HEADER.size, data
    length, ftype = HEADER.unpack_from(data)
    assert ftype == FrameType.ERROR == 0x03, data[:16]
    assert len(data) == 4 + length, "one ERROR frame, nothing else"
    body = json.loads(data[HEADER.size :])
    assert isinstance(body["code"], str) and isinstance(body["message"], str)
    return body


def hello(pake: bytes, offer: str = "1", kind: str = "spoken") -> bytes:
    msg = {"v": 1, "offer": offer, "kind": kind, "pake": base64.b64encode(pake).decode()}
    return encode_json(FrameType.HELLO, msg)


RANDOM_BYTES = random.Random(4711).randbytes(256)  # announces a 386 MB frame
#: a well-formed SPAKE2 side-A message whose group element is not on the curve
BAD_ELEMENT = b"A" + b"\xff" * 32


@dataclass(frozen=True)
class Hostile:
    name: str
    payload: Callable[[str], bytes | str]  # offer number → what the hostile peer sends
    code: str | None  # the ERROR frame's code; None: closed without one (not our protocol)
    message: str  # regular expression for the ERROR frame's message


HOSTILE_RECEIVERS = [
    Hostile(
        "1 GB length",
        lambda _n: HEADER.pack(1 << 30, FrameType.HELLO) + b"{}",
        "frame-too-large",
        rf"the peer sent a 1073741824-byte frame, larger than the {MAX_HANDSHAKE_FRAME}-byte "
        r"limit",
    ),
    Hostile(
        "garbage JSON hello",
        lambda _n: encode(FrameType.HELLO, b'{"v": 1, "offer": "1", "pake": \xff\xfe'),
        "protocol-violation",
        r"the peer sent a malformed hello message",
    ),
    Hostile(
        "5-byte SPAKE2 message",
        lambda n: hello(b"\x01\x02\x03\x04\x05", offer=n),
        "protocol-violation",
        r"the peer sent a key-exchange message of the wrong length",
    ),
    Hostile(
        "unknown frame type",
        lambda _n: encode(0x7E, b"hello?"),  # type: ignore[arg-type]
        "protocol-violation",
        r"the peer sent an unknown frame type 0x7e",
    ),
    Hostile(
        "random bytes",
        lambda _n: RANDOM_BYTES,
        "frame-too-large",
        r"the peer sent a \d+-byte frame, larger than the \d+-byte limit",
    ),
    Hostile(
        "bad SPAKE2 element for the live offer",
        lambda n: hello(BAD_ELEMENT, offer=n),
        "protocol-violation",
        r"the peer's key-exchange message is malformed",
    ),
    Hostile("text message", lambda _n: "HELLO?", None, ""),
]


async def hostile_exchange(
    http: aiohttp.ClientSession, node: NodeProc, payload: bytes | str
) -> tuple[list[bytes], aiohttp.WSMessage]:
    """Send one message, then read until the node closes: (binary replies, the closing message)."""
    async with http.ws_connect(f"ws://{node.address}/p2p", autoping=True) as ws:
        return await hostile_send(ws, payload)


async def hostile_send(
    ws: aiohttp.ClientWebSocketResponse, payload: bytes | str
) -> tuple[list[bytes], aiohttp.WSMessage]:
    if isinstance(payload, str):
        await ws.send_str(payload)
    else:
        await ws.send_bytes(payload)
    replies: list[bytes] = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), WS_TIMEOUT)
        if msg.type is not aiohttp.WSMsgType.BINARY:
            return replies, msg
        replies.append(msg.data)


def check_hostile_outcome(h: Hostile, replies: list[bytes], last: aiohttp.WSMessage) -> None:
    # the node itself closed the WebSocket (a close frame, not a dropped socket)
    assert last.type is aiohttp.WSMsgType.CLOSE, (h.name, last)
    if h.code is None:
        assert replies == [], h.name
        return
    assert len(replies) == 1, (h.name, replies)
    body = decode_error_frame(replies[0])
    assert body["code"] == h.code, (h.name, body)
    assert re.fullmatch(h.message, body["message"]), (h.name, body)


async def test_hostile_receivers_are_refused_and_the_node_keeps_serving(
    pair: tuple[NodeProc, NodeProc], study: Path, tmp_path: Path
) -> None:
    sender, receiver = pair
    assert int.from_bytes(RANDOM_BYTES[:4], "big") > MAX_HANDSHAKE_FRAME
    async with aiohttp.ClientSession() as http:
        s_api = NodeClient(sender.url, sender.token, http)
        # a live offer, which the hostile peers name but must not consume, burn or break
        offer = await s_api.create_offer(str(study), None, None, consent="none")
        number = offer["code"].split("-")[0]
        for h in HOSTILE_RECEIVERS:
            replies, last = await hostile_exchange(http, sender, h.payload(number))
            check_hostile_outcome(h, replies, last)
        view = await s_api._call("GET", f"/api/v1/offers/{offer['offer_id']}")
        assert view["state"] == "active" and view["failed_attempts"] == 0, view
    # the same sending node completes that very offer for a real receiver
    await honest_transfer(sender, receiver, study, tmp_path / "out", offer=offer)
    assert_clean_log(sender)


async def test_twenty_hostile_receivers_during_a_real_transfer(
    pair: tuple[NodeProc, NodeProc], study: Path, tmp_path: Path
) -> None:
    sender, receiver = pair
    started = asyncio.Event()
    results: list[tuple[Hostile, list[bytes], aiohttp.WSMessage]] = []
    answered: list[float] = []
    async with aiohttp.ClientSession() as http:
        # twenty connections, all open (WebSocket handshake done) before the offer exists
        conns = [
            await http.ws_connect(f"ws://{sender.address}/p2p", autoping=True) for _ in range(20)
        ]
        plan = [HOSTILE_RECEIVERS[i % 5] for i in range(20)]  # the five that never name an offer

        async def hostile(i: int) -> None:
            await started.wait()
            await asyncio.sleep(0.003 * i)
            replies, last = await hostile_send(conns[i], plan[i].payload("1"))
            results.append((plan[i], replies, last))
            answered.append(time.time())

        try:
            tasks = [asyncio.create_task(hostile(i)) for i in range(20)]
            assert all(not ws.closed for ws in conns)
            events = await honest_transfer(
                sender, receiver, study, tmp_path / "out", on_receiving=lambda _job: started.set()
            )
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            for ws in conns:
                await ws.close()
    assert len(results) == 20
    # the node answered hostile peers while the real transfer was still running
    started_at, complete_at = events[0]["at"], events[-1]["at"]
    assert any(started_at <= t <= complete_at for t in answered), (answered, complete_at)
    for h, replies, last in results:
        check_hostile_outcome(h, replies, last)
    assert_clean_log(sender)


# ===========================================================================================
# A hostile sender: a fake sending node built from the real SenderSession
# ===========================================================================================

FAKE_NAME = "Lying Referring Node"


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


class RecordingSenderSession(SenderSession):
    """The real session, remembering every sealed message type the receiver sent after pairing."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.inner_seen: list[Inner] = []

    def _handle_sealed(self, inner: Inner, payload: bytes) -> None:  # type: ignore[override]
        self.inner_seen.append(inner)
        super()._handle_sealed(inner, payload)


@dataclass
class Lie:
    """What the fake sender claims (manifest) and what it then sends."""

    #: a Manifest object is sent with the session's own send_manifest (no validation happens on
    #: the sending side); a dict is serialised, signed and sealed by hand (anything goes)
    manifest: Manifest | dict[str, Any]
    #: the bytes sent for each file after the receiver accepts (None: expect no acceptance)
    files: list[bytes] | None = None
    #: after this many files, send a frame header over the post-pairing limit instead
    oversized_after: int | None = None


@dataclass
class FakeSender:
    """A sending node that pairs honestly for one QR offer, then tells the lie it was given."""

    identity: crypto.Identity
    lie: Lie
    offer_id: str
    secret: bytes
    port: int = 0
    sessions: list[RecordingSenderSession] = field(default_factory=list)
    remote_errors: list[ev.RemoteError] = field(default_factory=list)
    receipts: list[ev.Receipt] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def uri(self) -> str:
        return codes.QrOffer(
            self.offer_id,
            self.secret,
            sender_name=FAKE_NAME,
            fingerprint=self.identity.fingerprint,
            addresses=(f"127.0.0.1:{self.port}",),
        ).uri()

    async def start(self) -> FakeSender:
        app = web.Application()
        app.router.add_get("/p2p", self._peer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _peer(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME + 1024)
        await ws.prepare(request)
        s = RecordingSenderSession(
            name=FAKE_NAME,
            public_key=self.identity.public_key,
            sign=self.identity.sign,
            entropy=seeded(len(self.sessions) + 1),
            window=DEFAULT_WINDOW,
        )
        self.sessions.append(s)
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            s.receive_data(msg.data)
            try:
                while (event := s.next_event()) is not None:
                    await self._on_event(s, ws, event)
            except ProtocolError as exc:
                self.protocol_errors.append(exc.message)
            await self._flush(s, ws)
        return ws

    @staticmethod
    async def _flush(s: SenderSession, ws: web.WebSocketResponse) -> None:
        out = s.data_to_send()
        if out and not ws.closed:
            await ws.send_bytes(bytes(out))

    async def _on_event(
        self, s: RecordingSenderSession, ws: web.WebSocketResponse, event: ev.Event
    ) -> None:
        if isinstance(event, ev.OfferRequest):
            assert event.offer_ref == self.offer_id and not event.spoken
            s.use_offer(self.offer_id, codes.QrOffer(self.offer_id, self.secret).password)
        elif isinstance(event, ev.PeerIdentity):
            s.trust_peer()
        elif isinstance(event, ev.Paired):
            if isinstance(self.lie.manifest, Manifest):
                s.send_manifest(self.lie.manifest, {"sender": FAKE_NAME})
            else:
                self._send_raw_manifest(s, self.lie.manifest)
        elif isinstance(event, ev.Accepted):
            # The lie is about the images, not the consent: authorise the transfer properly.
            record = consent.build(
                offer_id=self.offer_id,
                manifest_sha256=s._manifest_digest,
                sender_fingerprint=crypto.fingerprint(self.identity.public_key),
                destination_fingerprint=crypto.fingerprint(s.peer_key),
                destination_name=s.peer_name,
                intended_destination=None,
                shown_to_decider="verified",
                decision="approved",
                decided_by={"role": "patient"},
                method="phone-link",
                policy="patient",
                at=1_700_000_000,
            )
            s.send_consent(record, self.identity.sign(consent.sign_bytes(record)))
            await self._flush(s, ws)
            await self._stream(s, ws)
        elif isinstance(event, ev.RemoteError):
            self.remote_errors.append(event)
        elif isinstance(event, ev.Receipt):
            self.receipts.append(event)

    def _send_raw_manifest(self, s: SenderSession, doc: dict[str, Any]) -> None:
        """Seal a hand-made manifest, signed by this node, past every check of Manifest."""
        data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        sig = self.identity.sign(b"p2pshare/1 manifest\0" + digest.encode())
        extra = dump_json({"sender": FAKE_NAME, "window": s.window})
        s._seal(Inner.MANIFEST, len(data).to_bytes(4, "big") + data + sig + extra)
        s._manifest_digest = digest
        s.state = SenderState.AWAIT_ACCEPT

    async def _stream(self, s: SenderSession, ws: web.WebSocketResponse) -> None:
        """Chunks with correct crypto carrying whatever the lie says, then DONE."""
        lie = self.lie
        assert isinstance(lie.manifest, Manifest) and lie.files is not None
        size = lie.manifest.chunk_size
        # in the order the receiver expects (middle slices first), as an honest sender does
        order = file_order(lie.manifest)
        for n, fi in enumerate(order):
            content = lie.files[fi]
            if lie.oversized_after == n:
                await ws.send_bytes(HEADER.pack(MAX_FRAME + 1, FrameType.CHUNK) + bytes(64))
                return
            pieces = [content[i : i + size] for i in range(0, len(content), size)] or [b""]
            for ci, piece in enumerate(pieces):
                forge_chunk(s, fi, ci, ci == len(pieces) - 1, piece)
                await self._flush(s, ws)
        s._seal(Inner.DONE, dump_json({"chunks": s._sent}))
        s.state = SenderState.AWAIT_RECEIPT
        await self._flush(s, ws)


def forge_chunk(s: SenderSession, fi: int, ci: int, last: bool, data: bytes) -> None:
    """A CHUNK frame sealed exactly as the real sender seals one, but with any content."""
    header = CHUNK_HEADER.pack(fi, ci, FLAG_LAST if last else 0)
    ct = crypto.seal(s._send_key, s._send_ctr, data, s._aad(FrameType.CHUNK, header))
    s._send_ctr += 1
    s._out.append(encode(FrameType.CHUNK, header + ct))
    s._sent += 1


@dataclass(frozen=True)
class Genuine:
    """Three real instances of the test study: the raw material of every lie."""

    manifest: Manifest  # the first three instances, honestly described
    files: list[bytes]
    full: Manifest  # all twenty


def genuine(study: Path) -> Genuine:
    scanned = scan(study).study(None)
    files = []
    for src in scanned.sources[:3]:
        with src.open() as fh:
            files.append(fh.read())
    m = scanned.manifest
    # Instance numbers 2, 1, 3 make the stream order (middle slice first, then the series in
    # order) equal manifest order, so "file 1" is also the second file on the wire.
    three = replace(
        m,
        instances=tuple(
            replace(inst, instance_number=n) for inst, n in zip(m.instances[:3], (2, 1, 3), strict=True)
        ),
    )
    assert file_order(three) == [0, 1, 2]
    return Genuine(three, files, m)


def with_instance(m: Manifest, index: int, **changes: Any) -> Manifest:
    instances = list(m.instances)
    instances[index] = replace(instances[index], **changes)
    return replace(m, instances=tuple(instances))


def doc_with(m: Manifest, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = m.to_dict()
    mutate(doc)
    return doc


def _set_sop(doc: dict[str, Any], uid: str) -> None:
    doc["instances"][1]["sop_instance_uid"] = uid


def _set_study(doc: dict[str, Any], uid: str) -> None:
    doc["study_instance_uid"] = uid


def _set_size(doc: dict[str, Any], size: int) -> None:
    doc["instances"][1]["size"] = size


CLAIMED_UID = "1.2.826.0.1.3680043.8.498.424242"


@dataclass(frozen=True)
class LieCase:
    build: Callable[[Genuine], Lie]
    code: str
    #: regular expression for the receive job's error message; {uid} is instance 1's UID
    message: str
    #: which of the lie's instances may be placed (verified honestly before the lie)
    placed: tuple[int, ...] = ()


LIES = {
    "manifest-sop-uid-path-traversal": LieCase(
        lambda g: Lie(doc_with(g.manifest, lambda d: _set_sop(d, "../../../tmp/evil"))),
        "manifest-invalid",
        r"the sender's manifest was refused: sop_instance_uid is not a valid DICOM UID",
    ),
    "manifest-study-uid-dotdot": LieCase(
        lambda g: Lie(doc_with(g.manifest, lambda d: _set_study(d, ".."))),
        "manifest-invalid",
        r"the sender's manifest was refused: study_instance_uid is not a valid DICOM UID",
    ),
    "manifest-absurd-size": LieCase(
        lambda g: Lie(doc_with(g.manifest, lambda d: _set_size(d, 10**15))),
        "manifest-invalid",
        rf"the sender's manifest was refused: size of {{uid}} must be a whole number from 1 to "
        rf"{MAX_FILE_BYTES}",
    ),
    "study-larger-than-the-node-accepts": LieCase(
        lambda g: Lie(
            replace(
                g.full,
                instances=tuple(replace(i, size=MAX_FILE_BYTES) for i in g.full.instances),
            )
        ),
        "aborted",
        r"the study is 85\.9 GB, more than this node accepts \(68\.7 GB\)",
    ),
    "size-larger-than-sent": LieCase(
        lambda g: Lie(
            with_instance(g.manifest, 1, size=g.manifest.instances[1].size + 100), g.files
        ),
        "integrity",
        r"chunk 0 of instance {uid} holds (\d+) bytes where the manifest implies (\d+)\. "
        r"Nothing unverified was kept\.",
        placed=(0,),
    ),
    "frame-over-the-post-pairing-limit": LieCase(
        lambda g: Lie(g.manifest, g.files, oversized_after=1),
        "frame-too-large",
        rf"the peer sent a {MAX_FRAME + 1}-byte frame, larger than the {MAX_FRAME}-byte limit",
        placed=(0,),
    ),
    "content-differs-from-manifest-digest": LieCase(
        lambda g: Lie(
            g.manifest,
            [g.files[0], g.files[1][:-1] + bytes([g.files[1][-1] ^ 0x01]), g.files[2]],
        ),
        "integrity",
        r"1 of 3 instances failed verification and were not kept \(first: instance {uid} does "
        r"not match its digest in the signed manifest\)\. Ask the sender to offer the study "
        r"again",
        placed=(0, 2),
    ),
    "dicom-uid-differs-from-manifest": LieCase(
        lambda g: Lie(with_instance(g.manifest, 1, sop_instance_uid=CLAIMED_UID), g.files),
        "integrity",
        r"1 of 3 instances failed verification and were not kept \(first: instance {uid}: its "
        r"DICOM header names another instance than the manifest\)\. Ask the sender to offer "
        r"the study again",
        placed=(0, 2),
    ),
}


def _stat(path: Path) -> tuple[int, int, int] | None:
    """Identity, size and modification time of ``path`` (not followed), or None if absent."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def all_paths(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.exists() else set()


@pytest.fixture(scope="module")
def fake_identity() -> crypto.Identity:
    return crypto.Identity.generate(seeded(99))


@pytest.mark.parametrize("name", list(LIES))
async def test_lying_sender_is_refused_and_nothing_is_kept(
    name: str,
    pair: tuple[NodeProc, NodeProc],
    fake_identity: crypto.Identity,
    study: Path,
    tmp_path: Path,
) -> None:
    case = LIES[name]
    sender, receiver = pair
    g = genuine(study)
    lie = case.build(g)
    box = tmp_path / "box"
    out = box / "in" / "out"
    out.parent.mkdir(parents=True)
    evil = Path("/tmp/evil")
    evil_before = _stat(evil)
    claimed = lie.manifest if isinstance(lie.manifest, Manifest) else g.manifest
    uid = (
        lie.manifest.instances[1].sop_instance_uid
        if isinstance(lie.manifest, Manifest)
        else g.manifest.instances[1].sop_instance_uid
    )

    seed = hashlib.sha256(name.encode()).digest()
    fake = await FakeSender(fake_identity, lie, offer_id=seed[:16].hex(), secret=seed).start()
    try:
        async with aiohttp.ClientSession() as http:
            r_api = NodeClient(receiver.url, receiver.token, http)
            job = await r_api.receive(fake.uri, str(out), [])
            events = await asyncio.wait_for(_collect(r_api.events(job)), 30)
            record = await r_api._call("GET", f"/api/v1/transfers/{job}")
    finally:
        await fake.stop()

    # paired for real (so the lie was authenticated), then refused with a clear reason
    assert any(e["event"] == "paired" and e["peer"] == FAKE_NAME for e in events), events
    err = events[-1]
    assert err["event"] == "error", events
    assert err["code"] == case.code, err["message"]
    assert re.fullmatch(case.message.format(uid=re.escape(uid)), err["message"]), err["message"]
    if name == "size-larger-than-sent":
        m = re.search(r"holds (\d+) bytes where the manifest implies (\d+)", err["message"])
        assert m and int(m.group(2)) == int(m.group(1)) + 100
    # the receiver told the liar why, and no receipt went back
    assert fake.remote_errors, "the receiving node did not say why it stopped"
    assert fake.receipts == []
    assert all(Inner.RECEIPT not in s.inner_seen for s in fake.sessions)
    assert record["state"] == "failed" and record["receipt"] is None, record
    assert not any(e["event"] == "complete" for e in events)

    # nothing outside the destination, nowhere an "evil" path
    assert _stat(evil) == evil_before, "/tmp/evil was created or changed"
    assert not (out / ".." / "evil").exists() and not (out / ".." / "tmp" / "evil").exists()
    assert all(p == out or out in p.parents for p in all_paths(box) - {box / "in"})
    assert not any("evil" in p.name for p in all_paths(tmp_path))
    # exactly the honestly verified instances were placed, each intact
    placed = {
        p.relative_to(out).as_posix(): file_digest.of_bytes(p.read_bytes())
        for p in all_paths(out)
        if p.is_file() and ".p2pshare-partial" not in p.relative_to(out).parts
    }
    expected = {
        claimed.instances[i].relpath(claimed.study_instance_uid): claimed.instances[i].digest
        for i in case.placed
    }
    assert placed == expected
    if name == "dicom-uid-differs-from-manifest":  # under neither the claimed nor the real UID
        real = g.manifest.instances[1].relpath(g.manifest.study_instance_uid)
        assert real not in placed and not (out / real).exists()

    # and the receiving node still takes a study from an honest sending node
    await honest_transfer(sender, receiver, study, tmp_path / "honest")
    assert_clean_log(receiver)
