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

A second shape, **one subscriber on each of many topics** (per-user channels,
direct messages, request/reply): ``--topics`` topics (default 1,000) with one
subscriber each, publications spread over them in turn, so every publication
is one delivery and most wake a different consumer.

``--profile`` adds where eventcast's fixed cost per publish goes, with one
subscriber (``async for``, uvloop): a cProfile of the run, and a manual
breakdown timing each step of ``publish_nowait`` alone (best of several
loops of 100,000): the ``Event`` with its id and time, the namespace check,
the routing, the ring append, the topic statistics, the consumer's
``async for`` step, and what is left (the calls, the wake-up of the
consumer), beside the naive design's steps.

    python benchmarks/bus.py [--passes 5] [--quick] [--topics 1000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from _common import header, loadavg, machine, save_json
from eventcast import Bus, Event
from eventcast.events import new_event, new_event_id

BATCH = 100
MAXSIZE = 1024


def events_for(subscribers: int, budget: int, topics: int = 1) -> int:
    """Events per pass so that one pass makes about ``budget`` deliveries.

    With several topics (one subscriber each), a multiple of the topic count,
    so every subscriber gets as many.
    """
    if topics > 1:
        n = max(2 * topics, budget) // (topics * BATCH) * topics * BATCH
        return max(n, topics * BATCH)
    n = max(2_000, budget // subscribers)
    return (n // BATCH) * BATCH


def shape(subscribers: int, topics: int) -> tuple[list[str], list[str]]:
    """(topic of each subscriber, topics published in turn) for one of the two shapes.

    ``topics == 1``: ``subscribers`` subscribers on one topic. Otherwise one
    subscriber on each of ``topics`` topics (``subscribers`` is ignored).
    """
    if topics == 1:
        return ["orders"] * subscribers, ["orders"]
    names = [f"user.{i}" for i in range(topics)]
    return names, names


async def publish_all(publish: Callable[[str, int], Any], names: list[str], events: int) -> None:
    """Publish ``events`` in batches of ``BATCH``, over ``names`` in turn, yielding after each."""
    if len(names) == 1:  # the loop of the one-topic figures since round 1, unchanged
        topic = names[0]
        for _ in range(events // BATCH):
            for i in range(BATCH):
                publish(topic, i)
            await asyncio.sleep(0)
        return
    k = 0
    n = len(names)
    for _ in range(events // BATCH):
        for i in range(BATCH):
            publish(names[k % n], i)
            k += 1
        await asyncio.sleep(0)


async def run_eventcast(subscribers: int, events: int, mode: str, topics: int = 1) -> float:
    bus = Bus(maxsize=MAXSIZE)
    sub_topics, names = shape(subscribers, topics)
    subs = [bus.subscribe(t) for t in sub_topics]
    per = events if topics == 1 else events // topics
    received = 0

    async def consume_iter(sub: Any) -> None:
        nonlocal received
        n = 0
        async for _ in sub:
            n += 1
            if n == per:
                break
        received += n

    async def consume_batch(sub: Any) -> None:
        nonlocal received
        n = 0
        while n < per:
            n += len(await sub.get_batch(MAXSIZE))
        received += n

    consume = consume_iter if mode == "iter" else consume_batch
    tasks = [asyncio.create_task(consume(s)) for s in subs]
    await asyncio.sleep(0)
    start = time.perf_counter()
    await publish_all(bus.publish_nowait, names, events)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    dropped = bus.statistics()["dropped"]
    await bus.close()
    if dropped or received != len(subs) * per:
        raise RuntimeError(f"eventcast lost events: dropped={dropped} received={received}")
    return received / elapsed


async def run_naive(subscribers: int, events: int, mode: str, topics: int = 1) -> float:
    """The seed's design: a dict of topic -> queues, put_nowait, drop on full."""
    sub_topics, names = shape(subscribers, topics)
    queues: dict[str, list[asyncio.Queue[object]]] = {}
    for t in sub_topics:
        queues.setdefault(t, []).append(asyncio.Queue(MAXSIZE))
    per = events if topics == 1 else events // topics
    received = 0
    dropped = 0

    def publish(topic: str, data: object) -> None:
        nonlocal dropped
        event = (topic, data, time.time())
        for q in queues.get(topic, ()):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                dropped += 1

    async def consume_iter(q: asyncio.Queue[object]) -> None:
        nonlocal received
        n = 0
        while n < per:
            await q.get()
            n += 1
        received += n

    async def consume_batch(q: asyncio.Queue[object]) -> None:
        # asyncio.Queue has no batch get: wait for one, then drain what is there.
        nonlocal received
        n = 0
        while n < per:
            batch = [await q.get()]
            while not q.empty() and len(batch) < MAXSIZE:
                batch.append(q.get_nowait())
            n += len(batch)
        received += n

    consume = consume_iter if mode == "iter" else consume_batch
    all_queues = [q for qs in queues.values() for q in qs]
    tasks = [asyncio.create_task(consume(q)) for q in all_queues]
    await asyncio.sleep(0)
    start = time.perf_counter()
    await publish_all(publish, names, events)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    if dropped or received != len(all_queues) * per:
        raise RuntimeError("naive lost events")
    return received / elapsed


async def run_pyee(subscribers: int, events: int, mode: str, topics: int = 1) -> float:
    from pyee import EventEmitter

    ee = EventEmitter()
    sub_topics, names = shape(subscribers, topics)
    received = 0

    handlers = []
    for t in sub_topics:

        def handler(data: object) -> None:
            nonlocal received
            received += 1

        handlers.append(handler)  # one distinct listener per subscriber
        ee.add_listener(t, handler)
    start = time.perf_counter()
    await publish_all(ee.emit, names, events)
    elapsed = time.perf_counter() - start
    expected = len(sub_topics) * events if topics == 1 else events
    if received != expected:
        raise RuntimeError("pyee lost events")
    return received / elapsed


async def run_blinker(subscribers: int, events: int, mode: str, topics: int = 1) -> float:
    from blinker import Namespace

    signals = Namespace()  # named signals: a publish looks its topic's signal up
    sub_topics, names = shape(subscribers, topics)
    received = 0
    receivers = []
    for t in sub_topics:

        def receiver(sender: object, **kw: object) -> None:
            nonlocal received
            received += 1

        receivers.append(receiver)  # blinker holds weak references
        signals.signal(t).connect(receiver)

    one = signals.signal(names[0])

    def publish(topic: str, data: object) -> None:
        if topics == 1:  # one signal: send on it directly, as since round 1
            one.send(data)
        else:
            signals.signal(topic).send(data)

    start = time.perf_counter()
    await publish_all(publish, names, events)
    elapsed = time.perf_counter() - start
    expected = len(sub_topics) * events if topics == 1 else events
    if received != expected:
        raise RuntimeError("blinker lost events")
    return received / elapsed


SYSTEMS: dict[str, Callable[[int, int, str, int], Coroutine[Any, Any, float]]] = {
    "eventcast": run_eventcast,
    "naive asyncio.Queue": run_naive,
    "pyee": run_pyee,
    "blinker": run_blinker,
}
CALLBACK_ONLY = {"pyee", "blinker"}


def measure(
    system: str,
    subscribers: int,
    mode: str,
    use_uvloop: bool,
    passes: int,
    budget: int,
    topics: int = 1,
) -> float:
    fn = SYSTEMS[system]
    events = events_for(subscribers, budget, topics)
    rates = []
    for _ in range(passes):
        gc.collect()
        coro = fn(subscribers, events, mode, topics)
        rate = uvloop.run(coro) if use_uvloop else asyncio.run(coro)
        rates.append(rate)
    return statistics.median(rates)


# -- where one publish's time goes ---------------------------------------------------------


def _per_op(body: Callable[[range], object], loops: int, repeats: int) -> float:
    """Best CPU time of ``body(range(loops))`` over ``repeats``, in µs per iteration.

    CPU time of this thread, not wall time: on a shared machine the process
    is preempted, and a wall clock would count the other processes' turns.
    """
    best = float("inf")
    for _ in range(repeats):
        r = range(loops)
        start = time.thread_time_ns()
        body(r)
        best = min(best, time.thread_time_ns() - start)
    return best / loops / 1e3


async def _breakdown(loops: int, repeats: int) -> list[tuple[str, float]]:
    """µs per publish of each step, eventcast's and the naive design's (uvloop running)."""
    bus = Bus(maxsize=loops * (repeats + 2))  # never overflows while nobody consumes
    sub = bus.subscribe("orders")
    topic = "orders"
    router = bus._router  # the parts publish_nowait calls, timed one by one
    rings = router.route(topic)
    ring = rings[0]
    event = Event(topic=topic, data=0)
    event_id, now = event.id, event.time
    publish = bus.publish_nowait
    checked = bus._publish_checked
    publish(topic, -1)  # the fast path now knows the topic
    live = bus._live_routes
    namespace = bus.namespace

    def drain() -> None:
        sub.get_nowait_batch(10**9)

    def empty(r: range) -> None:
        for _ in r:
            pass

    def whole(r: range) -> None:
        for i in r:
            publish(topic, i)

    def make_event(r: range) -> None:
        for i in r:
            new_event(topic, i)

    def make_event_given(r: range) -> None:
        for i in r:
            Event(topic=topic, data=i, id=event_id, time=now)

    def make_id(r: range) -> None:
        for _ in r:
            new_event_id()

    def clock(r: range) -> None:
        for _ in r:
            time.time()

    def lookup(r: range) -> None:
        for _ in r:
            live.get(topic)

    def append(r: range) -> None:
        for _ in r:
            ring.append(event)

    def checked_whole(r: range) -> None:
        for i in r:
            checked(topic, i, None)

    def check(r: range) -> None:
        for i in r:
            namespace(topic).check(topic, i)

    def route(r: range) -> None:
        for _ in r:
            router.route(topic)

    base = _per_op(empty, loops, repeats)
    steps: list[tuple[str, float]] = []

    def timed(name: str, body: Callable[[range], object]) -> float:
        value = max(0.0, _per_op(body, loops, repeats) - base)
        drain()
        steps.append((name, value))
        return value

    total = timed("eventcast publish_nowait, whole (1 subscriber, nobody waiting)", whole)
    ev = timed("  new_event(topic, data): the event, its id and time", make_event)
    timed("    of which the struct alone (id and time given)", make_event_given)
    timed("    of which new_event_id() (with its clock read)", make_id)
    timed("      of which time.time()", clock)
    lk = timed("  the fast path's route lookup (a dict)", lookup)
    ap = timed("  ring.append(event)", append)
    rest = max(0.0, total - ev - lk - ap)
    steps.append(("  the rest (the call, the counter, the backplane check)", rest))
    timed("eventcast publish_nowait, checked path (first publish, or tags)", checked_whole)
    timed("  namespace(topic).check(topic, data)", check)
    timed("  router.route(topic) (cached)", route)

    # The consumer: one `async for` step over an event already buffered.
    for i in range(loops):
        publish(topic, i)
    best = float("inf")
    for _ in range(repeats):
        for i in range(loops):
            publish(topic, i)
        n = 0
        start = time.thread_time_ns()
        async for _ in sub:
            n += 1
            if n == loops:
                break
        best = min(best, time.thread_time_ns() - start)
    drain()
    steps.append(("eventcast consumer: one `async for` step, event buffered", best / loops / 1e3))
    await bus.close()

    # The naive design's steps.
    queue: asyncio.Queue[object] = asyncio.Queue()
    queues = {topic: [queue]}

    def naive_whole(r: range) -> None:
        for i in r:
            item = (topic, i, time.time())
            for q in queues.get(topic, ()):
                q.put_nowait(item)

    def naive_tuple(r: range) -> None:
        for i in r:
            (topic, i, time.time())

    def naive_put(r: range) -> None:
        for i in r:
            queue.put_nowait(i)

    naive_total = _per_op(naive_whole, loops, repeats) - base
    while not queue.empty():
        queue.get_nowait()
    steps.append(("naive publish, whole (tuple, dict lookup, put_nowait)", naive_total))
    steps.append(("  tuple with time.time()", _per_op(naive_tuple, loops, repeats) - base))
    put = _per_op(naive_put, loops, repeats) - base
    steps.append(("  Queue.put_nowait", put))
    best = float("inf")
    for _ in range(repeats):
        while not queue.empty():
            queue.get_nowait()
        for i in range(loops):
            queue.put_nowait(i)
        start = time.thread_time_ns()
        for _ in range(loops):
            await queue.get()
        best = min(best, time.thread_time_ns() - start)
    steps.append(("naive consumer: one `await queue.get()`, item buffered", best / loops / 1e3))
    return steps


def profile_publish(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """cProfile of the 1-subscriber run, then the manual breakdown (uvloop)."""
    events = events_for(1, budget)
    profile = cProfile.Profile()
    profile.enable()
    rate = uvloop.run(run_eventcast(1, events, "iter"))
    profile.disable()
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(16)
    text = stream.getvalue()
    print(f"\n## cProfile: eventcast, 1 subscriber, async for, uvloop ({rate / 1e6:.2f}M/s)")
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text)
    loops = 20_000 if args.quick else 100_000
    steps = uvloop.run(_breakdown(loops, 5))
    # Per delivery in the real run vs the parts measured alone: the rest is wake-ups,
    # deallocation and the garbage collector (timed with gc.callbacks).
    collections: dict[str, list[float]] = {"eventcast": [0, 0.0], "naive": [0, 0.0]}
    current = ["eventcast"]
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            entry = collections[current[0]]
            entry[0] += 1
            entry[1] += time.thread_time() - started[0]

    # CPU time per delivery of whole runs (the rates above are wall time).
    cpu: dict[str, list[float]] = {"eventcast": [], "naive": []}
    gc.callbacks.append(on_gc)
    try:
        for _ in range(args.passes):
            for label, fn in (("eventcast", run_eventcast), ("naive", run_naive)):
                gc.collect()
                current[0] = label
                start = time.thread_time()
                uvloop.run(fn(1, events, "iter"))
                cpu[label].append((time.thread_time() - start) / events)
    finally:
        gc.callbacks.remove(on_gc)
    eventcast_rate = 1 / statistics.median(cpu["eventcast"])
    naive_rate = 1 / statistics.median(cpu["naive"])
    for label, (n, seconds) in collections.items():
        delivered = events * args.passes
        steps.append(
            (
                f"{label}: the garbage collector per delivery in the run ({int(n)} collections)",
                seconds / delivered * 1e6,
            )
        )
    parts = dict(steps)
    for label, rate_, publish_key, consume_key in (
        (
            "eventcast",
            eventcast_rate,
            "eventcast publish_nowait, whole (1 subscriber, nobody waiting)",
            "eventcast consumer: one `async for` step, event buffered",
        ),
        (
            "naive",
            naive_rate,
            "naive publish, whole (tuple, dict lookup, put_nowait)",
            "naive consumer: one `await queue.get()`, item buffered",
        ),
    ):
        per = 1e6 / rate_
        rest = per - parts[publish_key] - parts[consume_key]
        steps.append((f"{label}: CPU per delivery in the run ({rate_ / 1e6:.2f}M/s of CPU)", per))
        steps.append((f"{label}:   of which wake-ups, task switches, the loop", max(0.0, rest)))
    print(f"\n## Per publish, 1 subscriber (uvloop; µs of CPU, best of 5 x {loops:,} loops)")
    for name, value in steps:
        print(f"{value:8.3f}  {name}")
    sys.stdout.flush()
    return {"steps": steps, "loops": loops}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer events, for a smoke run")
    parser.add_argument(
        "--topics",
        type=int,
        default=1000,
        help="also one subscriber on each of this many topics (0: skip)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="where the fixed cost per publish goes"
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    budget = 200_000 if args.quick else 2_000_000
    results: list[dict[str, Any]] = []
    print(header("in-process fan-out"))
    print(f"(median of {args.passes} passes; load average at start {loadavg()})")
    shapes = [(1, 1), (100, 1), (1000, 1)]
    if args.topics > 1:
        shapes.append((1, args.topics))
    for use_uvloop in (True, False):
        loop_name = "uvloop" if use_uvloop else "asyncio"
        for mode in ("iter", "batch"):
            print(f"\n## {loop_name}, consumer mode: {mode}")
            print(
                f"{'subscribers':>18} | "
                + " | ".join(f"{s:>20}" for s in SYSTEMS)
                + " | vs naive | vs pyee"
            )
            for subscribers, topics in shapes:
                row = {}
                for system in SYSTEMS:
                    if system in CALLBACK_ONLY and mode == "batch":
                        continue
                    rate = measure(
                        system, subscribers, mode, use_uvloop, args.passes, budget, topics
                    )
                    row[system] = rate
                    results.append(
                        {
                            "loop": loop_name,
                            "mode": mode if system not in CALLBACK_ONLY else "callback",
                            "subscribers": subscribers,
                            "topics": topics,
                            "system": system,
                            "deliveries_per_s": rate,
                        }
                    )
                cells = [f"{row[s] / 1e6:>18.2f}M/s" if s in row else f"{'-':>20}" for s in SYSTEMS]
                ratio = row["eventcast"] / row["naive asyncio.Queue"]
                vs_pyee = f"{row['eventcast'] / row['pyee']:6.2f}x" if "pyee" in row else "      -"
                label = f"1 on {topics} topics" if topics > 1 else f"{subscribers}"
                print(f"{label:>18} | " + " | ".join(cells) + f" | {ratio:7.2f}x | {vs_pyee}")
                sys.stdout.flush()
    print(f"(load average at the end {loadavg()})")
    out: dict[str, Any] = {"machine": machine(), "python": sys.version, "results": results}
    if args.profile:
        out["profile"] = profile_publish(args, budget)
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
