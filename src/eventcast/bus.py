"""The asyncio event bus: a small facade over parts with one job each.

.. code-block:: python

    async with Bus() as bus:
        async with bus.subscribe("orders.*") as sub:
            await bus.publish("orders.created", {"id": 1})
            event = await sub.get()

Publishing never waits on a subscriber (unless that subscriber chose
``Overflow.BLOCK``): local fan-out appends the event once to a shared ring per
group of subscribers, in O(1). See :mod:`eventcast.subscription`.

The parts (``docs/architecture.md`` draws them):

* :mod:`eventcast._router`: which rings an event goes to, and the one fan-out;
* :mod:`eventcast._sequencer`: durable topics in offset order, gaps filled from the log;
* :mod:`eventcast._link`: the backplane outbox, interest and incoming publications;
* :mod:`eventcast.handlers`: handler subscribers, acknowledged publishes, retries;
* :mod:`eventcast.replay`: the one replay path and handoff rule for every reader;
* :mod:`eventcast.deadletters`: the dead letter store and its archive in the log;
* :mod:`eventcast.namespaces`: which topics are durable, and what they keep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, TypeAlias

from ._caches import remember
from ._link import DEFAULT_OUTBOX, BackplaneLink
from ._router import Router
from ._sequencer import Sequencer
from ._stats import LatencyHistogram, TopicStats
from ._tasks import Supervisor
from .backplane.base import Backplane
from .deadletters import DEFAULT_DEAD_LETTERS, DeadLetter, DeadLetters, LetterArchive
from .events import EARLIEST, Event, History, Position, freeze_tags, new_event
from .exceptions import (
    BusClosedError,
    ConfigurationError,
    EventcastError,
    PositionError,
    SubscriberExistsError,
    SubscriberNotFoundError,
    UnrecoverablePositionError,
)
from .handlers import ErrorHandler, Handler, HandlerFunc, Handlers
from .log.base import EventLog
from .namespaces import Namespace, Namespaces
from .replay import Replay, replay
from .subscription import DEFAULT_MAXSIZE, Overflow, Subscription, _Ring
from .topics import is_pattern, validate_many, validate_topic

__all__ = ["DEFAULT_REPLAY_CAP", "Bus", "DropHandler"]

#: Most missed events a resume replays; past it, ``recovered`` is False.
DEFAULT_REPLAY_CAP: Final = 300

logger = logging.getLogger("eventcast.bus")

#: Called once per drop episode with the subscription and the reason.
DropHandler: TypeAlias = Callable[[Subscription, str], object]


#: A topic remembered by the fast path: its rings, and its counters in
#: ``Bus.topic_stats`` (``None`` when topics are not counted).
_LiveRoute: TypeAlias = tuple[tuple[_Ring, ...], list[Any] | None]


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


#: ``_State.OPEN``, for the hot paths: an enum member read from its class costs
#: ~65 ns on CPython 3.11 (a descriptor call), a module global ~5.
_OPEN: Final = _State.OPEN


class _Subscribers:
    """The bus's subscriber registry: ids, the subscriptions, and what they report."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.by_id: dict[str, Subscription] = {}
        self._ids = itertools.count(1)
        #: Open subscriptions under ``Overflow.BLOCK`` (publishers check them).
        self.blockers = 0
        #: Events dropped by every subscription since start.
        self.dropped = 0

    def new_id(self) -> str:
        id = f"sub-{next(self._ids)}"
        while id in self.by_id:
            id = f"sub-{next(self._ids)}"
        return id

    def add(self, sub: Subscription) -> None:
        self.by_id[sub.id] = sub
        if sub.policy is Overflow.BLOCK:
            self.blockers += 1

    # -- SubscriptionHost ------------------------------------------------------

    def dead_letter(self, sub: Subscription, events: Iterable[Event], reason: str) -> int:
        add = self._bus.dead_letters.add
        count = 0
        for event in events:
            add(event, sub.id, reason)
            count += 1
        self.dropped += count
        return count

    def drop_episode(self, sub: Subscription, reason: str) -> None:
        on_drop = self._bus.on_drop
        if on_drop is None:
            return
        try:
            on_drop(sub, reason)
        except Exception:
            logger.exception("the bus's on_drop handler raised")

    def release(self, sub: Subscription) -> None:
        if self.by_id.get(sub.id) is sub:
            del self.by_id[sub.id]
        if sub.policy is Overflow.BLOCK:
            self.blockers -= 1
        self._bus._released(sub)


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
        count_topics: count the traffic of each topic in :attr:`topic_stats`
            (for dashboards; off by default, it costs a dict update per publish).

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
        count_topics: bool = False,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be a positive int, not {maxsize!r}")
        if ack_timeout <= 0 or ack_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ConfigurationError("timeouts and retries must be positive")
        if replay_cap < 0:
            raise ConfigurationError("replay_cap must be >= 0")
        self.maxsize = maxsize
        self.overflow = overflow
        self.block_timeout = block_timeout
        self.ack_timeout = ack_timeout
        self.ack_retries = ack_retries
        self.error_handler = error_handler
        self.on_drop = on_drop
        #: The most missed events a resume replays.
        self.replay_cap = replay_cap
        self._namespaces = Namespaces(namespaces)
        #: Options per namespace name.
        self.namespaces: dict[str, Namespace] = self._namespaces.table
        self._state = _State.OPEN
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._published = 0
        self._tasks = Supervisor(logger, self._task_failed)
        self._subs = _Subscribers(self)
        #: Every event that was not delivered; list, filter and redrive it here.
        self.dead_letters = DeadLetters(self._redeliver, maxsize=dead_letters)
        self._handlers = Handlers(
            self.dead_letters, self._tasks, self._report, backoff=backoff, max_backoff=max_backoff
        )
        if isinstance(log, str):
            from .log import open_log

            log = open_log(log)
        if log is None and self._namespaces.any_durable:
            from .log import MemoryLog

            log = MemoryLog()
        #: The durable log, or ``None`` when every topic is live-only.
        self.log: EventLog | None = log
        if log is not None:
            log.set_retention(self._namespaces.retention)
        self._archive = (
            LetterArchive(self.dead_letters, log, self._spawn) if log is not None else None
        )
        #: How long durable commits to the log take.
        self.append_latency = LatencyHistogram()
        #: Traffic per topic since start: ``[events, last offset, last time]`` (bounded
        #: as the route cache is; empty unless the bus was made with ``count_topics=True``).
        self.topic_stats = TopicStats(
            on_forget=self._forget_live, in_use=lambda: len(self._router.rings)
        )
        self._count_topics = count_topics
        #: Called with ``(topic, durable)`` when continuity of a topic is lost.
        self.gap_listeners: list[Callable[[str, bool], None]] = []
        self._router = Router()
        # The fast path of publish_nowait and publish: topics checked once
        # (live-only, no schema; see _remember_live) and their rings; forgotten by
        # the router where subscriptions change, and when the bus closes. Each
        # holds the topic's counters too, so one lookup serves both.
        self._live_routes: dict[str, _LiveRoute] = {}
        self._router.derived.append(self._live_routes)
        # The fast path of a durable publish: topics of durable, untyped
        # namespaces that were checked once (name, namespace) and committed.
        self._durable_topics: dict[str, None] = {}
        # What the log calls with their events as committed (one object: the
        # log groups the appends made with the same one).
        self._on_commit = self._deliver_committed
        self._sequencer = Sequencer(self._router, log, self._spawn, self._signal_gap)
        if isinstance(backplane, str):
            from .backplane import open_backplane

            backplane = open_backplane(backplane)
        #: The backplane shared with other nodes, or ``None`` for one node.
        self.backplane: Backplane | None = backplane
        self._link: BackplaneLink | None = None
        if backplane is not None:
            self._link = BackplaneLink(
                backplane,
                outbox=outbox,
                spawn=self._spawn,
                wanted=self._router.filters,
                on_event=self._deliver_remote,
                on_up=self._backplane_up,
            )
            self._router.on_change = self._link.interest_changed

    @property
    def backoff(self) -> float:
        """Base delay of retry backoff, in seconds."""
        return self._handlers.backoff

    @property
    def max_backoff(self) -> float:
        """Cap of retry backoff, in seconds."""
        return self._handlers.max_backoff

    @property
    def control_listeners(self) -> list[Callable[[str, str, bytes], None]]:
        """Called with ``(kind, topic, payload)`` for control messages from other nodes."""
        return self._link.control_listeners if self._link is not None else []

    @property
    def cluster_listeners(self) -> list[Callable[[bytes], None]]:
        """Called with each message of the backplane's control channel (see ``_link``)."""
        return self._link.cluster_listeners if self._link is not None else []

    def send_cluster(self, payload: bytes, node: str | None = None) -> None:
        """Send a message on the control channel: to every node, or to one by id (best effort)."""
        if self._link is not None:
            self._link.send_cluster(payload, node)

    @property
    def backplane_stats(self) -> dict[str, int]:
        """Backplane counters: dropped outgoing, undecodable incoming, gaps filled."""
        link = self._link.stats if self._link is not None else {}
        return {
            "outbox_dropped": link.get("outbox_dropped", 0),
            "undecodable": link.get("undecodable", 0),
            "control_dropped": link.get("control_dropped", 0),
            "gaps": self._sequencer.gaps,
            "caught_up": self._sequencer.caught_up,
        }

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the log, bind to the running loop and start handler tasks. Idempotent.

        Raises:
            LogError: the log could not be opened.
            BackplaneError: the backplane could not be reached.
        """
        self._check_open()
        self._loop = asyncio.get_running_loop()
        if not self._started:
            try:
                if self.log is not None:
                    await self.log.open()
                    assert self._archive is not None
                    await self._archive.open()
                if self._link is not None:
                    await self._link.start()  # raises BackplaneError: a clear error at start
            except BaseException:
                # Release what did open (closing a log is idempotent).
                if self.log is not None:
                    await self.log.close()
                raise
            self._started = True
        self._handlers.start()

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
        self._live_routes.clear()
        for sub in list(self._subs.by_id.values()):
            sub._close()
        self._handlers.close()
        archive = self._archive
        try:
            await self._tasks.aclose(keep=archive.task if archive is not None else None)
            if archive is not None:
                await archive.aclose()
        finally:
            if self._link is not None:
                await self._link.aclose()
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

    async def _ensure_started(self) -> None:
        if not self._started:
            await self.start()

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
            id = self._subs.new_id()
        elif not isinstance(id, str) or not id:
            raise ConfigurationError("a subscriber id must be a non-empty str")
        elif id in self._subs.by_id:
            raise SubscriberExistsError(f"a subscriber with id {id!r} already exists")
        ring = self._router.ring(tuple(sorted(filters)))
        sub = Subscription(
            self._subs,
            ring,
            id=id,
            topics=filters,
            maxsize=self.maxsize if maxsize is None else maxsize,
            policy=self.overflow if overflow is None else overflow,
            block_timeout=self.block_timeout if block_timeout is None else block_timeout,
            conflation_key=conflation_key,
        )
        self._router.register(ring)
        self._subs.add(sub)
        if resume is not None:
            sub._begin_recovery()
            self._spawn(self._recover(sub, filters[0], resume), f"eventcast-recover-{id}")
        return sub

    def _check_since(self, filters: tuple[str, ...], since: object) -> Position | str:
        resume = EARLIEST if since == EARLIEST else Position.coerce(since)
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
        try:
            await self.routed(topic)  # then the head read below misses nothing live
            result = await self.replay(topic, since)
        except PositionError as exc:  # beyond the head: the caller must fix it
            sub._close(exc)
        except EventcastError as exc:
            logger.warning("could not replay %r for %r: %s", topic, sub.id, exc)
            sub._finish_recovery([], False, None)
        except BaseException:
            sub._finish_recovery([], False, None)
            raise
        else:
            # Not recovered, a bus subscriber was given nothing and told no
            # position: it goes on with every live event, held ones included.
            handoff = result.handoff() if result.recovered else None
            sub._finish_recovery(result.events, bool(result.recovered), handoff)

    async def routed(self, topic_filter: str) -> None:
        """Wait until other nodes' publications to ``topic_filter`` reach this bus.

        Call it after subscribing: with a backplane, the subscription there is
        made in the background, and a publication another node sends before it
        takes effect never arrives here. Once this returns, everything
        published anywhere reaches this node's subscribers (a resume reads the
        log's head only after it). Returns at once with no backplane, or while
        the backplane is down (its reconnect subscribes again, and durable
        readers catch up from the log).

        Raises:
            BackplaneError: the backplane did not confirm the subscription in time.
        """
        if self._link is not None:
            await self._link.routed(topic_filter)

    async def replay(self, topic: str, since: Position | str | None) -> Replay:
        """Read what a reader of a durable topic missed after ``since``.

        The one replay path of every reader (bus resumes, WebSocket recovery,
        SSE streams); see :mod:`eventcast.replay`. ``since=None`` reads only
        the head.

        Raises:
            ConfigurationError: the topic keeps no history.
            PositionError: ``since`` is beyond the head of the current epoch.
            LogError: the log failed.
        """
        log = await self._history_log(topic)
        result = await replay(
            log,
            topic,
            since,
            cap=self.replay_cap,
            earliest_limit=self.namespace(topic).history_size,
        )
        if self._router.route(topic):  # a reader is subscribed: delivery resumes after it
            self._sequencer.seed(topic, result.position.offset, result.position.epoch)
        return result

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
                self._handlers,
                sub,
                handler,
                retries=retries,
                backoff=self.backoff if backoff is None else backoff,
                max_backoff=self.max_backoff if max_backoff is None else max_backoff,
            )
        except BaseException:
            sub.close()
            raise
        self._handlers.add(h)
        return h

    async def unsubscribe(self, id: str) -> None:
        """Close the subscriber with this id; its iterator ends cleanly.

        Raises:
            SubscriberNotFoundError: no subscriber has this id.
        """
        sub = self.get_subscriber(id)
        handler = self._handlers.by_id.get(id)
        if handler is not None:
            await handler.aclose()
        else:
            sub._close()

    def subscribers(self) -> list[Subscription]:
        """Return the open subscriptions."""
        return list(self._subs.by_id.values())

    def get_subscriber(self, id: str) -> Subscription:
        """Return the subscription with this id.

        Raises:
            SubscriberNotFoundError: no subscriber has this id.
        """
        try:
            return self._subs.by_id[id]
        except KeyError:
            raise SubscriberNotFoundError(f"no subscriber with id {id!r}") from None

    def topics(self) -> list[str]:
        """Return the topic filters that have at least one subscriber."""
        return sorted(self._router.filters())

    def _released(self, sub: Subscription) -> None:
        """A subscription closed: stop its handler, drop its ring once empty."""
        self._handlers.forget(sub.id)
        ring = sub._ring
        if self._router.release(ring):
            for f in ring.filters:
                if not is_pattern(f):
                    self._sequencer.forget(f)

    # -- namespaces and the log -----------------------------------------------

    def namespace(self, topic: str) -> Namespace:
        """Return the options of the namespace a topic or pattern belongs to."""
        return self._namespaces.of(topic)

    def _durable_log(self, topic: str) -> EventLog | None:
        if self.log is None:
            return None
        return self.log if self.namespace(topic).durable else None

    async def _history_log(self, topic: str) -> EventLog:
        """The log of a durable topic, started, for reading it.

        Raises:
            BusClosedError: the bus is closed.
            InvalidTopicError: the topic name breaks the grammar.
            ConfigurationError: the topic keeps no history.
        """
        self._check_open()
        validate_topic(topic)
        log = self._durable_log(topic)
        if log is None:
            raise ConfigurationError(f"topic {topic!r} keeps no history")
        await self._ensure_started()
        return log

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
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError("limit must be an int >= 0")
        log = await self._history_log(topic)
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
        log = await self._history_log(topic)
        return await log.position(topic)

    # -- publishing ------------------------------------------------------------

    def _make_event(
        self,
        topic: str,
        data: object,
        tags: Mapping[str, str] | None,
        idempotency_key: str | None,
        ns: Namespace,
    ) -> Event:
        if ns.schema is not None:
            ns.check(topic, data)
        if tags is None:
            return new_event(topic, data, None, idempotency_key)
        return new_event(topic, data, freeze_tags(tags), idempotency_key)

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
            ConfigurationError: the topic is durable.
            BusClosedError: the bus is closed.
        """
        route = self._live_routes.get(topic)
        if route is None or tags is not None:
            return self._publish_checked(topic, data, tags)
        # A topic already checked, live-only, whose routes are known: _deliver's
        # steps for such an event, inline (the hottest path of the bus: three
        # calls fewer), its count too (TopicStats.count for an event without
        # offset, into the counters the route holds).
        event = new_event(topic, data)
        self._published += 1
        rings, stats = route
        if stats is not None:
            stats[0] += 1
            stats[2] = event.time
        for ring in rings:
            ring.append(event)
        if self._link is not None:
            self._link.forward(event)
        return event

    def publish_known(self, topic: str, data: object) -> Event | None:
        """Publish without awaiting when ``topic`` is live-only.

        The fast path of :meth:`publish` (no tags, key or ack), for callers
        that avoid a coroutine per event: returns the event, or ``None`` when
        nothing was published and the event must go through :meth:`publish`
        (a durable topic, a closed bus, or an ``Overflow.BLOCK`` subscriber
        somewhere). A topic the bus has published on since its routes last
        changed takes the shortest path (its routes remembered).

        Raises:
            InvalidTopicError: as :meth:`publish`.
            InvalidDataError: as :meth:`publish`.
        """
        if self._subs.blockers or self._state is not _OPEN:
            return None
        if topic in self._live_routes:
            return self.publish_nowait(topic, data)
        if topic in self._durable_topics:
            return None  # durable, checked before: publish() commits it without routing
        return self._publish_routed(topic, data, None)

    def _publish_checked(self, topic: str, data: object, tags: Mapping[str, str] | None) -> Event:
        """publish_nowait with every check; remembers a topic the fast path may take."""
        if self._state is not _OPEN:
            raise BusClosedError("the bus is closed")
        event = self._publish_routed(topic, data, tags)
        if event is None:
            raise ConfigurationError(
                f"topic {topic!r} is durable: publish it with `await bus.publish()`"
            )
        return event

    def _publish_routed(
        self, topic: str, data: object, tags: Mapping[str, str] | None
    ) -> Event | None:
        """Publish a live topic's event with every check (``None``, nothing published:
        the topic is durable); remembers a topic the fast path may take."""
        rings = self._router.route(topic)
        ns = self._namespaces.of(topic)
        if ns.history_size and self.log is not None:
            return None
        event = self._make_event(topic, data, tags, None, ns)
        self._remember_live(topic, rings, ns)
        self._deliver(event, rings)
        return event

    def _remember_live(self, topic: str, rings: tuple[_Ring, ...], ns: Namespace) -> None:
        """Let the fast path take a live-only, untyped topic from now on.

        Called before the delivery: a subscriber it closes has the router forget
        the topic again.
        """
        if ns.schema is None and not (ns.durable and self.log is not None):
            stats = self.topic_stats.counters(topic) if self._count_topics else None
            remember(self._live_routes, topic, (rings, stats), self._router.cache_limit)

    def _forget_live(self, topic: str) -> None:
        """Topic stats dropped ``topic``'s counters: its route must not count into them."""
        self._live_routes.pop(topic, None)

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
            InvalidDataError: the data does not match its namespace's schema.
            DeliveryError: with ``ack``, a handler failed every attempt.
            AckTimeoutError: with ``ack``, a handler did not answer in time.
        """
        log = self.log
        if not ack and tags is None and idempotency_key is None:
            if topic in self._durable_topics:
                if not self._subs.blockers and self._state is _OPEN:
                    # A durable, untyped topic committed before: its name and
                    # namespace were checked then (below, once per topic).
                    assert log is not None
                    return await log._append_then(new_event(topic, data), self._on_commit)
            elif (known := self.publish_known(topic, data)) is not None:
                return known
        self._check_open()
        rings = self._router.route(topic)
        ns = self._namespaces.of(topic)
        event = self._make_event(topic, data, tags, idempotency_key, ns)
        waited = bool(self._subs.blockers)
        if waited:
            rings = await self._wait_for_blockers(topic, rings)
        if not ns.history_size or log is None:
            self._remember_live(topic, rings, ns)
            if not ack:
                self._deliver(event, rings)
                return event
            return await self._publish_acked(event, rings, timeout, retries)
        if ns.schema is None:
            remember(self._durable_topics, topic, None, self._router.cache_limit)
        if not self._started:
            await self.start()
        # Commit before any fan-out, so subscribers see events in offset order.
        if not ack and idempotency_key is None and not waited:
            # The log fans it out as committed (see _deliver_committed, which
            # times the commit from the event's publication: not after a wait).
            return await log._append_then(event, self._on_commit)
        started = time.perf_counter()
        stored = (await log._appending((event,)))[0]
        self.append_latency.observe(time.perf_counter() - started)
        if stored.id != event.id:
            return stored  # an idempotent repeat: stored once, delivered once
        if not ack:
            self._deliver(stored)  # the sequencer routes it, in offset order
            return stored
        return await self._publish_acked(stored, self._router.route(topic), timeout, retries)

    def _deliver_committed(self, events: list[Event]) -> None:
        """Fan out durable publishes as committed, in offset order, and record
        their append latency (the log calls it: see ``EventLog._append_then``).

        _deliver's steps for each event; without topic counts or a backplane
        (the common case), those left in one pass: the count of publications
        and the sequencer (which fans a run of one topic out at once).
        """
        self.append_latency.observe_since(time.time(), [event.time for event in events])
        if self._count_topics or self._link is not None:
            for event in events:
                self._deliver(event)
            return
        self._published += len(events)
        self._sequencer.deliver_many(events)

    async def _publish_acked(
        self,
        event: Event,
        rings: tuple[_Ring, ...],
        timeout: float | None,
        retries: int | None,
    ) -> Event:
        """Deliver ``event`` and return once its handler subscribers processed it."""
        timeout = self.ack_timeout if timeout is None else timeout
        retries = self.ack_retries if retries is None else retries
        if timeout <= 0 or retries < 0:
            raise ConfigurationError("ack needs a positive timeout and retries >= 0")
        handlers = self._handlers.matching(rings)
        if not handlers:
            self._deliver(event, rings)
            return event
        return await self._handlers.publish_acked(
            event,
            handlers,
            lambda: self._deliver(event, rings),
            timeout=timeout,
            retries=retries,
            closed=lambda: self.closed,
        )

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
            InvalidDataError: an item's data does not match its namespace's
                schema; nothing was published.
            BusClosedError: the bus is closed.
            LogError: the log failed; nothing was published.
        """
        self._check_open()
        pairs = list(items)
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError("publish_many takes (topic, data) pairs")
            validate_topic(pair[0])
            self.namespace(pair[0]).check(pair[0], pair[1])
        if self._subs.blockers and any(
            ring.blockers for topic, _ in pairs for ring in self._router.route(topic)
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
            committed = await self._commit([events[i] for i in durable])
            for i, (stored, new) in zip(durable, committed, strict=True):
                events[i], fresh[i] = stored, new
        for event, new in zip(events, fresh, strict=True):
            if new:
                self._deliver(event)
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

    async def _commit(self, events: list[Event]) -> list[tuple[Event, bool]]:
        """Commit durable events to the log; return each stored event and whether it is new.

        An event is not new when its idempotency key was stored already: the
        originally stored event is returned, and it must not be fanned out again.
        """
        log = self.log
        assert log is not None
        if not self._started:
            await self.start()
        started = time.perf_counter()
        committed = await log._appending(events)
        self.append_latency.observe(time.perf_counter() - started)
        return [
            (stored, stored.id == event.id) for event, stored in zip(events, committed, strict=True)
        ]

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
            rings = self._router.route(topic)

    # -- delivery -------------------------------------------------------------------

    def _deliver(self, event: Event, rings: tuple[_Ring, ...] | None = None) -> None:
        """Deliver a local publication on this node, in order, then share it with other nodes."""
        self._published += 1
        if self._count_topics:
            self.topic_stats.count(event)
        if event.offset is None:
            self._router.fan_out(event, rings)
        else:
            self._sequencer.deliver(event)
        if self._link is not None:
            self._link.forward(event)

    def _deliver_remote(self, event: Event) -> None:
        """Deliver a publication from another node."""
        if self._state is not _OPEN:
            return
        if self._count_topics:
            self.topic_stats.count(event)
        if event.offset is not None and event.epoch is not None:
            self._sequencer.deliver(event)
        else:
            self._router.fan_out(event)

    def _backplane_up(self) -> None:
        """After a reconnect: catch durable topics up, tell live ones continuity is lost."""
        if self._state is not _OPEN:
            return
        self._sequencer.resync()
        for topic_filter in sorted(self._router.filters()):
            if is_pattern(topic_filter) or not self.namespace(topic_filter).durable:
                # Live-only: what was published during the outage is lost.
                self._signal_gap(topic_filter, False)

    def send_control(self, kind: str, topic: str, payload: bytes) -> None:
        """Send a control message (join, leave…) to the other nodes (best effort)."""
        if self._link is not None:
            self._link.send_control(kind, topic, payload)

    def _signal_gap(self, topic: str, durable: bool) -> None:
        for listener in list(self.gap_listeners):
            try:
                listener(topic, durable)
            except Exception:
                logger.exception("a gap listener failed")

    # -- failures and dead letters -------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return self._tasks.spawn(coro, name)

    def _task_failed(self, task: asyncio.Task[Any], exc: BaseException) -> None:
        error = (
            exc
            if isinstance(exc, EventcastError)
            else EventcastError(f"background task {task.get_name()} failed: {exc!r}")
        )
        error.__cause__ = exc if error is not exc else exc.__cause__
        self._report(error, None)

    def _report(self, error: EventcastError, letter: DeadLetter | None) -> None:
        handler = self.error_handler
        if handler is None:
            logger.error("%s", error)
            return
        try:
            result = handler(error, letter)
            if inspect.isawaitable(result):
                self._tasks.watch(asyncio.ensure_future(result))
        except Exception:
            logger.exception("the bus's error_handler raised")

    def _redeliver(self, letter: DeadLetter) -> bool:
        sub = self._subs.by_id.get(letter.subscriber)
        if sub is None or sub.closed:
            return False
        sub._inject((letter.event,))
        return True

    # -- introspection -------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        """Return bus-wide counters: published, dropped, subscribers, topics, dead letters."""
        return {
            "published": self._published,
            "dropped": self._subs.dropped,
            "subscribers": len(self._subs.by_id),
            "rings": len(self._router.rings),
            "dead_letters": len(self.dead_letters),
        }

    def __repr__(self) -> str:
        return f"<Bus {self._state.value} subscribers={len(self._subs.by_id)}>"
