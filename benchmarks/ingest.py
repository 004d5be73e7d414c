"""The PostgreSQL outbox consumer's throughput, beside plain publish loops (``make bench``).

Every case publishes ``{"order": n, "status": "paid"}`` events into durable
channels of one in-process hub (SQLite log, ``synchronous=FULL``, group
commit), and counts rows (or publishes) per second until the last event is
committed and delivered to a bus subscriber:

* ``publish loop, one at a time``: ``await bus.publish()`` in a loop, each
  waiting for its own commit: what an application calling publish after its
  own commit gets;
* ``publish loop, 1,000 in flight``: the same with 1,000 concurrent publishes
  (they share group commits);
* ``outbox consumer, P partition(s)``: ROWS rows already in the outbox table
  (one channel per partition), drained by the hub's consumer through the HTTP
  API's method table, each with its idempotency key, then deleted;
* ``outbox consumer alone``: the same rows read, decoded and deleted, with a
  target that runs nothing: the consumer's own ceiling, apart from the hub.

Needs the PostgreSQL server on 127.0.0.1:5432 (database ``test``).

    python benchmarks/ingest.py [--quick] [--rows N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from typing import Any

import uvloop

from _common import header, machine

DSN = os.environ.get("EVENTCAST_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
GOAL = 20_000
CASES = (
    "publish loop, one at a time",
    "publish loop, 1,000 in flight",
    "outbox consumer, 1 partition",
    "outbox consumer, 4 partitions",
    "outbox consumer alone (commands not run)",
)
#: CPU seconds spent filling the outbox, per case (not the consumer's).
FILL_CPU: dict[str, float] = {}


def make_hub(directory: str, partitions: int) -> Any:
    from eventcast.server.config import Settings
    from eventcast.server.hub import Hub

    settings = Settings.load(
        log_url=f"sqlite:///{directory}/events.db",
        namespaces=[{"name": "orders", "history_size": 1000}],
        node_name="bench",
    )
    return Hub(settings)


async def wait_for(sub: Any, count: int) -> None:
    received = 0
    while received < count:
        received += len(await sub.get_batch(4096))


async def publish_loop(directory: str, count: int, in_flight: int) -> float:
    hub = make_hub(directory, 1)
    await hub.start()
    try:
        bus = hub.bus
        async with bus.subscribe("orders:loop", maxsize=count + 1) as sub:
            started = time.perf_counter()
            if in_flight == 1:
                for n in range(count):
                    await bus.publish("orders:loop", {"order": n, "status": "paid"})
            else:
                for start in range(0, count, in_flight):
                    await asyncio.gather(
                        *(
                            bus.publish("orders:loop", {"order": n, "status": "paid"})
                            for n in range(start, min(start + in_flight, count))
                        )
                    )
            await wait_for(sub, count)
            return count / (time.perf_counter() - started)
    finally:
        await hub.close()


async def fill_outbox(table: str, rows: int, partitions: int) -> None:
    import psycopg

    from eventcast.ingest.outbox import create_outbox

    await create_outbox(DSN, table)
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await conn.execute(
            f"INSERT INTO {table} (method, payload, partition) "  # type: ignore[arg-type]
            "SELECT 'publish', jsonb_build_object('channel', 'orders:p' || (n %% %s), "
            "'data', jsonb_build_object('order', n, 'status', 'paid')), n %% %s "
            "FROM generate_series(0, %s - 1) AS n",
            (partitions, partitions, rows),
        )
        await conn.execute(f"ANALYZE {table}")  # type: ignore[arg-type]


async def drop_outbox(table: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')  # type: ignore[arg-type]
        await conn.execute(f'DROP FUNCTION IF EXISTS "{table}_notify"()')  # type: ignore[arg-type]


async def outbox(directory: str, rows: int, partitions: int, name: str) -> float:
    from eventcast.ingest.base import PostgresOptions
    from eventcast.ingest.outbox import OutboxConsumer
    from eventcast.server.ingest import HubTarget

    table = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    cpu = time.process_time()
    await fill_outbox(table, rows, partitions)
    FILL_CPU[name] = time.process_time() - cpu
    hub = make_hub(directory, partitions)
    await hub.start()
    consumer = OutboxConsumer(
        "bench",
        HubTarget(hub),
        PostgresOptions(dsn=DSN, outbox_table_name=table, num_partitions=partitions),  # type: ignore[arg-type]
    )
    try:
        channels = [f"orders:p{p}" for p in range(partitions)]
        async with hub.bus.subscribe(channels, maxsize=rows + 1) as sub:
            started = time.perf_counter()
            consumer.start()
            await wait_for(sub, rows)
            elapsed = time.perf_counter() - started
        assert consumer.stats.dead_letters == 0, consumer.stats
        return rows / elapsed
    finally:
        await consumer.aclose()
        await hub.close()
        await drop_outbox(table)


class NullTarget:
    """A command target that runs nothing (the consumer's own cost)."""

    def __init__(self) -> None:
        self.count = 0
        self.done = asyncio.Event()
        self.expected = 0

    async def command(self, method: str, params: Any, *, idempotency_key: str | None) -> None:
        self.count += 1
        if self.count == self.expected:
            self.done.set()

    def dead_letter(self, consumer: str, message: bytes, *, reason: str, error: str) -> None:
        raise AssertionError(f"a dead letter in the benchmark: {error}")


async def outbox_alone(rows: int, name: str) -> float:
    from eventcast.ingest.base import PostgresOptions
    from eventcast.ingest.outbox import OutboxConsumer

    table = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    cpu = time.process_time()
    await fill_outbox(table, rows, 1)
    FILL_CPU[name] = time.process_time() - cpu
    target = NullTarget()
    target.expected = rows
    options = PostgresOptions(dsn=DSN, outbox_table_name=table)  # type: ignore[arg-type]
    consumer = OutboxConsumer("bench", target, options)
    try:
        started = time.perf_counter()
        consumer.start()
        await target.done.wait()
        return rows / (time.perf_counter() - started)
    finally:
        await consumer.aclose()
        await drop_outbox(table)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    cases: list[tuple[str, Any]] = [  # named as in CASES
        ("publish loop, one at a time", lambda d: publish_loop(d, args.loop_rows, 1)),
        ("publish loop, 1,000 in flight", lambda d: publish_loop(d, args.rows, 1000)),
        ("outbox consumer, 1 partition", lambda d: outbox(d, args.rows, 1, CASES[2])),
        ("outbox consumer, 4 partitions", lambda d: outbox(d, args.rows, 4, CASES[3])),
        ("outbox consumer alone (commands not run)", lambda d: outbox_alone(args.rows, CASES[4])),
    ]
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores: above 2, others share them)")
    print("| case | events/s | CPU µs/event | goal |\n| --- | --- | --- | --- |")
    for name, case in cases:
        count = args.loop_rows if name.endswith("one at a time") else args.rows
        with tempfile.TemporaryDirectory() as directory:
            cpu = time.process_time()
            rate = await case(directory)
            # The whole process (the loop and the log's writer thread), filling excluded.
            micros = (time.process_time() - cpu - FILL_CPU.pop(name, 0.0)) / count * 1e6
        goal = f"≥ {GOAL:,}/s" if name.startswith("outbox consumer,") else ""
        print(f"| {name} | {rate:,.0f} | {micros:.0f} | {goal} |", flush=True)
        results[name] = {"events_per_s": round(rate), "cpu_us_per_event": round(micros, 1)}
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, for a smoke run")
    parser.add_argument("--rows", type=int, help="rows in the outbox per case (default 100,000)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = 10_000 if args.quick else 100_000
    args.loop_rows = min(args.rows, 2_000)
    print(header("ingest: the PostgreSQL outbox consumer beside plain publish loops"))
    print(f"({args.rows:,} rows per case, {args.loop_rows:,} for the one-at-a-time loop)")
    results: dict[str, Any] = {"machine": machine(), "rows": args.rows}
    results.update(uvloop.run(run(args)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
