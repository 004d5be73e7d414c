"""Durable log: append throughput with group commit, and replay throughput.

SQLite (``SQLiteLog``: WAL, ``synchronous=FULL``, one writer thread),
PostgreSQL (``PostgresLog``) and NATS JetStream (``JetStreamLog``), each
measured against a one-commit-per-event baseline on the same machine in the
same run:

* **append, 1 event per call**: N concurrent tasks, each awaiting
  ``log.append([event])`` one at a time, for a fixed time. Group commit puts
  every append waiting into one transaction, so one fsync serves many events;
* **append, 100 events per call**: the same with ``log.append(list_of_100)``;
* **floor** (SQLite): the least a one-event group commit costs in Python, 1,024
  tasks each putting a row and a future on a queue for one writer thread
  (multi-row INSERTs, one transaction for all that is queued), in the same run:
  what ``append([e]) x 1024`` and ``bus.publish x 1024`` compare with;
* **baseline**: a plain driver connection doing ``INSERT`` + ``COMMIT`` per
  event (SQLite: ``sqlite3``, WAL, ``synchronous=FULL``; PostgreSQL: psycopg),
  into a table of the same shape; for JetStream, nats-py publishing one
  message per event and awaiting each acknowledgement;
* **replay**: read 100k stored events in pages of 1,000 with
  ``log.read(topic, after=..., limit=1000)``, beside a raw driver ``SELECT``
  of the same pages (no ``Event`` objects) as the ceiling (JetStream: a
  nats-py pull consumer fetching the topic's messages, nothing decoded);
* **through the bus**: ``Bus(log=..., namespaces={"": Namespace(history_size=...)})``
  with N concurrent publishers awaiting ``bus.publish(...)`` (a durable publish
  commits, then fans out to one subscriber draining with ``get_batch``).

Each append row also reports the events per commit and where the CPU went: the
event-loop thread and (SQLite) the writer thread, in µs of CPU per event, from
``/proc/self/task/<tid>/stat``.

``--py-spy`` samples the process with py-spy (``py-spy record --threads``)
in the two cases of issue 19, ``append([e]) x 1024 tasks`` and
``bus.publish x 1024``, and prints where each thread's CPU goes (the
event-loop thread and SQLiteLog's writer thread, which share one GIL), in µs
of CPU per event, by function: its own time and, for eventcast's functions,
the time under it. The samples come from a second window of the case, run
after the timed one: py-spy pauses the process for each sample, which cost
a window 15-42% of its throughput in four pairs of windows measured side by side
(``--profile``'s cProfile, more), so the figures in the tables are never
observed.

    python benchmarks/log.py [--quick] [--seconds 3] [--no-postgres] [--no-jetstream]
                              [--profile] [--py-spy]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import cProfile
import gc
import io
import os
import pstats
import queue
import secrets
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvloop

from _common import (
    PySpy,
    header,
    machine,
    merge_threads,
    print_samples,
    rate,
    save_json,
    thread_cpu,
    threads_named,
)
from eventcast import Bus, Event, Namespace
from eventcast.log.base import EventLog, Retention
from eventcast.log.sqlite import SQLiteLog

TOPIC = "bench"
BODY = "x" * 64
PG_URL = os.environ.get("EVENTCAST_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("EVENTCAST_BENCH_NATS", "nats://127.0.0.1:4222")
REPLAY_EVENTS = 100_000
PAGE = 1000
UNLIMITED = Retention(size=10**12)

# The same shape as SQLiteLog's ec_events table.
SQLITE_BASELINE_DDL = """
CREATE TABLE IF NOT EXISTS events (
    topic TEXT NOT NULL,
    offset INTEGER NOT NULL,
    id TEXT NOT NULL,
    time REAL NOT NULL,
    payload BLOB NOT NULL,
    binary INTEGER NOT NULL,
    tags BLOB,
    ikey TEXT,
    PRIMARY KEY (topic, offset)
) WITHOUT ROWID
"""


def payload(seq: int) -> dict[str, Any]:
    return {"seq": seq, "body": BODY}


class ThreadClock:
    """CPU seconds of the calling (loop) thread and of named helper threads."""

    def __init__(self, helper_prefix: str | None) -> None:
        self.helper_prefix = helper_prefix
        self.loop0 = time.thread_time()
        self.helpers0 = self._helpers()

    def _helpers(self) -> dict[int, float]:
        if self.helper_prefix is None:
            return {}
        out = {}
        for tid in threads_named(self.helper_prefix):
            with contextlib.suppress(OSError):
                out[tid] = thread_cpu(tid)
        return out

    def stop(self) -> tuple[float, float]:
        loop = time.thread_time() - self.loop0
        now = self._helpers()
        helper = sum(v - self.helpers0.get(tid, 0.0) for tid, v in now.items())
        return loop, helper


def quiet_disk() -> None:
    """Write out the page cache's dirty pages (the earlier cases' databases) before a
    case is timed, so that its fsyncs do not queue behind their writeback.

    (The host's own drift over minutes moved these cases by up to 2x in one
    process with or without it; see docs/performance.md, twenty-fourth session.)
    """
    os.sync()


async def timed_workers(
    concurrency: int, seconds: float, step: Callable[[int], Awaitable[int]]
) -> tuple[int, float]:
    """Run ``concurrency`` tasks calling ``step`` until ``seconds`` pass; (events, elapsed)."""
    stop = False
    total = 0

    async def worker(w: int) -> None:
        nonlocal total
        seq = w * 10**9
        n = 0
        while not stop:
            n += await step(seq + n)
        total += n

    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    tasks = [loop.create_task(worker(w)) for w in range(concurrency)]

    def finish() -> None:
        nonlocal stop
        stop = True

    loop.call_later(seconds, finish)
    await asyncio.gather(*tasks)
    return total, time.perf_counter() - start


def print_spy(title: str, row: dict[str, Any], seconds: int) -> None:
    """Where each thread's CPU per event goes, by function (py-spy samples).

    Each thread's samples are scaled to its CPU time per event measured from
    /proc (see :func:`_common.print_samples`).
    """
    threads = row["py_spy"]
    names = {"loop": "MainThread", "writer": "eventcast-sqlite-writer"}
    measured = {"loop": row["loop_us_per_event"], "writer": row["writer_us_per_event"]}
    print(
        f"\n## py-spy, {title}: µs of CPU per event, by thread ({seconds}s sampled, in a "
        f"window of its own: {row['events_per_s'] / 1000:.1f}k events/s while sampled)"
    )
    for group, prefix in names.items():
        entry = merge_threads(threads, prefix)
        if entry["samples"] and measured[group]:
            print_samples(f"{group} thread", entry, measured[group], "event")
    sys.stdout.flush()


# -- appends ----------------------------------------------------------------------------


def append_row(
    events: int, elapsed: float, commits: int, loop_cpu: float, writer_cpu: float | None
) -> dict[str, Any]:
    """One row of an append table: throughput, events per commit, CPU per event by thread."""
    return {
        "events": events,
        "seconds": elapsed,
        "events_per_s": events / elapsed,
        "commits": commits,
        "events_per_commit": events / max(commits, 1),
        "loop_us_per_event": loop_cpu / events * 1e6,
        "writer_us_per_event": None if writer_cpu is None else writer_cpu / events * 1e6,
    }


@contextlib.asynccontextmanager
async def appending(log: EventLog) -> AsyncIterator[EventLog]:
    """``log`` open for the append cases (every event kept: no retention work in the
    measure), closed at the end."""
    log.retention = lambda topic: UNLIMITED
    await log.open()
    try:
        yield log
    finally:
        await log.close()


def append_step(log: EventLog, batch: int) -> Callable[[int], Awaitable[int]]:
    """A task's step in the append cases: one append of ``batch`` new events."""

    async def step(seq: int) -> int:
        if batch == 1:
            await log.append([Event(topic=TOPIC, data=payload(seq))])
        else:
            await log.append([Event(topic=TOPIC, data=payload(seq + i)) for i in range(batch)])
        return batch

    return step


