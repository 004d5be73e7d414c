"""The ``EventLog`` abstract base class: a durable, numbered stream per topic.

Every topic written to a log is a stream of events numbered 1, 2, 3, … (the
*offset*) under an *epoch*: a random string chosen when the stream is created.
The epoch changes whenever the log cannot prove the stream is continuous: a
fresh or wiped store, or an explicit truncation. A subscriber that stopped at
``Position(offset, epoch)`` can therefore resume exactly, or learn plainly that
it cannot.

Implementations translate their driver's errors into :class:`LogError` and
import their driver lazily.

Streams nobody writes keep no state
-----------------------------------

Looking up the position of a topic never written must not create anything: a
client subscribing to a thousand random names would otherwise leave a thousand
rows behind. So a topic without stored state has offset 0 and its *empty
epoch*, derived, not stored::

    empty_epoch(store, topic, generation)  # sha1(store, topic, generation)[:8]

``store`` is a random id created with the store (a wiped store gets a new one),
``generation`` a counter shared by the topics of one of
:data:`EPOCH_BUCKETS` buckets (``epoch_bucket(topic)``), 0 until first used.
The first append to such a topic *claims* its empty epoch: in the same atomic
step it creates the stream under ``empty_epoch(store, topic, g)`` and moves its
bucket's counter to ``g + 1``. Hence:

* A client that saw ``(0, e)`` before the first publication resumes exactly:
  the stream was born under ``e``.
* A stream may later be forgotten entirely, by :meth:`EventLog.prune` once
  retention has removed all its events, or by the store itself (Redis keys and
  JetStream messages that expire with age retention), and no forgetting needs
  any bookkeeping: the counter already moved on when the stream was born, so
  the topic's next empty epoch (and the epoch of its next stream) differs from
  every epoch it had before. A client holding ``(n, old)`` learns plainly that
  it cannot resume, however the stream was forgotten.
* The price is a spurious change: when a topic is born, the empty epoch of the
  never-written topics of its bucket (1 in 65,536) changes too, and a client
  that saw such a topic's empty epoch gets ``recovered: false`` with nothing
  lost. Never the reverse.

The counters are bounded state (at most :data:`EPOCH_BUCKETS` small entries,
whatever the number of topics), unlike a row per name.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final

import msgspec

from ..deadletters import DeadLetter
from ..events import Event, Position
from ..exceptions import EncodeError, LogError

__all__ = [
    "DEFAULT_DEDUP_WINDOW",
    "EPOCH_BUCKETS",
    "EventLog",
    "LetterRow",
    "Retention",
    "decode_payload",
    "decode_tags",
    "empty_epoch",
    "encode_tags",
    "epoch_bucket",
    "new_epoch",
    "new_store_id",
]

#: How long an idempotency key is remembered, in seconds.
DEFAULT_DEDUP_WINDOW: Final = 120.0


def new_epoch() -> str:
    """Return a new random epoch string."""
    return secrets.token_hex(4)


#: How many generation counters derive the empty epochs (see the module docstring).
EPOCH_BUCKETS: Final = 65_536


def new_store_id() -> str:
    """Return a new random store id (one per store, created with it)."""
    return secrets.token_hex(8)


def epoch_bucket(topic: str) -> int:
    """Return the generation bucket of a topic, in ``range(EPOCH_BUCKETS)``."""
    return int.from_bytes(hashlib.sha1(topic.encode()).digest()[:4], "big") % EPOCH_BUCKETS


def empty_epoch(store: str, topic: str, generation: int) -> str:
    """Return the epoch of a topic with no stored state in ``store``.

    The Redis log computes the same string in Lua
    (``redis.sha1hex(store .. "\\n" .. topic .. "\\n" .. generation):sub(1, 8)``).
    """
    return hashlib.sha1(f"{store}\n{topic}\n{generation}".encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of a topic's stream a log keeps.

    Attributes:
        size: keep at most this many of the newest events (``>= 1``).
        ttl: drop events older than this many seconds (``None``: no age limit).
    """

    size: int
    ttl: float | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("Retention.size must be >= 1")
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError("Retention.ttl must be positive or None")


