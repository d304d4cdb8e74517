"""Stream order: the middle slice of every series first, then every series in order.

Pure tests of ``transfer_plan``/``file_order`` (sans-I/O): hypothesis draws studies with any
mix of series, series numbers, instance numbers (present, missing, duplicated), file sizes and
resume lists, and checks the properties the viewer and the receiver rely on.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pshare import digest as file_digest
from p2pshare.manifest import Instance, Manifest, Series
from p2pshare.protocol.session import file_order, transfer_plan

STUDY = "1.2.826.0.1.3680043.8.498.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
ELE = "1.2.840.10008.1.2.1"
CHUNK = 4096


def _manifest(
    series: list[tuple[str, int | None]],
    instances: list[tuple[str, int | None, int]],
) -> Manifest:
    """``series``: (uid, number); ``instances``: (series uid, instance number, size)."""
    return Manifest(
        study_instance_uid=STUDY,
        series=tuple(Series(uid, "CT", "", number) for uid, number in series),
        chunk_size=CHUNK,
        instances=tuple(
            Instance(
                sop_instance_uid=f"{STUDY}.{i + 1}",
                sop_class_uid=CT,
                series_instance_uid=s,
                transfer_syntax_uid=ELE,
                size=size,
                digest=file_digest.of_bytes(str(i).encode()),
                instance_number=n,
            )
            for i, (s, n, size) in enumerate(instances)
        ),
    )


def _series_uid(k: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.7.{k + 1}"


@st.composite
def studies(draw: st.DrawFn) -> Manifest:
    n_series = draw(st.integers(1, 5))
    uids = [_series_uid(k) for k in draw(st.permutations(range(n_series)))]
    numbers = draw(st.lists(st.none() | st.integers(-3, 6), min_size=n_series, max_size=n_series))
    # some series may be missing from the manifest's series list (number unknown)
    listed = draw(st.lists(st.booleans(), min_size=n_series, max_size=n_series))
    series = [(u, n) for u, n, keep in zip(uids, numbers, listed, strict=True) if keep]
    instances = draw(
        st.lists(
            st.tuples(
                st.sampled_from(uids),
                st.none() | st.integers(-2, 12),
                st.integers(1, 3 * CHUNK + 1),
            ),
            min_size=1,
            max_size=30,
        )
    )
    return _manifest(series, instances)


@st.composite
def studies_and_have(draw: st.DrawFn) -> tuple[Manifest, dict[int, int]]:
    m = draw(studies())
    held = draw(st.sets(st.integers(0, len(m.instances) - 1)))
    # v1 resumes whole files only, but the plan itself honours any prefix held
    have = {fi: draw(st.integers(0, m.chunk_count(fi))) for fi in held}
    return m, have


def _series_of(m: Manifest, fi: int) -> str:
    return m.instances[fi].series_instance_uid


@settings(max_examples=300, deadline=None)
@given(studies_and_have())
def test_plan_is_every_missing_chunk_exactly_once(case: tuple[Manifest, dict[int, int]]) -> None:
    m, have = case
    plan = transfer_plan(m, have)
    expected = {
        (fi, ci)
        for fi in range(len(m.instances))
        for ci in range(have.get(fi, 0), m.chunk_count(fi))
    }
    assert len(plan) == len(set(plan)) == len(expected)
    assert set(plan) == expected


@settings(max_examples=300, deadline=None)
@given(studies_and_have())
def test_chunks_of_a_file_are_contiguous_and_in_order(
    case: tuple[Manifest, dict[int, int]],
) -> None:
    m, have = case
    plan = transfer_plan(m, have)
    runs: list[tuple[int, list[int]]] = []
    for fi, ci in plan:
        if runs and runs[-1][0] == fi:
            runs[-1][1].append(ci)
        else:
            runs.append((fi, [ci]))
    assert len({fi for fi, _ in runs}) == len(runs)  # each file in one run
    for fi, chunks in runs:
        start = have.get(fi, 0)
        assert chunks == list(range(start, m.chunk_count(fi)))


@settings(max_examples=300, deadline=None)
@given(studies())
def test_middle_slice_of_every_series_comes_first(m: Manifest) -> None:
    order = file_order(m)
    assert sorted(order) == list(range(len(m.instances)))
    n_series = len({i.series_instance_uid for i in m.instances})
    head = order[:n_series]
    # one file of every series before any series gets a second one
    assert {_series_of(m, fi) for fi in head} == {i.series_instance_uid for i in m.instances}
    for fi in head:
        uid = _series_of(m, fi)
        members = [j for j in range(len(m.instances)) if _series_of(m, j) == uid]
        numbered = sorted(
            members,
            key=lambda j: (
                m.instances[j].instance_number is None,
                m.instances[j].instance_number or 0,
                j,
            ),
        )
        assert fi == numbered[len(numbered) // 2]


@settings(max_examples=300, deadline=None)
@given(studies())
def test_after_the_thumbnails_series_follow_in_order_each_by_instance_number(
    m: Manifest,
) -> None:
    order = file_order(m)
    n_series = len({i.series_instance_uid for i in m.instances})
    head, tail = order[:n_series], order[n_series:]
    numbers = {s.series_instance_uid: s.number for s in m.series}

    def series_key(uid: str) -> tuple[bool, int, str]:
        n = numbers.get(uid)
        return (n is None, n or 0, uid)

    # the thumbnails come in series order, and so do the series after them
    assert [_series_of(m, fi) for fi in head] == sorted(
        (_series_of(m, fi) for fi in head), key=series_key
    )
    tail_series = [_series_of(m, fi) for fi in tail]
    seen: list[str] = []
    for uid in tail_series:
        if not seen or seen[-1] != uid:
            assert uid not in seen, "a series was interrupted by another"
            seen.append(uid)
    assert seen == sorted(seen, key=series_key)
    # within a series: instance-number order, unnumbered last in manifest order
    for uid in seen:
        run = [fi for fi in tail if _series_of(m, fi) == uid]
        keys = [
            (m.instances[fi].instance_number is None, m.instances[fi].instance_number or 0, fi)
            for fi in run
        ]
        assert keys == sorted(keys)


def test_a_worked_example() -> None:
    # series 2 (numbered 1) and series 1 (numbered 3); series 3 has no number and no entry
    m = _manifest(
        [(_series_uid(0), 3), (_series_uid(1), 1)],
        [
            (_series_uid(0), 3, 10),  # 0
            (_series_uid(0), 1, 10),  # 1
            (_series_uid(0), 2, 10),  # 2  middle of series 0 (numbers 1, 2, 3)
            (_series_uid(1), 5, 10),  # 3
            (_series_uid(1), 4, 10),  # 4
            (_series_uid(1), 6, 10),  # 5
            (_series_uid(1), 7, 10),  # 6
            (_series_uid(2), None, 10),  # 7
            (_series_uid(2), None, 10),  # 8  middle of series 2 (unnumbered: manifest order)
            (_series_uid(2), None, 10),  # 9
        ],
    )
    # sorted(series 1) = [4, 3, 5, 6] → middle index 2 → file 5
    assert file_order(m) == [5, 2, 8, 4, 3, 6, 1, 0, 7, 9]
    assert transfer_plan(m, {5: 1, 1: 1}) == [(fi, 0) for fi in [2, 8, 4, 3, 6, 0, 7, 9]]


def test_single_series_study_sends_its_middle_slice_first() -> None:
    m = _manifest([(_series_uid(0), 1)], [(_series_uid(0), n, 10) for n in range(1, 8)])
    assert file_order(m)[0] == 3  # instance number 4 of 1..7
    assert file_order(m)[1:] == [0, 1, 2, 4, 5, 6]
