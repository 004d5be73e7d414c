"""Dead letters: a bounded record of every event that was not delivered.

An event becomes a dead letter when a subscriber's buffer overflows, when a
handler subscriber keeps failing, or when a publish with acknowledgement gives
up. Each record keeps the event, the subscriber id, the reason, the attempt
count, the error text and the time. The store can be listed, filtered and
redriven back to the subscribers.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgspec

from .events import Event
from .exceptions import EncodeError, LogError

if TYPE_CHECKING:
    from .log.base import EventLog

__all__ = ["DEFAULT_DEAD_LETTERS", "DeadLetter", "DeadLetters"]

logger = logging.getLogger("eventcast.bus")

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
            ``block_timeout``, ``slow_consumer``, ``handler_error``,
            ``ack_failed``, or for the hub's webhooks ``webhook_failed``,
            ``webhook_overflow`` and ``webhook_shutdown``.
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

    def to_json(self) -> dict[str, Any]:
        """The record as the HTTP API, the dashboard and the CLI show it.

        ``data`` is the event's JSON data, or its ``repr`` when it has no JSON
        form (in-process data).
        """
        event = self.event
        try:
            data: Any = msgspec.Raw(event.encoded_data())
        except EncodeError:
            data = repr(event.data)
        return {
            "id": self.id,
            "topic": event.topic,
            "offset": event.offset,
            "subscriber": self.subscriber,
            "reason": self.reason,
            "attempts": self.attempts,
            "error": self.error,
            "time": self.time,
            "data": data,
        }


Redeliver = Callable[[DeadLetter], bool]


class DeadLetters:
    """A bounded, inspectable, redrivable store of :class:`DeadLetter` records.

    Args:
        redeliver: gives a record's event back to its subscriber; returns
            ``False`` when the subscriber is gone (the bus provides it).
        maxsize: bound of the store, in records.
    """

    def __init__(
        self, redeliver: Redeliver | None = None, *, maxsize: int = DEFAULT_DEAD_LETTERS
    ) -> None:
        if maxsize < 1:
            raise ValueError("the dead letter store needs a positive maxsize")
        self._redeliver = redeliver
        self._items: deque[DeadLetter] = deque(maxlen=maxsize)
        self._next_id = 1
        #: How many records were evicted because the store was full.
        self.evicted = 0
        #: Called with each new record (the log uses it to make them durable).
        self.listeners: list[Callable[[DeadLetter], None]] = []
        #: Called with the ids of removed records.
        self.removal_listeners: list[Callable[[set[int]], None]] = []
        #: How to redeliver the records of subscribers that are not the bus's
        #: (the hub's webhooks), by subscriber id.
        self.targets: dict[str, Redeliver] = {}

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
            redeliver = self.targets.get(letter.subscriber, self._redeliver)
            if redeliver is not None and redeliver(letter):
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


Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class LetterArchive:
    """Keeps a :class:`DeadLetters` store in the log, so records survive a restart.

    New records and removals are written by one task, in order (a record
    removed right after it was added is never stored again after its
    deletion); :meth:`aclose` gives what is in flight a bounded chance to be
    stored.

    Args:
        letters: the store to keep.
        log: the log that stores the records.
        spawn: runs a supervised background task.
    """

    #: How long :meth:`aclose` waits for records in flight, in seconds.
    CLOSE_TIMEOUT: Final = 5.0

    def __init__(self, letters: DeadLetters, log: EventLog, spawn: Spawn) -> None:
        self._letters = letters
        self._log = log
        self._spawn = spawn
        self._pending: deque[DeadLetter] = deque(maxlen=letters.maxsize)
        self._removed: set[int] = set()
        self._flush: asyncio.Task[Any] | None = None
        self._open = False

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The flush in progress, if any."""
        return self._flush

    async def open(self) -> None:
        """Load the stored records into the store, then keep the log up to date."""
        try:
            for letter in await self._log.load_dead_letters(self._letters.maxsize):
                self._letters._restore(letter)
        except LogError:
            logger.exception("could not load the stored dead letters")
        self._letters.listeners.append(self._saved)
        self._letters.removal_listeners.append(self._removed_ids)
        self._open = True

    def _saved(self, letter: DeadLetter) -> None:
        self._pending.append(letter)
        self._start()

    def _removed_ids(self, ids: set[int]) -> None:
        self._removed.update(ids)
        self._start()

    def _start(self) -> None:
        if not self._open or (self._flush is not None and not self._flush.done()):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush = self._spawn(self._write(), "eventcast-dead-letters")

    async def _write(self) -> None:
        log = self._log
        while self._pending or self._removed:
            removed, self._removed = self._removed, set()
            batch = [letter for letter in self._pending if letter.id not in removed]
            self._pending.clear()
            try:
                if batch:
                    await log.save_dead_letters(batch)
            except LogError as exc:
                logger.warning("could not store %d dead letters: %s", len(batch), exc)
            try:
                if removed:
                    await log.delete_dead_letters(sorted(removed))
            except LogError as exc:
                logger.warning("could not delete %d stored dead letters: %s", len(removed), exc)

    async def aclose(self) -> None:
        """Stop writing, after a bounded wait for the records in flight. Idempotent."""
        self._open = False
        flush = self._flush
        if flush is None or flush.done():
            return
        try:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(self.CLOSE_TIMEOUT):
                    await asyncio.shield(flush)
        finally:
            if not flush.done():
                flush.cancel()
