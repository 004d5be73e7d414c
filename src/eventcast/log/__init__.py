"""Durable event logs: one numbered stream per topic, with an epoch.

Choose one by URL with :func:`open_log`, or pass an instance:

* ``memory://``: in process, a bounded ring per topic;
* ``sqlite:///path/to/events.db``: the embedded default (``sqlite:////abs/path``
  for an absolute path); ``?synchronous=NORMAL`` relaxes the fsync policy;
* ``postgresql://user@host/db``: PostgreSQL through psycopg 3
  (``?schema=name`` picks the schema, default ``eventcast``);
* ``redis://host:port/db`` (``rediss://`` for TLS): Redis Streams through
  redis-py (``?prefix=name`` picks the key prefix, default ``eventcast``);
* ``nats+jetstream://host:4222`` (``nats+jetstream+tls://`` for TLS): NATS
  JetStream through nats-py (``?prefix=name``, default ``eventcast``, and
  ``?replicas=n``, default 1).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Final
from urllib.parse import parse_qs, urlsplit

from ..exceptions import ConfigurationError
from .base import (
    DEFAULT_DEDUP_WINDOW as DEFAULT_DEDUP_WINDOW,
    EventLog as EventLog,
    Retention as Retention,
)
from .memory import MemoryLog as MemoryLog

__all__ = ["DEFAULT_DEDUP_WINDOW", "EventLog", "MemoryLog", "Retention", "open_log"]

_POSTGRES = (".postgres", "PostgresLog", "PostgreSQL", "psycopg: pip install 'eventcast[postgres]'")
_REDIS = (".redis", "RedisStreamsLog", "Redis", "redis-py: pip install 'eventcast[redis]'")
_JETSTREAM = (".jetstream", "JetStreamLog", "JetStream", "nats-py: pip install 'eventcast[nats]'")
#: The logs on a server, by URL scheme: (module, class, name, what to install),
#: imported only when chosen.
_SERVER_LOGS: Final = {
    "postgresql": _POSTGRES,
    "postgres": _POSTGRES,
    "redis": _REDIS,
    "rediss": _REDIS,
    "nats+jetstream": _JETSTREAM,
    "nats+jetstream+tls": _JETSTREAM,
}


def open_log(url: str) -> EventLog:
    """Build the :class:`EventLog` a URL names (it still has to be opened).

    Raises:
        ConfigurationError: the scheme is unknown or the URL is malformed.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not a log URL: {url!r} (expected e.g. sqlite:///events.db)")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryLog()
    if scheme == "sqlite":
        path, _, query = rest.partition("?")
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(
                f"invalid SQLite URL {url!r}: use sqlite:///relative/path or sqlite:////abs/path"
            )
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        from .sqlite import SQLiteLog

        try:
            return SQLiteLog(path[1:], synchronous=options.get("synchronous", "FULL"))
        except ValueError as exc:
            raise ConfigurationError(f"invalid SQLite URL {url!r}: {exc}") from exc
    server = _SERVER_LOGS.get(scheme)
    if server is not None:
        module, name, title, needs = server
        try:
            log_class: Callable[[str], EventLog] = getattr(import_module(module, __package__), name)
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(f"the {title} log needs {needs}") from exc
        return log_class(url)
    known = "memory://, sqlite:///path, postgresql://, redis://, nats+jetstream://"
    raise ConfigurationError(
        f"unknown log URL scheme {scheme!r} in {urlsplit(url).geturl()!r}; expected one of {known}"
    )
