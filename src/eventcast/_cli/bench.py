"""``eventcast bench``: a load run against a hub.

N WebSocket clients (a minimal client on ``websockets`` speaking the
Centrifuge JSON protocol: connect, subscribe, answer pings) subscribe to one
channel; a publisher sends publications through the HTTP API at a fixed rate,
each carrying its send time (``ts``, Unix seconds). Every client records the
publish -> receive latency of each publication it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..exceptions import EventcastError
from .api import describe_network_error
from .common import EXIT_USAGE, CliError, fail, http_base

__all__ = ["BenchConfig", "BenchResult", "check_plot_support", "plot", "run_bench"]

#: Clients connecting at once.
_CONNECT_CONCURRENCY = 50
#: Publications sent in one ``batch`` call at most.
_MAX_BATCH = 500


@dataclass(frozen=True)
class BenchConfig:
    url: str
    token: str
    api_key: str
    clients: int
    rate: float
    duration: float
    channel: str
    timeout: float = 10.0


@dataclass
class BenchResult:
    """What a run measured. Times are seconds since the first publication."""

    clients: int
    duration: float = 0.0
    published: int = 0
    publish_errors: int = 0
    client_errors: int = 0
    deliveries: int = 0
    #: (receive time, latency) of every delivery.
    samples: list[tuple[float, float]] = field(default_factory=list)
    #: Send time of every successful publication.
    sends: list[float] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return self.published * self.clients

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.deliveries)

    @property
    def errors(self) -> int:
        return self.publish_errors + self.client_errors + self.lost

    def latencies(self) -> list[float]:
        return sorted(latency for _, latency in self.samples)

    def summary(self) -> dict[str, Any]:
        latencies = self.latencies()
        elapsed = self.duration or 1.0
        return {
            "clients": self.clients,
            "duration_s": round(self.duration, 3),
            "published": self.published,
            "publish_errors": self.publish_errors,
            "deliveries": self.deliveries,
            "expected_deliveries": self.expected,
            "lost": self.lost,
            "client_errors": self.client_errors,
            "errors": self.errors,
            "publications_per_s": round(self.published / elapsed, 1),
            "deliveries_per_s": round(self.deliveries / elapsed, 1),
            "latency_ms": {
                "p50": _ms(percentile(latencies, 0.50)),
                "p90": _ms(percentile(latencies, 0.90)),
                "p99": _ms(percentile(latencies, 0.99)),
                "max": _ms(latencies[-1] if latencies else None),
            },
        }

    def per_second(self) -> list[dict[str, Any]]:
        """Per second of the run: deliveries, publications and latency percentiles."""
        seconds = max(1, math.ceil(max([self.duration, *(t for t, _ in self.samples)])))
        buckets: list[list[float]] = [[] for _ in range(seconds)]
        for received, latency in self.samples:
            buckets[min(seconds - 1, max(0, int(received)))].append(latency)
        sent = [0] * seconds
        for when in self.sends:
            sent[min(seconds - 1, max(0, int(when)))] += 1
        rows = []
        for second, bucket in enumerate(buckets):
            bucket.sort()
            rows.append(
                {
                    "second": second,
                    "deliveries": len(bucket),
                    "publications": sent[second],
                    "p50": _ms(percentile(bucket, 0.50)),
                    "p90": _ms(percentile(bucket, 0.90)),
                    "p99": _ms(percentile(bucket, 0.99)),
                }
            )
        return rows


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of sorted values (``None`` when empty)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class _BenchClient:
    """One subscriber: a raw Centrifuge JSON client."""

    def __init__(self, ws: Any, result: BenchResult, on_delivery: Callable[[], None]) -> None:
        self.ws = ws
        self.result = result
        self.on_delivery = on_delivery
        self.start = 0.0
        self.closing = False

    @classmethod
    async def open(
        cls, config: BenchConfig, result: BenchResult, on_delivery: Callable[[], None]
    ) -> _BenchClient:
        from websockets.asyncio.client import connect as ws_connect

        base = http_base(config.url)
        ws_url = base.replace("http", "ws", 1) + "/connection/websocket"
        try:
            ws = await ws_connect(
                ws_url,
                open_timeout=config.timeout,
                ping_interval=None,
                max_size=None,
                compression=None,
                proxy=None,
                user_agent_header="eventcast-bench",
            )
        except TimeoutError:
            fail(f"the hub at {base} did not accept a WebSocket in time")
        except OSError as exc:
            fail(f"cannot reach the hub at {base}: {describe_network_error(exc)}")
        except Exception as exc:  # websockets' InvalidStatus, InvalidHandshake, ...
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None:
                fail(f"the hub at {base} refused the WebSocket (HTTP {status})")
            fail(f"cannot open a WebSocket to {ws_url}: {exc}")
        client = cls(ws, result, on_delivery)
        try:
            async with asyncio.timeout(config.timeout):
                await client._request(1, "connect", {"token": config.token, "name": "bench"})
                await client._request(2, "subscribe", {"channel": config.channel})
        except TimeoutError:
            await ws.close()
            fail(f"the hub at {base} did not answer connect/subscribe in time")
        except BaseException:
            await ws.close()
            raise
        return client

    async def _request(self, command_id: int, method: str, body: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        await self.ws.send(json.dumps({"id": command_id, method: body}))
        try:
            while True:
                frame = await self.ws.recv()
                for message in _messages(frame):
                    if message.get("id") != command_id:
                        continue
                    error = message.get("error")
                    if error is not None:
                        what = "connect"
                        if method == "subscribe":
                            what = f"subscribe to {body['channel']!r}"
                        hint = " (check --token or EVENTCAST_TOKEN)" if method == "connect" else ""
                        fail(
                            f"the hub refused {what}: {error.get('code')} "
                            f"{error.get('message', '')}{hint}"
                        )
                    return
        except ConnectionClosed as exc:
            received = exc.rcvd
            reason = f"{received.reason} ({received.code})" if received else "no close frame"
            hint = " (check --token or EVENTCAST_TOKEN)" if "token" in reason else ""
            fail(f"the hub closed the connection: {reason}{hint}")

    async def read(self) -> None:
        """Count deliveries until the socket closes; answer pings."""
        from websockets.exceptions import ConnectionClosed

        try:
            async for frame in self.ws:
                now = time.time()
                for message in _messages(frame):
                    if not message:
                        await self.ws.send("{}")  # a ping: pong
                        continue
                    push = message.get("push")
                    if not isinstance(push, dict):
                        continue
                    pub = push.get("pub")
                    if isinstance(pub, dict):
                        data = pub.get("data")
                        if isinstance(data, dict) and isinstance(data.get("ts"), int | float):
                            self.result.deliveries += 1
                            self.result.samples.append((now - self.start, now - data["ts"]))
                            self.on_delivery()
                    elif "disconnect" in push:
                        self.result.client_errors += 1
                        return
        except ConnectionClosed:
            pass
        if not self.closing:
            self.result.client_errors += 1

    async def close(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            await self.ws.close()


def _messages(frame: str | bytes) -> list[dict[str, Any]]:
    text = frame.decode() if isinstance(frame, bytes) else frame
    out: list[dict[str, Any]] = []
    for line in text.split("\n"):
        if line.strip():
            value = json.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out


async def run_bench(
    config: BenchConfig,
    *,
    on_progress: Callable[[float, BenchResult], None] | None = None,
    on_connected: Callable[[int], None] | None = None,
) -> BenchResult:
    """Run the load; every setup failure is a :class:`CliError`."""
    result = BenchResult(clients=config.clients)
    complete = asyncio.Event()

    def delivered() -> None:
        if result.published and result.deliveries >= result.expected and publishing_done:
            complete.set()

    publishing_done = False
    clients: list[_BenchClient] = []
    readers: list[asyncio.Task[None]] = []
    base = http_base(config.url)
    semaphore = asyncio.Semaphore(_CONNECT_CONCURRENCY)

    async def open_one() -> _BenchClient:
        async with semaphore:
            return await _BenchClient.open(config, result, delivered)

    http = httpx.AsyncClient(
        base_url=f"{base}/api",
        headers={"X-API-Key": config.api_key, "User-Agent": "eventcast-bench"},
        timeout=config.timeout,
        trust_env=False,
    )
    try:
        # Every attempt runs to its end (each is bounded by the timeout): cancelling one
        # half-way could leak its socket.
        opened = await asyncio.gather(
            *(open_one() for _ in range(config.clients)), return_exceptions=True
        )
        clients.extend(c for c in opened if isinstance(c, _BenchClient))
        failure = next((e for e in opened if isinstance(e, BaseException)), None)
        if failure is not None:
            raise failure
        if on_connected is not None:
            on_connected(len(clients))
        loop = asyncio.get_running_loop()
        start = loop.time()
        wall_start = time.time()
        for client in clients:
            client.start = wall_start
        readers.extend(asyncio.ensure_future(client.read()) for client in clients)
        seq = 0
        first = True
        while True:
            elapsed = loop.time() - start
            if elapsed >= config.duration:
                break
            due = min(_MAX_BATCH, int(elapsed * config.rate) + 1 - seq)
            if due > 0:
                ok, errors = await _publish(http, base, config.channel, seq, due, strict=first)
                first = False
                now = time.time() - wall_start
                result.published += ok
                result.publish_errors += errors
                result.sends.extend([now] * ok)
                seq += due
            if on_progress is not None:
                on_progress(min(loop.time() - start, config.duration), result)
            next_due = (seq) / config.rate
            pause = min(next_due, config.duration) - (loop.time() - start)
            if pause > 0:
                await asyncio.sleep(pause)  # the publishing rate, not a synchronisation
        result.duration = loop.time() - start
        publishing_done = True
        delivered()
        if on_progress is not None:
            on_progress(config.duration, result)
        # Let the last publications arrive (bounded: lost ones are counted as errors).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(2.0, config.timeout / 2)):
                await complete.wait()
    finally:
        for client in clients:
            await client.close()
        await asyncio.gather(*readers, return_exceptions=True)
        await http.aclose()
    return result


async def _publish(
    http: httpx.AsyncClient, base: str, channel: str, seq: int, n: int, *, strict: bool
) -> tuple[int, int]:
    """Publish ``n`` publications (one call); return (ok, errors). ``strict``: fail on errors."""
    now = time.time()
    items = [{"channel": channel, "data": {"seq": seq + i, "ts": now}} for i in range(n)]
    try:
        if n == 1:
            response = await http.post("/publish", json=items[0])
        else:
            response = await http.post(
                "/batch", json={"commands": [{"publish": item} for item in items]}
            )
    except httpx.TransportError as exc:
        if strict:
            fail(f"cannot reach the hub at {base}: {describe_network_error(exc)}")
        return 0, n
    if response.status_code == 401:
        fail(
            f"the hub at {base} rejected the API key (HTTP 401 unauthorized): "
            "check --api-key or EVENTCAST_API_KEY"
        )
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        if strict:
            fail(f"the hub at {base} answered HTTP {response.status_code} to publish")
        return 0, n
    replies = body.get("replies") if n > 1 else [body]
    if not isinstance(replies, list):
        return 0, n
    ok = sum(1 for reply in replies if isinstance(reply, dict) and "error" not in reply)
    if strict and ok < n:
        error = next(r["error"] for r in replies if isinstance(r, dict) and "error" in r)
        fail(f"the hub refused publish to {channel!r}: {error.get('code')} {error.get('message')}")
    return ok, n - ok


def check_plot_support() -> None:
    """Fail early (exit code 2) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("--plot needs matplotlib: pip install 'eventcast[plot]'", EXIT_USAGE)


