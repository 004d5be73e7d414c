"""Ingest: feed the hub from where events already live.

* :mod:`eventcast.ingest.helpers` writes publications into a PostgreSQL outbox
  table inside the application's own transaction (psycopg, SQLAlchemy, Django);
* consumers, configured in the hub's ``consumers`` setting, read the outbox
  (:mod:`~eventcast.ingest.outbox`), MQTT (:mod:`~eventcast.ingest.mqtt`), AMQP
  0-9-1 (:mod:`~eventcast.ingest.amqp`), Redis Streams
  (:mod:`~eventcast.ingest.redis_streams`) and NATS JetStream
  (:mod:`~eventcast.ingest.jetstream`), and acknowledge a message only once the
  hub has committed it.

Each driver is imported only when a consumer of its type is built. See
``docs/ingest.md``.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from .base import CommandTarget, Consumer, ConsumerConfig

__all__ = ["Consumers", "build_consumer"]


def build_consumer(config: ConsumerConfig, target: CommandTarget) -> Consumer:
    """Build (not start) the consumer an entry of the ``consumers`` setting describes.

    Raises:
        ConfigurationError: the driver of its type is not installed.
    """
    from .base import CONSUMER_TYPES

    _, module_name, class_name, extra = CONSUMER_TYPES[config.type]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"consumer {config.name!r} needs {exc.name or 'a missing package'}: "
            f"pip install 'eventcast[{extra}]'"
        ) from exc
    consumer: Consumer = getattr(module, class_name)(config.name, target, config.options)
    return consumer


class Consumers:
    """The consumers of one hub: started together, closed together.

    Args:
        configs: the ``consumers`` setting (disabled entries are skipped).
        target: where their commands go.
    """

    def __init__(self, configs: Iterable[ConsumerConfig], target: CommandTarget) -> None:
        self._consumers = [build_consumer(c, target) for c in configs if c.enabled]
        self._closed = False

    def start(self) -> None:
        """Start every consumer's supervised task (they connect in the background)."""
        for consumer in self._consumers:
            consumer.start()

    async def aclose(self) -> None:
        """Stop every consumer. Idempotent; safe under cancellation."""
        if self._closed:
            return
        self._closed = True
        await asyncio.shield(asyncio.gather(*(c.aclose() for c in self._consumers)))

    def status(self) -> list[dict[str, Any]]:
        """Each consumer's state and counters."""
        return [c.status() for c in self._consumers]

    def __iter__(self) -> Iterator[Consumer]:
        return iter(self._consumers)

    def __len__(self) -> int:
        return len(self._consumers)
