"""A consent stop reports how many instances really arrived and were placed.

Protects ``ReceiverRun._on_event`` for ``ev.RemoteError``: when the sender stops the transfer
for consent (e.g. the patient revoked it mid-transfer), the receiver first salvages the files
that had fully arrived but were still being written and placed by the staging threads, and only
then words "The study is incomplete: N of M instances had arrived and were verified." Counting
``staging.placed`` without salvaging reported fewer instances (here: "No images were
received.") than the transfer then placed in the destination folder.

A real ``ReceiverRun`` (through ``Engine.receive``) talks over an in-memory channel to a real
``SenderSession``, which pairs, sends the manifest and a signed consent record, streams the
chunks of the first few files and then stops with ``consent-revoked``. The receiver's staging
write threads are held until the ERROR frame is handed to the receiver, so no file can be placed
before the stop arrives, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from p2pshare import codes, crypto
from p2pshare.config import NodeConfig
from p2pshare.dicom.ingest import StudyScan
from p2pshare.errors import ConsentStopped
from p2pshare.jobs import Jobs
from p2pshare.protocol import events as ev
from p2pshare.protocol.receiver import open_chunk
from p2pshare.protocol.sender import SenderSession
from p2pshare.store import Store
from p2pshare.transfer import receiving
from p2pshare.transfer.engine import Engine
from tests.protocol.helpers import OFFER_ID, consent_record_for
from tests.small_study import make_small_study

SECRET = b"k" * 32  # the QR offer's secret: its password is tests.protocol.helpers.PASSWORD
#: files whose every chunk is sent before the sender stops for consent
COMPLETE = 3
REVOKED = "the patient revoked consent at the sending hospital; the transfer was stopped"
COUNT = re.compile(
    r"The study is incomplete: (\d+) of (\d+) instances had arrived and were verified"
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyScan:
    return make_small_study(tmp_path_factory.mktemp("study"))


class Gate:
    """Holds the receiver's staging write threads (where chunks are opened) until opened."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.opened_chunks = 0
        self._lock = threading.Lock()  # two write threads count

    def open_chunk(self, chunk: ev.SealedChunk) -> bytearray:
        assert self.open.wait(10), "the write threads were never released"
        with self._lock:
            self.opened_chunks += 1
        return open_chunk(chunk)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    g = Gate()
    # the receiver hands functools.partial(open_chunk, event) to the staging write threads
    monkeypatch.setattr(receiving, "open_chunk", g.open_chunk)
    yield g
    g.open.set()  # never leave a write thread blocked after a failed test


