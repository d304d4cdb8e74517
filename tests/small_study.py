"""A five-instance synthetic CT study in 4 KiB chunks, for tests of staging and receiving."""

from __future__ import annotations

from pathlib import Path

from p2pshare.dicom.ingest import StudyScan, scan
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.manifest import MIN_CHUNK

CHUNK = MIN_CHUNK  # 4 KiB: the files of SERIES take 3, 3, 2, 2 and 1 chunks
SERIES = [
    SeriesSpec("HEAD", 2, 64, 64, 5.0, "head"),
    SeriesSpec("CHEST", 2, 48, 48, 5.0, "chest"),
    SeriesSpec("TINY", 1, 32, 32, 5.0, "abdomen"),
]


def make_small_study(root: Path) -> StudyScan:
    """Generate the study below ``root`` (seeded, so always the same bytes) and scan it."""
    generate_ct_study(root, seed=11, series=SERIES)
    found = scan(root, chunk_size=CHUNK).study(None)
    assert [found.manifest.chunk_count(i) for i in range(5)] == [3, 3, 2, 2, 1]
    return found
