"""The asyncio event bus.

.. code-block:: python

    async with Bus() as bus:
        async with bus.subscribe("orders.*") as sub:
            await bus.publish("orders.created", {"id": 1})
            event = await sub.get()

Publishing never waits on a subscriber (unless that subscriber chose
``Overflow.BLOCK``): local fan-out appends the event once to a shared ring per
group of subscribers, in O(1). See :mod:`eventcast.subscription`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import inspect
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeAlias

from .backplane.base import KIND_CONTROL, Backplane, decode_envelope, encode_envelope
from .deadletters import DEFAULT_DEAD_LETTERS, DeadLetter, DeadLetters
from .events import EARLIEST, Event, Position, freeze_tags
from .exceptions import (
    AckTimeoutError,
    BackplaneError,
    BusClosedError,
    ConfigurationError,
    DeliveryError,
    EncodeError,
    EventcastError,
    LogError,
    PositionError,
    SubscriberExistsError,
    SubscriberNotFoundError,
    SubscriptionClosedError,
    UnrecoverablePositionError,
)
from .log.base import EventLog, Retention
from .subscription import DEFAULT_MAXSIZE, Overflow, Subscription, _Ring
from .topics import TopicMatcher, is_pattern, namespace_of, validate_many, validate_topic

__all__ = [
    "DEFAULT_REPLAY_CAP",
    "Bus",
    "ErrorHandler",
    "Handler",
    "HandlerFunc",
    "History",
    "Namespace",
]

#: Most missed events a resume replays; past it, ``recovered`` is False.
DEFAULT_REPLAY_CAP: Final = 300


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace:
    """Options for every topic of one namespace (the part of a name before ``:``).

    A namespace with ``history_size > 0`` is *durable*: each publish is
    committed to the bus's log before it is fanned out, and subscribers can
    resume with ``since=``.

    Attributes:
        history_size: how many of the newest events each topic keeps (0: none,
            the topics are live-only).
        history_ttl: how long events are kept, in seconds (``None``: no age limit).
    """

    history_size: int = 0
    history_ttl: float | None = None

    def __post_init__(self) -> None:
        if self.history_size < 0:
            raise ConfigurationError("history_size must be >= 0")
        if self.history_ttl is not None and self.history_ttl <= 0:
            raise ConfigurationError("history_ttl must be positive or None")

    @property
    def durable(self) -> bool:
        """Whether topics of this namespace keep history."""
        return self.history_size > 0


_LIVE: Final = Namespace()


@dataclass(frozen=True, slots=True)
class History:
    """A page of a durable topic's history.

    Attributes:
        events: the events, in the order asked for.
        position: the topic's latest position (its top offset and epoch).
    """

    events: list[Event]
    position: Position


logger = logging.getLogger("eventcast.bus")

#: A handler subscriber: called with each event; may be sync or async.
HandlerFunc: TypeAlias = Callable[[Event], Awaitable[object] | object]
#: Called when delivery finally fails (a handler gave up, or an acked publish failed).
ErrorHandler: TypeAlias = Callable[[EventcastError, DeadLetter | None], object]
#: Called once per drop episode with the subscription and the reason.
DropHandler: TypeAlias = Callable[[Subscription, str], object]

_ROUTE_CACHE_SIZE: Final = 10_000
#: Default bound of the queue of publications waiting for the backplane.
DEFAULT_OUTBOX: Final = 100_000
#: Most events held per topic while its gap is read from the log.
_PENDING_LIMIT: Final = 10_000
#: Most topics whose continuity is tracked (the least recent is forgotten).
_STREAMS_LIMIT: Final = 100_000
#: Most topics whose traffic is counted for the dashboard.
_TOPIC_STATS_LIMIT: Final = 10_000


@dataclass(slots=True)
class _StreamState:
    """A durable topic's continuity on this node: the last offset delivered."""

    epoch: str
    last: int
    pending: list[Event] | None = None


class LatencyHistogram:
    """A fixed-bucket latency histogram (seconds), cheap enough for every publish."""

    BOUNDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """Record one duration."""
        self.total += seconds
        self.count += 1
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, cumulative count)`` pairs, ending with ``+Inf``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.BOUNDS, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(cap, base * 2.0**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


class _AckTracker:
    """Collects the outcome of one acked publish for each expected handler."""

    __slots__ = ("errors", "future", "pending", "timeout")

    def __init__(self, handlers: Iterable[Handler], timeout: float) -> None:
        self.timeout = timeout
        self.pending: set[Handler] = set(handlers)
        self.errors: dict[Handler, str] = {}
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def expects(self, handler: Handler) -> bool:
        return handler in self.pending

    def settle(self, handler: Handler, error: str | None) -> None:
        if handler not in self.pending:
            return
        self.pending.discard(handler)
        if error is None:
            self.errors.pop(handler, None)
        else:
            self.errors[handler] = error
        if not self.pending and not self.future.done():
            self.future.set_result(None)

    def rearm(self, handlers: Iterable[Handler]) -> None:
        self.pending = set(handlers)
        self.future = asyncio.get_running_loop().create_future()


class Handler:
    """A callback subscriber registered with :meth:`Bus.on`.

    Events are read from its own bounded subscription by one supervised task
    and passed to the callback one at a time, in order. A callback that raises
    is retried with exponential backoff and jitter up to ``retries`` times,
    then the event becomes a dead letter. Errors never reach other subscribers.
    """

    def __init__(
        self,
        bus: Bus,
        subscription: Subscription,
        func: HandlerFunc,
        *,
        retries: int,
        backoff: float,
        max_backoff: float,
    ) -> None:
        if retries < 0:
            raise ConfigurationError("retries must be >= 0")
        self._bus = bus
        #: The subscription feeding this handler.
        self.subscription = subscription
        self.func = func
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        #: Events processed successfully.
        self.processed = 0
        #: Events that failed every attempt.
        self.failed = 0

    @property
    def id(self) -> str:
        """The subscriber id."""
        return self.subscription.id

    def _start(self) -> None:
        if self._task is None and not self.subscription.closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"eventcast-handler-{self.id}"
            )
            self._bus._supervise(self._task, self)

    async def _run(self) -> None:
        sub = self.subscription
        while True:
            try:
                batch = await sub.get_batch(256)
            except SubscriptionClosedError:
                return
            for event in batch:
                await self._process(event)

    async def _call(self, event: Event, timeout: float | None) -> None:
        async with asyncio.timeout(timeout):
            result = self.func(event)
            if inspect.isawaitable(result):
                await result

    async def _process(self, event: Event) -> None:
        tracker = self._bus._acks.get(event.id)
        if tracker is not None and tracker.expects(self):
            # An acked publish owns the retries: one attempt per delivery.
            try:
                await self._call(event, tracker.timeout)
            except Exception as exc:
                tracker.settle(self, f"{type(exc).__name__}: {exc}")
            else:
                self.processed += 1
                tracker.settle(self, None)
            return
        error = ""
        for attempt in range(self.retries + 1):
            try:
                await self._call(event, None)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "handler %r failed on %s (attempt %d of %d): %s",
                    self.id,
                    event.topic,
                    attempt + 1,
                    self.retries + 1,
                    error,
                )
                if attempt < self.retries:
                    await asyncio.sleep(backoff_delay(attempt, self.backoff, self.max_backoff))
            else:
                self.processed += 1
                return
        self.failed += 1
        letter = self._bus.dead_letters.add(
            event, self.id, "handler_error", attempts=self.retries + 1, error=error
        )
        self._bus._handle_error(
            DeliveryError(f"handler {self.id!r} failed: {error}", (self.id,)), letter
        )

    def close(self) -> None:
        """Unregister the handler. Idempotent."""
        self.subscription.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def aclose(self) -> None:
        """Unregister the handler and wait for its task to finish."""
        self.close()
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<Handler id={self.id!r} topics={list(self.subscription.topics)}>"


