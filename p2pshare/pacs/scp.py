"""The node's DICOM Storage SCP: modalities and PACS push studies into the library.

pynetdicom runs the listener and one thread per association (``start_server(block=False)``),
so no DICOM work ever runs on the node's event loop. Datasets are never held in memory:
pynetdicom streams each one to a temporary file as it arrives (``STORE_RECV_CHUNKED_DATASET``,
in the system temporary folder: set ``TMPDIR`` to a folder on a disk, not a RAM-backed
``/tmp``), and the handler moves that file into the :class:`~p2pshare.library.Library` (which
is thread-safe and writes atomically). The C-STORE response is sent only after the file is on
disk and flushed, so a sender that hears "success" may forget the image.

Limits: an instance larger than ``max_instance_bytes`` is cut off while it streams (the
association is aborted, the partial file removed), and so is one that would leave less than
the library's ``min_free_bytes`` free on the temporary or the library disk; an instance that
arrived whole but would leave too little room in the library is refused with status 0xA700
(out of resources), so the sender keeps it and can retry.

Accepted: Verification (C-ECHO) and every storage SOP class pynetdicom knows, in every transfer
syntax it knows (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, RLE, MPEG/HEVC): files are kept
byte for byte, so nothing has to be decoded. The called AE title must be the node's; with an
allow-list, only those calling AE titles may associate.

When a study is *complete* is decided elsewhere (the quiet-period sweep in the node, or "send
now"): DICOM has no end-of-study message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from p2pshare.errors import ConfigError, DicomError
from p2pshare.library import Library, Stored

__all__ = ["StorageScp"]

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Default largest single instance (a big multi-frame or whole-slide image still fits).
MAX_INSTANCE_BYTES = 4 * 1024**3
#: Room for the command set and the PDU headers around an instance's own bytes.
_SLACK = 64 * 1024
#: While an instance streams, free space is checked each time this much more has arrived.
_SPACE_EVERY = 16 * 1024**2


class StorageScp:
    """A Storage SCP on ``host:port`` under ``ae_title``, storing into ``library``; instances
    above ``max_instance_bytes`` are refused (see the module docstring)."""

    def __init__(
        self,
        library: Library,
        *,
        ae_title: str,
        host: str,
        port: int,
        allow: tuple[str, ...] = (),
        on_stored: Callable[[Stored], None] | None = None,
        max_instance_bytes: int = MAX_INSTANCE_BYTES,
    ) -> None:
        self.library = library
        self.max_instance_bytes = max_instance_bytes
        # P-DATA headers add 12 bytes per PDU (at least 1/256 of the minimum PDU size)
        self._stream_limit = max_instance_bytes + max_instance_bytes // 256 + _SLACK
        # bytes received per association since its last C-STORE was handled
        self._received: dict[Any, int] = {}
        self._lock = threading.Lock()
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
        # Stream every received dataset to a file instead of memory (a pynetdicom-wide switch;
        # the node's only DICOM listener is this one).
        _config.STORE_RECV_CHUNKED_DATASET = True
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
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

    def _on_data(self, event: Any) -> None:
        """Count what an association sends; cut off an instance that grows too large or would
        fill a disk before it has arrived whole."""
        assoc = event.assoc
        with self._lock:
            before = self._received.get(assoc, 0)
            now = before + len(event.data)
            self._received[assoc] = now
        if now > self._stream_limit:
            reason = f"larger than this node accepts ({self.max_instance_bytes} bytes)"
        elif now // _SPACE_EVERY != before // _SPACE_EVERY and not self._room(_SPACE_EVERY):
            reason = "it would leave too little free disk space"
        else:
            return
        log.warning("C-STORE from %s cut off: %s", _calling(event), reason)
        with self._lock:
            self._received[assoc] = -(2**62)  # abort once
        assoc.abort(block=False)

    def _room(self, incoming: int) -> bool:
        for folder in (tempfile.gettempdir(), self.library.root):
            with contextlib.suppress(OSError):
                if shutil.disk_usage(folder).free - incoming < self.library.min_free_bytes:
                    return False
        return True

    def _on_close(self, event: Any) -> None:
        assoc = event.assoc
        with self._lock:
            self._received.pop(assoc, None)
        # An instance cut off half-way leaves pynetdicom's temporary file behind: remove it.
        message = getattr(getattr(assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is not None:
            with contextlib.suppress(OSError, AttributeError, ValueError):
                partial.close()
                os.unlink(partial.name)

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self._received[event.assoc] = 0
        try:
            path = Path(event.dataset_path)
            size = path.stat().st_size
            if size > self.max_instance_bytes:
                log.warning("C-STORE from %s refused: %d bytes is too large", _calling(event), size)
                return STATUS_OUT_OF_RESOURCES
            # the file may sit on another disk: it must fit in the library as well
            self.library.check_space(0 if _same_disk(path, self.library.root) else size)
            stored = self.library.store_file(path, "scp")
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


def _same_disk(path: Path, folder: Path) -> bool:
    try:
        return path.stat().st_dev == folder.stat().st_dev
    except OSError:
        return False


def _calling(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title)
    except AttributeError:
        return "?"
