"""Framing of what the hub writes straight to a socket (pure functions, no I/O).

When the hub runs under ``eventcast serve`` it writes pre-framed bytes to the
socket's transport, so one frame shared by many connections is built once:

* WebSocket frames as a server sends them (RFC 6455 §5.2: unmasked, final);
* HTTP/1.1 chunks (RFC 9112 §7.1) for the SSE stream's chunked body;
* whole HTTP/1.1 responses that end the connection (a refused request head or
  WebSocket handshake).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

__all__ = [
    "OP_BINARY",
    "OP_TEXT",
    "closing_response",
    "frame_chunk",
    "frame_text",
    "websocket_frame",
]

#: WebSocket opcodes (RFC 6455 §5.2).
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
_FIN: Final = 0x80


def websocket_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """Wrap ``payload`` in one unmasked, final WebSocket data frame (RFC 6455 §5.2).

    The payload length is written in the shortest form the RFC allows: 7 bits
    up to 125 bytes, 16 bits up to 65,535, 64 bits beyond.

    Raises:
        ValueError: ``opcode`` is not a data opcode (text or binary).
    """
    if opcode not in (OP_TEXT, OP_BINARY):
        raise ValueError(f"not a data frame opcode: {opcode:#x}")
    n = len(payload)
    first = _FIN | opcode
    if n < 126:
        header = bytes((first, n))
    elif n < 65536:
        header = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + n.to_bytes(8, "big")
    return header + payload


#: The head of each short text frame (payloads of 0 to 125 bytes), by payload length.
_SHORT_TEXT_HEADS: Final = tuple(websocket_frame(bytes(n))[:2] for n in range(126))


def frame_text(payload: bytes) -> bytes:
    """Wrap ``payload`` in one final WebSocket text frame (the Centrifuge JSON protocol)."""
    n = len(payload)
    if n < 126:  # (most pushes and replies: the head looked up, not built)
        return _SHORT_TEXT_HEADS[n] + payload
    return websocket_frame(payload, OP_TEXT)


def frame_chunk(payload: bytes) -> bytes:
    """Wrap ``payload`` as one HTTP/1.1 chunk: hex size, CRLF, data, CRLF.

    An empty payload would end the body (the last chunk), so it is refused.

    Raises:
        ValueError: ``payload`` is empty.
    """
    if not payload:
        raise ValueError("an empty chunk ends the body; write the last chunk explicitly")
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def closing_response(
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: bytes = b"",
) -> bytes:
    """A whole HTTP/1.1 response with ``body`` that closes the connection.

    ``headers`` are extra header lines, each ending in CRLF.
    """
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
        % (status, HTTPStatus(status).phrase.encode(), content_type, len(body), headers)
    ) + body
