"""The bus's append-latency histogram: a group's durations recorded in one pass."""

from __future__ import annotations

import random

import pytest

from eventcast._stats import LatencyHistogram


def _starts(rng: random.Random, now: float, n: int) -> list[float]:
    """Publication times ``n`` durations before ``now``, none within 1 µs of a bucket
    bound (where the two ways of rounding ``now - start`` may fall either side)."""
    starts: list[float] = []
    while len(starts) < n:
        duration = rng.choice([rng.uniform(0, 0.003), rng.uniform(0, 3), rng.expovariate(50)])
        if all(abs(duration - bound) > 1e-6 for bound in LatencyHistogram.BOUNDS):
            starts.append(now - duration)
    return starts


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1024])
def test_a_group_in_order_is_counted_as_one_by_one(n: int) -> None:
    rng = random.Random(n)
    for _ in range(50):
        now = 1_796_000_000.0 + rng.uniform(0, 1e6)
        starts = sorted(_starts(rng, now, n))
        one_by_one, in_one_pass = LatencyHistogram(), LatencyHistogram()
        one_by_one.observe_many([now - start for start in starts])
        in_one_pass.observe_since(now, starts)
        assert in_one_pass.counts == one_by_one.counts
        assert in_one_pass.count == one_by_one.count == n
        assert in_one_pass.total == pytest.approx(one_by_one.total, abs=1e-3)


def test_times_out_of_order_are_counted_one_by_one() -> None:
    """A clock that stepped back leaves the times out of order: no search then."""
    rng = random.Random(7)
    now = 1_796_000_000.0
    starts = _starts(rng, now, 100)
    assert starts != sorted(starts)
    one_by_one, since = LatencyHistogram(), LatencyHistogram()
    one_by_one.observe_many([now - start for start in starts])
    since.observe_since(now, starts)
    assert (since.counts, since.count, since.total) == (
        one_by_one.counts,
        one_by_one.count,
        one_by_one.total,
    )
    assert sum(since.counts) == 100
