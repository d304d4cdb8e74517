"""Events a protocol session hands to its driver. Nouns, frozen, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pshare.manifest import Manifest


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class OfferRequest(Event):
    """Sender: a receiver asks to pair on an offer; answer with ``use_offer`` or ``refuse``."""

    offer_ref: str  # the 32-hex offer id (QR form) or the offer number (spoken form), as text
    spoken: bool
    #: a reconnection: ``offer_ref`` is a resume ticket id, the password its secret
    resume: bool = False


@dataclass(frozen=True)
class CodeMismatch(Event):
    """Sender: the receiver used another code. Count it, then ``refuse(tries_left=…)``."""


@dataclass(frozen=True)
class PeerIdentity(Event):
    """The other node proved it knows the code and presented this identity.

    The driver checks it against its pinned peers and answers ``trust_peer`` or ``refuse``.
    """

    public_key: bytes
    name: str
    fingerprint: str


@dataclass(frozen=True)
class Paired(Event):
    """Both sides confirmed the key and both identities are bound in the transcript."""

    transfer_id: bytes
    session_key: bytes = field(repr=False)


@dataclass(frozen=True)
class ManifestOffer(Event):
    """Receiver: the signed manifest arrived and verified; answer ``accept`` or ``refuse``."""

    manifest: Manifest
    digest: str
    signature: bytes
    extra: dict[str, Any]


@dataclass(frozen=True)
class Accepted(Event):
    """Sender: the receiver accepted; ``have`` maps file index → chunks it already holds."""

    have: dict[int, int]


@dataclass(frozen=True)
class Status(Event):
    """Receiver: the sender reports a state the person should see (e.g. waiting for consent)."""

    state: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class ConsentGranted(Event):
    """Receiver: the sender's signed consent record verified (see ``protocol/consent.py``)."""

    record: dict[str, Any]
    raw: bytes = field(repr=False)
    signature: bytes = field(repr=False)


@dataclass(frozen=True)
class Chunk(Event):
    """Receiver: an authenticated chunk, in order; write ``data`` at ``offset`` of the file."""

    file_index: int
    chunk_index: int
    offset: int
    data: bytes | bytearray = field(repr=False)
    last: bool


@dataclass(frozen=True)
class SealedChunk(Event):
    """Receiver, deferred mode: the next chunk, in order and checked except for its AEAD, which
    :func:`p2pshare.protocol.receiver.open_chunk` checks (it raises
    :class:`p2pshare.errors.CryptoError` when the chunk was altered). The driver opens it on
    whichever thread it likes (it is a pure function of the event), writes the plaintext at
    ``offset``, feeds it to ``hasher`` — given with a file's first chunk on this connection and
    kept by the driver for the file's later chunks — and, after the last chunk, reports the
    file's digest to :meth:`ReceiverSession.file_hashed`, or an unreadable chunk to
    :meth:`ReceiverSession.chunk_unreadable`.
    """

    file_index: int
    chunk_index: int
    offset: int
    length: int
    last: bool
    sealed: bytes | memoryview = field(repr=False)
    key: bytes = field(repr=False)
    counter: int = field(repr=False)
    aad: bytes = field(repr=False)
    #: a fresh BLAKE3 hasher for a file's first chunk, the held prefix's for a file resumed
    #: part-way, None for a file's later chunks (the driver has its hasher)
    hasher: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class FileVerified(Event):
    """Receiver: every chunk of the file arrived and its digest (BLAKE3) matches the manifest."""

    file_index: int


@dataclass(frozen=True)
class FileRejected(Event):
    """Receiver: the file's bytes do not match the manifest; it must not be kept."""

    file_index: int
    reason: str


@dataclass(frozen=True)
class SenderDone(Event):
    """Receiver: the sender says it has sent everything; the driver now checks and signs."""


@dataclass(frozen=True)
class Receipt(Event):
    """Sender: the receiver's signed receipt over the manifest digest verified."""

    body: dict[str, Any]
    signature: bytes


@dataclass(frozen=True)
class RemoteError(Event):
    """The peer reported an error and will close."""

    code: str
    message: str
    tries_left: int | None = None


@dataclass(frozen=True)
class Closed(Event):
    """The peer ended the session in order."""
