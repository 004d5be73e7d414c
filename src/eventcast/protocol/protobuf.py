"""Encoding and decoding of Centrifuge Protobuf frames (pure functions, no I/O).

The same API as :mod:`.codec` (the JSON encoding), over the same ``msgspec``
frames of :mod:`.frames`, so the session state machine and the hub never know
which encoding a connection speaks.

Framing, as the SDKs send it: a WebSocket binary frame (or an HTTP-streaming
body) holds one or more messages, each preceded by its length as a varint.
Every ``encode_*`` function here returns one message *already delimited*, so a
frame of several is their plain concatenation (:func:`join`). An empty
``Reply`` (the single byte ``0x00``) is a server ping; an empty ``Command`` is
the client's pong.

``bytes`` fields (``data``, ``conn_info``, …) travel as they are: in the
frames they are ``msgspec.Raw`` holding the bytes exactly as the peer sent
them, which need not be JSON. Messages are built and parsed by the module
that ``protoc`` generated from ``_pb/client.proto`` (``make proto``); only the
hot path, a publication push, is assembled by hand around the publication
encoded once, so one publication costs one ``SerializeToString`` whatever the
number of channels and connections it reaches.

Error contract: decoding raises only :class:`~.codec.ProtocolError`.

Needs the ``protobuf`` package (in the ``server`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any, Final, TypeVar

import msgspec
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ..events import Event
from ._pb import client_pb2 as pb
from .codec import ProtocolError, publication_fields
from .codes import ClientError
from .frames import Command, EmulationRequest, Reply

__all__ = [
    "PING",
    "PONG",
    "decode_commands",
    "decode_emulation_request",
    "decode_replies",
    "encode_command",
    "encode_commands",
    "encode_emulation_request",
    "encode_error",
    "encode_pub_push",
    "encode_publication",
    "encode_push",
    "encode_reply",
    "join",
    "publication_of",
    "publication_push",
    "split",
]

#: A server ping: an empty ``Reply``, delimited.
PING: Final = b"\x00"
#: A client pong: an empty ``Command``, delimited.
PONG: Final = b"\x00"

# A length prefix is a varint of at most 10 bytes (64 bits).
_MAX_VARINT_BYTES: Final = 10
# Protobuf's own decoder reports malformed input with DecodeError; the rest are
# what a hostile message could still raise on its way into a frames struct.
_DECODE_ERRORS: Final = (DecodeError, RecursionError, ValueError, msgspec.ValidationError)

_M = TypeVar("_M", bound=Message)
_T = TypeVar("_T")

# -- framing ------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL: Final = [bytes((n,)) for n in range(0x80)]


def split(data: bytes | bytearray | memoryview) -> list[bytes]:
    """Cut a frame into its messages (the bytes after each length prefix).

    Raises:
        ProtocolError: a length prefix is malformed or runs past the end.
    """
    buf = bytes(data)
    size = len(buf)
    messages: list[bytes] = []
    pos = 0
    while pos < size:
        length = shift = 0
        limit = min(size, pos + _MAX_VARINT_BYTES)
        while True:
            if pos >= limit:
                raise ProtocolError("truncated or overlong length prefix")
            byte = buf[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        end = pos + length
        if end > size:
            raise ProtocolError(f"message of {length} bytes runs past the end of the frame")
        messages.append(buf[pos:end])
        pos = end
    return messages


def _delimit(message: bytes) -> bytes:
    return _varint(len(message)) + message


def join(messages: Iterable[bytes]) -> bytes:
    """Join encoded (delimited) messages into one frame."""
    return b"".join(messages)


# -- protobuf messages <-> msgspec frames ----------------------------------------------------

# How to read one field of a message: (name, kind, message descriptor of the
# value for message kinds).
_SCALAR, _BYTES, _MESSAGE, _REPEATED_MESSAGE, _REPEATED, _MAP_MESSAGE, _MAP = range(7)


@cache
def _plan(descriptor: Descriptor) -> dict[str, tuple[int, Descriptor | None]]:
    plan: dict[str, tuple[int, Descriptor | None]] = {}
    for field in descriptor.fields:
        sub = field.message_type
        if field.type == FieldDescriptor.TYPE_MESSAGE and sub is not None:
            if sub.GetOptions().map_entry:
                value = sub.fields_by_name["value"]
                if value.type == FieldDescriptor.TYPE_MESSAGE:
                    plan[field.name] = (_MAP_MESSAGE, value.message_type)
                else:
                    plan[field.name] = (_MAP, None)
            elif field.is_repeated:
                plan[field.name] = (_REPEATED_MESSAGE, sub)
            else:
                plan[field.name] = (_MESSAGE, sub)
        elif field.is_repeated:
            plan[field.name] = (_REPEATED, None)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            plan[field.name] = (_BYTES, None)
        else:
            plan[field.name] = (_SCALAR, None)
    return plan


def _to_builtins(message: Message) -> dict[str, Any]:
    """The fields set in ``message`` as plain values (``bytes`` as ``msgspec.Raw``)."""
    plan = _plan(message.DESCRIPTOR)
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        kind = plan[field.name][0]
        if kind == _SCALAR:
            out[field.name] = value
        elif kind == _BYTES:
            out[field.name] = msgspec.Raw(value)
        elif kind == _MESSAGE:
            out[field.name] = _to_builtins(value)
        elif kind == _REPEATED_MESSAGE:
            out[field.name] = [_to_builtins(item) for item in value]
        elif kind == _MAP_MESSAGE:
            out[field.name] = {key: _to_builtins(item) for key, item in value.items()}
        elif kind == _MAP:
            out[field.name] = dict(value)
        else:
            out[field.name] = list(value)
    return out


def _items(value: object) -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return value.items()
    if isinstance(value, msgspec.Struct):
        return ((name, getattr(value, name)) for name in value.__struct_fields__)
    raise TypeError(f"cannot encode {type(value).__name__} as a Protobuf message")


def _fill(message: Message, value: object) -> None:
    """Set the fields of ``message`` from a frames struct or a mapping with the same names.

    ``None`` and empty ``Raw`` mean absent; unknown names are a programming
    error (``TypeError``): every frames struct is named after ``client.proto``.
    """
    plan = _plan(message.DESCRIPTOR)
    for name, item in _items(value):
        if item is None:
            continue
        try:
            kind = plan[name][0]
        except KeyError:
            raise TypeError(f"{message.DESCRIPTOR.name} has no field {name!r}") from None
        if kind == _SCALAR:
            setattr(message, name, item)
        elif kind == _BYTES:
            if item:
                setattr(message, name, bytes(item))
        elif kind == _MESSAGE:
            sub = getattr(message, name)
            sub.SetInParent()
            _fill(sub, item)
        elif kind == _REPEATED_MESSAGE:
            container = getattr(message, name)
            for element in item:
                _fill(container.add(), element)
        elif kind == _MAP_MESSAGE:
            container = getattr(message, name)
            for key, element in item.items():
                _fill(container[key], element)
        elif kind == _MAP:
            getattr(message, name).update(item)
        else:
            getattr(message, name).extend(item)


def _parse(cls: Callable[[], _M], data: bytes) -> _M:
    message = cls()
    message.ParseFromString(data)
    return message


def _decode_all(
    data: bytes | bytearray | memoryview | str, cls: Callable[[], Message], target: type[_T]
) -> list[_T]:
    if isinstance(data, str):
        raise ProtocolError("a Protobuf frame must be binary, not text")
    try:
        # An empty message (a pong, a ping) is common and needs no parsing.
        return [
            msgspec.convert(_to_builtins(_parse(cls, message)), target) if message else target()
            for message in split(data)
        ]
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed {target.__name__.lower()}: {exc}") from None


# -- server side ------------------------------------------------------------------------------


def decode_commands(data: bytes | bytearray | memoryview | str) -> list[Command]:
    """Decode every command in one binary frame.

    Raises:
        ProtocolError: the frame is empty, text, or a command is malformed.
    """
    if not data:
        raise ProtocolError("empty frame")
    return _decode_all(data, pb.Command, Command)


def decode_emulation_request(body: bytes) -> EmulationRequest:
    """Decode the Protobuf body POSTed to the emulation endpoint.

    ``data`` holds delimited commands, ready for :func:`decode_commands`.

    Raises:
        ProtocolError: the body is not an ``EmulationRequest``.
    """
    try:
        message = _parse(pb.EmulationRequest, bytes(body))
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed emulation request: {exc}") from None
    return EmulationRequest(node=message.node, session=message.session, data=message.data)


def encode_reply(command_id: int, method: str, result: Any) -> bytes:
    """Encode a successful reply to ``method`` (a frames result struct, a mapping or ``None``)."""
    reply = pb.Reply(id=command_id)
    body = getattr(reply, method)
    body.SetInParent()
    if result is not None:
        _fill(body, result)
    return _delimit(reply.SerializeToString())


def encode_error(command_id: int, error: ClientError) -> bytes:
    """Encode an error reply."""
    reply = pb.Reply(id=command_id)
    reply.error.code = error.code
    reply.error.message = error.message
    reply.error.temporary = error.temporary
    return _delimit(reply.SerializeToString())


def encode_push(channel: str, kind: str, body: Any) -> bytes:
    """Encode a push of ``kind`` (``pub``, ``join``, ``unsubscribe`` …) for a channel."""
    reply = pb.Reply()
    push = reply.push
    if channel:
        push.channel = channel
    inner = getattr(push, kind)
    inner.SetInParent()
    if body is not None:
        _fill(inner, body)
    return _delimit(reply.SerializeToString())


def encode_publication(
    data: bytes,
    *,
    offset: int | None = None,
    tags: Mapping[str, str] | None = None,
    channel: str | None = None,
    time_ms: int | None = None,
    delta: bool = False,
) -> bytes:
    """Encode a ``Publication`` message (not delimited: it is embedded in a push or a result).

    ``data`` travels as is; ``delta`` marks it as a fossil delta.
    """
    pub = pb.Publication(data=data, delta=delta)
    if offset:
        pub.offset = offset
    if tags:
        pub.tags.update(tags)
    if time_ms:
        pub.time = time_ms
    if channel:
        pub.channel = channel
    return pub.SerializeToString()


def publication_of(event: Event, *, concrete_channel: bool = False) -> bytes:
    """Encode an event as a ``Publication`` (the concrete topic in tags if asked).

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    tags, channel = publication_fields(event, concrete_channel=concrete_channel)
    return encode_publication(event.encoded_data(), offset=event.offset, tags=tags, channel=channel)


