"""Fixtures for the PACS unit tests: small synthetic studies and pydicom's bundled files."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study


@pytest.fixture
def ct_study(tmp_path: Path) -> Path:
    """Two series, 7 instances, tiny images."""
    root = tmp_path / "ct"
    generate_ct_study(
        root,
        seed=11,
        series=[
            SeriesSpec("Head", slices=3, rows=32, columns=32, region="head"),
            SeriesSpec("Chest", slices=4, rows=32, columns=32, region="chest"),
        ],
    )
    return root
