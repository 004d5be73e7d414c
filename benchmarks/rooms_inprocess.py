"""Many rooms in one process: the hub's side of a ``publish`` alone, on real sockets.

``hub.py``'s many-rooms workload measures the served hub against its load
generators, which share the machine's two CPUs with it and wake on every write:
one run's figures move by up to ±25% with the host. This measures only what the
server does for ``POST /api/publish`` into rooms of 10 (4,000 clients, each also
in its own user channel, as ``hub.py`` draws them): eventcast's HTTP protocol and
hub, or the floor system's bare protocol, with every member a real loopback TCP
connection whose other end is left unread (the kernel's buffers hold what one
run writes). Requests are fed to the protocol in the process, ``--per-turn`` per
loop turn, so nothing else runs; the process's user and system CPU are divided
by the deliveries made.

Each system runs in a fresh process, the systems alternating, ``--rounds`` times.
The figures still drift with the host between rounds; compare systems (or two
trees, ``--src``) within one round.

``--cache`` counts instead, under valgrind's cachegrind with its cache model (a
4 MiB last level: the share of the L3 that a server writing to thousands of
sockets keeps, the kernel's traffic being invisible to valgrind), eventcast's
instructions and its data reads that miss the first and the last level, per
publication: the difference of a run of 2,000 and one of 14,000 publications,
with the collector off in the window, hashing seeded, the address space not
randomised and no pings due. These move by ~1% (instructions) and ~7% (last-level
misses) from run to run; a timed run, by 10-25%.

    .venv/bin/python benchmarks/rooms_inprocess.py [--rounds 3] [--src other/src]
    .venv/bin/python benchmarks/rooms_inprocess.py --cache [--src other/src]  # needs valgrind
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
#: Members per room (``hub.py``'s default room size).
ROOM = 10


def _pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    """``n`` connected loopback TCP pairs: (server side, client side)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    pairs = []
    for _ in range(n):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        pairs.append((server, client))
    listener.close()
    return pairs


async def _run(system: str, clients: int, pubs: int, per_turn: int) -> dict[str, Any]:
    import instructions
    from _common import ws_frame
    from run import load

    hub = load("hub")
    rooms = clients // ROOM
    loop = asyncio.get_running_loop()
    pairs = _pairs(clients)
    rng = random.Random(19)
    drawn = [hub.draw_channel(rng, rooms, clients) for _ in range(pubs)]
    now = time.time_ns()
    requests = [
        hub.api_request(b"/api/publish", hub.api_body("publish", [channel], now, i))
        for i, (channel, _) in enumerate(drawn)
    ]
    deliveries = sum(ROOM if in_room else 1 for _, in_room in drawn)
    api_transport = instructions._Counted()
    result: dict[str, Any] = {}

    async def measure(member: Any, api: Any, path: bytes, subscription: Any) -> None:
        for i, (server, _) in enumerate(pairs):
            transport, protocol = await loop.connect_accepted_socket(member, server)
            protocol.data_received(instructions._UPGRADE % path)
            joined = [hub.room_channel(i % rooms), hub.user_channel(i)]
            transport.get_protocol().data_received(ws_frame(subscription(i, joined)))
        await asyncio.sleep(0.2)  # every connect and subscribe answered
        protocol = api()
        protocol.connection_made(api_transport)
        if os.environ.get("EVENTCAST_BENCH_GC_OFF"):
            gc.collect()
            gc.disable()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        for k in range(0, pubs, per_turn):
            for request in requests[k : k + per_turn]:
                protocol.data_received(request)
            await asyncio.sleep(0)  # the end of the turn: dispatch and writes
        await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        assert api_transport.writes == pubs, (api_transport.writes, pubs)
        user = after.ru_utime - before.ru_utime
        kernel = after.ru_stime - before.ru_stime
        result.update(
            system=system,
            publications=pubs,
            deliveries=deliveries,
            user_us=user / deliveries * 1e6,
            kernel_us=kernel / deliveries * 1e6,
            per_publication_us=(user + kernel) / pubs * 1e6,
            seconds=elapsed,
        )

    if system == "eventcast":
        from uvicorn.server import ServerState

        from eventcast.server.app import tune_collector
        from eventcast.server.auth import mint_token

        # (Under valgrind a run takes minutes: no pings fall due in it.)
        quiet = {"ping_interval": 3600.0} if os.environ.get("EVENTCAST_BENCH_GC_OFF") else {}
        async with instructions._eventcast_config(**quiet) as config:
            tune_collector()  # as `eventcast serve` does
            state = ServerState()

            def subscribe(i: int, joined: list[str]) -> bytes:
                token = mint_token(secret=hub.SECRET, user=f"user{i}", ttl=None).encode()
                return hub.room_subscription("eventcast-rooms", token, joined)  # type: ignore[no-any-return]

            await measure(
                lambda: config.ws_protocol_class(config=config, server_state=state, app_state={}),
                lambda: config.http_protocol_class(config=config, server_state=state, app_state={}),
                b"/connection/websocket",
                subscribe,
            )
    else:
        floor = hub.floor_rooms_protocol()
        await measure(
            floor, floor, b"/", lambda i, joined: hub.room_subscription("floor", b"", joined)
        )
    for server, client in pairs:
        server.close()
        client.close()
    return result


