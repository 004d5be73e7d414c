"""``sqlite:///path``: the embedded default log.

The stdlib ``sqlite3`` driver, in WAL mode with ``synchronous=FULL``, on one
writer thread. Appends from every publisher are queued to that thread, which
commits everything waiting as one transaction (*group commit*): a burst of
publishes shares one fsync, and each publisher is acknowledged only after the
commit that holds its events returned. Reads run on a small pool of reader
threads with their own connections, which WAL lets run beside the writer.

A topic has a row in ``ec_streams`` only from its first append (or truncation)
until :meth:`SQLiteLog.prune` finds it without events; positions are read,
never written (see :mod:`eventcast.log.base` for the epochs of topics without a
row, derived from the store id in ``ec_meta`` and the counters in ``ec_gens``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from ..deadletters import DeadLetter
from ..events import Event, Position
from ..exceptions import LogError
from .base import (
    AppendItem,
    EventLog,
    append_item,
    committed,
    committed_row,
    empty_epoch,
    encode_tags,
    epoch_bucket,
    letter_to_row,
    log_error,
    new_epoch,
    new_store_id,
    now,
    plain_events,
    row_to_letter,
    stored_event,
)

__all__ = ["SQLiteLog"]

logger = logging.getLogger("eventcast.log")

#: Most append requests waiting for the writer before publishers wait for room.
DEFAULT_MAX_PENDING: Final = 10_000
#: Most events committed in one transaction.
DEFAULT_MAX_BATCH: Final = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ec_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ec_streams (
    topic TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    top INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ec_events (
    topic TEXT NOT NULL,
    offset INTEGER NOT NULL,
    id TEXT NOT NULL,
    time REAL NOT NULL,
    payload BLOB NOT NULL,
    binary INTEGER NOT NULL,
    tags BLOB,
    ikey TEXT,
    PRIMARY KEY (topic, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ec_gens (bucket INTEGER PRIMARY KEY, gen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ec_ikeys (
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    offset INTEGER NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (topic, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ec_dead_letters (
    id INTEGER PRIMARY KEY,
    subscriber TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    time REAL NOT NULL,
    topic TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_time REAL NOT NULL,
    payload BLOB NOT NULL,
    binary INTEGER NOT NULL,
    tags BLOB
);
"""

_COLUMNS = "offset, id, time, payload, binary, tags, ikey"
# A page's columns: the rare fields folded into one, NULL for the common event.
_PAGE_COLUMNS = (
    "offset, id, time, payload, CASE WHEN binary OR tags IS NOT NULL OR ikey IS NOT NULL "
    "THEN json_array(binary, CAST(tags AS TEXT), ikey) END"
)


class _Request(msgspec.Struct):
    """A request for the writer thread (a struct: built in C).

    An ``"append"`` request is a *group*: the appends made from its opening
    until the writer took it, their events in one flat list (``args``) and each
    caller's future (``futures``), in call order. In a group of appends of lists,
    ``ends`` says where each caller's events end in ``args``; a group of one-event
    appends (each answered with its event, not a list) has none: its callers'
    events are ``args`` one for one. Any other request has one caller. A group's
    ``then`` is the callback its appends were made with (see ``EventLog._append_then``).
    """

    kind: str
    args: Any
    futures: list[asyncio.Future[Any]]
    ends: list[int] | None = None
    then: Callable[[list[Event]], object] | None = None
    opened: float = 0.0
    result: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class _TopicState:
    epoch: str
    top: int
    floor: int = 0  # every offset <= floor is known to be pruned
    pruned_at: float = field(default=0.0)


