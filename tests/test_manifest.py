"""The manifest: canonical bytes, hostile-input parsing, and safe on-disk names."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from p2pshare.errors import ManifestError, RemoteProtocolError
from p2pshare.manifest import (
    MAX_CHUNK,
    MAX_FILE_BYTES,
    MAX_INSTANCES,
    MAX_TEXT,
    MIN_CHUNK,
    Instance,
    Manifest,
    Series,
    is_uid,
    uid_filename,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = STUDY + ".1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _inst(n: int, size: int = 10_000, series: str = SERIES) -> Instance:
    return Instance(
        sop_instance_uid=f"{series}.{n}",
        sop_class_uid=CT,
        series_instance_uid=series,
        transfer_syntax_uid=EXPLICIT_LE,
        size=size,
        digest=hashlib.sha256(str(n).encode()).hexdigest(),
        instance_number=n,
    )


def _manifest(**kw) -> Manifest:
    base = dict(
        study_instance_uid=STUDY,
        instances=(_inst(1), _inst(2, 4096), _inst(3, 1)),
        series=(Series(SERIES, "CT", "Axial 1mm", 2),),
        study_description="CT POLYTRAUMA",
        study_date="20240102",
        accession_number="ACC123",
        patient={"name": "DOE^JANE", "id": "MRN-1", "birth_date": "19800101"},
        chunk_size=4096,
    )
    base.update(kw)
    return Manifest(**base)


def _dict(**changes) -> dict:
    d = _manifest().to_dict()
    d.update(changes)
    return d


# -- canonical encoding ----------------------------------------------------------------------------


def test_to_bytes_is_canonical_sorted_compact_ascii_json():
    m = _manifest(patient={"name": "MÜLLER^JÖRG"})
    data = m.to_bytes()
    data.decode("ascii")
    assert (
        data
        == json.dumps(
            json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()
    )
    assert b"\\u00dc" in data  # escaped, never raw UTF-8
    assert m.digest() == hashlib.sha256(data).hexdigest()
    assert Manifest.from_bytes(data) == m
    assert Manifest.from_bytes(data).to_bytes() == data


def test_to_dict_has_exactly_the_documented_fields():
    d = _manifest().to_dict()
    assert set(d) == {
        "version",
        "study_instance_uid",
        "study_description",
        "study_date",
        "accession_number",
        "patient",
        "chunk_size",
        "series",
        "instances",
    }
    assert set(d["instances"][0]) == {
        "sop_instance_uid",
        "sop_class_uid",
        "series_instance_uid",
        "transfer_syntax_uid",
        "size",
        "blake3",
        "instance_number",
    }
    assert d["version"] == 2


def test_patient_order_does_not_change_the_bytes():
    a = _manifest(patient={"a": "1", "b": "2"})
    b = _manifest(patient={"b": "2", "a": "1"})
    assert a.to_bytes() == b.to_bytes()


uids = (
    st.lists(st.one_of(st.just(0), st.integers(1, 10**12)), min_size=1, max_size=8)
    .map(lambda parts: ".".join(map(str, parts)))
    .filter(lambda u: len(u) <= 64)
)
texts = st.text(max_size=MAX_TEXT)
sha = st.binary(min_size=32, max_size=32).map(bytes.hex)
opt_int = st.none() | st.integers(-(2**31), 2**31 - 1)


@st.composite
def manifests(draw) -> Manifest:
    sops = draw(st.lists(uids, min_size=1, max_size=6, unique=True))
    series_uids = draw(st.lists(uids, min_size=1, max_size=3))
    instances = tuple(
        Instance(
            sop_instance_uid=sop,
            sop_class_uid=draw(uids),
            series_instance_uid=draw(st.sampled_from(series_uids)),
            transfer_syntax_uid=draw(uids),
            size=draw(st.integers(1, MAX_FILE_BYTES)),
            digest=draw(sha),
            instance_number=draw(opt_int),
        )
        for sop in sops
    )
    series = tuple(
        Series(s, draw(texts), draw(texts), draw(opt_int)) for s in sorted(set(series_uids))
    )
    return Manifest(
        study_instance_uid=draw(uids),
        instances=instances,
        series=series,
        study_description=draw(texts),
        study_date=draw(texts),
        accession_number=draw(texts),
        patient=draw(st.dictionaries(texts, texts, max_size=16)),
        chunk_size=draw(st.integers(MIN_CHUNK, MAX_CHUNK)),
    )


@settings(max_examples=150, deadline=None)
@given(manifests())
def test_round_trip_of_generated_manifests(m):
    data = m.to_bytes()
    back = Manifest.from_bytes(data)
    assert back == m
    assert back.to_bytes() == data  # what the receiver checks: the form is canonical
    assert back.digest() == m.digest()
    assert Manifest.from_dict(json.loads(data)) == m


# -- sizes and chunks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, chunk, count, last",
    [(1, 4096, 1, 1), (4096, 4096, 1, 4096), (4097, 4096, 2, 1), (10_000, 4096, 3, 1808)],
)
def test_chunk_count_and_length(size, chunk, count, last):
    m = _manifest(instances=(_inst(1, size),), chunk_size=chunk)
    assert m.chunk_count(0) == count
    assert m.chunk_length(0, count - 1) == last
    assert sum(m.chunk_length(0, c) for c in range(count)) == size
    assert all(m.chunk_length(0, c) == chunk for c in range(count - 1))


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 10**7), chunk=st.integers(MIN_CHUNK, MAX_CHUNK))
def test_chunks_cover_each_file_exactly(size, chunk):
    m = _manifest(instances=(_inst(1, size),), chunk_size=chunk)
    n = m.chunk_count(0)
    lengths = [m.chunk_length(0, c) for c in range(n)]
    assert sum(lengths) == size
    assert all(0 < x <= chunk for x in lengths)


def test_totals_modalities_and_summary():
    m = _manifest(
        series=(Series(SERIES, "CT", "Axial", 2), Series(SERIES + ".9", "", "scout", 1)),
    )
    assert m.total_bytes == 10_000 + 4096 + 1
    assert m.modalities == ["CT"]
    s = m.summary()
    assert s["instances"] == 3 and s["bytes"] == 14_097
    assert s["series"][0]["instances"] == 3 and s["series"][1]["instances"] == 0
    assert s["transfer_syntaxes"] == [EXPLICIT_LE]
    text = json.dumps(s)
    assert f"{SERIES}.1" not in text  # no per-file UIDs
    assert "DOE^JANE" not in text  # no demographics in what may be printed or logged


# -- hostile input ---------------------------------------------------------------------------------


def _refused(raw, fragment: str = ""):
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(raw)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.code == "manifest-invalid"
    assert fragment in str(info.value)
    return info.value


def _with_instance(**changes) -> dict:
    d = _dict()
    d["instances"][0].update(changes)
    return d


@pytest.mark.parametrize(
    "field, value",
    [
        ("sop_instance_uid", "../../etc/passwd"),
        ("sop_instance_uid", "/etc/passwd"),
        ("sop_instance_uid", "1.2.3/../../x"),
        ("sop_instance_uid", "1..2"),
        ("sop_instance_uid", ".1.2"),
        ("sop_instance_uid", "1.2."),
        ("sop_instance_uid", "1.02"),
        ("sop_instance_uid", "1.2\n"),
        ("sop_instance_uid", "１.２"),  # fullwidth digits
        ("sop_instance_uid", "1." * 32 + "1"),  # 65 characters
        ("sop_instance_uid", ""),
        ("sop_instance_uid", 12),
        ("sop_instance_uid", None),
        ("series_instance_uid", ".."),
        ("sop_class_uid", "CT"),
        ("transfer_syntax_uid", "1.2.840.10008.1.2.1 "),
    ],
)
def test_invalid_uids_are_refused(field, value):
    _refused(_with_instance(**{field: value}), "not a valid DICOM UID")


@pytest.mark.parametrize(
    "size", [-1, 0, MAX_FILE_BYTES + 1, 2**64, 1.5, 10_000.0, "10000", True, None]
)
def test_invalid_sizes_are_refused(size):
    _refused(_with_instance(size=size), "size of")


def test_duplicate_sop_uids_are_refused():
    d = _dict()
    d["instances"][1]["sop_instance_uid"] = d["instances"][0]["sop_instance_uid"]
    _refused(d, "listed twice")


def test_a_study_bigger_than_any_study_is_refused():
    d = _dict()
    template = d["instances"][0]
    d["instances"] = [
        dict(template, sop_instance_uid=f"{SERIES}.{i}", size=MAX_FILE_BYTES) for i in range(65)
    ]
    _refused(d, "more than any study may hold")


def test_too_many_instances_are_refused_before_looking_at_them():
    _refused(_dict(instances=[None] * (MAX_INSTANCES + 1)), "more than 100000")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"version": 1}, "reads version 2"),
        ({"version": 3}, "version"),
        ({"version": True}, "version"),
        ({"version": "1"}, "version"),
        ({"chunk_size": MIN_CHUNK - 1}, "chunk_size"),
        ({"chunk_size": MAX_CHUNK + 1}, "chunk_size"),
        ({"study_instance_uid": "1.2.x"}, "study_instance_uid"),
        ({"instances": []}, "no instances"),
        ({"instances": None}, "instances is not a list"),
        ({"instances": [1]}, "instance entry is not an object"),
        ({"series": {}}, "series is not a list"),
        ({"series": [{"series_instance_uid": "x"}]}, "series_instance_uid"),
        ({"series": [{"series_instance_uid": SERIES, "number": "2"}]}, "series number"),
        ({"patient": []}, "patient is not an object"),
        ({"patient": {"name": 5}}, "patient value"),
        ({"patient": {str(i): "x" for i in range(17)}}, "too many patient fields"),
        ({"study_description": "x" * (MAX_TEXT + 1)}, "study_description"),
        ({"accession_number": 123}, "accession_number"),
    ],
)
def test_malformed_fields_are_refused(changes, fragment):
    _refused(_dict(**changes), fragment)


@pytest.mark.parametrize(
    "sha", ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, None, 1, "0" * 64 + "\n"]
)
def test_invalid_digest_is_refused(sha):
    _refused(_with_instance(blake3=sha), "BLAKE3")


def test_instance_number_bounds():
    _refused(_with_instance(instance_number=2**31), "instance_number")
    _refused(_with_instance(instance_number=True), "instance_number")
    assert (
        Manifest.from_dict(_with_instance(instance_number=None)).instances[0].instance_number
        is None
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff",
        b"[]",
        b"null",
        b"[" * 100_000,
        b"1" * 5000,
        b'{"size":' + b"9" * 5000 + b"}",
    ],
    ids=["empty", "garbage", "bad-utf8", "list", "null", "deep", "huge-int", "huge-int-field"],
)
def test_from_bytes_refuses_anything_but_a_json_object(data):
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(data)
    assert info.value.code == "manifest-invalid"


def test_from_bytes_ignores_unknown_keys_but_then_the_form_is_not_canonical():
    # the session refuses such a manifest because to_bytes() no longer reproduces the bytes
    d = _dict()
    d["evil"] = "../../x"
    data = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    m = Manifest.from_bytes(data)
    assert m.to_bytes() != data


# -- names on disk ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid, valid",
    [
        ("1.2.840.10008.1.2.1", True),
        ("0", True),
        ("0.0", True),
        ("1." * 31 + "12", True),  # 64 characters
        ("1." * 32 + "1", False),  # 65
        ("01.2", False),
        ("1..2", False),
        (".", False),
        ("..", False),
        ("", False),
        ("1.2.", False),
        ("1.2\n", False),  # `$` alone would let a trailing newline through
        ("٣.٤", False),  # Arabic-Indic digits match \d but not [0-9]
        (None, False),
    ],
)
def test_is_uid(uid, valid):
    assert is_uid(uid) is valid


def test_uid_filename_keeps_valid_uids_and_hashes_anything_else():
    assert uid_filename("1.2.3") == "1.2.3.dcm"
    name = uid_filename("../../etc/passwd")
    assert re.fullmatch(r"x[0-9a-f]{40}\.dcm", name)
    assert name == "x" + hashlib.sha256(b"../../etc/passwd").hexdigest()[:40] + ".dcm"
    assert uid_filename("..") != uid_filename(".")
    assert uid_filename("\ud800").endswith(".dcm")  # a lone surrogate does not crash it


SAFE_NAME = re.compile(r"([0-9.]+|x[0-9a-f]{40})\.dcm")


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("1.2\n")
@example("../..")
@example("1.2/../3")
def test_uid_filename_never_forms_a_path(uid):
    name = uid_filename(uid)
    assert SAFE_NAME.fullmatch(name), name
    assert "/" not in name and "\\" not in name and "\0" not in name
    if is_uid(uid):
        assert name == uid + ".dcm"
        assert set(name) <= set("0123456789.dcm")


@settings(max_examples=300, deadline=None)
@given(study=st.text(), series=st.text(), sop=st.text() | uids)
def test_relpath_always_stays_inside_the_destination(study, series, sop):
    # built directly, bypassing from_dict's checks: relpath must be safe on its own
    inst = Instance(sop, CT, series, EXPLICIT_LE, 1, "0" * 64)
    rel = inst.relpath(study)
    parts = rel.split("/")
    assert len(parts) == 3
    for part in parts:
        assert part not in ("", ".", "..")
        assert re.fullmatch(r"[0-9.]+|x[0-9a-f]{40}|([0-9.]+|x[0-9a-f]{40})\.dcm", part), part
    dest = "/srv/inbox"
    full = posixpath.normpath(posixpath.join(dest, rel))
    assert full.startswith(dest + "/")
    assert full == dest + "/" + rel  # normalising changes nothing: no dot segments


def test_relpath_of_valid_uids_is_only_digits_and_dots():
    inst = _inst(7)
    assert inst.relpath(STUDY) == f"{STUDY}/{SERIES}/{SERIES}.7.dcm"
    assert set(inst.relpath(STUDY)) <= set("0123456789./dcm")


def test_file_digests_are_blake3_and_sha256_only_for_version_1(tmp_path) -> None:
    from blake3 import blake3

    from p2pshare import digest as file_digest

    path = tmp_path / "f"
    path.write_bytes(b"pixel data" * 1000)
    assert file_digest.of_file(path) == blake3(path.read_bytes()).hexdigest()
    assert file_digest.of_file(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _manifest().digest_algorithm == "blake3"
