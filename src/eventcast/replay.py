"""Replay and handoff: the one way a reader of a durable topic catches up and goes live.

Every reader of a durable topic goes through this module: a bus subscription
resumed with ``since=``, a WebSocket client subscribing with ``recover``, an
SSE stream resumed with ``Last-Event-ID``. :func:`replay` returns what the
reader missed (or says the gap cannot be replayed), and :class:`Handoff`
joins the replay to the live stream under one rule:

    After a reader has been given offset N, by replay or live, it is never
    given N or anything below it again.

Why a rule is needed, and why it must outlive the subscribe call: a log
commits offset N, so ``position()`` and ``read()`` already see it, before the
publisher gets N back and fans it out. A reader that subscribes inside that
window replays N from the log, and N then arrives again on the live stream,
possibly well after the subscribe reply has gone out. The handoff keeps the
reader's floor until the live stream has passed it; from then on the bus's
sequencer delivers each durable topic on a node in offset order, exactly
once, so nothing at or below the floor can come again.

Recovery is never partial: either every missed event is replayed
(``recovered`` is true) or none is, and the reader continues live from the
head.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .events import EARLIEST, Event, Position
from .exceptions import PositionError

if TYPE_CHECKING:
    from .log.base import EventLog

__all__ = ["Handoff", "Replay", "replay"]


@dataclass(frozen=True, slots=True)
class Replay:
    """What a reader gets when it joins a durable topic.

    Attributes:
        events: the missed events to give the reader first, in offset order
            (empty when nothing was missed or the gap cannot be replayed).
        position: the topic's head when the replay was read: where a reader
            that asked for no resume starts, and what a subscribe reply reports.
        recovered: ``True`` if every missed event is in :attr:`events`,
            ``False`` if the gap could not be replayed (then :attr:`events` is
            empty), ``None`` if no resume was asked.
        floor: the highest offset the reader has now been given or is
            positioned at; the :class:`Handoff` drops live events at or below it.
    """

    events: list[Event]
    position: Position
    recovered: bool | None
    floor: int

    def handoff(self) -> Handoff:
        """The handoff rule for a reader that has just been given this replay."""
        return Handoff(self.floor, self.position.epoch)


async def replay(
    log: EventLog,
    topic: str,
    since: Position | str | None,
    *,
    cap: int,
    earliest_limit: int,
) -> Replay:
    """Read what a reader of ``topic`` missed after ``since``.

    Args:
        log: the durable log holding the topic.
        topic: a concrete durable topic name.
        since: the reader's last position; :data:`~eventcast.EARLIEST` for
            everything the topic still keeps; ``None`` to read only the head.
        cap: the most missed events replayed; a larger gap is not recovered.
        earliest_limit: the most events read for ``EARLIEST``.

    Returns:
        The replay. A gap beyond ``cap``, beyond retention, or across an epoch
        change is not recovered, and nothing of it is replayed.

    Raises:
        PositionError: ``since`` is in the topic's current epoch but beyond
            its head (a position this stream never gave out).
        LogError: the log failed.
    """
    head = await log.position(topic)
    if since is None:
        return Replay([], head, None, head.offset)
    if since == EARLIEST:
        events = await log.read(topic, after=0, limit=earliest_limit)
        floor = (events[-1].offset or 0) if events else head.offset
        return Replay(events, head, True, floor)
    if not isinstance(since, Position):
        raise PositionError(f"not a position: {since!r}")
    if since.epoch == head.epoch and since.offset > head.offset:
        raise PositionError(
            f"offset {since.offset} is beyond the head ({head.offset}) of {topic!r}"
        )
    gap = head.offset - since.offset
    if since.epoch != head.epoch or gap > cap:
        return Replay([], head, False, head.offset)
    events = await log.read(topic, after=since.offset, limit=gap) if gap else []
    if len(events) != gap or (events and events[0].offset != since.offset + 1):
        return Replay([], head, False, head.offset)  # beyond retention: never partial
    return Replay(events, head, True, head.offset)


class Handoff:
    """The handoff rule of one reader: nothing at or below its floor is given again.

    The reader keeps its handoff until a live event past the floor has been
    given (:attr:`passed`); after that the sequencer's in-order delivery keeps
    the rule, and the reader drops the handoff so its hot path checks nothing.
    """

    __slots__ = ("epoch", "floor", "passed")

    def __init__(self, floor: int, epoch: str) -> None:
        #: The highest offset given (or positioned at) so far.
        self.floor = floor
        #: The epoch the floor belongs to; events of another epoch are a new stream.
        self.epoch = epoch
        #: Whether a live event past the floor was given: the rule holds by itself now.
        self.passed = False

    def admits(self, event: Event) -> bool:
        """Whether ``event`` may be given to the reader (and, if so, note it was)."""
        offset = event.offset
        if offset is None or event.epoch != self.epoch:
            return True
        if offset <= self.floor:
            return False
        self.passed = True
        return True

    def filter(self, events: Iterable[Event]) -> list[Event]:
        """The events of a batch that may be given, in order."""
        return [event for event in events if self.admits(event)]

    def __repr__(self) -> str:
        return f"<Handoff floor={self.floor} epoch={self.epoch!r} passed={self.passed}>"
