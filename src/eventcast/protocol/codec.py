"""Encoding and decoding of Centrifuge JSON frames (pure functions, no I/O).

A WebSocket frame carries one or more JSON messages separated by ``\\n``. The
server decodes commands and encodes replies and pushes; the client does the
reverse. The hot path, a publication push, is assembled from pre-encoded
pieces so the payload bytes are never decoded or encoded again.

Error contract: decoding raises only :class:`ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from ..events import Event
from .codes import ClientError
from .frames import METHODS, Command, Reply

__all__ = [
    "PING",
    "ProtocolError",
    "decode_commands",
    "decode_replies",
    "encode_command",
    "encode_commands",
    "encode_error",
    "encode_publication",
    "encode_push",
    "encode_reply",
    "method_of",
    "publication_push",
]


class ProtocolError(Exception):
    """A frame is not valid Centrifuge JSON (malformed, wrong types, unknown shape)."""


_command_decoder = msgspec.json.Decoder(Command)
_reply_decoder = msgspec.json.Decoder(Reply)
_encode = msgspec.json.Encoder().encode

#: A server ping (and a client pong): an empty JSON object.
PING: Final = b"{}"


def _lines(data: bytes | str) -> list[bytes]:
    if isinstance(data, str):
        data = data.encode()
    return [line for line in data.split(b"\n") if line.strip()]


def decode_commands(data: bytes | str) -> list[Command]:
    """Decode every command in one frame.

    Raises:
        ProtocolError: the frame is empty, not JSON, or a command is malformed.
    """
    lines = _lines(data)
    if not lines:
        raise ProtocolError("empty frame")
    try:
        return [_command_decoder.decode(line) for line in lines]
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed command: {exc}") from None


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
    try:
        return [_reply_decoder.decode(line) for line in _lines(data)]
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed reply: {exc}") from None


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


def encode_push(channel: str, kind: str, body: Any) -> bytes:
    """Encode a push of ``kind`` (``pub``, ``join``, ``unsubscribe`` …) for a channel."""
    inner = b"{}" if body is None else _encode(body)
    if channel:
        return b'{"push":{"channel":%s,"%s":%s}}' % (_encode(channel), kind.encode(), inner)
    return b'{"push":{"%s":%s}}' % (kind.encode(), inner)


def encode_publication(
    data: bytes,
    *,
    offset: int | None = None,
    tags: Mapping[str, str] | None = None,
    channel: str | None = None,
    time_ms: int | None = None,
    info: bytes | None = None,
) -> bytes:
    """Assemble a publication object around already-encoded ``data``."""
    parts = [b'{"data":', data]
    if info is not None:
        parts += [b',"info":', info]
    if offset:
        parts.append(b',"offset":%d' % offset)
    if tags:
        parts += [b',"tags":', _encode(dict(tags))]
    if time_ms:
        parts.append(b',"time":%d' % time_ms)
    if channel:
        parts += [b',"channel":', _encode(channel)]
    parts.append(b"}")
    return b"".join(parts)


def publication_of(event: Event, *, concrete_channel: bool = False) -> bytes:
    """Encode an event as a publication object (the concrete topic in tags if asked).

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    tags: Mapping[str, str] | None = event.tags or None
    channel = None
    if concrete_channel:
        tags = {**event.tags, "topic": event.topic}
        channel = event.topic
    return encode_publication(event.encoded_data(), offset=event.offset, tags=tags, channel=channel)


def publication_push(channel: str, event: Event, *, concrete_channel: bool = False) -> bytes:
    """Encode the push that delivers ``event`` to subscribers of ``channel``.

    ``channel`` is the subscription's channel (a pattern for pattern
    subscriptions, in which case ``concrete_channel`` puts the event's own
    topic in the publication's ``channel`` field and in its ``topic`` tag).

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    pub = publication_of(event, concrete_channel=concrete_channel)
    return b'{"push":{"channel":%s,"pub":%s}}' % (_encode(channel), pub)
