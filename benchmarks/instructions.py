"""Instructions per event, counted by valgrind: a before-and-after the host's noise cannot blur.

On a shared VM the same code's throughput moves by 10-50% from one run to the
next, more than most changes to a hot path. The number of instructions the
work takes does not: each case runs twice under ``valgrind --tool=cachegrind
--cache-sim=no``, with a small and a large count of events, and the difference
of the two totals over the difference of the counts is the instructions per
event of the work itself (start-up and imports cancel out). Every thread
counts, SQLite's writer too. Instructions are not time (a cache miss costs
more than an add), so this complements the timed benchmarks; it does not
replace them.

Cases:

* ``one``: ``bus.py``'s one subscriber on one topic, ``async for``, uvloop:
  eventcast, the naive ``asyncio.Queue`` design and pyee, per delivery.
* ``durable``: ``log.py``'s 1,024 tasks on SQLite (``synchronous=FULL``): its
  floor system, ``log.append([e])`` and ``bus.publish`` (history 1,000, one
  subscriber), per event. Valgrind runs one thread at a time, so the commit
  groups are not those of a timed run.
* ``durable1``: ``durable`` with the writer's work run as a task of the loop, once a
  turn (SQLiteLog's own ``_take``, ``_run_batch`` and ``_finish``; the floor's commit
  function): the commit groups no longer depend on how two threads share the GIL, so
  the count moves by under 1% from run to run (``durable``'s by ~2k instructions per
  event; what still moves is the wall clock's share: an id chunk a millisecond), and
  it is every thread's work all the same. What it leaves out is the cost of two
  threads sharing one GIL, which the timed ``log.py`` shows.
* ``api``: the many rooms' intake (``hub.py``): publications into channels
  nobody reads, 50 per ``POST /api/batch`` or one per ``POST /api/publish``,
  fed to the server's HTTP protocol in process (a transport that only counts
  writes: no system calls), per publication: eventcast (its HTTP protocol and
  API, as ``eventcast serve`` runs them) and the floor system.
* ``client``: the many rooms' ``client`` source: a member publishes over its
  WebSocket, one publication per frame and per loop turn (as at half load),
  fed in process to the server's WebSocket protocol (``eventcast serve``'s own,
  and the floor system's); ``intake`` into a channel nobody reads, ``room``
  into its room of 10 (itself and 9 others, each a counting transport), per
  publication.

``--src DIR`` (repeatable) runs eventcast from other trees too, a worktree of
an earlier commit say, beside this checkout's ``src``.

    python benchmarks/instructions.py [--cases one,durable,durable1,api] [--src /path/to/old/src]

Not part of ``make bench``: valgrind is a tool of the machine (``apt-get install
valgrind``), not a dependency of the project.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
CASES: dict[str, tuple[str, ...]] = {
    "one": ("eventcast", "naive asyncio.Queue", "pyee"),
    "durable": ("floor", "append", "bus.publish"),
    "durable1": ("floor", "append", "bus.publish"),
    "api": ("eventcast batch", "floor batch", "eventcast publish", "floor publish"),
    "client": ("eventcast intake", "floor intake", "eventcast room", "floor room"),
}
#: Systems run from every tree given (the others are the same code in each).
OURS = (
    "eventcast",
    "append",
    "bus.publish",
    "eventcast batch",
    "eventcast publish",
    "eventcast intake",
    "eventcast room",
)
#: Events of the small and the large run of each case (per task for ``durable``,
#: requests after the warm-up for ``api``).
COUNTS = {
    "one": (2_000, 202_000),
    "durable": (2, 22),
    "durable1": (2, 12),
    "api": (100, 600),
    "client": (1_000, 6_000),
}
TASKS = 1024
UNIT = {
    "one": "delivery",
    "durable": "event",
    "durable1": "event",
    "api": "publication",
    "client": "publication",
}
#: ``api``: publications per ``batch`` request; requests in the pool sent in turn.
BATCH = 50
API_POOL = 400


def _one(system: str, events: int) -> None:
    import uvloop

    from run import load

    bus = load("bus")
    uvloop.run(bus.SYSTEMS[system](1, events, "iter", 1))


def _durable(system: str, per_task: int) -> None:
    import uvloop

    uvloop.run(_durable_run(system, per_task, one_thread=False))


def _durable1(system: str, per_task: int) -> None:
    import uvloop

    uvloop.run(_durable_run(system, per_task, one_thread=True))


async def _durable_run(system: str, per_task: int, one_thread: bool) -> None:
    from eventcast.log.sqlite import SQLiteLog
    from run import load

    log_bench = load("log")
    step: Callable[[int], Awaitable[int]]
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "events.db")
        async with contextlib.AsyncExitStack() as running:
            if system == "floor":
                floor = log_bench.floor_system(path, one_thread=one_thread)
                step, _ = await running.enter_async_context(floor)
            else:
                log = SQLiteLog(path)
                if system == "append":
                    await running.enter_async_context(log_bench.appending(log))
                    step = log_bench.append_step(log, 1)
                else:
                    system_ = log_bench.bus_system(log, 1000)
                    _, step, _ = await running.enter_async_context(system_)
                if one_thread:
                    await running.enter_async_context(_writer_on_loop(log))

            async def worker(w: int) -> None:
                for i in range(per_task):
                    await step(w * 10**9 + i)

            await asyncio.gather(*(worker(w) for w in range(TASKS)))


@contextlib.asynccontextmanager
async def _writer_on_loop(log: Any) -> AsyncIterator[None]:
    """Run an open SQLiteLog's writer work as a task of the loop (``durable1``).

    Its requests go to a queue of this task's: each turn, what is queued is taken,
    committed and answered with the log's own ``_take``, ``_run_batch`` and
    ``_finish``, on a connection of its own (the writer thread waits on its old
    queue meanwhile, and gets it back to close).
    """
    import queue

    own: queue.SimpleQueue[Any] = queue.SimpleQueue()
    thread_queue, log._queue = log._queue, own
    conn = log._connect(readonly=False)
    done = False

    async def writer() -> None:
        while not done:
            await asyncio.sleep(0)
            batch = []
            with contextlib.suppress(queue.Empty):
                while True:
                    request = own.get_nowait()
                    log._take(request)
                    batch.append(request)
            if batch:
                log._run_batch(conn, batch)
                log._finish(batch)

    task = asyncio.get_running_loop().create_task(writer())
    try:
        yield
    finally:
        done = True
        await task
        conn.close()
        log._queue = thread_queue


class _Counted(asyncio.Transport):
    """A transport that counts what is written to it (``api``, ``client``)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.closing = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""


