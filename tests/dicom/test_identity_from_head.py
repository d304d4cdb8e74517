"""identity_from_head: the receiver's in-memory shortcut must never disagree with the file reader.

Every non-None answer is compared with :func:`read_identity_of_verified` on the same bytes
written to a file; None is always allowed, except for the common transfer syntaxes, where the
shortcut is the point.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_file_meta_info
from pydicom.fileset import FileSet
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from p2pshare.dicom.header import MEDIA_STORAGE_DIRECTORY
from p2pshare.dicom.synthetic import SeriesSpec, generate_ct_study
from p2pshare.dicom.verify import Identity, identity_from_head, read_identity_of_verified
from p2pshare.errors import DicomError

CHUNK = 1 << 20  # the receiver's first transfer chunk
#: 64x64 slices: 8 KiB of pixel data after a ~1.5 KB header.
SPECS = [SeriesSpec("A", 2, 64, 64, 5.0, "head"), SeriesSpec("B", 1, 64, 64, 5.0, "chest")]
ANSWERED_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless}
SERIES_UID = 0x0020000E


def file_reader(data: bytes, tmp_path: Path) -> Identity | None:
    """What the file-based reader says about these bytes (None when it refuses them)."""
    path = tmp_path / "received.dcm"
    path.write_bytes(data)
    try:
        return read_identity_of_verified(path)
    except DicomError:
        return None


def assert_agrees(data: bytes, tmp_path: Path, head_size: int = CHUNK) -> Identity | None:
    """identity_from_head on the first chunk is None or exactly the file reader's answer."""
    fast = identity_from_head(data[:head_size], len(data))
    if fast is not None:
        assert fast == file_reader(data, tmp_path)
        assert all(type(v) is str for v in vars(fast).values())
    return fast


def encoded(ds: Dataset, enforce_file_format: bool = True) -> bytes:
    """``ds`` written as a DICOM file (preamble, file meta), as bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=enforce_file_format)
    return buf.getvalue()


def pixel_data_offset(data: bytes) -> int:
    """Where pydicom finds the Pixel Data element (its tag's first byte)."""
    fp = io.BytesIO(data)
    dcmread(fp, stop_before_pixels=True)
    return fp.tell()


def value_end(data: bytes, tag: int) -> int:
    """Where the value of the data set element ``tag`` ends."""
    elem = dcmread(io.BytesIO(data), stop_before_pixels=True).get_item(tag)
    assert isinstance(elem, RawDataElement)
    return elem.value_tell + elem.length


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_ct_study(tmp_path_factory.mktemp("study"), seed=4, series=SPECS)


@pytest.fixture(scope="module")
def ct(study: list[Path]) -> bytes:
    return study[0].read_bytes()


@pytest.fixture(scope="module")
def implicit_ct(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    files = generate_ct_study(
        tmp_path_factory.mktemp("implicit"),
        seed=4,
        series=SPECS[:1],
        transfer_syntax=ImplicitVRLittleEndian,
    )
    return files[0].read_bytes()


# ------------------------------------------------------------------ agreement with the file reader


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
    ],
)
def test_synthetic_ct_agrees_with_the_file_reader(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, syntax: str
) -> None:
    files = generate_ct_study(
        tmp_path_factory.mktemp("syntax"), seed=7, series=SPECS, transfer_syntax=syntax
    )
    for f in files:
        data = f.read_bytes()
        fast = assert_agrees(data, tmp_path)
        if syntax in ANSWERED_SYNTAXES:
            assert fast == read_identity_of_verified(f)
            assert fast is not None
            # However the receiver holds the chunk.
            assert identity_from_head(bytearray(data), len(data)) == fast
            assert identity_from_head(memoryview(data), len(data)) == fast
            # A head that holds the header but not all of the file.
            assert identity_from_head(data[: pixel_data_offset(data) + 12], len(data)) == fast


#: Bundled pydicom files in the syntaxes the shortcut must answer for.
COMMON = [
    ("CT_small.dcm", ExplicitVRLittleEndian),
    ("MR_small.dcm", ExplicitVRLittleEndian),
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ("rtdose.dcm", ImplicitVRLittleEndian),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),  # JPEG baseline
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),  # JPEG lossless
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("MR_small_RLE.dcm", RLELossless),
    ("SC_rgb_rle.dcm", RLELossless),
]


