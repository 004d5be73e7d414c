"""Encoding and decoding of Centrifuge JSON frames (pure functions, no I/O).

A WebSocket frame carries one or more JSON messages separated by ``\\n``. The
server decodes commands and encodes replies and pushes; the client does the
reverse. The hot path, a publication push, is assembled from pre-encoded
pieces so the payload bytes are never decoded or encoded again.

Error contract: decoding raises only :class:`ProtocolError`, in time linear in
the size of its input. JSON nested deeper than :data:`MAX_JSON_DEPTH` levels is
malformed here: the depth of what the decoder accepts must not depend on how
deep the Python stack happens to be when it runs (msgspec's own guard does).

:mod:`.protobuf` is the same API for the Protobuf encoding; :mod:`.encodings`
puts both behind one interface.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

import msgspec

from ..events import Event
from .codes import ClientError
from .frames import METHODS, Command, ConnectRequest, EmulationRequest, Reply

__all__ = [
    "BOUNDED_DEPTH",
    "MAX_JSON_DEPTH",
    "PING",
    "UNI_PING",
    "ProtocolError",
    "Shape",
    "bounded_json",
    "decode_commands",
    "decode_connect_request",
    "decode_emulation_request",
    "decode_json",
    "decode_replies",
    "encode_command",
    "encode_commands",
    "encode_error",
    "encode_pub_push",
    "encode_publication",
    "encode_push",
    "encode_reply",
    "encode_uni_pub_push",
    "encode_uni_push",
    "method_of",
    "publication_fields",
    "publication_of",
    "publication_push",
    "string_data",
]


class ProtocolError(Exception):
    """Bytes from a peer are not a valid protocol message (malformed, wrong types, wrong shape).

    Raised by every decoder of the protocol core: JSON and Protobuf frames,
    fossil deltas (:class:`~eventcast.protocol.delta.DeltaError`) and tag
    filters (:class:`~eventcast.protocol.filters.FilterError`).
    """


# A nesting deep enough to exhaust the decoder's recursion limit (``[[[[...`` in
# a ``data`` field) raises RecursionError, not DecodeError: it is bad input too.
_DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


_command_decoder = msgspec.json.Decoder(Command)
_reply_decoder = msgspec.json.Decoder(Reply)
_encode = msgspec.json.Encoder().encode

_decode_any = msgspec.json.Decoder().decode

#: A server ping (and a client pong): an empty JSON object.
PING: Final = b"{}"
#: The ping of unidirectional transports: an empty push.
UNI_PING: Final = b"{}"

#: The deepest nesting of arrays and objects accepted in JSON from outside.
MAX_JSON_DEPTH: Final = 64

_STRUCTURE_ONLY: Final = bytes(sorted(set(range(256)) - set(b'[]{}"')))
# A string that still holds brackets, once escapes are gone (possessive: one scan).
_BRACKETED_STRING: Final = re.compile(rb'"[^"]*+"')
# Opening brackets become +1, closing ones -1 (as signed bytes).
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
#: Innermost layers removed with bytes.replace before the remaining depth is summed.
_PASSES: Final = 8
# Up to this size, brackets are counted in the data itself first; a larger body
# is reduced to its brackets and quotes first (one pass, not two), and they are
# counted there.
_COUNT_FIRST: Final = 512


def too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``data`` nests arrays and objects deeper than ``limit`` levels.

    Linear in ``len(data)`` and done in C. A bracket count decides for nearly
    all inputs (a large body's, once all but its brackets and quotes are
    dropped). Otherwise escapes and strings are removed, leaving the brackets;
    passes of ``bytes.replace`` remove the innermost layers until the brackets
    left cannot reach the limit (so that wide, shallow JSON costs little
    more), and the depth of what is left is summed. Over the valid prefix of
    any input the result is exact; what follows a syntax error (where a
    decoder stops) can only make it larger.
    """
    if len(data) <= _COUNT_FIRST and data.count(b"[") + data.count(b"{") <= limit:
        return False
    if b"\\" in data:  # (a search for two bytes costs more than this one for one)
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = data.translate(None, _STRUCTURE_ONLY)
    if structure.count(b"[") + structure.count(b"{") <= limit:
        return False
    if 2 * structure.count(b'""') == structure.count(b'"'):
        # Every quote closes or opens a string beside the one it pairs with: no
        # string holds a bracket, and the quotes can simply go.
        steps = structure.translate(_STEPS, b'"')
    else:
        structure = structure.replace(b'""', b"")  # strings without brackets
        structure = _BRACKETED_STRING.sub(b"", structure)
        structure = structure.partition(b'"')[0]  # an unterminated string ends the input
        steps = structure.translate(_STEPS)
    removed = 0
    # The brackets left bound the depth left: peel layers while they could reach the limit.
    while removed + steps.count(b"\x01") > limit:
        if removed == _PASSES:
            break
        reduced = steps.replace(b"\x01\xff", b"")
        if len(reduced) == len(steps):
            break
        steps, removed = reduced, removed + 1
    else:
        return False
    if b"\x01" * (limit - removed + 1) in steps:  # the usual attack, found without summing
        return True
    return removed + max(itertools.accumulate(memoryview(steps).cast("b"))) > limit


