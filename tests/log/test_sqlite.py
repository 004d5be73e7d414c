"""SQLiteLog regressions: the writer thread survives errors, close() survives cancellation."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from eventcast import Bus, EncodeError, Event, LogError, Namespace
from eventcast.log import Retention
from eventcast.log.sqlite import SQLiteLog

from ..writergate import WriterGate


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


async def test_an_append_after_the_writer_stopped_fails_at_once(tmp_path: Path) -> None:
    """A log whose writer thread stopped refuses appends (its one flag, _accepting,
    cleared by the writer itself) instead of queueing them for nobody."""
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    try:
        [event] = await log.append([Event(topic="a", data=1)])
        assert event.offset == 1
        thread = log._thread
        assert thread is not None
        log._queue.put(None)  # the writer's stop sentinel, as close() sends it
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive()
        with pytest.raises(LogError, match="writer thread is not running"):
            await log.append([Event(topic="a", data=2)])
        bus_event = Event(topic="a", data=3)
        with pytest.raises(LogError, match="writer thread is not running"):
            await log._append_then(bus_event, lambda events: None)
    finally:
        await log.close()
    with pytest.raises(LogError, match="not open"):
        await log.append([Event(topic="a", data=4)])


async def test_a_request_counts_against_max_pending_until_the_writer_answers_it(
    tmp_path: Path,
) -> None:
    """A caller that stops waiting leaves its request queued: it still takes room."""
    log = SQLiteLog(tmp_path / "events.db", max_pending=2)
    await log.open()
    gate = WriterGate(log)
    try:
        first = asyncio.create_task(log.append([Event(topic="a", data=1)]))
        assert await gate.entered()  # the writer holds the first batch
        second = asyncio.create_task(log.append([Event(topic="a", data=2)]))
        await asyncio.sleep(0.05)
        third = asyncio.create_task(log.append([Event(topic="a", data=3)]))
        await asyncio.sleep(0.05)
        first.cancel()
        second.cancel()
        await asyncio.sleep(0.05)
        assert not third.done()  # both requests are still queued: no room yet
        assert log._queue.qsize() == 1  # only the second's; the third waits for room
        gate.release()
        async with asyncio.timeout(30):
            stored = await third
        assert stored[0].offset == 3
        assert [e.data for e in await log.read("a")] == [1, 2, 3]
        assert first.cancelled()
        assert second.cancelled()
    finally:
        gate.release()
        await log.close()


async def test_common_and_rare_rows_of_one_group_commit_are_stored_as_sent(
    tmp_path: Path,
) -> None:
    """The common row (JSON data, no tags, no key) is inserted with its constant
    columns written in the statement, the others with every column bound: in one
    commit group, each event reads back exactly as it was appended, in offset order."""
    path = tmp_path / "events.db"
    log = SQLiteLog(path)
    await log.open()
    sent = [
        Event(topic="t", data={"n": 0}),
        Event(topic="t", data=b"\x00\xff raw"),
        Event(topic="t", data="text", tags={"k": "v"}),
        Event(topic="t", data=[3], idempotency_key="key-3"),
        Event(topic="t", data=None),
        Event(topic="u", data=b""),
        Event(topic="t", data={"n": 6}),
    ]
    try:
        # One request of seven rows of both kinds (one group commit), then seven
        # requests of one queued at once.
        await asyncio.gather(log.append(sent), *(log.append([e]) for e in sent))
        for reopened in (False, True):
            if reopened:
                await log.close()
                log = SQLiteLog(path)
                await log.open()
            for topic in ("t", "u"):
                mine = [e for e in sent if e.topic == topic] * 2
                read = await log.read(topic)
                assert [e.offset for e in read] == list(range(1, len(read) + 1))
                # The keyed event's repeat is not stored again.
                expected = [
                    e for i, e in enumerate(mine) if i < len(mine) // 2 or e.idempotency_key is None
                ]
                assert [(e.id, e.data, dict(e.tags), e.idempotency_key, e.time) for e in read] == [
                    (e.id, e.data, dict(e.tags), e.idempotency_key, e.time) for e in expected
                ]
                assert all(
                    type(e.data) is type(x.data) for e, x in zip(read, expected, strict=True)
                )
    finally:
        await log.close()


async def test_payloads_and_tags_are_stored_as_blobs_of_their_encoded_bytes(
    tmp_path: Path,
) -> None:
    """Every row binds its payload (and tags) as a ``bytearray`` and its binary flag as
    an ``int`` (the sqlite3 module binds ``bytes`` and ``bool`` only after an adapter
    lookup): what is stored is BLOBs and an integer all the same, byte for byte the
    event's encoded data and tags, and it reads back as the events appended."""
    from eventcast.log.base import encode_tags

    path = tmp_path / "events.db"
    log = SQLiteLog(path)
    await log.open()
    sent = [Event(topic="t", data={"n": n, "text": "é" * n}) for n in range(3)]
    sent += [
        Event(topic="t", data=b"\x00\xff", tags={"k": "v"}),
        Event(topic="t", data=[1], tags={"a": "b", "c": "é"}),
        Event(topic="t", data="keyed", idempotency_key="k1"),
    ]
    try:
        await asyncio.gather(*(log.append([e]) for e in sent))
        read = await log.read("t")
    finally:
        await log.close()
    assert [(e.data, dict(e.tags), e.idempotency_key) for e in read] == [
        (e.data, dict(e.tags), e.idempotency_key) for e in sent
    ]
    assert all(type(e.encoded_data()) is bytes for e in read)
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT typeof(payload), payload, typeof(binary), binary, typeof(tags), tags"
            " FROM ec_events ORDER BY offset"
        ).fetchall()
    assert rows == [
        (
            "blob",
            e.encoded_data(),
            "integer",
            int(isinstance(e.data, bytes)),
            "blob" if e.tags else "null",
            encode_tags(e.tags),
        )
        for e in sent
    ]


