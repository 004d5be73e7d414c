"""SQLiteLog regressions: the writer thread survives errors, close() survives cancellation."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from eventcast import Event, LogError
from eventcast.log import Retention
from eventcast.log.sqlite import SQLiteLog


async def test_a_failing_retention_callback_fails_the_append_not_the_writer(
    tmp_path: Path,
) -> None:
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    try:

        def broken(topic: str) -> Retention:
            raise RuntimeError("boom")

        log.set_retention(broken)
        async with asyncio.timeout(30):  # a guard: this used to hang forever
            with pytest.raises(LogError, match="boom"):
                await log.append([Event(topic="a", data=1)])
        log.set_retention(lambda topic: Retention(size=10))
        # Nothing was committed, and the writer still serves.
        [event] = await log.append([Event(topic="a", data=2)])
        assert event.offset == 1
        assert [e.data for e in await log.read("a")] == [2]
    finally:
        await log.close()


async def test_cancelled_close_still_releases_readers(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    await log.append([Event(topic="a", data=1)])
    assert [e.data for e in await log.read("a")] == [1]  # opens a reader connection
    closing = asyncio.create_task(log.close())
    await asyncio.sleep(0)  # yield once: close() is now waiting for the writer
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert log._pool is None
    assert log._reader_conns == []
    await log.close()  # idempotent
    with pytest.raises(LogError):
        await log.read("a")


async def test_a_request_counts_against_max_pending_until_the_writer_answers_it(
    tmp_path: Path,
) -> None:
    """A caller that stops waiting leaves its request queued: it still takes room."""
    log = SQLiteLog(tmp_path / "events.db", max_pending=2)
    await log.open()
    gate = threading.Event()
    entered = threading.Event()

    def held(topic: str) -> Retention:  # runs on the writer thread, inside a batch
        entered.set()
        gate.wait(30)
        return Retention(size=100)

    try:
        log.set_retention(held)
        first = asyncio.create_task(log.append([Event(topic="a", data=1)]))
        assert await asyncio.to_thread(entered.wait, 30)  # the writer holds the first batch
        second = asyncio.create_task(log.append([Event(topic="a", data=2)]))
        await asyncio.sleep(0.05)
        third = asyncio.create_task(log.append([Event(topic="a", data=3)]))
        await asyncio.sleep(0.05)
        first.cancel()
        second.cancel()
        await asyncio.sleep(0.05)
        assert not third.done()  # both requests are still queued: no room yet
        assert log._queue.qsize() == 1  # only the second's; the third waits for room
        gate.set()
        async with asyncio.timeout(30):
            stored = await third
        assert stored[0].offset == 3
        assert [e.data for e in await log.read("a")] == [1, 2, 3]
        assert first.cancelled()
        assert second.cancelled()
    finally:
        gate.set()
        await log.close()


async def test_the_appends_of_one_turn_share_one_request_and_one_commit(
    tmp_path: Path,
) -> None:
    """Many appends started in one loop turn reach the writer as one group; each
    caller gets its own events back, in the order it gave them."""
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    try:
        await log.append([Event(topic="warm", data=0)])
        commits = log.commits
        calls = [
            [Event(topic=f"t{i % 3}", data=[i, j]) for j in range(i % 4 + 1)] for i in range(50)
        ]
        results = await asyncio.gather(*(log.append(events) for events in calls))
        assert log.commits == commits + 1
        for events, stored in zip(calls, results, strict=True):
            assert [e.id for e in stored] == [e.id for e in events]
            assert [e.data for e in stored] == [e.data for e in events]
        for topic in ("t0", "t1", "t2"):
            read = await log.read(topic)
            assert [e.offset for e in read] == list(range(1, len(read) + 1))
            by_id = {e.id: e.offset for stored in results for e in stored if e.topic == topic}
            assert {e.id: e.offset for e in read} == by_id
    finally:
        await log.close()


async def test_a_group_stops_at_max_batch_and_a_cancelled_caller_spares_the_others(
    tmp_path: Path,
) -> None:
    log = SQLiteLog(tmp_path / "events.db", max_batch=10)
    await log.open()
    try:
        await log.append([Event(topic="warm", data=0)])
        commits = log.commits
        tasks = [
            asyncio.create_task(log.append([Event(topic="a", data=[i, j]) for j in range(4)]))
            for i in range(6)
        ]
        await asyncio.sleep(0)  # every task has joined a group
        tasks[2].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[2], asyncio.CancelledError)
        # 24 events in groups of at least 10: 12 + 12, not one commit of 24.
        assert log.commits - commits >= 2
        read = await log.read("a")
        # The cancelled caller's events were queued: they are stored too.
        assert [e.data for e in read] == [[i, j] for i in range(6) for j in range(4)]
        for i, stored in enumerate(done):
            if i != 2:
                assert isinstance(stored, list)
                assert [e.data for e in stored] == [[i, j] for j in range(4)]
    finally:
        await log.close()


async def test_close_sends_the_appends_of_its_turn_before_stopping_the_writer(
    tmp_path: Path,
) -> None:
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    appended = asyncio.create_task(log.append([Event(topic="a", data=1)]))
    await asyncio.sleep(0)  # the append joined this turn's group, not yet queued
    assert log._unsent
    await log.close()
    async with asyncio.timeout(10):
        stored = await appended
    assert stored[0].offset == 1
    reopened = SQLiteLog(tmp_path / "events.db")
    await reopened.open()
    try:
        assert [e.data for e in await reopened.read("a")] == [1]
    finally:
        await reopened.close()