#: The nesting a bounded shape's JSON values may have (see :func:`bounded_json`).
BOUNDED_DEPTH: Final = 6


def bounded_json(depth: int) -> Any:
    """The type of a JSON value nested at most ``depth`` levels, for msgspec.

    A value of this type decodes to the dicts, lists and scalars untyped JSON
    decodes to; one nested deeper is refused by the decoder, in C, as soon as
    it is reached. (msgspec builds a decoder per branch of the type, so its size
    doubles with each level: keep ``depth`` small.)
    """
    value: Any = str | int | float | bool | None
    for _ in range(depth):
        value = str | int | float | bool | None | dict[str, value] | list[value]
    return value


class Shape(NamedTuple):
    """The common form of a JSON body, decoded straight into its structs.

    ``bounded`` decodes it when every JSON value in it is nested at most
    :data:`BOUNDED_DEPTH` levels (:func:`bounded_json`) and it has no field
    the structs do not name: its type bounds the body's depth, so it is tried
    before the depth check. ``typed`` decodes any other body of that form
    (unknown fields ignored), after the check.
    """

    bounded: msgspec.json.Decoder[Any]
    typed: msgspec.json.Decoder[Any]


def decode_json(data: bytes | str, shape: Shape | None = None) -> Any:
    """Decode a JSON value from outside (a request body, a message's data).

    ``shape``: the common form of a body, tried first (decoded straight into
    its structs, checked in C; see :class:`Shape`); a value that does not fit
    it is decoded as plain JSON, and its errors are the caller's to report.

    Raises:
        ProtocolError: ``data`` is not JSON, not UTF-8, or nested deeper than
            :data:`MAX_JSON_DEPTH`.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return _checked(_decode_any, data, "JSON", shape)


def _checked(decode: Any, data: bytes, what: str, shape: Shape | None = None) -> Any:
    """Decode one JSON message from outside: bounded depth, only ProtocolError.

    ``shape`` is tried first: its bounded form before the one depth check, its
    typed form after (see :func:`decode_json`).
    """
    if shape is not None:
        try:
            return shape.bounded.decode(data)
        except _DECODE_ERRORS:
            pass  # deeper, another form, or not JSON: checked and decoded below
    if too_deep(data):
        raise ProtocolError(f"{what} nested deeper than {MAX_JSON_DEPTH} levels")
    if shape is not None:
        try:
            return shape.typed.decode(data)
        except _DECODE_ERRORS:
            pass  # not of that shape (or not JSON): decoded plainly, with its own errors
    try:
        return decode(data)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed {what}: {exc}") from None


def _lines(data: bytes | str) -> list[bytes]:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if b"\n" not in data:  # (one command per frame, the usual)
        return [data] if data.strip() else []
    return [line for line in data.split(b"\n") if line.strip()]


def decode_commands(data: bytes | str) -> list[Command]:
    """Decode every command in one frame.

    Raises:
        ProtocolError: the frame is empty, not JSON, nested deeper than
            :data:`MAX_JSON_DEPTH`, or a command is malformed.
    """
    lines = _lines(data)
    if not lines:
        raise ProtocolError("empty frame")
    decode = _command_decoder.decode
    if len(lines) == 1:
        return [_checked(decode, lines[0], "command")]
    return [_checked(decode, line, "command") for line in lines]


def method_of(command: Command) -> str | None:
    """Return the request field set in a command (``None`` for a bare ``{}``)."""
    for name in METHODS:
        if getattr(command, name) is not None:
            return name
    return None


def decode_replies(data: bytes | str) -> list[Reply]:
    """Decode every reply or push in one frame (for clients).

    Raises:
        ProtocolError: the frame is not valid replies.
    """
    decode = _reply_decoder.decode
    return [_checked(decode, line, "reply") for line in _lines(data)]


def encode_command(command: Command) -> bytes:
    """Encode one command (for clients)."""
    return _encode(command)


def encode_commands(commands: Iterable[Command]) -> bytes:
    """Encode several commands into one frame (for clients)."""
    return b"\n".join(_encode(c) for c in commands)


def encode_reply(command_id: int, method: str, result: Any) -> bytes:
    """Encode a successful reply: ``{"id": N, "<method>": result}``."""
    body = b"{}" if result is None else _encode(result)
    return b'{"id":%d,"%s":%s}' % (command_id, method.encode(), body)


def encode_error(command_id: int, error: ClientError) -> bytes:
    """Encode an error reply: ``{"id": N, "error": {...}}``."""
    payload: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.temporary:
        payload["temporary"] = True
    return b'{"id":%d,"error":%s}' % (command_id, _encode(payload))


#: A push, as a ``Reply`` carries it (``%s``: the bare push).
_PUSH: Final = b'{"push":%s}'
#: A publication's bare push (``%s``: the channel, encoded, and the publication).
_UNI_PUB_PUSH: Final = b'{"channel":%s,"pub":%s}'
#: A publication's push in a ``Reply``: the two above, in one format.
_PUB_PUSH: Final = _PUSH % _UNI_PUB_PUSH


def encode_push(channel: str, kind: str, body: Any) -> bytes:
    """Encode a push of ``kind`` (``pub``, ``join``, ``unsubscribe`` …) for a channel."""
    return _PUSH % encode_uni_push(channel, kind, body)


def encode_uni_push(channel: str, kind: str, body: Any) -> bytes:
    """Encode a bare push, as unidirectional transports send it (no ``Reply`` around it).

    ``uni_websocket``, ``uni_http_stream`` and ``uni_sse`` carry only pushes:
    ``{"connect": …}`` first, then ``{"channel": …, "pub": …}`` and the like;
    :data:`UNI_PING` (an empty push) is their ping.
    """
    inner = b"{}" if body is None else _encode(body)
    if channel:
        return b'{"channel":%s,"%s":%s}' % (_encode(channel), kind.encode(), inner)
    return b'{"%s":%s}' % (kind.encode(), inner)


def encode_publication(
    data: bytes,
    *,
    offset: int | None = None,
    tags: Mapping[str, str] | None = None,
    channel: str | None = None,
    time_ms: int | None = None,
    info: bytes | None = None,
    delta: bool = False,
) -> bytes:
    """Assemble a publication object around already-encoded ``data``.

    ``delta`` marks ``data`` as a fossil delta (see :func:`string_data` for
    how data travels to a subscription that negotiated deltas).
    """
    if info is None and not tags and not delta and not time_ms and not channel:
        # (the usual publication: its data and, in a durable channel, its offset)
        return b'{"data":%s,"offset":%d}' % (data, offset) if offset else b'{"data":%s}' % data
    parts = [b'{"data":', data]
    if info is not None:
        parts += [b',"info":', info]
    if offset:
        parts.append(b',"offset":%d' % offset)
    if tags:
        parts += [b',"tags":', _encode(dict(tags))]
    if delta:
        parts.append(b',"delta":true')
    if time_ms:
        parts.append(b',"time":%d' % time_ms)
    if channel:
        parts += [b',"channel":', _encode(channel)]
    parts.append(b"}")
    return b"".join(parts)


def publication_fields(
    event: Event, *, concrete_channel: bool = False
) -> tuple[Mapping[str, str] | None, str | None]:
    """The ``tags`` and ``channel`` of the publication of ``event`` (either encoding).

    For a pattern subscription (``concrete_channel``), the event's own topic
    goes in the publication's ``channel`` and in its ``topic`` tag.
    """
    if concrete_channel:
        return {**event.tags, "topic": event.topic}, event.topic
    return event.tags or None, None


def publication_of(event: Event, *, concrete_channel: bool = False) -> bytes:
    """Encode an event as a publication object (the concrete topic in tags if asked).

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    tags, channel = publication_fields(event, concrete_channel=concrete_channel)
    return encode_publication(event.encoded_data(), offset=event.offset, tags=tags, channel=channel)


