"""The one rule of the lookup caches: bounded by emptying when full.

Every cache of answers that are cheap to derive again (a topic's routes, a
channel's check, a namespace, a cursor, a rate bucket) holds at most its limit
of entries and is emptied when full, instead of tracking recency: a hit costs
one dict lookup and nothing else, and a refill costs what the first lookups
cost.

A cache of per-topic answers is sized from the topics in use (:func:`topic_limit`):
one with a fixed bound smaller than the topics a hub publishes to would be
emptied over and over (a hub with 10,000 clients, each in its own channel and
a room, publishes to 11,000), and every lookup would pay the first one's cost.
"""

from __future__ import annotations

from typing import Final, TypeVar

__all__ = ["TOPIC_SPARE", "remember", "topic_limit"]

K = TypeVar("K")
V = TypeVar("V")

#: The entries a per-topic cache holds beyond twice the topics in use: the room
#: for topics published to without a subscriber.
TOPIC_SPARE: Final = 10_000


def topic_limit(in_use: int) -> int:
    """The bound of a cache keyed by topic, when ``in_use`` topics (or filter sets)
    have subscribers: :data:`TOPIC_SPARE` more than twice as many."""
    return TOPIC_SPARE + 2 * in_use


def remember(cache: dict[K, V], key: K, value: V, limit: int) -> V:
    """Keep ``value`` for ``key`` in ``cache``, emptied first when it holds ``limit`` entries."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