def _api_requests(source: str) -> tuple[list[bytes], list[bytes]]:
    """Requests of ``hub.py``'s intake phase (its void channels, 4,000 clients in rooms
    of 10): one per channel (the warm-up), and a pool drawn at random to send in turn
    (the same in every run, so that building it cancels out)."""
    from run import load

    hub = load("hub")
    rooms, clients = 400, 4000
    per = BATCH if source == "batch" else 1
    every = [hub.room_channel(k) for k in range(rooms)]
    every += [hub.user_channel(i) for i in range(clients)]
    rng = random.Random(19)
    drawn = [hub.draw_channel(rng, rooms, clients)[0] for _ in range(API_POOL * BATCH)]
    path = b"/api/" + source.encode()

    def requests(channels: list[str]) -> list[bytes]:
        void = [hub.void_channel(c) for c in channels]
        return [
            hub.api_request(path, hub.api_body(source, void[i : i + per], time.time_ns(), i))
            for i in range(0, len(void) - per + 1, per)
        ]

    return requests(every), requests(drawn)


def _api(system: str, requests: int) -> None:
    import uvloop

    uvloop.run(_api_run(system, requests))


async def _api_run(system: str, count: int) -> None:
    from run import load

    kind, source = system.split()
    warm, pool = _api_requests(source)
    sent = count * (1 if source == "batch" else BATCH)  # the same publications either way

    def feed(protocol: asyncio.Protocol) -> None:
        protocol.connection_made(transport)
        for request in warm:
            protocol.data_received(request)
        for i in range(sent):
            protocol.data_received(pool[i % len(pool)])

    transport = _Counted()
    if kind == "floor":
        feed(load("hub").floor_rooms_protocol()())
    else:
        async with _eventcast_protocol() as protocol:
            feed(protocol)
    assert transport.writes == len(warm) + sent, (transport.writes, len(warm) + sent)


