"""The consumer's own failure and cancellation paths, on a real outbox table.

The target here records commands instead of running them on a hub, so the
test controls when a command blocks or fails; the source is the real
PostgreSQL server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import psycopg
import pytest

from eventcast.exceptions import CommandRejectedError, LogError
from eventcast.ingest.base import ConsumerState, PostgresOptions
from eventcast.ingest.helpers import outbox_publish_async
from eventcast.ingest.outbox import OutboxConsumer, backlog

from .conftest import drained, eventually

pytestmark = pytest.mark.postgres


class RecordingTarget:
    """A :class:`CommandTarget` that records, and fails or blocks when told to.

    Like the log, it stores a command once per idempotency key.
    """

    def __init__(self, *, failures: int = 0, block: bool = False) -> None:
        self.commands: list[tuple[str, dict[str, Any], str | None]] = []
        self.calls = 0
        self.letters: list[tuple[str, bytes, str]] = []
        self.failures = failures
        self.block = block
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def command(
        self, method: str, params: Mapping[str, Any], *, idempotency_key: str | None
    ) -> None:
        self.entered.set()
        self.calls += 1
        if self.block:
            await self.release.wait()
        if self.failures:
            self.failures -= 1
            raise LogError("the log is down (test)")
        if params.get("channel") == "refused":
            raise CommandRejectedError("refused (test)")
        if all(key != idempotency_key for _, _, key in self.commands):
            self.commands.append((method, dict(params), idempotency_key))

    def dead_letter(self, consumer: str, message: bytes, *, reason: str, error: str) -> None:
        self.letters.append((consumer, message, reason))


def make(dsn: str, table: str, target: RecordingTarget) -> OutboxConsumer:
    options = PostgresOptions(dsn=dsn, outbox_table_name=table)  # type: ignore[arg-type]
    consumer = OutboxConsumer("t", target, options)
    consumer.backoff = consumer.max_backoff = 0.01
    return consumer


async def write(dsn: str, table: str, channels: list[str]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        for n, channel in enumerate(channels):
            await outbox_publish_async(conn, channel, {"n": n}, table=table)


async def test_a_failing_hub_acknowledges_nothing_and_is_retried(
    pg_dsn: str, outbox_table: str
) -> None:
    target = RecordingTarget(failures=1)
    consumer = make(pg_dsn, outbox_table, target)
    await write(pg_dsn, outbox_table, ["a", "b", "refused"])
    consumer.start()
    try:
        await eventually(lambda: len(target.commands) == 2 and len(target.letters) == 1)
        await eventually(lambda: drained(pg_dsn, outbox_table))  # deleted after the commit
    finally:
        await consumer.aclose()
    assert consumer.stats.errors == 1
    assert "LogError: the log is down" in (consumer.stats.last_error or "")
    # "a" failed the first time: every row was read again, with the same keys, so
    # "b" (committed the first time) is stored once. (It went first: a log
    # failing in the middle of a batch can reorder it; docs/ingest.md says so.)
    assert target.calls == 6
    keys = sorted(key for _, _, key in target.commands)
    assert keys == [f"{outbox_table}:1", f"{outbox_table}:2"]
    # The refused row became one dead letter, recorded once the batch succeeded.
    assert [letter[2] for letter in target.letters] == ["bad_command"]
    assert consumer.state is ConsumerState.STOPPED


async def test_closing_mid_batch_leaves_the_rows_for_the_next_consumer(
    pg_dsn: str, outbox_table: str
) -> None:
    blocked = RecordingTarget(block=True)
    consumer = make(pg_dsn, outbox_table, blocked)
    await write(pg_dsn, outbox_table, ["a", "b"])
    consumer.start()
    await asyncio.wait_for(blocked.entered.wait(), 10)
    async with asyncio.timeout(10):
        await consumer.aclose()  # cancels the transaction in flight
        await consumer.aclose()  # idempotent
    assert blocked.commands == []
    assert await backlog(pg_dsn, outbox_table) == [(0, 2, pytest.approx(0, abs=60))]
    consumer.start()  # a closed consumer stays closed
    assert consumer.state is ConsumerState.STOPPED
    target = RecordingTarget()
    second = make(pg_dsn, outbox_table, target)
    second.start()
    try:
        await eventually(lambda: len(target.commands) == 2)
    finally:
        await second.aclose()
    assert [params["data"] for _, params, _ in target.commands] == [{"n": 0}, {"n": 1}]
