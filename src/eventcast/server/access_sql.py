"""Access entries in the log's database: SQLite (one node) or PostgreSQL (shared).

Both keep one row per entry, keyed by ``(kind, subject, channel)``:

* SQLite: the table ``eventcast_access`` in the database file (by default the
  log's own ``events.db``). The file is created on the first entry stored, so
  a node that never blocks anyone writes nothing.
* PostgreSQL: the table ``access`` in the schema of the URL (``?schema=``,
  by default ``eventcast``, the log's schema), created if missing.

Rows past their ``expire_at`` are deleted when the entries are loaded.
Operations are rare (an admin call, a reload every few seconds), so each one
uses a connection of its own: nothing to keep alive, nothing to recover.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .._urls import redact_password
from ..exceptions import ConfigurationError
from ..log.base import log_error
from .access import AccessEntry, AccessStore, Key, entry_of

if TYPE_CHECKING:
    from psycopg import AsyncConnection

__all__ = ["PostgresAccessStore", "SQLiteAccessStore"]

_T = TypeVar("_T")

_COLUMNS: Final = "kind, subject, channel, issued_before, expire_at"
_SQLITE_TABLE: Final = """
CREATE TABLE IF NOT EXISTS eventcast_access (
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    channel TEXT NOT NULL,
    issued_before REAL NOT NULL,
    expire_at REAL,
    PRIMARY KEY (kind, subject, channel)
)
"""


def _row(entry: AccessEntry) -> tuple[Any, ...]:
    return (entry.kind, entry.subject, entry.channel, entry.issued_before, entry.expire_at)


def _entries(rows: list[Any]) -> list[AccessEntry]:
    entries = (
        entry_of(kind, subject, channel, float(issued_before), expire_at)
        for kind, subject, channel, issued_before, expire_at in rows
    )
    return [entry for entry in entries if entry is not None]


def _has_table(conn: sqlite3.Connection) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'eventcast_access'"
    return conn.execute(query).fetchone() is not None


class SQLiteAccessStore(AccessStore):
    """Access entries in a SQLite database file (one node: the file is its own).

    Args:
        path: the database file (its directory is created with the first entry).
        timeout: seconds to wait for the database's write lock (the log's
            writer holds it briefly per commit).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteAccessStore:
        """The store of a ``sqlite:///relative/path`` or ``sqlite:////abs/path`` URL.

        Raises:
            ConfigurationError: the URL names no file.
        """
        path = url.partition("://")[2].partition("?")[0]
        if not path.startswith("/") or path == "/":
            raise ConfigurationError(
                f"invalid SQLite URL {url!r}: use sqlite:///relative/path or sqlite:////abs/path"
            )
        return cls(path[1:])

    async def _run(
        self, action: str, fn: Callable[[sqlite3.Connection], _T], otherwise: _T, *, create: bool
    ) -> _T:
        """Run ``fn`` on a connection of its own, in a thread.

        Without ``create``, a database file that does not exist yet is not
        made: the answer is ``otherwise``.
        """

        def run() -> _T:
            if create:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            elif not os.path.exists(self.path):
                return otherwise
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                return fn(conn)
            finally:
                conn.close()

        async with self._lock:
            try:
                return await asyncio.to_thread(run)
            except (sqlite3.Error, OSError) as exc:
                raise log_error(action, exc) from exc

    async def put(self, entry: AccessEntry) -> None:
        def put(conn: sqlite3.Connection) -> None:
            conn.execute(_SQLITE_TABLE)
            conn.execute(
                f"INSERT OR REPLACE INTO eventcast_access ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                _row(entry),
            )

        await self._run("store an access entry", put, None, create=True)

    async def remove(self, key: Key) -> None:
        def remove(conn: sqlite3.Connection) -> None:
            if _has_table(conn):
                conn.execute(
                    "DELETE FROM eventcast_access WHERE kind = ? AND subject = ? AND channel = ?",
                    key,
                )

        await self._run("remove an access entry", remove, None, create=False)

    async def load(self, now: float) -> list[AccessEntry]:
        def load(conn: sqlite3.Connection) -> list[Any]:
            # Reads only, unless something expired: the log's writer shares the file.
            if not _has_table(conn):
                return []
            rows = conn.execute(f"SELECT {_COLUMNS} FROM eventcast_access").fetchall()
            if any(row[4] is not None and row[4] <= now for row in rows):
                conn.execute(
                    "DELETE FROM eventcast_access WHERE expire_at IS NOT NULL AND expire_at <= ?",
                    (now,),
                )
            return [row for row in rows if row[4] is None or row[4] > now]

        rows: list[Any] = await self._run("load the access entries", load, [], create=False)
        return _entries(rows)

    def __repr__(self) -> str:
        return f"<SQLiteAccessStore {self.path!r}>"