#: The retention used for a topic when the log is not told otherwise.
DEFAULT_RETENTION: Final = Retention(size=1000, ttl=None)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def encode_tags(tags: Mapping[str, str]) -> bytes | None:
    """Encode tags for storage (``None`` when there are none).

    Raises:
        EncodeError: a tag cannot be encoded (tags are strings; an event built
            by hand may hold anything).
    """
    if not tags:
        return None
    try:
        return _encode(dict(tags))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise EncodeError(f"cannot encode the event's tags as JSON: {exc}") from exc


def decode_tags(raw: bytes | str | None) -> Mapping[str, str]:
    """Decode stored tags to a read-only mapping."""
    if not raw:
        return MappingProxyType({})
    return MappingProxyType(_decode(raw))


def decode_payload(payload: bytes, binary: bool) -> Any:
    """Decode stored event data: raw ``bytes`` stay bytes, anything else is JSON."""
    if binary:
        return payload
    return _decode(payload)


#: One event to store: ``(topic, id, time, payload, binary, tags, idempotency key)``.
AppendItem = tuple[str, str, float, bytes, bool, "bytes | None", "str | None"]


def append_items(events: Sequence[Event]) -> list[AppendItem]:
    """Flatten events for storage, encoding each one's data (once, cached).

    Raises:
        EncodeError: an event's data or tags cannot be encoded (nothing is stored then).
    """
    return [append_item(e) for e in events]


def append_item(e: Event) -> AppendItem:
    """One event flattened for storage (see :data:`AppendItem`), its data encoded once.

    Raises:
        EncodeError: its data or tags cannot be encoded.
    """
    return (
        e.topic,
        e.id,
        e.time,
        e.encoded_data(),
        isinstance(e.data, bytes),
        encode_tags(e.tags),
        e.idempotency_key,
    )


def committed(event: Event, offset: int, epoch: str, payload: bytes) -> Event:
    """The event as committed: its own fields plus its offset and epoch.

    The copy carries the encoded data: the event's own, or ``payload`` when the
    event has none yet (the data is the same).
    """
    if event._cache is None:
        return _replace(event, offset=offset, epoch=epoch, _cache=payload)
    return _replace(event, offset=offset, epoch=epoch)


_replace = msgspec.structs.replace


def committed_events(events: Sequence[Event], rows: Sequence[Sequence[Any]]) -> list[Event]:
    """Events for the rows an append returned, one per event (see :func:`committed_row`)."""
    if len(events) != len(rows):
        raise ValueError(f"{len(rows)} rows for {len(events)} events")
    # (a plain zip: with strict=True, Python 3.11 takes a slower call path,
    # ~0.15 µs, paid once per durable publish)
    return [committed_row(e, row) for e, row in zip(events, rows)]  # noqa: B905 (checked above)


def committed_row(event: Event, row: Sequence[Any]) -> Event:
    """The event for the row an append returned for it: ``(epoch, offset)`` when
    the event itself was stored there, or a stored row ``(epoch, topic, offset,
    id, time, payload, binary, tags, ikey)``; a row with another id is an
    idempotent repeat and stands for the originally stored event."""
    if len(row) == 2:
        return committed(event, row[1], row[0], event.encoded_data())
    epoch, topic, offset, event_id, at, payload, binary, tags, ikey = row
    if event_id == event.id:
        return committed(event, offset, epoch, payload)
    return stored_event(topic, offset, epoch, event_id, at, payload, bool(binary), tags, ikey)


def stored_event(
    topic: str,
    offset: int,
    epoch: str,
    event_id: str,
    at: float,
    payload: bytes,
    binary: bool,
    tags: bytes | str | None,
    idempotency_key: str | None,
) -> Event:
    """Build the :class:`Event` for one stored row (its encoded bytes cached)."""
    return Event(
        topic=topic,
        data=decode_payload(payload, binary),
        id=event_id,
        time=at,
        offset=offset,
        epoch=epoch,
        tags=decode_tags(tags),
        idempotency_key=idempotency_key,
        _cache=payload,
    )


_decode_list = msgspec.json.Decoder(list[Any]).decode


