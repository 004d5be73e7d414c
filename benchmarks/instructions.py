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

``--src DIR`` (repeatable) runs eventcast from other trees too, a worktree of
an earlier commit say, beside this checkout's ``src``.

    python benchmarks/instructions.py [--cases one,durable] [--src /path/to/old/src]

Not part of ``make bench``: valgrind is a tool of the machine (``apt-get install
valgrind``), not a dependency of the project.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
CASES: dict[str, tuple[str, ...]] = {
    "one": ("eventcast", "naive asyncio.Queue", "pyee"),
    "durable": ("floor", "append", "bus.publish"),
}
#: Events of the small and the large run of each case (per task for ``durable``).
COUNTS = {"one": (2_000, 202_000), "durable": (2, 22)}
TASKS = 1024
UNIT = {"one": "delivery", "durable": "event"}


def _one(system: str, events: int) -> None:
    import uvloop

    from run import load

    bus = load("bus")
    uvloop.run(bus.SYSTEMS[system](1, events, "iter", 1))


def _durable(system: str, per_task: int) -> None:
    import uvloop

    uvloop.run(_durable_run(system, per_task))


async def _durable_run(system: str, per_task: int) -> None:
    from eventcast.log.sqlite import SQLiteLog
    from run import load

    log_bench = load("log")
    step: Callable[[int], Awaitable[int]]
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "events.db")
        async with contextlib.AsyncExitStack() as running:
            if system == "floor":
                step, _ = await running.enter_async_context(log_bench.floor_system(path))
            elif system == "append":
                log = await running.enter_async_context(log_bench.appending(SQLiteLog(path)))
                step = log_bench.append_step(log, 1)
            else:
                system_ = log_bench.bus_system(SQLiteLog(path), 1000)
                _, step, _ = await running.enter_async_context(system_)

            async def worker(w: int) -> None:
                for i in range(per_task):
                    await step(w * 10**9 + i)

            await asyncio.gather(*(worker(w) for w in range(TASKS)))


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
    events = (large - small) * (TASKS if case == "durable" else 1)
    return (count(src, case, system, large) - count(src, case, system, small)) / events


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="one,durable", help="comma-separated: one, durable")
    parser.add_argument("--src", action="append", default=[], help="another tree's src, too")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, system, n = args.child
        (_one if case == "one" else _durable)(system, int(n))
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
            trees = sources if system in ("eventcast", "append", "bus.publish") else [SRC]
            row = {src: per_event(src, case, system) for src in trees}
            results[f"{case}/{system}"] = row
            cells = [f"{row[s]:>40,.0f}" if s in row else f"{'(same)':>40}" for s in sources]
            print(f"{system:>22} | " + " | ".join(cells))
            sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
