"""Idle connection memory: the hub's RSS per connection, and where it lives.

``--connections`` (default 10,000 and 18,000; the file-descriptor limit here
is 20,000) WebSocket clients connect to one server and subscribe once each:
each client is its own user, subscribed to one of 100 channels. Then nothing
is published. Servers, one after another in the same run, each in its own
process pinned to CPU 0 (the clients, ``hub.py``'s raw-socket load generators,
on the other CPU):

* **eventcast**: the hub as ``eventcast serve`` runs it (``hub.py``'s
  server: ``create_app`` under uvicorn with ``uvicorn_config``); a client sends
  ``connect`` with its JWT and one ``subscribe``;
* **websockets**: a plain ``websockets`` server, one handler coroutine per
  connection, channels as sets (``hub.py``'s ``serve_websockets_rooms``);
* **floor**: a bare uvloop protocol, one small object per connection
  (``hub.py``'s ``serve_floor_rooms``).

Figures:

* **RSS per connection** = (RSS with every client connected - RSS of the
  same server before the first client) / N, both read right after a full
  garbage collection in the server;
* **where it lives** (``sys.getsizeof`` walk): the objects only one
  connection holds, grouped by the part holding them (websockets' sans-I/O
  protocol, uvicorn's protocol, the ASGI task and its coroutine frames,
  eventcast's Connection, ServerSession, Memberships, the transport); see
  ``benchmarks/_probe.py``;
* **by line** (``--tracemalloc``, eventcast by default): the server runs
  under tracemalloc; what was allocated between the two reports, by file and
  line, per connection. What RSS holds beyond it was allocated outside
  Python's allocator (uvloop's buffers, the C parts of httptools) or is
  allocator overhead.

    python benchmarks/memory.py [--connections 10000,18000] [--systems eventcast,websockets,floor]
                                [--tracemalloc eventcast] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any

from _common import header, loadavg, machine, process_run_time, save_json, system_busy

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import hub  # noqa: E402  (benchmarks/hub.py: its servers and load generators)

SYSTEMS = ("eventcast", "websockets", "floor")
CHANNELS = 100


class MemoryRun(hub.RoomsRun):
    """One server holding N idle clients, each in one of 100 channels; probed twice."""

    def __init__(
        self,
        kind: str,
        args: argparse.Namespace,
        cpus: tuple[set[int], set[int]] | None,
        report: str,
    ) -> None:
        super().__init__(kind, args, cpus)
        self.shared.rooms.value = CHANNELS
        self.shared.user_channels.value = 0
        self.report = report
        self.reports = 0
        self.before: dict[str, Any] = {}

    def probe(self, timeout: float = 600.0) -> dict[str, Any]:
        """Ask the server for a report (RSS after a collection, walk, tracemalloc)."""
        assert self.server is not None
        self.reports += 1
        path = f"{self.report}.{self.reports}.json"
        os.kill(self.server.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline or self.server.poll() is not None:
                raise RuntimeError(f"the {self.kind} server wrote no report")
            time.sleep(0.05)
        with open(path) as f:
            report: dict[str, Any] = json.load(f)
        return report

    def before_clients(self) -> None:
        time.sleep(1.0)  # let the server finish starting
        self.before = self.probe()
        assert self.server is not None
        self.cpu_before = process_run_time(self.server.pid)
        self.busy_before = system_busy()
        self.connect_started = time.perf_counter()


def measure(
    kind: str,
    connections: int,
    args: argparse.Namespace,
    cpus: tuple[set[int], set[int]] | None,
    tracemalloc: bool,
) -> dict[str, Any]:
    """Connect ``connections`` idle clients to one server; its memory before and after."""
    run_args = argparse.Namespace(
        clients=connections,
        workers=args.workers,
        room_size=max(1, connections // CHANNELS),
        no_user_channels=True,
    )
    scratch = tempfile.mkdtemp(prefix="eventcast-memory-")
    report = os.path.join(scratch, "report")
    env = {"EVENTCAST_BENCH_PROBE": report}
    if tracemalloc:
        env["EVENTCAST_BENCH_TRACEMALLOC"] = "1"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    run = MemoryRun(kind, run_args, cpus, report)
    try:
        run.start()
        connect_s = time.perf_counter() - run.connect_started
        assert run.server is not None
        connect_cpu = process_run_time(run.server.pid) - run.cpu_before
        other = system_busy() - run.busy_before
        time.sleep(2.0)  # the last replies go out; nothing else happens
        after = run.probe()
        run.finish([])  # stops the clients and collects what they report
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        run.close()
    rss_delta = after["rss"] - run.before["rss"]
    row: dict[str, Any] = {
        "system": kind,
        "connections": connections,
        "tracemalloc": tracemalloc,
        "connect_s": connect_s,
        "connect_cpu_ms_per_client": connect_cpu / connections * 1e3,
        "other_cpu_pct": max(0.0, other - connect_cpu) / max(connect_s, 1e-9) * 100,
        "loadavg": loadavg(),
        "rss_before": run.before["rss"],
        "rss_after": after["rss"],
        "rss_per_connection": rss_delta / connections,
        "walk": after.get("walk"),
        "walk_error": after.get("walk_error"),
    }
    if tracemalloc and "traced" in after:
        row["traced_per_connection"] = (after["traced"] - run.before["traced"]) / connections
        row["tracemalloc"] = after.get("tracemalloc")
    return row


def kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def print_rss(rows: list[dict[str, Any]]) -> None:
    print("\nIdle connections: RSS per connection (connect + one subscription each)")
    print(
        f"{'system':<10} | {'connections':>11} | {'RSS before':>10} | {'RSS after':>10} "
        f"| {'per connection':>14} | {'vs floor':>8} | {'connect s':>9} "
        f"| {'CPU ms/connect':>14} | {'other CPU':>9} | {'load avg':>14}"
    )
    floor = {r["connections"]: r["rss_per_connection"] for r in rows if r["system"] == "floor"}
    for r in rows:
        if r["tracemalloc"]:
            continue
        base = floor.get(r["connections"])
        ratio = f"{r['rss_per_connection'] / base:7.1f}x" if base else f"{'-':>8}"
        print(
            f"{r['system']:<10} | {r['connections']:>11} | {r['rss_before'] / 2**20:7.1f} MiB "
            f"| {r['rss_after'] / 2**20:7.1f} MiB | {kib(r['rss_per_connection']):>14} | {ratio} "
            f"| {r['connect_s']:9.1f} | {r['connect_cpu_ms_per_client']:14.2f} "
            f"| {r['other_cpu_pct']:8.0f}% | {r['loadavg']:>14}"
        )


def print_walk(row: dict[str, Any]) -> None:
    walk = row.get("walk")
    title = f"{row['system']}, {row['connections']} connections"
    if not walk:
        print(f"\n(no walk for {title}: {row.get('walk_error')})")
        return
    print(
        f"\nWhere one connection's objects live ({title}; sys.getsizeof of the objects only "
        f"it holds: {walk['total_bytes'] / 1024:.1f} KiB of {kib(row['rss_per_connection'])} RSS)"
    )
    for part in walk["parts"]:
        top = ", ".join(f"{t['type']} x{t['count']} {t['bytes']}B" for t in part["top_types"][:5])
        print(f"  {part['bytes']:>7} B {part['objects']:>5} objects  {part['part']}: {top}")
    if walk.get("coroutine_chain"):
        print(f"  suspended in: {' -> '.join(walk['coroutine_chain'])}")


def print_tracemalloc(row: dict[str, Any], top: int = 25) -> None:
    stats = (row.get("tracemalloc") or {}).get("lineno")
    if not stats:
        return
    n = row["connections"]
    print(
        f"\ntracemalloc, {row['system']} ({n} connections): allocated between the reports, "
        f"{kib(row['traced_per_connection'])} per connection in all (RSS per connection in "
        f"this traced run: {kib(row['rss_per_connection'])}); top lines, bytes per connection:"
    )
    for stat in stats[:top]:
        where = stat["where"]
        if "site-packages/" in where:
            where = where.split("site-packages/", 1)[1]
        elif "/src/eventcast/" in where:
            where = "eventcast/" + where.split("/src/eventcast/", 1)[1]
        print(f"  {stat['size_diff'] / n:8.0f} B  {stat['count_diff'] / n:6.2f} blocks  {where}")
    by_file = (row.get("tracemalloc") or {}).get("filename") or []
    if by_file:
        print("  by file:")
        for stat in by_file[:12]:
            where = stat["where"].rsplit(":", 1)[0]
            for marker in ("site-packages/", "/src/"):
                if marker in where:
                    where = where.split(marker, 1)[1]
            print(f"  {stat['size_diff'] / n:8.0f} B  {where}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--connections", help="comma-separated counts (default 10000,18000; quick: 1000)"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}"
    )
    parser.add_argument(
        "--tracemalloc",
        default="eventcast",
        help="systems also run under tracemalloc, at the first count ('' for none)",
    )
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--quick", action="store_true", help="1,000 connections")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.connections is None:
        args.connections = "1000" if args.quick else "10000,18000"
    counts = [int(n) for n in args.connections.split(",") if n.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    traced = [s.strip() for s in args.tracemalloc.split(",") if s.strip()]
    for s in systems + traced:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}")
    cores = sorted(os.sched_getaffinity(0))
    cpus = None
    if not args.no_pin and len(cores) >= 2:
        cpus = ({cores[0]}, set(cores[1:]))
    print(header("idle connection memory"))
    print(
        f"({', '.join(map(str, counts))} WebSocket connections, each its own user, subscribed "
        f"to one of {CHANNELS} channels; {args.workers} client processes; "
        + (f"server on CPU {sorted(cpus[0])})" if cpus else "no CPU pinning)"),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for n in counts:
        for kind in systems:
            row = measure(kind, n, args, cpus, tracemalloc=False)
            print(
                f"  {kind}, {n} connections: {kib(row['rss_per_connection'])} per connection "
                f"(connected in {row['connect_s']:.1f}s)",
                flush=True,
            )
            rows.append(row)
    for kind in traced:
        row = measure(kind, counts[0], args, cpus, tracemalloc=True)
        print(f"  {kind} under tracemalloc, {counts[0]} connections: done", flush=True)
        rows.append(row)
    print_rss(rows)
    for row in rows:
        if not row["tracemalloc"] and row["connections"] == counts[0]:
            print_walk(row)
    for row in rows:
        if row["tracemalloc"]:
            print_tracemalloc(row)
    sys.stdout.flush()
    out = {"machine": machine(), "settings": vars(args), "results": rows}
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
