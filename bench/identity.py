"""Benchmark: reading a received instance's identity, from the file vs from its first chunk.

Run by hand (never from the test suite)::

    .venv/bin/python bench/identity.py                # 600-slice CT study, 7 rounds
    .venv/bin/python bench/identity.py --slices 60 --rounds 3

For every file of a synthetic CT study it times ``read_identity_of_verified(path)`` (re-opens
the file and asks pydicom for the four UIDs) and ``identity_from_head(head, size)``, where
``head`` is the file's first transfer chunk (up to 1 MiB, already in memory on the receiver, so
not timed). Both are first checked to agree on every file. Prints µs per file: the best round
and the median round, so that a noisy neighbour on a small machine shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pshare.dicom.synthetic import BENCH_CACHE, cached_bench_study, study_files  # noqa: E402
from p2pshare.dicom.verify import identity_from_head, read_identity_of_verified  # noqa: E402

CHUNK = 1 << 20  # the first transfer chunk


def per_file_us(fn: Callable[[int], object], count: int, rounds: int) -> list[float]:
    """µs per file of each round of calling ``fn(i)`` for i in range(count)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(count):
            fn(i)
        times.append((time.perf_counter() - t0) / count * 1e6)
    return times


def report(name: str, times: Sequence[float]) -> None:
    print(f"{name:<44} best {min(times):6.1f} µs/file   median {statistics.median(times):6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=600, help="CT slices of 512x512 (600 ≈ 300 MB)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--cache",
        default=str(BENCH_CACHE),
        help="where the generated study is kept between runs",
    )
    args = ap.parse_args()

    study = cached_bench_study(Path(args.cache), args.slices)
    files = study_files(study)
    sizes = [p.stat().st_size for p in files]
    heads = []
    for path in files:
        with open(path, "rb") as fh:
            heads.append(fh.read(CHUNK))
    print(f"study: {len(files)} files, first chunk {CHUNK >> 10} KiB")

    answered = 0
    for path, head, size in zip(files, heads, sizes, strict=True):
        fast = identity_from_head(head, size)
        if fast is not None:
            answered += 1
            if fast != read_identity_of_verified(path):
                sys.exit(f"MISMATCH on {path}: {fast}")
    print(f"identity_from_head answered {answered} of {len(files)} files, all as the file reader")

    n = len(files)
    old = per_file_us(lambda i: read_identity_of_verified(files[i]), n, args.rounds)
    new = per_file_us(lambda i: identity_from_head(heads[i], sizes[i]), n, args.rounds)
    views = [memoryview(h) for h in heads]
    new_view = per_file_us(lambda i: identity_from_head(views[i], sizes[i]), n, args.rounds)
    print()
    report("read_identity_of_verified(path)", old)
    report("identity_from_head(head: bytes, size)", new)
    report("identity_from_head(head: memoryview, size)", new_view)
    print(f"speed-up (best rounds): {min(old) / min(new):.1f}x")


if __name__ == "__main__":
    main()
