"""Run every benchmark in turn: host, bus, log, hub, rooms, memory, backplane, ingest,
wire (``make bench``).

Each module is also runnable alone (``python benchmarks/<name>.py --help``)
and exposes ``main(argv) -> dict``; ``rooms`` is ``hub.py --workload rooms``.
``host`` goes first: the host's own stalls, against which the rest is read.
At the end, the figures of issue 19 (performance round 2) are printed
together, each beside its baseline from the same run.

    python benchmarks/run.py [--quick] [--only bus,log] [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from types import ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ("host", "bus", "log", "hub", "rooms", "memory", "backplane", "ingest", "wire")
#: The file of each module, where it is not ``<name>.py``.
FILES = {"rooms": "hub"}
#: Arguments every run of a module gets.
ALWAYS = {"rooms": ["--workload", "rooms"]}
#: Default arguments per module, so each default run stays within ~5 minutes
#: (rooms: ~20 minutes for 2 sizes x 3 systems x 3 runs; memory: ~3).
DEFAULTS = {
    "bus": ["--passes", "3", "--profile"],
    "log": ["--py-spy"],
    # 20 publications/s beside full and half load: the latency floor of the
    # machine, which the `floor` system measures in the same run.
    "hub": ["--rate", "20", "--rate", "300"],
}


def load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py under a private name (``log`` is a common word)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)  # for _common
    file = FILES.get(name, name)
    spec = importlib.util.spec_from_file_location(f"eventcast_bench_{name}", f"{HERE}/{file}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="passed to every benchmark")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(MODULES)}")
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(MODULES)
    for name in names:
        if name not in MODULES:
            parser.error(f"unknown benchmark {name!r}")
    results: dict[str, Any] = {}
    failed = []
    for name in names:
        print(f"\n{'=' * 20} {name} {'=' * 20}", flush=True)
        start = time.perf_counter()
        try:
            argv_ = ALWAYS.get(name, []) + (["--quick"] if args.quick else DEFAULTS.get(name, []))
            results[name] = load(name).main(argv_)
        except KeyboardInterrupt:
            raise
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - start:.0f}s)", flush=True)
    summary(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return results


def _pick(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summary(results: dict[str, Any]) -> None:
    """The figures of issue 19, each beside its baseline from this same run."""
    lines: list[str] = []
    bus = (results.get("bus") or {}).get("results") or []
    for subscribers, topics, label in (
        (1, 1, "one topic with 1 subscriber"),
        (1, 1000, "1,000 topics with 1 subscriber each"),
    ):
        rows = _pick(bus, loop="uvloop", subscribers=subscribers, topics=topics)
        rate = {
            r["system"]: r["deliveries_per_s"] for r in rows if r["mode"] in ("iter", "callback")
        }
        if "eventcast" in rate and "naive asyncio.Queue" in rate and "pyee" in rate:
            e, n, p = rate["eventcast"], rate["naive asyncio.Queue"], rate["pyee"]
            lines.append(
                f"bus, {label}, uvloop, async for: eventcast {e / 1e6:.2f}M/s, "
                f"naive {n / 1e6:.2f}M/s ({e / n:.2f}x), pyee {p / 1e6:.2f}M/s ({e / p:.2f}x)"
                "  [goal: >= 1.0x naive and >= pyee]"
            )
    for clients in sorted({r["clients"] for r in (results.get("rooms") or {}).get("results", [])}):
        rows = _pick(results["rooms"]["results"], clients=clients)
        for source in dict.fromkeys(r["source"] for r in rows):
            mine = _pick(rows, source=source)

            def med(system: str, load: str, key: str, mine: list[dict[str, Any]] = mine) -> float:
                return _median([r[key] for r in _pick(mine, system=system, load=load)])

            ec, fl, sio = (med(s, "full", "cpu_us_per_delivery") for s in ROOM_SYSTEMS)
            lines.append(
                f"rooms, {clients} clients, {source}: eventcast {ec:.2f} µs/delivery, floor "
                f"{fl:.2f} ({ec / fl:.2f}x floor), python-socketio {sio:.2f} ({sio / ec:.1f}x "
                f"eventcast's); intake {med('eventcast', 'intake', 'cpu_us_per_publication'):.2f}"
                f" µs/publication (floor {med('floor', 'intake', 'cpu_us_per_publication'):.2f});"
                f" half-load p99 {med('eventcast', 'half', 'p99_ms'):.1f} ms (floor "
                f"{med('floor', 'half', 'p99_ms'):.1f})  [goal: <= 1.5x floor, intake <= 3 µs,"
                " p99 <= 1.5x floor's]"
            )
    for row in (results.get("host") or {}).get("results") or []:
        lines.append(
            f"host, CPU {row['cpu']}: gaps over 1 ms {row['gaps_over_ms']['1.0']:.1f}/s, over"
            f" 10 ms {row['gaps_over_ms']['10.0']:.2f}/s, worst {row['worst_ms']:.1f} ms, time"
            f" lost {row['lost_pct']:.2f}%  [the host's own noise: read the p99s against it]"
        )
    memory = (results.get("memory") or {}).get("results") or []
    for n in sorted({r["connections"] for r in memory if not r["tracemalloc"]}):
        per = {
            r["system"]: r["rss_per_connection"] / 1024
            for r in _pick(memory, connections=n, tracemalloc=False)
        }
        cells = ", ".join(f"{k} {v:.1f} KiB" for k, v in per.items())
        lines.append(f"idle memory, {n} connections: {cells}  [goal: eventcast <= 16 KiB]")
    sqlite = (results.get("log") or {}).get("sqlite") or {}
    for row in sqlite.get("bus", []) + sqlite.get("append", []):
        case = row["case"]
        floor = case.startswith("floor:")
        if floor or case in ("bus.publish x 1024 (history 1,000)", "append([e]) x 1024 tasks"):
            goal = "  [the floor system, same run]" if floor else "  [goal: >= 150k/s]"
            lines.append(
                f"durable, SQLite FULL, {case}: {row['events_per_s'] / 1e3:.1f}k events/s "
                f"(loop {row['loop_us_per_event']:.2f} + writer "
                f"{row['writer_us_per_event']:.2f} µs/event){goal}"
            )
    if lines:
        print(f"\n{'=' * 20} issue 19: the figures beside their baselines {'=' * 20}")
        for line in lines:
            print(line)


#: The systems of the many-rooms workload: eventcast, the floor, python-socketio.
ROOM_SYSTEMS = ("eventcast", "floor", "socketio")


if __name__ == "__main__":
    main()
