"""Fixtures of the ingest tests: the real sources (PostgreSQL, Mosquitto, RabbitMQ, Redis, NATS).

Each test gets names (tables, topics, queues, streams) unique to the run, and
removes what it created.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from eventcast import Event
from eventcast.ingest.base import Consumer
from tests.conftest import RUN_ID, ensure_service
from tests.scale.conftest import until
from tests.server.conftest import StartHub, start_hub
from tests.server.hubtools import WAIT, HubServer

__all__ = ["start_hub"]

_counter = itertools.count()

#: Namespaces of the ingest tests' hubs: ``orders`` and ``iot`` keep history
#: (durable), ``live`` does not.
INGEST_NAMESPACES: list[dict[str, Any]] = [
    {"name": "", "history_size": 100, "history_ttl": 300},
    {"name": "orders", "history_size": 5000, "history_ttl": 600},
    {"name": "iot", "history_size": 5000, "history_ttl": 600},
    {"name": "live"},
]


def unique(prefix: str) -> str:
    """A name unique to this run and test (letters, digits and ``_``)."""
    return f"{prefix}_{RUN_ID}_{next(_counter)}"


@pytest.fixture
def pg_dsn() -> str:
    ensure_service("postgres")
    return "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def outbox_table(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh outbox table (with its index and NOTIFY trigger), dropped after the test."""
    import psycopg

    from eventcast.ingest.outbox import create_outbox

    table = unique("outbox")
    await create_outbox(pg_dsn, table)
    try:
        yield table
    finally:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
            await conn.execute(f'DROP FUNCTION IF EXISTS "{table}_notify"() CASCADE')


@pytest.fixture
def ingest_hub(start_hub: StartHub) -> StartHub:
    """Start an in-process hub with the ingest namespaces and the given consumers."""

    async def start(consumers: list[dict[str, Any]], **overrides: Any) -> Any:
        return await start_hub(namespaces=INGEST_NAMESPACES, consumers=consumers, **overrides)

    return start


async def eventually(condition: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll a consumer's state or counter (nothing signals them) until it holds."""
    return await until(condition, "a consumer's state", timeout)


def running_consumers(hub: HubServer) -> list[Consumer]:
    """The consumers of an in-process hub."""
    consumers = hub.hub.consumers
    assert consumers is not None
    return list(consumers)


async def take(sub: Any, n: int) -> list[Event]:
    """The next ``n`` events of a bus subscription (fail after WAIT without progress)."""
    events: list[Event] = []
    while len(events) < n:
        async with asyncio.timeout(WAIT):
            events.extend(await sub.get_batch(n - len(events)))
    return events


async def drained(dsn: str, table: str) -> bool:
    """Whether an outbox table is empty (its rows are deleted just after their commit)."""
    from eventcast.ingest.outbox import backlog

    return await backlog(dsn, table) == []
