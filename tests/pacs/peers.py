"""Real DICOM peers for the PACS tests: dcmtk's storescu/storescp and Debian's Orthanc.

Each is started on a free 127.0.0.1 port with its files under the test's tmp_path, and stopped
by the caller (context managers). Nothing here mocks a peer.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


def need(*programs: str) -> None:
    for program in programs:
        if not shutil.which(program) and not Path(program).exists():
            # scripts/setup.sh installs them: a missing peer is a broken setup, not a skip
            pytest.fail(f"{program} is not installed: run scripts/setup.sh")


@contextlib.contextmanager
def storescp(out_dir: Path, ae_title: str) -> Iterator[int]:
    """dcmtk storescp accepting every transfer syntax it knows; yields its port."""
    need("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+xa", "-aet", ae_title, "-od", str(out_dir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def storescu(port: int, called_ae: str, path: Path, calling_ae: str = "MODALITY") -> None:
    """Push every file below ``path`` with dcmtk storescu (raises if it fails)."""
    need("storescu")
    subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", "127.0.0.1",
         str(port), str(path)],
        check=True,
        capture_output=True,
        timeout=120,
    )


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    ae_title: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())


@contextlib.contextmanager
def orthanc(work: Path, ae_title: str = "ORTHANC") -> Iterator[Orthanc]:
    """Debian's Orthanc with the DICOMweb plugin, on loopback ports, storage in ``work``."""
    need(ORTHANC)
    plugin = next((p for p in DICOMWEB_PLUGINS if Path(p).exists()), None)
    if plugin is None:
        pytest.fail("the Orthanc DICOMweb plugin is missing (orthanc-dicomweb): run scripts/setup.sh")
    work.mkdir(parents=True, exist_ok=True)
    peer = Orthanc(free_port(), free_port(), ae_title)
    config = {
        "Name": "trauma-centre-pacs",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "HttpPort": peer.http_port,
        "DicomPort": peer.dicom_port,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
    }
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(work / "orthanc.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=log)
    try:
        wait_port(peer.http_port, proc, 30)
        wait_port(peer.dicom_port, proc, 30)
        yield peer
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
