"""Counters cheap enough for every publish: append latency and traffic per topic."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from math import fsum
from typing import Any, Final

from ._caches import topic_limit
from .events import Event

__all__ = ["LatencyHistogram", "TopicStats"]


#: Fewer durations than this are recorded one by one (the search per bound costs more).
_IN_ONE_PASS: Final = 16


class LatencyHistogram:
    """A fixed-bucket latency histogram (seconds), cheap enough for every publish."""

    BOUNDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """Record one duration."""
        self.observe_many((seconds,))

    def observe_many(self, durations: Iterable[float]) -> None:
        """Record several durations in one pass."""
        counts = self.counts
        bounds = self.BOUNDS
        total = 0.0
        n = 0
        for seconds in durations:
            counts[bisect_left(bounds, seconds)] += 1
            total += seconds
            n += 1
        self.total += total
        self.count += n

    def observe_since(self, now: float, starts: list[float]) -> None:
        """Record ``now - start`` for each of ``starts`` (times on the same clock as ``now``).

        When ``starts`` are in order (a group commit's publication times) the
        buckets are counted with one search per bound, not one per duration:
        a duration is at most a bound exactly when its start is at or after
        ``now - bound``. Otherwise (a clock that stepped back) one by one.
        """
        n = len(starts)
        if n < _IN_ONE_PASS or starts != sorted(starts):
            self.observe_many([now - start for start in starts])
            return
        counts = self.counts
        below = 0  # durations at most the bound before: in the buckets so far
        for k, bound in enumerate(self.BOUNDS):
            at_most = n - bisect_left(starts, now - bound)
            counts[k] += at_most - below
            below = at_most
        counts[-1] += n - below
        # (as precise as the durations themselves: the times are ~1e9 s, to ~1e-7 s)
        self.total += n * now - fsum(starts)
        self.count += n

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, cumulative count)`` pairs, ending with ``+Inf``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.BOUNDS, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class TopicStats(dict[str, list[Any]]):
    """Traffic per topic since start: ``[events, last offset, last time]`` (bounded).

    At most :func:`~eventcast._caches.topic_limit` of ``in_use()`` topics are
    counted; past it, the least recently created is forgotten.

    Args:
        on_forget: called with a topic whose counters were dropped to make room
            (a holder of its counters, see :meth:`counters`, lets go of them).
        in_use: how many topics (or filter sets) have subscribers now.
    """

    def __init__(
        self,
        on_forget: Callable[[str], object] | None = None,
        in_use: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__()
        self._on_forget = on_forget
        self._in_use = in_use

    def counters(self, topic: str) -> list[Any]:
        """The counters of ``topic``, made if missing (the oldest topic's dropped when full).

        A caller may keep them and count into them itself, as :meth:`count`
        does, until ``on_forget`` names the topic.
        """
        stats = self.get(topic)
        if stats is None:
            if len(self) >= topic_limit(self._in_use()):
                oldest = next(iter(self))
                del self[oldest]
                if self._on_forget is not None:
                    self._on_forget(oldest)
            stats = self[topic] = [0, None, 0.0]
        return stats

    def count(self, event: Event) -> None:
        """Count one event delivered on this node."""
        stats = self.get(event.topic)
        if stats is None:
            stats = self.counters(event.topic)
        stats[0] += 1
        if event.offset is not None:
            stats[1] = event.offset
        stats[2] = event.time
