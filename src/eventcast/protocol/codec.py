"""Encoding and decoding of Centrifuge JSON frames (pure functions, no I/O).

A WebSocket frame carries one or more JSON messages separated by ``\\n``. The
server decodes commands and encodes replies and pushes; the client does the
reverse. The hot path, a publication push, is assembled from pre-encoded
pieces so the payload bytes are never decoded or encoded again.

Error contract: decoding raises only :class:`ProtocolError`, in time linear in
the size of its input. JSON nested deeper than :data:`MAX_JSON_DEPTH` levels is
malformed here: the depth of what the decoder accepts must not depend on how
deep the Python stack happens to be when it runs (msgspec's own guard does).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec

from ..events import Event
from .codes import ClientError
from .frames import METHODS, Command, Publication, Reply

__all__ = [
    "MAX_JSON_DEPTH",
    "PING",
    "ProtocolError",
    "decode_commands",
    "decode_json",
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

_decode_any = msgspec.json.Decoder().decode

#: A server ping (and a client pong): an empty JSON object.
PING: Final = b"{}"

#: The deepest nesting of arrays and objects accepted in JSON from outside.
MAX_JSON_DEPTH: Final = 64

_STRUCTURE_ONLY: Final = bytes(sorted(set(range(256)) - set(b'[]{}"')))
# A string that still holds brackets, once escapes are gone (possessive: one scan).
_BRACKETED_STRING: Final = re.compile(rb'"[^"]*+"')
# Opening brackets become +1, closing ones -1 (as signed bytes).
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
#: Innermost layers removed with bytes.replace before the remaining depth is summed.
_PASSES: Final = 8


def too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON ``data`` nests arrays and objects deeper than ``limit`` levels.

    Linear in ``len(data)`` and done in C. A bracket count decides for nearly
    all inputs. Otherwise escapes and strings are removed, leaving the
    brackets; a few passes of ``bytes.replace`` remove the innermost layers (so
    that wide, shallow JSON costs nothing more), and the depth of what is left
    is summed. Over the valid prefix of any input the result is exact; what
    follows a syntax error (where a decoder stops) can only make it larger.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    structure = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _STRUCTURE_ONLY)
    structure = structure.replace(b'""', b"")  # strings without brackets
    if b'"' in structure:
        structure = _BRACKETED_STRING.sub(b"", structure)
        structure = structure.partition(b'"')[0]  # an unterminated string ends the input
    steps = structure.translate(_STEPS)
    removed = 0
    while removed < _PASSES and steps:
        reduced = steps.replace(b"\x01\xff", b"")
        if len(reduced) == len(steps):
            break
        steps, removed = reduced, removed + 1
    if not steps:
        return False
    if b"\x01" * (limit - removed + 1) in steps:  # the usual attack, found without summing
        return True
    return removed + max(itertools.accumulate(memoryview(steps).cast("b"))) > limit


def decode_json(data: bytes | str) -> Any:
    """Decode a JSON value from outside (a request body, a message's data).

    Raises:
        ProtocolError: ``data`` is not JSON, not UTF-8, or nested deeper than
            :data:`MAX_JSON_DEPTH`.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if too_deep(data):
        raise ProtocolError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return _decode_any(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None


def _lines(data: bytes | str) -> list[bytes]:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
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
    commands: list[Command] = []
    for line in lines:
        if too_deep(line):
            raise ProtocolError(f"command nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            commands.append(_command_decoder.decode(line))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ProtocolError(f"malformed command: {exc}") from None
    return commands


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


def decode_publication(data: bytes) -> Publication:
    """Decode one publication object (for clients and tests).

    Raises:
        ProtocolError: the bytes are not a publication.
    """
    try:
        return msgspec.json.decode(data, type=Publication)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed publication: {exc}") from None
