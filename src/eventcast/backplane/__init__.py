"""Backplanes: how hub nodes share publications.

Choose one by URL with :func:`open_backplane`, or pass an instance:

* ``memory://``: one node (or several buses sharing a :class:`MemoryBroker`);
* ``redis://host:6379/0``: Redis pub/sub (needs ``eventcast[redis]``);
* ``redis+cluster://host:7000``: Redis Cluster with sharded pub/sub;
* ``nats://host:4222``: NATS core subjects (needs ``eventcast[nats]``).

Add ``?prefix=name`` to keep several deployments apart on one engine.
"""

from __future__ import annotations

from ..exceptions import ConfigurationError
from .base import Backplane as Backplane, BackplaneState as BackplaneState
from .memory import MemoryBackplane as MemoryBackplane, MemoryBroker as MemoryBroker

__all__ = ["Backplane", "BackplaneState", "MemoryBackplane", "MemoryBroker", "open_backplane"]


def open_backplane(url: str) -> Backplane:
    """Build the :class:`Backplane` a URL names (it still has to be opened).

    Raises:
        ConfigurationError: the scheme is unknown, or its driver is not installed.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not a backplane URL: {url!r} (expected e.g. redis://host)")
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryBackplane()
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        try:
            from .redis import RedisBackplane
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("the Redis backplane needs 'eventcast[redis]'") from exc
        return RedisBackplane(url)
    if scheme in ("nats", "tls"):
        try:
            from .nats import NATSBackplane
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("the NATS backplane needs 'eventcast[nats]'") from exc
        return NATSBackplane(url)
    raise ConfigurationError(
        f"unknown backplane URL scheme {scheme!r}; expected memory://, redis://, "
        "redis+cluster:// or nats://"
    )
