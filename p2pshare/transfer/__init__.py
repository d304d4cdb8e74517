"""The asyncio engine: drives protocol sessions over a channel, reads and writes the files.

One loop per connection, the same shape on both sides::

    bytes in → session.receive_data → session.next_event → act (store, disk, jobs) → bytes out

The sender additionally fills the session's window with chunks read from the study's sources.
The receiver writes chunks to a private staging folder, and only after a file's digest (BLAKE3) matched
the signed manifest (and its DICOM header names the instance the manifest promised) is it synced
and renamed into place. Nothing unverified is ever moved to the destination or reported
complete; the receipt is signed only when every instance is in place.

``channel`` carries the bytes (a WebSocket, or an in-memory fake in tests), ``engine`` is what a
node hands both sides (identity, store, clock, audit), and ``sending`` / ``receiving`` each drive
one role's session for one connection.
"""

from p2pshare.transfer.channel import IDLE_TIMEOUT_S, WS_PATH, Channel, WsChannel, connect
from p2pshare.transfer.engine import Engine

__all__ = ["IDLE_TIMEOUT_S", "WS_PATH", "Channel", "Engine", "WsChannel", "connect"]
