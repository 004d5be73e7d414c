"""How each transport carries messages: joining, framing, and the end of a connection.

A :class:`~eventcast.server.connection.Connection` queues encoded messages
(replies and pushes, in its :class:`~eventcast.protocol.encodings.Encoding`)
and writes what was queued in one loop turn as one write. Its :class:`Wire`
says how those messages become bytes on the socket:

==================  =================  ============================================================
wire                transport          one write of messages ``m1 … mn``
==================  =================  ============================================================
``websocket``       WebSocket          one text frame ``m1\\nm2…`` (JSON) or one binary frame
                                       ``m1m2…`` (Protobuf: each message is length-delimited)
``uni_websocket``   WebSocket          one text frame per message (what Centrifugo sends: a client
                                       with no SDK parses each frame as one JSON push)
``sse``             HTTP, chunked      eventcast's SSE stream: already formatted events
``http_stream``     HTTP, chunked      ``m1\\nm2…\\n`` (JSON) or ``m1m2…`` (Protobuf), as
                                       centrifuge-js reads a stream
``sse_emulation``   HTTP, chunked      one SSE event ``data: m1\\ndata: m2…\\n\\n``: its data is
                                       ``m1\\nm2…``, which centrifuge-js splits into replies
``uni_http_stream`` HTTP, chunked      ``m1\\nm2…\\n``: one JSON push per line
``uni_sse``         HTTP, chunked      one SSE event per message: ``data: m1\\n\\ndata: m2\\n\\n``
==================  =================  ============================================================

A write shared by many connections (one batch of one channel) is framed once
per wire by the :class:`~eventcast.server.connection.Flusher`, whatever the
number of connections. JSON messages never contain a newline (the encoder
escapes it), so splitting and prefixing by lines is exact.

The transports of the Centrifuge protocol other than WebSocket end with a
``disconnect`` push (:attr:`Wire.disconnect_push`): an HTTP response cannot
carry a close code. ``uni_websocket`` sends the push before its close frame
too, as Centrifugo does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..protocol.encodings import Encoding
from ..protocol.framing import OP_BINARY, frame_chunk, frame_text, websocket_frame

__all__ = ["WIRES", "Wire", "wire_for"]


@dataclass(frozen=True, slots=True, eq=False)
class Wire:
    """How one transport carries a connection's messages."""

    #: The transport's name (the ``transport`` label of the metrics).
    name: str
    #: The encoding names this wire can carry.
    encodings: frozenset[str]
    #: WebSocket (frames, a close frame) rather than an HTTP response body.
    websocket: bool
    #: Whether the WebSocket frames are binary.
    binary: bool
    #: Joins the messages queued in one loop turn into one payload.
    separator: bytes
    #: A payload as the content of one ASGI message: the WebSocket message, or
    #: the bytes of the HTTP body (before chunking).
    body: Callable[[bytes], bytes]
    #: A payload pre-framed for the socket (WebSocket frames, or an HTTP chunk).
    frame: Callable[[bytes], bytes]
    #: WebSocket only: one frame per message rather than one per payload.
    frame_per_message: bool = False
    #: Ends with a ``disconnect`` push (the close code and reason).
    disconnect_push: bool = False
    #: eventcast's own SSE stream (composite cursors; not the Centrifuge protocol).
    eventcast_sse: bool = False
    #: Carries commands from the client (the bidirectional transports).
    bidirectional: bool = True

    def __repr__(self) -> str:
        return f"<Wire {self.name}>"


def _same(payload: bytes) -> bytes:
    return payload


def _line(payload: bytes) -> bytes:
    return payload + b"\n"


def _line_chunk(payload: bytes) -> bytes:
    return frame_chunk(payload + b"\n")


def _binary(payload: bytes) -> bytes:
    return websocket_frame(payload, OP_BINARY)


def _text_per_message(payload: bytes) -> bytes:
    return b"".join(frame_text(message) for message in payload.split(b"\n"))


def _sse_event(payload: bytes) -> bytes:
    # One event whose data has a line per message (EventSource joins them with "\n").
    return b"data: %s\n\n" % payload.replace(b"\n", b"\ndata: ")


def _sse_event_chunk(payload: bytes) -> bytes:
    return frame_chunk(_sse_event(payload))


def _sse_events(payload: bytes) -> bytes:
    # One event per message.
    return b"data: %s\n\n" % payload.replace(b"\n", b"\n\ndata: ")


def _sse_events_chunk(payload: bytes) -> bytes:
    return frame_chunk(_sse_events(payload))


_JSON: Final = frozenset({"json"})
_UNI: Final = frozenset({"uni_json"})

#: Every wire, by transport name.
WIRES: Final[dict[str, tuple[Wire, ...]]] = {
    "websocket": (
        Wire("websocket", _JSON, True, False, b"\n", _same, frame_text),
        Wire("websocket", frozenset({"protobuf"}), True, True, b"", _same, _binary),
    ),
    "sse": (Wire("sse", _JSON, False, False, b"", _same, frame_chunk, eventcast_sse=True),),
    "http_stream": (
        Wire("http_stream", _JSON, False, False, b"\n", _line, _line_chunk, disconnect_push=True),
        Wire(
            "http_stream",
            frozenset({"protobuf"}),
            False,
            False,
            b"",
            _same,
            frame_chunk,
            disconnect_push=True,
        ),
    ),
    "sse_emulation": (
        Wire(
            "sse_emulation",
            _JSON,
            False,
            False,
            b"\n",
            _sse_event,
            _sse_event_chunk,
            disconnect_push=True,
        ),
    ),
    "uni_websocket": (
        Wire(
            "uni_websocket",
            _UNI,
            True,
            False,
            b"\n",
            _same,
            _text_per_message,
            frame_per_message=True,
            disconnect_push=True,
            bidirectional=False,
        ),
    ),
    "uni_http_stream": (
        Wire(
            "uni_http_stream",
            _UNI,
            False,
            False,
            b"\n",
            _line,
            _line_chunk,
            disconnect_push=True,
            bidirectional=False,
        ),
    ),
    "uni_sse": (
        Wire(
            "uni_sse",
            _UNI,
            False,
            False,
            b"\n",
            _sse_events,
            _sse_events_chunk,
            disconnect_push=True,
            bidirectional=False,
        ),
    ),
}


def wire_for(transport: str, encoding: Encoding) -> Wire:
    """The wire of ``transport`` carrying ``encoding``.

    Raises:
        ValueError: the transport is unknown or cannot carry this encoding.
    """
    for wire in WIRES.get(transport, ()):
        if encoding.name in wire.encodings:
            return wire
    if transport not in WIRES:
        raise ValueError(f"unknown transport {transport!r}")
    raise ValueError(f"the {transport} transport cannot carry the {encoding.name} encoding")
