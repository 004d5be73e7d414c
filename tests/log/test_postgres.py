"""PostgresLog specifics: several processes on one schema, unreachable servers, errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest

from eventcast import ConfigurationError, Event, LogError
from eventcast.log import Retention
from eventcast.log.postgres import PostgresLog, split_url
from tests.conftest import RUN_ID

_schemas = itertools.count()

#: A child process: opens the log, waits for "go" on stdin, appends from
#: several tasks at once, then prints every acknowledged (id, offset) as JSON.
CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from eventcast import Event
    from eventcast.log import Retention
    from eventcast.log.postgres import PostgresLog

    async def main(url, name, tasks, rounds):
        log = PostgresLog(url)
        await log.open()
        log.set_retention(lambda topic: Retention(size=10**9))
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        acked = []

        async def task(t):
            for r in range(rounds):
                events = [Event(topic="shared", data=[name, t, r, k]) for k in range(2)]
                events.append(Event(topic=f"own.{name}", data=r))
                for event in await log.append(events):
                    acked.append((event.topic, event.id, event.offset))

        await asyncio.gather(*(task(t) for t in range(tasks)))
        await log.close()
        print(json.dumps({"acked": acked, "commits": log.commits}), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    """
)


@pytest.fixture
def schema_url(postgres_service: str) -> Iterator[str]:
    """A log URL on a schema of its own, dropped afterwards."""
    schema = f"ec_{RUN_ID}_p{next(_schemas)}"
    yield f"{postgres_service}?schema={schema}"
    with psycopg.connect(postgres_service, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
async def log(schema_url: str) -> AsyncIterator[PostgresLog]:
    log = PostgresLog(schema_url)
    await log.open()
    try:
        yield log
    finally:
        await log.close()


async def _readline(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(60):  # a guard against a hung child, not a synchronisation
        line = await proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"child exited: {(await proc.stderr.read()).decode()}")
    return line.decode().strip()


@pytest.mark.postgres
async def test_two_processes_append_to_one_topic_without_gaps(schema_url: str) -> None:
    tasks, rounds = 6, 25
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            schema_url,
            name,
            str(tasks),
            str(rounds),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for name in ("p1", "p2")
    ]
    try:
        # Both opened (and so raced to create the schema); start them together.
        assert [await _readline(p) for p in procs] == ["ready", "ready"]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        reports = [json.loads(await _readline(p)) for p in procs]
        assert [await p.wait() for p in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    per_process = tasks * rounds * 2
    acked: dict[str, int] = {}
    for report in reports:
        shared = [(i, o) for topic, i, o in report["acked"] if topic == "shared"]
        assert len(shared) == per_process
        acked.update(shared)
    assert len(acked) == 2 * per_process

    log = PostgresLog(schema_url)
    await log.open()
    try:
        log.set_retention(lambda topic: Retention(size=10**9))
        stored: list[Event] = []
        after = 0
        while page := await log.read("shared", after=after, limit=500):
            stored += page
            after = page[-1].offset or 0
        assert [e.offset for e in stored] == list(range(1, 2 * per_process + 1))
        assert {e.id: e.offset for e in stored} == acked
        # Events of one append are consecutive, and each process's own topic is 1..N.
        by_id = {e.id: e for e in stored}
        for report in reports:
            rows = report["acked"]
            for k in range(0, len(rows), 3):
                first, second = by_id[rows[k][1]], by_id[rows[k + 1][1]]
                assert second.offset == (first.offset or 0) + 1
            own = sorted(o for topic, _, o in rows if topic.startswith("own."))
            assert own == list(range(1, tasks * rounds + 1))
        assert (await log.position("shared")).offset == 2 * per_process
    finally:
        await log.close()


def _closed_port() -> socket.socket:
    """A socket bound to a port without listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_open_against_a_closed_port_raises_log_error() -> None:
    with _closed_port() as sock:
        port = sock.getsockname()[1]
        log = PostgresLog(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=2)
        async with asyncio.timeout(30):  # a guard: open() must not hang
            with pytest.raises(LogError, match="could not open") as info:
                await log.open()
        assert isinstance(info.value.__cause__, psycopg.Error)
        with pytest.raises(LogError):
            await log.append([Event(topic="a", data=1)])
        with pytest.raises(LogError):
            await log.read("a")
        await log.close()
        await log.close()


async def test_open_against_a_silent_server_times_out() -> None:
    # The kernel accepts the TCP connection but nobody ever answers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]
        log = PostgresLog(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=2)
        async with asyncio.timeout(30):  # a guard: open() must not hang
            with pytest.raises(LogError, match="could not open"):
                await log.open()
        await log.close()


def test_url_parsing() -> None:
    conninfo, schema = split_url("postgresql://u:secret@h:5433/db?schema=s1&sslmode=disable")
    assert schema == "s1"
    assert conninfo == "postgresql://u:secret@h:5433/db?sslmode=disable"
    assert split_url("postgres://h/db") == ("postgres://h/db", "eventcast")
    log = PostgresLog("postgresql://u:secret@h/db?schema=x")
    assert log.schema == "x"
    assert "secret" not in repr(log)
    assert "secret" not in log.url
    for bad in ("postgresql://h/db?schema=", "postgresql://h/db?schema=a;drop", "redis://h"):
        with pytest.raises(ConfigurationError):
            split_url(bad)
    with pytest.raises(ValueError, match="positive"):
        PostgresLog("postgresql://h/db", pool_size=0)


@pytest.mark.postgres
async def test_schema_is_created_idempotently(schema_url: str) -> None:
    logs = [PostgresLog(schema_url) for _ in range(4)]
    await asyncio.gather(*(log.open() for log in logs))
    try:
        out = await asyncio.gather(*(log.append([Event(topic="x", data=1)]) for log in logs))
        assert sorted(events[0].offset or 0 for events in out) == [1, 2, 3, 4]
        assert len({events[0].epoch for events in out}) == 1
    finally:
        for log in logs:
            await log.close()


@pytest.mark.postgres
async def test_driver_errors_become_log_errors(log: PostgresLog, postgres_service: str) -> None:
    await log.append([Event(topic="a", data=1)])
    with psycopg.connect(postgres_service, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{log.schema}" CASCADE')
    calls: list[Any] = [
        log.append([Event(topic="a", data=2)]),
        log.read("a"),
        log.position("a"),
        log.earliest("a"),
        log.lookup("a", "k"),
        log.truncate("a"),
        log.prune(),
        log.check(),
        log.load_dead_letters(5),
        log.delete_dead_letters([1]),
    ]
    for call in calls:
        with pytest.raises(LogError) as info:
            await call
        assert isinstance(info.value.__cause__, psycopg.Error)


@pytest.mark.postgres
async def test_group_commit_shares_transactions(log: PostgresLog) -> None:
    before = log.commits
    results = await asyncio.gather(*(log.append([Event(topic="g", data=i)]) for i in range(200)))
    assert sorted(r[0].offset or 0 for r in results) == list(range(1, 201))
    assert log.commits - before < 200


@pytest.mark.postgres
async def test_cancelled_close_still_releases_the_pool(log: PostgresLog) -> None:
    pool = log._pool
    assert pool is not None
    pending = [asyncio.create_task(log.append([Event(topic="c", data=i)])) for i in range(50)]
    await asyncio.sleep(0)  # let the appends queue up
    closing = asyncio.create_task(log.close())
    await asyncio.sleep(0)  # let close() start waiting for the writer
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert pool.closed
    await log.close()  # idempotent
    results = await asyncio.gather(*pending, return_exceptions=True)
    # Each append either committed or failed with LogError: never left hanging.
    assert all(isinstance(r, list | LogError) for r in results)