def publication_push(channel: str, event: Event, *, concrete_channel: bool = False) -> bytes:
    """Encode the push that delivers ``event`` to subscribers of ``channel``.

    ``channel`` is the subscription's channel (a pattern for pattern
    subscriptions, in which case ``concrete_channel`` puts the event's own
    topic in the publication's ``channel`` field and in its ``topic`` tag).

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    return encode_pub_push(channel, publication_of(event, concrete_channel=concrete_channel))


def encode_pub_push(channel: str, publication: bytes) -> bytes:
    """Wrap an encoded publication object in the push that delivers it in ``channel``."""
    return _PUB_PUSH % (_encode(channel), publication)


def encode_uni_pub_push(channel: str, publication: bytes) -> bytes:
    """Wrap an encoded publication object in a bare push (unidirectional transports)."""
    return _UNI_PUB_PUSH % (_encode(channel), publication)


_connect_decoder = msgspec.json.Decoder(ConnectRequest)


def decode_connect_request(data: bytes | str) -> ConnectRequest:
    """Decode the connect request of a unidirectional connection.

    It is the first message of ``uni_websocket``, the body of a
    ``uni_http_stream`` (or ``uni_sse`` POST) request, or the ``cf_connect``
    URL parameter of ``uni_sse`` and of the SSE emulation transport: a JSON
    ``ConnectRequest`` (``token``, ``data``, ``name``, ``version``, ``subs``
    with ``recover``/``offset``/``epoch``, ``headers``).

    Raises:
        ProtocolError: the data is not a JSON connect request.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    request: ConnectRequest = _checked(_connect_decoder.decode, data, "connect request")
    return request