def stored_events(topic: str, epoch: str, rows: Sequence[Sequence[Any]]) -> list[Event]:
    """Build the events of stored rows ``(offset, id, time, payload, binary, tags, ikey)``.

    The JSON payloads of a page are decoded in one call (a JSON array of them),
    which is several times faster than one decode per row.
    """
    payloads = [bytes(row[3]) for row in rows]
    json_rows = [p for p, row in zip(payloads, rows, strict=True) if not row[4]]
    values = iter(_decode_list(b"[" + b",".join(json_rows) + b"]") if json_rows else ())
    empty: Mapping[str, str] = MappingProxyType({})
    out: list[Event] = []
    for row, payload in zip(rows, payloads, strict=True):
        offset, event_id, at, _, binary, tags, ikey = row
        out.append(
            Event(
                topic=topic,
                data=payload if binary else next(values),
                id=event_id,
                time=at,
                offset=offset,
                epoch=epoch,
                tags=decode_tags(tags) if tags else empty,
                idempotency_key=ikey,
                _cache=payload,
            )
        )
    return out


def plain_events(topic: str, epoch: str, rows: Sequence[Sequence[Any]]) -> list[Event]:
    """Build the events of compact rows ``(offset, id, time, payload, extra)``.

    ``extra`` is ``None`` for the common event (JSON data, no tags, no
    idempotency key) and otherwise the JSON text ``[binary, tags, key]`` (tags
    as JSON text). A page of common events skips every per-row check: one
    decode of the page's payloads, one ``Event`` per row.
    """
    if any(row[4] is not None for row in rows):
        full = []
        for offset, event_id, at, payload, extra in rows:
            if extra is None:
                full.append((offset, event_id, at, payload, 0, None, None))
            else:
                binary, tags, key = _decode(extra)
                full.append((offset, event_id, at, payload, binary, tags, key))
        return stored_events(topic, epoch, full)
    payloads = [row[3] for row in rows]
    values = _decode_list(b"[" + b",".join(payloads) + b"]") if rows else []
    return [
        Event(
            topic=topic,
            data=value,
            id=row[1],
            time=row[2],
            offset=row[0],
            epoch=epoch,
            _cache=payload,
        )
        for row, payload, value in zip(rows, payloads, values, strict=True)
    ]


#: A dead letter flattened for storage; see :func:`letter_to_row`.
LetterRow = tuple[
    int, str, str, int, "str | None", float, str, str, float, bytes, bool, "bytes | None"
]


def letter_to_row(letter: DeadLetter) -> LetterRow | None:
    """Flatten a dead letter for storage, or ``None`` if its data cannot be encoded."""
    event = letter.event
    try:
        payload = event.encoded_data()
    except EncodeError:
        return None
    return (
        letter.id,
        letter.subscriber,
        letter.reason,
        letter.attempts,
        letter.error,
        letter.time,
        event.topic,
        event.id,
        event.time,
        payload,
        isinstance(event.data, bytes),
        encode_tags(event.tags),
    )


def row_to_letter(row: Sequence[Any]) -> DeadLetter:
    """Rebuild a dead letter from a stored row (the inverse of :func:`letter_to_row`)."""
    (
        lid,
        subscriber,
        reason,
        attempts,
        error,
        at,
        topic,
        event_id,
        event_time,
        payload,
        binary,
        tags,
    ) = row
    payload = bytes(payload)
    event = Event(
        topic=topic,
        data=decode_payload(payload, bool(binary)),
        id=event_id,
        time=event_time,
        tags=decode_tags(tags),
        _cache=payload,
    )
    return DeadLetter(
        event=event,
        subscriber=subscriber,
        reason=reason,
        attempts=attempts,
        error=error,
        time=at,
        id=lid,
    )