async def append_case(
    make_log: Callable[[], EventLog],
    helper_prefix: str | None,
    concurrency: int,
    batch: int,
    seconds: float,
    profile: cProfile.Profile | None = None,
    spy: bool = False,
) -> dict[str, Any]:
    async with appending(make_log()) as log:
        # A shared PostgreSQL schema keeps the stream of the previous case.
        top0 = (await log.position(TOPIC)).offset
        await log.append([Event(topic=TOPIC, data=payload(0))])
        step = append_step(log, batch)
        quiet_disk()
        gc.collect()
        commits0 = log.commits  # type: ignore[attr-defined]
        clock = ThreadClock(helper_prefix)
        if profile is not None:
            profile.enable()
        sampler = PySpy(os.getpid(), seconds) if spy else None
        if sampler is not None:
            sampler.start()
        events, elapsed = await timed_workers(concurrency, seconds, step)
        if profile is not None:
            profile.disable()
        loop_cpu, helper_cpu = clock.stop()
        stacks = await asyncio.to_thread(sampler.wait) if sampler is not None else None
        commits = log.commits - commits0  # type: ignore[attr-defined]
        top = (await log.position(TOPIC)).offset
        if top - top0 != events + 1:
            raise RuntimeError(f"lost appends: top={top - top0}, appended={events + 1}")
    row = append_row(events, elapsed, commits, loop_cpu, helper_cpu if helper_prefix else None)
    row["py_spy"] = stacks
    return row