# Field keys of the hand-assembled push: Reply.push (4), Push.channel (2) and
# Push.pub (4), each length-delimited (wire type 2).
_REPLY_PUSH: Final = b"\x22"
_PUSH_CHANNEL: Final = b"\x12"
_PUSH_PUB: Final = b"\x22"


def encode_pub_push(channel: str, publication: bytes) -> bytes:
    """Wrap an encoded ``Publication`` in the delimited push that delivers it in ``channel``.

    Assembled from the pre-encoded publication, so it is never parsed or
    encoded again; the bytes are what ``Reply(push=Push(channel, pub))``
    serialises to.
    """
    name = channel.encode()
    push = b"".join(
        (
            _PUSH_CHANNEL,
            _varint(len(name)),
            name,
            _PUSH_PUB,
            _varint(len(publication)),
            publication,
        )
        if name
        else (_PUSH_PUB, _varint(len(publication)), publication)
    )
    reply_size = 1 + len(_varint(len(push))) + len(push)
    return b"".join((_varint(reply_size), _REPLY_PUSH, _varint(len(push)), push))


def publication_push(channel: str, event: Event, *, concrete_channel: bool = False) -> bytes:
    """Encode the delimited push that delivers ``event`` to subscribers of ``channel``.

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    return encode_pub_push(channel, publication_of(event, concrete_channel=concrete_channel))


# -- client side (the Python client and the tests) ------------------------------------------


def encode_command(command: Command) -> bytes:
    """Encode one command, delimited."""
    message = pb.Command()
    _fill(message, command)
    return _delimit(message.SerializeToString())


def encode_commands(commands: Iterable[Command]) -> bytes:
    """Encode several commands into one frame."""
    return join(encode_command(c) for c in commands)


def decode_replies(data: bytes | bytearray | memoryview) -> list[Reply]:
    """Decode every reply or push in one frame.

    Raises:
        ProtocolError: the frame is not valid replies.
    """
    return _decode_all(data, pb.Reply, Reply)


def encode_emulation_request(node: str, session: str, data: bytes) -> bytes:
    """Encode the body an emulation client POSTs (not delimited: it is the whole body)."""
    return pb.EmulationRequest(node=node, session=session, data=data).SerializeToString()