@pytest.mark.parametrize(("name", "syntax"), COMMON, ids=[name for name, _ in COMMON])
def test_common_syntaxes_are_answered_as_by_the_file_reader(
    tmp_path: Path, name: str, syntax: str
) -> None:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is bundled with pydicom"
    assert read_file_meta_info(path).TransferSyntaxUID == syntax
    data = Path(path).read_bytes()
    fast = assert_agrees(data, tmp_path)
    assert fast is not None
    assert fast == read_identity_of_verified(path)


def test_every_bundled_file_is_answered_alike_or_not_at_all(tmp_path: Path) -> None:
    """All of pydicom's test files: big endian, deflated, no meta, truncated, DICOMDIRs, ..."""
    answered: set[str] = set()
    refused: set[str] = set()
    for path in map(Path, get_testdata_files("**/*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for head_size in (CHUNK, 1024):
            fast = assert_agrees(data, tmp_path, head_size)
            (answered if fast is not None else refused).add(path.name)
    assert {name for name, _ in COMMON} <= answered
    # Left to the file reader by design.
    for name in (
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "image_dfl.dcm",  # deflated
        "rtstruct.dcm",  # no preamble
        "no_meta.dcm",  # no file meta
        "rtplan_truncated.dcm",  # ends inside its header
        "DICOMDIR",
    ):
        assert name in refused and name not in answered


# ------------------------------------------------------------------ heads and files cut short


def test_head_shorter_than_the_header_is_refused(ct: bytes, study: list[Path]) -> None:
    truth = read_identity_of_verified(study[0])
    pixels = pixel_data_offset(ct)
    # Up to the end of the Pixel Data element's tag, VR and length, the header is not complete.
    for cut in range(pixels + 12):
        assert identity_from_head(ct[:cut], len(ct)) is None, cut
    for cut in (pixels + 12, pixels + 13, pixels + 4096, len(ct) - 1, len(ct)):
        assert identity_from_head(ct[:cut], len(ct)) == truth, cut
    assert identity_from_head(ct[:200], len(ct)) is None


def test_whole_file_cut_inside_the_header_is_refused(
    ct: bytes, study: list[Path], tmp_path: Path
) -> None:
    truth = read_identity_of_verified(study[0])
    pixels = pixel_data_offset(ct)
    uids_end = value_end(ct, SERIES_UID)
    answered = []
    for cut in range(pixels + 12):
        fast = identity_from_head(ct[:cut], cut)  # the whole file is that short
        if fast is not None:
            assert cut >= uids_end, cut
            assert fast == truth == file_reader(ct[:cut], tmp_path)
            answered.append(cut)
    # Only where an element ends after the UIDs: e.g. right before the pixel data.
    assert pixels in answered
    # Cut inside the SOP Instance UID's value, pydicom alone reads a shortened, valid UID.
    uid = str(dcmread(io.BytesIO(ct)).SOPInstanceUID).encode()
    cut = ct.index(uid, 132 + 100) + len(uid) // 2
    shortened = dcmread(io.BytesIO(ct[:cut]), stop_before_pixels=True).SOPInstanceUID
    assert shortened == uid[: len(uid) // 2].decode()
    assert identity_from_head(ct[:cut], cut) is None


def test_large_header_in_a_bytearray_is_read_past_the_first_window(
    ct: bytes, tmp_path: Path
) -> None:
    ds = dcmread(io.BytesIO(ct))
    ds.add_new(0x00290010, "LO", "P2PSHARE TEST")
    ds.add_new(0x00291010, "OB", bytes(100_000))  # a 100 KB private element before the pixels
    data = encoded(ds)
    truth = file_reader(data, tmp_path)
    assert truth is not None
    assert identity_from_head(bytearray(data), len(data)) == truth
    assert identity_from_head(memoryview(data), len(data)) == truth
    assert identity_from_head(data, len(data)) == truth
    for head in (data[:80_000], bytearray(data[:80_000]), memoryview(data)[:80_000]):
        assert identity_from_head(head, len(data)) is None


# ------------------------------------------------------------------ refused outright


def test_file_without_preamble_is_left_to_the_file_reader(ct: bytes, tmp_path: Path) -> None:
    bare = ct[132:]
    assert file_reader(bare, tmp_path) == file_reader(ct, tmp_path) is not None
    assert identity_from_head(bare, len(bare)) is None
    no_magic = ct[:128] + b"DIXM" + ct[132:]
    assert identity_from_head(no_magic, len(no_magic)) is None


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x00",
        b"DICM",
        b"\x00" * 128 + b"DICM",
        b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4,
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(40),
        b"PK\x03\x04" + bytes(200),
        b"this is a radiology report, not an image\n" * 20,
        bytes(range(256)) * 20,
    ],
)
def test_garbage_is_refused(junk: bytes) -> None:
    assert identity_from_head(junk, len(junk)) is None
    assert identity_from_head(bytearray(junk), len(junk) + 10) is None


def test_sizes_that_do_not_fit_are_refused(ct: bytes) -> None:
    assert identity_from_head(ct, len(ct) - 1) is None  # more head than file
    assert identity_from_head(ct, 0) is None
    assert identity_from_head(ct, -1) is None
    assert identity_from_head(b"", 0) is None


def test_dicomdir_is_refused(study: list[Path], tmp_path: Path, ct: bytes) -> None:
    fs = FileSet()
    for f in study:
        fs.add(f)
    fs.write(tmp_path / "cd")
    dicomdir = (tmp_path / "cd" / "DICOMDIR").read_bytes()
    assert identity_from_head(dicomdir, len(dicomdir)) is None
    # An image whose file meta calls it a DICOMDIR: the file reader refuses it as such.
    ds = dcmread(io.BytesIO(ct))
    ds.file_meta.MediaStorageSOPClassUID = UID(MEDIA_STORAGE_DIRECTORY)
    data = encoded(ds, enforce_file_format=False)  # keep that file meta as it is
    assert data[128:132] == b"DICM"
    with pytest.raises(DicomError, match="DICOMDIR"):
        read_identity_of_verified(_written(data, tmp_path))
    assert identity_from_head(data, len(data)) is None


def _written(data: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "crafted.dcm"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SeriesInstanceUID", "1.2.03.4"),  # leading zero
        ("StudyInstanceUID", "1.2.3.abc"),  # not digits
        ("SOPInstanceUID", "1.2.3\\4.5"),  # two values
        ("SOPClassUID", "1." + "2" * 70),  # too long
        ("StudyInstanceUID", None),  # missing
        ("SeriesInstanceUID", ""),  # empty
    ],
)
def test_invalid_or_missing_uid_is_refused(
    ct: bytes, tmp_path: Path, keyword: str, value: str | None
) -> None:
    ds = dcmread(io.BytesIO(ct))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
        data = encoded(ds)
    with pytest.raises(DicomError, match=keyword):
        read_identity_of_verified(_written(data, tmp_path))
    assert identity_from_head(data, len(data)) is None


