"""The server side of RFC 6455 (WebSocket), sans I/O: the opening handshake and client frames.

The standalone hub (``eventcast serve``) speaks WebSocket itself on
``/connection/websocket`` (:mod:`eventcast.server.websocket`); this module is
the part of it that touches no socket:

* :func:`read_handshake` checks a client's opening handshake (RFC 6455 §4.2.1)
  and :func:`accept_response` builds the ``101`` answer (§4.2.2);
* :class:`FrameReader` turns the bytes a client sends into whole messages and
  control frames (§5), bounded in size, and reports the first protocol error
  with the close code the RFC gives it (1002, 1007, 1009);
* :func:`control_frame` and :func:`close_frame` build what the server sends
  besides data frames (those are :func:`~eventcast.protocol.framing.websocket_frame`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .codec import ProtocolError

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "BadHandshake",
    "FrameReader",
    "Handshake",
    "Unmask",
    "WebSocketError",
    "accept_response",
    "close_code",
    "close_frame",
    "control_frame",
    "offered_subprotocols",
    "read_handshake",
    "unmask",
]

#: Opcodes (RFC 6455 §5.2) besides text (1) and binary (2).
OP_CONTINUATION: Final = 0x0
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_DATA_OPCODES: Final = frozenset((0x1, 0x2))
#: The first byte of a frame that is a whole text or binary message (FIN, no reserved bits).
_WHOLE: Final = (0x81, 0x82)
_CONTROL_OPCODES: Final = frozenset((OP_CLOSE, OP_PING, OP_PONG))

#: Close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009
#: Codes a peer may send in a close frame: the RFC's (1004 to 1006 and 1015 are
#: reserved for reporting, never sent) and the registered and private 3000-4999.
_SENDABLE: Final = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The largest payload of a control frame (RFC 6455 §5.5).
_MAX_CONTROL: Final = 125


class WebSocketError(ProtocolError):
    """A client broke the protocol: the connection closes with :attr:`code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class BadHandshake(ProtocolError):
    """An opening handshake the server refuses: answer with :attr:`status` and :attr:`headers`."""

    def __init__(self, status: int, reason: str, headers: bytes = b"") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        #: Header lines the answer carries (each ending in CRLF).
        self.headers = headers


@dataclass(frozen=True, slots=True)
class Handshake:
    """A client's valid opening handshake."""

    #: The request target's path (not unquoted) and query string.
    path: bytes
    query: bytes
    #: The request's headers: lower-case names, in order.
    headers: list[tuple[bytes, bytes]]
    #: ``Sec-WebSocket-Key``, to answer with its accept value.
    key: bytes


def read_handshake(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Handshake:
    """Check an opening handshake (RFC 6455 §4.2.1) whose head was already parsed.

    ``headers`` have lower-case names (as an HTTP parser such as httptools
    gives them); ``Upgrade: websocket`` and ``Connection: upgrade`` were
    checked by whoever decided to upgrade.

    Raises:
        BadHandshake: 400 for a method other than GET or a missing or
            malformed ``Sec-WebSocket-Key``; 426 for a version other than 13
            (the answer then names 13, §4.4).
    """
    if method != b"GET":
        raise BadHandshake(400, "a WebSocket handshake is a GET request")
    key: bytes | None = None
    version: bytes | None = None
    for name, value in headers:
        if name == b"sec-websocket-key":
            if key is not None:
                raise BadHandshake(400, "more than one Sec-WebSocket-Key header")
            key = value.strip()
        elif name == b"sec-websocket-version":
            version = value.strip()
    if version != b"13":
        raise BadHandshake(
            426,
            "unsupported Sec-WebSocket-Version: 13 is required",
            b"sec-websocket-version: 13\r\n",  # RFC 6455 §4.4: name the versions served
        )
    if key is None:
        raise BadHandshake(400, "missing Sec-WebSocket-Key header")
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 16:
        raise BadHandshake(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    path, _, query = target.partition(b"?")
    return Handshake(path=path, query=query, headers=headers, key=key)


def offered_subprotocols(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The subprotocols a handshake offers (``Sec-WebSocket-Protocol``), in its order."""
    return [
        name.strip()
        for key, value in headers
        if key == b"sec-websocket-protocol"
        for name in value.decode("latin-1").split(",")
        if name.strip()
    ]


def accept_response(handshake: Handshake, subprotocol: str | None = None) -> bytes:
    """The ``101 Switching Protocols`` answer to ``handshake`` (RFC 6455 §4.2.2)."""
    accept = base64.b64encode(hashlib.sha1(handshake.key + _GUID).digest())
    head = [
        b"HTTP/1.1 101 Switching Protocols",
        b"upgrade: websocket",
        b"connection: Upgrade",
        b"sec-websocket-accept: " + accept,
    ]
    if subprotocol is not None:
        head.append(b"sec-websocket-protocol: " + subprotocol.encode("latin-1"))
    return b"\r\n".join(head) + b"\r\n\r\n"


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A server's control frame (ping, pong or close): unmasked, final, at most 125 bytes.

    Raises:
        ValueError: ``opcode`` is not a control opcode, or the payload is too long.
    """
    if opcode not in _CONTROL_OPCODES or len(payload) > _MAX_CONTROL:
        raise ValueError("a control frame has a control opcode and at most 125 bytes")
    return bytes((0x80 | opcode, len(payload))) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason`` (cut to fit 125 bytes at a character)."""
    data = reason.encode()[: _MAX_CONTROL - 2].decode(errors="ignore").encode()
    return control_frame(OP_CLOSE, code.to_bytes(2, "big") + data)


def close_code(payload: bytes) -> tuple[int | None, str]:
    """The code and reason of a close frame's payload, already checked by the reader."""
    if not payload:
        return None, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


def unmask(data: bytes | bytearray, mask: bytes) -> bytes:
    """XOR a payload with its 4-byte mask (RFC 6455 §5.3), in pure Python.

    A server may give :class:`FrameReader` a faster one (``websockets``' C
    implementation, under ``eventcast serve``).
    """
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


#: XORs a payload with its mask: ``(payload, mask) -> bytes``.
Unmask = Callable[[bytes | bytearray, bytes], bytes]


class FrameReader:
    """Turns the bytes a client sends into messages and control frames (RFC 6455 §5).

    :meth:`feed` returns ``(opcode, payload)`` pairs: ``1`` (text, checked to be
    UTF-8) and ``2`` (binary) for whole messages, fragments joined; ``OP_PING``,
    ``OP_PONG`` and ``OP_CLOSE`` (its payload checked: see :func:`close_code`)
    for control frames. The first violation stops the reader: it returns what
    came before it and sets :attr:`error`; later bytes are ignored.

    A message is bounded by ``max_size`` bytes, checked on each frame's header
    (so a client announcing a huge frame is refused before sending it); what is
    buffered is bounded by that plus one frame header.

    Args:
        max_size: the largest message, in bytes (1009 past it).
        unmask: XORs a payload with its mask (default: :func:`unmask`).
    """

    __slots__ = ("_buffer", "_fragments", "_opcode", "_size", "_unmask", "error", "max_size")

    def __init__(self, max_size: int, unmask: Unmask = unmask) -> None:
        self.max_size = max_size
        self._unmask = unmask
        #: The first protocol violation (``None`` while the client behaves).
        self.error: WebSocketError | None = None
        self._buffer: bytearray | None = None
        #: The opcode of a fragmented message in progress (0: none), its parts and size.
        self._opcode = 0
        self._fragments: list[bytes] | None = None
        self._size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Take bytes from the socket; return the messages and control frames they complete."""
        if self.error is not None:
            return []
        buffer = self._buffer
        view: bytes | bytearray
        if buffer is not None:
            buffer += data
            view = buffer
        else:
            view = data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(view)
        try:
            while end - pos >= 2:
                first = view[pos]
                second = view[pos + 1]
                if first & 0x70:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
                if not second & 0x80:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "unmasked client frame")
                opcode = first & 0x0F
                length = second & 0x7F
                head = 6
                if length == 126:
                    if end - pos < 4:
                        break
                    length = int.from_bytes(view[pos + 2 : pos + 4], "big")
                    head = 8
                elif length == 127:
                    if end - pos < 10:
                        break
                    length = int.from_bytes(view[pos + 2 : pos + 10], "big")
                    if length >> 63:
                        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
                    head = 14
                # A whole message in one frame, none in progress (the usual): what
                # _check and _frame would find, in line.
                whole = first in _WHOLE and not self._opcode
                if not whole or length > self.max_size:
                    self._check(opcode, bool(first & 0x80), length)
                if end - pos < head + length:
                    break
                mask = bytes(view[pos + head - 4 : pos + head])
                payload = (
                    self._unmask(view[pos + head : pos + head + length], mask) if length else b""
                )
                pos += head + length
                if whole:
                    if opcode == 0x1:
                        _check_text(payload)
                    out.append((opcode, payload))
                    continue
                message = self._frame(opcode, bool(first & 0x80), payload)
                if message is not None:
                    out.append(message)
        except WebSocketError as exc:
            self.error = exc
            self._buffer = None
            self._fragments = None
            return out
        if pos == end:
            self._buffer = None
        elif buffer is not None:
            del buffer[:pos]
        else:
            self._buffer = bytearray(view[pos:])
        return out

    def _check(self, opcode: int, fin: bool, length: int) -> None:
        """Refuse a frame on its header: opcode, fragmentation and size."""
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > _MAX_CONTROL:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frame too long")
            return
        if opcode == OP_CONTINUATION:
            if not self._opcode:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation of no message")
        elif opcode in _DATA_OPCODES:
            if self._opcode:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
        else:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved opcode")
        if self._size + length > self.max_size:
            raise WebSocketError(CLOSE_TOO_BIG, "message too big")

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> tuple[int, bytes] | None:
        """A whole frame, checked on its header: the message or control frame it completes."""
        if opcode >= OP_CLOSE:
            if opcode == OP_CLOSE:
                _check_close(payload)
            return opcode, payload
        if opcode:  # the first (maybe only) frame of a message
            if fin:
                if opcode == 1:
                    _check_text(payload)
                return opcode, payload
            self._opcode = opcode
            self._fragments = [payload] if payload else []
            self._size = len(payload)
            return None
        fragments = self._fragments
        assert fragments is not None
        if payload:  # (empty fragments are not kept: the list stays bounded by max_size)
            fragments.append(payload)
            self._size += len(payload)
        if not fin:
            return None
        opcode = self._opcode
        self._opcode = 0
        self._fragments = None
        self._size = 0
        message = b"".join(fragments)
        if opcode == 1:
            _check_text(message)
        return opcode, message


def _check_text(payload: bytes) -> None:
    if payload.isascii():  # (valid UTF-8, found without decoding)
        return
    try:
        payload.decode()
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_INVALID_DATA, "invalid UTF-8") from None


def _check_close(payload: bytes) -> None:
    if not payload:
        return
    if len(payload) == 1:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame of one byte")
    code = int.from_bytes(payload[:2], "big")
    if code not in _SENDABLE and not 3000 <= code < 5000:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "invalid close code")
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_INVALID_DATA, "invalid UTF-8 in the close reason") from None
