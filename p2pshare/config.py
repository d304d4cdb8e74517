"""Settings, as frozen dataclasses built once by the CLI and passed down."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from p2pshare.errors import ConfigError
from p2pshare.manifest import MAX_CHUNK, MIN_CHUNK

DEFAULT_PORT = 8700
DEFAULT_EXPIRY_S = 15 * 60
#: keep at least this much disk free after writing a study (receiver, library, uploads)
DEFAULT_MIN_FREE_BYTES = 512 * 1024**2
MAX_EXPIRY_S = 24 * 3600


def default_data_dir() -> Path:
    env = os.environ.get("P2PSHARE_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "p2pshare"


def parse_duration(text: str) -> int:
    """``15m``, ``90s``, ``2h`` or a bare number of minutes → seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smh]?)\s*", text.lower())
    if not m:
        raise ConfigError(f"'{text}' is not a duration; use e.g. 15m, 90s or 2h")
    value = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 60}[m.group(2)]
    if not 30 <= value <= MAX_EXPIRY_S:
        raise ConfigError("an offer must expire between 30 seconds and 24 hours from now")
    return value


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to run."""

    data_dir: Path
    name: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: Addresses receivers should try, "host:port"; empty means derived from host/port.
    advertise: tuple[str, ...] = ()
    offer_expiry_s: int = DEFAULT_EXPIRY_S
    chunk_size: int = 1024 * 1024
    window: int = 16
    #: Refuse studies larger than this many bytes (a peer cannot fill the disk).
    max_study_bytes: int = 64 * 1024**3
    #: Keep at least this much disk free after a study is written.
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES

    # -- resume (see docs/protocol.md "Resume") --
    #: how long an interrupted transfer can be resumed with its ticket
    resume_ttl_s: int = 24 * 3600
    #: automatic reconnections (with backoff) before the receiver waits for `receive --resume`
    reconnect_attempts: int = 8
    #: first reconnection delay in seconds (doubles each time, at most 30 s)
    reconnect_delay_s: float = 0.5

    # -- consent (see p2pshare/consent.py) --
    #: default consent policy for new offers: patient | patient-or-break-glass | none
    consent_policy: str = "patient"
    #: how long a break-glass authorisation lasts
    break_glass_minutes: int = 60
    #: who is told about every break-glass (an e-mail address or role mailbox, for the outbox)
    privacy_contact: str | None = None
    #: where break-glass notifications are POSTed as JSON
    privacy_webhook: str | None = None
    #: base URL the patient's phone uses to reach this node (default: first advertised address)
    public_url: str | None = None

    # -- PACS (see p2pshare/pacs/ and docs/pacs.md) --
    #: DICOM Storage SCP port; None = no DICOM listener
    dicom_port: int | None = None
    #: this node's AE title (the SCP's called AE; the calling AE of exports)
    ae_title: str = "P2PSHARE"
    #: calling AE titles allowed to push to the SCP; empty = any
    dicom_allow: tuple[str, ...] = ()
    #: a pushed study is complete after this many seconds without a new instance
    dicom_quiet_s: float = 10.0
    #: largest single instance the DICOM listener accepts (bytes)
    dicom_max_instance_bytes: int = 4 * 1024**3
    #: the local PACS for C-STORE export, "AE@HOST:PORT"
    pacs_target: str | None = None
    #: the DICOMweb base URL for STOW-RS export
    stow_url: str | None = None
    #: export every completed transfer automatically (see docs/pacs.md for the rule)
    auto_export: bool = False
    #: prefix for foreign accession numbers when no local one is given
    accession_prefix: str = ""

    # -- network (see docs/discovery.md and docs/relay.md) --
    #: advertise this node and browse for others on the LAN (mDNS, ``_p2pshare._tcp``)
    discovery: bool = True
    #: relay ("host:port") this node registers its QR offers at; empty = none
    relay: str = ""
    #: a peer connection that sends nothing, or stops reading, for this long is dropped
    idle_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.name.strip() or len(self.name) > 200 or not self.name.isprintable():
            raise ConfigError("the node name must be 1–200 printable characters")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"the chunk size must be from {MIN_CHUNK} to {MAX_CHUNK} bytes")
        if self.consent_policy not in ("patient", "patient-or-break-glass", "none"):
            raise ConfigError(
                f"unknown consent policy '{self.consent_policy}'; use patient, "
                f"patient-or-break-glass or none"
            )
        if not 0 <= self.reconnect_attempts <= 1000 or not 0 < self.reconnect_delay_s <= 60:
            raise ConfigError("reconnect attempts must be 0–1000 and the delay 0–60 seconds")
        if not 1 <= self.break_glass_minutes <= 24 * 60:
            raise ConfigError("break-glass must last 1 to 1440 minutes")
        for url in (self.privacy_webhook, self.public_url):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"'{url}' is not an http(s) URL")

    @property
    def identity_path(self) -> Path:
        return self.data_dir / "identity.key"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "api-token"
