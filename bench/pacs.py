"""Benchmark: PACS to PACS through two p2pshare nodes, against dcmtk straight into Orthanc.

Run by hand (never from the test suite)::

    .venv/bin/python bench/pacs.py                  # the ~300 MB, 600-slice CT study
    .venv/bin/python bench/pacs.py --slices 100 --rounds 1

p2pshare path: dcmtk ``storescu`` pushes the study into the referring node's Storage SCP; the
clock starts when the last C-STORE has been answered. Then "send now", offer, pairing with the
spoken code, the encrypted transfer to the trauma centre's node, and the reconciled C-STORE
export into that centre's Orthanc; the clock stops when the export reports the last instance
stored (Orthanc has answered its C-STORE). The quiet period is not counted ("send now").

Baseline: the same study sent by ``storescu`` straight into a fresh Orthanc.

Both use ``TCP_NODELAY=1`` for dcmtk (see bench/transfer.py) and the same disk and cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pshare.client import NodeClient  # noqa: E402
from p2pshare.demo import spawn_node, stop_node  # noqa: E402
from p2pshare.dicom.synthetic import BENCH_CACHE, cached_bench_study  # noqa: E402
from tests.pacs.peers import free_port, orthanc  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


def push(port: int, called: str, study: Path) -> None:
    subprocess.run(
        ["storescu", "--max-pdu", "131072", "-aec", called, "+sd", "+r", "127.0.0.1",
         str(port), str(study)],
        env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def count(peer: object, expected: int) -> int:
    n = len(peer.get("/instances"))  # type: ignore[attr-defined]
    assert n == expected, f"Orthanc holds {n} instances, expected {expected}"
    return n


async def via_p2pshare(study: Path, work: Path, files: int) -> float:
    with orthanc(work / "orthanc") as pacs:
        dicom_port = free_port()
        referring = await spawn_node(
            "Bench Referring", work / "ref",
            extra_args=["--dicom-port", str(dicom_port), "--ae-title", "REFNODE",
                        "--dicom-quiet", "3600"],
        )
        trauma = await spawn_node(
            "Bench Trauma", work / "trauma",
            extra_args=["--pacs", f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"],
        )
        try:
            os.sync()
            await asyncio.to_thread(push, dicom_port, "REFNODE", study)
            t0 = time.perf_counter()
            async with aiohttp.ClientSession() as http:
                s = NodeClient(referring.url, referring.token, http)
                r = NodeClient(trauma.url, trauma.token, http)
                (rec,) = await s._call("GET", "/api/v1/studies")
                await s._call("POST", f"/api/v1/studies/{rec['study_id']}/complete")
                offer = await s._call(
                    "POST", "/api/v1/offers", {"path": rec["path"], "consent": "none"}
                )
                job = await r.receive(offer["code"], str(work / "received"), [referring.address])
                async for e in r.events(job):
                    last = e
                assert last["event"] == "complete", last
                export = await r._call(
                    "POST", f"/api/v1/transfers/{job}/export",
                    {"target": "pacs", "mrn": "TC-1", "issuer": "TRAUMA"},
                )
                async for e in r.events(export["export_id"]):
                    last = e
                assert last["event"] == "complete", last
            seconds = time.perf_counter() - t0
            count(pacs, files)
            return seconds
        finally:
            await stop_node(trauma)
            await stop_node(referring)


def direct(study: Path, work: Path, files: int) -> float:
    with orthanc(work / "orthanc-direct") as pacs:
        os.sync()
        t0 = time.perf_counter()
        push(pacs.dicom_port, pacs.ae_title, study)
        seconds = time.perf_counter() - t0
        count(pacs, files)
        return seconds


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=600, help="CT slices of 512x512 (600 ≈ 300 MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=str(BENCH_CACHE))
    args = ap.parse_args()
    study = cached_bench_study(Path(args.cache), args.slices)
    files = [p for p in study.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"study: {len(files)} files, {size / 1e6:.0f} MB")
    ours: list[float] = []
    theirs: list[float] = []
    for i in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="p2pshare-bench-pacs-", dir=args.cache))
        try:
            ours.append(await via_p2pshare(study, work, len(files)))
            theirs.append(direct(study, work, len(files)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(
            f"round {i + 1}: via p2pshare {ours[-1]:.1f} s, storescu → Orthanc {theirs[-1]:.1f} s,"
            f" ratio {ours[-1] / theirs[-1]:.2f}",
            flush=True,
        )
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median: via p2pshare {a:.1f} s, storescu → Orthanc {b:.1f} s, ratio {a / b:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