def sqlite_baseline(path: str, seconds: float) -> dict[str, Any]:
    """INSERT + COMMIT per event on one plain sqlite3 connection (WAL, synchronous=FULL)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SQLITE_BASELINE_DDL)
    from eventcast.events import encode_data

    n = 0
    quiet_disk()
    cpu0 = time.thread_time()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(10):
            event = Event(topic=TOPIC, data=payload(n))
            n += 1
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (TOPIC, n, event.id, event.time, encode_data(event.data), False, None, None),
            )
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    cpu = time.thread_time() - cpu0
    conn.close()
    return {
        "events": n,
        "seconds": elapsed,
        "events_per_s": n / elapsed,
        "commits": n,
        "events_per_commit": 1.0,
        "loop_us_per_event": cpu / n * 1e6,
        "writer_us_per_event": None,
    }


_FLOOR_CHUNKS = (256, 32, 4, 1)
# The row's constant columns written in the statement, as SQLiteLog does: the
# sqlite3 module looks up an adapter for a bool or None.
_FLOOR_SQL = {
    n: "INSERT INTO events (topic, id, time, payload, binary, tags, ikey, offset) VALUES "
    + ", ".join(["(?, ?, ?, ?, 0, NULL, NULL, ?)"] * n)
    for n in _FLOOR_CHUNKS
}


def _floor_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SQLITE_BASELINE_DDL)
    return conn


def _floor_round(
    conn: sqlite3.Connection, first: Any, requests: queue.SimpleQueue[Any], top: int
) -> tuple[list[Any], list[int]]:
    """One commit of the floor's writer: ``first`` and every request queued behind it
    (up to 10,000), committed after offset ``top``; (the batch, its offsets)."""
    batch = [first]
    with contextlib.suppress(queue.Empty):
        while len(batch) < 10_000:
            batch.append(requests.get_nowait())
    return batch, _floor_commit(conn, batch, top)


def _floor_commit(conn: sqlite3.Connection, batch: list[Any], top: int) -> list[int]:
    """Commit ``batch``'s rows in one transaction after offset ``top``; their offsets."""
    params: list[Any] = []
    offsets = []
    for (topic, id_, t, payload), _ in batch:
        top += 1
        params += (topic, id_, t, payload, top)
        offsets.append(top)
    conn.execute("BEGIN IMMEDIATE")
    i = 0
    for n in _FLOOR_CHUNKS:
        while len(params) - i >= 5 * n:
            conn.execute(_FLOOR_SQL[n], params[i : i + 5 * n])
            i += 5 * n
    conn.execute("COMMIT")
    return offsets


def _floor_writer(
    path: str,
    requests: queue.SimpleQueue[Any],
    loop: asyncio.AbstractEventLoop,
    commits: list[int],
) -> None:
    """The floor's writer thread: everything queued, one transaction, one answer per request."""
    conn = _floor_connect(path)
    top = 0
    while True:
        first = requests.get()
        if first is None:
            conn.close()
            return
        batch, offsets = _floor_round(conn, first, requests, top)
        top = offsets[-1]
        commits[0] += 1
        loop.call_soon_threadsafe(_floor_answer, batch, offsets)


