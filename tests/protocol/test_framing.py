"""Byte-level tests of what the hub writes straight to sockets (RFC 6455 frames, HTTP chunks)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from eventcast.protocol.framing import (
    OP_BINARY,
    OP_TEXT,
    closing_response,
    frame_chunk,
    frame_text,
    websocket_frame,
)


def parse_frame(frame: bytes) -> tuple[bool, int, bytes]:
    """A reference parser of one server frame (RFC 6455 §5.2): (fin, opcode, payload)."""
    first, second = frame[0], frame[1]
    assert second & 0x80 == 0, "a server must not mask its frames"
    n = second & 0x7F
    offset = 2
    if n == 126:
        n = int.from_bytes(frame[2:4], "big")
        offset = 4
    elif n == 127:
        n = int.from_bytes(frame[2:10], "big")
        offset = 10
    payload = frame[offset:]
    assert len(payload) == n
    return bool(first & 0x80), first & 0x0F, payload


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_uses_the_shortest_length_form(size: int, header: bytes) -> None:
    payload = b"x" * size
    frame = frame_text(payload)
    assert frame[: len(header)] == header
    assert frame[len(header) :] == payload


def test_binary_frame() -> None:
    assert websocket_frame(b"\x00\x01", OP_BINARY) == b"\x82\x02\x00\x01"


@pytest.mark.parametrize("opcode", [0x0, 0x8, 0x9, 0xA, 0x3])
def test_only_data_opcodes_are_framed(opcode: int) -> None:
    with pytest.raises(ValueError, match="opcode"):
        websocket_frame(b"x", opcode)


@given(st.binary(max_size=70_000), st.sampled_from([OP_TEXT, OP_BINARY]))
def test_frames_round_trip_through_a_reference_parser(payload: bytes, opcode: int) -> None:
    assert parse_frame(websocket_frame(payload, opcode)) == (True, opcode, payload)


def test_chunk() -> None:
    assert frame_chunk(b"data: 1\n\n") == b"9\r\ndata: 1\n\n\r\n"
    assert frame_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"


def test_an_empty_chunk_is_refused() -> None:
    # An empty chunk is the last-chunk marker: it would end the SSE stream.
    with pytest.raises(ValueError, match="ends the body"):
        frame_chunk(b"")


def test_a_closing_response_carries_its_status_phrase_length_and_headers() -> None:
    assert closing_response(426, b"no", headers=b"sec-websocket-version: 13\r\n") == (
        b"HTTP/1.1 426 Upgrade Required\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 2\r\nsec-websocket-version: 13\r\nconnection: close\r\n\r\nno"
    )
    assert closing_response(429, b"{}", b"application/json").startswith(
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
    )
