"""Simulated IoT sensors on MQTT, consumed by the hub, shown live in a browser over SSE.

The sensors publish readings to Mosquitto, as real devices would; they know
nothing of eventcast. The hub consumes the broker (the ``sensors`` consumer of
``eventcast.toml``: topic filter ``sensors/#``, channel template
``iot:{topic}``), so the reading on ``sensors/sensor-001/reading`` is published
to the durable channel ``iot:sensors.sensor-001.reading``. Each reading
carries an ``id``, the consumer's ``idempotency_key_field``: a reading the
broker delivers twice (the hub crashed before acknowledging it) is stored once.

``--subscribers K`` clients follow ``iot:sensors.>`` through the hub and count
what they get; the script exits 0 when each got every reading.
``--page-port`` serves ``iot_sensors.html``, which follows the same pattern
with a plain ``EventSource``.

Run::

    mosquitto -c /etc/mosquitto/mosquitto.conf         # an MQTT broker on 127.0.0.1:1883
    eventcast serve --config examples/eventcast.toml    # the hub, consuming sensors/#
    export EVENTCAST_TOKEN_HMAC_SECRET=examples-only-hmac-secret-change-me-0123456789
    export EVENTCAST_TOKEN=$(eventcast token --user sensors)
    python examples/iot_sensors.py --sensors 20 --readings 10 --subscribers 2
    python examples/iot_sensors.py --readings 0 --interval 1 --page-port 8082
    # then open http://127.0.0.1:8082/iot_sensors.html?hub=http://127.0.0.1:8000&token=$EVENTCAST_TOKEN
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import eventcast
from eventcast.exceptions import EventcastError

PAGE = Path(__file__).with_name("iot_sensors.html")


def sensor_ids(n: int) -> list[str]:
    return [f"sensor-{i:03d}" for i in range(1, n + 1)]


def reading(sensor: str, seq: int, rng: random.Random) -> dict[str, Any]:
    return {
        "id": f"{sensor}-{seq}",
        "sensor": sensor,
        "seq": seq,
        "temperature": round(rng.uniform(18.0, 26.0), 2),
        "humidity": round(rng.uniform(30.0, 60.0), 1),
        "time": time.time(),
    }


def serve_page(port: int) -> http.server.ThreadingHTTPServer:
    """Serve iot_sensors.html on ``port`` (in a thread)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(PAGE.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def run_sensors(
    mqtt_url: str, root: str, sensors: list[str], readings: int, interval: float
) -> int:
    """Publish each sensor's readings to ``<root>/<sensor>/reading`` (QoS 1); return how many."""
    import aiomqtt

    parts = urlsplit(mqtt_url)
    published = 0
    rngs = {sensor: random.Random(sensor) for sensor in sensors}
    async with aiomqtt.Client(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        username=parts.username,
        password=parts.password,
    ) as client:
        seq = 0
        while readings == 0 or seq < readings:
            seq += 1
            for sensor in sensors:
                payload = json.dumps(reading(sensor, seq, rngs[sensor]))
                await client.publish(f"{root}/{sensor}/reading", payload, qos=1)
                published += 1
            if interval:
                await asyncio.sleep(interval)  # the sensors' sampling period
    return published


async def count_readings(
    url: str, token: str, pattern: str, counts: Counter[str], expected: int, ready: asyncio.Event
) -> None:
    """Follow ``pattern`` through the hub; count readings per sensor until ``expected``."""
    async with eventcast.connect(url, token=token) as client, client.subscribe(pattern) as sub:
        ready.set()
        async for event in sub:
            counts[event.data["sensor"]] += 1
            if sum(counts.values()) >= expected:
                return


async def run(args: argparse.Namespace) -> int:
    sensors = sensor_ids(args.sensors)
    expected = len(sensors) * args.readings
    pattern = f"iot:{args.root.replace('/', '.')}.>"
    counts = [Counter[str]() for _ in range(args.subscribers if args.readings else 0)]
    readies = [asyncio.Event() for _ in counts]
    followers = [
        asyncio.create_task(count_readings(args.url, args.token, pattern, c, expected, r))
        for c, r in zip(counts, readies, strict=True)
    ]
    try:
        async with asyncio.timeout(args.timeout):
            for follower, ready in zip(followers, readies, strict=True):
                # Subscribed before the first reading, or the failure that prevented it.
                waiter = asyncio.ensure_future(ready.wait())
                await asyncio.wait({waiter, follower}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if follower.done():
                    follower.result()
            started = time.monotonic()
            published = await run_sensors(
                args.mqtt, args.root, sensors, args.readings, args.interval
            )
            print(
                f"{len(sensors)} sensors published {published} readings to MQTT "
                f"in {time.monotonic() - started:.2f}s",
                flush=True,
            )
            await asyncio.gather(*followers)
    except TimeoutError:
        pass
    except (EventcastError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    complete = 0
    for index, count in enumerate(counts, start=1):
        got = sum(count.values())
        full = sum(1 for s in sensors if count[s] == args.readings)
        print(
            f"subscriber {index}: {got}/{expected} readings, {full}/{len(sensors)} sensors complete"
        )
        complete += got == expected and full == len(sensors)
    if complete == len(counts):
        print(f"all {len(counts)} subscriber(s) got every reading", flush=True)
        return 0
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Simulated sensors publishing readings to MQTT; the hub consumes them into "
        "iot:<root>.<sensor>.reading and subscribers (and iot_sensors.html) follow them live.",
        epilog="Environment: EVENTCAST_URL (the hub), EVENTCAST_TOKEN (a connection token), "
        "EVENTCAST_MQTT (the broker).",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("EVENTCAST_URL", "http://127.0.0.1:8000"),
        help="the hub's URL (default: EVENTCAST_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument("--token", default=os.environ.get("EVENTCAST_TOKEN", ""))
    parser.add_argument(
        "--mqtt",
        default=os.environ.get("EVENTCAST_MQTT", "mqtt://127.0.0.1:1883"),
        help="the MQTT broker the hub consumes (default: EVENTCAST_MQTT or mqtt://127.0.0.1:1883)",
    )
    parser.add_argument("--root", default="sensors", help="the topic root: <root>/<sensor>/reading")
    parser.add_argument("--sensors", type=int, default=10)
    parser.add_argument("--readings", type=int, default=5, help="readings per sensor (0: forever)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between readings")
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument("--page-port", type=int, help="serve iot_sensors.html on this port")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="give up waiting for readings after this"
    )
    args = parser.parse_args(argv)
    server = serve_page(args.page_port) if args.page_port else None
    if server is not None:
        print(f"page: http://127.0.0.1:{args.page_port}/{PAGE.name}?hub={args.url}", flush=True)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
