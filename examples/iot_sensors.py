"""Simulated IoT sensors: many threads publishing readings, fanned out to subscribers.

Each sensor is a thread publishing ``--readings`` readings to
``sensors.<sensor-id>``; they share one **synchronous** client
(``eventcast.sync.connect``: every method may be called from any thread), or
with ``--via api`` each thread posts to the hub's HTTP API. ``--subscribers``
synchronous clients subscribe to the pattern ``sensors.>`` first and count
what they receive; the run ends with a summary and exits 0 when every
subscriber got every reading of every sensor.

Run::

    eventcast serve --config examples/eventcast.toml
    export EVENTCAST_TOKEN_HMAC_SECRET=examples-only-hmac-secret-change-me-0123456789
    export EVENTCAST_TOKEN=$(eventcast token --user sensors)
    python examples/iot_sensors.py --sensors 20 --readings 10 --subscribers 3
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import eventcast.sync
from eventcast.exceptions import EventcastError


def sensor_ids(n: int) -> list[str]:
    return [f"sensor-{i:03d}" for i in range(1, n + 1)]


def reading(sensor: str, seq: int, rng: random.Random) -> dict[str, Any]:
    return {
        "sensor": sensor,
        "seq": seq,
        "temperature": round(rng.uniform(18.0, 26.0), 2),
        "humidity": round(rng.uniform(30.0, 60.0), 1),
        "time": time.time(),
    }


def run_sensors(
    publish: Callable[[str, dict[str, Any]], None],
    sensors: list[str],
    readings: int,
    interval: float,
) -> list[BaseException]:
    """One thread per sensor; return the errors they met."""
    errors: list[BaseException] = []

    def sensor(name: str) -> None:
        rng = random.Random(name)
        try:
            for seq in range(1, readings + 1):
                publish(f"sensors.{name}", reading(name, seq, rng))
                if interval and seq < readings:
                    time.sleep(interval)  # the sensor's sampling period
        except (EventcastError, OSError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sensor, args=(name,)) for name in sensors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Simulated sensors publishing readings to sensors.<id>, fanned out to "
        "subscribers of sensors.>.",
        epilog="Environment: EVENTCAST_URL (the hub), EVENTCAST_TOKEN (a connection token), "
        "EVENTCAST_API_KEY (for --via api).",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("EVENTCAST_URL", "http://127.0.0.1:8000"),
        help="the hub's URL (default: EVENTCAST_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument("--token", default=os.environ.get("EVENTCAST_TOKEN", ""))
    parser.add_argument("--api-key", default=os.environ.get("EVENTCAST_API_KEY"))
    parser.add_argument("--sensors", type=int, default=10)
    parser.add_argument("--readings", type=int, default=5, help="readings per sensor")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between readings")
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument("--via", choices=["client", "api"], default="client")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="give up waiting for readings after this"
    )
    args = parser.parse_args(argv)
    if args.via == "api" and not args.api_key:
        print("error: --via api needs --api-key or EVENTCAST_API_KEY", file=sys.stderr)
        return 2
    sensors = sensor_ids(args.sensors)
    expected = len(sensors) * args.readings
    try:
        client = eventcast.sync.connect(args.url, token=args.token, name="iot-sensors")
    except EventcastError as exc:
        print(f"error: cannot connect to the hub at {args.url}: {exc}", file=sys.stderr)
        return 1
    with client:
        # Subscribers first, so they see every reading.
        counts = [Counter[str]() for _ in range(args.subscribers)]
        subscribers = [
            eventcast.sync.connect(args.url, token=args.token, name=f"iot-subscriber-{i}")
            for i in range(args.subscribers)
        ]
        subs = [s.subscribe("sensors.>") for s in subscribers]

        def consume(index: int) -> None:
            deadline = time.monotonic() + args.timeout
            while sum(counts[index].values()) < expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    event = subs[index].get(timeout=left)
                except TimeoutError:
                    return
                counts[index][event.data["sensor"]] += 1

        consumers = [threading.Thread(target=consume, args=(i,)) for i in range(args.subscribers)]
        for thread in consumers:
            thread.start()
        started = time.monotonic()
        if args.via == "client":
            errors = run_sensors(client.publish, sensors, args.readings, args.interval)
        else:
            import httpx

            with httpx.Client(
                base_url=args.url.rstrip("/") + "/api",
                headers={"X-API-Key": args.api_key},
                timeout=10,
            ) as http:

                def publish(channel: str, data: dict[str, Any]) -> None:
                    answer = http.post("/publish", json={"channel": channel, "data": data}).json()
                    if "error" in answer:
                        raise EventcastError(f"publish refused: {answer['error']}")

                errors = run_sensors(publish, sensors, args.readings, args.interval)
        print(
            f"{len(sensors)} sensors published {expected - len(errors)} readings "
            f"in {time.monotonic() - started:.2f}s ({args.via})",
            flush=True,
        )
        for thread in consumers:
            thread.join()
        for sub in subs:
            sub.unsubscribe()
        for subscriber in subscribers:
            subscriber.close()
    complete = 0
    for index, count in enumerate(counts, start=1):
        got = sum(count.values())
        full = sum(1 for s in sensors if count[s] == args.readings)
        print(
            f"subscriber {index}: {got}/{expected} readings, {full}/{len(sensors)} sensors complete"
        )
        complete += got == expected and full == len(sensors)
    for error in errors:
        print(f"error: a sensor failed: {error}", file=sys.stderr)
    if complete == args.subscribers and not errors:
        print(f"all {args.subscribers} subscriber(s) got every reading", flush=True)
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
