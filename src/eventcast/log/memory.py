"""``memory://``: an in-process log with a bounded ring per topic.

Nothing survives the process, so every stream gets a fresh epoch on start
(each log is a new store). Useful for tests and for single-process recovery
after short disconnects.
"""

from __future__ import annotations

import builtins
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from ..deadletters import DeadLetter
from ..events import Event, Position
from ..exceptions import LogError
from .base import (
    EventLog,
    empty_epoch,
    epoch_bucket,
    new_epoch,
    new_store_id,
    now,
)

__all__ = ["MemoryLog"]

#: Default bound on the number of streams a memory log keeps.
DEFAULT_MAX_TOPICS: Final = 100_000


@dataclass(slots=True)
class _Stream:
    epoch: str
    top: int = 0
    events: deque[Event] = field(default_factory=deque)
    keys: dict[str, tuple[int, float]] = field(default_factory=dict)


class MemoryLog(EventLog):
    """An in-process :class:`EventLog`: a bounded ring per topic.

    Args:
        max_topics: the most streams kept; past it, the least recently
            created empty stream is forgotten (a write then starts a new epoch).
            A topic never written keeps no stream at all.
        dead_letters: the most dead letters kept.
        dedup_window: how long idempotency keys are remembered, in seconds.
    """

    def __init__(
        self,
        *,
        max_topics: int = DEFAULT_MAX_TOPICS,
        dead_letters: int = 10_000,
        dedup_window: float = 120.0,
    ) -> None:
        super().__init__(dedup_window=dedup_window)
        self.max_topics = max_topics
        self._streams: dict[str, _Stream] = {}
        self._store = new_store_id()
        # Generation counters of the empty epochs, by bucket (bounded by EPOCH_BUCKETS).
        self._generations: dict[int, int] = {}
        self._letters: deque[DeadLetter] = deque(maxlen=dead_letters)
        self._open = False

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _empty_epoch(self, topic: str) -> str:
        generation = self._generations.get(epoch_bucket(topic), 0)
        return empty_epoch(self._store, topic, generation)

    def _stream(self, topic: str) -> _Stream:
        """The topic's stream, created (claiming its empty epoch) if missing."""
        stream = self._streams.get(topic)
        if stream is None:
            if len(self._streams) >= self.max_topics:
                for name, old in self._streams.items():
                    if not old.events:
                        del self._streams[name]
                        break
            bucket = epoch_bucket(topic)
            generation = self._generations.get(bucket, 0)
            self._generations[bucket] = generation + 1
            epoch = empty_epoch(self._store, topic, generation)
            stream = self._streams[topic] = _Stream(epoch=epoch)
        return stream

    async def append(self, events: Sequence[Event]) -> list[Event]:
        for event in events:
            event.encoded_data()  # raise EncodeError before anything is stored
        t = now()
        out: list[Event] = []
        for event in events:
            stream = self._stream(event.topic)
            key = event.idempotency_key
            if key is not None:
                seen = stream.keys.get(key)
                if seen is not None and seen[1] > t:
                    original = self._find(stream, seen[0])
                    if original is not None:
                        out.append(original)
                        continue
            stream.top += 1
            stored = msgspec.structs.replace(event, offset=stream.top, epoch=stream.epoch)
            stream.events.append(stored)
            if key is not None:
                stream.keys[key] = (stream.top, t + self.dedup_window)
                if len(stream.keys) > 10_000:
                    stream.keys = {k: v for k, v in stream.keys.items() if v[1] > t}
            self._apply_retention(event.topic, stream, t)
            out.append(stored)
        return out

    def _find(self, stream: _Stream, offset: int) -> Event | None:
        if not stream.events:
            return None
        first = stream.events[0].offset
        assert first is not None
        index = offset - first
        if 0 <= index < len(stream.events):
            return stream.events[index]
        return None

    def _apply_retention(self, topic: str, stream: _Stream, t: float) -> int:
        retention = self.retention(topic)
        removed = 0
        while len(stream.events) > retention.size:
            stream.events.popleft()
            removed += 1
        if retention.ttl is not None:
            cutoff = t - retention.ttl
            while stream.events and stream.events[0].time < cutoff:
                stream.events.popleft()
                removed += 1
        return removed

    async def truncate(self, topic: str) -> Position:
        stream = self._stream(topic)
        stream.events.clear()
        stream.keys.clear()
        stream.epoch = new_epoch()
        return Position(stream.top, stream.epoch)

    async def read(
        self,
        topic: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> builtins.list[Event]:
        stream = self._streams.get(topic)
        if stream is None or limit <= 0:
            return []
        self._apply_retention(topic, stream, now())
        events = stream.events
        if not events:
            return []
        first = events[0].offset
        assert first is not None
        if reverse:
            end = stream.top if before is None else min(stream.top, before - 1)
            out: list[Event] = []
            i = end - first
            while i >= 0 and len(out) < limit:
                event = events[i]
                assert event.offset is not None
                if event.offset <= after:
                    break
                out.append(event)
                i -= 1
            return out
        start = max(after + 1, first) - first
        stop = len(events) if before is None else max(0, min(len(events), before - first))
        return [events[i] for i in range(start, min(stop, start + limit))]

    async def position(self, topic: str) -> Position:
        stream = self._streams.get(topic)
        if stream is None:
            return Position(0, self._empty_epoch(topic))
        return Position(stream.top, stream.epoch)

    async def earliest(self, topic: str) -> int | None:
        stream = self._streams.get(topic)
        if stream is None:
            return None
        self._apply_retention(topic, stream, now())
        return stream.events[0].offset if stream.events else None

    async def lookup(self, topic: str, idempotency_key: str) -> Event | None:
        stream = self._streams.get(topic)
        if stream is None:
            return None
        seen = stream.keys.get(idempotency_key)
        if seen is None or seen[1] <= now():
            return None
        return self._find(stream, seen[0])

    async def prune(self, now_: float | None = None) -> int:
        t = now() if now_ is None else now_
        removed = 0
        empty: list[str] = []
        for topic, stream in self._streams.items():
            removed += self._apply_retention(topic, stream, t)
            if not stream.events:
                empty.append(topic)
        for topic in empty:  # forgotten: the next write claims a new epoch
            del self._streams[topic]
        return removed

    async def check(self) -> None:
        if not self._open:
            raise LogError("the memory log is not open")

    async def save_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        self._letters.extend(letters)

    async def load_dead_letters(self, limit: int) -> builtins.list[DeadLetter]:
        return list(self._letters)[-limit:] if limit > 0 else []

    async def delete_dead_letters(self, ids: Sequence[int]) -> None:
        drop = set(ids)
        kept = [letter for letter in self._letters if letter.id not in drop]
        self._letters.clear()
        self._letters.extend(kept)

    def __repr__(self) -> str:
        return f"<MemoryLog topics={len(self._streams)}>"
