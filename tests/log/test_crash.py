"""Crash safety: every acknowledged append survives SIGKILL of the writing process."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from eventcast import Event
from eventcast.log import EventLog, Retention
from eventcast.log.postgres import PostgresLog
from eventcast.log.sqlite import SQLiteLog
from tests.conftest import RUN_ID

ACKS = 200

#: The child appends one event at a time and prints "offset i id" once each
#: append returned (that is, once it is acknowledged), forever.
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from eventcast import Event
    from eventcast.log import Retention

    async def main(kind, target):
        if kind == "sqlite":
            from eventcast.log.sqlite import SQLiteLog
            log = SQLiteLog(target)
        else:
            from eventcast.log.postgres import PostgresLog
            log = PostgresLog(target)
        await log.open()
        log.set_retention(lambda topic: Retention(size=10**9))
        i = 0
        while True:
            [event] = await log.append(
                [Event(topic="crash", data={"i": i, "pad": "x" * 200}, tags={"i": str(i)})]
            )
            print(event.offset, i, event.id, flush=True)
            i += 1

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)

_schemas = itertools.count()


@pytest.fixture
def pg_target(postgres_service: str) -> Iterator[str]:
    schema = f"ec_{RUN_ID}_c{next(_schemas)}"
    yield f"{postgres_service}?schema={schema}"
    with psycopg.connect(postgres_service, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def _crash_child(kind: str, target: str) -> list[tuple[int, int, str]]:
    """Run the child until it acknowledged ACKS appends, SIGKILL it, return the acks."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        kind,
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    acks: list[tuple[int, int, str]] = []
    try:
        async with asyncio.timeout(90):  # a guard against a stuck child
            while len(acks) < ACKS:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError(f"child exited: {(await proc.stderr.read()).decode()}")
                offset, i, event_id = line.split()
                acks.append((int(offset), int(i), event_id.decode()))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return acks


async def _check_after_crash(log: EventLog, acks: list[tuple[int, int, str]]) -> None:
    log.set_retention(lambda topic: Retention(size=10**9))
    stored: list[Event] = []
    after = 0
    while page := await log.read("crash", after=after, limit=250):
        stored += page
        after = page[-1].offset or 0
    top = (await log.position("crash")).offset
    # Offsets are exactly 1..top: no gap, no duplicate, nothing half-written.
    assert [e.offset for e in stored] == list(range(1, top + 1))
    assert top >= len(acks)
    by_offset = {e.offset: e for e in stored}
    for offset, i, event_id in acks:
        event = by_offset[offset]
        assert event.id == event_id
        assert event.data == {"i": i, "pad": "x" * 200}
        assert dict(event.tags) == {"i": str(i)}
    # One writer from an empty store: event i sits at offset i + 1.
    assert all(e.data["i"] == (e.offset or 0) - 1 for e in stored)
    epochs = {e.epoch for e in stored}
    assert len(epochs) == 1
    [event] = await log.append([Event(topic="crash", data="after")])
    assert event.offset == top + 1
    assert event.epoch in epochs


async def test_sqlite_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    acks = await _crash_child("sqlite", str(path))
    assert [offset for offset, _, _ in acks] == list(range(1, ACKS + 1))
    log = SQLiteLog(path)
    await log.open()
    try:
        await _check_after_crash(log, acks)
    finally:
        await log.close()


@pytest.mark.postgres
async def test_postgres_acknowledged_appends_survive_sigkill(pg_target: str) -> None:
    acks = await _crash_child("postgres", pg_target)
    assert [offset for offset, _, _ in acks] == list(range(1, ACKS + 1))
    log = PostgresLog(pg_target)
    await log.open()
    try:
        await _check_after_crash(log, acks)
    finally:
        await log.close()
