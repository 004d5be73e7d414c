"""The transactional outbox on PostgreSQL: the table, and the consumer that drains it.

The application writes a row into the outbox table in the same transaction
as its own changes (see :mod:`eventcast.ingest.helpers`). A rolled-back
transaction leaves no row, so nothing is published; a committed one leaves a
row that the hub publishes, then deletes. The table has the shape of
Centrifugo's PostgreSQL consumer, so an application written for it works
unchanged::

    id          BIGSERIAL PRIMARY KEY
    method      TEXT NOT NULL            -- a server API method: publish, broadcast, ...
    payload     JSONB NOT NULL           -- its parameters: {"channel": ..., "data": ...}
    partition   INTEGER NOT NULL DEFAULT 0
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()

:func:`create_outbox` (``eventcast outbox init``) also adds an index on
``(partition, id)`` and a trigger that NOTIFYs the partition number on the
table's channel after each insert, so the consumer wakes at once; polling
every ``partition_poll_interval`` is the fallback.

**The consumer**, per partition, in one transaction: take the partition's
advisory lock (so one hub node at a time drains a partition), read up to
``partition_select_limit`` rows in ``id`` order, run their commands through
the hub in that order (they share the log's group commit), and delete the rows.
Each publication's idempotency key is ``"<table>:<id>"`` (unless the payload
has its own ``idempotency_key``), so a crash between the publish and the
delete republishes nothing within the log's dedup window. Partitions are
drained in parallel, each on its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from .._urls import redact_password
from ..exceptions import SourceError
from ._sql import check_table_name, notification_channel, quote_table
from .base import CommandTarget, Consumer, Incoming, PostgresOptions

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = [
    "DEFAULT_TABLE",
    "OutboxConsumer",
    "backlog",
    "create_outbox",
    "outbox_ddl",
]

logger = logging.getLogger("eventcast.ingest")

#: The outbox table's name unless configured otherwise.
DEFAULT_TABLE: Final = "eventcast_outbox"
#: Seconds between two counts of the backlog (the consumer's lag).
LAG_INTERVAL: Final = 5.0
#: Seconds to wait for a connection to PostgreSQL.
CONNECT_TIMEOUT: Final = 10


def outbox_ddl(table: str) -> list[str]:
    """The statements that create the outbox table, its index and its NOTIFY trigger."""
    quoted = quote_table(table)
    bare = notification_channel(table)
    schema = table.rsplit(".", 1)[0] + "." if "." in table else ""
    function = quote_table(f"{schema}{bare}_notify")
    return [
        f"CREATE TABLE IF NOT EXISTS {quoted} ("
        "id BIGSERIAL PRIMARY KEY, "
        "method TEXT NOT NULL, "
        "payload JSONB NOT NULL, "
        "partition INTEGER NOT NULL DEFAULT 0, "
        "created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        f'CREATE INDEX IF NOT EXISTS "{bare}_partition_id" ON {quoted} (partition, id)',
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN PERFORM pg_notify('{bare}', NEW.partition::text); RETURN NULL; END $$",
        f'CREATE OR REPLACE TRIGGER "{bare}_notify" AFTER INSERT ON {quoted} '
        f"FOR EACH ROW EXECUTE FUNCTION {function}()",
    ]


def _source_error(action: str, exc: BaseException) -> SourceError:
    text = " ".join(str(exc).split())  # libpq's messages span lines
    error = SourceError(f"PostgreSQL outbox could not {action}: {type(exc).__name__}: {text}")
    error.__cause__ = exc
    return error


async def _connect(dsn: str) -> AsyncConnection[Any]:
    import psycopg

    try:
        async with asyncio.timeout(CONNECT_TIMEOUT * 2):
            return await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
    except (psycopg.Error, OSError, TimeoutError) as exc:
        raise _source_error(f"connect to {redact_password(dsn)!r}", exc) from exc


async def create_outbox(dsn: str, table: str = DEFAULT_TABLE) -> None:
    """Create the outbox table, its index and its NOTIFY trigger if missing.

    Raises:
        ConfigurationError: the table name is invalid.
        SourceError: PostgreSQL is unreachable or refused the statements.
    """
    import psycopg

    check_table_name(table)
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            # Two processes creating it at once would collide on the catalogs.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"outbox:{table}",))
            for statement in outbox_ddl(table):
                await conn.execute(statement)
    except psycopg.Error as exc:
        raise _source_error(f"create {table!r}", exc) from exc
    finally:
        await conn.close()


async def backlog(dsn: str, table: str = DEFAULT_TABLE) -> list[tuple[int, int, float | None]]:
    """Rows waiting in the outbox: ``(partition, rows, age of the oldest in seconds)``.

    Raises:
        SourceError: PostgreSQL is unreachable, or the table is missing.
    """
    import psycopg

    conn = await _connect(dsn)
    try:
        cur = await conn.execute(
            "SELECT partition, count(*), "
            "EXTRACT(EPOCH FROM now() - min(created_at))::float8 "
            f"FROM {quote_table(table)} GROUP BY partition ORDER BY partition"
        )
        rows = await cur.fetchall()
    except psycopg.Error as exc:
        raise _source_error(f"count the rows of {table!r}", exc) from exc
    finally:
        await conn.close()
    return [(int(p), int(n), None if age is None else float(age)) for p, n, age in rows]


class OutboxConsumer(Consumer):
    """Drains a PostgreSQL outbox table into the hub (the ``postgresql`` consumer type)."""

    type = "postgresql"
    options: PostgresOptions

    def __init__(self, name: str, target: CommandTarget, options: PostgresOptions) -> None:
        super().__init__(name, target, options)
        table = options.outbox_table_name
        quoted = quote_table(table)
        self._dsn = options.dsn.get_secret_value()
        self._table = table
        channel = options.partition_notification_channel
        self._channel = notification_channel(table) if channel is None else channel
        self._lock_name = f"eventcast_consumer:{table}"
        self._select = (
            f"SELECT id, method, payload::text FROM {quoted} "
            "WHERE partition = %s AND id > %s ORDER BY id LIMIT %s"
        )
        self._delete = f"DELETE FROM {quoted} WHERE id = ANY(%s::bigint[])"
        self._count = f"SELECT count(*) FROM {quoted}"
        self._wakeups = [asyncio.Event() for _ in range(options.num_partitions)]

    async def _consume(self) -> None:
        import psycopg

        options = self.options
        conns: list[AsyncConnection[Any]] = []
        try:
            for _ in range(options.num_partitions + 1 + bool(self._channel)):
                conns.append(await _connect(self._dsn))
            async with asyncio.TaskGroup() as group:
                for partition in range(options.num_partitions):
                    group.create_task(self._drain(conns[partition], partition))
                group.create_task(self._measure_lag(conns[options.num_partitions]))
                if self._channel:
                    group.create_task(self._listen(conns[-1]))
                self._connected()
        except ExceptionGroup as group:
            # The first failure of a partition, the listener or the lag query: a
            # psycopg error is the source's; any other (LogError, BusClosedError)
            # is the hub's. Either way the consumer reconnects.
            exc = group.exceptions[0]
            while isinstance(exc, ExceptionGroup):
                exc = exc.exceptions[0]
            if isinstance(exc, psycopg.Error):
                raise _source_error("read or delete outbox rows", exc) from exc
            raise exc from None
        finally:
            for conn in conns:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close())

    async def _drain(self, conn: AsyncConnection[Any], partition: int) -> None:
        limit = self.options.partition_select_limit
        wakeup = self._wakeups[partition]
        interval = self.options.partition_poll_interval
        # While a backlog drains, each read starts after the last id deleted:
        # the index entries of the rows deleted before are dead until a vacuum,
        # and a read from the start would step over all of them (quadratic).
        # Once a read comes back short, the next one starts from 0 again, so a
        # row committed late with a smaller id (written without the helpers'
        # lock) is still found.
        after = 0
        while True:
            wakeup.clear()
            count, last = await self._drain_once(conn, partition, after, limit)
            after = last if count == limit else 0
            if count < limit:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await wakeup.wait()

    async def _drain_once(
        self, conn: AsyncConnection[Any], partition: int, after: int, limit: int
    ) -> tuple[int, int]:
        """Publish and delete the next rows of a partition; return how many, and the last id."""
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(hashtext(%s), %s)", (self._lock_name, partition)
            )
            locked = await cur.fetchone()
            if not locked or not locked[0]:
                return 0, 0  # another hub node drains this partition
            cur = await conn.execute(self._select, (partition, after, limit))
            rows: Sequence[tuple[int, str, str]] = await cur.fetchall()
            if not rows:
                return 0, 0
            table = self._table
            await self._dispatch(
                [
                    Incoming(body=payload, key=f"{table}:{id_}", method=method)
                    for id_, method, payload in rows
                ]
            )
            # The ids as one array literal: psycopg dumps a list element by element.
            await conn.execute(self._delete, ("{" + ",".join(str(row[0]) for row in rows) + "}",))
        return len(rows), rows[-1][0]

    async def _listen(self, conn: AsyncConnection[Any]) -> None:
        await conn.execute(f'LISTEN "{self._channel}"')
        partitions = len(self._wakeups)
        async for notify in conn.notifies():
            payload = notify.payload
            if payload.isdigit() and int(payload) < partitions:
                self._wakeups[int(payload)].set()

    async def _measure_lag(self, conn: AsyncConnection[Any]) -> None:
        while True:
            cur = await conn.execute(self._count)
            row = await cur.fetchone()
            self.stats.lag = int(row[0]) if row else 0
            await asyncio.sleep(LAG_INTERVAL)