async def test_a_bad_event_fails_its_own_append_not_the_group_commit_it_would_join(
    tmp_path: Path,
) -> None:
    """The writer commits every queued request in one transaction and builds the
    committed events itself: what can fail in an event (its data, its tags) must
    fail at its own append, before anything is queued, and the appends beside it
    in the same group commit must be stored and answered."""
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    try:
        good = [Event(topic="t", data={"n": n}) for n in range(4)]
        bad_data = Event(topic="t", data=object())
        bad_tags = Event(topic="t", data=1, tags={"k": object()})  # type: ignore[dict-item]
        results = await asyncio.gather(
            log.append(good[:1]),
            log.append([good[1], bad_data]),
            log.append(good[2:3]),
            log.append([bad_tags]),
            log.append(good[3:]),
            return_exceptions=True,
        )
        assert isinstance(results[1], EncodeError)
        assert isinstance(results[3], EncodeError)
        answered = [e for r in (results[0], results[2], results[4]) for e in r]  # type: ignore[union-attr]
        assert [(e.id, e.offset) for e in answered] == [
            (good[i].id, n) for n, i in enumerate((0, 2, 3), 1)
        ]
        read = await log.read("t")
        assert [(e.id, e.offset, e.data) for e in read] == [
            (e.id, e.offset, e.data) for e in answered
        ]
    finally:
        await log.close()


async def test_a_subclass_that_overrides_append_is_what_the_bus_awaits(tmp_path: Path) -> None:
    """The bus awaits SQLiteLog's queued append directly (no coroutine of its own);
    a subclass with its own ``append`` gets it called instead."""
    calls: list[int] = []

    class Counting(SQLiteLog):
        async def append(self, events: Sequence[Event]) -> list[Event]:
            calls.append(len(events))
            return await super().append(events)

    durable = {"d": Namespace(history_size=10)}
    async with Bus(log=Counting(tmp_path / "events.db"), namespaces=durable) as bus:
        first = await bus.publish("d:a", 1)
        await bus.publish_many([("d:a", 2), ("d:b", 3)])
    assert first.offset == 1
    assert calls == [1, 2]


# -- group commit: the appends made while the writer is busy are one request ------------


async def test_the_appends_made_while_the_writer_is_busy_are_one_request(
    tmp_path: Path,
) -> None:
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    gate = WriterGate(log)
    try:
        first = asyncio.ensure_future(log.append([Event(topic="t", data=0)]))
        assert await gate.entered()  # the writer is busy
        commits = log.commits
        sizes = [1, 3, 1, 2, 1] * 10
        batches = [[Event(topic="t", data=[i, j]) for j in range(n)] for i, n in enumerate(sizes)]
        appending = asyncio.gather(*(log.append(batch) for batch in batches))
        await asyncio.sleep(0.05)
        assert log._queue.qsize() == 1  # one group holds every append made meanwhile
        gate.release()
        async with asyncio.timeout(30):
            answers = await appending
            await first
        assert log.commits == commits + 2  # the held commit, then the group's
        offset = 1
        for batch, answer in zip(batches, answers, strict=True):
            # Each caller gets its own events, at consecutive offsets, in call order.
            assert [e.id for e in answer] == [e.id for e in batch]
            assert [e.offset for e in answer] == list(range(offset + 1, offset + 1 + len(batch)))
            offset += len(batch)
        assert len(await log.read("t")) == 1 + sum(sizes)
    finally:
        gate.release()
        await log.close()


async def test_a_group_goes_to_the_writer_once_it_holds_max_batch_events(
    tmp_path: Path,
) -> None:
    log = SQLiteLog(tmp_path / "events.db", max_batch=4)
    await log.open()
    try:
        answers = await asyncio.gather(*(log.append([Event(topic="t", data=i)]) for i in range(10)))
        assert log.commits >= 3  # 4 + 4 + 2: no transaction holds more than max_batch
        assert [a[0].offset for a in answers] == list(range(1, 11))
    finally:
        await log.close()


async def test_close_hands_the_open_group_to_the_writer_first(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = SQLiteLog(path)
    await log.open()
    pending = log._appending([Event(topic="t", data=1)])  # queued in this turn's group
    async with asyncio.timeout(30):  # a guard: the group must not be left behind
        await log.close()
        [stored] = await pending
    assert stored.offset == 1
    again = SQLiteLog(path)
    await again.open()
    try:
        assert [e.data for e in await again.read("t")] == [1]
    finally:
        await again.close()


async def test_another_request_follows_the_open_group_in_call_order(tmp_path: Path) -> None:
    log = SQLiteLog(tmp_path / "events.db")
    await log.open()
    try:
        appended = log._appending([Event(topic="t", data=1)])  # joins this turn's group
        truncated = log._submit("truncate", "t")  # made after it: runs after it
        [stored] = await appended
        position = await truncated
        assert stored.offset == 1
        assert position.offset == 1
        assert position.epoch != stored.epoch
        assert await log.read("t") == []  # the truncation removed the append
    finally:
        await log.close()
