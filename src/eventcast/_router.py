"""Routing: which rings an event goes to, and the one fan-out loop.

Subscribers with the same filter set share one ring (see
:mod:`eventcast.subscription`). The router keeps the rings by filter set,
finds those matching a topic (exact names by dict, patterns by trie, each
topic's answer cached until a subscribe or unsubscribe changes it), and
appends an event to each of them. Every local delivery in the bus, whether
from a publish, the sequencer or the backplane, goes through
:meth:`Router.fan_out` (or :meth:`Router.fan_out_run`, several events of one
topic at once), but one: ``Bus.publish_nowait``'s fast path, for a
live topic it has checked once, appends to the rings it cached (a cache in
:attr:`Router.derived`, forgotten with the routes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from ._caches import remember, topic_limit
from .events import Event
from .subscription import _Ring
from .topics import TopicMatcher, is_pattern, validate_topic

__all__ = ["Router"]


class Router:
    """The rings of a bus, by filter set, and the fan-out of events into them.

    Args:
        on_change: called whenever the set of filters with subscribers changes
            (the backplane link then updates what it receives).
    """

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._matcher = TopicMatcher()
        #: The rings, keyed by their sorted filter set.
        self.rings: dict[tuple[str, ...], _Ring] = {}
        self._routes: dict[str, tuple[_Ring, ...]] = {}
        #: Caches built from :meth:`route`'s answers (by topic, bounded by their
        #: owner), forgotten with the route cache where the table changes.
        self.derived: list[dict[str, Any]] = []
        self.on_change = on_change

    @property
    def cache_limit(self) -> int:
        """How many topics the route cache (and each derived one) holds at most:
        :func:`~eventcast._caches.topic_limit` of the rings registered."""
        return topic_limit(len(self.rings))

    def ring(self, filters: tuple[str, ...]) -> _Ring:
        """Return the ring for a sorted filter set: the registered one, or a new one.

        A new ring receives nothing until :meth:`register` is called.
        """
        return self.rings.get(filters) or _Ring(filters)

    def register(self, ring: _Ring) -> None:
        """Start routing events to a new ring (idempotent)."""
        if self.rings.get(ring.filters) is ring:
            return
        self.rings[ring.filters] = ring
        for f in ring.filters:
            self._matcher.add(f, ring)
        self._changed(ring.filters)

    def release(self, ring: _Ring) -> bool:
        """Stop routing to ``ring`` if it has no members left; return whether it was removed."""
        if ring.members or self.rings.get(ring.filters) is not ring:
            return False
        del self.rings[ring.filters]
        for f in ring.filters:
            self._matcher.remove(f, ring)
        self._changed(ring.filters)
        return True

    def _changed(self, filters: tuple[str, ...]) -> None:
        """Forget the routes a ring of ``filters`` joined or left: the topics it names
        when they are all names (a channel subscribed to leaves every other topic's
        route cached), every route when one is a pattern."""
        caches = [self._routes, *self.derived]
        if any(is_pattern(f) for f in filters):
            for cache in caches:
                cache.clear()
        else:
            for cache in caches:
                for topic in filters:
                    cache.pop(topic, None)
        if self.on_change is not None:
            self.on_change()

    def route(self, topic: str) -> tuple[_Ring, ...]:
        """Return the rings an event on ``topic`` goes to.

        Raises:
            InvalidTopicError: the topic name breaks the grammar.
        """
        rings = self._routes.get(topic)
        if rings is None:
            validate_topic(topic)
            matched = cast("tuple[_Ring, ...]", tuple(self._matcher.match(topic)))
            rings = remember(self._routes, topic, matched, self.cache_limit)
        return rings

    def fan_out(self, event: Event, rings: tuple[_Ring, ...] | None = None) -> None:
        """Append ``event`` once to each matching ring (or to ``rings``); never waits."""
        for ring in self.route(event.topic) if rings is None else rings:
            ring.append(event)

    def fan_out_run(self, topic: str, events: list[Event]) -> None:
        """Append ``events``, all on ``topic``, to each ring it matches, as
        :meth:`fan_out` does one by one (see :meth:`_Ring.extend`)."""
        for ring in self.route(topic):
            ring.extend(events)

    def filters(self) -> set[str]:
        """The topic filters that have at least one subscriber."""
        return {f for key in self.rings for f in key}

    def __len__(self) -> int:
        """The number of filters registered in the matcher."""
        return len(self._matcher)