class SQLiteLog(EventLog):
    """The embedded :class:`EventLog` on SQLite (WAL, ``synchronous=FULL``, group commit).

    Args:
        path: the database file; its directory is created if missing.
        synchronous: SQLite's ``synchronous`` pragma (``FULL`` by default: a
            commit survives power loss, not just a crash of the process).
        max_pending: bound on append requests queued for the writer.
        max_batch: bound on the events committed in one transaction.
        readers: reader threads.
        dedup_window: how long idempotency keys are remembered, in seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch: int = DEFAULT_MAX_BATCH,
        readers: int = 2,
        dedup_window: float = 120.0,
    ) -> None:
        super().__init__(dedup_window=dedup_window)
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"invalid synchronous mode {synchronous!r}")
        if max_pending < 1 or max_batch < 1 or readers < 1:
            raise ValueError("max_pending, max_batch and readers must be positive")
        self.path = os.fspath(path)
        self.synchronous = synchronous.upper()
        self.max_pending = max_pending
        self.max_batch = max_batch
        self._readers = readers
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: dict[str, _TopicState] = {}
        self._store = ""  # the store id, read when the writer opens the file
        self._closed = False
        self._opened = False
        self._keys_pruned = 0.0
        self._inflight = 0
        #: The open group of appends: queued already, and joined by every append
        #: until the writer takes it (see _submit and _take).
        self._group: _Request | None = None
        self._group_lock = threading.Lock()
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        #: True while the writer thread serves requests (a flag, not
        #: Thread.is_alive(), which takes a lock on every append).
        self._serving = False
        #: Open, not closed and serving: what an append checks first (see _submit).
        self._accepting = False
        #: Committed transactions (for the group-commit benchmark and tests).
        self.commits = 0

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            return
        if self._closed:
            raise LogError("the log is closed")
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._writer, args=(ready,), name="eventcast-sqlite-writer", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            # A writer that failed to open never read the sentinel: drop it, or
            # the writer of a later open() would stop at once.
            self._queue = queue.SimpleQueue()
            raise
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="eventcast-sqlite-read")
        self._opened = True
        # Set, then undone if the writer already stopped: it clears both flags
        # when it stops (_serving first), so either order leaves this false.
        self._accepting = True
        if not self._serving:
            self._accepting = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        thread, self._thread = self._thread, None
        try:
            if thread is not None:
                self._close_group()
                self._queue.put(None)
                # The writer finishes what is queued, then closes its connection.
                await asyncio.shield(asyncio.to_thread(thread.join))
        finally:  # even when cancelled: a second close() returns at once
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=True)
            with self._reader_lock:
                for conn in self._reader_conns:
                    conn.close()
                self._reader_conns.clear()

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        if readonly:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=30
            )
        else:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # -- the writer thread -----------------------------------------------------------

    def _writer(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect(readonly=False)
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO ec_meta (key, value) VALUES ('store', ?)",
                (new_store_id(),),
            )
            (self._store,) = conn.execute(
                "SELECT value FROM ec_meta WHERE key = 'store'"
            ).fetchone()
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            error = log_error(f"open {self.path!r}", exc)
            loop.call_soon_threadsafe(_set_exception, ready, error)
            return
        self._serving = True
        loop.call_soon_threadsafe(_set_result, ready, None)
        try:
            self._serve(conn, loop)
        finally:
            self._serving = False
            self._accepting = False
            conn.close()

    def _serve(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        get = self._queue.get
        while True:
            first = get()
            if first is None:
                return
            if first.kind == "append":
                self._settle(first)
            batch = [first]
            size = self._take(first)
            stop = False
            get_nowait = self._queue.get_nowait
            while size < self.max_batch:
                try:
                    request = get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                batch.append(request)
                size += self._take(request)
            self._run_batch(conn, batch)
            try:
                loop.call_soon_threadsafe(self._finish, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        appends = [r for r in batch if r.kind == "append"]
        others = [r for r in batch if r.kind != "append"]
        if appends:
            # The state of each topic this batch touches, as it was before
            # (None: not known before), to restore if the transaction fails.
            saved: dict[str, tuple[str, int, int] | None] = {}
            try:
                conn.execute("BEGIN IMMEDIATE")
                plain: list[Any] = []
                full: list[Any] = []
                batch_keys: list[tuple[str, str, int, float]] = []
                touched: dict[str, _TopicState] = {}
                self._assign(conn, appends, plain, full, batch_keys, touched, saved)
                # A few statements for the whole group commit: each step of a
                # statement hands the GIL back and forth with the loop thread.
                _insert_events(conn, _PLAIN_ROW, plain)
                if full:
                    _insert_events(conn, _FULL_ROW, full)
                if batch_keys:
                    conn.executemany(
                        "INSERT OR REPLACE INTO ec_ikeys VALUES (?, ?, ?, ?)", batch_keys
                    )
                conn.executemany(
                    "UPDATE ec_streams SET top = ? WHERE topic = ?",
                    [(state.top, topic) for topic, state in touched.items()],
                )
                self._apply_retention(conn, touched)
                conn.execute("COMMIT")
                self.commits += 1
            except Exception as exc:  # not only sqlite3.Error: e.g. a retention callback
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                self._restore(saved)
                error = log_error("append", exc)
                for request in appends:
                    request.result = None
                    request.error = error
        for request in others:
            try:
                request.result = self._other(conn, request)
            except Exception as exc:  # the writer thread must never die
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                self._state.clear()
                request.error = log_error(request.kind.replace("_", " "), exc)

    def _restore(self, saved: dict[str, tuple[str, int, int] | None]) -> None:
        for topic, before in saved.items():
            if before is None:
                self._state.pop(topic, None)
            else:
                state = self._state[topic]
                state.epoch, state.top, state.floor = before

    def _topic(self, conn: sqlite3.Connection, topic: str) -> _TopicState:
        """The topic's state; its row is created if missing, claiming its empty epoch."""
        state = self._state.get(topic)
        if state is None:
            row = conn.execute(
                "SELECT epoch, top FROM ec_streams WHERE topic = ?", (topic,)
            ).fetchone()
            if row is None:
                bucket = epoch_bucket(topic)
                found = conn.execute(
                    "SELECT gen FROM ec_gens WHERE bucket = ?", (bucket,)
                ).fetchone()
                generation = found[0] if found else 0
                conn.execute(
                    "INSERT OR REPLACE INTO ec_gens (bucket, gen) VALUES (?, ?)",
                    (bucket, generation + 1),
                )
                epoch = empty_epoch(self._store, topic, generation)
                conn.execute(
                    "INSERT INTO ec_streams (topic, epoch, top) VALUES (?, ?, 0)", (topic, epoch)
                )
                state = _TopicState(epoch=epoch, top=0)
            else:
                state = _TopicState(epoch=row[0], top=row[1])
            self._state[topic] = state
        return state

    def _assign(
        self,
        conn: sqlite3.Connection,
        appends: list[_Request],
        plain: list[Any],
        full: list[Any],
        keys: list[tuple[str, str, int, float]],
        touched: dict[str, _TopicState],
        saved: dict[str, tuple[str, int, int] | None],
    ) -> None:
        """Assign offsets to the events of a batch's appends, adding their rows,
        flat, to ``plain`` (in the order of :data:`_PLAIN_ROW`) or ``full`` (of
        :data:`_FULL_ROW`).

        Sets each request's result: its events as committed, built here so the
        loop thread only hands them over. An idempotent repeat (found in this
        batch or in the table) stands for the originally stored event (see
        :func:`~eventcast.log.base.committed_row`).
        """
        t = now()
        expires = t + self.dedup_window
        pending_keys: dict[tuple[str, str], tuple[Any, ...]] = {}
        extend_plain = plain.extend
        extend_full = full.extend
        last_topic: str | None = None
        state: _TopicState | None = None
        for request in appends:
            results: list[Event] = []
            event: Event
            for event in request.args:
                topic = event.topic
                if topic != last_topic:
                    state = touched.get(topic)
                    if state is None:
                        known = self._state.get(topic)
                        saved[topic] = (
                            None if known is None else (known.epoch, known.top, known.floor)
                        )
                        state = touched[topic] = self._topic(conn, topic)
                    last_topic = topic
                assert state is not None
                ikey = event.idempotency_key
                if ikey is not None:
                    original = pending_keys.get((topic, ikey)) or self._find_key(
                        conn, topic, ikey, t
                    )
                    if original is not None:
                        results.append(committed_row(event, original))
                        continue
                top = state.top = state.top + 1
                payload = event.encoded_data()  # cached: encoded before it was queued
                if ikey is None and not event.tags and not isinstance(event.data, bytes):
                    # (bound as a bytearray: see _PLAIN_ROW)
                    extend_plain((topic, event.id, event.time, bytearray(payload), top))
                else:
                    item = append_item(event)
                    extend_full(_bindable(item))
                    full.append(top)
                    if ikey is not None:
                        keys.append((topic, ikey, top, expires))
                        # The stored row, for a repeat later in this batch.
                        pending_keys[topic, ikey] = (state.epoch, topic, top, *item[1:])
                results.append(committed(event, top, state.epoch, payload))
            request.result = results

    def _find_key(
        self,
        conn: sqlite3.Connection,
        topic: str,
        key: str,
        t: float,
    ) -> tuple[Any, ...] | None:
        found = conn.execute(
            "SELECT offset FROM ec_ikeys WHERE topic = ? AND key = ? AND expires > ?",
            (topic, key, t),
        ).fetchone()
        if found is None:
            return None
        row = conn.execute(
            f"SELECT topic, {_COLUMNS} FROM ec_events WHERE topic = ? AND offset = ?",
            (topic, found[0]),
        ).fetchone()
        if row is None:  # stored, then pruned by retention: store it again
            return None
        return (self._state[topic].epoch, *row)

    def _apply_retention(self, conn: sqlite3.Connection, touched: dict[str, _TopicState]) -> None:
        t = now()
        for topic, state in touched.items():
            retention = self.retention(topic)
            floor = state.top - retention.size
            if floor > state.floor:
                conn.execute(
                    "DELETE FROM ec_events WHERE topic = ? AND offset <= ?", (topic, floor)
                )
                state.floor = floor
            if retention.ttl is not None and t - state.pruned_at >= 1.0:
                conn.execute(
                    "DELETE FROM ec_events WHERE topic = ? AND time < ?",
                    (topic, t - retention.ttl),
                )
                state.pruned_at = t
        if t - self._keys_pruned > self.dedup_window:
            conn.execute("DELETE FROM ec_ikeys WHERE expires <= ?", (t,))
            self._keys_pruned = t

    def _other(self, conn: sqlite3.Connection, request: _Request) -> Any:
        kind = request.kind
        if kind == "truncate":
            topic = request.args
            conn.execute("BEGIN IMMEDIATE")
            state = self._topic(conn, topic)
            epoch = new_epoch()
            conn.execute("DELETE FROM ec_events WHERE topic = ?", (topic,))
            conn.execute("DELETE FROM ec_ikeys WHERE topic = ?", (topic,))
            conn.execute("UPDATE ec_streams SET epoch = ? WHERE topic = ?", (epoch, topic))
            conn.execute("COMMIT")
            state.epoch = epoch
            state.floor = state.top
            return Position(state.top, epoch)
        if kind == "prune":
            t = request.args
            removed = 0
            conn.execute("BEGIN IMMEDIATE")
            for topic, top in conn.execute("SELECT topic, top FROM ec_streams").fetchall():
                retention = self.retention(topic)
                cur = conn.execute(
                    "DELETE FROM ec_events WHERE topic = ? AND offset <= ?",
                    (topic, top - retention.size),
                )
                removed += cur.rowcount
                if retention.ttl is not None:
                    cur = conn.execute(
                        "DELETE FROM ec_events WHERE topic = ? AND time < ?",
                        (topic, t - retention.ttl),
                    )
                    removed += cur.rowcount
            # Streams left without events are forgotten (their epoch was claimed
            # at birth, so the next one differs: see eventcast.log.base).
            empty = conn.execute(
                "SELECT topic FROM ec_streams s WHERE NOT EXISTS "
                "(SELECT 1 FROM ec_events e WHERE e.topic = s.topic)"
            ).fetchall()
            conn.executemany("DELETE FROM ec_streams WHERE topic = ?", empty)
            conn.executemany("DELETE FROM ec_ikeys WHERE topic = ?", empty)
            conn.execute("DELETE FROM ec_ikeys WHERE expires <= ?", (t,))
            conn.execute("COMMIT")
            for (topic,) in empty:
                self._state.pop(topic, None)
            return removed
        if kind == "save_letters":
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR REPLACE INTO ec_dead_letters VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                request.args,
            )
            conn.execute("COMMIT")
            return None
        if kind == "delete_letters":
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "DELETE FROM ec_dead_letters WHERE id = ?", [(i,) for i in request.args]
            )
            conn.execute("COMMIT")
            return None
        if kind == "check":
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR REPLACE INTO ec_meta (key, value) VALUES ('checked', ?)",
                (str(time.time()),),
            )
            conn.execute("COMMIT")
            return None
        raise AssertionError(f"unknown request {kind!r}")

    # -- submitting from the loop ----------------------------------------------------

    def _submit(
        self, kind: str, args: Any, then: Callable[[list[Event]], object] | None = None
    ) -> Awaitable[Any]:
        """Queue a request for the writer; what to await for its answer.

        The bound on queued requests is a plain counter: while fewer than
        ``max_pending`` requests are in flight (nearly always) the request is
        queued at once and its future returned, with no coroutine of its own;
        otherwise a coroutine that waits for room first. A request counts until
        the writer has answered it, even when its caller stopped waiting (it is
        still queued).

        An append joins the open group (see :class:`_Request`). A group is
        queued when it is opened, and every append joins it until the writer
        takes it (as soon as it can: the commit is not delayed), or it holds
        ``max_batch`` events: the appends made while the writer is busy, or
        before it gets the GIL, cost its queue, and the loop's answer, one
        request, not one each. An append made with another ``then`` than the
        open group's, and any other request, close it: requests keep their
        call order.

        Raises:
            LogError: the log is not open, or its writer thread is not running.
        """
        if not self._accepting or self._inflight >= self.max_pending:
            return self._submit_later(kind, args, then)
        future: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        self._inflight += 1
        if kind != "append_one" and kind != "append":
            self._close_group()
            self._queue.put(_Request(kind, args, [future]))
            return future
        # The writer takes the group under this lock: it sees every append
        # whole, or none of it. (acquire and release, not ``with``: once per
        # append, and ``with`` costs twice as much.)
        lock = self._group_lock
        lock.acquire()
        try:
            group = self._group
            one = kind == "append_one"  # one event, answered with itself: a group without ends
            if group is None or group.then is not then or (group.ends is None) is not one:
                group = self._open_group(then, None if one else [])
            group.futures.append(future)
            events: list[Event] = group.args
            if one:
                events.append(args)
            else:
                events.extend(args)
                group.ends.append(len(events))  # type: ignore[union-attr]
            if len(events) >= self.max_batch:
                self._group = None  # full: the next append opens another
        finally:
            lock.release()
        return future

    def _open_group(
        self, then: Callable[[list[Event]], object] | None, ends: list[int] | None
    ) -> _Request:
        """Open and queue a new group of appends (under the group lock); the open
        group is closed."""
        group = self._group = _Request("append", [], [], ends, then, time.perf_counter())
        self._queue.put(group)
        return group

    def _submit_later(
        self, kind: str, args: Any, then: Callable[[list[Event]], object] | None
    ) -> Awaitable[Any]:
        """:meth:`_submit` when it cannot queue at once: it raises, or waits for room."""
        if not self._opened or self._closed:
            raise LogError("the log is not open")
        if not self._serving:
            raise LogError("the log's writer thread is not running")
        return self._submit_when_room(kind, args, then)

    async def _submit_when_room(
        self, kind: str, args: Any, then: Callable[[list[Event]], object] | None
    ) -> Any:
        loop = self._loop
        assert loop is not None
        while self._inflight >= self.max_pending:
            waiter: asyncio.Future[None] = loop.create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)
            if self._closed:  # closed while waiting for room: the writer is gone
                raise LogError("the log is not open")
        # (Room now, and nothing ran since the check: queued at once, or LogError.)
        return await self._submit(kind, args, then)

    def _close_group(self) -> None:
        """Let no more appends join the open group (it is queued already)."""
        with self._group_lock:
            self._group = None

    def _settle(self, group: _Request) -> None:
        """Let a burst of appends finish joining ``group`` before the writer takes it.

        The writer, woken by a group's first append, runs once it gets the
        GIL: when the loop thread waits for I/O (its turn is over), or in the
        middle of a turn, when the interpreter makes the loop hand the GIL
        over (after the switch interval, 5 ms by default). Taken in the middle
        of a burst (many tasks publishing in one turn), a group would hold
        half of it, and the two threads would then fight for the GIL over two
        commits in flight. Handing the GIL back once lets a loop that was
        waiting for it finish its turn first (``time.sleep(0)``: its timer
        slack, tens of microseconds, gives the loop thread time to take the
        GIL; ``os.sched_yield`` does not); a loop waiting for I/O does not
        take it. Only a group that has been open for :data:`_BURST` (the loop
        kept the writer out that long) with more than one caller is worth it:
        the slack would slow every commit of a few tasks appending in turn.
        The commit is delayed at most once.
        """
        if (
            self._group is group
            and len(group.futures) > 1
            and time.perf_counter() - group.opened >= _BURST
        ):
            time.sleep(0)

    def _take(self, request: _Request) -> int:
        """Close ``request`` if it is the open group (on the writer thread, as it
        takes it); its size, in events, against ``max_batch``."""
        if request.kind != "append":
            return 1
        with self._group_lock:
            if self._group is request:
                self._group = None
        return len(request.args)

    def _finish(self, batch: list[_Request]) -> None:
        """Answer a batch's requests (on the loop, once the writer is done with them).

        A group's callers each get their own events' slice of its result,
        after its ``then`` is called with the whole result (scheduled, not
        called here: it runs where its callers' resumptions would have, so
        every commit's events reach the bus in offset order). A caller that
        stopped waiting (its future done) is skipped; its events, committed,
        are still passed to ``then``.
        """
        loop = self._loop
        assert loop is not None
        answered = 0
        for request in batch:
            futures = request.futures
            answered += len(futures)
            error = request.error
            if error is not None:
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
            elif request.kind != "append":
                future = futures[0]
                if not future.done():
                    future.set_result(request.result)
            else:
                result = request.result
                if request.then is not None:
                    loop.call_soon(request.then, result)
                ends = request.ends
                # (plain zips: the lists are built together, one entry per caller)
                if ends is None:  # one event a caller, answered with itself
                    for future, event in zip(futures, result):  # noqa: B905
                        if not future.done():
                            future.set_result(event)
                else:
                    start = 0
                    for future, end in zip(futures, ends):  # noqa: B905
                        if not future.done():
                            future.set_result(result[start:end])
                        start = end
        self._inflight -= answered
        room = self.max_pending - self._inflight
        waiters = self._room_waiters
        while waiters and room > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                room -= 1

    async def append(self, events: Sequence[Event]) -> list[Event]:
        if not events:
            return []
        return await self._queue_append(events)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.append is not SQLiteLog.append:
            # A subclass's own append is what the bus must await: the default path.
            if cls._appending is SQLiteLog._appending:
                cls._appending = EventLog._appending
            if cls._append_then is SQLiteLog._append_then:
                cls._append_then = EventLog._append_then

    def _queue_append(self, events: Sequence[Event]) -> Awaitable[list[Event]]:
        """Queue an append now; its future (or, when the log is full, a coroutine).

        Each event is checked first (:func:`_check_encodable`).
        """
        for event in events:
            _check_encodable(event)
        return self._submit("append", events)

    def _queue_one(self, event: Event, then: Callable[[list[Event]], object]) -> Awaitable[Event]:
        """Queue one event's append now, its group called back with ``then``
        (see ``EventLog._append_then``); its future, answered with the event."""
        _check_encodable(event)
        return self._submit("append_one", event, then)

    #: The bus awaits the queued append itself: no coroutine frame of append's.
    _appending = _queue_append
    _append_then = _queue_one  # type: ignore[assignment]

    async def truncate(self, topic: str) -> Position:
        result: Position = await self._submit("truncate", topic)
        return result

    async def prune(self, now_: float | None = None) -> int:
        result: int = await self._submit("prune", now() if now_ is None else now_)
        return result

    async def check(self) -> None:
        await self._submit("check", None)

    async def save_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        rows = [row for row in map(letter_to_row, letters) if row is not None]
        if rows:
            await self._submit("save_letters", rows)

    async def delete_dead_letters(self, ids: Sequence[int]) -> None:
        if ids:
            await self._submit("delete_letters", list(ids))

    # -- reading -----------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, action: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if not self._opened or self._closed or self._pool is None or self._loop is None:
            raise LogError("the log is not open")

        def run() -> Any:
            return fn(self._reader())

        try:
            return await self._loop.run_in_executor(self._pool, run)
        except (sqlite3.Error, OSError) as exc:
            raise log_error(action, exc) from exc

    async def read(
        self,
        topic: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> builtins.list[Event]:
        if limit <= 0:
            return []
        retention = self.retention(topic)
        cutoff = -1.0 if retention.ttl is None else now() - retention.ttl

        def query(conn: sqlite3.Connection) -> tuple[str | None, list[Any]]:
            stream = conn.execute(
                "SELECT epoch, top FROM ec_streams WHERE topic = ?", (topic,)
            ).fetchone()
            if stream is None:
                return None, []
            floor = stream[1] - retention.size
            where, params = "topic = ? AND offset > ?", [topic, max(after, floor)]
            if before is not None:
                where += " AND offset < ?"
                params.append(before)
            if retention.ttl is not None:
                where += " AND time >= ?"
                params.append(cutoff)
            params.append(limit)
            # Five columns, not seven: every column costs the driver a
            # conversion per row, and most events have no tags, no key and
            # JSON data (see plain_events).
            rows = conn.execute(
                f"SELECT {_PAGE_COLUMNS} FROM ec_events WHERE {where} ORDER BY offset "
                f"{'DESC' if reverse else 'ASC'} LIMIT ?",
                params,
            ).fetchall()
            return stream[0], rows

        epoch, rows = await self._read("read", query)
        if epoch is None:
            return []
        return plain_events(topic, epoch, rows)

    async def position(self, topic: str) -> Position:
        store = self._store
        bucket = epoch_bucket(topic)

        def query(conn: sqlite3.Connection) -> Position:
            row = conn.execute(
                "SELECT epoch, top FROM ec_streams WHERE topic = ?", (topic,)
            ).fetchone()
            if row is not None:
                return Position(row[1], row[0])
            # No row: the empty epoch, written nowhere (a row created meanwhile
            # at most makes this one stale, never wrong: see log.base).
            generation = conn.execute(
                "SELECT gen FROM ec_gens WHERE bucket = ?", (bucket,)
            ).fetchone()
            return Position(0, empty_epoch(store, topic, generation[0] if generation else 0))

        result: Position = await self._read("read a position", query)
        return result

    async def earliest(self, topic: str) -> int | None:
        retention = self.retention(topic)
        cutoff = -1.0 if retention.ttl is None else now() - retention.ttl

        def query(conn: sqlite3.Connection) -> Any:
            stream = conn.execute("SELECT top FROM ec_streams WHERE topic = ?", (topic,)).fetchone()
            if stream is None:
                return None
            floor = stream[0] - retention.size
            row = conn.execute(
                "SELECT MIN(offset) FROM ec_events WHERE topic = ? AND offset > ? AND time >= ?",
                (topic, floor, cutoff),
            ).fetchone()
            return row[0] if row else None

        result: int | None = await self._read("read the earliest offset", query)
        return result

    async def lookup(self, topic: str, idempotency_key: str) -> Event | None:
        t = now()

        def query(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                f"SELECT s.epoch, {', '.join('e.' + c.strip() for c in _COLUMNS.split(','))} "
                "FROM ec_ikeys k JOIN ec_events e ON e.topic = k.topic AND e.offset = k.offset "
                "JOIN ec_streams s ON s.topic = k.topic "
                "WHERE k.topic = ? AND k.key = ? AND k.expires > ?",
                (topic, idempotency_key, t),
            ).fetchone()

        row = await self._read("look up an idempotency key", query)
        if row is None:
            return None
        epoch, offset, event_id, at, payload, binary, tags, ikey = row
        return stored_event(topic, offset, epoch, event_id, at, payload, bool(binary), tags, ikey)

    async def load_dead_letters(self, limit: int) -> builtins.list[DeadLetter]:
        def query(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                "SELECT * FROM (SELECT * FROM ec_dead_letters ORDER BY id DESC LIMIT ?) "
                "ORDER BY id",
                (limit,),
            ).fetchall()

        rows = await self._read("load dead letters", query)
        return [row_to_letter(row) for row in rows]

    def __repr__(self) -> str:
        return f"<SQLiteLog {self.path!r} synchronous={self.synchronous}>"


#: How long a group must have been open, when the writer first sees it, for
#: the writer to let a burst finish joining it (see SQLiteLog._settle).
_BURST: Final = 0.002

# The columns of an appended row: an append item's, then the offset.
_INSERT_EVENTS = (
    "INSERT INTO ec_events (topic, id, time, payload, binary, tags, ikey, offset) VALUES "
)
#: Rows per multi-row INSERT, largest first (a few statement shapes, all cached).
#: SQLite before 3.32 allows 999 parameters a statement.
_CHUNKS: Final = (256, 32, 4, 1) if sqlite3.sqlite_version_info >= (3, 32) else (96, 32, 4, 1)


@dataclass(frozen=True, slots=True)
class _RowShape:
    """How the rows of one kind are bound: the parameters a row, and a multi-row
    INSERT per chunk size of :data:`_CHUNKS`."""

    width: int
    sql: dict[int, str]

    @classmethod
    def of(cls, row: str) -> _RowShape:
        return cls(row.count("?"), {n: _INSERT_EVENTS + ", ".join([row] * n) for n in _CHUNKS})


#: A row with every column bound: ``(topic, id, time, payload, binary, tags, ikey, offset)``.
_FULL_ROW: Final = _RowShape.of("(?, ?, ?, ?, ?, ?, ?, ?)")
#: The common row (JSON data, no tags, no idempotency key), its constant columns
#: written in the statement: ``(topic, id, time, payload, offset)``. The sqlite3
#: module binds an exact ``int``, ``float``, ``str`` or ``bytearray`` directly, but
#: looks up an adapter for anything else (a ``bool``, ``None``, ``bytes``): ~0.3-0.4 µs
#: a value, with the GIL held. So the payload is bound as a copy to a ``bytearray``
#: (a BLOB all the same): the copy of a small payload costs a fifth of the lookup.
_PLAIN_ROW: Final = _RowShape.of("(?, ?, ?, ?, 0, NULL, NULL, ?)")


def _bindable(item: AppendItem) -> tuple[Any, ...]:
    """A rare row's values as the sqlite3 module binds directly (see :data:`_PLAIN_ROW`):
    its payload and tags as ``bytearray``, its flag as an ``int`` (the same BLOBs and
    integer stored); only an absent value (``None``) still takes the adapter lookup."""
    topic, event_id, at, payload, binary, tags, ikey = item
    return (
        topic,
        event_id,
        at,
        bytearray(payload),
        1 if binary else 0,
        None if tags is None else bytearray(tags),
        ikey,
    )


def _insert_events(conn: sqlite3.Connection, shape: _RowShape, params: list[Any]) -> None:
    """Insert the rows of ``params`` (flat, ``shape.width`` a row) with a few
    multi-row statements: one step (and one release of the GIL) per statement,
    not per row as with executemany."""
    i, total = 0, len(params)
    for n in _CHUNKS:
        sql = shape.sql[n]
        width = n * shape.width
        while total - i >= width:
            conn.execute(sql, params[i : i + width])
            i += width


def _check_encodable(event: Event) -> None:
    """Fail now, on the loop, what could fail in ``event`` at the writer.

    The writer thread commits a group of appends together, and one caller's
    bad event must not fail the others': its data is encoded here (once,
    cached for the writer and the wire) and its tags too (the writer encodes
    them again, for the row).

    Raises:
        EncodeError: its data or tags cannot be encoded.
    """
    event.encoded_data()
    if event.tags:
        encode_tags(event.tags)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