class RevokingSender:
    """The sending node at the other end of an in-memory channel (the receiver's Channel).

    Drives a real SenderSession the way the sending node does, streams every chunk of the
    first ``complete`` files, then stops the transfer for consent. When the ERROR frame is
    handed to the receiver, ``on_error`` runs first.
    """

    peer_address = "192.0.2.10:8443"

    def __init__(self, study: StudyScan, complete: int, on_error: Callable[[], None]) -> None:
        self.identity = crypto.Identity.generate()
        self.s = SenderSession(
            name="Referring Hospital ED",
            public_key=self.identity.public_key,
            sign=self.identity.sign,
            window=64,  # every chunk below leaves without waiting for an acknowledgement
        )
        self.study = study
        self.complete = complete
        self.on_error = on_error
        self.completed: list[int] = []  # files whose last chunk was sent, in stream order
        self.stopped = False
        self.closed = False
        self._to_receiver: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()

    # -- the receiver's Channel ----------------------------------------------------------------

    async def send(self, data: bytes | bytearray) -> None:
        if self.stopped:
            return  # acknowledgements after the stop: the sending node no longer listens
        self.s.receive_data(bytes(data))
        self._answer()

    async def recv(self) -> bytes | None:
        data, is_error = await asyncio.wait_for(self._to_receiver.get(), 10)
        if is_error:
            self.on_error()
        return data

    async def close(self) -> None:
        self.closed = True

    # -- the sending node ----------------------------------------------------------------------

    def _answer(self) -> None:
        while (event := self.s.next_event()) is not None:
            if isinstance(event, ev.OfferRequest):
                assert event.offer_ref == OFFER_ID
                self.s.use_offer(OFFER_ID, codes.QrOffer(OFFER_ID, SECRET).password)
            elif isinstance(event, ev.PeerIdentity):
                self.s.trust_peer()
            elif isinstance(event, ev.Paired):
                self.s.send_manifest(self.study.manifest)
            elif isinstance(event, ev.Accepted):
                assert event.have == {}
                self.s.send_consent(*consent_record_for(self.s))
                self._stream()
        self._put(is_error=False)

    def _stream(self) -> None:
        m = self.study.manifest
        while len(self.completed) < self.complete:
            assert self.s.window_open
            nxt = self.s.next_chunk()
            assert nxt is not None
            fi, ci, offset, length = nxt
            data = Path(self.study.sources[fi].path).read_bytes()
            self.s.send_chunk(fi, ci, data[offset : offset + length])
            if ci == m.chunk_count(fi) - 1:
                self.completed.append(fi)
        self._put(is_error=False)  # the chunks, then the ERROR on its own
        self.s.refuse("consent-revoked", REVOKED)
        self.stopped = True
        self._put(is_error=True)

    def _put(self, *, is_error: bool) -> None:
        out = self.s.data_to_send()
        if out:
            self._to_receiver.put_nowait((bytes(out), is_error))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    store = Store(tmp_path / "node")
    yield Engine(
        config=NodeConfig(
            data_dir=tmp_path / "node", name="Trauma Centre Radiology", min_free_bytes=0
        ),
        identity=crypto.Identity.generate(),
        store=store,
    )
    store.close()


def placed_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.dcm"))


async def test_the_consent_stop_counts_the_files_still_being_placed(
    engine: Engine, gate: Gate, study: StudyScan, tmp_path: Path
) -> None:
    out = tmp_path / "received"
    placed_when_stopped: list[int] = []

    def on_error() -> None:
        # The ERROR is about to reach the receiver: nothing of the study is in place yet,
        # every chunk of the complete files is held on the write threads.
        placed_when_stopped.append(len(placed_files(out)))
        assert gate.opened_chunks == 0
        gate.open.set()

    sender = RevokingSender(study, COMPLETE, on_error)
    job = Jobs().create("receive")
    engine.store.add_transfer(job.id, engine.now(), str(out))
    qr = codes.QrOffer(OFFER_ID, SECRET)

    with pytest.raises(ConsentStopped) as caught:
        await asyncio.wait_for(engine.receive(sender, qr, out, job), 20)

    assert placed_when_stopped == [0]
    assert caught.value.code == "consent-revoked"
    message = str(caught.value)
    assert message.startswith(REVOKED), message
    found = COUNT.search(message)
    assert found is not None, f"no count of the instances that arrived in: {message!r}"
    reported, total = int(found[1]), int(found[2])

    on_disk = placed_files(out)
    assert reported > 0
    assert reported == len(on_disk), (message, on_disk)
    assert total == len(study.manifest.instances)
    # exactly the files that had fully arrived before the stop, byte for byte
    assert reported == COMPLETE == len(sender.completed)
    m = study.manifest
    for fi in sender.completed:
        inst = m.instances[fi]
        final = out / inst.relpath(m.study_instance_uid)
        assert final.read_bytes() == Path(study.sources[fi].path).read_bytes()
    # the audit record says the same
    failed = engine.store.audit.records("transfer-failed")
    assert [(r["outcome"], r["detail"]["verified"]) for r in failed] == [
        ("consent-revoked", reported)
    ]
    # nothing partial is kept: the staging folder went with the stop
    assert not (out / ".p2pshare-partial").exists()
    assert sender.closed
    # every chunk went through the held write threads (the gate did hold them)
    assert gate.opened_chunks == sum(m.chunk_count(fi) for fi in sender.completed)