def test_invalid_uid_leaves_no_trace_in_warnings_or_logs(
    ct: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    ds = dcmread(io.BytesIO(ct))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SeriesInstanceUID = "1.2.3.DOE^JANE"  # pydicom's warning would quote it
        data = encoded(ds)
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # pydicom has just logged that value itself, while it was being set
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert identity_from_head(data, len(data)) is None
    assert not caught
    assert not caplog.records


# ------------------------------------------------------------------ same semantics as the reader


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("SOPInstanceUID", None), ("SOPInstanceUID", ""), ("SOPClassUID", None)],
)
def test_file_meta_stands_in_for_a_missing_sop_uid_as_in_the_file_reader(
    ct: bytes, tmp_path: Path, keyword: str, value: str | None
) -> None:
    ds = dcmread(io.BytesIO(ct))
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    data = encoded(ds)
    truth = read_identity_of_verified(_written(data, tmp_path))
    assert identity_from_head(data, len(data)) == truth == file_reader(ct, tmp_path)


def test_padded_uid_is_read_as_the_file_reader_reads_it(ct: bytes, tmp_path: Path) -> None:
    ds = dcmread(io.BytesIO(ct))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds["SeriesInstanceUID"].value = "1.2.840.99999.7 "  # odd-length value, space padded
        data = encoded(ds)
    fast = identity_from_head(data, len(data))
    assert fast is not None
    assert fast.series_instance_uid == "1.2.840.99999.7"
    assert fast == file_reader(data, tmp_path)


