"""Subscriptions: bounded buffers with an explicit overflow policy.

How fan-out works
-----------------
Subscribers with the same set of topic filters share one *ring*: a list of
events with a head index. Publishing appends the event to each matching ring
once, in O(1), whatever the number of subscribers; each subscriber reads the
ring at its own cursor. A subscriber's buffer is therefore the slice of the
ring between its cursor and the head, and ``maxsize`` bounds that slice.

Overflow is enforced eagerly and exactly, as if every subscriber had its own
queue: each ring keeps a heap of the head positions at which its subscribers
would overflow, so a publish checks one number and only the overflowing
subscribers are touched. A subscriber whose view can no longer be a contiguous
slice of the ring (``DROP_NEWEST`` or ``BLOCK`` after an overflow, or a
redrive) switches to a private bounded deque until it has caught up, then
returns to the ring. The ring is trimmed to the slowest cursor, so it never
holds more than twice the largest ``maxsize`` of its subscribers.

Every dropped event is counted, recorded as a dead letter, and reported once
per episode (an episode ends when the subscriber has drained its buffer).

Conflation
----------
``Overflow.CONFLATE`` is for state that only matters as its latest value (a
price per instrument). While the subscriber keeps up it reads the ring like
any other, and sees every event. When it falls ``maxsize`` behind, it goes
private with a buffer that keeps the newest event per *key* (the event's
topic and the value of its ``conflation_key`` tag) at the position of that
newest event: a new event for a key already buffered replaces it. What it
then reads is a subsequence of the stream, in order, ending with the newest
event of every key; the events replaced are counted as ``conflated`` (not
dead letters: nothing the reader needs is lost), and their offsets are the
gaps the reader sees. Once drained, it is back on the ring. Only when more
distinct keys than ``maxsize`` are pending is the oldest dropped, as under
``DROP_OLDEST``. The ring's fast path is the same code for every policy. The
buffer and its key rule are :mod:`eventcast._conflation`'s, which the hub's
conflating connections share.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol

from ._conflation import LatestByKey, conflation_key
from .events import Event
from .exceptions import (
    ConfigurationError,
    EventcastError,
    SlowConsumerError,
    SubscriptionClosedError,
)

if TYPE_CHECKING:
    from .replay import Handoff

__all__ = [
    "DEFAULT_MAXSIZE",
    "Overflow",
    "Subscription",
    "SubscriptionStatistics",
]

logger = logging.getLogger("eventcast.bus")

#: Default bound of a subscription's buffer, in events.
DEFAULT_MAXSIZE: Final = 1024

_PRIVATE: Final = -1
_CLOSED: Final = -2
_heap_seq = itertools.count()


class Overflow(enum.Enum):
    """What happens when an event arrives for a subscriber whose buffer is full.

    Whatever the policy, every event that is not delivered is counted in
    :meth:`Subscription.statistics`, recorded as a dead letter, and reported
    once per episode.
    """

    #: Drop the oldest buffered event to make room (keeps the freshest data).
    DROP_OLDEST = "drop_oldest"
    #: Drop the arriving event (keeps what is buffered).
    DROP_NEWEST = "drop_newest"
    #: The publisher waits for room, up to ``block_timeout``; past it the event
    #: goes to dead letters. In process only; ``publish_nowait`` never waits.
    BLOCK = "block"
    #: Close the subscription with :class:`SlowConsumerError`.
    DISCONNECT = "disconnect"
    #: Keep only the newest event per key (the topic and the value of the
    #: subscription's ``conflation_key`` tag) while the subscriber is behind;
    #: the events replaced are counted as ``conflated``. The oldest is dropped
    #: only when more keys than ``maxsize`` are pending.
    CONFLATE = "conflate"


class SubscriptionHost(Protocol):
    """What a subscription tells the bus that created it (its subscriber registry)."""

    def dead_letter(self, sub: Subscription, events: Iterable[Event], reason: str) -> int:
        """Record events ``sub`` lost as dead letters; return how many."""
        ...

    def drop_episode(self, sub: Subscription, reason: str) -> None:
        """``sub`` started dropping events (once per episode)."""
        ...

    def release(self, sub: Subscription) -> None:
        """``sub`` closed: forget it."""
        ...


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of a subscription's counters."""

    id: str
    topics: tuple[str, ...]
    buffered: int
    delivered: int
    dropped: int
    max_size: int
    policy: Overflow
    closed: bool
    #: Events replaced by a newer one of the same key (``Overflow.CONFLATE``).
    conflated: int = 0