class PostgresAccessStore(AccessStore):
    """Access entries in PostgreSQL, shared by every node using the same schema.

    Args:
        url: ``postgresql://user:password@host:port/db``; ``?schema=name``
            picks the schema (default ``eventcast``).
        connect_timeout: seconds to wait for the server.

    Raises:
        ConfigurationError: not a PostgreSQL URL, or a bad schema name.
    """

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        from ..log.postgres import split_url

        self.conninfo, self.schema = split_url(url)
        self.url = redact_password(url)
        self.connect_timeout = connect_timeout
        table = '"' + self.schema.replace('"', '""') + '".access'
        self._table = table
        self._ddl = (
            f"CREATE TABLE IF NOT EXISTS {table} (kind TEXT NOT NULL, subject TEXT NOT NULL, "
            "channel TEXT NOT NULL, issued_before DOUBLE PRECISION NOT NULL, "
            "expire_at DOUBLE PRECISION, PRIMARY KEY (kind, subject, channel))"
        )
        self._opened = False

    async def _run(self, action: str, fn: Callable[[AsyncConnection[Any]], Any]) -> Any:
        import psycopg

        try:
            async with asyncio.timeout(self.connect_timeout * 3):
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo,
                    autocommit=True,
                    connect_timeout=max(2, round(self.connect_timeout)),
                )
                async with conn:
                    return await fn(conn)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise log_error(action, exc) from exc

    async def open(self) -> None:
        """Create the schema and the table if missing. Idempotent."""
        if self._opened:
            return
        schema = '"' + self.schema.replace('"', '""') + '"'

        async def create(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction():
                # Two processes creating the schema at once would collide on the
                # catalogs even with IF NOT EXISTS (the log takes the same lock).
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"eventcast:{self.schema}",)
                )
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                await conn.execute(self._ddl)

        await self._run(f"open {self.url!r}", create)
        self._opened = True

    async def put(self, entry: AccessEntry) -> None:
        await self.open()

        async def put(conn: AsyncConnection[Any]) -> None:
            await conn.execute(
                f"INSERT INTO {self._table} ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (kind, subject, channel) DO UPDATE SET "
                "issued_before = EXCLUDED.issued_before, expire_at = EXCLUDED.expire_at",
                _row(entry),
            )

        await self._run("store an access entry", put)

    async def remove(self, key: Key) -> None:
        await self.open()

        async def remove(conn: AsyncConnection[Any]) -> None:
            await conn.execute(
                f"DELETE FROM {self._table} WHERE kind = %s AND subject = %s AND channel = %s",
                key,
            )

        await self._run("remove an access entry", remove)

    async def load(self, now: float) -> list[AccessEntry]:
        await self.open()

        async def load(conn: AsyncConnection[Any]) -> list[Any]:
            await conn.execute(
                f"DELETE FROM {self._table} WHERE expire_at IS NOT NULL AND expire_at <= %s",
                (now,),
            )
            cursor = await conn.execute(f"SELECT {_COLUMNS} FROM {self._table}")
            return await cursor.fetchall()

        return _entries(await self._run("load the access entries", load))

    def __repr__(self) -> str:
        return f"<PostgresAccessStore {self.url!r} schema={self.schema!r}>"
