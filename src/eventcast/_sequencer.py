"""The stream sequencer: each durable topic delivered on this node in offset order, once.

Durable events reach a node from its own publishes and from the backplane, in
any order and sometimes twice (a backplane echo, a resent batch after a
reconnect). The sequencer keeps, per durable topic, the last offset it
delivered:

* the next offset is delivered at once;
* an offset at or below the last is a duplicate and is dropped;
* an offset past a gap is held while the gap is read from the log, and the
  held events follow the gap in order.

A topic is tracked from the head a reader's replay read (:meth:`Sequencer.seed`),
or else from the first event that arrives. A head read from the log can be
ahead of this node's live stream: an event committed there may not have reached
the node yet (its publisher has not fanned it out, or the backplane has not
brought it). Such an event, at or below the seeded head, is still delivered
when it comes, once, until the stream moves past the head (readers the replay
gave it to drop it by their handoff; the topic's other readers need it).

When continuity cannot be proven (the epoch changed, the gap is beyond
retention, the log failed) the sequencer jumps ahead and reports a gap, so the
readers of that topic are told to recover.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .events import Event
from .exceptions import LogError

if TYPE_CHECKING:
    from ._router import Router
    from .log.base import EventLog

__all__ = ["Sequencer"]

logger = logging.getLogger("eventcast.bus")

#: Most events held per topic while its gap is read from the log.
PENDING_LIMIT: Final = 10_000
#: Most topics whose continuity is tracked (the least recent is forgotten).
STREAMS_LIMIT: Final = 100_000
#: Most events read from the log per catch-up page.
_PAGE: Final = 1000

Spawn = Callable[[Coroutine[Any, Any, Any], str], object]


@dataclass(slots=True)
class _Stream:
    """A durable topic's continuity on this node: the last offset delivered."""

    epoch: str
    last: int
    pending: list[Event] | None = None
    #: After a seed, until the stream delivers past the seeded head: the
    #: offsets at or below it delivered since (each is delivered once).
    owed: set[int] | None = None