class EventLog(ABC):
    """A durable, numbered log of events, one stream per topic.

    Subclasses implement the abstract methods; :meth:`open` and :meth:`close`
    are called by the bus (or use ``async with``). ``close`` is idempotent.

    Every method raises only :class:`LogError` for a failure of the store.
    """

    #: How long an idempotency key is remembered, in seconds.
    dedup_window: float

    def __init__(self, *, dedup_window: float = DEFAULT_DEDUP_WINDOW) -> None:
        if dedup_window <= 0:
            raise ValueError("dedup_window must be positive")
        self.dedup_window = dedup_window
        self._retention: Callable[[str], Retention] = lambda topic: DEFAULT_RETENTION

    # -- retention --------------------------------------------------------------

    def set_retention(self, policy: Callable[[str], Retention]) -> None:
        """Say what each topic keeps: ``policy(topic)`` returns its :class:`Retention`.

        The bus calls this with its namespaces' limits before it opens the log;
        until then every topic keeps :data:`DEFAULT_RETENTION`.
        """
        self._retention = policy

    def retention(self, topic: str) -> Retention:
        """Return what ``topic`` keeps (size and age limits)."""
        return self._retention(topic)

    # -- lifecycle --------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Connect or open files, create the schema if needed. Idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Release every resource. Idempotent; safe after cancellation."""

    async def __aenter__(self) -> EventLog:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- writing ----------------------------------------------------------------

    @abstractmethod
    async def append(self, events: Sequence[Event]) -> list[Event]:
        """Commit events atomically and return them with ``offset`` and ``epoch`` set.

        Offsets are assigned per topic, in order, with no gaps. The whole batch
        is committed or nothing is. An event whose ``idempotency_key`` was
        already stored for its topic within the dedup window is not stored
        again: the originally stored event is returned in its place.

        Raises:
            LogError: nothing was committed.
            EncodeError: an event's data cannot be encoded (nothing was committed).
        """

    def _appending(self, events: Sequence[Event]) -> Awaitable[list[Event]]:
        """What to await for ``append(events)`` (the bus's publish path).

        The default is :meth:`append`'s coroutine. A log that hands its writes
        to a thread of its own (:class:`~eventcast.log.SQLiteLog`) queues the
        request at the call and returns its future: one coroutine frame less
        per durable publish. Raises what :meth:`append` raises, at the call or
        from the awaitable.
        """
        return self.append(events)

    async def _append_then(self, event: Event, then: Callable[[list[Event]], object]) -> Event:
        """Append one event; call ``then`` with the committed events; return it as committed.

        The bus's path for durable publishes: ``then`` fans the events out, and
        is called in the order the commits' publishers would have resumed in,
        so subscribers see offset order. By default it is called here with
        ``[event]``, before returning. A log that groups the appends made
        while its writer is busy (:class:`~eventcast.log.SQLiteLog`) calls it once per
        group with the events of every append made with the same ``then``
        object, before any of their callers resumes: one pass for a burst of
        publishes. The event carries no idempotency key (a repeat would be
        fanned out again).

        Raises what :meth:`append` raises; ``then`` is not called then.
        """
        stored = await self._appending((event,))
        then(stored)
        return stored[0]

    @abstractmethod
    async def truncate(self, topic: str) -> Position:
        """Remove a topic's history and start a new epoch; return the new position."""

    # -- reading ----------------------------------------------------------------

    @abstractmethod
    async def read(
        self,
        topic: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> list[Event]:
        """Return retained events of ``topic``.

        Forward (the default): events with ``after < offset`` in increasing
        order. Reverse: events with ``offset < before`` (or from the newest when
        ``before`` is ``None``) in decreasing order. At most ``limit`` events.
        """

    @abstractmethod
    async def position(self, topic: str) -> Position:
        """Return the latest ``(offset, epoch)`` of a topic (offset 0 if it has no events).

        Writes nothing: a topic with no stored state returns offset 0 and its
        empty epoch, which its first append keeps (see the module docstring).
        """

    @abstractmethod
    async def earliest(self, topic: str) -> int | None:
        """Return the smallest retained offset of a topic, or ``None`` if none is kept."""

    @abstractmethod
    async def lookup(self, topic: str, idempotency_key: str) -> Event | None:
        """Return the event stored under this idempotency key within the dedup window."""

    # -- retention ----------------------------------------------------------------

    @abstractmethod
    async def prune(self, now: float | None = None) -> int:
        """Drop events past their topic's retention (size and age); return how many.

        A stream left with no events (all past retention, or truncated) is
        forgotten entirely: its row, keys and in-memory entries are removed,
        and its next position has offset 0 under a new epoch.
        """

    # -- dead letters --------------------------------------------------------------

    @abstractmethod
    async def save_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Store dead letters (their events must be JSON-encodable)."""

    @abstractmethod
    async def load_dead_letters(self, limit: int) -> list[DeadLetter]:
        """Return up to ``limit`` stored dead letters, oldest first."""

    @abstractmethod
    async def delete_dead_letters(self, ids: Sequence[int]) -> None:
        """Remove stored dead letters by id."""

    # -- health ----------------------------------------------------------------------

    @abstractmethod
    async def check(self) -> None:
        """Raise :class:`LogError` unless the log can accept writes now."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def now() -> float:
    """The wall clock used for retention and dedup windows."""
    return time.time()


def log_error(action: str, exc: BaseException) -> LogError:
    """Translate a driver error into a :class:`LogError` naming the action."""
    error = LogError(f"event log could not {action}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