class Bus:
    """An asyncio event bus with bounded subscribers and explicit overflow policies.

    Args:
        maxsize: default buffer bound of each subscription, in events.
        overflow: default overflow policy of each subscription.
        block_timeout: default wait of a publisher under ``Overflow.BLOCK``.
        dead_letters: bound of the dead letter store, in records.
        ack_timeout: default wait per attempt of ``publish(..., ack=True)``.
        ack_retries: default retries of ``publish(..., ack=True)``.
        backoff: base delay of retry backoff, in seconds.
        max_backoff: cap of retry backoff, in seconds.
        error_handler: called with the error and the dead letter when delivery
            finally fails; the default logs it.
        on_drop: called once per drop episode with the subscription and reason.
        log: the durable log, as an :class:`EventLog` or a URL
            (``sqlite:///events.db``, ``postgresql://…``, ``memory://``). The bus
            opens it on start and closes it on close.
        namespaces: options per namespace (``""`` for topics with none); a
            namespace with ``history_size > 0`` makes its topics durable.
        replay_cap: the most missed events a resume replays.
        backplane: how this bus shares publications with other nodes, as a
            :class:`~eventcast.backplane.Backplane` or a URL (``redis://…``,
            ``nats://…``). Durable topics stay contiguous across nodes: a gap
            in offsets is filled from the log before anything after it is
            delivered.
        outbox: bound of the queue of publications waiting for the backplane.

    Use ``async with Bus() as bus`` or call :meth:`close` when done.
    """

    def __init__(
        self,
        *,
        maxsize: int = DEFAULT_MAXSIZE,
        overflow: Overflow = Overflow.DROP_OLDEST,
        block_timeout: float = 1.0,
        dead_letters: int = DEFAULT_DEAD_LETTERS,
        ack_timeout: float = 5.0,
        ack_retries: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        error_handler: ErrorHandler | None = None,
        on_drop: DropHandler | None = None,
        log: EventLog | str | None = None,
        namespaces: Mapping[str, Namespace] | None = None,
        replay_cap: int = DEFAULT_REPLAY_CAP,
        backplane: Backplane | str | None = None,
        outbox: int = DEFAULT_OUTBOX,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be a positive int, not {maxsize!r}")
        if ack_timeout <= 0 or ack_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ConfigurationError("timeouts and retries must be positive")
        self.maxsize = maxsize
        self.overflow = overflow
        self.block_timeout = block_timeout
        self.ack_timeout = ack_timeout
        self.ack_retries = ack_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.error_handler = error_handler
        self.on_drop = on_drop
        #: Every event that was not delivered; list, filter and redrive it here.
        self.dead_letters = DeadLetters(self, maxsize=dead_letters)
        self._state = _State.OPEN
        self._loop: asyncio.AbstractEventLoop | None = None
        self._matcher = TopicMatcher()
        self._rings: dict[tuple[str, ...], _Ring] = {}
        self._routes: dict[str, tuple[_Ring, ...]] = {}
        self._subs: dict[str, Subscription] = {}
        self._handlers: dict[str, Handler] = {}
        self._pending_handlers: list[Handler] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._acks: dict[str, _AckTracker] = {}
        self._ids = itertools.count(1)
        self._blockers = 0
        self._published = 0
        self._dropped = 0
        if replay_cap < 0:
            raise ConfigurationError("replay_cap must be >= 0")
        self.replay_cap = replay_cap
        self.namespaces: dict[str, Namespace] = dict(namespaces or {})
        for name, ns in self.namespaces.items():
            if not isinstance(ns, Namespace):
                raise ConfigurationError(f"namespace {name!r} must be a Namespace")
        if isinstance(log, str):
            from .log import open_log

            log = open_log(log)
        if log is None and any(ns.durable for ns in self.namespaces.values()):
            from .log import MemoryLog

            log = MemoryLog()
        #: The durable log, or ``None`` when every topic is live-only.
        self.log: EventLog | None = log
        if log is not None:
            log.retention = self._retention_for
        self._started = False
        self._letters_pending: deque[DeadLetter] = deque(maxlen=dead_letters)
        self._letters_removed: set[int] = set()
        self._letters_flush: asyncio.Task[None] | None = None
        self._durable_cache: dict[str, Namespace] = {}
        #: How long durable commits to the log take.
        self.append_latency = LatencyHistogram()
        if isinstance(backplane, str):
            from .backplane import open_backplane

            backplane = open_backplane(backplane)
        #: The backplane shared with other nodes, or ``None`` for one node.
        self.backplane: Backplane | None = backplane
        self._streams: dict[str, _StreamState] = {}
        self._outbox: deque[tuple[str, bytes, bool]] = deque()
        self._outbox_size = outbox
        self._retry: deque[tuple[str, bytes, bool]] = deque(maxlen=outbox)
        self._outbox_wake: asyncio.Event | None = None
        self._interest_wake: asyncio.Event | None = None
        #: Called with ``(topic, durable)`` when continuity of a topic is lost.
        self.gap_listeners: list[Callable[[str, bool], None]] = []
        #: Called with ``(kind, topic, payload)`` for control messages from other nodes.
        self.control_listeners: list[Callable[[str, str, bytes], None]] = []
        #: Traffic per topic since start: ``[events, last offset, last time]``
        #: (bounded: the least recently created entry is forgotten first).
        self.topic_stats: dict[str, list[Any]] = {}
        #: Backplane counters: dropped outgoing, undecodable incoming, gaps filled.
        self.backplane_stats = {"outbox_dropped": 0, "undecodable": 0, "gaps": 0, "caught_up": 0}

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the log, bind to the running loop and start handler tasks. Idempotent.

        Raises:
            LogError: the log could not be opened.
        """
        self._check_open()
        self._loop = asyncio.get_running_loop()
        if not self._started:
            log = self.log
            if log is not None:
                await log.open()
                try:
                    for letter in await log.load_dead_letters(self.dead_letters.maxsize):
                        self.dead_letters._restore(letter)
                except LogError:
                    logger.exception("could not load the stored dead letters")
                self.dead_letters.listeners.append(self._persist_letter)
                self.dead_letters.removal_listeners.append(self._forget_letters)
            backplane = self.backplane
            if backplane is not None:
                backplane.on_messages = self._on_backplane_messages
                backplane.on_state = self._on_backplane_state
                await backplane.open()  # raises BackplaneError: a clear error at start
                self._outbox_wake = asyncio.Event()
                self._interest_wake = asyncio.Event()
                self._interest_wake.set()
                self._supervise(
                    self._loop.create_task(self._send_outbox(), name="eventcast-outbox"), None
                )
                self._supervise(
                    self._loop.create_task(self._sync_interest(), name="eventcast-interest"), None
                )
            self._started = True
        pending, self._pending_handlers = self._pending_handlers, []
        for handler in pending:
            handler._start()

    async def __aenter__(self) -> Bus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._state is _State.CLOSED

    async def close(self) -> None:
        """Close every subscription, stop handler tasks and fail pending acks.

        Idempotent, and releases everything even if cancelled while waiting.
        """
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        for sub in list(self._subs.values()):
            sub._close()
        for tracker in self._acks.values():
            if not tracker.future.done():
                tracker.future.set_result(None)
        flush = self._letters_flush
        tasks = [t for t in self._tasks if t is not flush]
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                # Bounded: a driver that swallows a cancellation (redis-py's
                # PubSub.unsubscribe does) must not hang close(). What is still
                # running is abandoned, and the backplane's close() below ends it.
                done, stuck = await asyncio.wait(tasks, timeout=5)
                for task in done:
                    if not task.cancelled():
                        task.exception()  # retrieved: already reported by _supervise
                if stuck:
                    logger.warning("%d background tasks did not stop in time", len(stuck))
            if flush is not None and not flush.done():
                # Give the dead letters in flight a bounded chance to be stored.
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(5):
                        await asyncio.shield(flush)
        finally:
            if flush is not None and not flush.done():
                flush.cancel()
            if self.backplane is not None:
                await self.backplane.close()
            if self.log is not None and self._started:
                await self.log.close()

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise BusClosedError("the bus is closed")

    def _bind_loop(self) -> None:
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return

    # -- subscribing -----------------------------------------------------------

    def subscribe(
        self,
        topics: str | Iterable[str],
        *,
        id: str | None = None,
        maxsize: int | None = None,
        overflow: Overflow | None = None,
        block_timeout: float | None = None,
        since: Position | str | tuple[int, str] | Mapping[str, Any] | None = None,
        conflation_key: str | None = None,
    ) -> Subscription:
        """Subscribe to one or more topic names or patterns.

        Args:
            topics: a name, a pattern (``orders.*``, ``orders.>``) or several.
            id: the subscriber id; generated when omitted.
            maxsize: the buffer bound, in events (default: the bus's).
            overflow: the overflow policy (default: the bus's).
            block_timeout: the publisher's wait under ``Overflow.BLOCK``.
            since: resume one durable topic after this ``Position(offset,
                epoch)``, or ``"earliest"`` to replay everything kept. Every
                retained event after it is delivered, then live events, with no
                gap and no duplicate; ``sub.recovered`` tells whether the whole
                gap was replayed (await ``sub.ready()`` or enter ``async with``).
            conflation_key: with ``overflow=Overflow.CONFLATE``, the tag whose
                value (with the topic) names the key of which only the newest
                event is kept while the subscriber is behind; ``None``: the
                topic alone.

        Raises:
            InvalidTopicError: a name or pattern breaks the grammar.
            PositionError: ``since`` is malformed.
            SubscriberExistsError: ``id`` is already registered.
            ConfigurationError: ``maxsize`` is not a positive int, or
                ``conflation_key`` is given without ``Overflow.CONFLATE``.
            BusClosedError: the bus is closed.
        """
        self._check_open()
        self._bind_loop()
        filters = validate_many(topics)
        resume: Position | str | None = None
        if since is not None:
            resume = self._check_since(filters, since)
        if id is None:
            id = f"sub-{next(self._ids)}"
            while id in self._subs:
                id = f"sub-{next(self._ids)}"
        elif not isinstance(id, str) or not id:
            raise ConfigurationError("a subscriber id must be a non-empty str")
        elif id in self._subs:
            raise SubscriberExistsError(f"a subscriber with id {id!r} already exists")
        key = tuple(sorted(filters))
        ring = self._rings.get(key)
        created = ring is None
        if ring is None:
            ring = _Ring(key)
        sub = Subscription(
            self,
            ring,
            id=id,
            topics=filters,
            maxsize=self.maxsize if maxsize is None else maxsize,
            policy=self.overflow if overflow is None else overflow,
            block_timeout=self.block_timeout if block_timeout is None else block_timeout,
            conflation_key=conflation_key,
        )
        if created:
            self._rings[key] = ring
            for f in key:
                self._matcher.add(f, ring)
            self._routes.clear()
            if self._interest_wake is not None:
                self._interest_wake.set()
        if sub.policy is Overflow.BLOCK:
            self._blockers += 1
        self._subs[id] = sub
        if resume is not None:
            sub._begin_recovery()
            task = asyncio.get_running_loop().create_task(
                self._recover(sub, filters[0], resume), name=f"eventcast-recover-{id}"
            )
            self._supervise(task, None)
        return sub

    def _check_since(self, filters: tuple[str, ...], since: object) -> Position | str:
        if since == EARLIEST:
            resume: Position | str = EARLIEST
        else:
            resume = Position.coerce(since)
        if len(filters) != 1 or is_pattern(filters[0]):
            raise ConfigurationError("since= resumes exactly one topic name, not a pattern")
        if not self.namespace(filters[0]).durable:
            raise ConfigurationError(
                f"topic {filters[0]!r} keeps no history, so it cannot be resumed "
                "(give its namespace a history_size)"
            )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError("since= needs a running event loop") from None
        return resume

    async def _recover(self, sub: Subscription, topic: str, since: Position | str) -> None:
        """Replay what ``sub`` missed, then hand over to live delivery."""
        log = self.log
        assert log is not None
        try:
            await self._ensure_started()
            head = await log.position(topic)
            if since == EARLIEST:
                replay = await log.read(topic, after=0, limit=self.namespace(topic).history_size)
                sub._finish_recovery(replay, replay[-1].offset if replay else None)
                return
            assert isinstance(since, Position)
            if since.epoch == head.epoch and since.offset > head.offset:
                sub._close(
                    PositionError(
                        f"offset {since.offset} is beyond the head ({head.offset}) of {topic!r}"
                    )
                )
                return
            gap = head.offset - since.offset
            if since.epoch != head.epoch or gap > self.replay_cap:
                sub._finish_recovery(None, None)
                return
            replay = await log.read(topic, after=since.offset, limit=gap) if gap else []
            complete = len(replay) == gap and (not replay or replay[0].offset == since.offset + 1)
            if complete:
                sub._finish_recovery(replay, head.offset, head.epoch)
            else:
                sub._finish_recovery(None, None)
        except LogError as exc:
            logger.warning("could not replay %r for %r: %s", topic, sub.id, exc)
            sub._finish_recovery(None, None)
        except BaseException:
            sub._finish_recovery(None, None)
            raise

    def on(
        self,
        topics: str | Iterable[str],
        handler: HandlerFunc,
        *,
        id: str | None = None,
        maxsize: int | None = None,
        overflow: Overflow | None = None,
        retries: int = 3,
        backoff: float | None = None,
        max_backoff: float | None = None,
    ) -> Handler:
        """Register a callback subscriber (sync or async) and return its :class:`Handler`.

        The callback runs in its own supervised task, one event at a time. If it
        raises, it is retried ``retries`` times with exponential backoff and
        jitter; then the event becomes a dead letter with the error text and the
        attempt count, and ``error_handler`` is called.
        """
        if not callable(handler):
            raise TypeError("handler must be callable")
        sub = self.subscribe(topics, id=id, maxsize=maxsize, overflow=overflow)
        try:
            h = Handler(
                self,
                sub,
                handler,
                retries=retries,
                backoff=self.backoff if backoff is None else backoff,
                max_backoff=self.max_backoff if max_backoff is None else max_backoff,
            )
        except BaseException:
            sub.close()
            raise
        self._handlers[sub.id] = h
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._pending_handlers.append(h)
        else:
            h._start()
        return h

    async def unsubscribe(self, id: str) -> None:
        """Close the subscriber with this id; its iterator ends cleanly.

        Raises:
            SubscriberNotFoundError: no subscriber has this id.
        """
        sub = self._subs.get(id)
        if sub is None:
            raise SubscriberNotFoundError(f"no subscriber with id {id!r}")
        handler = self._handlers.get(id)
        if handler is not None:
            await handler.aclose()
        else:
            sub._close()

    def subscribers(self) -> list[Subscription]:
        """Return the open subscriptions."""
        return list(self._subs.values())

    def get_subscriber(self, id: str) -> Subscription:
        """Return the subscription with this id.

        Raises:
            SubscriberNotFoundError: no subscriber has this id.
        """
        try:
            return self._subs[id]
        except KeyError:
            raise SubscriberNotFoundError(f"no subscriber with id {id!r}") from None

    def topics(self) -> list[str]:
        """Return the topic filters that have at least one subscriber."""
        return sorted({f for key in self._rings for f in key})

    def _forget(self, sub: Subscription) -> None:
        if self._subs.get(sub.id) is sub:
            del self._subs[sub.id]
        handler = self._handlers.pop(sub.id, None)
        if handler is not None and handler._task is not None and not handler._task.done():
            handler._task.cancel()
        if sub.policy is Overflow.BLOCK:
            self._blockers -= 1
        ring = sub._ring
        if not ring.members and self._rings.get(ring.filters) is ring:
            del self._rings[ring.filters]
            for f in ring.filters:
                self._matcher.remove(f, ring)
            self._routes.clear()
            if self._interest_wake is not None:
                self._interest_wake.set()
            for f in ring.filters:
                if not is_pattern(f):
                    self._streams.pop(f, None)

    # -- namespaces and the log -----------------------------------------------

    def namespace(self, topic: str) -> Namespace:
        """Return the options of the namespace a topic or pattern belongs to."""
        ns = self._durable_cache.get(topic)
        if ns is None:
            ns = self.namespaces.get(namespace_of(topic), _LIVE)
            if len(self._durable_cache) >= _ROUTE_CACHE_SIZE:
                self._durable_cache.clear()
            self._durable_cache[topic] = ns
        return ns

    def _retention_for(self, topic: str) -> Retention:
        ns = self.namespace(topic)
        return Retention(size=max(1, ns.history_size), ttl=ns.history_ttl)

    async def _ensure_started(self) -> None:
        if not self._started:
            await self.start()

    def _durable_log(self, topic: str) -> EventLog | None:
        if self.log is None:
            return None
        return self.log if self.namespace(topic).durable else None

    async def history(
        self,
        topic: str,
        *,
        since: Position | int | tuple[int, str] | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> History:
        """Return a page of a durable topic's retained events.

        Forward (the default) pages start after ``since`` (an offset or a
        position; the oldest retained event when ``None``). Reverse pages go
        back from just before ``since`` (from the newest when ``None``).

        Raises:
            InvalidTopicError: the topic name breaks the grammar.
            ConfigurationError: the topic keeps no history.
            UnrecoverablePositionError: ``since`` carries another epoch.
            PositionError: ``since`` is malformed.
            LogError: the log failed.
        """
        self._check_open()
        validate_topic(topic)
        log = self._durable_log(topic)
        if log is None:
            raise ConfigurationError(f"topic {topic!r} keeps no history")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError("limit must be an int >= 0")
        await self._ensure_started()
        head = await log.position(topic)
        offset: int | None = None
        if since is not None:
            if isinstance(since, int) and not isinstance(since, bool):
                offset = Position(since, head.epoch).offset
            else:
                position = Position.coerce(since)
                if position.epoch != head.epoch:
                    raise UnrecoverablePositionError(
                        f"position epoch {position.epoch!r} does not match the stream's "
                        f"({head.epoch!r}) for {topic!r}"
                    )
                offset = position.offset
        if reverse:
            events = await log.read(topic, before=offset, limit=limit, reverse=True)
        else:
            events = await log.read(topic, after=offset or 0, limit=limit)
        return History(events, head)

    async def position(self, topic: str) -> Position:
        """Return a durable topic's latest position ``(offset, epoch)``.

        Raises:
            ConfigurationError: the topic keeps no history.
            LogError: the log failed.
        """
        self._check_open()
        validate_topic(topic)
        log = self._durable_log(topic)
        if log is None:
            raise ConfigurationError(f"topic {topic!r} keeps no history")
        await self._ensure_started()
        return await log.position(topic)

    def _persist_letter(self, letter: DeadLetter) -> None:
        self._letters_pending.append(letter)
        self._start_letters_flush()

    def _start_letters_flush(self) -> None:
        if (self._letters_flush is None or self._letters_flush.done()) and (
            self._state is _State.OPEN
        ):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._letters_flush = loop.create_task(
                self._flush_letters(), name="eventcast-dead-letters"
            )
            self._supervise(self._letters_flush, None)

    async def _flush_letters(self) -> None:
        # Saves and deletions go through this one task, in order (a letter
        # removed right after it was added is never stored again after its
        # deletion), and close() gives it a bounded chance to finish.
        log = self.log
        assert log is not None
        while self._letters_pending or self._letters_removed:
            removed, self._letters_removed = self._letters_removed, set()
            batch = [letter for letter in self._letters_pending if letter.id not in removed]
            self._letters_pending.clear()
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

    def _forget_letters(self, ids: set[int]) -> None:
        if self.log is None:
            return
        self._letters_removed.update(ids)
        self._start_letters_flush()

    # -- publishing ------------------------------------------------------------

    def _route(self, topic: str) -> tuple[_Ring, ...]:
        rings = self._routes.get(topic)
        if rings is None:
            validate_topic(topic)
            rings = tuple(self._matcher.match(topic))  # type: ignore[arg-type]
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[topic] = rings
        return rings

    def _make_event(
        self,
        topic: str,
        data: object,
        tags: Mapping[str, str] | None,
        idempotency_key: str | None,
    ) -> Event:
        if tags is None and idempotency_key is None:
            return Event(topic=topic, data=data)
        return Event(
            topic=topic, data=data, tags=freeze_tags(tags), idempotency_key=idempotency_key
        )

    def publish_nowait(
        self,
        topic: str,
        data: object,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> Event:
        """Publish without awaiting; for live-only topics.

        A full ``Overflow.BLOCK`` subscriber cannot make this wait: the event
        becomes a dead letter for that subscriber instead.

        Raises:
            InvalidTopicError: the topic name breaks the grammar.
            BusClosedError: the bus is closed.
        """
        if self._state is not _State.OPEN:
            raise BusClosedError("the bus is closed")
        rings = self._route(topic)
        if self.log is not None and self.namespace(topic).durable:
            raise ConfigurationError(
                f"topic {topic!r} is durable: publish it with `await bus.publish()`"
            )
        event = self._make_event(topic, data, tags, None)
        for ring in rings:
            ring.append(event)
        self._published += 1
        self._count_topic(event)
        if self.backplane is not None:
            self._forward(event)
        return event

    async def publish(
        self,
        topic: str,
        data: object,
        *,
        tags: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        ack: bool = False,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Event:
        """Publish an event and return it.

        Local fan-out never waits on a subscriber, except one that chose
        ``Overflow.BLOCK``. With ``ack=True`` it returns once every handler
        subscriber matching the topic has processed the event, retrying
        failures and timeouts with backoff; on final failure it records dead
        letters, calls ``error_handler`` and raises.

        Args:
            topic: a concrete topic name.
            data: the payload; any object in process.
            tags: string metadata.
            idempotency_key: on a durable topic, a repeat within the dedup
                window stores once and returns the original event.
            ack: wait for handler subscribers to process the event.
            timeout: with ``ack``, the wait per attempt (default: the bus's).
            retries: with ``ack``, how many times to redeliver (default: the bus's).

        Raises:
            InvalidTopicError: the topic name breaks the grammar.
            BusClosedError: the bus is closed.
            LogError: the topic is durable and the log failed; nothing was
                fanned out.
            EncodeError: the topic is durable and the data cannot be encoded.
            DeliveryError: with ``ack``, a handler failed every attempt.
            AckTimeoutError: with ``ack``, a handler did not answer in time.
        """
        self._check_open()
        rings = self._route(topic)
        event = self._make_event(topic, data, tags, idempotency_key)
        if self._blockers:
            rings = await self._wait_for_blockers(topic, rings)
        log = self._durable_log(topic)
        if log is not None:
            # Commit before any fan-out; no await between the commit and the
            # fan-out, so subscribers see events in offset order.
            await self._ensure_started()
            started = time.perf_counter()
            committed = (await log.append((event,)))[0]
            self.append_latency.observe(time.perf_counter() - started)
            if committed.id != event.id:
                return committed  # an idempotent repeat: stored once, delivered once
            event = committed
            rings = self._route(topic)
        if not ack:
            self._deliver(event, rings)
            self._published += 1
            return event
        return await self._publish_acked(event, rings, timeout, retries)

    async def publish_many(
        self,
        items: Iterable[tuple[str, object]],
        *,
        tags: Mapping[str, str] | None = None,
    ) -> list[Event]:
        """Publish a batch of ``(topic, data)`` pairs, in order; return the events.

        Every topic is validated before anything is published, so an invalid
        name publishes nothing. The durable events of the batch are committed
        to the log in one atomic append before any fan-out. Waiting subscribers
        wake once for the batch. When a matching subscriber chose
        ``Overflow.BLOCK``, the events are published one by one instead (the
        publisher may wait between them), so the batch is not atomic then.

        Raises:
            InvalidTopicError: a topic name breaks the grammar.
            BusClosedError: the bus is closed.
            LogError: the log failed; nothing was published.
        """
        self._check_open()
        pairs = list(items)
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError("publish_many takes (topic, data) pairs")
            validate_topic(pair[0])
        if self._blockers and any(
            ring.blockers for topic, _ in pairs for ring in self._route(topic)
        ):
            # A BLOCK subscriber may need the publisher to wait between events:
            # publish them one by one, in order (each durable one committed alone).
            return [await self.publish(topic, data, tags=tags) for topic, data in pairs]
        frozen = freeze_tags(tags) if tags else None
        events = [
            Event(topic=topic, data=data)
            if frozen is None
            else Event(topic=topic, data=data, tags=frozen)
            for topic, data in pairs
        ]
        durable = [i for i, e in enumerate(events) if self._durable_log(e.topic) is not None]
        fresh = [True] * len(events)
        if durable:
            log = self.log
            assert log is not None
            await self._ensure_started()
            started = time.perf_counter()
            committed = await log.append([events[i] for i in durable])
            self.append_latency.observe(time.perf_counter() - started)
            for i, stored in zip(durable, committed, strict=True):
                fresh[i] = stored.id == events[i].id
                events[i] = stored
        for event, new in zip(events, fresh, strict=True):
            if new:
                self._deliver(event, self._route(event.topic))
        self._published += sum(fresh)
        return events

    def publish_threadsafe(
        self,
        topic: str,
        data: object,
        **kwargs: Any,
    ) -> concurrent.futures.Future[Event]:
        """Publish from any thread; return a ``concurrent.futures.Future`` of the event.

        The bus must have been started (``async with Bus()``) in some loop. The
        future fails with :class:`BusClosedError` if the bus is closed.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or self._state is _State.CLOSED:
            future: concurrent.futures.Future[Event] = concurrent.futures.Future()
            future.set_exception(BusClosedError("the bus is not running"))
            return future
        return asyncio.run_coroutine_threadsafe(self.publish(topic, data, **kwargs), loop)

    async def _wait_for_blockers(self, topic: str, rings: tuple[_Ring, ...]) -> tuple[_Ring, ...]:
        """Wait while a matching ``Overflow.BLOCK`` subscriber is full, each up to its timeout.

        Returns the routes to append to, with no await between the last check
        and the caller's append. A subscriber still full past its timeout gets
        the event as a dead letter when it is appended.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            waiting = [
                sub
                for ring in rings
                for sub in ring.blockers
                if sub.buffered >= sub.maxsize and loop.time() < start + sub.block_timeout
            ]
            if not waiting:
                return rings
            sub = waiting[0]
            await sub._wait_for_space(start + sub.block_timeout)
            self._check_open()  # the bus closed while this publisher waited
            rings = self._route(topic)

    async def _publish_acked(
        self,
        event: Event,
        rings: tuple[_Ring, ...],
        timeout: float | None,
        retries: int | None,
    ) -> Event:
        timeout = self.ack_timeout if timeout is None else timeout
        retries = self.ack_retries if retries is None else retries
        if timeout <= 0 or retries < 0:
            raise ConfigurationError("ack needs a positive timeout and retries >= 0")
        handlers = [
            self._handlers[sub.id]
            for ring in rings
            for sub in ring.members
            if sub.id in self._handlers
        ]
        if not handlers:
            self._deliver(event, rings)
            self._published += 1
            return event
        tracker = _AckTracker(handlers, timeout)
        self._acks[event.id] = tracker
        failed: list[Handler] = []
        timed_out = False
        try:
            self._deliver(event, rings)
            self._published += 1
            for attempt in range(retries + 1):
                try:
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(tracker.future)
                except TimeoutError:
                    pass
                if self._state is _State.CLOSED:
                    raise BusClosedError("the bus closed before the event was acknowledged")
                timed_out = bool(tracker.pending)
                failed = [h for h in handlers if h in tracker.pending or h in tracker.errors]
                if not failed:
                    return event
                if attempt == retries:
                    break
                await asyncio.sleep(backoff_delay(attempt, self.backoff, self.max_backoff))
                failed = [h for h in failed if not h.subscription.closed]
                if not failed:
                    return event
                tracker.rearm(failed)
                for h in failed:
                    h.subscription._inject((event,))
        finally:
            del self._acks[event.id]
        ids = tuple(h.id for h in failed)
        errors = "; ".join(f"{h.id}: {tracker.errors.get(h, 'timed out')}" for h in failed)
        error: DeliveryError
        if timed_out:
            error = AckTimeoutError(
                f"event on {event.topic!r} not acknowledged after {retries + 1} attempts "
                f"({errors})",
                ids,
            )
        else:
            error = DeliveryError(
                f"event on {event.topic!r} failed after {retries + 1} attempts ({errors})", ids
            )
        for h in failed:
            letter = self.dead_letters.add(
                event,
                h.id,
                "ack_failed",
                attempts=retries + 1,
                error=tracker.errors.get(h, "timed out"),
            )
            self._handle_error(error, letter)
        raise error

    # -- delivery, continuity and the backplane -------------------------------------

    def _count_topic(self, event: Event) -> None:
        stats = self.topic_stats.get(event.topic)
        if stats is None:
            if len(self.topic_stats) >= _TOPIC_STATS_LIMIT:
                self.topic_stats.pop(next(iter(self.topic_stats)))
            stats = self.topic_stats[event.topic] = [0, None, 0.0]
        stats[0] += 1
        if event.offset is not None:
            stats[1] = event.offset
        stats[2] = event.time

    def _deliver(self, event: Event, rings: tuple[_Ring, ...]) -> None:
        """Fan an event out locally, in order, then share it with other nodes."""
        self._count_topic(event)
        if event.offset is None:
            for ring in rings:
                ring.append(event)
        else:
            self._deliver_durable(event)
        if self.backplane is not None:
            self._forward(event)

    def _deliver_durable(self, event: Event) -> None:
        """Deliver a durable event exactly once and in offset order on this node.

        Events arrive from local publishes and from the backplane, in any
        order. One at the next offset is delivered; one at or below the last
        delivered is a duplicate; one past a gap is held while the gap is read
        from the log, so subscribers always see a contiguous stream.
        """
        topic = event.topic
        offset = event.offset
        epoch = event.epoch
        assert offset is not None
        assert epoch is not None
        state = self._streams.get(topic)
        if state is None:
            if len(self._streams) >= _STREAMS_LIMIT:
                self._streams.pop(next(iter(self._streams)))
            state = self._streams[topic] = _StreamState(epoch, offset - 1)
        elif state.epoch != epoch:
            # The stream was wiped or truncated: continuity cannot be proven.
            state.epoch, state.last, state.pending = epoch, offset - 1, None
            self._signal_gap(topic, True)
        if state.pending is not None:
            if len(state.pending) < _PENDING_LIMIT:
                state.pending.append(event)
            return
        if offset <= state.last:
            return  # already delivered (a backplane echo of a local publish, say)
        if offset == state.last + 1:
            for ring in self._route(topic):
                ring.append(event)
            state.last = offset
            return
        state.pending = [event]
        self.backplane_stats["gaps"] += 1
        self._supervise(
            asyncio.get_running_loop().create_task(
                self._catch_up(topic, state), name=f"eventcast-catch-up-{topic}"
            ),
            None,
        )

    async def _catch_up(self, topic: str, state: _StreamState, *, to_head: bool = False) -> None:
        """Fill a durable topic's gap from the log, then release the held events."""
        log = self.log
        try:
            while True:
                pending = sorted(state.pending or (), key=lambda e: e.offset or 0)
                while pending and (pending[0].offset or 0) <= state.last + 1:
                    event = pending.pop(0)
                    if event.offset == state.last + 1 and event.epoch == state.epoch:
                        for ring in self._route(topic):
                            ring.append(event)
                        state.last = event.offset
                state.pending = pending
                if to_head and log is not None:
                    head = await log.position(topic)
                    to_head = False
                    if head.epoch != state.epoch:
                        self._signal_gap(topic, True)
                        state.epoch, state.last = head.epoch, head.offset
                        continue
                    target = head.offset
                elif pending:
                    target = (pending[0].offset or 0) - 1
                else:
                    break
                if target <= state.last:
                    if not state.pending:
                        break
                    continue
                events = (
                    await log.read(topic, after=state.last, limit=min(target - state.last, 1000))
                    if log is not None
                    else []
                )
                if not events or events[0].offset != state.last + 1:
                    # Beyond retention (or no log): continuity cannot be proven.
                    self._signal_gap(topic, True)
                    state.last = target
                    continue
                for event in events:
                    if event.offset == state.last + 1:
                        for ring in self._route(topic):
                            ring.append(event)
                        state.last = event.offset
                self.backplane_stats["caught_up"] += len(events)
        except LogError as exc:
            logger.warning("could not read the gap of %r from the log: %s", topic, exc)
            self._signal_gap(topic, True)
            held = sorted(state.pending or (), key=lambda e: e.offset or 0)
            for event in held:
                if (event.offset or 0) > state.last:
                    for ring in self._route(topic):
                        ring.append(event)
                    state.last = event.offset or state.last
        finally:
            state.pending = None

    def _signal_gap(self, topic: str, durable: bool) -> None:
        for listener in list(self.gap_listeners):
            try:
                listener(topic, durable)
            except Exception:
                logger.exception("a gap listener failed")

    def _forward(self, event: Event) -> None:
        backplane = self.backplane
        assert backplane is not None
        try:
            payload = encode_envelope(backplane.node_id, event)
        except EncodeError:
            return  # in-process only data: other nodes cannot receive it
        self._queue_out(event.topic, payload, event.offset is not None)

    def _queue_out(self, topic: str, payload: bytes, durable: bool) -> None:
        if len(self._outbox) >= self._outbox_size:
            self._outbox.popleft()
            self.backplane_stats["outbox_dropped"] += 1
        self._outbox.append((topic, payload, durable))
        wake = self._outbox_wake
        if wake is not None:
            wake.set()

    def send_control(self, kind: str, topic: str, payload: bytes) -> None:
        """Send a control message (join, leave…) to the other nodes (best effort)."""
        backplane = self.backplane
        if backplane is None:
            return
        event = Event(topic=topic, data=payload, tags={"kind": kind})
        self._queue_out(topic, encode_envelope(backplane.node_id, event, kind=KIND_CONTROL), False)

    async def _send_outbox(self) -> None:
        backplane = self.backplane
        wake = self._outbox_wake
        assert backplane is not None
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(1000, len(self._outbox)))]
                try:
                    await backplane.publish([(topic, payload) for topic, payload, _ in batch])
                except BackplaneError as exc:
                    # Durable publications are kept and sent again after the
                    # reconnect (other nodes also catch up from the log).
                    kept = [item for item in batch if item[2]]
                    self._retry.extend(kept)
                    self.backplane_stats["outbox_dropped"] += len(batch) - len(kept)
                    logger.debug("backplane publish failed: %s", exc)

    def _on_backplane_messages(self, payloads: Sequence[bytes]) -> None:
        """Deliver a batch from the backplane locally (decoded once per publication)."""
        if self._state is not _State.OPEN:
            return
        backplane = self.backplane
        assert backplane is not None
        node = backplane.node_id
        own = b'["%s"' % node.encode()
        for payload in payloads:
            if payload.startswith(own):
                continue  # this node's own publication, already delivered here
            try:
                envelope, event = decode_envelope(payload)
            except BackplaneError as exc:
                self.backplane_stats["undecodable"] += 1
                logger.warning("skipping a backplane message: %s", exc)
                continue
            if envelope.node == node:
                continue
            if envelope.kind == KIND_CONTROL:
                kind = event.tags.get("kind", "")
                data = event.data if isinstance(event.data, bytes) else event.encoded_data()
                for listener in list(self.control_listeners):
                    try:
                        listener(kind, event.topic, data)
                    except Exception:
                        logger.exception("a control listener failed")
                continue
            self._count_topic(event)
            if event.offset is not None and event.epoch is not None:
                self._deliver_durable(event)
            else:
                for ring in self._route(event.topic):
                    ring.append(event)

    def _on_backplane_state(self, up: bool) -> None:
        """After a reconnect: resend what failed, catch durable topics up, flag live ones."""
        if not up or self._state is not _State.OPEN:
            return
        if self._retry:
            for topic, payload, durable in self._retry:
                self._queue_out(topic, payload, durable)
            self._retry.clear()
        loop = asyncio.get_running_loop()
        for topic, state in list(self._streams.items()):
            if state.pending is None and self.log is not None:
                state.pending = []
                self._supervise(
                    loop.create_task(
                        self._catch_up(topic, state, to_head=True),
                        name=f"eventcast-catch-up-{topic}",
                    ),
                    None,
                )
        for key in list(self._rings):
            for topic_filter in key:
                if is_pattern(topic_filter) or not self.namespace(topic_filter).durable:
                    # Live-only: what was published during the outage is lost.
                    self._signal_gap(topic_filter, False)

    async def _sync_interest(self) -> None:
        """Keep the backplane subscribed to exactly the filters with local subscribers."""
        backplane = self.backplane
        wake = self._interest_wake
        assert backplane is not None
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            wanted = {f for key in self._rings for f in key}
            for topic_filter in sorted(wanted - backplane.filters):
                await backplane.subscribe(topic_filter)
            for topic_filter in sorted(backplane.filters - wanted):
                await backplane.unsubscribe(topic_filter)

    # -- failures and dead letters -------------------------------------------

    def _handle_error(self, error: EventcastError, letter: DeadLetter | None) -> None:
        handler = self.error_handler
        if handler is None:
            logger.error("%s", error)
            return
        try:
            result = handler(error, letter)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._supervise(task, None)
        except Exception:
            logger.exception("the bus's error_handler raised")

    def _report_drop(self, sub: Subscription, reason: str) -> None:
        if self.on_drop is None:
            return
        try:
            self.on_drop(sub, reason)
        except Exception:
            logger.exception("the bus's on_drop handler raised")

    def _count_drops(self, count: int) -> None:
        self._dropped += count

    def _supervise(self, task: asyncio.Task[Any], handler: Handler | None) -> None:
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None:
                return
            logger.error("background task %s failed", t.get_name(), exc_info=exc)
            if handler is not None:
                handler.subscription._close(
                    SubscriptionClosedError(f"handler task {handler.id!r} crashed: {exc!r}")
                )
            error = (
                exc
                if isinstance(exc, EventcastError)
                else EventcastError(f"background task {t.get_name()} failed: {exc!r}")
            )
            error.__cause__ = exc if error is not exc else exc.__cause__
            self._handle_error(error, None)

        task.add_done_callback(done)

    def _redeliver(self, letter: DeadLetter) -> bool:
        sub = self._subs.get(letter.subscriber)
        if sub is None or sub.closed:
            return False
        sub._inject((letter.event,))
        return True

    # -- introspection -------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """Return bus-wide counters: published, dropped, subscribers, topics, dead letters."""
        return {
            "published": self._published,
            "dropped": self._dropped,
            "subscribers": len(self._subs),
            "rings": len(self._rings),
            "dead_letters": len(self.dead_letters),
        }

    def __repr__(self) -> str:
        return f"<Bus {self._state.value} subscribers={len(self._subs)}>"
