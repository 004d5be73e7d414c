"""The two encodings of the Centrifuge protocol behind one interface, and how a client picks one.

:class:`Encoding` is what the session state machine and the hub use, so they
never branch on the encoding: :data:`JSON` (:mod:`.codec`) and the Protobuf
encoding (:mod:`.protobuf`, loaded on first use by :func:`get_encoding`,
since it needs the ``protobuf`` package).

Both encode a publication once and wrap the same bytes for every channel and
connection: :meth:`Encoding.publication_of` once per publication and
encoding, :meth:`Encoding.encode_pub_push` once per channel.

How a client selects Protobuf, as the official SDKs do it (centrifuge-js 5
and centrifuge-python send the WebSocket subprotocol; older SDKs, the Dart
one for instance, the ``format`` query parameter; centrifuge-js's
WebTransport, ``cf_protocol``):

========================  ===============================================================
transport                 selector (anything else means JSON)
========================  ===============================================================
WebSocket                 subprotocol ``centrifuge-protobuf`` (which the server must echo
                          in its handshake answer), or ``?cf_protocol=protobuf``, or the
                          legacy ``?format=protobuf``: see :func:`websocket_encoding`
HTTP-streaming            request ``Content-Type: application/octet-stream``:
                          see :func:`stream_encoding`
SSE                       JSON only (an ``EventSource`` carries text)
========================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ..events import Event
from . import codec
from .codes import ClientError
from .frames import Command, EmulationRequest

__all__ = [
    "JSON",
    "PROTOBUF_CONTENT_TYPE",
    "PROTOBUF_SUBPROTOCOL",
    "UNI_JSON",
    "Encoding",
    "get_encoding",
    "stream_encoding",
    "websocket_encoding",
]

#: The WebSocket subprotocol with which the SDKs ask for Protobuf.
PROTOBUF_SUBPROTOCOL: Final = "centrifuge-protobuf"
#: The content type of Protobuf HTTP-streaming and emulation bodies.
PROTOBUF_CONTENT_TYPE: Final = "application/octet-stream"


class _EncodePublication(Protocol):
    def __call__(
        self,
        data: bytes,
        *,
        offset: int | None = None,
        tags: Mapping[str, str] | None = None,
        channel: str | None = None,
        time_ms: int | None = None,
        delta: bool = False,
    ) -> bytes: ...


class _FromEvent(Protocol):
    def __call__(self, event: Event, *, concrete_channel: bool = False) -> bytes: ...


class _PushFromEvent(Protocol):
    def __call__(self, channel: str, event: Event, *, concrete_channel: bool = False) -> bytes: ...


@dataclass(frozen=True, slots=True, eq=False)
class Encoding:
    """One wire encoding of the Centrifuge protocol, over the frames of :mod:`.frames`.

    Its attributes are the encoding module's own functions (no wrapper on the
    hot path). Every ``encode_*`` function returns one message, ready to be
    joined with others into a frame by :attr:`join`. Decoders raise only
    :class:`~.codec.ProtocolError`.
    """

    #: ``"json"``, ``"protobuf"`` or ``"uni_json"``.
    name: str
    #: Whether frames are binary (WebSocket binary frames) or text.
    binary: bool
    #: A server ping, one message.
    ping: bytes
    #: Join encoded messages into one frame.
    join: Callable[[Iterable[bytes]], bytes]
    #: Decode every command in one frame.
    decode_commands: Callable[[bytes | str], list[Command]]
    #: Decode the body an emulation client POSTs.
    decode_emulation_request: Callable[[bytes], EmulationRequest]
    #: ``(command_id, method, result)``: a successful reply (``result`` is a
    #: frames struct, a mapping with the same field names, or ``None``).
    encode_reply: Callable[[int, str, Any], bytes]
    #: ``(command_id, error)``: an error reply.
    encode_error: Callable[[int, ClientError], bytes]
    #: ``(channel, kind, body)``: a push of ``kind`` (``join``, ``unsubscribe`` …).
    encode_push: Callable[[str, str, Any], bytes]
    #: A publication around already-encoded data (``delta=True``: a fossil delta).
    encode_publication: _EncodePublication
    #: An event as a publication: call it once per publication and encoding.
    publication_of: _FromEvent
    #: ``(channel, publication)``: the push delivering an encoded publication.
    encode_pub_push: Callable[[str, bytes], bytes]
    #: The push delivering an event in a channel.
    publication_push: _PushFromEvent
    #: The data of a delta-mode publication (a payload or a fossil delta);
    #: ``None`` when this encoding cannot carry it (JSON and bytes that are
    #: not UTF-8): send the full payload then.
    delta_data: Callable[[bytes], bytes | None]

    def __repr__(self) -> str:
        return f"<Encoding {self.name}>"


def _newline_join(messages: Iterable[bytes]) -> bytes:
    return b"\n".join(messages)


#: The JSON encoding (:mod:`.codec`): newline-separated messages in text frames.
JSON: Final = Encoding(
    name="json",
    binary=False,
    ping=codec.PING,
    join=_newline_join,
    decode_commands=codec.decode_commands,
    decode_emulation_request=codec.decode_emulation_request,
    encode_reply=codec.encode_reply,
    encode_error=codec.encode_error,
    encode_push=codec.encode_push,
    encode_publication=codec.encode_publication,
    publication_of=codec.publication_of,
    encode_pub_push=codec.encode_pub_push,
    publication_push=codec.publication_push,
    delta_data=codec.string_data,
)


def _uni_reply(command_id: int, method: str, result: Any) -> bytes:
    return codec.encode_uni_push("", method, result)


def _uni_error(command_id: int, error: ClientError) -> bytes:
    return b""


def _uni_publication_push(channel: str, event: Event, *, concrete_channel: bool = False) -> bytes:
    return codec.encode_uni_pub_push(
        channel, codec.publication_of(event, concrete_channel=concrete_channel)
    )


#: The messages of the unidirectional transports (``uni_websocket``,
#: ``uni_http_stream``, ``uni_sse``): JSON pushes without a ``Reply`` around
#: them. The answer to ``connect`` is the ``{"connect": {…}}`` push; there are
#: no error replies (an error encodes to nothing: the transport closes with a
#: ``disconnect`` push instead); the ping is an empty push ``{}``. Publications
#: are the JSON encoding's, so both share them (:attr:`Encoding.publication_of`).
UNI_JSON: Final = Encoding(
    name="uni_json",
    binary=False,
    ping=codec.UNI_PING,
    join=_newline_join,
    decode_commands=codec.decode_commands,
    decode_emulation_request=codec.decode_emulation_request,
    encode_reply=_uni_reply,
    encode_error=_uni_error,
    encode_push=codec.encode_uni_push,
    encode_publication=codec.encode_publication,
    publication_of=codec.publication_of,
    encode_pub_push=codec.encode_uni_pub_push,
    publication_push=_uni_publication_push,
    delta_data=codec.string_data,
)


def _identity(payload: bytes) -> bytes | None:
    return payload


def _load_protobuf() -> Encoding:
    from . import protobuf

    return Encoding(
        name="protobuf",
        binary=True,
        ping=protobuf.PING,
        join=protobuf.join,
        decode_commands=protobuf.decode_commands,
        decode_emulation_request=protobuf.decode_emulation_request,
        encode_reply=protobuf.encode_reply,
        encode_error=protobuf.encode_error,
        encode_push=protobuf.encode_push,
        encode_publication=protobuf.encode_publication,
        publication_of=protobuf.publication_of,
        encode_pub_push=protobuf.encode_pub_push,
        publication_push=protobuf.publication_push,
        delta_data=_identity,
    )


_protobuf: Encoding | None = None


def get_encoding(name: str) -> Encoding:
    """Return the encoding called ``name`` (``"json"`` or ``"protobuf"``).

    Raises:
        ValueError: no encoding has this name.
        ImportError: ``"protobuf"`` needs the ``protobuf`` package
            (``pip install eventcast[server]``).
    """
    global _protobuf
    if name == "json":
        return JSON
    if name != "protobuf":
        raise ValueError(f"unknown encoding {name!r} (expected 'json' or 'protobuf')")
    if _protobuf is None:
        _protobuf = _load_protobuf()
    return _protobuf


def websocket_encoding(
    subprotocols: Sequence[str], query: Mapping[str, str]
) -> tuple[str, str | None]:
    """Pick the encoding of a WebSocket connection from its handshake.

    Args:
        subprotocols: the subprotocols the client offered
            (``Sec-WebSocket-Protocol``), in its order of preference.
        query: the query parameters of the connection URL.

    Returns:
        The encoding's name and the subprotocol to accept in the handshake
        answer (``None``: accept none). A browser fails the connection if a
        subprotocol it asked for is not echoed back.
    """
    if PROTOBUF_SUBPROTOCOL in subprotocols:
        return "protobuf", PROTOBUF_SUBPROTOCOL
    if query.get("cf_protocol") == "protobuf" or query.get("format") == "protobuf":
        return "protobuf", None
    return "json", None


def stream_encoding(content_type: str | None) -> str:
    """Pick the encoding of an HTTP-streaming connection or emulation request from its body type.

    centrifuge-js posts ``application/octet-stream`` for Protobuf and
    ``application/json`` for JSON; a missing or other type means JSON.
    """
    if content_type is None:
        return "json"
    media_type = content_type.partition(";")[0].strip().lower()
    return "protobuf" if media_type == PROTOBUF_CONTENT_TYPE else "json"
