"""The node's DICOM Storage SCP: modalities and PACS push studies into the library.

pynetdicom runs the listener and one thread per association (``start_server(block=False)``),
so no DICOM work ever runs on the node's event loop; each received instance is written straight
into the :class:`~p2pshare.library.Library` (which is thread-safe and writes atomically). The
C-STORE response is sent only after the file is on disk and flushed, so a sender that hears
"success" may forget the image.

Accepted: Verification (C-ECHO) and every storage SOP class pynetdicom knows, in every transfer
syntax it knows (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, RLE, MPEG/HEVC): files are kept
byte for byte, so nothing has to be decoded. The called AE title must be the node's; with an
allow-list, only those calling AE titles may associate.

When a study is *complete* is decided elsewhere (the quiet-period sweep in the node, or "send
now"): DICOM has no end-of-study message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from p2pshare.errors import ConfigError, DicomError
from p2pshare.library import Library, Stored

__all__ = ["StorageScp"]

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


class StorageScp:
    """A Storage SCP on ``host:port`` under ``ae_title``, storing into ``library``."""

    def __init__(
        self,
        library: Library,
        *,
        ae_title: str,
        host: str,
        port: int,
        allow: tuple[str, ...] = (),
        on_stored: Callable[[Stored], None] | None = None,
    ) -> None:
        self.library = library
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.allow = allow
        self.on_stored = on_stored
        self._server: Any = None

    def start(self) -> int:
        """Start listening; returns the bound port. Raises ConfigError if it cannot bind."""
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        ae.maximum_associations = 16
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for DICOM on {self.host}:{self.port} ({exc.strerror}); choose "
                "another --dicom-port"
            ) from exc
        self.port = int(self._server.server_address[1])
        log.info("DICOM storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            stored = self.library.store_bytes(data, "scp")
        except DicomError as exc:
            log.warning("C-STORE from %s refused: %s", _calling(event), exc.message)
            return STATUS_CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("C-STORE from %s could not be written: %s", _calling(event), exc.strerror)
            return STATUS_OUT_OF_RESOURCES
        except Exception:  # never let one instance take the listener down
            log.exception("C-STORE from %s failed unexpectedly", _calling(event))
            return STATUS_OUT_OF_RESOURCES
        if self.on_stored is not None:
            self.on_stored(stored)
        return STATUS_SUCCESS


def _calling(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title)
    except AttributeError:
        return "?"