#: A ring releases the events its members have all read once it holds this
#: many more than the last time (at least; see :func:`_trim_interval`).
_TRIM_MIN: Final = 64
#: ... or this many per member, when that is more: a trim reads every cursor.
_TRIM_PER_MEMBER: Final = 32


def _trim_interval(largest_maxsize: int, members: int) -> int:
    """How many events a ring takes between two trims (releases of read events).

    A trim reads every member's cursor, so the interval is
    :data:`_TRIM_PER_MEMBER` events per member, capped at twice the largest
    ``maxsize`` (the interval of many members), and never below
    :data:`_TRIM_MIN`. Read events go promptly whatever ``maxsize`` is: a hub
    channel (one member, ``maxsize`` 65,536) keeps at most :data:`_TRIM_MIN`
    events it delivered, not 131,072.
    """
    return max(_TRIM_MIN, min(2 * largest_maxsize, _TRIM_PER_MEMBER * members))


class _Ring:
    """The shared event buffer of every subscriber with the same topic filters."""

    __slots__ = (
        "base",
        "blockers",
        "check_at",
        "events",
        "filters",
        "head",
        "heap",
        "members",
        "privates",
        "trim_at",
        "waiters",
    )

    def __init__(self, filters: tuple[str, ...]) -> None:
        self.filters = filters
        self.events: list[Event] = []
        self.base = 0
        self.head = 0
        self.waiters: list[Subscription] = []
        self.members: set[Subscription] = set()
        self.heap: list[tuple[int, int, Subscription]] = []
        self.privates: set[Subscription] = set()
        self.blockers: list[Subscription] = []
        self.trim_at = _TRIM_MIN
        #: The head at which an append has more to do than append: trim the
        #: buffer, or enforce an overflow deadline. Never above the true one.
        self.check_at = _TRIM_MIN

    def add(self, sub: Subscription) -> None:
        self.members.add(sub)
        if sub.policy is Overflow.BLOCK:
            self.blockers.append(sub)
        # (O(1): the next trim sets it from every member)
        self.trim_at = max(self.trim_at, _trim_interval(sub.maxsize, len(self.members)))

    def discard(self, sub: Subscription) -> None:
        self.members.discard(sub)
        self.privates.discard(sub)
        if sub in self.blockers:
            self.blockers.remove(sub)

    def append(self, event: Event) -> None:
        """Add one event for every member; never waits, never raises."""
        self.events.append(event)
        head = self.head = self.head + 1
        if self.privates:
            for sub in tuple(self.privates):
                sub._push_live(event)
        if self.waiters:
            waiters = self.waiters
            self.waiters = []
            for sub in waiters:
                sub._wake()
        if head >= self.check_at:
            self._housekeep(head)

    def extend(self, events: list[Event]) -> None:
        """Add several events for every member, as :meth:`append` does one by one.

        Members are woken once, and the buffer trimmed once, for the lot: all
        but the last event go in at once, and the last through :meth:`append`.
        When a member is private, or an overflow deadline falls inside the lot,
        the events are appended one by one, so every policy sees each event
        where it would have.
        """
        n = len(events)
        heap = self.heap
        if n > 1 and not self.privates and not (heap and heap[0][0] <= self.head + n):
            self.events.extend(events[:-1])
            self.head += n - 1
            self.append(events[-1])
            return
        for event in events:
            self.append(event)

    def _housekeep(self, head: int) -> None:
        """Enforce the overflow deadlines that are due, trim if due, and set ``check_at``."""
        heap = self.heap
        if heap and heap[0][0] <= head:
            self._enforce(head)
        if head - self.base >= self.trim_at:
            self._trim()
        at = self.base + self.trim_at
        if heap and heap[0][0] < at:
            at = heap[0][0]
        self.check_at = at

    def _enforce(self, head: int) -> None:
        heap = self.heap
        while heap and heap[0][0] <= head:
            _, seq, sub = heapq.heappop(heap)
            if seq != sub._heap_entry or sub._cursor < 0 or sub._ring is not self:
                continue  # stale entry: the subscriber went private, closed or re-tracked
            deadline = sub._cursor + sub.maxsize + 1
            if deadline <= head:
                sub._overflow_in_ring(head)
                if sub._cursor < 0:
                    continue
                deadline = sub._cursor + sub.maxsize + 1
            self._push_entry(sub, deadline)

    def _push_entry(self, sub: Subscription, deadline: int) -> None:
        seq = next(_heap_seq)
        sub._heap_entry = seq
        heapq.heappush(self.heap, (deadline, seq, sub))
        if deadline < self.check_at:
            self.check_at = deadline

    def track(self, sub: Subscription) -> None:
        """Watch a ring-mode subscriber for overflow (one live heap entry each)."""
        self._push_entry(sub, sub._cursor + sub.maxsize + 1)

    def _trim(self) -> None:
        low = self.head
        for sub in self.members:
            cursor = sub._cursor
            if 0 <= cursor < low:
                low = cursor
        drop = low - self.base
        if drop > 0:
            del self.events[:drop]
            self.base = low
        # Keep trimming cheap: next time, at least ``trim_at / 2`` new events.
        members = self.members
        largest = max((s.maxsize for s in members), default=_TRIM_MIN)
        self.trim_at = _trim_interval(largest, len(members))
        if len(self.events) * 2 > self.trim_at:
            self.trim_at = len(self.events) * 2