async def _floor_on_loop(
    conn: sqlite3.Connection, requests: queue.SimpleQueue[Any], commits: list[int]
) -> None:
    """The floor's writer as a task of the loop (``one_thread``): each turn, what is queued."""
    top = 0
    while True:
        await asyncio.sleep(0)
        try:
            first = requests.get_nowait()
        except queue.Empty:
            continue
        if first is None:
            return
        batch, offsets = _floor_round(conn, first, requests, top)
        top = offsets[-1]
        commits[0] += 1
        _floor_answer(batch, offsets)


def _floor_answer(batch: list[tuple[Any, asyncio.Future[int]]], offsets: list[int]) -> None:
    for (_, future), offset in zip(batch, offsets, strict=True):
        future.set_result(offset)


@contextlib.asynccontextmanager
async def floor_system(
    path: str, one_thread: bool = False
) -> AsyncIterator[tuple[Callable[[int], Awaitable[int]], list[int]]]:
    """The floor system of one-event appends, running: (its step, its count of commits).

    Each step puts one row (the same columns as SQLiteLog's, data encoded the
    same way) with a future on a queue for one writer thread, which commits
    everything queued in one transaction with multi-row INSERTs and answers each
    future with its offset. No event objects, no bounds, no error handling, no
    retention: what group commit costs in Python at the least.

    ``one_thread``: the writer's work runs as a task of the loop, once a turn, so
    that commit groups do not depend on how two threads share the GIL (see
    ``instructions.py``'s ``durable1`` case).
    """
    from eventcast.events import encode_data, new_event_id

    loop = asyncio.get_running_loop()
    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    commits = [0]
    writer: threading.Thread | asyncio.Task[None]
    if one_thread:
        conn = _floor_connect(path)
        writer = loop.create_task(_floor_on_loop(conn, requests, commits))
    else:
        writer = threading.Thread(
            target=_floor_writer, args=(path, requests, loop, commits), name="floor-writer"
        )
        writer.start()
    try:
        # The table exists once the first request is answered.
        warm: asyncio.Future[int] = loop.create_future()
        requests.put(((TOPIC, new_event_id(), time.time(), b"0"), warm))
        await warm

        async def step(seq: int) -> int:
            future: asyncio.Future[int] = loop.create_future()
            row = (TOPIC, new_event_id(), time.time(), encode_data(payload(seq)))
            requests.put((row, future))
            await future
            return 1

        yield step, commits
    finally:
        requests.put(None)
        if isinstance(writer, asyncio.Task):
            await writer
            conn.close()
        else:
            await asyncio.to_thread(writer.join)


async def sqlite_floor(path: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """The floor system of one-event appends (:func:`floor_system`), N tasks."""
    async with floor_system(path) as (step, commits):
        quiet_disk()
        commits0 = commits[0]
        clock = ThreadClock("floor-writer")
        events, elapsed = await timed_workers(concurrency, seconds, step)
        loop_cpu, writer_cpu = clock.stop()
    return append_row(events, elapsed, commits[0] - commits0, loop_cpu, writer_cpu)


def pg_baseline(conninfo: str, schema: str, seconds: float) -> dict[str, Any]:
    """INSERT + COMMIT per event on one plain psycopg connection."""
    import psycopg

    from eventcast.events import encode_data

    with psycopg.connect(conninfo) as conn:
        conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".baseline (topic TEXT NOT NULL, '
            '"offset" BIGINT NOT NULL, id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, '
            'payload BYTEA NOT NULL, "binary" BOOLEAN NOT NULL, tags BYTEA, ikey TEXT, '
            'PRIMARY KEY (topic, "offset"))'
        )
        conn.commit()
        sql = f'INSERT INTO "{schema}".baseline VALUES (%s, %s, %s, %s, %s, %s, %s, %s)'
        n = 0
        cpu0 = time.thread_time()
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(10):
                event = Event(topic=TOPIC, data=payload(n))
                n += 1
                conn.execute(
                    sql,
                    (TOPIC, n, event.id, event.time, encode_data(event.data), False, None, None),
                )
                conn.commit()
        elapsed = time.perf_counter() - start
        cpu = time.thread_time() - cpu0
    return {
        "events": n,
        "seconds": elapsed,
        "events_per_s": n / elapsed,
        "commits": n,
        "events_per_commit": 1.0,
        "loop_us_per_event": cpu / n * 1e6,
        "writer_us_per_event": None,
    }