def test_repeated_uid_element_resolves_as_in_the_file_reader(ct: bytes, tmp_path: Path) -> None:
    """A second, out-of-order SeriesInstanceUID after the first: pydicom keeps the last one.

    A reader that stopped right after (0020,000E) would answer with the first copy.
    """
    extra = Dataset()
    extra.SeriesInstanceUID = "1.2.840.99999.42"
    element = io.BytesIO()
    dcmwrite(element, extra, implicit_vr=False, little_endian=True)
    pixels = pixel_data_offset(ct)
    data = ct[:pixels] + element.getvalue() + ct[pixels:]
    truth = file_reader(data, tmp_path)
    original = file_reader(ct, tmp_path)
    assert truth is not None and original is not None
    assert truth.series_instance_uid == "1.2.840.99999.42" != original.series_instance_uid
    assert identity_from_head(data, len(data)) == truth


def test_data_set_encoded_unlike_its_transfer_syntax_is_refused(
    implicit_ct: bytes, tmp_path: Path
) -> None:
    """File meta says explicit VR, the data set is implicit VR: pydicom notices and switches.

    Read as explicit VR regardless, a private element 0x42 bytes long reads as the VR "B",
    length 0, and the SeriesInstanceUID hidden in its value becomes the last one in the file.
    """
    hidden = Dataset()
    hidden.SeriesInstanceUID = "1.2.840.99999." + "7" * 44
    element = io.BytesIO()
    dcmwrite(element, hidden, implicit_vr=True, little_endian=True)
    assert len(element.getvalue()) == 0x42
    ds = dcmread(io.BytesIO(implicit_ct))
    ds.add_new(0x00290010, "LO", "P2PSHARE TEST")
    ds.add_new(0x00291010, "OB", element.getvalue())
    implicit = encoded(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    explicit = encoded(ds)

    def meta_end(data: bytes) -> int:
        meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
        return 132 + 12 + int(meta.FileMetaInformationGroupLength)

    data = explicit[: meta_end(explicit)] + implicit[meta_end(implicit) :]
    truth = file_reader(data, tmp_path)
    assert truth is not None
    assert truth == file_reader(implicit_ct, tmp_path)
    assert identity_from_head(data, len(data)) is None


# ------------------------------------------------------------------ damaged bytes


_EDIT = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2200), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("insert"), st.integers(0, 2200), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.integers(0, 2200), st.integers(1, 12).map(bytes)),
    st.tuples(st.just("cut"), st.integers(0, 2600), st.just(b"")),
)


@pytest.fixture(scope="module")
def damage_bases(ct: bytes, implicit_ct: bytes) -> list[bytes]:
    rle = get_testdata_file("MR_small_RLE.dcm", download=False)
    assert isinstance(rle, str)
    return [ct, implicit_ct, Path(rle).read_bytes()]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    base=st.integers(0, 2),
    edits=st.lists(_EDIT, max_size=3),
    head_size=st.none() | st.integers(0, 3000),
)
def test_damaged_bytes_never_raise_nor_disagree_with_the_file_reader(
    damage_bases: list[bytes],
    tmp_path: Path,
    base: int,
    edits: list[tuple[str, int, bytes]],
    head_size: int | None,
) -> None:
    data = bytearray(damage_bases[base])
    for kind, at, arg in edits:
        at = min(at, len(data))
        if kind == "set" and at < len(data):
            data[at] = arg[0]
        elif kind == "insert":
            data[at:at] = arg
        elif kind == "delete":
            del data[at : at + len(arg)]
        elif kind == "cut":
            del data[at:]
    whole = bytes(data)
    head = whole if head_size is None else whole[:head_size]
    fast = identity_from_head(head, len(whole))
    if fast is not None:
        # Not just "equal when the file reader succeeds": it must succeed.
        assert fast == file_reader(whole, tmp_path)
