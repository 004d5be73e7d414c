"""Dead letters: a bounded record of every event that was not delivered.

An event becomes a dead letter when a subscriber's buffer overflows, when a
handler subscriber keeps failing, or when a publish with acknowledgement gives
up. Each record keeps the event, the subscriber id, the reason, the attempt
count, the error text and the time. The store can be listed, filtered and
redriven back to the subscribers.
"""

from __future__ import annotations

import builtins
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .events import Event

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["DEFAULT_DEAD_LETTERS", "DeadLetter", "DeadLetters"]

#: Default bound of the dead letter store, in records. When full, the oldest
#: record is evicted and counted in :attr:`DeadLetters.evicted`.
DEFAULT_DEAD_LETTERS: Final = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """One event that a subscriber did not receive or could not process.

    Attributes:
        event: the event, shared (not copied).
        subscriber: the id of the subscriber it was meant for.
        reason: why: ``overflow_drop_oldest``, ``overflow_drop_newest``,
            ``block_timeout``, ``slow_consumer``, ``handler_error`` or
            ``ack_failed``.
        attempts: how many delivery attempts were made.
        error: the text of the last error, if any.
        time: Unix time it was recorded.
        id: a number unique within the store, increasing.
    """

    event: Event
    subscriber: str
    reason: str
    attempts: int = 0
    error: str | None = None
    time: float = field(default_factory=time.time)
    id: int = 0


class DeadLetters:
    """A bounded, inspectable, redrivable store of :class:`DeadLetter` records."""

    def __init__(self, bus: Bus, *, maxsize: int = DEFAULT_DEAD_LETTERS) -> None:
        if maxsize < 1:
            raise ValueError("the dead letter store needs a positive maxsize")
        self._bus = bus
        self._items: deque[DeadLetter] = deque(maxlen=maxsize)
        self._next_id = 1
        #: How many records were evicted because the store was full.
        self.evicted = 0
        #: Called with each new record (the log uses it to make them durable).
        self.listeners: list[Callable[[DeadLetter], None]] = []
        #: Called with the ids of removed records.
        self.removal_listeners: list[Callable[[set[int]], None]] = []

    @property
    def maxsize(self) -> int:
        """The bound of the store, in records."""
        maxlen = self._items.maxlen
        assert maxlen is not None
        return maxlen

    def add(
        self,
        event: Event,
        subscriber: str,
        reason: str,
        *,
        attempts: int = 0,
        error: str | None = None,
    ) -> DeadLetter:
        """Record one dead letter and return it."""
        letter = DeadLetter(
            event=event,
            subscriber=subscriber,
            reason=reason,
            attempts=attempts,
            error=error,
            id=self._next_id,
        )
        self._next_id += 1
        self._store(letter)
        return letter

    def _store(self, letter: DeadLetter) -> None:
        if len(self._items) == self._items.maxlen:
            self.evicted += 1
        self._items.append(letter)
        for listener in self.listeners:
            listener(letter)

    def _restore(self, letter: DeadLetter) -> None:
        """Load a record kept by the log (after a restart) without re-notifying."""
        if len(self._items) == self._items.maxlen:
            self.evicted += 1
        self._items.append(letter)
        self._next_id = max(self._next_id, letter.id + 1)

    def list(
        self,
        *,
        subscriber: str | None = None,
        reason: str | None = None,
        topic: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetter]:
        """Return the records, oldest first, optionally filtered."""
        out: builtins.list[DeadLetter] = []
        for letter in self._items:
            if subscriber is not None and letter.subscriber != subscriber:
                continue
            if reason is not None and letter.reason != reason:
                continue
            if topic is not None and letter.event.topic != topic:
                continue
            out.append(letter)
            if limit is not None and len(out) >= limit:
                break
        return out

    def get(self, letter_id: int) -> DeadLetter | None:
        """Return the record with this id, or ``None``."""
        for letter in self._items:
            if letter.id == letter_id:
                return letter
        return None

    def remove(self, letters: builtins.list[DeadLetter]) -> None:
        """Remove these records from the store."""
        ids = {letter.id for letter in letters}
        kept = [letter for letter in self._items if letter.id not in ids]
        self._items.clear()
        self._items.extend(kept)
        for listener in self.removal_listeners:
            listener(ids)

    def clear(self) -> None:
        """Remove every record."""
        self.remove(builtins.list(self._items))

    async def redrive(
        self,
        *,
        subscriber: str | None = None,
        reason: str | None = None,
        ids: builtins.list[int] | None = None,
    ) -> int:
        """Deliver matching records again to their subscribers; return how many were.

        A record whose subscriber is gone stays in the store. A redriven event
        goes through the subscriber's buffer and overflow policy again, so it
        may come back as a new record if the subscriber is still full.
        """
        chosen = [
            letter
            for letter in self.list(subscriber=subscriber, reason=reason)
            if ids is None or letter.id in ids
        ]
        delivered: builtins.list[DeadLetter] = []
        for letter in chosen:
            if self._bus._redeliver(letter):
                delivered.append(letter)
        if delivered:
            self.remove(delivered)
        return len(delivered)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter(builtins.list(self._items))

    def __repr__(self) -> str:
        return f"<DeadLetters {len(self)}/{self.maxsize} evicted={self.evicted}>"
