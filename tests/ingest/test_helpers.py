"""The outbox helpers of each driver, in the app's own transaction, through the hub's consumer.

psycopg (sync and async), SQLAlchemy (sync and async sessions) and Django
(``transaction.atomic``) each write one committed and one rolled-back
publication; the hub publishes exactly the committed ones, once each.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from eventcast.ingest.helpers import (
    outbox_payload,
    outbox_publish,
    outbox_publish_async,
    outbox_publish_django,
    outbox_publish_sqlalchemy,
    outbox_publish_sqlalchemy_async,
)

from .conftest import drained, eventually, running_consumers, take

pytestmark = pytest.mark.postgres


class Rollback(Exception):
    pass


def write_psycopg(dsn: str, table: str) -> None:
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            outbox_publish(conn, "orders:helpers", {"by": "psycopg"}, table=table)

        def rolled_back() -> None:
            with conn.transaction():
                outbox_publish(conn, "orders:helpers", {"by": "nope"}, table=table)
                raise Rollback

        with pytest.raises(Rollback):
            rolled_back()


async def write_psycopg_async(dsn: str, table: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            await outbox_publish_async(conn, "orders:helpers", {"by": "psycopg-async"}, table=table)

        async def rolled_back() -> None:
            async with conn.transaction():
                await outbox_publish_async(conn, "orders:helpers", {"by": "nope"}, table=table)
                raise Rollback

        with pytest.raises(Rollback):
            await rolled_back()


def write_sqlalchemy(dsn: str, table: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with Session(engine) as session:
            with session.begin():
                outbox_publish_sqlalchemy(
                    session, "orders:helpers", {"by": "sqlalchemy"}, table=table
                )

            def rolled_back() -> None:
                with session.begin():
                    outbox_publish_sqlalchemy(session, "orders:helpers", {"by": "no"}, table=table)
                    raise Rollback

            with pytest.raises(Rollback):
                rolled_back()
    finally:
        engine.dispose()


async def write_sqlalchemy_async(dsn: str, table: str) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        async with AsyncSession(engine) as session:
            async with session.begin():
                await outbox_publish_sqlalchemy_async(
                    session, "orders:helpers", {"by": "sqlalchemy-async"}, table=table
                )

            async def rolled_back() -> None:
                async with session.begin():
                    await outbox_publish_sqlalchemy_async(
                        session, "orders:helpers", {"by": "nope"}, table=table
                    )
                    raise Rollback

            with pytest.raises(Rollback):
                await rolled_back()
    finally:
        await engine.dispose()


def write_django(table: str) -> None:
    import django
    from django.conf import settings
    from django.db import connections, transaction

    if not settings.configured:
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": "test",
                    "USER": "postgres",
                    "HOST": "127.0.0.1",
                    "PORT": "5432",
                }
            },
            USE_TZ=True,
        )
        django.setup()
    try:
        with transaction.atomic():
            outbox_publish_django(
                ["orders:helpers", "orders:helpers2"], {"by": "django"}, table=table
            )

        def rolled_back() -> None:
            with transaction.atomic():
                outbox_publish_django("orders:helpers", {"by": "nope"}, table=table)
                raise Rollback

        with pytest.raises(Rollback):
            rolled_back()
        with pytest.raises(RuntimeError, match=r"transaction\.atomic"):
            outbox_publish_django("orders:helpers", {"by": "nope"}, table=table)
    finally:
        connections.close_all()


async def test_each_helper_publishes_only_what_commits(
    pg_dsn: str, outbox_table: str, ingest_hub: Any
) -> None:
    hub = await ingest_hub(
        [
            {
                "name": "app",
                "type": "postgresql",
                "postgresql": {"dsn": pg_dsn, "outbox_table_name": outbox_table},
            }
        ]
    )
    (consumer,) = running_consumers(hub)
    async with hub.hub.bus.subscribe(["orders:helpers", "orders:helpers2"]) as sub:
        await asyncio.to_thread(write_psycopg, pg_dsn, outbox_table)
        await write_psycopg_async(pg_dsn, outbox_table)
        await asyncio.to_thread(write_sqlalchemy, pg_dsn, outbox_table)
        await write_sqlalchemy_async(pg_dsn, outbox_table)
        await asyncio.to_thread(write_django, outbox_table)
        events = await take(sub, 6)
        await eventually(lambda: consumer.stats.processed == 5)
        assert sub.statistics().buffered == 0  # nothing beyond the six
    assert [(e.topic, e.data["by"]) for e in events] == [
        ("orders:helpers", "psycopg"),
        ("orders:helpers", "psycopg-async"),
        ("orders:helpers", "sqlalchemy"),
        ("orders:helpers", "sqlalchemy-async"),
        ("orders:helpers", "django"),
        ("orders:helpers2", "django"),
    ]
    await eventually(lambda: drained(pg_dsn, outbox_table))


def test_payload_is_centrifugo_s_publish_or_broadcast() -> None:
    assert outbox_payload("orders:1", {"a": 1}, tags={"k": "v"}, idempotency_key="o1") == (
        "publish",
        '{"channel":"orders:1","data":{"a":1},"tags":{"k":"v"},"idempotency_key":"o1"}',
    )
    assert outbox_payload(["a", "b"], [1]) == ("broadcast", '{"channels":["a","b"],"data":[1]}')
    with pytest.raises(ValueError, match="at least one"):
        outbox_payload([], 1)
    with pytest.raises(ValueError, match="invalid character"):
        outbox_payload("bad channel", 1)
    with pytest.raises(ValueError, match="partition"):
        outbox_publish(None, "a", 1, partition=-1)