# -- replay --------------------------------------------------------------------------------


async def replay_case(
    make_log: Callable[[], EventLog],
    raw_pages: Callable[[], int] | None,
    events: int,
    passes: int,
) -> dict[str, Any]:
    log = make_log()
    log.retention = lambda topic: UNLIMITED
    await log.open()
    try:
        fill = time.perf_counter()
        for base in range(0, events, 1000):
            await log.append([Event(topic=TOPIC, data=payload(base + i)) for i in range(1000)])
        fill = time.perf_counter() - fill
        rates = []
        for _ in range(passes):
            gc.collect()
            start = time.perf_counter()
            after = 0
            n = 0
            while True:
                page = await log.read(TOPIC, after=after, limit=PAGE)
                if not page:
                    break
                n += len(page)
                after = page[-1].offset or 0
            elapsed = time.perf_counter() - start
            if n != events:
                raise RuntimeError(f"replayed {n} of {events} events")
            rates.append(n / elapsed)
    finally:
        await log.close()
    out: dict[str, Any] = {
        "events": events,
        "fill_events_per_s": events / fill,
        "events_per_s": max(rates),
    }
    if raw_pages is not None:
        raw_rates = []
        for _ in range(passes):
            start = time.perf_counter()
            n = raw_pages()
            raw_rates.append(n / (time.perf_counter() - start))
        out["raw_events_per_s"] = max(raw_rates)
    return out


def sqlite_raw_pages(path: str) -> Callable[[], int]:
    def run() -> int:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        after, n = 0, 0
        while True:
            rows = conn.execute(
                "SELECT offset, id, time, payload, binary, tags, ikey FROM ec_events "
                "WHERE topic = ? AND offset > ? ORDER BY offset LIMIT ?",
                (TOPIC, after, PAGE),
            ).fetchall()
            if not rows:
                break
            n += len(rows)
            after = rows[-1][0]
        conn.close()
        return n

    return run


def pg_raw_pages(conninfo: str, schema: str) -> Callable[[], int]:
    def run() -> int:
        import psycopg

        with psycopg.connect(conninfo, autocommit=True) as conn:
            # As PostgresLog's connections: stale statistics otherwise pick a
            # bitmap scan plus sort that reads the whole stream for each page.
            conn.execute("SET enable_bitmapscan = off")
            after, n = 0, 0
            while True:
                rows = conn.execute(
                    'SELECT "offset", id, time, payload, "binary", tags, ikey '
                    f'FROM "{schema}".events WHERE topic = %s AND "offset" > %s '
                    'ORDER BY "offset" LIMIT %s',
                    (TOPIC, after, PAGE),
                ).fetchall()
                if not rows:
                    break
                n += len(rows)
                after = rows[-1][0]
        return n

    return run


# -- through the bus ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bus_system(
    log: EventLog, history_size: int
) -> AsyncIterator[tuple[Bus, Callable[[int], Awaitable[int]], Callable[[], int]]]:
    """A started bus on ``log`` (every topic durable, ``history_size`` kept), one
    subscriber reading everything and one event published: (the bus, a task's step,
    one publish, and how many events the subscriber has received so far)."""
    bus = Bus(log=log, namespaces={"": Namespace(history_size=history_size)}, maxsize=65_536)
    await bus.start()
    consumer: asyncio.Task[None] | None = None
    try:
        sub = bus.subscribe(TOPIC)
        received = 0

        async def consume() -> None:
            nonlocal received
            while True:
                received += len(await sub.get_batch(4096))

        consumer = asyncio.get_running_loop().create_task(consume())
        await bus.publish(TOPIC, payload(0))

        async def step(seq: int) -> int:
            await bus.publish(TOPIC, payload(seq))
            return 1

        yield bus, step, lambda: received
    finally:
        if consumer is not None:
            consumer.cancel()
        await bus.close()


