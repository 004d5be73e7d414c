"""``postgresql://``: a durable log shared by several processes, on PostgreSQL.

psycopg 3 (async) with a :class:`psycopg_pool.AsyncConnectionPool`. The tables
live in one schema (``?schema=name`` in the URL, ``eventcast`` by default),
created on :meth:`PostgresLog.open` if missing.

Appends use *group commit*: every ``append()`` waiting is handed to one writer
task, which commits them all in one transaction. Inside it, each topic's row of
``streams`` is locked (``SELECT … FOR UPDATE``, in topic order, so two writers
never deadlock) before offsets are assigned, so any number of processes can
append to the same topic and its offsets stay 1, 2, 3, … with no gap.

A topic gets its row in ``streams`` on its first append (or truncation), in a
short transaction of its own that claims the topic's empty epoch from the
``gens`` counters (see :mod:`eventcast.log.base`); positions are read, never
written, and :meth:`PostgresLog.prune` deletes the rows of streams left without
events.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

from .._urls import pop_option, redact_password
from ..deadletters import DeadLetter
from ..events import Event, Position
from ..exceptions import ConfigurationError, LogError
from .base import (
    AppendItem,
    EventLog,
    append_items,
    committed_events,
    empty_epoch,
    epoch_bucket,
    letter_to_row,
    log_error,
    new_epoch,
    new_store_id,
    now,
    row_to_letter,
    stored_event,
    stored_events,
)

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg.rows import TupleRow
    from psycopg_pool import AsyncConnectionPool

__all__ = ["PostgresLog"]

logger = logging.getLogger("eventcast.log")

_T = TypeVar("_T")

#: The schema used when the URL does not name one.
DEFAULT_SCHEMA: Final = "eventcast"
#: Most append requests waiting for the writer before publishers wait for room.
DEFAULT_MAX_PENDING: Final = 10_000
#: Most events committed in one transaction.
DEFAULT_MAX_BATCH: Final = 10_000
#: How many times an append creates missing streams before giving up.
_ENSURE_ATTEMPTS: Final = 5

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")

# ``{s}`` is replaced by the quoted schema name.
_DDL = """
CREATE TABLE IF NOT EXISTS {s}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.streams (
    topic TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    top BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.events (
    topic TEXT NOT NULL,
    "offset" BIGINT NOT NULL,
    id TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    payload BYTEA NOT NULL,
    "binary" BOOLEAN NOT NULL,
    tags BYTEA,
    ikey TEXT,
    PRIMARY KEY (topic, "offset")
);
CREATE TABLE IF NOT EXISTS {s}.gens (bucket INTEGER PRIMARY KEY, gen BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.ikeys (
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    "offset" BIGINT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (topic, key)
);
CREATE TABLE IF NOT EXISTS {s}.dead_letters (
    id BIGINT PRIMARY KEY,
    subscriber TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    time DOUBLE PRECISION NOT NULL,
    topic TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_time DOUBLE PRECISION NOT NULL,
    payload BYTEA NOT NULL,
    "binary" BOOLEAN NOT NULL,
    tags BYTEA
);
"""

_COLUMNS = 'e."offset", e.id, e.time, e.payload, e."binary", e.tags, e.ikey'

# One event to insert: (topic, id, time, payload, binary, tags, ikey).
_Item = AppendItem
# One event stored: (epoch, topic, offset, id, time, payload, binary, tags, ikey).
_Stored = tuple[str, str, int, str, float, bytes, bool, "bytes | None", "str | None"]


@dataclass(slots=True)
class _Request:
    items: list[_Item]
    future: asyncio.Future[list[_Stored]]


class _MissingStreams(Exception):
    """Raised inside an append transaction: these topics have no row yet."""

    def __init__(self, topics: list[str]) -> None:
        super().__init__(topics)
        self.topics = topics


class _Queries:
    """The SQL of one schema, built once."""

    def __init__(self, schema: str) -> None:
        s = '"' + schema.replace('"', '""') + '"'
        self.create_schema = f"CREATE SCHEMA IF NOT EXISTS {s}"
        self.ddl = _DDL.format(s=s)
        self.insert_streams = (
            f"INSERT INTO {s}.streams (topic, epoch, top) "
            "SELECT t, e, 0 FROM unnest(%s::text[], %s::text[]) AS u(t, e) ORDER BY t "
            "ON CONFLICT (topic) DO NOTHING"
        )
        self.store = (
            f"WITH new AS (INSERT INTO {s}.meta (key, value) VALUES ('store', %s) "
            "ON CONFLICT (key) DO NOTHING RETURNING value) "
            f"SELECT value FROM new UNION ALL SELECT value FROM {s}.meta WHERE key = 'store'"
        )
        # Claims generations: one row per bucket, n topics born in it; returns
        # the counter after the claim (the claimed ones are the n before it).
        self.claim_gens = (
            f"INSERT INTO {s}.gens (bucket, gen) "
            "SELECT * FROM unnest(%s::integer[], %s::bigint[]) AS u(b, n) ORDER BY b "
            f"ON CONFLICT (bucket) DO UPDATE SET gen = {s}.gens.gen + EXCLUDED.gen "
            "RETURNING bucket, gen"
        )
        self.position = (
            f"SELECT s.epoch, s.top, g.gen FROM (SELECT 1) one "
            f"LEFT JOIN {s}.streams s ON s.topic = %(topic)s "
            f"LEFT JOIN {s}.gens g ON g.bucket = %(bucket)s"
        )
        self.forget_empty = (
            f"DELETE FROM {s}.streams s WHERE s.topic = ANY(%s::text[]) AND NOT EXISTS "
            f"(SELECT 1 FROM {s}.events e WHERE e.topic = s.topic) RETURNING s.topic"
        )
        self.existing_streams = f"SELECT topic FROM {s}.streams WHERE topic = ANY(%s::text[])"
        self.delete_keys_of = f"DELETE FROM {s}.ikeys WHERE topic = ANY(%s::text[])"
        self.lock_streams = (
            f"SELECT topic, epoch, top FROM {s}.streams WHERE topic = ANY(%s::text[]) "
            "ORDER BY topic FOR UPDATE"
        )
        self.find_keys = (
            f"SELECT k.topic, {_COLUMNS} FROM {s}.ikeys k "
            f'JOIN {s}.events e ON e.topic = k.topic AND e."offset" = k."offset" '
            "WHERE (k.topic, k.key) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
            "AND k.expires > %s"
        )
        # A batch's events in one statement, as one array per column: psycopg
        # sends an executemany as one message per row, with Python work per row.
        self.insert_events = (
            f'INSERT INTO {s}.events (topic, "offset", id, time, payload, "binary", tags, ikey) '
            "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], "
            "%s::double precision[], %s::bytea[], %s::boolean[], %s::bytea[], %s::text[])"
        )
        self.upsert_key = (
            f'INSERT INTO {s}.ikeys (topic, key, "offset", expires) VALUES (%s, %s, %s, %s) '
            'ON CONFLICT (topic, key) DO UPDATE SET "offset" = EXCLUDED."offset", '
            "expires = EXCLUDED.expires"
        )
        self.set_top = f"UPDATE {s}.streams SET top = %s WHERE topic = %s"
        self.delete_below = f'DELETE FROM {s}.events WHERE topic = %s AND "offset" <= %s'
        # Bounded below by the floor already pruned: the index scan then skips
        # the dead entries of earlier deletes that vacuum has not removed yet
        # (with them, every prune rescanned all of them).
        self.delete_range = (
            f'DELETE FROM {s}.events WHERE topic = %s AND "offset" > %s AND "offset" <= %s'
        )
        self.delete_older = f"DELETE FROM {s}.events WHERE topic = %s AND time < %s"
        self.delete_expired_keys = (
            f"DELETE FROM {s}.ikeys WHERE topic = ANY(%s::text[]) AND expires <= %s"
        )
        self.lock_stream = f"SELECT epoch, top FROM {s}.streams WHERE topic = %s FOR UPDATE"
        self.lock_all = f"SELECT topic, top FROM {s}.streams ORDER BY topic FOR UPDATE"
        self.delete_topic = f"DELETE FROM {s}.events WHERE topic = %s"
        self.delete_topic_keys = f"DELETE FROM {s}.ikeys WHERE topic = %s"
        self.set_epoch = f"UPDATE {s}.streams SET epoch = %s WHERE topic = %s"
        read = (
            f"SELECT s.epoch, {_COLUMNS} FROM {s}.streams s LEFT JOIN LATERAL "
            f"(SELECT * FROM {s}.events e WHERE e.topic = s.topic "
            'AND e."offset" > GREATEST(%(after)s, s.top - %(size)s) '
            'AND e."offset" < %(upper)s AND e.time >= %(cutoff)s '
            'ORDER BY e."offset" {order} LIMIT %(limit)s) e ON true '
            'WHERE s.topic = %(topic)s ORDER BY e."offset" {order}'
        )
        self.read_forward = read.format(order="ASC")
        self.read_reverse = read.format(order="DESC")
        self.earliest = (
            f'SELECT s.top, (SELECT MIN(e."offset") FROM {s}.events e WHERE e.topic = s.topic '
            'AND e."offset" > s.top - %(size)s AND e.time >= %(cutoff)s) '
            f"FROM {s}.streams s WHERE s.topic = %(topic)s"
        )
        self.lookup = (
            f"SELECT s.epoch, {_COLUMNS} FROM {s}.ikeys k "
            f'JOIN {s}.events e ON e.topic = k.topic AND e."offset" = k."offset" '
            f"JOIN {s}.streams s ON s.topic = k.topic "
            "WHERE k.topic = %s AND k.key = %s AND k.expires > %s"
        )
        self.save_letter = (
            f"INSERT INTO {s}.dead_letters (id, subscriber, reason, attempts, error, time, "
            'topic, event_id, event_time, payload, "binary", tags) '
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET subscriber = EXCLUDED.subscriber, "
            "reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, error = EXCLUDED.error, "
            "time = EXCLUDED.time, topic = EXCLUDED.topic, event_id = EXCLUDED.event_id, "
            'event_time = EXCLUDED.event_time, payload = EXCLUDED.payload, "binary" = '
            'EXCLUDED."binary", tags = EXCLUDED.tags'
        )
        self.load_letters = (
            "SELECT id, subscriber, reason, attempts, error, time, topic, event_id, "
            'event_time, payload, "binary", tags FROM '
            f"(SELECT * FROM {s}.dead_letters ORDER BY id DESC LIMIT %s) d ORDER BY id"
        )
        self.delete_letters = f"DELETE FROM {s}.dead_letters WHERE id = ANY(%s::bigint[])"
        self.check = (
            f"INSERT INTO {s}.meta (key, value) VALUES ('checked', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        )


async def _configure(conn: AsyncConnection[TupleRow]) -> None:
    """Set up each pooled connection.

    Every statement of this log reads or writes by primary key, point or range.
    While a table's statistics lag (a young table, a busy one that autovacuum
    has not analysed yet) the planner estimates a page read at one row and
    picks a bitmap scan plus a sort, which reads every retained event of the
    topic for each page: 57k events/s instead of ~330k at 100k events. Without
    bitmap scans a page is an ordered index scan that stops at its limit.
    """
    await conn.execute("SET enable_bitmapscan = off")


def split_url(url: str) -> tuple[str, str]:
    """Split a log URL into the libpq conninfo and the schema name (``?schema=``).

    Raises:
        ConfigurationError: the URL is not a PostgreSQL URL or the schema name is invalid.
    """
    if urlsplit(url).scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {redact_password(url)!r}")
    conninfo, option = pop_option(url, "schema")
    schema = DEFAULT_SCHEMA if option is None else option
    if not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            f"invalid schema name {schema!r} in {redact_password(url)!r}: use letters, digits and _"
        )
    return conninfo, schema


class PostgresLog(EventLog):
    """The :class:`EventLog` on PostgreSQL, safe to share between processes.

    Args:
        url: ``postgresql://user:password@host:port/db``; ``?schema=name``
            picks the schema (default ``eventcast``), other query parameters
            go to libpq.
        pool_size: the most connections kept open.
        max_pending: bound on append requests queued for the writer.
        max_batch: bound on the events committed in one transaction.
        dedup_window: how long idempotency keys are remembered, in seconds.
        connect_timeout: seconds to wait for a connection to the server.
        timeout: seconds to wait for a free connection from the pool.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch: int = DEFAULT_MAX_BATCH,
        dedup_window: float = 120.0,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(dedup_window=dedup_window)
        if pool_size < 1 or max_pending < 1 or max_batch < 1:
            raise ValueError("pool_size, max_pending and max_batch must be positive")
        if connect_timeout <= 0 or timeout <= 0:
            raise ValueError("connect_timeout and timeout must be positive")
        self.conninfo, self.schema = split_url(url)
        self.url = redact_password(url)
        self.pool_size = pool_size
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._sql = _Queries(self.schema)
        self._pool: AsyncConnectionPool[AsyncConnection[TupleRow]] | None = None
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._room: asyncio.Semaphore | None = None
        self._writer: asyncio.Task[None] | None = None
        # Per-topic caches of this process, keyed by (topic, epoch): every offset
        # <= floor is known to be deleted; the time of the last deletion by age.
        self._floor: dict[tuple[str, str], int] = {}
        self._pruned_at: dict[tuple[str, str], float] = {}
        self._keys_pruned = 0.0
        self._store = ""  # the store id, read on open()
        self._opened = False
        self._closed = False
        #: Committed append transactions (for the group-commit benchmark and tests).
        self.commits = 0

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the schema and tables if missing, and start the writer."""
        if self._opened:
            return
        if self._closed:
            raise LogError("the log is closed")
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        connect_timeout = max(2, round(self.connect_timeout))  # libpq's minimum is 2
        try:
            async with asyncio.timeout(self.connect_timeout * 3):
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=connect_timeout
                )
                async with conn, conn.transaction():
                    # Two processes creating the schema at once would collide
                    # on the catalogs even with IF NOT EXISTS.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext(%s))",
                        (f"eventcast:{self.schema}",),
                    )
                    await conn.execute(self._sql.create_schema)
                    await conn.execute(self._sql.ddl)
                    cur = await conn.execute(self._sql.store, (new_store_id(),))
                    row = await cur.fetchone()
                    assert row is not None  # inserted, or there before
                    self._store = row[0]
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise log_error(f"open {self.url!r}", exc) from exc

        pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "connect_timeout": connect_timeout},
            configure=_configure,
            open=False,
            check=AsyncConnectionPool.check_connection,
            name=f"eventcast-{self.schema}",
            timeout=self.timeout,
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout * 3)
        except BaseException as exc:
            await asyncio.shield(pool.close())
            if isinstance(exc, psycopg.Error):
                raise log_error(f"open {self.url!r}", exc) from exc
            raise
        self._pool = pool
        self._room = asyncio.Semaphore(self.max_pending)
        self._writer = asyncio.create_task(self._write_loop(), name="eventcast-postgres-writer")
        self._opened = True

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        writer, self._writer = self._writer, None
        pool, self._pool = self._pool, None
        try:
            if writer is not None:
                self._queue.put_nowait(None)
                try:
                    await asyncio.shield(writer)
                except asyncio.CancelledError:
                    writer.cancel()
                    raise
        finally:
            if pool is not None:
                await asyncio.shield(pool.close())

    # -- running queries ---------------------------------------------------------------

    def _ready(self) -> AsyncConnectionPool[AsyncConnection[TupleRow]]:
        pool = self._pool
        if not self._opened or self._closed or pool is None:
            raise LogError("the log is not open")
        return pool

    async def _run(
        self, action: str, fn: Callable[[AsyncConnection[TupleRow]], Awaitable[_T]]
    ) -> _T:
        """Run ``fn`` on a pooled connection, translating driver errors."""
        import psycopg

        pool = self._ready()
        try:
            async with pool.connection() as conn:
                return await fn(conn)
        except (psycopg.Error, OSError) as exc:
            raise log_error(action, exc) from exc

    # -- writing -------------------------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> list[Event]:
        """Commit events atomically (group commit); see :meth:`EventLog.append`."""
        if not events:
            return []
        items: list[_Item] = append_items(events)
        self._ready()
        room = self._room
        writer = self._writer
        assert room is not None
        if writer is None or writer.done():
            raise LogError("the log's writer task is not running")
        await room.acquire()
        try:
            if self._closed:  # closed while waiting for room
                raise LogError("the log is not open")
            future: asyncio.Future[list[_Stored]] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait(_Request(items, future))
            rows = await future
        finally:
            room.release()
        return committed_events(events, rows)

    async def _write_loop(self) -> None:
        queue = self._queue
        batch: list[_Request] = []
        try:
            while True:
                first = await queue.get()
                if first is None:
                    return
                batch = [first]
                size = len(first.items)
                stop = False
                while size < self.max_batch:
                    try:
                        request = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if request is None:
                        stop = True
                        break
                    batch.append(request)
                    size += len(request.items)
                await self._commit(batch)
                batch = []
                if stop:
                    return
        finally:
            # Cancelled (close() was cancelled): nobody will commit these.
            error = LogError("the log was closed before the append was committed")
            while not queue.empty():
                request = queue.get_nowait()
                if request is not None:
                    batch.append(request)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)

    async def _commit(self, batch: list[_Request]) -> None:
        """Commit a batch of append requests in one transaction and resolve them."""
        import psycopg

        pool = self._pool
        t = now()
        floors: dict[tuple[str, str], int] = {}
        pruned: dict[tuple[str, str], float] = {}
        try:
            if pool is None:
                raise LogError("the log is not open")
            async with pool.connection() as conn:
                for attempt in range(_ENSURE_ATTEMPTS):
                    try:
                        async with conn.transaction():
                            results = await self._append_batch(conn, batch, t, floors, pruned)
                        break
                    except _MissingStreams as missing:  # rolled back: nothing was written
                        if attempt == _ENSURE_ATTEMPTS - 1:
                            raise LogError(
                                "streams kept vanishing while appending (a concurrent prune?)"
                            ) from None
                        await self._create_streams(conn, missing.topics)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, LogError):
                error = exc
            else:
                if not isinstance(exc, psycopg.Error | OSError):
                    logger.exception("unexpected error while appending to %s", self.url)
                error = log_error("append", exc)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        self.commits += 1
        self._floor.update(floors)
        keys_pruned = pruned.pop(("", ""), None)
        if keys_pruned is not None:
            self._keys_pruned = keys_pruned
        self._pruned_at.update(pruned)
        for request, result in zip(batch, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    async def _append_batch(
        self,
        conn: AsyncConnection[TupleRow],
        batch: list[_Request],
        t: float,
        floors: dict[tuple[str, str], int],
        pruned: dict[tuple[str, str], float],
    ) -> list[list[_Stored]]:
        sql = self._sql
        topics = sorted({item[0] for request in batch for item in request.items})
        cur = conn.cursor()
        # Lock every stream of the batch in topic order: concurrent writers (in
        # any process) serialise per topic. A topic without a row sends the
        # batch back to _commit, which creates the rows and starts again.
        await cur.execute(sql.lock_streams, (topics,))
        streams: dict[str, list[Any]] = {
            topic: [epoch, top] for topic, epoch, top in await cur.fetchall()
        }
        if len(streams) != len(topics):
            raise _MissingStreams([topic for topic in topics if topic not in streams])
        original: dict[tuple[str, str], _Stored] = {}
        wanted = {(item[0], item[6]) for r in batch for item in r.items if item[6] is not None}
        if wanted:
            pairs = sorted(wanted, key=str)
            await cur.execute(sql.find_keys, ([p[0] for p in pairs], [p[1] for p in pairs], t))
            for topic, offset, event_id, at, payload, binary, tags, ikey in await cur.fetchall():
                original[(topic, ikey)] = (
                    streams[topic][0],
                    topic,
                    offset,
                    event_id,
                    at,
                    bytes(payload),
                    binary,
                    None if tags is None else bytes(tags),
                    ikey,
                )
        rows: list[tuple[Any, ...]] = []
        keys: list[tuple[str, str, int, float]] = []
        results: list[list[_Stored]] = []
        for request in batch:
            stored: list[_Stored] = []
            for topic, event_id, at, payload, binary, tags, ikey in request.items:
                if ikey is not None:
                    found = original.get((topic, ikey))
                    if found is not None:
                        stored.append(found)
                        continue
                stream = streams[topic]
                stream[1] += 1
                offset = stream[1]
                rows.append((topic, offset, event_id, at, payload, binary, tags, ikey))
                row: _Stored = (stream[0], topic, offset, event_id, at, payload, binary, tags, ikey)
                stored.append(row)
                if ikey is not None:
                    keys.append((topic, ikey, offset, t + self.dedup_window))
                    original[(topic, ikey)] = row
            results.append(stored)
        if rows:
            columns = [list(column) for column in zip(*rows, strict=True)]
            await cur.execute(sql.insert_events, columns)
            await cur.executemany(
                sql.set_top, [(top, topic) for topic, (_, top) in streams.items()]
            )
        if keys:
            await cur.executemany(sql.upsert_key, keys)
        # Retention.
        for topic, (epoch, top) in streams.items():
            retention = self.retention(topic)
            state = (topic, epoch)
            floor = top - retention.size
            pruned_to = self._floor.get(state, 0)
            if floor > pruned_to:
                await cur.execute(sql.delete_range, (topic, pruned_to, floor))
                floors[state] = floor
            if retention.ttl is not None and t - self._pruned_at.get(state, 0.0) >= 1.0:
                await cur.execute(sql.delete_older, (topic, t - retention.ttl))
                pruned[state] = t
        if t - self._keys_pruned > self.dedup_window:
            # Only the topics locked here: no lock on another writer's rows.
            await cur.execute(sql.delete_expired_keys, (topics, t))
            pruned[("", "")] = t  # the keys' turn; applied after the commit
        return results

    async def _create_streams(self, conn: AsyncConnection[TupleRow], topics: list[str]) -> None:
        """Create the rows of topics without one, each claiming its empty epoch.

        A transaction of its own, locking the ``gens`` rows (in bucket order)
        before inserting the streams (in topic order): the append transactions
        lock only streams, so no lock cycle can form. A row created meanwhile by
        another process wins (``DO NOTHING``); the claim it made is then unused.
        """
        sql = self._sql
        cur = await conn.execute(sql.existing_streams, (topics,))
        known = {row[0] for row in await cur.fetchall()}
        topics = sorted(topic for topic in set(topics) if topic not in known)
        if not topics:
            return
        counts = Counter(epoch_bucket(topic) for topic in topics)
        buckets = sorted(counts)
        async with conn.transaction():
            cur = await conn.execute(sql.claim_gens, (buckets, [counts[b] for b in buckets]))
            claimed = {bucket: gen - counts[bucket] for bucket, gen in await cur.fetchall()}
            epochs = []
            for topic in topics:
                bucket = epoch_bucket(topic)
                epochs.append(empty_epoch(self._store, topic, claimed[bucket]))
                claimed[bucket] += 1
            await conn.execute(sql.insert_streams, (topics, epochs))

    async def truncate(self, topic: str) -> Position:
        """Remove a topic's history and start a new epoch; return the new position."""
        sql = self._sql
        epoch = new_epoch()

        async def run(conn: AsyncConnection[TupleRow]) -> Position:
            await self._create_streams(conn, [topic])  # a no-op when the row exists
            async with conn.transaction():
                cur = await conn.execute(sql.lock_stream, (topic,))
                row = await cur.fetchone()
                if row is None:  # pragma: no cover - pruned between the two transactions
                    raise LogError(f"the stream of {topic!r} vanished while truncating")
                await conn.execute(sql.delete_topic, (topic,))
                await conn.execute(sql.delete_topic_keys, (topic,))
                await conn.execute(sql.set_epoch, (epoch, topic))
            top: int = row[1]
            return Position(top, epoch)

        position = await self._run("truncate", run)
        self._floor[(topic, epoch)] = position.offset
        return position

    async def prune(self, now_: float | None = None) -> int:
        """Drop events past their topic's retention (size and age); return how many."""
        sql = self._sql
        t = now() if now_ is None else now_

        async def run(conn: AsyncConnection[TupleRow]) -> int:
            removed = 0
            async with conn.transaction():
                cur = await conn.execute(sql.lock_all)
                streams = await cur.fetchall()
                for topic, top in streams:
                    retention = self.retention(topic)
                    cur = await conn.execute(sql.delete_below, (topic, top - retention.size))
                    removed += max(cur.rowcount, 0)
                    if retention.ttl is not None:
                        cur = await conn.execute(sql.delete_older, (topic, t - retention.ttl))
                        removed += max(cur.rowcount, 0)
                await conn.execute(sql.delete_expired_keys, ([s[0] for s in streams], t))
                # Streams left without events are forgotten (their epoch was
                # claimed at birth, so the next one differs: see log.base).
                cur = await conn.execute(sql.forget_empty, ([s[0] for s in streams],))
                forgotten = [row[0] for row in await cur.fetchall()]
                if forgotten:
                    await conn.execute(sql.delete_keys_of, (forgotten,))
            gone = set(forgotten)
            for cache in (self._floor, self._pruned_at):
                for state in [state for state in cache if state[0] in gone]:
                    del cache[state]
            return removed

        return await self._run("prune", run)

    async def check(self) -> None:
        """Raise :class:`LogError` unless the log can accept writes now (a tiny write)."""
        sql = self._sql
        writer = self._writer
        if writer is not None and writer.done():
            raise LogError("the log's writer task is not running")

        async def run(conn: AsyncConnection[TupleRow]) -> None:
            await conn.execute(sql.check, (str(now()),))

        await self._run("check", run)

    async def save_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Store dead letters (those whose data cannot be encoded are skipped)."""
        rows = [row for row in map(letter_to_row, letters) if row is not None]
        if not rows:
            return
        sql = self._sql

        async def run(conn: AsyncConnection[TupleRow]) -> None:
            async with conn.transaction():
                await conn.cursor().executemany(sql.save_letter, rows)

        await self._run("save dead letters", run)

    async def delete_dead_letters(self, ids: Sequence[int]) -> None:
        """Remove stored dead letters by id."""
        if not ids:
            return
        sql = self._sql

        async def run(conn: AsyncConnection[TupleRow]) -> None:
            await conn.execute(sql.delete_letters, (list(ids),))

        await self._run("delete dead letters", run)

    # -- reading ---------------------------------------------------------------------------

    async def read(
        self,
        topic: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> builtins.list[Event]:
        """Return retained events of ``topic``; see :meth:`EventLog.read`."""
        if limit <= 0:
            return []
        retention = self.retention(topic)
        params = {
            "topic": topic,
            "after": after,
            "size": retention.size,
            "upper": before if before is not None else 2**62,
            "cutoff": -1.0 if retention.ttl is None else now() - retention.ttl,
            "limit": limit,
        }
        query = self._sql.read_reverse if reverse else self._sql.read_forward

        async def run(conn: AsyncConnection[TupleRow]) -> list[TupleRow]:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

        rows = await self._run("read", run)
        found = [row for row in rows if row[1] is not None]
        if not found:
            return []
        return stored_events(topic, found[0][0], [row[1:] for row in found])

    async def position(self, topic: str) -> Position:
        """Return the latest position of a topic (writes nothing; see :mod:`.base`)."""
        query = self._sql.position
        params = {"topic": topic, "bucket": epoch_bucket(topic)}

        async def run(conn: AsyncConnection[TupleRow]) -> TupleRow | None:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

        row = await self._run("read a position", run)
        assert row is not None  # one row, always
        epoch, top, generation = row
        if epoch is None:
            return Position(0, empty_epoch(self._store, topic, generation or 0))
        return Position(top, epoch)

    async def earliest(self, topic: str) -> int | None:
        """Return the smallest retained offset of a topic, or ``None``."""
        retention = self.retention(topic)
        params = {
            "topic": topic,
            "size": retention.size,
            "cutoff": -1.0 if retention.ttl is None else now() - retention.ttl,
        }
        sql = self._sql

        async def run(conn: AsyncConnection[TupleRow]) -> int | None:
            cur = await conn.execute(sql.earliest, params)
            row = await cur.fetchone()
            return None if row is None else row[1]

        return await self._run("read the earliest offset", run)

    async def lookup(self, topic: str, idempotency_key: str) -> Event | None:
        """Return the event stored under this idempotency key within the dedup window."""
        sql = self._sql
        t = now()

        async def run(conn: AsyncConnection[TupleRow]) -> TupleRow | None:
            cur = await conn.execute(sql.lookup, (topic, idempotency_key, t))
            return await cur.fetchone()

        row = await self._run("look up an idempotency key", run)
        if row is None:
            return None
        epoch, offset, event_id, at, payload, binary, tags, ikey = row
        return stored_event(
            topic,
            offset,
            epoch,
            event_id,
            at,
            bytes(payload),
            binary,
            None if tags is None else bytes(tags),
            ikey,
        )

    async def load_dead_letters(self, limit: int) -> builtins.list[DeadLetter]:
        """Return up to ``limit`` stored dead letters (the newest), oldest first."""
        if limit <= 0:
            return []
        sql = self._sql

        async def run(conn: AsyncConnection[TupleRow]) -> list[TupleRow]:
            cur = await conn.execute(sql.load_letters, (limit,))
            return await cur.fetchall()

        rows = await self._run("load dead letters", run)
        return [row_to_letter(row) for row in rows]

    def __repr__(self) -> str:
        return f"<PostgresLog {self.url!r} schema={self.schema!r}>"