def _child(system: str, clients: int, pubs: int, per_turn: int) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_run(system, clients, pubs, per_turn))))


#: ``--cache``: the publications of the small and the large run.
CACHE_RUNS = (2_000, 14_000)
#: ``--cache``: cachegrind's counters reported, per publication.
CACHE_EVENTS = ("Ir", "D1mr", "DLmr")


def _child_command(
    src: str, system: str, clients: int, pubs: int, per_turn: int
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a child process running ``system`` from ``src``."""
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{HERE}"}
    command = [sys.executable, os.path.abspath(__file__), "--child", system]
    return [*command, str(clients), str(pubs), str(per_turn)], env


def _label(system: str, src: str) -> str:
    """A system's name in the output (with its tree, when not this one)."""
    return system if src == SRC else f"{system} ({src})"


def _cached(src: str, clients: int, pubs: int, per_turn: int) -> dict[str, int]:
    """cachegrind's totals of one eventcast run of ``pubs`` publications."""
    child, env = _child_command(src, "eventcast", clients, pubs, per_turn)
    env.update(PYTHONHASHSEED="0", EVENTCAST_BENCH_GC_OFF="1")
    with tempfile.NamedTemporaryFile(prefix="eventcast-cachegrind-") as out:
        command = ["setarch", "-R", "valgrind", "--tool=cachegrind", "--cache-sim=yes"]
        command += ["--LL=4194304,16,64", f"--cachegrind-out-file={out.name}", *child]
        subprocess.run(command, env=env, capture_output=True, check=True)
        events: list[str] = []
        totals: dict[str, int] = {}
        with open(out.name, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("events:"):
                    events = line.split()[1:]
                elif line.startswith("summary:"):
                    totals = dict(zip(events, map(int, line.split()[1:]), strict=True))
        return totals


def _cache_case(args: argparse.Namespace) -> list[dict[str, Any]]:
    small, large = CACHE_RUNS
    rows = []
    print(
        f"# many rooms in one process, cachegrind (4 MiB last level): {args.clients} "
        f"members, per publication ({large:,} minus {small:,} publications)"
    )
    for src in [SRC, *args.src]:
        counts = [_cached(src, args.clients, n, args.per_turn) for n in (small, large)]
        row: dict[str, Any] = {"src": src}
        row.update(
            {e: (counts[1].get(e, 0) - counts[0].get(e, 0)) / (large - small) for e in CACHE_EVENTS}
        )
        rows.append(row)
        print(
            f"{src:>40}: " + ", ".join(f"{e} {row[e]:,.1f}" for e in CACHE_EVENTS),
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4000)
    parser.add_argument("--publications", type=int, default=40_000)
    parser.add_argument("--per-turn", type=int, default=4, help="requests per loop turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--src", action="append", default=[], help="another tree's src, too")
    parser.add_argument("--cache", action="store_true", help="count under cachegrind")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        system, clients, pubs, per_turn = args.child
        _child(system, int(clients), int(pubs), int(per_turn))
        return []
    if args.cache:
        return _cache_case(args)
    runs = [("eventcast", src) for src in [SRC, *args.src]] + [("floor", SRC)]
    rows: list[dict[str, Any]] = []
    print(
        f"# many rooms in one process: {args.clients} loopback members in rooms of {ROOM}, "
        f"{args.publications} POST /api/publish, {args.per_turn} per loop turn"
    )
    for n in range(1, args.rounds + 1):
        for system, src in runs:
            command, env = _child_command(
                src, system, args.clients, args.publications, args.per_turn
            )
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(round=n, src=src)
            rows.append(row)
            print(
                f"round {n} {_label(system, src):>40}: user {row['user_us']:.2f} µs, "
                f"kernel {row['kernel_us']:.2f} µs per delivery; "
                f"{row['per_publication_us']:.1f} µs per publication",
                flush=True,
            )
    for system, src in runs:
        mine = [r for r in rows if r["system"] == system and r["src"] == src]
        user = statistics.median(r["user_us"] for r in mine)
        per_publication = statistics.median(r["per_publication_us"] for r in mine)
        print(
            f"median {_label(system, src):>39}: user {user:.2f} µs per delivery, "
            f"{per_publication:.1f} µs per publication"
        )
    return rows


if __name__ == "__main__":
    main()
