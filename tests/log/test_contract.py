"""One contract for every EventLog: memory, SQLite, PostgreSQL, Redis and JetStream alike."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
import redis

from eventcast import EncodeError, Event, LogError
from eventcast.deadletters import DeadLetter
from eventcast.log import (
    EventLog,
    MemoryLog,
    Retention,
    memory as memory_module,
    sqlite as sqlite_module,
)
from eventcast.log.base import epoch_bucket
from eventcast.log.sqlite import SQLiteLog
from tests.conftest import RUN_ID
from tests.log.natstools import delete_streams, stream_names, subjects

_schemas = itertools.count()


class Backend:
    """Builds logs of one kind over one store, and can wipe or sabotage that store."""

    def __init__(
        self,
        kind: str,
        tmp_path: Path,
        pg_url: str | None,
        redis_url: str | None = None,
        nats_url: str | None = None,
    ) -> None:
        self.kind = kind
        self.durable = kind != "memory"
        self.path = tmp_path / "events.db"
        self.pg_url = pg_url
        self.redis_url = redis_url
        self.nats_url = nats_url
        n = next(_schemas)
        self.schema = f"ec_{RUN_ID}_{n}"
        self.prefix = f"ectest:{RUN_ID}:{n}"
        self.nats_prefix = f"ectest-{RUN_ID}-{n}"
        self.logs: list[EventLog] = []

    @property
    def module(self) -> ModuleType:
        """The module whose ``now`` the implementation calls."""
        if self.kind == "memory":
            return memory_module
        if self.kind == "sqlite":
            return sqlite_module
        if self.kind == "redis":
            from eventcast.log import redis as redis_module

            return redis_module
        if self.kind == "jetstream":
            from eventcast.log import jetstream

            return jetstream
        from eventcast.log import postgres

        return postgres

    def make(self, **kwargs: Any) -> EventLog:
        if self.kind == "memory":
            return MemoryLog(**kwargs)
        if self.kind == "sqlite":
            return SQLiteLog(self.path, **kwargs)
        if self.kind == "redis":
            from eventcast.log.redis import RedisStreamsLog

            return RedisStreamsLog(f"{self.redis_url}?prefix={self.prefix}", **kwargs)
        if self.kind == "jetstream":
            from eventcast.log.jetstream import JetStreamLog

            url = self.nats_url.replace("nats://", "nats+jetstream://", 1)  # type: ignore[union-attr]
            return JetStreamLog(f"{url}?prefix={self.nats_prefix}", **kwargs)
        from eventcast.log.postgres import PostgresLog

        return PostgresLog(f"{self.pg_url}?schema={self.schema}", **kwargs)

    async def open(self, **kwargs: Any) -> EventLog:
        log = self.make(**kwargs)
        self.logs.append(log)
        await log.open()
        return log

    def _pg(self) -> psycopg.Connection[Any]:
        assert self.pg_url is not None
        return psycopg.connect(self.pg_url, autocommit=True)

    def _redis(self) -> redis.Redis:
        assert self.redis_url is not None
        return redis.Redis.from_url(self.redis_url)

    def _delete_redis_keys(self) -> None:
        """Delete the keys under this test's prefix, and only those."""
        with self._redis() as client:
            keys = list(client.scan_iter(f"{self.prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])

    def wipe(self) -> None:
        """Destroy the store (every log on it must be closed)."""
        if self.kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{self.path}{suffix}")
        elif self.kind == "postgres":
            with self._pg() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        elif self.kind == "redis":
            self._delete_redis_keys()  # like a FLUSHDB, limited to this test's keys
        elif self.kind == "jetstream":
            # Every stream of this test's prefix, from a thread with a loop of its
            # own (wipe() is called from within the test's running loop).
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(lambda: asyncio.run(self._delete_streams())).result()

    async def _delete_streams(self) -> None:
        assert self.nats_url is not None
        await delete_streams(self.nats_url, self.nats_prefix)

    def poison(self) -> None:
        """Make the store reject (with an error) the insert of an event whose id is 'poison'."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                conn.execute(
                    "CREATE TRIGGER ec_poison BEFORE INSERT ON ec_events "
                    "WHEN NEW.id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
                )
                conn.commit()
        elif self.kind == "postgres":
            s = f'"{self.schema}"'
            with self._pg() as conn:
                conn.execute(
                    f"CREATE FUNCTION {s}.poison() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN IF NEW.id = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF; "
                    "RETURN NEW; END $$"
                )
                conn.execute(
                    f"CREATE TRIGGER poison BEFORE INSERT ON {s}.events "
                    f"FOR EACH ROW EXECUTE FUNCTION {s}.poison()"
                )
        elif self.kind == "redis":
            # Redis has no triggers: a batch holding a 'poison' event is sent with
            # its topic's stream key pointing at a key of the wrong type, so the
            # server itself rejects the real append script.
            bad = f"{self.prefix}:poison"
            with self._redis() as client:
                client.set(bad, "not a stream")
            for log in self.logs:
                build = log._append_call  # type: ignore[attr-defined]

                def poisoned(items: Any, token: str, build: Any = build) -> Any:
                    keys, args = build(items, token)
                    topics = list(dict.fromkeys(item[0] for item in items))
                    for item in items:
                        if item[1] == "poison":
                            keys[2 * (topics.index(item[0]) + 1)] = bad
                    return keys, args

                setattr(log, "_append_call", poisoned)  # noqa: B010
        elif self.kind == "jetstream":
            # A message holding the 'poison' event asks the server to check it
            # goes to a stream that does not exist: the server refuses it.
            for log in self.logs:
                publish = log._publish  # type: ignore[attr-defined]

                async def poisoned_publish(
                    subject: str, body: bytes, headers: dict[str, str], publish: Any = publish
                ) -> Any:
                    if b"poison" in body:
                        headers = {**headers, "Nats-Expected-Stream": "no-such-stream"}
                    return await publish(subject, body, headers)

                setattr(log, "_publish", poisoned_publish)  # noqa: B010
        else:
            pytest.skip("the memory log has no store that can fail")

    async def stored_topics(self, log: EventLog) -> set[str]:
        """Every topic the store (and the log's memory) holds anything for, read directly."""
        if self.kind == "memory":
            assert isinstance(log, MemoryLog)
            return set(log._streams)
        if self.kind == "sqlite":
            assert isinstance(log, SQLiteLog)
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                rows = conn.execute(
                    "SELECT topic FROM ec_streams UNION SELECT topic FROM ec_events "
                    "UNION SELECT topic FROM ec_ikeys"
                ).fetchall()
            return {row[0] for row in rows} | set(log._state)
        if self.kind == "postgres":
            s = f'"{self.schema}"'
            with self._pg() as conn:
                rows = conn.execute(
                    f"SELECT topic FROM {s}.streams UNION SELECT topic FROM {s}.events "
                    f"UNION SELECT topic FROM {s}.ikeys"
                ).fetchall()
            return {row[0] for row in rows}
        if self.kind == "jetstream":
            return await self._jetstream_topics(log)
        assert self.kind == "redis"
        # Every key but the store-wide ones (store id, counters, health check)
        # and those that expire on their own within minutes (the outcomes of
        # recent appends, idempotency keys within their dedup window).
        topics = set()
        with self._redis() as client:
            for raw in client.scan_iter(f"{self.prefix}:*", count=1000):
                kind, _, rest = raw.decode().removeprefix(f"{self.prefix}:").partition(":")
                if kind in ("meta", "stream"):
                    topics.add(rest)
                elif kind == "ikey":
                    if not 0 < client.pttl(raw) <= 120_000:
                        length, _, rest = rest.partition(":")
                        topics.add(rest[: int(length)])
                elif kind not in ("store", "gens", "checked", "batch"):
                    topics.add(f"unexpected key {raw!r}")
        return topics

    async def _jetstream_topics(self, log: EventLog) -> set[str]:
        """The topics with a subject in an event stream, and those the log remembers."""
        from eventcast.log.jetstream import JetStreamLog

        assert isinstance(log, JetStreamLog)
        assert self.nats_url is not None
        topics = set(log._heads) | set(log._lanes) | set(map(log._topic_of, log._hints))
        for name in await stream_names(self.nats_url, self.nats_prefix):
            if name.startswith(f"{self.nats_prefix}_ev_"):
                topics |= {log._topic_of(s) for s in await subjects(self.nats_url, name)}
        return topics

    async def aclose(self) -> None:
        for log in self.logs:
            await log.close()
        if self.kind in ("postgres", "redis"):
            self.wipe()  # drops only the schema (or keys) this test created
        elif self.kind == "jetstream":
            await self._delete_streams()


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("jetstream", marks=pytest.mark.nats),
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    pg_url = request.getfixturevalue("postgres_service") if request.param == "postgres" else None
    redis_url = request.getfixturevalue("redis_service") if request.param == "redis" else None
    nats_url = request.getfixturevalue("nats_service") if request.param == "jetstream" else None
    backend = Backend(request.param, tmp_path, pg_url, redis_url, nats_url)
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
async def log(backend: Backend) -> EventLog:
    return await backend.open()


def ev(topic: str, data: Any, **kwargs: Any) -> Event:
    return Event(topic=topic, data=data, **kwargs)


async def read_all(log: EventLog, topic: str) -> list[Event]:
    """Every retained event of a topic, paging forward."""
    out: list[Event] = []
    after = 0
    while True:
        page = await log.read(topic, after=after, limit=97)
        if not page:
            return out
        out.extend(page)
        last = page[-1].offset
        assert last is not None
        after = last


def offsets(events: list[Event]) -> list[int]:
    out = [e.offset for e in events]
    assert None not in out
    return out  # type: ignore[return-value]


# -- offsets ----------------------------------------------------------------------------


async def test_offsets_are_monotonic_without_gaps(log: EventLog) -> None:
    first = await log.append([ev("a", 1), ev("a", 2), ev("b", "x"), ev("a", 3), ev("c", None)])
    assert [(e.topic, e.offset) for e in first] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("a", 3),
        ("c", 1),
    ]
    assert [e.data for e in first] == [1, 2, "x", 3, None]
    second = await log.append([ev("b", "y"), ev("a", 4)])
    third = await log.append([ev("a", 5)])
    assert offsets(second) == [2, 4]
    assert offsets(third) == [5]
    stored = await read_all(log, "a")
    assert offsets(stored) == [1, 2, 3, 4, 5]
    assert [e.data for e in stored] == [1, 2, 3, 4, 5]
    assert [e.id for e in stored] == [
        first[0].id,
        first[1].id,
        first[3].id,
        second[1].id,
        *[e.id for e in third],
    ]
    epochs = {e.epoch for e in (*first, *second, *third) if e.topic == "a"}
    assert epochs == {(await log.position("a")).epoch}
    assert (await log.position("a")).offset == 5
    assert (await log.position("b")).offset == 2
    assert offsets(await read_all(log, "b")) == [1, 2]
    assert [e.data for e in await read_all(log, "c")] == [None]
    assert await log.append([]) == []


async def test_stored_events_round_trip(log: EventLog) -> None:
    data = {"n": 1, "s": "é", "l": [1, 2.5, None, True]}
    [json_event, raw_event] = await log.append(
        [ev("t", data, tags={"k": "v"}), ev("t", b"\x00\xffraw")]
    )
    [json_read, raw_read] = await log.read("t")
    assert json_read.data == data
    assert dict(json_read.tags) == {"k": "v"}
    assert json_read.id == json_event.id
    assert json_read.time == json_event.time
    assert json_read.epoch == json_event.epoch
    assert raw_read.data == b"\x00\xffraw"
    assert raw_read.id == raw_event.id
    assert dict(raw_read.tags) == {}


async def test_page_mixing_plain_and_rare_fields(log: EventLog) -> None:
    # A page where common events (JSON data, no tags, no key) sit between
    # events with tags, raw bytes and an idempotency key: every field survives,
    # forward and reverse.
    tags = {"q": 'a"b\\c', "u": "é", "n": "\n"}
    sent = await log.append(
        [
            ev("t", {"i": 1}),
            ev("t", {"i": 2}, tags=tags),
            ev("t", b"\x00raw\n", idempotency_key="k-1"),
            ev("t", {"i": 4}),
        ]
    )
    for page in (await log.read("t"), list(reversed(await log.read("t", reverse=True)))):
        assert [e.offset for e in page] == [1, 2, 3, 4]
        assert [e.id for e in page] == [e.id for e in sent]
        assert [e.data for e in page] == [{"i": 1}, {"i": 2}, b"\x00raw\n", {"i": 4}]
        assert [dict(e.tags) for e in page] == [{}, tags, {}, {}]
        assert [e.idempotency_key for e in page] == [None, None, "k-1", None]
        assert [e.encoded_data() for e in page][1] == b'{"i":2}'
    assert [e.offset for e in await log.read("t", after=1, before=4)] == [2, 3]


# -- atomicity ---------------------------------------------------------------------------


async def test_large_batch_keeps_every_event_in_order(log: EventLog) -> None:
    # 299 events in one append, beside smaller ones on two topics: any
    # chunking of the inserts (SQLite writes 256, 32, 4 and 1 rows a
    # statement) keeps every event, its data and its place.
    batch = [ev("big", {"i": i}) for i in range(299)]
    small = [ev("big", {"i": 299}), ev("other", {"j": 0})]
    first, second = await asyncio.gather(log.append(batch), log.append(small))
    assert sorted(e.offset for e in first + second[:1]) == list(range(1, 301))
    stored = await read_all(log, "big")
    assert [e.offset for e in stored] == list(range(1, 301))
    by_id = {e.id: e.data for e in batch + small}
    assert all(by_id[e.id] == e.data for e in stored)
    assert [e.data for e in await read_all(log, "other")] == [{"j": 0}]


async def test_batch_with_unencodable_event_stores_nothing(log: EventLog) -> None:
    await log.append([ev("a", 1)])
    with pytest.raises(EncodeError):
        await log.append([ev("a", 2), ev("b", 3), ev("a", object())])
    assert offsets(await read_all(log, "a")) == [1]
    assert await read_all(log, "b") == []
    assert (await log.position("a")).offset == 1
    assert (await log.position("b")).offset == 0
    assert offsets(await log.append([ev("a", 4), ev("b", 5)])) == [2, 1]


async def test_store_failure_stores_nothing(backend: Backend, log: EventLog) -> None:
    await log.append([ev("a", 1), ev("a", 2)])
    backend.poison()
    with pytest.raises(LogError) as info:
        await log.append([ev("a", 3), ev("new", 4), ev("a", 5, id="poison")])
    assert info.value.__cause__ is not None
    assert offsets(await read_all(log, "a")) == [1, 2]
    assert await read_all(log, "new") == []
    assert (await log.position("a")).offset == 2
    # The log keeps working, and no offset was burnt by the failed batch.
    assert offsets(await log.append([ev("a", 6), ev("new", 7)])) == [3, 1]
    assert [e.data for e in await read_all(log, "a")] == [1, 2, 6]


async def test_group_commit_failure_fails_the_whole_batch_only(
    backend: Backend, log: EventLog
) -> None:
    backend.poison()
    events = [ev("g", i, id="poison") if i == 17 else ev("g", i) for i in range(40)]
    results = await asyncio.gather(*(log.append([e]) for e in events), return_exceptions=True)
    assert isinstance(results[17], LogError)
    ok = {r[0].id: r[0] for r in results if isinstance(r, list)}
    failed = [e for e, r in zip(events, results, strict=True) if not isinstance(r, list)]
    assert all(isinstance(r, list | LogError) for r in results)
    stored = await read_all(log, "g")
    # Every acknowledged event is stored, no failed one is, and offsets have no gap.
    assert {e.id for e in stored} == set(ok)
    assert not {e.id for e in failed} & {e.id for e in stored}
    assert offsets(stored) == list(range(1, len(ok) + 1))
    for event in stored:
        assert ok[event.id].offset == event.offset


# -- retention --------------------------------------------------------------------------


async def test_retention_by_count(log: EventLog) -> None:
    log.set_retention(lambda topic: Retention(size=3))
    for i in range(1, 6):
        await log.append([ev("a", i)])
    await log.append([ev("b", i) for i in range(1, 8)])
    assert [e.data for e in await read_all(log, "a")] == [3, 4, 5]
    assert offsets(await read_all(log, "b")) == [5, 6, 7]
    assert await log.earliest("a") == 3
    assert offsets(await log.read("a", reverse=True)) == [5, 4, 3]
    assert offsets(await log.read("a", after=0, limit=2)) == [3, 4]
    assert offsets(await log.read("b", reverse=True, before=6)) == [5]
    assert await log.prune() >= 0
    assert offsets(await read_all(log, "a")) == [3, 4, 5]
    assert (await log.position("a")).offset == 5
    assert offsets(await log.append([ev("a", 6)])) == [6]
    assert offsets(await read_all(log, "a")) == [4, 5, 6]


async def test_retention_by_age(log: EventLog) -> None:
    log.set_retention(lambda topic: Retention(size=100, ttl=60))
    old = time.time() - 3600
    await log.append([ev("a", 1, time=old), ev("a", 2, time=old + 1)])
    await log.append([ev("a", 3), ev("a", 4), ev("a", 5)])
    assert [e.data for e in await read_all(log, "a")] == [3, 4, 5]
    assert await log.earliest("a") == 3
    assert offsets(await log.read("a", reverse=True, limit=10)) == [5, 4, 3]
    before = await log.position("a")
    assert before.offset == 5
    # An hour later, everything is past its age: the stream is forgotten, and
    # starts again from offset 1 under another epoch, so a client at (5, old
    # epoch) cannot believe it resumed.
    removed = await log.prune(time.time() + 3600)
    assert removed >= 3
    assert await read_all(log, "a") == []
    assert await log.earliest("a") is None
    after = await log.position("a")
    assert after.offset == 0
    assert after.epoch != before.epoch
    [event] = await log.append([ev("a", 6)])
    assert (event.offset, event.epoch) == (1, after.epoch)
    assert offsets(await read_all(log, "a")) == [1]


async def test_positions_of_unknown_topics_store_nothing(backend: Backend, log: EventLog) -> None:
    # A thousand random names, as a client subscribing to never-published
    # channels would ask: no row, key or in-memory entry is left behind.
    names = [f"rnd.{secrets.token_hex(8)}" for _ in range(1000)]
    positions = []
    for start in range(0, len(names), 100):
        positions += await asyncio.gather(*(log.position(n) for n in names[start : start + 100]))
    assert {p.offset for p in positions} == {0}
    assert all(isinstance(p.epoch, str) and p.epoch for p in positions)
    assert len({p.epoch for p in positions}) > 990  # derived per topic, not one shared value
    assert await backend.stored_topics(log) == set()
    # Stable: asked again, the same epochs.
    assert await asyncio.gather(*(log.position(n) for n in names[:50])) == positions[:50]
    assert await log.read(names[0]) == []
    assert await log.earliest(names[0]) is None
    assert await log.lookup(names[0], "k") is None
    assert await backend.stored_topics(log) == set()


async def test_prune_forgets_streams_without_events(backend: Backend, log: EventLog) -> None:
    log.set_retention(lambda topic: Retention(size=10, ttl=60))
    old = time.time() - 3600
    await log.append([ev("keep", 1), ev("keep", 2)])
    await log.append([ev("aged", 1, time=old), ev("aged", 2, time=old, idempotency_key="k")])
    await log.append([ev("cut", 1, idempotency_key="k")])
    await log.truncate("cut")
    await log.truncate("zero")  # a stream created by truncation alone
    before = {t: await log.position(t) for t in ("keep", "aged", "cut", "zero")}
    assert await backend.stored_topics(log) >= {"keep", "aged", "cut", "zero"}
    await log.prune()
    # Only the stream that still holds events is left, untouched.
    assert await backend.stored_topics(log) == {"keep"}
    assert await log.position("keep") == before["keep"]
    assert [e.data for e in await read_all(log, "keep")] == [1, 2]
    # The others are forgotten: offset 0 under an epoch none of their clients holds.
    for topic in ("aged", "cut", "zero"):
        after = await log.position(topic)
        assert after.offset == 0
        assert after.epoch != before[topic].epoch
        assert await log.read(topic) == []
        assert await log.lookup(topic, "k") is None
    fresh = await log.position("aged")
    [event] = await log.append([ev("aged", 3, idempotency_key="k")])
    assert (event.offset, event.epoch, event.data) == (1, fresh.epoch, 3)


async def test_a_forgotten_stream_never_comes_back_under_an_old_epoch(log: EventLog) -> None:
    log.set_retention(lambda topic: Retention(size=10, ttl=60))
    seen: list[str] = []
    for generation in range(3):
        empty = await log.position("g")
        assert empty.offset == 0
        # A client that saw (0, empty epoch) before the first publication
        # resumes exactly: the stream is born under that epoch.
        [event] = await log.append([ev("g", generation)])
        assert (event.offset, event.epoch) == (1, empty.epoch)
        seen.append(empty.epoch)
        assert await log.prune(time.time() + 3600) >= 1
    assert len(set(seen)) == 3
    assert (await log.position("g")).epoch not in seen


def _same_bucket_names() -> tuple[str, str, str]:
    """Two names that share a generation bucket, and one that does not."""
    first: dict[int, str] = {}
    for i in itertools.count():
        name = f"mate.{i}"
        bucket = epoch_bucket(name)
        if bucket in first:
            others = (f"solo.{j}" for j in itertools.count())
            return first[bucket], name, next(o for o in others if epoch_bucket(o) != bucket)
        first[bucket] = name
    raise AssertionError("unreachable")


async def test_a_birth_moves_the_empty_epochs_of_its_bucket_only(
    backend: Backend, log: EventLog
) -> None:
    born, mate, other = _same_bucket_names()
    mate_before = await log.position(mate)
    other_before = await log.position(other)
    await log.append([ev(born, 1)])
    # The documented price of keeping no state: the never-written topics of
    # the same bucket get a new empty epoch (a spurious "not recovered",
    # never a false "recovered"); the others keep theirs.
    mate_after = await log.position(mate)
    assert mate_after.offset == 0
    assert mate_after.epoch != mate_before.epoch
    assert await log.position(other) == other_before
    assert await backend.stored_topics(log) == {born}
    [event] = await log.append([ev(mate, 1)])
    assert event.epoch == mate_after.epoch


async def test_earliest_of_unknown_and_empty_topics(log: EventLog) -> None:
    assert await log.earliest("never") is None
    await log.position("empty")
    assert await log.earliest("empty") is None


# -- paging -------------------------------------------------------------------------------


async def test_forward_and_reverse_paging(log: EventLog) -> None:
    await log.append([ev("p", i) for i in range(1, 11)])
    assert offsets(await log.read("p", limit=3)) == [1, 2, 3]
    assert offsets(await log.read("p", after=3, limit=3)) == [4, 5, 6]
    assert offsets(await log.read("p", after=8)) == [9, 10]
    assert await log.read("p", after=10) == []
    assert offsets(await log.read("p", after=1, before=5)) == [2, 3, 4]
    assert await log.read("p", after=4, before=5) == []
    assert offsets(await log.read("p", reverse=True, limit=3)) == [10, 9, 8]
    assert offsets(await log.read("p", reverse=True, before=8, limit=3)) == [7, 6, 5]
    assert offsets(await log.read("p", reverse=True, after=5, before=9)) == [8, 7, 6]
    assert offsets(await log.read("p", reverse=True, before=2)) == [1]
    assert await log.read("p", reverse=True, before=1) == []
    assert offsets(await log.read("p", reverse=True, before=100, limit=2)) == [10, 9]
    assert await log.read("p", limit=0) == []
    assert await log.read("p", reverse=True, limit=0) == []
    assert await log.read("unknown") == []
    assert await log.read("unknown", reverse=True) == []

    forward: list[int] = []
    after = 0
    while page := await log.read("p", after=after, limit=4):
        forward += offsets(page)
        after = page[-1].offset or 0
    assert forward == list(range(1, 11))

    backward: list[int] = []
    before: int | None = None
    while page := await log.read("p", before=before, limit=4, reverse=True):
        backward += offsets(page)
        before = page[-1].offset
    assert backward == list(range(10, 0, -1))


# -- idempotency --------------------------------------------------------------------------


async def test_idempotent_repeat_returns_the_original(log: EventLog) -> None:
    [first] = await log.append([ev("i", {"v": 1}, idempotency_key="k")])
    [repeat] = await log.append([ev("i", {"v": 2}, idempotency_key="k")])
    assert repeat.offset == first.offset == 1
    assert repeat.id == first.id
    assert repeat.data == {"v": 1}
    assert repeat.epoch == first.epoch
    assert repeat.idempotency_key == "k"
    stored = await read_all(log, "i")
    assert [(e.id, e.data) for e in stored] == [(first.id, {"v": 1})]
    found = await log.lookup("i", "k")
    assert found is not None
    assert (found.id, found.offset, found.data) == (first.id, 1, {"v": 1})
    assert await log.lookup("i", "other") is None
    assert await log.lookup("nowhere", "k") is None
    # Unkeyed events and other keys still store.
    assert offsets(await log.append([ev("i", 3), ev("i", 4, idempotency_key="k2")])) == [2, 3]


async def test_repeat_within_one_batch_and_across_topics(log: EventLog) -> None:
    out = await log.append(
        [
            ev("i", "a", idempotency_key="k"),
            ev("i", "b", idempotency_key="k"),
            ev("j", "c", idempotency_key="k"),
            ev("i", "d"),
        ]
    )
    assert [(e.topic, e.offset, e.data) for e in out] == [
        ("i", 1, "a"),
        ("i", 1, "a"),
        ("j", 1, "c"),
        ("i", 2, "d"),
    ]
    assert out[1].id == out[0].id
    assert out[2].id != out[0].id
    assert [e.data for e in await read_all(log, "i")] == ["a", "d"]
    assert [e.data for e in await read_all(log, "j")] == ["c"]


async def test_concurrent_repeats_store_once(log: EventLog) -> None:
    results = await asyncio.gather(
        *(log.append([ev("i", n, idempotency_key="same")]) for n in range(20))
    )
    ids = {r[0].id for r in results}
    assert len(ids) == 1
    assert {r[0].offset for r in results} == {1}
    assert len(await read_all(log, "i")) == 1


async def test_key_is_forgotten_after_the_dedup_window(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [time.time()]
    monkeypatch.setattr(backend.module, "now", lambda: clock[0])
    log = await backend.open(dedup_window=30.0)
    [first] = await log.append([ev("i", 1, idempotency_key="k")])
    clock[0] += 29
    [repeat] = await log.append([ev("i", 2, idempotency_key="k")])
    assert repeat.id == first.id
    assert await log.lookup("i", "k") is not None
    clock[0] += 2  # past the window
    assert await log.lookup("i", "k") is None
    [again] = await log.append([ev("i", 3, idempotency_key="k")])
    assert again.offset == 2
    assert again.id != first.id
    assert [e.data for e in await read_all(log, "i")] == [1, 3]
    found = await log.lookup("i", "k")
    assert found is not None
    assert found.id == again.id


# -- epochs --------------------------------------------------------------------------------


async def test_position_of_an_empty_topic(log: EventLog) -> None:
    position = await log.position("fresh")
    assert position.offset == 0
    assert isinstance(position.epoch, str)
    assert position.epoch
    assert await log.position("fresh") == position
    assert await log.read("fresh") == []
    [event] = await log.append([ev("fresh", 1)])
    assert event.offset == 1
    assert event.epoch == position.epoch


async def test_truncate_starts_a_new_epoch(log: EventLog) -> None:
    await log.append([ev("t", i, idempotency_key=f"k{i}") for i in range(3)])
    before = await log.position("t")
    position = await log.truncate("t")
    assert position.epoch != before.epoch
    assert position.offset == before.offset == 3
    assert await log.position("t") == position
    assert await log.read("t") == []
    assert await log.earliest("t") is None
    assert await log.lookup("t", "k0") is None
    [event] = await log.append([ev("t", "new", idempotency_key="k0")])
    assert (event.offset, event.epoch) == (4, position.epoch)
    assert offsets(await read_all(log, "t")) == [4]
    fresh = await log.truncate("never-written")
    assert fresh.offset == 0
    assert (await log.position("never-written")) == fresh


async def test_wiped_store_starts_a_new_epoch(backend: Backend) -> None:
    log = await backend.open()
    await log.append([ev("w", 1), ev("w", 2)])
    old = await log.position("w")
    await log.close()
    backend.wipe()
    log = await backend.open()
    fresh = await log.position("w")
    assert fresh.offset == 0
    assert fresh.epoch != old.epoch
    assert await log.read("w") == []
    [event] = await log.append([ev("w", 3)])
    assert (event.offset, event.epoch) == (1, fresh.epoch)


async def test_reopened_store_keeps_epoch_and_offsets(backend: Backend) -> None:
    if not backend.durable:
        pytest.skip("nothing survives a memory log")
    log = await backend.open()
    stored = await log.append([ev("r", 1), ev("r", 2, idempotency_key="k")])
    position = await log.position("r")
    await log.close()
    log = await backend.open()
    assert await log.position("r") == position
    assert [(e.id, e.data) for e in await read_all(log, "r")] == [(e.id, e.data) for e in stored]
    [repeat] = await log.append([ev("r", 9, idempotency_key="k")])
    assert repeat.id == stored[1].id
    [event] = await log.append([ev("r", 3)])
    assert (event.offset, event.epoch) == (3, position.epoch)


# -- concurrency ---------------------------------------------------------------------------


async def test_concurrent_appenders(log: EventLog) -> None:
    log.set_retention(lambda topic: Retention(size=10_000))

    async def appender(task: int) -> list[Event]:
        out: list[Event] = []
        for i in range(50):
            out += await log.append([ev("c", {"task": task, "i": i})])
        return out

    results = await asyncio.gather(*(appender(task) for task in range(20)))
    acked = [e for events in results for e in events]
    for events in results:  # each task saw its own appends in order
        assert offsets(events) == sorted(offsets(events))
    stored = await read_all(log, "c")
    assert offsets(stored) == list(range(1, 1001))
    assert len({e.id for e in stored}) == 1000
    assert {e.id: e.offset for e in stored} == {e.id: e.offset for e in acked}
    assert sorted((e.data["task"], e.data["i"]) for e in stored) == [
        (t, i) for t in range(20) for i in range(50)
    ]
    assert (await log.position("c")).offset == 1000


# -- dead letters ---------------------------------------------------------------------------


def letter(n: int) -> DeadLetter:
    return DeadLetter(
        event=Event(topic=f"dl.{n}", data={"n": n}, tags={"t": str(n)}),
        subscriber=f"sub{n}",
        reason="handler_error",
        attempts=n,
        error=None if n == 2 else f"boom {n}",
        time=1_700_000_000.5 + n,
        id=n,
    )


def summary(letters: list[DeadLetter]) -> list[tuple[Any, ...]]:
    return [
        (
            d.id,
            d.subscriber,
            d.reason,
            d.attempts,
            d.error,
            d.time,
            d.event.topic,
            d.event.id,
            d.event.data,
            dict(d.event.tags),
        )
        for d in letters
    ]


async def test_dead_letters(backend: Backend) -> None:
    log = await backend.open()
    letters = [letter(n) for n in (1, 2, 3)]
    await log.save_dead_letters(letters)
    assert summary(await log.load_dead_letters(10)) == summary(letters)
    assert summary(await log.load_dead_letters(2)) == summary(letters[1:])
    assert await log.load_dead_letters(0) == []
    if backend.durable:
        await log.close()
        log = await backend.open()
        assert summary(await log.load_dead_letters(10)) == summary(letters)
    await log.delete_dead_letters([1, 3])
    assert summary(await log.load_dead_letters(10)) == summary(letters[1:2])
    await log.delete_dead_letters([])
    await log.delete_dead_letters([99])
    assert [d.id for d in await log.load_dead_letters(10)] == [2]


# -- health ----------------------------------------------------------------------------------


async def test_check_and_close(backend: Backend) -> None:
    log = await backend.open()
    await log.check()
    await log.open()  # idempotent
    await log.append([ev("h", 1)])
    await log.close()
    await log.close()  # idempotent
    with pytest.raises(LogError):
        await log.check()
    if backend.durable:
        with pytest.raises(LogError):
            await log.append([ev("h", 2)])
        with pytest.raises(LogError):
            await log.read("h")


async def test_context_manager(backend: Backend) -> None:
    async with backend.make() as log:
        [event] = await log.append([ev("cm", 1)])
        assert event.offset == 1
    with pytest.raises(LogError):
        await log.check()