class Subscription:
    """A subscriber's bounded buffer, read with ``async for``, :meth:`get` or :meth:`get_batch`.

    Created by :meth:`Bus.subscribe`; not instantiated directly. The iterator
    ends cleanly when the subscription is unsubscribed or the bus closes; it
    raises :class:`SlowConsumerError` if the subscription was closed under
    ``Overflow.DISCONNECT``. Use it as an async context manager to unsubscribe
    on exit.
    """

    __slots__ = (
        "__weakref__",
        "_conflated",
        "_cursor",
        "_delivered",
        "_dropped",
        "_dropping",
        "_error",
        "_extra_waiters",
        "_handoff",
        "_heap_entry",
        "_host",
        "_in_waiters",
        "_private",
        "_ready",
        "_recovering",
        "_recovery",
        "_ring",
        "_seg_skipped",
        "_seg_start",
        "_space_waiters",
        "_waiter",
        "block_timeout",
        "conflation_key",
        "id",
        "maxsize",
        "policy",
        "recovered",
        "topics",
    )

    def __init__(
        self,
        host: SubscriptionHost,
        ring: _Ring,
        *,
        id: str,
        topics: tuple[str, ...],
        maxsize: int,
        policy: Overflow,
        block_timeout: float,
        conflation_key: str | None = None,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be a positive int, not {maxsize!r}")
        if not isinstance(policy, Overflow):
            raise ConfigurationError(f"overflow must be an Overflow member, not {policy!r}")
        if block_timeout < 0:
            raise ConfigurationError("block_timeout must be >= 0")
        if conflation_key is not None:
            if policy is not Overflow.CONFLATE:
                raise ConfigurationError("conflation_key needs overflow=Overflow.CONFLATE")
            if not isinstance(conflation_key, str) or not conflation_key:
                raise ConfigurationError("conflation_key must be a non-empty tag name")
        self._host = host
        self._ring = ring
        #: The subscriber's id, unique on its bus.
        self.id = id
        #: The topic filters (names or patterns) this subscription receives.
        self.topics = topics
        #: The bound of the buffer, in events.
        self.maxsize = maxsize
        #: The overflow policy.
        self.policy = policy
        #: How long a publisher waits for room under ``Overflow.BLOCK``.
        self.block_timeout = block_timeout
        #: Under ``Overflow.CONFLATE``, the tag whose value (with the topic) keys
        #: the events; ``None``: the topic alone.
        self.conflation_key = conflation_key
        self._heap_entry = -1
        self._cursor = ring.head
        self._seg_start = ring.head
        self._seg_skipped = 0
        self._private: deque[Event] | LatestByKey[Event] | None = None
        self._delivered = 0
        self._dropped = 0
        self._conflated = 0
        self._dropping = False
        self._error: EventcastError | None = None
        self._recovering = False
        self._handoff: Handoff | None = None
        #: After a resume with ``since=``: ``True`` if every missed event was
        #: replayed, ``False`` if not (nothing partial is replayed, and the
        #: subscription continues live). ``None`` when no resume was asked or
        #: while it is still in progress.
        self.recovered: bool | None = None
        self._recovery: asyncio.Future[bool] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._extra_waiters: list[asyncio.Future[None]] = []
        self._in_waiters = False
        self._ready: Callable[[], None] | None = None
        self._space_waiters: list[asyncio.Future[None]] = []
        ring.add(self)
        ring.track(self)

    # -- reading -------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        if self.policy is Overflow.BLOCK:
            return self._iterate_notifying()
        return self._iterate()

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except SlowConsumerError:
            raise
        except SubscriptionClosedError:
            raise StopAsyncIteration from None

    async def _iterate(self) -> AsyncIterator[Event]:
        # The hot path: a generator resumes far faster than a coroutine per
        # ``__anext__``, and a ring slice is walked with one check per event
        # (``_cursor`` moves under us only when the publisher enforces overflow
        # or the subscription changes mode).
        while True:
            cursor = self._cursor
            if cursor >= 0:
                ring = self._ring
                head = ring.head
                if cursor < head:
                    base = ring.base
                    if cursor + 1 == head:  # one event (a reader that keeps up): no slice
                        self._cursor = head
                        yield ring.events[cursor - base]
                        continue
                    for event in ring.events[cursor - base : head - base]:
                        if self._cursor != cursor:
                            break
                        cursor += 1
                        self._cursor = cursor
                        yield event
                    continue
            elif cursor == _PRIVATE:
                if not self._recovering and self._private:
                    yield self._pop_private()
                    continue
            elif self._error is not None:
                raise self._error
            else:
                return
            # _wait(), without a coroutine of its own: this generator awaits the future.
            waiter = self._arm()
            try:
                await waiter
            finally:
                self._disarm(waiter)

    async def _iterate_notifying(self) -> AsyncIterator[Event]:
        # For Overflow.BLOCK: every event taken frees room for a waiting publisher.
        while True:
            try:
                event = await self.get()
            except SlowConsumerError:
                raise
            except SubscriptionClosedError:
                return
            yield event

    async def get(self) -> Event:
        """Return the next event, waiting for one if the buffer is empty.

        Raises:
            SubscriptionClosedError: the subscription is closed (``SlowConsumerError``
                if it was closed for overflowing under ``Overflow.DISCONNECT``).
        """
        while True:
            taken = self._take(1)
            if taken:
                return taken[0]
            await self._wait()

    async def get_batch(self, max_items: int = 1024) -> list[Event]:
        """Return between 1 and ``max_items`` buffered events, waiting for at least one.

        Raises:
            SubscriptionClosedError: as for :meth:`get`.
        """
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        while True:
            taken = self._take(max_items)
            if taken:
                return taken
            await self._wait()

    def get_nowait_batch(self, max_items: int = 1024) -> list[Event]:
        """Return up to ``max_items`` buffered events without waiting (maybe none).

        Raises:
            SubscriptionClosedError: as for :meth:`get`.
        """
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        return self._take(max_items)

    def get_nowait(self) -> Event | None:
        """Return the next buffered event, or ``None`` if the buffer is empty.

        Raises:
            SubscriptionClosedError: as for :meth:`get`.
        """
        taken = self._take(1)
        return taken[0] if taken else None

    def _take(self, n: int) -> list[Event]:
        cursor = self._cursor
        if cursor >= 0:
            ring = self._ring
            head = ring.head
            if cursor >= head:
                return []
            end = head if head - cursor <= n else cursor + n
            self._cursor = end
            if end == head:
                self._dropping = False  # drained: a drop episode is over
            base = ring.base
            taken = ring.events[cursor - base : end - base]
        elif cursor == _PRIVATE:
            private = self._private
            assert private is not None
            if self._recovering:
                return []
            k = min(n, len(private))
            taken = [private.popleft() for _ in range(k)]
            self._delivered += k
            if not private:
                self._rejoin_ring()
        else:
            raise self._closed_error()
        if self._space_waiters:
            self._notify_space()
        return taken

    def _pop_private(self) -> Event:
        private = self._private
        assert private is not None
        event = private.popleft()
        self._delivered += 1
        if not private:
            self._rejoin_ring()
        if self._space_waiters:
            self._notify_space()
        return event

    async def _wait(self) -> None:
        waiter = self._arm()
        try:
            await waiter
        finally:
            self._disarm(waiter)

    def _arm(self) -> asyncio.Future[None]:
        """The buffer is empty: return a future the next event (or the close) completes.

        Await it, then call :meth:`_disarm` (in a ``finally``), as :meth:`_wait` does.
        """
        self._listen()
        waiter = asyncio.get_running_loop().create_future()
        if self._waiter is None:
            self._waiter = waiter
        else:  # several tasks read this subscription at once (rare)
            self._extra_waiters.append(waiter)
        return waiter

    def _listen(self) -> None:
        """The buffer is empty: be woken (:meth:`_wake`) by the next event or the close.

        Raises:
            SubscriptionClosedError: the subscription is closed.
        """
        if self._cursor == _CLOSED:
            raise self._closed_error()
        self._dropping = False  # the buffer is empty: a drop episode is over
        if self._space_waiters:
            self._notify_space()
        if not self._in_waiters and self._cursor >= 0:
            self._in_waiters = True
            self._ring.waiters.append(self)

    def _on_ready(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` on every wake, instead of a task waiting for events.

        For a consumer driven by callbacks (the hub's channels): the callback
        runs synchronously inside the publisher's call, so it must only note
        that the subscription is ready and drain it later, with
        :meth:`get_nowait_batch`, then call :meth:`_listen` once it is empty.
        """
        self._ready = callback

    def _disarm(self, waiter: asyncio.Future[None]) -> None:
        if self._waiter is waiter:
            self._waiter = None
        elif waiter in self._extra_waiters:
            self._extra_waiters.remove(waiter)

    def _wake(self) -> None:
        self._in_waiters = False
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._extra_waiters:
            extra = self._extra_waiters
            self._extra_waiters = []
            for waiter in extra:
                if not waiter.done():
                    waiter.set_result(None)
        ready = self._ready
        if ready is not None:
            ready()

    def _closed_error(self) -> EventcastError:
        if self._error is not None:
            return self._error
        return SubscriptionClosedError(f"subscription {self.id!r} is closed")

    # -- overflow ------------------------------------------------------------

    def _overflow_in_ring(self, head: int) -> None:
        """Called by the ring when this ring-mode subscriber's lag exceeds ``maxsize``."""
        ring = self._ring
        cursor = self._cursor
        excess = head - cursor - self.maxsize
        base = ring.base
        policy = self.policy
        if policy is Overflow.DROP_OLDEST:
            lost = ring.events[cursor - base : cursor - base + excess]
            self._cursor = cursor + excess
            self._seg_skipped += excess
            self._record_drops(lost, "overflow_drop_oldest")
        elif policy is Overflow.DISCONNECT:
            lost = ring.events[cursor - base : head - base]
            self._close(
                SlowConsumerError(
                    f"subscription {self.id!r} overflowed its buffer of {self.maxsize} events"
                )
            )
            self._record_drops(lost, "slow_consumer")
        elif policy is Overflow.CONFLATE:
            self._go_private(head)  # conflates what it holds
            private = self._private
            assert private is not None
            excess = len(private) - self.maxsize
            if excess > 0:  # more keys pending than room
                self._record_drops(
                    [private.popleft() for _ in range(excess)], "overflow_drop_oldest"
                )
        else:
            keep_end = cursor + self.maxsize
            lost = ring.events[keep_end - base : head - base]
            self._go_private(keep_end)
            reason = "overflow_drop_newest" if policy is Overflow.DROP_NEWEST else "block_timeout"
            self._record_drops(lost, reason)

    def _push(self, event: Event) -> None:
        """Deliver one event in private mode, applying the policy if full."""
        private = self._private
        assert private is not None
        if len(private) < self.maxsize:
            private.append(event)
            if self._waiter is not None or self._ready is not None:
                self._wake()
            return
        policy = self.policy
        if policy is Overflow.DROP_OLDEST:
            lost = private.popleft()
            private.append(event)
            self._record_drops((lost,), "overflow_drop_oldest")
        elif policy is Overflow.CONFLATE:
            private.append(event)  # replaces the buffered event of the same key, if any
            if len(private) > self.maxsize:
                self._record_drops((private.popleft(),), "overflow_drop_oldest")
        elif policy is Overflow.DISCONNECT:
            lost_all = [*private, event]
            self._close(
                SlowConsumerError(
                    f"subscription {self.id!r} overflowed its buffer of {self.maxsize} events"
                )
            )
            self._record_drops(lost_all, "slow_consumer")
        else:
            reason = "overflow_drop_newest" if policy is Overflow.DROP_NEWEST else "block_timeout"
            self._record_drops((event,), reason)

    def _record_drops(self, events: Iterable[Event], reason: str) -> None:
        host = self._host
        count = host.dead_letter(self, events, reason)
        if not count:
            return
        self._dropped += count
        if not self._dropping:
            self._dropping = True
            logger.warning(
                "subscriber %r is dropping events (%s, buffer of %d): "
                "recorded as dead letters; reported once until it catches up",
                self.id,
                reason,
                self.maxsize,
            )
            host.drop_episode(self, reason)

    def _go_private(self, keep_end: int) -> None:
        ring = self._ring
        cursor = self._cursor
        base = ring.base
        self._delivered += cursor - self._seg_start - self._seg_skipped
        self._private = self._new_private(ring.events[cursor - base : keep_end - base])
        self._cursor = _PRIVATE
        ring.privates.add(self)

    def _new_private(self, events: Iterable[Event] = ()) -> deque[Event] | LatestByKey[Event]:
        if self.policy is Overflow.CONFLATE:
            return LatestByKey(self._conflation_key_of, self._supersede, events)
        return deque(events)

    def _conflation_key_of(self, event: Event) -> Hashable:
        return conflation_key(event, self.conflation_key)

    def _supersede(self, event: Event) -> None:
        self._conflated += 1

    def _rejoin_ring(self) -> None:
        if self._handoff is not None:
            return  # stay private (even empty) until the live stream passes the replay
        ring = self._ring
        ring.privates.discard(self)
        self._private = None
        self._cursor = self._seg_start = ring.head
        self._seg_skipped = 0
        self._dropping = False  # the private buffer drained: a drop episode is over
        ring.track(self)

    # -- BLOCK ---------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """The number of events waiting in the buffer."""
        cursor = self._cursor
        if cursor >= 0:
            return self._ring.head - cursor
        if cursor == _PRIVATE:
            assert self._private is not None
            return len(self._private)
        return 0

    def _notify_space(self) -> None:
        waiters = self._space_waiters
        self._space_waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_for_space(self, deadline: float) -> bool:
        """Wait until the buffer has room; return False if ``deadline`` passed first."""
        loop = asyncio.get_running_loop()
        while self.buffered >= self.maxsize and self._cursor != _CLOSED:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter = loop.create_future()
            self._space_waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return False
            finally:
                if waiter in self._space_waiters:
                    self._space_waiters.remove(waiter)
        return True

    # -- redrive -------------------------------------------------------------

    def _inject(self, events: Iterable[Event]) -> None:
        """Add events outside the ring (a redrive), switching to private mode."""
        if self._cursor == _CLOSED:
            raise self._closed_error()
        if self._cursor >= 0:
            self._go_private(self._ring.head)
        for event in events:
            self._push(event)
        if self._private is not None and not self._private:
            self._rejoin_ring()

    # -- resume ----------------------------------------------------------------

    def _begin_recovery(self) -> None:
        """Hold live events aside while the missed ones are read from the log."""
        ring = self._ring
        self._delivered += self._cursor - self._seg_start - self._seg_skipped
        self._private = self._new_private()
        self._cursor = _PRIVATE
        self._recovering = True
        ring.privates.add(self)
        self._recovery = asyncio.get_running_loop().create_future()

    def _push_live(self, event: Event) -> None:
        """Deliver one live event in private mode, under the handoff rule of a resume."""
        handoff = self._handoff
        if handoff is not None:
            if not handoff.admits(event):
                return  # given already by the replay (see eventcast.replay)
            self._handoff = None
        self._push(event)

    def _finish_recovery(
        self, replay: list[Event], recovered: bool, handoff: Handoff | None
    ) -> None:
        """Hand over from the replay to live delivery with no gap and no duplicate.

        ``replay`` is given first (empty when nothing was missed or the gap
        could not be replayed); the live events held aside meanwhile follow,
        under ``handoff``, which also applies to live events still to come
        until one past its floor arrives (the log can be ahead of this node's
        live stream). See :mod:`eventcast.replay`.
        """
        if self._cursor == _CLOSED:
            return
        private = self._private
        assert private is not None
        live = list(private) if handoff is None else handoff.filter(private)
        private.clear()
        private.extend(replay)
        private.extend(live)
        if handoff is not None and not handoff.passed:
            self._handoff = handoff
        self._recovering = False
        self.recovered = recovered
        if self._recovery is not None and not self._recovery.done():
            self._recovery.set_result(self.recovered)
        if not private:
            self._rejoin_ring()
        self._wake()

    async def ready(self) -> bool | None:
        """Wait until a resume asked with ``since=`` is done; return :attr:`recovered`.

        Raises:
            EventcastError: the resume failed for a reason the caller must fix
                (for example ``PositionError`` for an offset beyond the head).
        """
        recovery = self._recovery
        if recovery is not None and not recovery.done():
            await asyncio.shield(recovery)
        if self._cursor == _CLOSED and self._error is not None and self.recovered is None:
            raise self._error
        return self.recovered

    # -- lifecycle -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the subscription is closed."""
        return self._cursor == _CLOSED

    def statistics(self) -> SubscriptionStatistics:
        """Return a snapshot of the buffered, delivered and dropped counts."""
        delivered = self._delivered
        if self._cursor >= 0:
            delivered += self._cursor - self._seg_start - self._seg_skipped
        return SubscriptionStatistics(
            id=self.id,
            topics=self.topics,
            buffered=self.buffered,
            delivered=delivered,
            dropped=self._dropped,
            max_size=self.maxsize,
            policy=self.policy,
            closed=self.closed,
            conflated=self._conflated,
        )

    def _close(self, error: EventcastError | None = None) -> None:
        if self._cursor == _CLOSED:
            return
        if self._cursor >= 0:
            self._delivered += self._cursor - self._seg_start - self._seg_skipped
        self._cursor = _CLOSED
        self._error = error
        self._private = None
        self._recovering = False
        if self._recovery is not None and not self._recovery.done():
            self._recovery.set_result(False)
        self._ring.discard(self)
        self._host.release(self)
        self._wake()
        self._notify_space()

    def close(self) -> None:
        """Unsubscribe and end the iterator. Idempotent; never raises."""
        self._close()

    async def aclose(self) -> None:
        """Unsubscribe and end the iterator (async alias of :meth:`close`)."""
        self._close()

    async def __aenter__(self) -> Subscription:
        await self.ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"buffered={self.buffered}"
        return f"<Subscription id={self.id!r} topics={list(self.topics)} {state}>"
