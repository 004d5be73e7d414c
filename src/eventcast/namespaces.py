"""Namespaces: the options every topic of a namespace shares (history, retention).

A topic's namespace is the part of its name before the first ``:``
(``chat:room.42`` is in ``chat``; ``prices.EURUSD`` is in ``""``). A
namespace with ``history_size > 0`` is *durable*: its topics are committed to
the log before fan-out, and readers can resume them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ._caches import remember
from .exceptions import ConfigurationError
from .log.base import Retention
from .schema import Schema, SchemaSpec, compile_schema
from .topics import namespace_of

__all__ = ["Namespace", "Namespaces"]

#: Most topics whose namespace lookup is cached.
_CACHE_SIZE: Final = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Namespace:
    """Options for every topic of one namespace (the part of a name before ``:``).

    A namespace with ``history_size > 0`` is *durable*: each publish is
    committed to the bus's log before it is fanned out, and subscribers can
    resume with ``since=``.

    Attributes:
        history_size: how many of the newest events each topic keeps (0: none,
            the topics are live-only).
        history_ttl: how long events are kept, in seconds (``None``: no age limit).
        schema: what every publication's data must match (a msgspec ``Struct``
            class, a pydantic model class or a JSON Schema dict; compiled once
            into a :class:`~eventcast.schema.Schema`); ``None``: anything.
            See :mod:`eventcast.schema`.
    """

    history_size: int = 0
    history_ttl: float | None = None
    schema: SchemaSpec | None = None

    def __post_init__(self) -> None:
        if self.history_size < 0:
            raise ConfigurationError("history_size must be >= 0")
        if self.history_ttl is not None and self.history_ttl <= 0:
            raise ConfigurationError("history_ttl must be positive or None")
        if self.schema is not None:
            object.__setattr__(self, "schema", compile_schema(self.schema))

    def check(self, topic: str, data: object) -> None:
        """Check a publication's data against the schema (nothing to do without one).

        Raises:
            InvalidDataError: the data does not match the schema.
        """
        schema = self.schema
        if schema is not None:
            assert isinstance(schema, Schema)  # compiled in __post_init__
            schema.validate(data, topic)

    @property
    def durable(self) -> bool:
        """Whether topics of this namespace keep history."""
        return self.history_size > 0


LIVE: Final = Namespace()


class Namespaces:
    """The namespace table: which options apply to a topic, cached per topic.

    Args:
        namespaces: options per namespace name (``""`` for topics with none);
            a namespace missing from the table is live-only.

    Raises:
        ConfigurationError: a value is not a :class:`Namespace`.
    """

    def __init__(self, namespaces: Mapping[str, Namespace] | None = None) -> None:
        self.table: dict[str, Namespace] = dict(namespaces or {})
        for name, ns in self.table.items():
            if not isinstance(ns, Namespace):
                raise ConfigurationError(f"namespace {name!r} must be a Namespace")
        self._cache: dict[str, Namespace] = {}

    @property
    def any_durable(self) -> bool:
        """Whether some namespace keeps history (the bus then needs a log)."""
        return any(ns.durable for ns in self.table.values())

    def of(self, topic: str) -> Namespace:
        """Return the options of the namespace a topic or pattern belongs to."""
        ns = self._cache.get(topic)
        if ns is None:
            ns = remember(
                self._cache, topic, self.table.get(namespace_of(topic), LIVE), _CACHE_SIZE
            )
        return ns

    def retention(self, topic: str) -> Retention:
        """What a durable topic's log keeps: its namespace's size and age limits."""
        ns = self.of(topic)
        return Retention(size=max(1, ns.history_size), ttl=ns.history_ttl)
