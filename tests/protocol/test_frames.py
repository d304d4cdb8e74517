"""Framing: exact bytes, reassembly from arbitrary splits, and limits enforced from the header."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pshare.errors import LocalProtocolError, RemoteProtocolError
from p2pshare.protocol.frames import (
    CHUNK_HEADER,
    FLAG_LAST,
    HEADER,
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    FrameBuffer,
    FrameType,
    Inner,
    check_type,
    dump_json,
    encode,
    encode_json,
    inner_type,
    load_json,
    require,
)


def test_wire_constants():
    # these are the wire format: changing any of them breaks every deployed node
    assert HEADER.size == 5 and CHUNK_HEADER.size == 9
    assert MAX_HANDSHAKE_FRAME == 4096
    assert MAX_FRAME == 16 * 1024 * 1024 + 1024
    assert FLAG_LAST == 1
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0x01,
        "PAKE": 0x02,
        "ERROR": 0x03,
        "SEALED": 0x10,
        "CHUNK": 0x11,
    }
    assert {t.name: int(t) for t in Inner} == {
        "IDENT_R": 1,
        "IDENT_S": 2,
        "CONFIRM_R": 3,
        "MANIFEST": 10,
        "ACCEPT": 11,
        "ACK": 12,
        "DONE": 13,
        "RECEIPT": 14,
        "STATUS": 15,
        "CONSENT": 16,
        "ERROR": 20,
        "CLOSE": 21,
    }


def test_encode_exact_bytes():
    assert encode(FrameType.HELLO, b"ab") == b"\x00\x00\x00\x03\x01ab"
    assert encode(FrameType.SEALED, b"") == b"\x00\x00\x00\x01\x10"
    assert encode_json(FrameType.ERROR, {"b": 1, "a": "x"}) == (
        b"\x00\x00\x00\x10\x03" + b'{"a":"x","b":1}'
    )
    assert CHUNK_HEADER.pack(1, 2, FLAG_LAST) == b"\x00\x00\x00\x01\x00\x00\x00\x02\x01"


def test_dump_json_is_canonical():
    assert dump_json({"z": [1, 2], "a": {"y": None, "b": True}}) == (
        b'{"a":{"b":true,"y":null},"z":[1,2]}'
    )
    assert dump_json({"n": "é"}) == b'{"n":"\\u00e9"}'


def test_frames_fed_one_byte_at_a_time():
    frames = [(FrameType.HELLO, b'{"v":1}'), (FrameType.SEALED, b""), (FrameType.CHUNK, b"x" * 300)]
    wire = b"".join(encode(t, b) for t, b in frames)
    buf = FrameBuffer()
    got = []
    for i in range(len(wire)):
        buf.feed(wire[i : i + 1])
        while (f := buf.next_frame()) is not None:
            got.append(f)
    assert got == frames
    assert buf.buffered == 0
    assert buf.next_frame() is None


def test_partial_frames_wait_for_more_bytes():
    buf = FrameBuffer()
    wire = encode(FrameType.PAKE, b"hello")
    buf.feed(wire[:4])
    assert buf.next_frame() is None and buf.buffered == 4
    buf.feed(wire[4:9])
    assert buf.next_frame() is None and buf.buffered == 9
    buf.feed(wire[9:] + wire[:2])
    assert buf.next_frame() == (FrameType.PAKE, b"hello")
    assert buf.next_frame() is None and buf.buffered == 2


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=600)), max_size=12
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_round_trip_through_arbitrary_splits(frames, cuts):
    wire = b"".join(encode(t, b) for t, b in frames)
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    buf = FrameBuffer()
    got = []
    for a, b in zip(points, points[1:], strict=False):
        buf.feed(wire[a:b])
        while (f := buf.next_frame()) is not None:
            got.append(f)
    assert got == [(int(t), b) for t, b in frames]
    assert buf.buffered == 0


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40))
def test_buffer_compaction_never_loses_or_reorders_bytes(sizes):
    """Many frames through one buffer, each fed in two uneven halves."""
    buf = FrameBuffer(MAX_FRAME)
    for i, n in enumerate(sizes):
        body = bytes([i % 256]) * n
        wire = encode(FrameType.CHUNK, body)
        half = len(wire) // 3
        buf.feed(wire[:half])
        buf.feed(wire[half:])
        assert buf.next_frame() == (FrameType.CHUNK, body)
    assert buf.buffered == 0


@pytest.mark.parametrize("limit", [MAX_HANDSHAKE_FRAME, MAX_FRAME, 10])
def test_limit_is_enforced_from_the_header_alone(limit):
    buf = FrameBuffer(limit)
    buf.feed(HEADER.pack(limit + 1, FrameType.SEALED))  # five bytes, no body
    with pytest.raises(RemoteProtocolError) as info:
        buf.next_frame()
    assert info.value.code == "frame-too-large"
    assert f"{limit + 1}-byte frame" in info.value.message
    assert f"{limit}-byte limit" in info.value.message


def test_limit_counts_the_type_byte_and_the_body():
    buf = FrameBuffer(10)
    buf.feed(encode(FrameType.HELLO, b"x" * 9))  # length field 10: at the limit
    assert buf.next_frame() == (FrameType.HELLO, b"x" * 9)
    buf.feed(encode(FrameType.HELLO, b"x" * 10))  # length field 11
    with pytest.raises(RemoteProtocolError) as info:
        buf.next_frame()
    assert info.value.code == "frame-too-large"


def test_default_limit_is_the_handshake_limit_and_can_be_raised():
    buf = FrameBuffer()
    assert buf.max_frame == MAX_HANDSHAKE_FRAME
    big = encode(FrameType.SEALED, bytes(MAX_HANDSHAKE_FRAME))
    buf.feed(big)
    with pytest.raises(RemoteProtocolError):
        buf.next_frame()
    buf = FrameBuffer()
    buf.feed(big)
    buf.max_frame = MAX_FRAME
    assert buf.next_frame() == (FrameType.SEALED, bytes(MAX_HANDSHAKE_FRAME))


def test_empty_frame_is_refused():
    buf = FrameBuffer()
    buf.feed(b"\x00\x00\x00\x00\x01")
    with pytest.raises(RemoteProtocolError) as info:
        buf.next_frame()
    assert info.value.code == "protocol-violation"


def test_a_huge_length_field_is_refused_without_waiting():
    buf = FrameBuffer(MAX_FRAME)
    buf.feed(b"\xff\xff\xff\xff\x11")
    with pytest.raises(RemoteProtocolError) as info:
        buf.next_frame()
    assert info.value.code == "frame-too-large"


@pytest.mark.parametrize("value", [0x00, 0x04, 0x0F, 0x12, 0x7F, 0xFF])
def test_unknown_frame_types(value):
    with pytest.raises(RemoteProtocolError) as info:
        check_type(value)
    assert f"{value:#x}" in info.value.message
    assert info.value.code == "protocol-violation"


def test_known_frame_and_message_types():
    assert check_type(0x11) is FrameType.CHUNK
    assert inner_type(10) is Inner.MANIFEST
    for value in (0, 4, 9, 17, 22, 255):
        with pytest.raises(RemoteProtocolError) as info:
            inner_type(value)
        assert f"unknown message type {value}" in info.value.message


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b"1",
        b'"x"',
        b"\xff",
        b"[" * 5000,
        b'{"a":' + b"1" * 5000 + b"}",  # beyond Python's int-parsing limit
        b'{"a":1} x',
    ],
    ids=["empty", "open", "list", "null", "int", "str", "bad-utf8", "deep", "huge-int", "trailing"],
)
def test_load_json_refuses_anything_but_an_object(body):
    with pytest.raises(RemoteProtocolError) as info:
        load_json(body, "test")
    assert info.value.code == "protocol-violation"
    assert "malformed test message" in info.value.message


def test_load_json_accepts_objects():
    assert load_json(b'{"a":[1,{"b":null}]}', "x") == {"a": [1, {"b": None}]}


def test_require_raises_local_protocol_error():
    require(True, "fine")
    with pytest.raises(LocalProtocolError) as info:
        require(False, "misuse")
    assert str(info.value) == "misuse"
    assert not isinstance(info.value, RemoteProtocolError)
