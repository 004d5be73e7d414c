"""In-process fan-out: deliveries per second at 1, 100 and 1,000 subscribers on one topic.

The publisher publishes in batches of 100 and yields to the loop after each
batch. Consumers read one event at a time (``async for``) or in batches
(``get_batch``). Measured side by side in the same run:

* eventcast's ``Bus``;
* a naive port of the seed design: a dict from topic to subscribers, an
  ``asyncio.Queue(maxsize)`` per subscriber and ``put_nowait`` (drop on full);
* pyee's ``EventEmitter`` and blinker's ``Signal`` (synchronous callbacks, so
  they have no consumer mode: a delivery is a handler call).

Each figure is the median of several passes, with uvloop on and off.

    python benchmarks/bus.py [--passes 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from eventcast import Bus

BATCH = 100
MAXSIZE = 1024


def events_for(subscribers: int, budget: int) -> int:
    """Events per pass so that one pass makes about ``budget`` deliveries."""
    n = max(2_000, budget // subscribers)
    return (n // BATCH) * BATCH


async def run_eventcast(subscribers: int, events: int, mode: str) -> float:
    bus = Bus(maxsize=MAXSIZE)
    subs = [bus.subscribe("orders") for _ in range(subscribers)]
    received = 0

    async def consume_iter(sub: Any) -> None:
        nonlocal received
        n = 0
        async for _ in sub:
            n += 1
            if n == events:
                break
        received += n

    async def consume_batch(sub: Any) -> None:
        nonlocal received
        n = 0
        while n < events:
            n += len(await sub.get_batch(MAXSIZE))
        received += n

    consume = consume_iter if mode == "iter" else consume_batch
    tasks = [asyncio.create_task(consume(s)) for s in subs]
    await asyncio.sleep(0)
    publish = bus.publish_nowait
    start = time.perf_counter()
    for _ in range(events // BATCH):
        for i in range(BATCH):
            publish("orders", i)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    dropped = bus.statistics()["dropped"]
    await bus.close()
    if dropped or received != subscribers * events:
        raise RuntimeError(f"eventcast lost events: dropped={dropped} received={received}")
    return received / elapsed


async def run_naive(subscribers: int, events: int, mode: str) -> float:
    """The seed's design: a dict of topic -> queues, put_nowait, drop on full."""
    topics: dict[str, list[asyncio.Queue[object]]] = {
        "orders": [asyncio.Queue(MAXSIZE) for _ in range(subscribers)]
    }
    received = 0
    dropped = 0

    def publish(topic: str, data: object) -> None:
        nonlocal dropped
        event = (topic, data, time.time())
        for q in topics.get(topic, ()):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                dropped += 1

    async def consume_iter(q: asyncio.Queue[object]) -> None:
        nonlocal received
        n = 0
        while n < events:
            await q.get()
            n += 1
        received += n

    async def consume_batch(q: asyncio.Queue[object]) -> None:
        # asyncio.Queue has no batch get: wait for one, then drain what is there.
        nonlocal received
        n = 0
        while n < events:
            batch = [await q.get()]
            while not q.empty() and len(batch) < MAXSIZE:
                batch.append(q.get_nowait())
            n += len(batch)
        received += n

    consume = consume_iter if mode == "iter" else consume_batch
    tasks = [asyncio.create_task(consume(q)) for q in topics["orders"]]
    await asyncio.sleep(0)
    start = time.perf_counter()
    for _ in range(events // BATCH):
        for i in range(BATCH):
            publish("orders", i)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    if dropped or received != subscribers * events:
        raise RuntimeError("naive lost events")
    return received / elapsed


async def run_pyee(subscribers: int, events: int, mode: str) -> float:
    from pyee import EventEmitter

    ee = EventEmitter()
    received = 0

    handlers = []
    for _ in range(subscribers):

        def handler(data: object) -> None:
            nonlocal received
            received += 1

        handlers.append(handler)  # one distinct listener per subscriber
        ee.add_listener("orders", handler)
    start = time.perf_counter()
    for _ in range(events // BATCH):
        for i in range(BATCH):
            ee.emit("orders", i)
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    if received != subscribers * events:
        raise RuntimeError("pyee lost events")
    return received / elapsed


async def run_blinker(subscribers: int, events: int, mode: str) -> float:
    from blinker import Signal

    signal = Signal()
    received = 0
    receivers = []
    for _ in range(subscribers):

        def receiver(sender: object, **kw: object) -> None:
            nonlocal received
            received += 1

        receivers.append(receiver)  # blinker holds weak references
        signal.connect(receiver)
    start = time.perf_counter()
    for _ in range(events // BATCH):
        for i in range(BATCH):
            signal.send(i)
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    if received != subscribers * events:
        raise RuntimeError("blinker lost events")
    return received / elapsed


SYSTEMS: dict[str, Callable[[int, int, str], Coroutine[Any, Any, float]]] = {
    "eventcast": run_eventcast,
    "naive asyncio.Queue": run_naive,
    "pyee": run_pyee,
    "blinker": run_blinker,
}
CALLBACK_ONLY = {"pyee", "blinker"}


def measure(
    system: str, subscribers: int, mode: str, use_uvloop: bool, passes: int, budget: int
) -> float:
    fn = SYSTEMS[system]
    events = events_for(subscribers, budget)
    rates = []
    for _ in range(passes):
        gc.collect()
        coro = fn(subscribers, events, mode)
        rate = uvloop.run(coro) if use_uvloop else asyncio.run(coro)
        rates.append(rate)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer events, for a smoke run")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    budget = 200_000 if args.quick else 2_000_000
    results: list[dict[str, Any]] = []
    print(
        f"# in-process fan-out ({platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()})"
    )
    for use_uvloop in (True, False):
        loop_name = "uvloop" if use_uvloop else "asyncio"
        for mode in ("iter", "batch"):
            print(f"\n## {loop_name}, consumer mode: {mode}")
            print(
                f"{'subscribers':>11} | " + " | ".join(f"{s:>20}" for s in SYSTEMS) + " | vs naive"
            )
            for subscribers in (1, 100, 1000):
                row = {}
                for system in SYSTEMS:
                    if system in CALLBACK_ONLY and mode == "batch":
                        continue
                    rate = measure(system, subscribers, mode, use_uvloop, args.passes, budget)
                    row[system] = rate
                    results.append(
                        {
                            "loop": loop_name,
                            "mode": mode if system not in CALLBACK_ONLY else "callback",
                            "subscribers": subscribers,
                            "system": system,
                            "deliveries_per_s": rate,
                        }
                    )
                cells = [f"{row[s] / 1e6:>18.2f}M/s" if s in row else f"{'-':>20}" for s in SYSTEMS]
                ratio = row["eventcast"] / row["naive asyncio.Queue"]
                print(f"{subscribers:>11} | " + " | ".join(cells) + f" | {ratio:5.1f}x")
                sys.stdout.flush()
    out = {"machine": platform.uname()._asdict(), "python": sys.version, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
