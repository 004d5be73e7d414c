"""Handler subscribers, acknowledged publishes, retries with backoff.

A handler is a callback subscriber (:meth:`Bus.on`): one supervised task
reads its bounded subscription and calls the callback one event at a time. A
callback that raises is retried with exponential backoff and jitter; past the
last attempt the event becomes a dead letter and the bus's error handler is
called.

``publish(..., ack=True)`` waits until every matching handler has processed
the event. The acknowledged publish owns the retries then: each handler makes
one attempt per delivery, and the publish redelivers to the handlers that
failed or timed out, with backoff, before giving up.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, TypeAlias

from ._tasks import Supervisor
from .deadletters import DeadLetter, DeadLetters
from .events import Event
from .exceptions import (
    AckTimeoutError,
    BusClosedError,
    ConfigurationError,
    DeliveryError,
    EventcastError,
    SubscriptionClosedError,
)

if TYPE_CHECKING:
    from .subscription import Subscription, _Ring

__all__ = ["ErrorHandler", "Handler", "HandlerFunc", "Handlers", "backoff_delay"]

logger = logging.getLogger("eventcast.bus")

#: A handler subscriber: called with each event; may be sync or async.
HandlerFunc: TypeAlias = Callable[[Event], Awaitable[object] | object]
#: Called when delivery finally fails (a handler gave up, or an acked publish failed).
ErrorHandler: TypeAlias = Callable[[EventcastError, DeadLetter | None], object]


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
        owner: Handlers,
        subscription: Subscription,
        func: HandlerFunc,
        *,
        retries: int,
        backoff: float,
        max_backoff: float,
    ) -> None:
        if retries < 0:
            raise ConfigurationError("retries must be >= 0")
        self._owner = owner
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

    def start(self) -> None:
        """Start reading events (in the running loop). Idempotent."""
        if self._task is None and not self.subscription.closed:
            self._task = self._owner.supervisor.spawn(
                self._run(), f"eventcast-handler-{self.id}", on_failure=self._crashed
            )

    def _crashed(self, exc: BaseException) -> None:
        self.subscription._close(
            SubscriptionClosedError(f"handler task {self.id!r} crashed: {exc!r}")
        )

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
        tracker = self._owner.acks.get(event.id)
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
        owner = self._owner
        letter = owner.dead_letters.add(
            event, self.id, "handler_error", attempts=self.retries + 1, error=error
        )
        owner.report(DeliveryError(f"handler {self.id!r} failed: {error}", (self.id,)), letter)

    def cancel(self) -> None:
        """Stop the handler's task (its subscription is closed or closing)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def close(self) -> None:
        """Unregister the handler. Idempotent."""
        self.subscription.close()
        self.cancel()

    async def aclose(self) -> None:
        """Unregister the handler and wait for its task to finish."""
        self.close()
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<Handler id={self.id!r} topics={list(self.subscription.topics)}>"


class Handlers:
    """The handler subscribers of a bus and the acknowledged publishes in flight.

    Args:
        dead_letters: where events that finally failed are recorded.
        supervisor: runs the handler tasks.
        report: called with the error and dead letter when delivery finally fails.
        backoff: base delay of retry backoff, in seconds.
        max_backoff: cap of retry backoff, in seconds.
    """

    def __init__(
        self,
        dead_letters: DeadLetters,
        supervisor: Supervisor,
        report: Callable[[EventcastError, DeadLetter | None], None],
        *,
        backoff: float,
        max_backoff: float,
    ) -> None:
        self.dead_letters = dead_letters
        self.supervisor = supervisor
        self.report = report
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.by_id: dict[str, Handler] = {}
        self._unstarted: list[Handler] = []
        #: Acknowledged publishes in flight, by event id.
        self.acks: dict[str, _AckTracker] = {}

    def add(self, handler: Handler) -> None:
        """Register a handler; start it now if a loop runs, else at :meth:`start`."""
        self.by_id[handler.id] = handler
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._unstarted.append(handler)
        else:
            handler.start()

    def start(self) -> None:
        """Start the handlers registered before a loop was running."""
        unstarted, self._unstarted = self._unstarted, []
        for handler in unstarted:
            handler.start()

    def forget(self, id: str) -> None:
        """A handler's subscription closed: stop its task."""
        handler = self.by_id.pop(id, None)
        if handler is not None:
            handler.cancel()

    def close(self) -> None:
        """Release every publisher waiting for an acknowledgement (the bus is closing)."""
        for tracker in self.acks.values():
            if not tracker.future.done():
                tracker.future.set_result(None)

    def matching(self, rings: tuple[_Ring, ...]) -> list[Handler]:
        """The handlers among the members of these rings."""
        by_id = self.by_id
        return [by_id[sub.id] for ring in rings for sub in ring.members if sub.id in by_id]

    async def publish_acked(
        self,
        event: Event,
        handlers: list[Handler],
        deliver: Callable[[], None],
        *,
        timeout: float,
        retries: int,
        closed: Callable[[], bool],
    ) -> Event:
        """Deliver ``event`` (with ``deliver``) and wait until ``handlers`` processed it.

        Raises:
            BusClosedError: the bus closed before every acknowledgement came.
            DeliveryError: a handler failed every attempt.
            AckTimeoutError: a handler did not answer in time.
        """
        tracker = _AckTracker(handlers, timeout)
        self.acks[event.id] = tracker
        failed: list[Handler] = []
        timed_out = False
        try:
            deliver()
            for attempt in range(retries + 1):
                try:
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(tracker.future)
                except TimeoutError:
                    pass
                if closed():
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
            del self.acks[event.id]
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
            self.report(error, letter)
        raise error
