"""Events and stream positions (pure, no I/O).

An :class:`Event` is one immutable object shared by every subscriber: the bus
never copies it. Wherever bytes are needed (the log, the network) the event's
data is encoded once, lazily, and the bytes are cached on the event.
"""

from __future__ import annotations

import random
import threading
import time as _time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import msgspec
from msgspec.structs import force_setattr as _force_setattr

from .exceptions import EncodeError, PositionError

__all__ = [
    "EARLIEST",
    "Event",
    "History",
    "Position",
    "encode_data",
    "new_event",
    "new_event_id",
]

_EMPTY_TAGS: Final[Mapping[str, str]] = MappingProxyType({})

# Event ids: 32 decimal digits, sortable as text in time order. An id is a
# 29-digit prefix, shared by a chunk of up to 1,000 ids, then a 3-digit suffix
# from a fixed table. The prefix is 13 digits of Unix milliseconds, a 10-digit
# number drawn at random per process (so a clash between processes is
# astronomically unlikely) and a 6-digit chunk counter; a new chunk starts when
# the clock passes into a new millisecond or the suffixes run out. An id then
# costs one float comparison, one ``next()`` on a tuple iterator (atomic under
# the GIL, so ids are unique across threads) and one concatenation. Chunks
# start under a lock and are published as one tuple, so a reader never pairs a
# prefix with another chunk's suffixes. The millisecond part never moves back,
# even when the clock does, so a process's ids always increase.
_SUFFIXES: Final = tuple(f"{i:03d}" for i in range(1000))
#: The clock of ids and event times (a module global: one lookup, not two, per event).
_clock: Final = _time.time
_ids_lock = threading.Lock()
_high = 10**9 + random.SystemRandom().randrange(8 * 10**9)
_chunk = 0
_last_ms = 0
# (the next millisecond boundary, the prefix, the chunk's suffixes)
_ids: tuple[float, str, Iterator[str]] = (-1.0, "", iter(()))


def _next_chunk(now: float, seen: tuple[float, str, Iterator[str]]) -> tuple[str, str]:
    """Start a new chunk of ids (unless another thread just did); return (prefix, suffix)."""
    global _ids, _high, _chunk, _last_ms
    with _ids_lock:
        state = _ids
        if state is not seen and now < state[0]:
            suffix = next(state[2], None)
            if suffix is not None:
                return state[1], suffix
        ms = _last_ms = max(int(now * 1000), _last_ms)
        _chunk += 1
        if _chunk == 10**6:
            _high, _chunk = _high + 1, 0
        suffixes = iter(_SUFFIXES)
        prefix = f"{ms:013d}{_high:010d}{_chunk:06d}"
        _ids = ((ms + 1) / 1000, prefix, suffixes)
        return prefix, next(suffixes)


def new_event_id() -> str:
    """Return a new time-ordered unique id: 32 decimal digits, sortable as text."""
    now = _clock()
    state = _ids
    if now >= state[0] or (suffix := next(state[2], None)) is None:
        return "".join(_next_chunk(now, state))
    return state[1] + suffix


