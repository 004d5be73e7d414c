"""open_log: choosing a log by URL, and failing plainly when it cannot open."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from eventcast import ConfigurationError, Event, LogError
from eventcast.log import MemoryLog, Retention, open_log
from eventcast.log.postgres import PostgresLog
from eventcast.log.sqlite import SQLiteLog
from tests.conftest import RUN_ID

_schemas = itertools.count()


@pytest.mark.parametrize(
    "url",
    ["kafka://localhost/0", "ftp://x/y", "mysql://u@h/db", "events.db", "", "://nothing"],
)
def test_unknown_scheme_or_not_a_url(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_log(url)


def test_not_a_string() -> None:
    with pytest.raises(ConfigurationError):
        open_log(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///", "sqlite://relative.db", "sqlite:///x.db?synchronous=BOGUS"],
)
def test_malformed_sqlite_url(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_log(url)


def test_sqlite_urls(tmp_path: Path) -> None:
    log = open_log(f"sqlite:///{tmp_path}/a/events.db?synchronous=normal")
    assert isinstance(log, SQLiteLog)
    assert log.path == f"{tmp_path}/a/events.db"
    assert log.synchronous == "NORMAL"
    relative = open_log("sqlite:///data/events.db")
    assert isinstance(relative, SQLiteLog)
    assert relative.path == "data/events.db"


async def test_sqlite_under_a_regular_file_raises_log_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    log = open_log(f"sqlite:///{blocker}/events.db")
    with pytest.raises(LogError, match="could not open"):
        await log.open()
    with pytest.raises(LogError):
        await log.append([Event(topic="a", data=1)])
    # Once the path is usable, the same log opens and works.
    blocker.unlink()
    await log.open()
    try:
        [event] = await log.append([Event(topic="a", data=1)])
        assert event.offset == 1
        assert [e.data for e in await log.read("a")] == [1]
    finally:
        await log.close()


async def test_sqlite_under_proc_raises_log_error() -> None:
    log = open_log("sqlite:////proc/eventcast-test/events.db")
    with pytest.raises(LogError, match="could not open") as info:
        await log.open()
    assert isinstance(info.value.__cause__, OSError)
    await log.close()


async def test_memory_url_works() -> None:
    log = open_log("memory://")
    assert isinstance(log, MemoryLog)
    async with log:
        [event] = await log.append([Event(topic="m", data={"x": 1})])
        assert (event.offset, event.epoch) == (1, (await log.position("m")).epoch)
        assert [e.data for e in await log.read("m")] == [{"x": 1}]
        await log.check()


def test_postgresql_url_returns_a_postgres_log() -> None:
    for url in ("postgresql://u@h/db", "postgres://u@h/db", "POSTGRESQL://u@h/db"):
        log = open_log(url)
        assert isinstance(log, PostgresLog)
        assert log.schema == "eventcast"
    named = open_log("postgresql://u@h:5433/db?schema=mine&application_name=x")
    assert isinstance(named, PostgresLog)
    assert named.schema == "mine"
    assert "schema" not in named.conninfo
    assert "application_name=x" in named.conninfo
    with pytest.raises(ConfigurationError):
        open_log('postgresql://u@h/db?schema=bad"name')


@pytest.fixture
def pg_url(postgres_service: str) -> Iterator[str]:
    schema = f"ec_{RUN_ID}_o{next(_schemas)}"
    yield f"{postgres_service}?schema={schema}"
    with psycopg.connect(postgres_service, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.postgres
async def test_postgresql_url_opens(pg_url: str) -> None:
    async with open_log(pg_url) as log:
        log.set_retention(lambda topic: Retention(size=5))
        out = await log.append([Event(topic="pg", data=i) for i in range(3)])
        assert [e.offset for e in out] == [1, 2, 3]
        await log.check()


async def test_open_is_prompt_when_the_path_cannot_be_written(tmp_path: Path) -> None:
    # A directory where the database file should be: SQLite cannot open it.
    (tmp_path / "events.db").mkdir()
    log = open_log(f"sqlite:///{tmp_path}/events.db")
    async with asyncio.timeout(30):  # a guard: open() must not hang
        with pytest.raises(LogError):
            await log.open()
    await log.close()