def plot(result: BenchResult, path: Path, title: str) -> None:
    """Write latency percentiles and throughput per second to a PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        fail("--plot needs matplotlib: pip install 'eventcast[plot]'", EXIT_USAGE)
    rows = result.per_second()
    seconds = [row["second"] + 1 for row in rows]
    figure = Figure(figsize=(9, 6), layout="constrained")
    latency, throughput = figure.subplots(2, 1, sharex=True)
    for key, style in (("p50", "-o"), ("p90", "-s"), ("p99", "-^")):
        values = [math.nan if row[key] is None else row[key] for row in rows]
        latency.plot(seconds, values, style, label=key, markersize=4)
    latency.set_ylabel("publish -> receive latency (ms)")
    latency.set_title(title)
    latency.legend(loc="upper left")
    latency.grid(alpha=0.3)
    throughput.bar(seconds, [row["deliveries"] for row in rows], label="deliveries/s")
    throughput.plot(
        seconds, [row["publications"] for row in rows], "k-o", markersize=4, label="publications/s"
    )
    throughput.set_xlabel("second of the run")
    throughput.set_ylabel("per second")
    throughput.legend(loc="upper left")
    throughput.grid(alpha=0.3)
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise CliError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    except (ValueError, EventcastError) as exc:
        raise CliError(f"cannot write the plot to {path}: {exc}", EXIT_USAGE) from None