async def bus_case(
    make_log: Callable[[], EventLog],
    helper_prefix: str | None,
    concurrency: int,
    history_size: int,
    seconds: float,
    spy: bool = False,
) -> dict[str, Any]:
    log = make_log()
    async with bus_system(log, history_size) as (bus, step, received):
        quiet_disk()
        gc.collect()
        commits0 = log.commits  # type: ignore[attr-defined]
        clock = ThreadClock(helper_prefix)
        sampler = PySpy(os.getpid(), seconds) if spy else None
        if sampler is not None:
            sampler.start()
        events, elapsed = await timed_workers(concurrency, seconds, step)
        loop_cpu, helper_cpu = clock.stop()
        stacks = await asyncio.to_thread(sampler.wait) if sampler is not None else None
        commits = log.commits - commits0  # type: ignore[attr-defined]
        for _ in range(100):
            if received() >= events + 1:
                break
            await asyncio.sleep(0.01)
        dropped = bus.statistics()["dropped"]
        if received() != events + 1 or dropped:
            raise RuntimeError(f"bus lost events: received={received()} published={events + 1}")
    row = append_row(events, elapsed, commits, loop_cpu, helper_cpu if helper_prefix else None)
    row["py_spy"] = stacks
    return row


# -- driver ----------------------------------------------------------------------------------


def print_rows(title: str, rows: list[dict[str, Any]], baseline: float | None) -> None:
    print(f"\n## {title}")
    print(
        f"{'case':<34} | {'events/s':>10} | {'vs 1 commit/event':>17} | {'events/commit':>13} "
        f"| {'loop µs/ev':>10} | {'writer µs/ev':>12}"
    )
    for row in rows:
        ratio = f"{row['events_per_s'] / baseline:16.1f}x" if baseline else f"{'-':>17}"
        writer = row.get("writer_us_per_event")
        writer_s = f"{writer:12.2f}" if writer is not None else f"{'-':>12}"
        print(
            f"{row['case']:<34} | {rate(row['events_per_s']):>10} | {ratio} | "
            f"{row['events_per_commit']:13.1f} | {row['loop_us_per_event']:10.2f} | {writer_s}"
        )
    sys.stdout.flush()


