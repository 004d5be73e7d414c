"""The bus on a durable log: commit before fan-out, history, resume, failures, dead letters.

Every store-dependent test runs on memory, SQLite (a file under ``tmp_path``) and
PostgreSQL (a schema of its own, dropped afterwards) unless it only makes sense
for a store that survives the bus (then SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import re
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from eventcast import (
    EARLIEST,
    Bus,
    BusClosedError,
    ConfigurationError,
    EncodeError,
    Event,
    History,
    LogError,
    Namespace,
    Position,
    PositionError,
    Subscription,
    SubscriptionClosedError,
)
from eventcast.exceptions import UnrecoverablePositionError
from eventcast.log import EventLog, MemoryLog, open_log
from tests.conftest import RUN_ID

SAFETY = 10.0  # a safety net only: every wait below ends on an event long before

#: ``d:`` topics keep 100 events, ``small:`` topics 3; anything else is live-only.
NAMESPACES = {"d": Namespace(history_size=100), "small": Namespace(history_size=3)}

_schemas = itertools.count()


class Store:
    """Where one test's logs live: builds logs (or URLs) on it, and drops it afterwards."""

    def __init__(self, kind: str, tmp_path: Path, pg_url: str | None) -> None:
        self.kind = kind
        self.path = tmp_path / "events.db"
        self.pg_url = pg_url
        self.schema = f"ecbus_{RUN_ID}_{next(_schemas)}"

    @property
    def persistent(self) -> bool:
        return self.kind != "memory"

    @property
    def url(self) -> str:
        if self.kind == "memory":
            return "memory://"
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"  # tmp_path is absolute: sqlite:////tmp/…
        return f"{self.pg_url}?schema={self.schema}"

    def log(self) -> EventLog:
        return MemoryLog() if self.kind == "memory" else open_log(self.url)

    def bus(self, log: EventLog | str | None = None, **kwargs: Any) -> Bus:
        kwargs.setdefault("namespaces", NAMESPACES)
        return Bus(log=self.log() if log is None else log, **kwargs)

    def sql(self, statement: str) -> None:
        """Run one statement on the store behind the bus's back."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                conn.execute(statement)
                conn.commit()
        else:
            assert self.pg_url is not None
            with psycopg.connect(self.pg_url, autocommit=True) as conn:
                conn.execute(statement.replace("{s}", f'"{self.schema}"'))

    def drop(self) -> None:
        if self.kind == "postgres":
            assert self.pg_url is not None
            with psycopg.connect(self.pg_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


def _store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind = request.param
    pg_url = request.getfixturevalue("postgres_service") if kind == "postgres" else None
    store = Store(kind, tmp_path, pg_url)
    try:
        yield store
    finally:
        store.drop()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every kind of log."""
    yield from _store(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def persistent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The logs that outlive a bus."""
    yield from _store(request, tmp_path)


class Calls(list[Event]):
    """A handler callback that records the events it was called with, and can be awaited."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.append(event)
        self.changed.set()

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(SAFETY):
            while len(self) < n:
                self.changed.clear()
                await self.changed.wait()


async def sh(*args: str) -> None:
    """Run a command (mount, umount) without blocking the loop; fail if it fails."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


def drain(sub: Subscription) -> list[Event]:
    out: list[Event] = []
    while (event := sub.get_nowait()) is not None:
        out.append(event)
    return out


def offsets(events: list[Event]) -> list[int | None]:
    return [e.offset for e in events]


async def fill(bus: Bus, topic: str, n: int) -> list[Event]:
    return [await bus.publish(topic, i) for i in range(1, n + 1)]


async def history_of(bus: Bus, topic: str) -> list[Event]:
    """Every event a durable topic keeps, paged forward 2 at a time."""
    out: list[Event] = []
    since: int | None = None
    while True:
        page = await bus.history(topic, since=since, limit=2)
        if not page.events:
            return out
        out.extend(page.events)
        since = page.events[-1].offset


# -- durable publish ------------------------------------------------------------


async def test_a_durable_publish_returns_offset_and_epoch_per_topic(store: Store) -> None:
    async with store.bus() as bus:
        durable = bus.subscribe("d:a", maxsize=100)
        live = bus.subscribe("live.x", maxsize=100)
        a = [await bus.publish("d:a", {"n": i}) for i in range(3)]
        b = await bus.publish("d:b", "first of b")
        x = await bus.publish("live.x", "live")
        assert offsets(a) == [1, 2, 3]
        epoch = a[0].epoch
        assert isinstance(epoch, str)
        assert epoch
        assert {e.epoch for e in a} == {epoch}
        assert [e.position for e in a] == [Position(i, epoch) for i in (1, 2, 3)]
        assert b.offset == 1  # another topic has its own stream
        assert b.epoch is not None
        assert x.offset is None
        assert x.epoch is None
        assert x.position is None
        got = drain(durable)
        assert offsets(got) == [1, 2, 3]
        assert [e.id for e in got] == [e.id for e in a]
        assert [e.data for e in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert drain(live) == [x]
        assert await bus.position("d:a") == Position(3, epoch)
        assert await bus.position("d:b") == Position(1, b.epoch)
        with pytest.raises(ConfigurationError):
            await bus.position("live.x")


async def test_the_commit_happens_before_the_fan_out(store: Store) -> None:
    log = store.log()
    async with store.bus(log) as bus:
        sub = bus.subscribe("d:a", maxsize=10)
        seen: list[tuple[int, int, list[int | None]]] = []
        # What the bus awaits for a plain durable publish: the commit, then
        # ``then`` with the committed events, which fans them out.
        append_then = log._append_then

        async def spy(event: Event, then: Any) -> Event:
            before = sub.buffered

            def fan_out(committed: list[Event]) -> None:
                # Committed (the store answered), and still nothing fanned out.
                seen.append((before, sub.buffered, offsets(committed)))
                then(committed)

            return await append_then(event, fan_out)

        log._append_then = spy  # type: ignore[method-assign]
        first = await bus.publish("d:a", 1)
        assert seen == [(0, 0, [1])]
        assert sub.buffered == 1
        assert drain(sub) == [first]
        # The event a subscriber received is already readable from the store.
        kept = await log.read("d:a", after=0)
        assert [e.id for e in kept] == [first.id]


async def test_publish_repeated_with_an_idempotency_key_stores_and_delivers_once(
    store: Store,
) -> None:
    async with store.bus() as bus:
        sub = bus.subscribe("d:a", maxsize=10)
        first = await bus.publish("d:a", {"v": 1}, idempotency_key="k1")
        again = await bus.publish("d:a", {"v": 2}, idempotency_key="k1")
        other = await bus.publish("d:a", {"v": 3}, idempotency_key="k2")
        assert (again.id, again.offset, again.epoch, again.data) == (
            first.id,
            first.offset,
            first.epoch,
            {"v": 1},
        )
        assert again.idempotency_key == "k1"
        assert other.offset == 2
        got = drain(sub)
        assert [e.id for e in got] == [first.id, other.id]
        kept = await history_of(bus, "d:a")
        assert [(e.offset, e.data) for e in kept] == [(1, {"v": 1}), (2, {"v": 3})]
        assert bus.statistics()["published"] == 2


async def test_publish_nowait_refuses_a_durable_topic(store: Store) -> None:
    async with store.bus() as bus:
        sub = bus.subscribe("d:a", maxsize=10)
        with pytest.raises(ConfigurationError, match="durable"):
            bus.publish_nowait("d:a", 1)
        assert drain(sub) == []
        assert (await bus.history("d:a")).events == []
        assert bus.publish_nowait("live.x", 1).offset is None


async def test_publish_many_commits_the_durable_events_of_a_mixed_batch(store: Store) -> None:
    async with store.bus() as bus:
        durable = bus.subscribe("d:a", maxsize=10)
        live = bus.subscribe("live.x", maxsize=10)
        events = await bus.publish_many(
            [("d:a", 1), ("live.x", 2), ("d:b", 3), ("d:a", 4), ("live.x", 5)]
        )
        assert [(e.topic, e.offset) for e in events] == [
            ("d:a", 1),
            ("live.x", None),
            ("d:b", 1),
            ("d:a", 2),
            ("live.x", None),
        ]
        assert [e.data for e in drain(durable)] == [1, 4]
        assert [e.data for e in drain(live)] == [2, 5]
        assert [e.data for e in await history_of(bus, "d:a")] == [1, 4]
        assert [e.data for e in await history_of(bus, "d:b")] == [3]


async def test_a_batch_with_an_unencodable_durable_event_stores_and_delivers_nothing(
    store: Store,
) -> None:
    async with store.bus() as bus:
        await bus.publish("d:a", "before")
        durable = bus.subscribe("d:a", maxsize=10)
        live = bus.subscribe("live.x", maxsize=10)
        with pytest.raises(EncodeError):
            await bus.publish_many([("d:a", 1), ("live.x", 2), ("d:a", object()), ("d:b", 3)])
        with pytest.raises(EncodeError):
            await bus.publish("d:a", object())
        assert drain(durable) == []
        assert drain(live) == []
        assert [e.data for e in await history_of(bus, "d:a")] == ["before"]
        assert (await bus.position("d:a")).offset == 1
        assert (await bus.position("d:b")).offset == 0
        # The stream carries on with no hole in its offsets.
        assert (await bus.publish("d:a", "after")).offset == 2
        assert offsets(drain(durable)) == [2]


# -- failures of the log ----------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_publish_raises_log_error_when_the_postgres_server_is_unreachable(
    postgres_service: str,
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/test?schema=ecbus_{RUN_ID}_down"
    bus = Bus(log=url, namespaces=NAMESPACES)
    try:
        durable = bus.subscribe("d:a", maxsize=10)
        live = bus.subscribe("live.x", maxsize=10)
        calls = Calls()
        bus.on("d:a", calls, id="handler")
        with pytest.raises(LogError):
            await bus.publish("d:a", 1)
        with pytest.raises(LogError):
            await bus.publish("d:a", 2, ack=True, timeout=1)
        with pytest.raises(LogError):
            await bus.publish_many([("live.x", "in a batch"), ("d:a", 3)])
        with pytest.raises(LogError):
            await bus.history("d:a")
        assert drain(durable) == []
        assert calls == []
        # Live-only topics do not need the log.
        sent = await bus.publish("live.x", "still here")
        assert drain(live) == [sent]
        assert bus.statistics()["published"] == 1
    finally:
        await bus.close()
    assert calls == []


async def test_publish_fails_loudly_when_the_store_rejects_writes(persistent: Store) -> None:
    async with persistent.bus() as bus:
        durable = bus.subscribe("d:a", maxsize=10)
        live = bus.subscribe("live.x", maxsize=10)
        calls = Calls()
        handler = bus.on("d:a", calls, id="handler")
        ok = await bus.publish("d:a", "kept")
        await calls.wait_for(1)
        if persistent.kind == "sqlite":
            persistent.sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON ec_events "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        else:
            persistent.sql("ALTER TABLE {s}.events ADD CONSTRAINT refuse CHECK (false) NOT VALID")
        with pytest.raises(LogError):
            await bus.publish("d:a", "lost")
        with pytest.raises(LogError):
            await bus.publish("d:a", "lost with ack", ack=True, timeout=1)
        with pytest.raises(LogError):
            await bus.publish_many([("live.x", "not sent"), ("d:a", "lost in a batch")])
        assert drain(durable) == [ok]
        assert calls == [ok]
        assert (handler.processed, handler.failed) == (1, 0)
        # Reading back: only what was acknowledged is there.
        assert [e.data for e in await history_of(bus, "d:a")] == ["kept"]
        assert await bus.position("d:a") == ok.position
        sent = await bus.publish("live.x", "live")
        assert drain(live) == [sent]
        # Once the store accepts writes again, the stream resumes with no hole.
        if persistent.kind == "sqlite":
            persistent.sql("DROP TRIGGER refuse")
        else:
            persistent.sql("ALTER TABLE {s}.events DROP CONSTRAINT refuse")
        again = await bus.publish("d:a", "again")
        assert again.offset == 2
        assert drain(durable) == [again]


async def test_publish_raises_log_error_after_the_log_was_closed(persistent: Store) -> None:
    log = persistent.log()
    async with persistent.bus(log) as bus:
        sub = bus.subscribe("d:a", maxsize=10)
        live = bus.subscribe("live.x", maxsize=10)
        await bus.publish("d:a", 1)
        await log.close()
        with pytest.raises(LogError):
            await bus.publish("d:a", 2)
        assert offsets(drain(sub)) == [1]
        sent = await bus.publish("live.x", 3)
        assert drain(live) == [sent]
    async with persistent.bus() as bus:
        assert [e.data for e in await history_of(bus, "d:a")] == [1]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards (skipped where mounting is not permitted)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file until the file system is full; return it."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    error: OSError | None = None
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            error = exc
    assert error is not None
    assert error.errno == errno.ENOSPC
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # and the last partial page
            f.write(b"\0")
    return filler


async def test_a_full_disk_makes_publish_fail_loudly_and_never_ack(tmpfs: Path) -> None:
    url = f"sqlite:///{tmpfs / 'events.db'}"
    async with Bus(log=url, namespaces=NAMESPACES) as bus:
        durable = bus.subscribe("d:a", maxsize=10)
        live = bus.subscribe("live.x", maxsize=10)
        calls = Calls()
        handler = bus.on("d:a", calls, id="handler")
        kept = await bus.publish("d:a", "kept")
        await calls.wait_for(1)
        filler = fill_disk(tmpfs)
        big = "x" * 200_000
        with pytest.raises(LogError, match="full"):
            await bus.publish("d:a", big)
        with pytest.raises(LogError):
            await bus.publish("d:a", big, ack=True, timeout=1)
        with pytest.raises(LogError):
            await bus.publish_many([("live.x", "not sent"), ("d:a", big)])
        assert drain(durable) == [kept]
        assert calls == [kept]
        assert handler.failed == 0
        sent = await bus.publish("live.x", "the bus still serves live-only topics")
        assert drain(live) == [sent]
        # Read back on the full disk: the failed publishes are absent.
        assert [e.id for e in await history_of(bus, "d:a")] == [kept.id]
        assert await bus.position("d:a") == kept.position
        filler.unlink()
        after = await bus.publish("d:a", "after")
        assert after.offset == 2
        assert drain(durable) == [after]
    # And in a new bus on the same file.
    async with Bus(log=url, namespaces=NAMESPACES) as bus:
        assert [e.data for e in await history_of(bus, "d:a")] == ["kept", "after"]


async def test_a_read_only_store_fails_loudly_and_acknowledges_nothing(
    tmp_path: Path, tmpfs: Path
) -> None:
    url = f"sqlite:///{tmpfs / 'events.db'}"
    async with Bus(log=url, namespaces=NAMESPACES) as bus:
        kept = await bus.publish("d:a", "kept")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    await sh("mount", "--bind", str(tmpfs), str(readonly))
    try:
        await sh("mount", "-o", "remount,ro,bind", str(readonly))
        ro_url = f"sqlite:///{readonly / 'events.db'}"
        with pytest.raises(LogError):
            async with Bus(log=ro_url, namespaces=NAMESPACES):
                pass
        bus = Bus(log=ro_url, namespaces=NAMESPACES)
        try:
            durable = bus.subscribe("d:a", maxsize=10)
            live = bus.subscribe("live.x", maxsize=10)
            with pytest.raises(LogError):
                await bus.publish("d:a", "lost")
            assert drain(durable) == []
            sent = await bus.publish("live.x", "live")
            assert drain(live) == [sent]
        finally:
            await bus.close()
    finally:
        await sh("umount", "-l", str(readonly))
    async with Bus(log=url, namespaces=NAMESPACES) as bus:
        assert [e.id for e in await history_of(bus, "d:a")] == [kept.id]


async def test_an_unknown_log_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="scheme"):
        Bus(log="mongodb://localhost/events", namespaces=NAMESPACES)
    with pytest.raises(ConfigurationError):
        Bus(log="not a url", namespaces=NAMESPACES)


async def test_a_path_that_cannot_be_written_is_a_log_error_at_start() -> None:
    with pytest.raises(LogError, match=re.escape("/proc/nope/x.db")):
        async with Bus(log="sqlite:////proc/nope/x.db", namespaces=NAMESPACES):
            pass


# -- history ------------------------------------------------------------------------


async def test_history_pages_forward_and_backward(store: Store) -> None:
    async with store.bus() as bus:
        published = await fill(bus, "d:h", 10)
        epoch = published[0].epoch
        assert epoch is not None
        head = Position(10, epoch)
        page = await bus.history("d:h")
        assert isinstance(page, History)
        assert offsets(page.events) == list(range(1, 11))
        assert page.position == head
        assert [e.id for e in page.events] == [e.id for e in published]
        assert [e.data for e in page.events] == list(range(1, 11))
        assert offsets((await bus.history("d:h", limit=3)).events) == [1, 2, 3]
        assert offsets((await bus.history("d:h", since=3, limit=3)).events) == [4, 5, 6]
        by_position = await bus.history("d:h", since=Position(3, epoch), limit=3)
        assert offsets(by_position.events) == [4, 5, 6]
        as_pair = await bus.history("d:h", since=(3, epoch), limit=3)
        assert offsets(as_pair.events) == [4, 5, 6]
        assert (await bus.history("d:h", since=10)).events == []
        assert (await bus.history("d:h", limit=0)).events == []
        newest = await bus.history("d:h", reverse=True, limit=3)
        assert offsets(newest.events) == [10, 9, 8]
        assert newest.position == head
        older = await bus.history("d:h", since=8, reverse=True, limit=3)
        assert offsets(older.events) == [7, 6, 5]
        oldest = await bus.history("d:h", since=Position(3, epoch), reverse=True)
        assert offsets(oldest.events) == [2, 1]
        # Paging forward collects everything, once, in order.
        assert [e.id for e in await history_of(bus, "d:h")] == [e.id for e in published]
        # Paging backward too.
        back: list[Event] = []
        before: int | None = None
        while events := (await bus.history("d:h", since=before, limit=4, reverse=True)).events:
            back.extend(events)
            before = events[-1].offset
        assert offsets(back) == list(range(10, 0, -1))


async def test_history_returns_only_what_is_kept(store: Store) -> None:
    async with store.bus() as bus:
        await fill(bus, "small:h", 10)
        page = await bus.history("small:h")
        assert offsets(page.events) == [8, 9, 10]
        assert page.position.offset == 10
        assert offsets((await bus.history("small:h", since=2)).events) == [8, 9, 10]
        assert offsets((await bus.history("small:h", reverse=True)).events) == [10, 9, 8]
        fresh = await bus.history("d:never")
        assert fresh.events == []
        assert fresh.position.offset == 0


async def test_history_refuses_bad_arguments(store: Store) -> None:
    async with store.bus() as bus:
        event = await bus.publish("d:h", 1)
        assert event.epoch is not None
        other = "0" * 8 if event.epoch != "0" * 8 else "1" * 8
        with pytest.raises(UnrecoverablePositionError, match="epoch"):
            await bus.history("d:h", since=Position(1, other))
        with pytest.raises(LogError):  # an UnrecoverablePositionError is a LogError
            await bus.history("d:h", since=(0, other))
        with pytest.raises(ConfigurationError, match="no history"):
            await bus.history("live.x")
        for bad in [("x", 1), (1,), {"offset": -1, "epoch": event.epoch}, {"offset": 1}, -1]:
            with pytest.raises(PositionError):
                await bus.history("d:h", since=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            await bus.history("d:h", limit=-1)
    with pytest.raises(BusClosedError):
        await bus.history("d:h")


# -- resume ---------------------------------------------------------------------------


async def test_resume_replays_what_was_missed_then_continues_live(store: Store) -> None:
    async with store.bus() as bus:
        published = await fill(bus, "d:r", 6)
        epoch = published[0].epoch
        assert epoch is not None
        sub = bus.subscribe("d:r", since=Position(3, epoch), maxsize=100)
        assert sub.recovered is None
        # Published while the replay is being read: held aside, then delivered after it.
        during = [await bus.publish("d:r", f"during {i}") for i in range(3)]
        assert await asyncio.wait_for(sub.ready(), SAFETY) is True
        assert sub.recovered is True
        after = await bus.publish("d:r", "after")
        got = drain(sub)
        assert offsets(got) == list(range(4, 11))
        assert [e.id for e in got] == [e.id for e in [*published[3:], *during, after]]
        assert [e.data for e in got[:3]] == [4, 5, 6]


async def test_resume_at_the_head_replays_nothing_and_continues_live(store: Store) -> None:
    async with store.bus() as bus:
        published = await fill(bus, "d:r", 3)
        position = published[-1].position
        assert position is not None
        async with bus.subscribe("d:r", since=position) as sub:
            assert sub.recovered is True
            assert drain(sub) == []
            nxt = await bus.publish("d:r", "next")
            assert drain(sub) == [nxt]


async def test_resume_from_offset_zero_replays_everything(store: Store) -> None:
    async with store.bus() as bus:
        position = await bus.position("d:r")
        assert position.offset == 0
        published = await fill(bus, "d:r", 4)
        async with bus.subscribe("d:r", since=position) as sub:
            assert sub.recovered is True
            assert [e.id for e in drain(sub)] == [e.id for e in published]


async def test_a_stream_forgotten_by_prune_is_never_recovered_from_an_old_position(
    store: Store,
) -> None:
    namespaces = {"aged": Namespace(history_size=10, history_ttl=60)}
    async with store.bus(namespaces=namespaces) as bus:
        empty = await bus.position("aged:x")
        first = await fill(bus, "aged:x", 3)
        # Before anything is lost, the empty position resumes exactly.
        async with bus.subscribe("aged:x", since=empty, maxsize=10) as sub:
            assert sub.recovered is True
            assert [e.id for e in drain(sub)] == [e.id for e in first]
        last = first[-1].position
        assert last is not None
        assert bus.log is not None
        # Everything ages out and the stream is forgotten; publishing starts it again.
        assert await bus.log.prune(time.time() + 3600) == 3
        again = await bus.publish("aged:x", "again")
        assert again.offset == 1
        assert again.epoch not in (empty.epoch, last.epoch)
        for since in (empty, last):  # both missed events that are gone
            async with bus.subscribe("aged:x", since=since, maxsize=10) as sub:
                assert sub.recovered is False
                assert drain(sub) == []


async def test_resume_beyond_retention_is_not_recovered_and_replays_nothing(
    store: Store,
) -> None:
    async with store.bus() as bus:
        published = await fill(bus, "small:r", 10)  # keeps 8, 9, 10
        epoch = published[0].epoch
        assert epoch is not None
        sub = bus.subscribe("small:r", since=Position(2, epoch), maxsize=100)
        assert await asyncio.wait_for(sub.ready(), SAFETY) is False
        assert drain(sub) == []
        live = await bus.publish("small:r", "live")
        assert drain(sub) == [live]
        assert live.offset == 11
        # Just inside retention, it is recovered.
        async with bus.subscribe("small:r", since=Position(8, epoch)) as inside:
            assert inside.recovered is True
            assert offsets(drain(inside)) == [9, 10, 11]


async def test_resume_beyond_the_replay_cap_is_not_recovered(store: Store) -> None:
    async with store.bus(replay_cap=5) as bus:
        published = await fill(bus, "d:r", 10)
        epoch = published[0].epoch
        assert epoch is not None
        # Exactly the cap missed: recovered.
        async with bus.subscribe("d:r", since=Position(5, epoch), maxsize=100) as exact:
            assert exact.recovered is True
            assert offsets(drain(exact)) == [6, 7, 8, 9, 10]
        far = bus.subscribe("d:r", since=Position(4, epoch), maxsize=100)  # 6 or 7 missed
        near = bus.subscribe("d:r", since=Position(6, epoch), maxsize=100)  # 4 or 5 missed
        during = await bus.publish("d:r", "during")
        assert await asyncio.wait_for(far.ready(), SAFETY) is False
        assert await asyncio.wait_for(near.ready(), SAFETY) is True
        assert drain(far) == [during]  # nothing partial: only the live event
        assert offsets(drain(near)) == [7, 8, 9, 10, 11]
        after = await bus.publish("d:r", "after")
        assert drain(far) == [after]
        assert drain(near) == [after]


async def test_resume_with_another_epoch_is_not_recovered(store: Store) -> None:
    async with store.bus() as bus:
        published = await fill(bus, "d:r", 3)
        epoch = published[0].epoch
        assert epoch is not None
        other = "0" * 8 if epoch != "0" * 8 else "1" * 8
        async with bus.subscribe("d:r", since=Position(1, other), maxsize=10) as sub:
            assert sub.recovered is False
            assert drain(sub) == []
            live = await bus.publish("d:r", "live")
            assert drain(sub) == [live]


async def test_resume_from_earliest_replays_everything_kept(store: Store) -> None:
    async with store.bus() as bus:
        everything = await fill(bus, "d:e", 5)
        small = await fill(bus, "small:e", 5)
        async with bus.subscribe("d:e", since=EARLIEST, maxsize=100) as sub:
            assert sub.recovered is True
            assert [e.id for e in drain(sub)] == [e.id for e in everything]
        async with bus.subscribe("small:e", since="earliest", maxsize=100) as sub:
            assert sub.recovered is True
            assert [e.id for e in drain(sub)] == [e.id for e in small[2:]]
            live = await bus.publish("small:e", "live")
            assert drain(sub) == [live]
        async with bus.subscribe("d:empty", since=EARLIEST) as sub:
            assert sub.recovered is True
            assert drain(sub) == []


async def test_earliest_on_a_small_replay_cap_still_replays_everything_kept(
    store: Store,
) -> None:
    async with store.bus(replay_cap=2) as bus:
        everything = await fill(bus, "d:e", 5)
        async with bus.subscribe("d:e", since=EARLIEST, maxsize=100) as sub:
            assert sub.recovered is True
            assert [e.id for e in drain(sub)] == [e.id for e in everything]


async def test_resume_beyond_the_head_is_a_position_error(store: Store) -> None:
    async with store.bus() as bus:
        published = await fill(bus, "d:r", 3)
        epoch = published[0].epoch
        assert epoch is not None
        sub = bus.subscribe("d:r", since=Position(7, epoch))
        with pytest.raises(PositionError, match="beyond the head"):
            await asyncio.wait_for(sub.ready(), SAFETY)
        assert sub.closed
        with pytest.raises(PositionError):
            await sub.get()
        other = bus.subscribe("d:r", since=Position(4, epoch))
        with pytest.raises(PositionError):
            await asyncio.wait_for(other.get(), SAFETY)
        with pytest.raises(PositionError):
            async with bus.subscribe("d:r", since=(99, epoch)):
                pass
        assert bus.subscribers() == []


@pytest.mark.parametrize(
    "since",
    [
        ("x", 1),
        (1,),
        (1, 2, 3),
        {"offset": -1, "epoch": "e"},
        {"offset": 1},
        {"offset": 1.5, "epoch": "e"},
        (True, "e"),
        "latest",
        3,
    ],
)
async def test_a_malformed_since_is_a_position_error_at_subscribe(since: object) -> None:
    async with Bus(namespaces=NAMESPACES) as bus:
        with pytest.raises(PositionError):
            bus.subscribe("d:r", since=since)  # type: ignore[arg-type]
        assert bus.subscribers() == []


async def test_since_on_a_pattern_or_a_live_only_topic_is_a_configuration_error() -> None:
    async with Bus(namespaces=NAMESPACES) as bus:
        for topics in ["d:r.*", "d:>", ["d:a", "d:b"], "live.x"]:
            with pytest.raises(ConfigurationError):
                bus.subscribe(topics, since=EARLIEST)
            with pytest.raises(ConfigurationError):
                bus.subscribe(topics, since=Position(0, "e"))
        assert bus.subscribers() == []
    async with Bus() as bus:  # no durable namespace at all
        with pytest.raises(ConfigurationError):
            bus.subscribe("d:r", since=EARLIEST)


def test_since_needs_a_running_loop() -> None:
    bus = Bus(namespaces=NAMESPACES)
    with pytest.raises(ConfigurationError, match="loop"):
        bus.subscribe("d:r", since=EARLIEST)


async def test_a_subscription_without_since_has_no_recovery(store: Store) -> None:
    async with store.bus() as bus:
        sub = bus.subscribe("d:r")
        assert await sub.ready() is None
        async with bus.subscribe("d:r") as other:
            assert other.recovered is None


async def test_closing_a_resuming_subscription_ends_it_cleanly(store: Store) -> None:
    async with store.bus() as bus:
        published = await fill(bus, "d:r", 3)
        epoch = published[0].epoch
        assert epoch is not None
        sub = bus.subscribe("d:r", since=Position(0, epoch))
        sub.close()
        assert await asyncio.wait_for(sub.ready(), SAFETY) is None
        with pytest.raises(SubscriptionClosedError):
            await sub.get()
        # The bus is unharmed: another resume works.
        async with bus.subscribe("d:r", since=Position(1, epoch)) as again:
            assert offsets(drain(again)) == [2, 3]


async def test_a_resumed_subscriber_next_to_a_live_one_on_the_same_ring(store: Store) -> None:
    async with store.bus() as bus:
        plain = bus.subscribe("d:r", maxsize=100)
        published = await fill(bus, "d:r", 4)
        epoch = published[0].epoch
        assert epoch is not None
        resumed = bus.subscribe("d:r", since=Position(2, epoch), maxsize=100)
        during = await bus.publish("d:r", "during")
        assert await asyncio.wait_for(resumed.ready(), SAFETY) is True
        after = await bus.publish("d:r", "after")
        assert offsets(drain(plain)) == [1, 2, 3, 4, 5, 6]
        assert offsets(drain(resumed)) == [3, 4, 5, 6]
        assert during.offset == 5
        assert after.offset == 6
        stats = resumed.statistics()
        assert stats.delivered == 4
        assert stats.dropped == 0


async def test_resume_in_a_new_bus_on_the_same_store(persistent: Store) -> None:
    async with persistent.bus() as bus:
        published = await fill(bus, "d:r", 5)
    last_seen = published[1].position
    assert last_seen is not None
    async with (
        persistent.bus() as bus,
        bus.subscribe("d:r", since=last_seen, maxsize=100) as sub,
    ):
        assert sub.recovered is True
        got = drain(sub)
        assert [e.id for e in got] == [e.id for e in published[2:]]
        assert [e.data for e in got] == [3, 4, 5]
        nxt = await bus.publish("d:r", 6)
        assert nxt.offset == 6
        assert nxt.epoch == last_seen.epoch
        assert drain(sub) == [nxt]


async def test_resume_in_a_new_memory_bus_starts_a_new_epoch() -> None:
    async with Bus(namespaces=NAMESPACES) as bus:
        old = (await fill(bus, "d:r", 3))[-1].position
    assert old is not None
    async with Bus(namespaces=NAMESPACES) as bus:
        async with bus.subscribe("d:r", since=old) as sub:
            assert sub.recovered is False
        with pytest.raises(UnrecoverablePositionError):
            await bus.history("d:r", since=old)


async def test_resume_fails_over_to_live_when_the_log_cannot_be_read(
    persistent: Store,
) -> None:
    log = persistent.log()
    async with persistent.bus(log) as bus:
        published = await fill(bus, "d:r", 3)
        epoch = published[0].epoch
        assert epoch is not None
        await log.close()
        sub = bus.subscribe("d:r", since=Position(1, epoch), maxsize=10)
        assert await asyncio.wait_for(sub.ready(), SAFETY) is False
        assert drain(sub) == []
        assert not sub.closed


# -- dead letters ------------------------------------------------------------------------


async def test_dead_letters_are_stored_in_the_log_and_survive_the_bus(
    persistent: Store,
) -> None:
    async with persistent.bus() as bus:
        bus.subscribe("live.x", id="slow", maxsize=1)
        bus.subscribe("d:a", id="slow-durable", maxsize=1)
        for i in range(3):
            await bus.publish("live.x", {"i": i}, tags={"k": "v"})
            await bus.publish("d:a", i)
        letters = bus.dead_letters.list()
        assert [(d.subscriber, d.event.data) for d in letters] == [
            ("slow", {"i": 0}),
            ("slow-durable", 0),
            ("slow", {"i": 1}),
            ("slow-durable", 1),
        ]
    async with persistent.bus() as bus:
        restored = bus.dead_letters.list()
        assert [(d.id, d.subscriber, d.reason) for d in restored] == [
            (d.id, d.subscriber, d.reason) for d in letters
        ]
        assert [d.event.id for d in restored] == [d.event.id for d in letters]
        assert [d.event.data for d in restored] == [d.event.data for d in letters]
        assert dict(restored[0].event.tags) == {"k": "v"}
        # New records continue the numbering.
        bus.subscribe("live.y", id="slower", maxsize=1)
        await bus.publish("live.y", "a")
        await bus.publish("live.y", "b")
        (newest,) = bus.dead_letters.list(subscriber="slower")
        assert newest.id > max(d.id for d in letters)
        # Redrive the "slow" ones to a subscriber with that id: they leave the store.
        slow = bus.subscribe("live.x", id="slow", maxsize=10)
        assert await bus.dead_letters.redrive(subscriber="slow") == 2
        assert [e.data for e in drain(slow)] == [{"i": 0}, {"i": 1}]
    async with persistent.bus() as bus:
        left = bus.dead_letters.list()
        assert [d.subscriber for d in left] == ["slow-durable", "slow-durable", "slower"]
        durable = bus.subscribe("d:a", id="slow-durable", maxsize=10)
        assert await bus.dead_letters.redrive() == 2
        assert [e.data for e in drain(durable)] == [0, 1]
        bus.dead_letters.clear()
    async with persistent.bus() as bus:
        assert bus.dead_letters.list() == []


async def test_a_dead_letter_removed_right_after_it_was_recorded_is_not_stored(
    persistent: Store,
) -> None:
    async with persistent.bus() as bus:
        bus.subscribe("live.x", id="slow", maxsize=1)
        await bus.publish("live.x", 1)
        await bus.publish("live.x", 2)
        assert len(bus.dead_letters) == 1
        bus.dead_letters.clear()
    async with persistent.bus() as bus:
        assert bus.dead_letters.list() == []


async def test_dead_letters_without_a_log_are_not_stored_anywhere() -> None:
    async with Bus() as bus:
        assert bus.log is None
        bus.subscribe("live.x", id="slow", maxsize=1)
        await bus.publish("live.x", 1)
        await bus.publish("live.x", 2)
        assert len(bus.dead_letters) == 1
        bus.dead_letters.clear()
        assert len(bus.dead_letters) == 0


@pytest.mark.parametrize("resume_after", [4, 5, 6])
async def test_resume_while_this_bus_lags_behind_another_writer(
    postgres_service: str, tmp_path: Path, resume_after: int
) -> None:
    # Two buses on one PostgreSQL log and no backplane: what the other bus
    # publishes reaches this one only through the log (a gap filled on its next
    # publish). A subscriber resumed here in between must not get the replayed
    # events a second time when that gap is filled.
    store = Store("postgres", tmp_path, postgres_service)
    try:
        async with store.bus() as other, store.bus() as bus:
            plain = bus.subscribe("d:r", maxsize=100)
            mine = await fill(bus, "d:r", 4)
            theirs = [await other.publish("d:r", f"other {i}") for i in (5, 6)]
            assert offsets(theirs) == [5, 6]
            epoch = mine[0].epoch
            assert epoch is not None
            resumed = bus.subscribe("d:r", since=Position(resume_after, epoch), maxsize=100)
            assert await asyncio.wait_for(resumed.ready(), SAFETY) is True
            nxt = await bus.publish("d:r", "next")
            assert nxt.offset == 7
            expected = [e.id for e in [*theirs, nxt] if (e.offset or 0) > resume_after]
            got: list[Event] = []
            async with asyncio.timeout(SAFETY):
                while not got or got[-1].id != nxt.id:
                    got.append(await resumed.get())
            assert [e.id for e in got] == expected
            assert offsets(drain(resumed)) == []
            plain_got: list[Event] = []
            async with asyncio.timeout(SAFETY):
                while len(plain_got) < 7:
                    plain_got.append(await plain.get())
            assert offsets(plain_got) == [1, 2, 3, 4, 5, 6, 7]
            after = await bus.publish("d:r", "after")
            assert drain(resumed) == [after]
            assert drain(plain) == [after]
    finally:
        store.drop()
