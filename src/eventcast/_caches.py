"""The one rule of the lookup caches: bounded by emptying when full.

Every cache of answers that are cheap to derive again (a topic's routes, a
channel's check, a namespace, a cursor, a rate bucket) holds at most its limit
of entries and is emptied when full, instead of tracking recency: a hit costs
one dict lookup and nothing else, and a refill costs what the first lookups
cost.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(cache: dict[K, V], key: K, value: V, limit: int) -> V:
    """Keep ``value`` for ``key`` in ``cache``, emptied first when it holds ``limit`` entries."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value