class Scratch:
    """A temporary directory, one fresh database file per case."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="eventcast-bench-")
        self.n = 0

    def path(self) -> str:
        self.n += 1
        return os.path.join(self.root, f"case{self.n}.db")

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def run_sqlite(args: argparse.Namespace, scratch: Scratch) -> dict[str, Any]:
    seconds = args.seconds
    out: dict[str, Any] = {}

    def make() -> SQLiteLog:
        return SQLiteLog(scratch.path(), synchronous="FULL")

    base = sqlite_baseline(scratch.path(), seconds)
    base["case"] = "baseline: INSERT+COMMIT per event"
    baseline = base["events_per_s"]
    rows = [base]
    profile = cProfile.Profile() if args.profile else None
    for n in args.concurrency:
        row = await append_case(make, "eventcast-sqlite-writer", n, 1, seconds)
        row["case"] = f"append([e]) x {n} tasks"
        if n == max(args.concurrency) and (profile is not None or args.py_spy):
            # Profiled or sampled in a window of its own: the row's figure is unobserved.
            row["sampled"] = await append_case(
                make, "eventcast-sqlite-writer", n, 1, seconds, profile, spy=args.py_spy
            )
        rows.append(row)
    for n in (1, 16):
        row = await append_case(make, "eventcast-sqlite-writer", n, 100, seconds)
        row["case"] = f"append(100 events) x {n} tasks"
        rows.append(row)
    floor = await sqlite_floor(scratch.path(), max(args.concurrency), seconds)
    floor["case"] = f"floor: bare group commit x {max(args.concurrency)}"
    rows.append(floor)
    print_rows("SQLite append (WAL, synchronous=FULL)", rows, baseline)
    out["append"] = rows
    if profile is not None:
        print_profile(profile, f"SQLite append([e]) x {max(args.concurrency)} tasks")
    for row in rows:
        if row.get("sampled", {}).get("py_spy"):
            print_spy(f"SQLite {row['case']}", row["sampled"], int(seconds))

    bus_rows = []
    for n, history in args.bus_cases:
        row = await bus_case(make, "eventcast-sqlite-writer", n, history, seconds)
        row["case"] = f"bus.publish x {n} (history {history:,})"
        if args.py_spy and n == 1024 and history == 1000:
            row["sampled"] = await bus_case(
                make, "eventcast-sqlite-writer", n, history, seconds, spy=True
            )
        bus_rows.append(row)
    print_rows("SQLite through the bus (durable publish: commit, then fan-out)", bus_rows, baseline)
    out["bus"] = bus_rows
    for row in bus_rows:
        if row.get("sampled", {}).get("py_spy"):
            print_spy(f"SQLite {row['case']}", row["sampled"], int(seconds))

    path = scratch.path()
    replay = await replay_case(
        lambda: SQLiteLog(path, synchronous="FULL"), sqlite_raw_pages(path), args.replay, 3
    )
    print_replay("SQLite", replay)
    out["replay"] = replay
    return out


def print_replay(name: str, replay: dict[str, Any]) -> None:
    print(f"\n## {name} replay: {replay['events']:,} events, pages of {PAGE}")
    print(f"{'case':<46} | {'events/s':>10}")
    print(f"{'log.read(topic, after=..., limit=1000)':<46} | {rate(replay['events_per_s']):>10}")
    if "raw_events_per_s" in replay:
        print(
            f"{'raw driver SELECT of the same pages (ceiling)':<46} | "
            f"{rate(replay['raw_events_per_s']):>10}"
        )
    fill = rate(replay["fill_events_per_s"])
    print(f"{'(fill: append(1000 events) sequentially)':<46} | {fill:>10}")
    sys.stdout.flush()


def print_profile(profile: cProfile.Profile, title: str) -> None:
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(18)
    print(f"\n## cProfile of the loop thread: {title} (top by own time)")
    text = stream.getvalue()
    start = text.find("   ncalls")
    print(text[start:] if start >= 0 else text)


async def server_cases(
    args: argparse.Namespace,
    make: Callable[[], EventLog],
    base: dict[str, Any],
    name: str,
    detail: str,
) -> dict[str, Any]:
    """The append and bus rows of a log on a server (no writer thread of its own to time)."""
    rows = [base]
    for n in args.concurrency:
        row = await append_case(make, None, n, 1, args.seconds)
        row["case"] = f"append([e]) x {n} tasks"
        rows.append(row)
    for n in (1, 16):
        row = await append_case(make, None, n, 100, args.seconds)
        row["case"] = f"append(100 events) x {n} tasks"
        rows.append(row)
    print_rows(f"{name} append ({detail})", rows, base["events_per_s"])
    bus_rows = []
    for n, history in args.bus_cases:
        row = await bus_case(make, None, n, history, args.seconds)
        row["case"] = f"bus.publish x {n} (history {history:,})"
        bus_rows.append(row)
    print_rows(f"{name} through the bus", bus_rows, base["events_per_s"])
    return {"append": rows, "bus": bus_rows}


async def run_postgres(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from eventcast.log.postgres import PostgresLog, split_url

    seconds = args.seconds
    schema = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
    conninfo, _ = split_url(PG_URL)
    url = f"{PG_URL}?schema={schema}"
    out: dict[str, Any] = {}
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in ("fsync", "synchronous_commit", "wal_sync_method")
            }
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        out["server_settings"] = settings
        print(f"\n(PostgreSQL settings: {settings})")
        base = pg_baseline(conninfo, schema, seconds)
        base["case"] = "baseline: INSERT+COMMIT per event"

        def make() -> PostgresLog:
            return PostgresLog(url)

        out.update(await server_cases(args, make, base, "PostgreSQL", "PostgresLog, group commit"))
        # A fresh topic in a fresh schema for the replay.
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{schema}"')
        replay = await replay_case(make, pg_raw_pages(conninfo, schema), args.replay, 3)
        print_replay("PostgreSQL", replay)
        out["replay"] = replay
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return out


async def js_baseline(prefix: str, seconds: float) -> dict[str, Any]:
    """nats-py publishing one message per event to a stream, awaiting each acknowledgement."""
    import nats

    from eventcast.events import encode_data

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        await js.add_stream(name=f"{prefix}_baseline", subjects=[f"{prefix}.baseline"])
        n = 0
        cpu0 = time.thread_time()
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(10):
                event = Event(topic=TOPIC, data=payload(n))
                n += 1
                await js.publish(f"{prefix}.baseline", encode_data(event.data))
        elapsed = time.perf_counter() - start
        cpu = time.thread_time() - cpu0
    finally:
        await nc.close()
    return {
        "events": n,
        "seconds": elapsed,
        "events_per_s": n / elapsed,
        "commits": n,
        "events_per_commit": 1.0,
        "loop_us_per_event": cpu / n * 1e6,
        "writer_us_per_event": None,
    }


def js_raw_pages(prefix: str) -> Callable[[], int]:
    """Every message of the replayed topic through a nats-py pull consumer; events counted
    from the message headers, nothing decoded (run in a thread: replay_case is async)."""

    async def read() -> int:
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            subject, stream = f"{prefix}.ev.~.{TOPIC}", f"{prefix}_ev_~"
            total = (await js.stream_info(stream, subjects_filter=subject)).state.messages
            sub = await js.pull_subscribe(subject, stream=stream, durable=None)
            n = received = 0
            while received < total:
                messages = await sub.fetch(min(256, total - received), timeout=5)
                received += len(messages)
                n += sum(int((m.headers or {})["Ec-Count"]) for m in messages)
            await sub.unsubscribe()
            return n
        finally:
            await nc.close()

    def run() -> int:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(read())).result()

    return run


async def run_jetstream(args: argparse.Namespace) -> dict[str, Any]:
    import nats

    from eventcast.log.jetstream import JetStreamLog

    seconds = args.seconds
    prefix = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
    url = NATS_URL.replace("nats://", "nats+jetstream://", 1) + f"?prefix={prefix}"
    out: dict[str, Any] = {}

    def make() -> JetStreamLog:
        return JetStreamLog(url)

    try:
        base = await js_baseline(prefix, seconds)
        base["case"] = "baseline: publish+ack per event"
        out.update(
            await server_cases(
                args, make, base, "JetStream", "JetStreamLog, one message per group commit"
            )
        )
        # A fresh topic under a fresh prefix for the replay.
        replay_prefix = f"{prefix}-r"
        replay_url = url.replace(f"prefix={prefix}", f"prefix={replay_prefix}")
        replay = await replay_case(
            lambda: JetStreamLog(replay_url),
            js_raw_pages(replay_prefix),
            args.replay,
            3,
        )
        print_replay("JetStream", replay)
        out["replay"] = replay
    finally:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                name = info.config.name or ""
                if name.startswith((f"{prefix}_", f"{prefix}-r_")):
                    await js.delete_stream(name)
        finally:
            await nc.close()
    return out


def js_available() -> bool:
    async def probe() -> None:
        import nats

        nc = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()

    try:
        asyncio.run(probe())
        return True
    except Exception as exc:
        print(f"\n(JetStream skipped: {type(exc).__name__}: {exc})")
        return False


def pg_available() -> bool:
    try:
        import psycopg

        from eventcast.log.postgres import split_url

        with psycopg.connect(split_url(PG_URL)[0], connect_timeout=3):
            return True
    except Exception as exc:
        print(f"\n(PostgreSQL skipped: {type(exc).__name__}: {exc})")
        return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")
    parser.add_argument("--seconds", type=float, help="measuring window per case (default 3)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--no-sqlite", action="store_true", help="no SQLite")
    parser.add_argument("--no-jetstream", action="store_true", help="no JetStream")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest SQLite case")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample both threads with py-spy in the 1,024-task SQLite cases",
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.5 if args.quick else 3.0
    args.concurrency = [1, 16, 64, 256, 1024]
    args.bus_cases = [(1, 1000), (64, 1000), (1024, 1000), (1024, 10**9)]
    args.replay = 20_000 if args.quick else REPLAY_EVENTS
    print(header("durable log: group commit and replay"))
    print(f"(window {args.seconds:g}s per case; payload {{'seq': n, 'body': 64 chars}})")
    scratch = Scratch()
    results: dict[str, Any] = {"machine": machine()}
    try:
        if not args.no_sqlite:
            results["sqlite"] = uvloop.run(run_sqlite(args, scratch))
        if not args.no_postgres and pg_available():
            results["postgres"] = uvloop.run(run_postgres(args))
        if not args.no_jetstream and js_available():
            results["jetstream"] = uvloop.run(run_jetstream(args))
    finally:
        scratch.cleanup()
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
