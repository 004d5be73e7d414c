"""The PostgreSQL outbox on the real server: helpers in the app's transaction, the consumer."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import psycopg
import pytest

from eventcast.ingest.base import ConsumerState
from eventcast.ingest.helpers import outbox_publish_async
from tests.server.hubtools import WAIT

from .conftest import drained, eventually, running_consumers, take, unique

pytestmark = pytest.mark.postgres


def consumer(table: str, dsn: str, **options: Any) -> dict[str, Any]:
    return {
        "name": "orders",
        "type": "postgresql",
        "postgresql": {"dsn": dsn, "outbox_table_name": table, **options},
    }


async def test_commits_published_once_in_commit_order_rollbacks_never(
    pg_dsn: str, outbox_table: str, ingest_hub: Any
) -> None:
    """1,000 transactions by 8 concurrent writers over 2 partitions; a random third roll back.

    Each transaction writes its outbox row first and then takes a counter row
    lock, so without the helper's partition lock the row ids would not follow
    the commit order. Subscribers see exactly the committed transactions, once
    each, in commit order per partition.
    """
    counters = unique("counters")
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE TABLE {counters} (partition INT PRIMARY KEY, n INT NOT NULL)")
        await conn.execute(f"INSERT INTO {counters} VALUES (0, 0), (1, 0)")
    hub = await ingest_hub([consumer(outbox_table, pg_dsn, num_partitions=2)])
    bus = hub.hub.bus
    committed: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    rng = random.Random(16)
    plan = [(i % 2, rng.random() < 1 / 3) for i in range(1000)]
    work: asyncio.Queue[tuple[int, tuple[int, bool]]] = asyncio.Queue()
    for item in enumerate(plan):
        work.put_nowait(item)

    async def writer() -> None:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            while not work.empty():
                seq, (partition, rollback) = work.get_nowait()
                try:
                    async with conn.transaction():
                        await outbox_publish_async(
                            conn,
                            f"orders:p{partition}",
                            {"seq": seq},
                            partition=partition,
                            table=outbox_table,
                        )
                        cur = await conn.execute(
                            f"UPDATE {counters} SET n = n + 1 WHERE partition = %s RETURNING n",
                            (partition,),
                        )
                        row = await cur.fetchone()
                        assert row is not None
                        if rollback:
                            raise _Rollback
                except _Rollback:
                    continue
                committed[partition].append((row[0], seq))

    try:
        async with bus.subscribe(["orders:p0", "orders:p1"], maxsize=2000) as sub:
            await asyncio.gather(*(writer() for _ in range(8)))
            total = len(committed[0]) + len(committed[1])
            assert 550 < total < 780  # about two thirds committed
            events = await take(sub, total)
            assert sub.statistics().dropped == 0
    finally:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(f"DROP TABLE {counters}")
    for partition in (0, 1):
        expected = [seq for _, seq in sorted(committed[partition])]
        got = [e.data["seq"] for e in events if e.topic == f"orders:p{partition}"]
        assert got == expected
        offsets = [e.offset for e in events if e.topic == f"orders:p{partition}"]
        assert offsets == list(range(1, len(expected) + 1))
    await eventually(lambda: drained(pg_dsn, outbox_table))  # deleted after the commit
    async with bus.subscribe("orders:p0") as late:  # nothing more arrives: no duplicate
        await hub.publish("orders:p0", {"marker": True})
        assert [e.data for e in await take(late, 1)] == [{"marker": True}]


class _Rollback(Exception):
    pass


async def test_notify_wakes_the_consumer_before_the_poll_interval(
    pg_dsn: str, outbox_table: str, ingest_hub: Any
) -> None:
    hub = await ingest_hub([consumer(outbox_table, pg_dsn, partition_poll_interval="1h")])
    (only,) = running_consumers(hub)
    await eventually(lambda: only.state is ConsumerState.RUNNING)
    async with hub.hub.bus.subscribe("orders:woken") as sub:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn, conn.transaction():
            await outbox_publish_async(conn, "orders:woken", {"x": 1}, table=outbox_table)
        # The poll interval is an hour: only the NOTIFY can bring it this soon.
        assert [e.data for e in await take(sub, 1)] == [{"x": 1}]


async def test_bad_rows_become_dead_letters_and_are_deleted(
    pg_dsn: str, outbox_table: str, ingest_hub: Any
) -> None:
    hub = await ingest_hub([consumer(outbox_table, pg_dsn)])
    rows = [
        ("history", '{"channel": "orders:a"}'),  # a reading method
        ("publish", '{"channel": "orders:a"}'),  # no data
        ("publish", '{"channel": "nope:a", "data": 1}'),  # unknown namespace
        ("publish", '{"channel": "bad channel", "data": 1}'),  # invalid name
        ("publish", '"just a string"'),  # not an object
        ("publish", '{"channel": "orders:a", "data": {"ok": true}}'),
    ]
    async with hub.hub.bus.subscribe("orders:a") as sub:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn, conn.transaction():
            for method, payload in rows:
                await conn.execute(
                    f"INSERT INTO {outbox_table} (method, payload) VALUES (%s, %s)",
                    (method, payload),
                )
        assert [e.data for e in await take(sub, 1)] == [{"ok": True}]
    dead = hub.hub.bus.dead_letters
    await eventually(lambda: len(dead.list(subscriber="ingest:orders")) == 5)
    letters = dead.list(subscriber="ingest:orders")
    assert {letter.event.topic for letter in letters} == {"ingest.orders"}
    assert {letter.reason for letter in letters} == {"bad_command", "undecodable"}
    assert any('"bad channel"' in letter.event.data for letter in letters)
    # A redrive refuses them (no subscriber has that id): they stay.
    assert await hub.hub.bus.dead_letters.redrive(subscriber="ingest:orders") == 0
    assert len(hub.hub.bus.dead_letters.list(subscriber="ingest:orders")) == 5
    await eventually(lambda: drained(pg_dsn, outbox_table))  # deleted after the commit
    metrics = await _get(hub.base + "/metrics")
    assert 'eventcast_consumer_messages_total{consumer="orders",type="postgresql"} 6.0' in metrics
    assert 'eventcast_consumer_dead_letters_total{consumer="orders",reason="bad_command"' in metrics
    ready = await _get(hub.base + "/readyz")
    assert '"consumers":{"orders":"running"}' in ready
    (shown,) = json.loads(await _get(hub.base + "/dashboard/api/stats"))["consumers"]
    assert shown == {
        "name": "orders",
        "type": "postgresql",
        "state": "running",
        "processed": 6,
        "dead_letters": 5,
        "errors": 0,
        "lag": shown["lag"],  # counted every few seconds
        "last_error": None,
    }


async def test_unreachable_database_is_retried_and_reported(ingest_hub: Any) -> None:
    hub = await ingest_hub(
        [consumer("eventcast_outbox", "postgresql://postgres@127.0.0.1:1/none?connect_timeout=2")]
    )
    (only,) = running_consumers(hub)
    await eventually(lambda: only.stats.errors > 0)
    assert only.state is ConsumerState.RETRYING
    assert "SourceError" in (only.stats.last_error or "")
    ready = await _get(hub.base + "/readyz")
    assert '"orders":"retrying"' in ready
    assert '"status":"ok"' in ready


async def _get(url: str) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.get(url)
        return response.text