def string_data(payload: bytes) -> bytes | None:
    """Encode a payload or a fossil delta as the ``data`` of a delta-mode publication.

    A subscription that negotiated ``delta: "fossil"`` over JSON receives every
    publication's data as a JSON *string* holding the payload's text (or the
    delta's, with ``"delta": true``); the SDK keeps those bytes as the base of
    the next delta. Returns ``None`` when ``payload`` is not UTF-8 text (a
    delta cut inside a multi-byte character): send the full payload then.
    """
    try:
        return _encode(payload.decode())
    except UnicodeDecodeError:
        return None


class _EmulationBody(msgspec.Struct, forbid_unknown_fields=False):
    node: str = ""
    session: str = ""
    data: str = ""


_emulation_decoder = msgspec.json.Decoder(_EmulationBody)


def decode_emulation_request(body: bytes) -> EmulationRequest:
    """Decode the JSON body POSTed to the emulation endpoint.

    ``data`` is a string of newline-separated commands in JSON; it comes back
    as bytes, ready for :func:`decode_commands`.

    Raises:
        ProtocolError: the body is not a JSON emulation request.
    """
    body_: _EmulationBody = _checked(_emulation_decoder.decode, body, "emulation request")
    return EmulationRequest(node=body_.node, session=body_.session, data=body_.data.encode())
