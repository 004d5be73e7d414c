"""Write publications into the outbox table inside the application's own transaction.

.. code-block:: python

    import psycopg
    from eventcast.ingest.helpers import outbox_publish

    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (42,))
        outbox_publish(conn, "orders:42", {"status": "paid"})
    # committed: the hub publishes it once; rolled back: it publishes nothing

One function per driver, same arguments: :func:`outbox_publish` (psycopg,
sync), :func:`outbox_publish_async` (psycopg, async),
:func:`outbox_publish_sqlalchemy` (a SQLAlchemy ``Session`` or ``Connection``),
:func:`outbox_publish_sqlalchemy_async` (an ``AsyncSession`` or
``AsyncConnection``) and :func:`outbox_publish_django` (the current
``transaction.atomic`` block of a Django database). Give a list of channels
to write a ``broadcast``.

**Commit order.** Before inserting, each helper takes a transaction-scoped
advisory lock on the partition (``pg_advisory_xact_lock``), so transactions
writing to the same partition number their rows in the order they commit:
subscribers see the publications in commit order. The lock is held until the
transaction ends, so write the outbox row last, just before the commit; use
several partitions (``partition=hash(key) % n``) where unrelated writers
should not wait for each other.

This module needs none of the hub's dependencies; each helper imports its
driver only through the connection it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from ..topics import validate_topic
from ._sql import insert_sql, lock_params, lock_sql

__all__ = [
    "DEFAULT_TABLE",
    "outbox_payload",
    "outbox_publish",
    "outbox_publish_async",
    "outbox_publish_django",
    "outbox_publish_sqlalchemy",
    "outbox_publish_sqlalchemy_async",
]

#: The outbox table's name unless told otherwise.
DEFAULT_TABLE: Final = "eventcast_outbox"

_encode = msgspec.json.Encoder().encode


def outbox_payload(
    channel: str | Sequence[str],
    data: Any,
    *,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> tuple[str, str]:
    """The ``(method, payload JSON)`` of a publish (one channel) or broadcast (several).

    Raises:
        InvalidTopicError: a channel name breaks the grammar.
        EncodeError: the data is not JSON-serialisable.
        ValueError: the list of channels is empty.
    """
    from ..events import encode_data

    body: dict[str, Any]
    if isinstance(channel, str):
        method, body = "publish", {"channel": validate_topic(channel)}
    else:
        channels = [validate_topic(c) for c in channel]
        if not channels:
            raise ValueError("broadcast needs at least one channel")
        method, body = "broadcast", {"channels": channels}
    body["data"] = msgspec.Raw(encode_data(data))
    if tags:
        body["tags"] = dict(tags)
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    return method, _encode(body).decode()


def _prepare(
    table: str,
    partition: int,
    channel: str | Sequence[str],
    data: Any,
    tags: Mapping[str, str] | None,
    idempotency_key: str | None,
) -> tuple[tuple[str, int], str, str]:
    """Check everything before touching the connection: the lock's arguments, method, payload."""
    lock = lock_params(table, partition)
    insert_sql(table)  # checks the table name
    method, payload = outbox_payload(channel, data, tags=tags, idempotency_key=idempotency_key)
    return lock, method, payload


def outbox_publish(
    conn: Any,
    channel: str | Sequence[str],
    data: Any,
    *,
    partition: int = 0,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> int:
    """Write a publication into the outbox in ``conn``'s current transaction (psycopg 3).

    Args:
        conn: a ``psycopg.Connection``; the row is written in its transaction
            (``with conn.transaction():``), or committed at once in autocommit.
        channel: the channel, or a list of channels for a broadcast.
        data: the publication's data (JSON-serialisable).
        partition: the outbox partition (``0 .. num_partitions - 1``).
        tags: string tags of the publication.
        idempotency_key: the publication's own key (default: the row id).
        table: the outbox table.

    Returns:
        The row's id.
    """
    lock, method, payload = _prepare(table, partition, channel, data, tags, idempotency_key)
    conn.execute(lock_sql(), lock)
    row = conn.execute(insert_sql(table), (method, payload, partition)).fetchone()
    return int(row[0])


async def outbox_publish_async(
    conn: Any,
    channel: str | Sequence[str],
    data: Any,
    *,
    partition: int = 0,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> int:
    """:func:`outbox_publish` on a ``psycopg.AsyncConnection``."""
    lock, method, payload = _prepare(table, partition, channel, data, tags, idempotency_key)
    await conn.execute(lock_sql(), lock)
    cur = await conn.execute(insert_sql(table), (method, payload, partition))
    row = await cur.fetchone()
    return int(row[0])


def _sqlalchemy_statements(table: str) -> tuple[Any, Any]:
    from sqlalchemy import text

    return (
        text(lock_sql(named=True)),
        text(insert_sql(table, named=True)),
    )


def _sqlalchemy_params(
    lock: tuple[str, int], partition: int, method: str, payload: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    name, number = lock
    return (
        {"lock_name": name, "lock_partition": number},
        {"method": method, "payload": payload, "partition": partition},
    )


def outbox_publish_sqlalchemy(
    session: Any,
    channel: str | Sequence[str],
    data: Any,
    *,
    partition: int = 0,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> int:
    """:func:`outbox_publish` on a SQLAlchemy ``Session`` or ``Connection`` (PostgreSQL).

    The row joins the session's transaction (``with session.begin():``).
    """
    lock, method, payload = _prepare(table, partition, channel, data, tags, idempotency_key)
    lock_statement, insert = _sqlalchemy_statements(table)
    lock_args, insert_args = _sqlalchemy_params(lock, partition, method, payload)
    session.execute(lock_statement, lock_args)
    return int(session.execute(insert, insert_args).scalar_one())


async def outbox_publish_sqlalchemy_async(
    session: Any,
    channel: str | Sequence[str],
    data: Any,
    *,
    partition: int = 0,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> int:
    """:func:`outbox_publish` on a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``."""
    lock, method, payload = _prepare(table, partition, channel, data, tags, idempotency_key)
    lock_statement, insert = _sqlalchemy_statements(table)
    lock_args, insert_args = _sqlalchemy_params(lock, partition, method, payload)
    await session.execute(lock_statement, lock_args)
    result = await session.execute(insert, insert_args)
    return int(result.scalar_one())


def outbox_publish_django(
    channel: str | Sequence[str],
    data: Any,
    *,
    using: str = "default",
    partition: int = 0,
    tags: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> int:
    """:func:`outbox_publish` on a Django database, inside ``transaction.atomic()``.

    Args:
        using: the database alias (a PostgreSQL database).

    Raises:
        RuntimeError: called outside an atomic block (the row would be
            committed alone, defeating the outbox).
    """
    from django.db import connections

    connection = connections[using]
    if not connection.in_atomic_block:
        raise RuntimeError("outbox_publish_django must be called inside transaction.atomic()")
    lock, method, payload = _prepare(table, partition, channel, data, tags, idempotency_key)
    with connection.cursor() as cursor:
        cursor.execute(lock_sql(), lock)
        cursor.execute(insert_sql(table), (method, payload, partition))
        row = cursor.fetchone()
    return int(row[0])
