"""Protection against abuse: origin allowlist and token-bucket rate limits (no I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

__all__ = ["TokenBucket", "origin_allowed"]


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, holding at most ``burst``.

    Args:
        rate: tokens added per second.
        burst: the bucket's size (default: one second's worth).
        clock: a monotonic clock, injectable for tests.
    """

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are enough; return whether it did."""
        now = self._clock()
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens < n:
            self._tokens = tokens
            return False
        self._tokens = tokens - n
        return True


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a browser ``Origin`` may connect.

    No ``Origin`` header (a non-browser client) is allowed. With an empty
    allowlist only the same origin is (its host equals the ``Host`` header);
    ``"*"`` allows any origin; otherwise the origin must be listed exactly
    (scheme, host and port, e.g. ``https://example.com``).
    """
    if origin is None:
        return True
    allowed = list(allowed)
    if "*" in allowed:
        return True
    if origin in allowed:
        return True
    if not allowed and host:
        return urlsplit(origin).netloc.lower() == host.lower()
    return False
