"""The sans-I/O server side of RFC 6455: the opening handshake and the client frame reader."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from hypothesis import given, strategies as st

from eventcast.protocol.websocket import (
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    BadHandshake,
    FrameReader,
    accept_response,
    close_code,
    close_frame,
    control_frame,
    offered_subprotocols,
    read_handshake,
    unmask,
)

from ..server.hubtools import client_frame

KEY = base64.b64encode(b"0123456789abcdef")


def frame(payload: bytes, opcode: int = 0x1, *, fin: bool = True, rsv: int = 0) -> bytes:
    return client_frame(payload, opcode, fin=fin, rsv=rsv)


def error_of(data: bytes, max_size: int = 1024) -> tuple[int, str]:
    reader = FrameReader(max_size)
    reader.feed(data)
    assert reader.error is not None
    return reader.error.code, reader.error.reason


# -- the handshake ------------------------------------------------------------------------


def test_a_valid_handshake_and_its_accept_value() -> None:
    headers = [(b"host", b"h"), (b"sec-websocket-key", KEY), (b"sec-websocket-version", b"13")]
    handshake = read_handshake(b"GET", b"/connection/websocket?format=json", headers)
    assert (handshake.path, handshake.query) == (b"/connection/websocket", b"format=json")
    answer = accept_response(handshake, "centrifuge-protobuf")
    expected = base64.b64encode(
        hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nsec-websocket-accept: " + expected + b"\r\n" in answer
    assert b"\r\nsec-websocket-protocol: centrifuge-protobuf\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")
    assert b"sec-websocket-protocol" not in accept_response(handshake)


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        (b"POST", [(b"sec-websocket-key", KEY), (b"sec-websocket-version", b"13")], 400),
        (b"GET", [(b"sec-websocket-version", b"13")], 400),
        (b"GET", [(b"sec-websocket-key", b"short"), (b"sec-websocket-version", b"13")], 400),
        (b"GET", [(b"sec-websocket-key", b"!!!!"), (b"sec-websocket-version", b"13")], 400),
        (
            b"GET",
            [
                (b"sec-websocket-key", KEY),
                (b"sec-websocket-key", KEY),
                (b"sec-websocket-version", b"13"),
            ],
            400,
        ),
        (b"GET", [(b"sec-websocket-key", KEY), (b"sec-websocket-version", b"8")], 426),
        (b"GET", [(b"sec-websocket-key", KEY)], 426),
    ],
)
def test_bad_handshakes_are_refused_with_their_status(
    method: bytes, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    with pytest.raises(BadHandshake) as caught:
        read_handshake(method, b"/", headers)
    assert caught.value.status == status
    expected = b"sec-websocket-version: 13\r\n" if status == 426 else b""
    assert caught.value.headers == expected


def test_subprotocols_in_order_over_several_headers() -> None:
    headers = [
        (b"sec-websocket-protocol", b"a, centrifuge-protobuf"),
        (b"other", b"x"),
        (b"sec-websocket-protocol", b" b ,,"),
    ]
    assert offered_subprotocols(headers) == ["a", "centrifuge-protobuf", "b"]


# -- frames the server sends -------------------------------------------------------------


def test_control_and_close_frames() -> None:
    assert control_frame(OP_PONG, b"hi") == b"\x8a\x02hi"
    assert close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
    long = close_frame(3000, "é" * 100)  # cut at a character, within 125 bytes
    assert len(long) - 2 <= 125
    assert close_code(long[2:]) == (3000, "é" * 61)
    assert close_code(b"") == (None, "")
    with pytest.raises(ValueError, match="control"):
        control_frame(0x1, b"")
    with pytest.raises(ValueError, match="control"):
        control_frame(OP_PING, b"x" * 126)


# -- the reader ---------------------------------------------------------------------------


def test_messages_in_every_length_form() -> None:
    reader = FrameReader(1 << 20)
    payloads = [b"", b"a" * 125, b"b" * 126, b"c" * 65535, b"d" * 65536]
    data = b"".join(frame(p, 0x2) for p in payloads)
    assert reader.feed(data) == [(0x2, p) for p in payloads]
    assert reader.error is None


def test_fragments_are_joined_and_control_frames_may_come_between() -> None:
    reader = FrameReader(1024)
    euro = "€".encode()  # three bytes, split across two fragments
    data = (
        frame(b"ab" + euro[:1], 0x1, fin=False)
        + frame(b"ping", OP_PING)
        + frame(b"", 0x0, fin=False)
        + frame(euro[1:] + b"cd", 0x0)
    )
    assert reader.feed(data) == [(OP_PING, b"ping"), (0x1, "ab€cd".encode())]


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8), st.data())
def test_any_split_of_the_bytes_gives_the_same_messages(
    payloads: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frame(p, 0x2) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(1024)
    out: list[tuple[int, bytes]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += reader.feed(stream[start:cut])
        start = cut
    assert out == [(0x2, p) for p in payloads]
    assert reader.error is None


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(b"x", rsv=0x40), CLOSE_PROTOCOL_ERROR),
        (b"\x81\x01x", CLOSE_PROTOCOL_ERROR),  # unmasked
        (frame(b"x", 0x3), CLOSE_PROTOCOL_ERROR),
        (frame(b"x", 0xB), CLOSE_PROTOCOL_ERROR),
        (frame(b"x" * 126, OP_PING), CLOSE_PROTOCOL_ERROR),
        (frame(b"x", OP_PING, fin=False), CLOSE_PROTOCOL_ERROR),
        (frame(b"x", 0x0), CLOSE_PROTOCOL_ERROR),
        (frame(b"x", 0x1, fin=False) + frame(b"y", 0x1), CLOSE_PROTOCOL_ERROR),
        (b"\x82\xff" + (1 << 63).to_bytes(8, "big") + b"mask", CLOSE_PROTOCOL_ERROR),
        (frame(b"\x03", OP_CLOSE), CLOSE_PROTOCOL_ERROR),
        (frame((1005).to_bytes(2, "big"), OP_CLOSE), CLOSE_PROTOCOL_ERROR),
        (frame((999).to_bytes(2, "big"), OP_CLOSE), CLOSE_PROTOCOL_ERROR),
        (frame((5000).to_bytes(2, "big"), OP_CLOSE), CLOSE_PROTOCOL_ERROR),
        (frame((1000).to_bytes(2, "big") + b"\xff", OP_CLOSE), CLOSE_INVALID_DATA),
        (frame(b"\xc3", 0x1, fin=False) + frame(b"\x28", 0x0), CLOSE_INVALID_DATA),
        (frame(b"\xff"), CLOSE_INVALID_DATA),
        (frame(b"x" * 1025, 0x2), CLOSE_TOO_BIG),
        (frame(b"x" * 600, 0x1, fin=False) + frame(b"x" * 600, 0x0), CLOSE_TOO_BIG),
    ],
)
def test_each_violation_gets_the_rfcs_close_code(data: bytes, code: int) -> None:
    assert error_of(data)[0] == code


def test_a_huge_frame_is_refused_on_its_header_and_nothing_is_buffered() -> None:
    reader = FrameReader(1024)
    assert reader.feed(b"\x82\xff" + (1 << 40).to_bytes(8, "big")) == []
    assert reader.error is not None
    assert reader.error.code == CLOSE_TOO_BIG
    assert reader.feed(b"more bytes") == []  # a stopped reader takes nothing more
    assert reader._buffer is None


def test_what_came_before_a_violation_is_still_returned() -> None:
    reader = FrameReader(1024)
    assert reader.feed(frame(b"ok") + frame(b"x", 0x3) + frame(b"late")) == [(0x1, b"ok")]
    assert reader.error is not None


def test_valid_close_frames_pass() -> None:
    reader = FrameReader(1024)
    payloads = [b"", (1000).to_bytes(2, "big") + b"bye", (4999).to_bytes(2, "big")]
    assert reader.feed(b"".join(frame(p, OP_CLOSE) for p in payloads)) == [
        (OP_CLOSE, p) for p in payloads
    ]


def test_empty_fragments_are_not_kept() -> None:
    reader = FrameReader(16)
    reader.feed(frame(b"a", 0x1, fin=False) + frame(b"", 0x0, fin=False) * 10_000)
    assert reader._fragments == [b"a"]
    assert reader.feed(frame(b"b", 0x0)) == [(0x1, b"ab")]


def test_the_pure_python_mask_matches_websockets_c_one() -> None:
    from websockets.speedups import apply_mask

    for n in (0, 1, 3, 4, 5, 127, 1000):
        data, mask = os.urandom(n), os.urandom(4)
        assert unmask(data, mask) == apply_mask(data, mask)
