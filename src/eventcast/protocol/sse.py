"""Server-Sent Events: field encoding and the composite cursor (pure, no I/O).

The SSE stream of eventcast (``/connection/sse``) is public and documented:

* every (re)connection first sends ``event: subscribed`` whose data is
  ``{"topics": [...], "recovered": true|false}``;
* each publication is a default ``message`` event whose ``data:`` is a JSON
  object with ``topic``, ``offset``, ``epoch``, ``data`` and ``tags``, and whose
  ``id:`` is the *composite cursor*: the position of every durable topic of the
  stream, so the browser's automatic ``Last-Event-ID`` reconnect resumes every
  topic exactly;
* comments (``: ping``) keep the connection alive, ``retry:`` hints the
  reconnect delay.

The cursor is opaque to clients. Its text form is ``1;`` followed by
``topic!offset!epoch`` entries separated by ``;`` (none of ``; !`` can appear in
a topic name, an offset or an epoch). A malformed cursor is treated as no
cursor at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from .._caches import remember
from .frames import MAX_INT

__all__ = [
    "RESPONSE_HEADERS",
    "Cursor",
    "InvalidFieldError",
    "comment",
    "encode_event",
    "parse_cursor",
    "publication_data",
    "retry",
    "sse_body",
    "subscribed_event",
]

_encode = msgspec.json.Encoder().encode
_FORBIDDEN: Final = ("\r", "\n", "\0")
_VERSION: Final = "1"
#: Most successors a cursor keeps (emptied when full).
_SUCCESSORS: Final = 65
#: The longest cursor accepted from a client, in characters.
MAX_CURSOR_LENGTH: Final = 65_536
#: The headers of an event stream's response (no caching, no proxy buffering).
RESPONSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class InvalidFieldError(ValueError):
    """An SSE field value contains CR, LF or NUL, which would inject fields."""


def _check_field(name: str, value: str) -> str:
    if any(c in value for c in _FORBIDDEN):
        raise InvalidFieldError(f"the SSE {name} must not contain CR, LF or NUL")
    return value


def encode_event(
    data: bytes | str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry_ms: int | None = None,
) -> bytes:
    """Encode one SSE event. Multiline data becomes several ``data:`` lines.

    Raises:
        InvalidFieldError: ``event`` or ``id`` contains CR, LF or NUL.
    """
    parts: list[bytes] = []
    if event is not None:
        parts.append(b"event: " + _check_field("event type", event).encode() + b"\n")
    if id is not None:
        parts.append(b"id: " + _check_field("event id", id).encode() + b"\n")
    if retry_ms is not None:
        parts.append(b"retry: %d\n" % retry_ms)
    raw = data.encode() if isinstance(data, str) else data
    # Every line break style the EventSource parser knows (CRLF, CR, LF) is a
    # line break: split on all of them so no data line can end an event early.
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    parts.extend(b"data: " + line + b"\n" for line in lines)
    parts.append(b"\n")
    return b"".join(parts)


def comment(text: str = "") -> bytes:
    """Encode a comment line (a heartbeat); CR, LF and NUL are removed."""
    clean = "".join(c for c in text if c not in _FORBIDDEN)
    return b": " + clean.encode() + b"\n\n"


def retry(milliseconds: int) -> bytes:
    """Encode a bare ``retry:`` hint."""
    return b"retry: %d\n\n" % milliseconds


def publication_data(
    topic: str, offset: int | None, epoch: str | None, data: bytes, tags: Mapping[str, str]
) -> bytes:
    """The JSON body of a publication event; ``data`` is already-encoded JSON."""
    return b"".join(
        (
            b'{"topic":',
            _encode(topic),
            b',"offset":',
            b"null" if offset is None else b"%d" % offset,
            b',"epoch":',
            _encode(epoch),
            b',"data":',
            data,
            b',"tags":',
            _encode(dict(tags)),
            b"}",
        )
    )


@dataclass(frozen=True, slots=True)
class Cursor:
    """The positions of a stream's durable topics: ``{topic: (offset, epoch)}``.

    Cursors are immutable; :meth:`advance` returns a new one, memoized per
    event so connections that share a cursor share its successors too.
    """

    positions: tuple[tuple[str, int, str], ...]
    text: str
    _next: dict[str, Cursor] = field(default_factory=dict, compare=False, repr=False)
    #: Memo for servers: the encoded message that produced this cursor, by event id.
    message: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)
    #: The topics this cursor has a position for.
    topics: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def of(cls, positions: Mapping[str, tuple[int, str]]) -> Cursor:
        """Build a cursor from ``{topic: (offset, epoch)}``."""
        items = tuple(sorted((t, o, e) for t, (o, e) in positions.items()))
        text = ";".join([_VERSION, *(f"{t}!{o}!{e}" for t, o, e in items)])
        return cls(items, text, topics=frozenset(t for t, _, _ in items))

    def as_dict(self) -> dict[str, tuple[int, str]]:
        """Return the positions as ``{topic: (offset, epoch)}``."""
        return {t: (o, e) for t, o, e in self.positions}

    def advance(self, key: str, topic: str, offset: int, epoch: str) -> Cursor:
        """Return the cursor after an event of ``topic`` at ``offset`` (memoized by ``key``)."""
        cached = self._next.get(key)
        if cached is not None:
            return cached
        positions = self.as_dict()
        positions[topic] = (offset, epoch)
        successor = Cursor.of(positions)
        return remember(self._next, key, successor, _SUCCESSORS)


def parse_cursor(text: str | None, topics: Iterable[str] = ()) -> Cursor | None:
    """Parse a cursor from ``Last-Event-ID`` (or the ``lastEventID`` parameter).

    Returns ``None`` for a missing or malformed cursor (never raises). Only the
    entries for ``topics`` are kept when topics are given.
    """
    if not text or len(text) > MAX_CURSOR_LENGTH:
        return None
    parts = text.split(";")
    if parts[0] != _VERSION:
        return None
    wanted = set(topics)
    positions: dict[str, tuple[int, str]] = {}
    for part in parts[1:]:
        fields = part.split("!")
        if len(fields) != 3:
            return None
        topic, offset_text, epoch = fields
        # ASCII only: str.isdigit() accepts "²", which int() refuses.
        # (At most 19 digits: 2**63 - 1 has 19, and int() refuses over 4300.)
        if not (
            topic and len(offset_text) <= 19 and offset_text.isascii() and offset_text.isdigit()
        ):
            return None
        if not (epoch.isascii() and epoch.isalnum()):
            return None
        offset = int(offset_text)
        if offset > MAX_INT:
            return None
        if not wanted or topic in wanted:
            positions[topic] = (offset, epoch)
    return Cursor.of(positions)


def sse_body(event: Any) -> bytes:
    """The ``data:`` lines (and blank line) of a publication event, without its id.

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    body = publication_data(
        event.topic, event.offset, event.epoch, event.encoded_data(), event.tags
    )
    if b"\n" in body or b"\r" in body:
        return encode_event(body)
    return b"data: " + body + b"\n\n"


def subscribed_event(topics: Iterable[str], recovered: bool, extra: Mapping[str, Any]) -> bytes:
    """The ``event: subscribed`` sent first on every (re)connection."""
    body = {"topics": list(topics), "recovered": recovered, **extra}
    return encode_event(_encode(body), event="subscribed")