class Sequencer:
    """Delivers durable events in offset order, exactly once per node.

    Args:
        router: where in-order events are fanned out.
        log: the log gaps are read from (``None``: gaps cannot be filled).
        spawn: runs a supervised background task (a catch-up).
        on_gap: called with ``(topic, durable)`` when continuity is lost.
    """

    def __init__(
        self,
        router: Router,
        log: EventLog | None,
        spawn: Spawn,
        on_gap: Callable[[str, bool], None],
    ) -> None:
        self._router = router
        self._log = log
        self._spawn = spawn
        self._on_gap = on_gap
        self._streams: dict[str, _Stream] = {}
        #: Gaps seen, and events read from the log to fill them.
        self.gaps = 0
        self.caught_up = 0

    def deliver(self, event: Event) -> None:
        """Deliver one durable event (with ``offset`` and ``epoch``) in order, or hold it."""
        topic = event.topic
        offset = event.offset
        epoch = event.epoch
        assert offset is not None
        assert epoch is not None
        stream = self._streams.get(topic)
        if stream is None:
            if len(self._streams) >= STREAMS_LIMIT:
                self._streams.pop(next(iter(self._streams)))
            stream = self._streams[topic] = _Stream(epoch, offset - 1)
        elif stream.epoch != epoch:
            # The stream was wiped or truncated: continuity cannot be proven.
            stream.epoch, stream.last, stream.pending, stream.owed = epoch, offset - 1, None, None
            self._on_gap(topic, True)
        if stream.pending is not None:
            if len(stream.pending) < PENDING_LIMIT:
                stream.pending.append(event)
            return
        if offset <= stream.last + 1:
            # The next one, one owed, or else a duplicate (a backplane echo of a
            # local publish, say): one rule with the catch-up's.
            self._give(stream, event)
            return
        stream.pending = [event]
        self.gaps += 1
        self._spawn(self._catch_up(topic, stream), f"eventcast-catch-up-{topic}")

    def deliver_many(self, events: list[Event]) -> None:
        """Deliver durable events in order, as :meth:`deliver` each.

        A run of events of one topic and epoch at the offsets that follow its
        stream's last (a group commit's, say) is fanned out at once
        (:meth:`Router.fan_out_run`); any other event goes through :meth:`deliver`.
        """
        streams = self._streams
        n = len(events)
        i = 0
        while i < n:
            event = events[i]
            stream = streams.get(event.topic)
            if (
                stream is None
                or stream.pending is not None
                or event.epoch != stream.epoch
                or event.offset != stream.last + 1
            ):
                self.deliver(event)
                i += 1
                continue
            topic = event.topic
            epoch = event.epoch
            last = stream.last + 1
            j = i + 1
            while j < n:
                after = events[j]
                if after.offset != last + 1 or after.topic != topic or after.epoch != epoch:
                    break
                last += 1
                j += 1
            self._router.fan_out_run(topic, events if j - i == n else events[i:j])
            stream.last = last
            stream.owed = None
            i = j

    def seed(self, topic: str, offset: int, epoch: str) -> None:
        """A local reader is positioned at ``offset``: the next event it needs is after it.

        Called with the head a replay read (the one replay path). A topic not
        tracked yet starts there, not at the first event that happens to
        arrive: concurrent local publishes return from the log in any order,
        and the first to arrive (offset 2, say) would otherwise make the one
        before it look delivered already.

        Events at or below ``offset`` may not have reached the node yet (the
        log is ahead of the live stream): the stream owes them until it
        delivers past ``offset`` (see the module's docstring).
        """
        if topic in self._streams:
            return
        if len(self._streams) >= STREAMS_LIMIT:
            self._streams.pop(next(iter(self._streams)))
        self._streams[topic] = _Stream(epoch, offset, owed=set())

    def forget(self, topic: str) -> None:
        """Stop tracking a topic (its last subscriber left)."""
        self._streams.pop(topic, None)

    def resync(self) -> None:
        """Catch every tracked topic up to the log's head (after a backplane outage)."""
        if self._log is None:
            return
        for topic, stream in list(self._streams.items()):
            if stream.pending is None:
                stream.pending = []
                self._spawn(
                    self._catch_up(topic, stream, to_head=True), f"eventcast-catch-up-{topic}"
                )

    def _give(self, stream: _Stream, event: Event, *, jump: bool = False) -> None:
        """Deliver ``event`` if it is the stream's next one (with ``jump``, any
        later one: continuity is lost already), or one it owes; drop it if it was
        delivered already."""
        if event.epoch != stream.epoch:
            return
        offset = event.offset or 0
        if offset == stream.last + 1 or (jump and offset > stream.last):
            self._router.fan_out(event)
            stream.last = offset
            stream.owed = None
        elif stream.owed is not None:
            self._give_owed(stream, event)

    def _give_owed(self, stream: _Stream, event: Event) -> None:
        """Deliver an event at or below a seeded head that reaches the node only
        now (committed before the head was read), once."""
        owed = stream.owed
        assert owed is not None
        offset = _offset(event)
        if offset > stream.last or offset in owed:
            return
        if len(owed) >= PENDING_LIMIT:
            # Too many to tell apart: the readers are told to recover instead.
            stream.owed = None
            self._on_gap(event.topic, True)
            return
        owed.add(offset)
        self._router.fan_out(event)

    async def _catch_up(self, topic: str, stream: _Stream, *, to_head: bool = False) -> None:
        """Fill a durable topic's gap from the log, then release the held events."""
        log = self._log
        try:
            while True:
                pending = sorted(stream.pending or (), key=_offset)
                while pending and _offset(pending[0]) <= stream.last + 1:
                    self._give(stream, pending.pop(0))
                stream.pending = pending
                if to_head and log is not None:
                    head = await log.position(topic)
                    to_head = False
                    if head.epoch != stream.epoch:
                        self._on_gap(topic, True)
                        stream.epoch, stream.last, stream.owed = head.epoch, head.offset, None
                        continue
                    target = head.offset
                elif pending:
                    target = _offset(pending[0]) - 1
                else:
                    break
                if target <= stream.last:
                    if not stream.pending:
                        break
                    continue
                events = (
                    await log.read(topic, after=stream.last, limit=min(target - stream.last, _PAGE))
                    if log is not None
                    else []
                )
                if not events or events[0].offset != stream.last + 1:
                    # Beyond retention (or no log): continuity cannot be proven.
                    self._on_gap(topic, True)
                    stream.last, stream.owed = target, None
                    continue
                for event in events:
                    self._give(stream, event)
                self.caught_up += len(events)
        except LogError as exc:
            logger.warning("could not read the gap of %r from the log: %s", topic, exc)
            self._on_gap(topic, True)
            for event in sorted(stream.pending or (), key=_offset):
                self._give(stream, event, jump=True)
        finally:
            stream.pending = None


def _offset(event: Event) -> int:
    return event.offset or 0