#: ``client``: the members of the publisher's room, itself included.
ROOM = 10
#: ``client``: a WebSocket handshake's request head (header names as uvicorn hands them on).
_UPGRADE = (
    b"GET %s HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)


def _client(system: str, publications: int) -> None:
    import uvloop

    uvloop.run(_client_run(system, publications))


async def _client_run(system: str, count: int) -> None:
    from _common import ws_frame
    from run import load

    hub = load("hub")
    kind, shape = system.split()
    room = hub.room_channel(0)
    target = room if shape == "room" else hub.void_channel(room)
    members = [_Counted() for _ in range(ROOM)]

    client_kind = "eventcast-rooms" if kind == "eventcast" else "floor"

    def frames(first: int) -> list[bytes]:
        """The publisher's frames, ``first`` its first command id (eventcast)."""
        return [
            ws_frame(hub.room_publication(client_kind, target, b'{"ts":1,"seq":%d}' % i, first + i))
            for i in range(count)
        ]

    async def publish(protocol: asyncio.Protocol, sent: list[bytes]) -> None:
        for frame in sent:
            protocol.data_received(frame)
            await asyncio.sleep(0)  # a loop turn per publication: the writes go out

    async with contextlib.AsyncExitStack() as running:
        if kind == "floor":
            protocol_class: Any = hub.floor_rooms_protocol()

            def member(i: int, transport: _Counted) -> asyncio.Protocol:
                protocol = protocol_class()
                protocol.connection_made(transport)
                protocol.data_received(_UPGRADE % b"/")
                protocol.data_received(ws_frame(hub.room_subscription(client_kind, b"", [room])))
                return protocol  # type: ignore[no-any-return]

            first = 0
        else:
            from uvicorn.server import ServerState

            from eventcast.server.auth import mint_token

            config = await running.enter_async_context(_eventcast_config())
            state = ServerState()

            def member(i: int, transport: _Counted) -> asyncio.Protocol:
                upgrade = config.ws_protocol_class(config=config, server_state=state, app_state={})
                upgrade.connection_made(transport)
                upgrade.data_received(_UPGRADE % b"/connection/websocket")
                token = mint_token(secret=hub.SECRET, user=f"user{i}", ttl=None).encode()
                protocol = transport.get_protocol()
                assert isinstance(protocol, asyncio.Protocol)
                protocol.data_received(ws_frame(hub.room_subscription(client_kind, token, [room])))
                return protocol

            first = 3
        protocols = [member(i, t) for i, t in enumerate(members)]
        await asyncio.sleep(0.01)  # every connect and subscribe answered
        before = [t.writes for t in members]
        await publish(protocols[0], frames(first))
        written = [t.writes - b for t, b in zip(members, before, strict=True)]
    # Every publication reached every member (the publisher: its reply, at least).
    reached = ROOM if shape == "room" else 1
    expected = [count] * reached + [0] * (ROOM - reached)
    if kind == "floor" and shape == "intake":
        expected[0] = 0  # the floor answers nothing to a publisher
    assert written == expected, (written, expected)


@contextlib.asynccontextmanager
async def _eventcast_config(**overrides: Any) -> AsyncIterator[Any]:
    """The uvicorn config of ``eventcast serve`` (``hub.py``'s many-rooms settings, with
    ``overrides``), its app started."""
    from uvicorn.config import Config
    from uvicorn.lifespan.on import LifespanOn

    from eventcast.server.app import create_app, uvicorn_config
    from run import load

    settings = load("hub").eventcast_settings("", "rooms").model_copy(update=overrides)
    options = uvicorn_config(settings, host="127.0.0.1", port=8000)
    options["log_level"] = "warning"
    config = Config(create_app(settings), **options)
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    try:
        yield config
    finally:
        await lifespan.shutdown()


@contextlib.asynccontextmanager
async def _eventcast_protocol() -> AsyncIterator[asyncio.Protocol]:
    """The HTTP protocol of ``eventcast serve`` (``hub.py``'s many-rooms settings), its
    app started."""
    from uvicorn.server import ServerState

    async with _eventcast_config() as config:
        yield config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=ServerState(), app_state={}
        )


def count(src: str, case: str, system: str, n: int) -> int:
    """Instructions of one run of ``case``/``system`` with ``n`` events, every thread."""
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{HERE}"}
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        case,
        system,
        str(n),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{case}/{system} failed under valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_event(src: str, case: str, system: str) -> float:
    small, large = COUNTS[case]
    events = (large - small) * {"durable": TASKS, "durable1": TASKS, "api": BATCH}.get(case, 1)
    return (count(src, case, system, large) - count(src, case, system, small)) / events


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default="one,durable,durable1,api,client",
        help="comma-separated: one, durable, durable1, api, client",
    )
    parser.add_argument("--src", action="append", default=[], help="another tree's src, too")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, system, n = args.child
        children = {
            "one": _one,
            "durable": _durable,
            "durable1": _durable1,
            "api": _api,
            "client": _client,
        }
        children[case](system, int(n))
        return {}
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return {}
    sources = [SRC, *args.src]
    results: dict[str, Any] = {}
    for case in args.cases.split(","):
        print(f"\n## {case}: instructions per {UNIT[case]} (valgrind)")
        print(f"{'system':>22} | " + " | ".join(f"{s[-40:]:>40}" for s in sources))
        for system in CASES[case]:
            trees = sources if system in OURS else [SRC]
            row = {src: per_event(src, case, system) for src in trees}
            results[f"{case}/{system}"] = row
            cells = [f"{row[s]:>40,.0f}" if s in row else f"{'(same)':>40}" for s in sources]
            print(f"{system:>22} | " + " | ".join(cells))
            sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
