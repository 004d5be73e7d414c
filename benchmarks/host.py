"""The host's own stalls: how often, and for how long, each CPU is taken away.

One process per CPU, pinned to it, reads the monotonic clock in a tight loop
for ``--seconds``. Two readings normally lie ~0.1 µs apart; a larger gap is
time the process did not run: another task or an interrupt of this machine,
or, on a virtual machine, the host taking the virtual CPU away (which the
guest does not see as anything but lost time). Run on an idle machine, the
gaps of a millisecond and more are the host's.

``make bench`` runs it first, so the rest of a run can be read against the
host's noise: a latency percentile measured over a few seconds moves with a
single stall of tens of milliseconds (a p99 over 4 s is the worst 40 ms of
the window), for the floor system as much as for eventcast.

    python benchmarks/host.py [--seconds 10] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from typing import Any

from _common import header, machine, save_json

#: Gap thresholds, in ms, counted separately (a gap counts under each it exceeds).
THRESHOLDS_MS = (0.1, 1.0, 5.0, 10.0, 20.0)


def probe(cpu: int, seconds: float) -> dict[str, Any]:
    """Spin on ``cpu`` for ``seconds``; count the gaps between clock readings."""
    os.sched_setaffinity(0, {cpu})
    clock = time.perf_counter_ns
    floor_ns = int(THRESHOLDS_MS[0] * 1e6)
    gaps: list[int] = []
    start = last = clock()
    end = start + int(seconds * 1e9)
    while True:
        now = clock()
        if now - last > floor_ns:
            gaps.append(now - last)
            if now > end:
                break
        elif now > end:
            break
        last = now
    elapsed = now - start
    return {
        "cpu": cpu,
        "seconds": elapsed / 1e9,
        "gaps_over_ms": {
            str(t): sum(1 for g in gaps if g > t * 1e6) / (elapsed / 1e9) for t in THRESHOLDS_MS
        },
        "worst_ms": max(gaps, default=0) / 1e6,
        "lost_pct": sum(gaps) / elapsed * 100,
    }


def _run(cpu: int, seconds: float, out: multiprocessing.Queue[dict[str, Any]]) -> None:
    out.put(probe(cpu, seconds))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="probe time per CPU")
    parser.add_argument("--quick", action="store_true", help="2 seconds")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    seconds = 2.0 if args.quick else args.seconds
    cpus = sorted(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(cpu, seconds, out)) for cpu in cpus]
    for p in procs:
        p.start()
    rows = sorted((out.get(timeout=seconds + 60) for _ in procs), key=lambda r: r["cpu"])
    for p in procs:
        p.join()
    print(header("host stalls: time each CPU is taken away"))
    print(f"(one spinning process per CPU for {seconds:.0f}s; gaps between clock readings)")
    over = " | ".join(f"> {t:g} ms" for t in THRESHOLDS_MS)
    print(f"cpu | {over} (gaps per second) | worst ms | time lost")
    for r in rows:
        cells = " | ".join(
            f"{r['gaps_over_ms'][str(t)]:>{len(f'> {t:g} ms')}.1f}" for t in THRESHOLDS_MS
        )
        print(f"{r['cpu']:>3} | {cells} | {r['worst_ms']:8.2f} | {r['lost_pct']:8.2f}%")
    result = {"machine": machine(), "seconds": seconds, "results": rows}
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
