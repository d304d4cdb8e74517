"""Every exception p2pshare raises on purpose, in one tree.

::

    P2PShareError                 base; ``str(exc)`` is a sentence for the person at the keyboard
    ├── ConfigError               bad command line, data directory or settings
    ├── InputError                a study folder/zip that cannot be offered (nothing readable, …)
    │   └── StudyChoiceError      several studies found and none chosen (carries the list)
    ├── CodeError                 the one-time code or QR link itself is wrong
    │   ├── CodeFormatError       cannot be parsed (typo, missing words)
    │   ├── CodeRejected          the sender did not accept it (carries ``tries_left``)
    │   └── OfferUnavailable      expired, already used, burnt or cancelled (carries ``state``)
    ├── TrustError                the peer's identity cannot be trusted
    │   └── PeerKeyChanged        a pinned institution presented a different key
    ├── CryptoError               a seal or signature did not verify (translated from nacl)
    ├── ProtocolError             the peer broke the protocol
    │   ├── LocalProtocolError    we called the protocol object wrongly (a bug on our side)
    │   └── RemoteProtocolError   the peer sent something malformed, oversized or out of order
    │       └── ManifestError     the manifest is malformed or lies (paths, sizes, UIDs)
    ├── TransferError             the transfer did not finish; names the file and the cause
    │   ├── IntegrityError        a chunk or file failed authentication or its hash
    │   ├── TransferAborted       the peer (or our user) stopped the transfer
    │   │   └── ReceiverCancelled the receiving node's staff cancelled it (sender's side)
    │   └── ConnectionLost        the connection was cut before the receipt
    └── DicomError                a file could not be read as DICOM (translated from pydicom)

Each third-party library's exceptions are translated into this tree in the one module that owns
the library (nacl and spake2 in ``crypto``, pydicom in ``dicom``, aiohttp in ``transfer``/``node``).
"""

from __future__ import annotations


class P2PShareError(Exception):
    """Base of every deliberate p2pshare error. The message is written for a person."""

    #: Short machine-readable code, used on the wire and in ``--json`` output.
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(P2PShareError):
    code = "config"


class InputError(P2PShareError):
    code = "input"


class StudyChoiceError(InputError):
    code = "study-choice"

    def __init__(self, message: str, studies: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.studies = studies


class CodeError(P2PShareError):
    code = "code"


class CodeFormatError(CodeError):
    code = "code-format"


class CodeRejected(CodeError):
    code = "code-rejected"

    def __init__(self, tries_left: int) -> None:
        if tries_left > 0:
            hint = f"{tries_left} {'try' if tries_left == 1 else 'tries'} left"
            what = "check the code with the sender and type it again"
        else:
            hint = "no tries left"
            what = "the offer is now burnt; ask the sender for a new code"
        super().__init__(f"code not accepted ({hint}): {what}")
        self.tries_left = tries_left


class OfferUnavailable(CodeError):
    code = "offer-unavailable"

    def __init__(self, state: str, message: str | None = None) -> None:
        text = {
            "expired": "this code has expired",
            "used": "this code has already been used",
            "burnt": "this code was burnt after too many wrong attempts",
            "cancelled": "the sender cancelled this offer",
            "declined": "the patient declined this transfer",
            "unknown": "the sender has no offer with this number",
        }.get(state, f"this offer is {state}")
        super().__init__(message or f"{text}: ask the sender for a new code")
        self.state = state


class TrustError(P2PShareError):
    code = "trust"


class PeerKeyChanged(TrustError):
    code = "peer-key-changed"

    def __init__(self, name: str, pinned: str, presented: str) -> None:
        super().__init__(
            f"refused: '{name}' presented identity {presented}, but this node pinned "
            f"{pinned} for that name on first contact. This may be an impostor. If the "
            f"institution really replaced its node, confirm the new fingerprint with them by "
            f'phone, then run: p2pshare peers forget "{name}" and try again.'
        )
        self.name = name
        self.pinned = pinned
        self.presented = presented


class CryptoError(P2PShareError):
    code = "crypto"


class ProtocolError(P2PShareError):
    code = "protocol"


class LocalProtocolError(ProtocolError):
    code = "local-protocol"


class RemoteProtocolError(ProtocolError):
    code = "protocol-violation"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ManifestError(RemoteProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(f"the sender's manifest was refused: {message}", "manifest-invalid")


class TransferError(P2PShareError):
    code = "transfer"


class IntegrityError(TransferError):
    code = "integrity"


class TransferAborted(TransferError):
    code = "aborted"


class ReceiverCancelled(TransferAborted):
    """The receiving node's staff cancelled the transfer; the sender's offer ends with it."""

    code = "receiver-cancelled"

    def __init__(self, peer: str) -> None:
        super().__init__(
            f"{peer} cancelled the transfer on their side; nothing more will be sent and the "
            f"offer is closed. Make a new offer if they ask for the study again"
        )


class ConsentStopped(TransferError):
    """The sending side's consent does not (or no longer) allow the images to flow."""

    code = "consent"

    def __init__(self, message: str, code: str = "consent") -> None:
        super().__init__(message)
        self.code = code


class ConnectionLost(TransferError):
    code = "connection-lost"


class DicomError(P2PShareError):
    code = "dicom"