def new_event(
    topic: str,
    data: Any,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> Event:
    """Build a new event, its id and time from one clock reading (the publish hot path).

    ``tags`` must already be frozen (see :func:`freeze_tags`).
    """
    now = _clock()
    state = _ids
    if now >= state[0] or (suffix := next(state[2], None)) is None:
        event_id = "".join(_next_chunk(now, state))
    else:
        event_id = state[1] + suffix
    if tags is None and idempotency_key is None:
        return Event(topic=topic, data=data, id=event_id, time=now)
    return Event(
        topic=topic,
        data=data,
        id=event_id,
        time=now,
        tags=_EMPTY_TAGS if tags is None else tags,
        idempotency_key=idempotency_key,
    )


_json_encode = msgspec.json.Encoder().encode


def encode_data(data: object) -> bytes:
    """Encode event data to JSON bytes; ``bytes`` pass through untouched.

    Raises:
        EncodeError: the data is not JSON-serialisable.
    """
    if isinstance(data, bytes):
        return data
    try:
        return _json_encode(data)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise EncodeError(f"cannot encode {type(data).__name__} data as JSON: {exc}") from exc


class Event(msgspec.Struct, frozen=True, kw_only=True, eq=False, gc=False):
    """One published event, immutable and shared by every subscriber.

    An ``Event`` is a frozen, slotted ``msgspec.Struct``: it behaves like a
    frozen dataclass (assignment raises ``AttributeError``) and is built about
    ten times faster, which matters because one is built per publish. Two
    events are equal when their ids are equal.

    Attributes:
        topic: the concrete topic it was published on.
        data: the payload exactly as published (any object in process; JSON
            values or ``bytes`` when it crosses the log or the network).
        id: a time-ordered unique id (32 digits; generated when omitted).
        time: Unix time of publication, in seconds.
        offset: its position in a durable topic's stream (1, 2, 3, …), or
            ``None`` for a live-only topic.
        epoch: the stream's epoch, which changes whenever continuity of the
            stream cannot be proven; ``None`` for a live-only topic.
        tags: string metadata, read-only.
        idempotency_key: set when the publisher asked for exactly-once storage.
    """

    topic: str
    data: Any
    id: str = msgspec.field(default_factory=new_event_id)
    time: float = msgspec.field(default_factory=_time.time)
    offset: int | None = None
    epoch: str | None = None
    tags: Mapping[str, str] = _EMPTY_TAGS
    idempotency_key: str | None = None
    # Internal: the encoded data once computed (set on the frozen struct with
    # ``force_setattr``). Pass ``_cache=payload`` when the bytes are known.
    _cache: bytes | None = None

    @property
    def position(self) -> Position | None:
        """The event's stream position, or ``None`` for a live-only topic."""
        if self.offset is None or self.epoch is None:
            return None
        return Position(self.offset, self.epoch)

    def encoded_data(self) -> bytes:
        """Return the data as JSON bytes, encoding at most once per event.

        Raises:
            EncodeError: the data is not JSON-serialisable.
        """
        cache = self._cache
        if cache is not None:
            return cache
        encoded = encode_data(self.data)
        _force_setattr(self, "_cache", encoded)
        return encoded

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        parts = [f"topic={self.topic!r}", f"data={self.data!r}", f"id={self.id!r}"]
        if self.offset is not None:
            parts.append(f"offset={self.offset}")
            parts.append(f"epoch={self.epoch!r}")
        if self.tags:
            parts.append(f"tags={dict(self.tags)!r}")
        return f"Event({', '.join(parts)})"


def freeze_tags(tags: Mapping[str, str] | None) -> Mapping[str, str]:
    """Return a read-only copy of ``tags`` after checking every key and value is a str."""
    if not tags:
        return _EMPTY_TAGS
    for k, v in tags.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("tags must map str to str")
    return MappingProxyType(dict(tags))


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a durable topic's stream: the last offset seen and the stream's epoch.

    Resuming from ``Position(offset, epoch)`` replays every event after
    ``offset``, provided the epoch still matches.
    """

    offset: int
    epoch: str

    def __post_init__(self) -> None:
        if isinstance(self.offset, bool) or not isinstance(self.offset, int):
            raise PositionError(f"offset must be an int, not {type(self.offset).__name__}")
        if self.offset < 0:
            raise PositionError(f"offset must be >= 0, not {self.offset}")
        if not isinstance(self.epoch, str):
            raise PositionError(f"epoch must be a str, not {type(self.epoch).__name__}")

    @classmethod
    def coerce(cls, value: object) -> Position:
        """Build a position from a ``Position``, an ``(offset, epoch)`` pair or a mapping.

        Raises:
            PositionError: the value is not a well-formed position.
        """
        if isinstance(value, Position):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(value["offset"], value["epoch"])
            except KeyError as exc:
                raise PositionError(f"a position needs 'offset' and 'epoch': {exc}") from exc
        if isinstance(value, tuple | list) and len(value) == 2:
            return cls(value[0], value[1])
        raise PositionError(f"not a position: {value!r}")


#: Pass as ``since=`` to replay everything a durable topic still keeps.
EARLIEST: Final = "earliest"


@dataclass(frozen=True, slots=True)
class History:
    """A page of a durable topic's history.

    Attributes:
        events: the events, in the order asked for.
        position: the topic's latest position (its top offset and epoch).
    """

    events: list[Event]
    position: Position
