"""Scale-out over a backplane: one node's intake, and 1 node against 3 nodes.

**Part 1, intake per node** (``--parts intake``). One process subscribes to
one channel and counts; a publisher process pushes pre-encoded envelopes
(``eventcast.backplane.base.encode_envelope`` with a foreign node id) straight
into the engine over a raw socket (RESP ``PUBLISH`` for Redis, ``PUB`` for
NATS, ``--chunk`` publications per write, one write per round trip). Each
engine is measured with:

* **eventcast**: a ``Bus(backplane=url)`` with one subscriber reading
  ``get_batch`` and counting (decode, Event, ring, wake-up: the whole intake);
* **raw**: the driver alone: a redis-py asyncio pub/sub ``get_message`` loop
  that counts, or a nats-py subscription counting in its callback;
* **lean**: what a reader without the driver's per-message machinery takes
  in: an ``asyncio.Protocol`` parsing RESP with ``hiredis.Reader`` (Redis) or
  parsing NATS ``MSG`` frames itself, counting (the ceiling of a rewrite).

**Full** load is closed loop: the publisher keeps at most ``--window``
publications not yet counted in flight (so Redis never cuts the subscriber for
its pub/sub output buffer, 32 MB), i.e. it publishes as fast as the subscriber
takes in. **Half** is open loop at half that rate. The subscriber's CPU
(utime + stime from ``/proc/<pid>/stat``) over the window divided by the
publications it counted is the **CPU per publication**. Every 64th
publication's latency is recorded (publisher's ``time.time_ns()`` in the data
to the subscriber's count). The subscriber is pinned to CPU 0 and the
publisher to CPU 1 (``--no-pin`` to turn it off); the engine is not ours to
pin, its CPU is reported. ``--profile`` runs eventcast's subscriber under
cProfile and prints where its time goes; a breakdown of the bus's own cost per
publication (no I/O) is printed every run.

**Part 2, 1 node against 3 nodes** (``--parts nodes``). ``eventcast serve``
processes (``python -m eventcast serve --config``: ``uvicorn_config``, a live
namespace, no log; 1 node on ``memory://``, 3 nodes on Redis, then NATS, with
a unique ``?prefix=``) and ``--clients`` WebSocket subscribers opened by
``benchmarks/hub.py``'s raw-socket client workers, one worker per node (a
third of the clients each; with 1 node all on it). A publisher process posts
``/api/publish`` to node 1 at fixed rates (``--rate``, over keep-alive
connections), ``{"ts": time.time_ns(), "seq": n}`` in the data; latency is
publish to receive, reported for every client and for the clients of nodes
2-3 alone (their publications crossed the backplane).

Every window also records the CPU used by the rest of the machine ("other").
Keys and the NATS presence bucket made by the run are deleted at the end, and
every process it started is stopped, on errors and Ctrl-C too.

    python benchmarks/backplane.py [--quick] [--parts intake,nodes] [--engines redis,nats]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

import uvloop

from _common import (
    child_process,
    header,
    loadavg,
    machine,
    percentile,
    process_cpu,
    process_times,
    rate,
    system_busy,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TOPIC = "bench"
FOREIGN_NODE = "bench0foreign"  # not any bus's node id: nothing is skipped as an echo
SAMPLE_EVERY = 64  # intake: latency of every 64th publication
ENGINES = ("redis", "nats")
PARTS = ("intake", "nodes")
API_KEY = "benchmark-api-key"
DEBUG = bool(os.environ.get("BENCH_DEBUG"))


def default_urls() -> tuple[str, str]:
    return (
        os.environ.get("EVENTCAST_BENCH_REDIS", "redis://127.0.0.1:6379/0"),
        os.environ.get("EVENTCAST_BENCH_NATS", "nats://127.0.0.1:4222"),
    )


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def engine_pid(engine: str) -> int | None:
    """The pid of the local redis-server / nats-server (read-only, for its CPU)."""
    name = {"redis": "redis-server", "nats": "nats-server"}[engine]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        return int(entry)
            except OSError:
                continue
    return None


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        return process_cpu(pid)
    except OSError:
        return float("nan")


def reachable(url: str, default_port: int) -> bool:
    try:
        with socket.create_connection(host_port(url, default_port), timeout=2):
            return True
    except OSError:
        return False


def weighted(lat: list[int], weights: list[int], q: float) -> float:
    """The q-th percentile in ms of latencies in ns, each counting ``weight`` times."""
    if not lat:
        return float("nan")
    pairs = sorted(zip(lat, weights, strict=True))
    target = q / 100 * sum(weights)
    acc = 0
    for value, weight in pairs:
        acc += weight
        if acc >= target:
            return value / 1e6
    return pairs[-1][0] / 1e6


# -- part 1: intake ---------------------------------------------------------------------


class IntakeShared:
    """Shared memory between the orchestrator, the subscriber and the publisher."""

    def __init__(self, ctx: Any) -> None:
        self.received = ctx.Value("q", 0, lock=False)
        self.published = ctx.Value("q", 0, lock=False)
        self.phase = ctx.Value("i", 0, lock=False)
        self.stop = ctx.Value("i", 0, lock=False)
        self.ready = ctx.Value("i", 0, lock=False)
        self.pub_ready = ctx.Value("i", 0, lock=False)
        self.pub_stop = ctx.Value("i", 0, lock=False)
        self.rate = ctx.Value("d", 0.0, lock=False)  # 0: closed loop; < 0: paused


class Sampler:
    """Latency samples per phase: every SAMPLE_EVERY-th publication counted."""

    def __init__(self, shared: IntakeShared) -> None:
        self.shared = shared
        self.latency: dict[int, list[int]] = {}

    def record(self, ts: int) -> None:
        phase = self.shared.phase.value
        if phase:
            self.latency.setdefault(phase, []).append(time.time_ns() - ts)


def ts_of(payload: bytes) -> int:
    i = payload.find(b'"ts":')
    return int(payload[i + 5 : payload.find(b",", i)])


async def watch_stop(shared: IntakeShared) -> None:
    # A flag in shared memory, set by another process: nothing to await but time.
    while not shared.stop.value:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def intake_eventcast(url: str, shared: IntakeShared, sampler: Sampler) -> dict[str, Any]:
    from eventcast import Bus, Overflow
    from eventcast.exceptions import SubscriptionClosedError

    bus = Bus(backplane=url, maxsize=65536, overflow=Overflow.DROP_OLDEST)
    await bus.start()
    consumer: asyncio.Task[None] | None = None
    try:
        sub = bus.subscribe(TOPIC, maxsize=65536)
        backplane = bus.backplane
        assert backplane is not None
        deadline = time.monotonic() + 10
        while TOPIC not in backplane.filters and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # let the SUBSCRIBE / SUB reach the engine
        received = shared.received

        async def consume() -> None:
            count = 0
            with contextlib.suppress(SubscriptionClosedError):
                while True:
                    events = await sub.get_batch(4096)
                    # The sample: publications whose count is a multiple of SAMPLE_EVERY.
                    first = -count % SAMPLE_EVERY
                    for i in range(first, len(events), SAMPLE_EVERY):
                        sampler.record(events[i].data["ts"])
                    count += len(events)
                    received.value = count

        consumer = asyncio.get_running_loop().create_task(consume())
        shared.ready.value = 1
        await watch_stop(shared)
        return {
            "dropped": bus.statistics().get("dropped", 0),
            "backplane_received": backplane.received,
            "undecodable": bus.backplane_stats["undecodable"],
        }
    finally:
        if consumer is not None:
            consumer.cancel()
        # Close the bus without closing the subscription first: closing it alone
        # wakes the bus's interest task, which then UNSUBSCRIBEs through redis-py,
        # and redis-py (8.1) swallows the cancellation Bus.close() sends it then,
        # so Bus.close() waits forever (reported; not the measure here).
        await bus.close()


class HiredisSubscriber(asyncio.Protocol):
    """A lean Redis pub/sub reader: an asyncio protocol parsing with hiredis.Reader."""

    def __init__(self, channel: bytes, shared: IntakeShared, sampler: Sampler) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.channel = channel
        self.received = shared.received
        self.sampler = sampler
        self.count = 0
        self.subscribed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ch = self.channel
        transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(ch), ch))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        count = self.count
        message = reader.gets()
        while message is not False:
            if message[0] == b"message":
                count += 1
                if count % SAMPLE_EVERY == 0:
                    self.sampler.record(ts_of(message[2]))
            elif not self.subscribed.done():
                self.subscribed.set_result(None)
            message = reader.gets()
        self.count = count
        self.received.value = count


async def intake_hiredis(url: str, shared: IntakeShared, sampler: Sampler) -> dict[str, Any]:
    base, _, query = url.partition("?")
    prefix = query.partition("prefix=")[2]
    host, port = host_port(base, 6379)
    protocol = HiredisSubscriber(f"{prefix}:{TOPIC}".encode(), shared, sampler)
    transport, _ = await asyncio.get_running_loop().create_connection(lambda: protocol, host, port)
    try:
        await protocol.subscribed
        shared.ready.value = 1
        await watch_stop(shared)
        return {"dropped": 0}
    finally:
        transport.close()


async def intake_raw_redis(url: str, shared: IntakeShared, sampler: Sampler) -> dict[str, Any]:
    from redis.asyncio import Redis

    base, _, query = url.partition("?")
    prefix = query.partition("prefix=")[2]
    client = Redis.from_url(base)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(f"{prefix}:{TOPIC}")
        shared.ready.value = 1
        received = shared.received
        stop = shared.stop
        count = 0
        while not stop.value:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            while message is not None:
                count += 1
                received.value = count
                if count % SAMPLE_EVERY == 0:
                    sampler.record(ts_of(message["data"]))
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
        return {"dropped": 0}
    finally:
        await pubsub.aclose()
        await client.aclose()


async def intake_raw_nats(url: str, shared: IntakeShared, sampler: Sampler) -> dict[str, Any]:
    import nats

    from eventcast.backplane.nats import subject_of

    pending_limit = 1_000_000  # nats-py's slow-consumer bound for this raw baseline

    base, _, query = url.partition("?")
    prefix = query.partition("prefix=")[2]
    nc = await nats.connect(base, pending_size=64 * 1024 * 1024)
    received = shared.received
    count = 0

    async def on_message(msg: Any) -> None:
        nonlocal count
        count += 1
        received.value = count
        if count % SAMPLE_EVERY == 0:
            sampler.record(ts_of(msg.data))

    try:
        await nc.subscribe(
            subject_of(prefix, TOPIC),
            cb=on_message,
            pending_msgs_limit=pending_limit,
            pending_bytes_limit=256 * 1024 * 1024,
        )
        await nc.flush()
        shared.ready.value = 1
        await watch_stop(shared)
        return {"dropped": 0}
    finally:
        await nc.close()


class LeanNATSSubscriber(asyncio.Protocol):
    """A lean NATS reader: an asyncio protocol parsing ``MSG`` frames itself."""

    def __init__(self, subject: bytes, shared: IntakeShared, sampler: Sampler) -> None:
        self.subject = subject
        self.received = shared.received
        self.sampler = sampler
        self.count = 0
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.subscribed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data if self.buf else data
        pos, size, count = 0, len(buf), self.count
        while pos < size:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if buf.startswith(b"MSG ", pos):
                length = int(buf[buf.rfind(b" ", pos, eol) + 1 : eol])
                end = eol + 2 + length
                if end + 2 > size:
                    break
                count += 1
                if count % SAMPLE_EVERY == 0:
                    self.sampler.record(ts_of(buf[eol + 2 : end]))
                pos = end + 2
                continue
            line = buf[pos:eol]
            pos = eol + 2
            if line.startswith(b"INFO"):
                self.transport.write(
                    b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB %s 1\r\nPING\r\n'
                    % self.subject
                )
            elif line == b"PING":
                self.transport.write(b"PONG\r\n")
            elif line == b"PONG" and not self.subscribed.done():
                self.subscribed.set_result(None)
        self.buf = buf[pos:]
        self.count = count
        self.received.value = count


async def intake_lean_nats(url: str, shared: IntakeShared, sampler: Sampler) -> dict[str, Any]:
    from eventcast.backplane.nats import subject_of

    base, _, query = url.partition("?")
    prefix = query.partition("prefix=")[2]
    host, port = host_port(base, 4222)
    protocol = LeanNATSSubscriber(subject_of(prefix, TOPIC).encode(), shared, sampler)
    transport, _ = await asyncio.get_running_loop().create_connection(lambda: protocol, host, port)
    try:
        await protocol.subscribed
        shared.ready.value = 1
        await watch_stop(shared)
        return {"dropped": 0}
    finally:
        transport.close()


def intake_node_main(
    system: str,
    url: str,
    shared: IntakeShared,
    queue: Any,
    cpus: set[int] | None,
    profile_to: str | None,
) -> None:
    child_process(cpus)
    sampler = Sampler(shared)
    run = {
        "eventcast": intake_eventcast,
        "raw-redis": intake_raw_redis,
        "raw-nats": intake_raw_nats,
        "lean-redis": intake_hiredis,
        "lean-nats": intake_lean_nats,
    }[system]
    profile = None
    if profile_to:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    try:
        extra = uvloop.run(run(url, shared, sampler))
    except Exception as exc:
        extra = {"error": repr(exc)}
    finally:
        if profile is not None:
            profile.disable()
            profile.dump_stats(profile_to)
    queue.put({"latency": sampler.latency, **extra})


class RawPublisher:
    """Pre-encoded publications over a raw socket: RESP PUBLISH or NATS PUB."""

    def __init__(self, engine: str, url: str) -> None:
        from eventcast.backplane.nats import subject_of

        base, _, query = url.partition("?")
        prefix = query.partition("prefix=")[2]
        self.engine = engine
        if engine == "redis":
            self.sock = socket.create_connection(host_port(base, 6379))
            self.target = f"{prefix}:{TOPIC}".encode()
        else:
            self.sock = socket.create_connection(host_port(base, 4222))
            self.target = subject_of(prefix, TOPIC).encode()
            self._read_until(b"\r\n")  # INFO
            self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            self._read_until(b"PONG\r\n")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _read_until(self, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the engine closed the connection")
            data += chunk
        return data

    def send(self, envelope: bytes, n: int) -> None:
        """Send n copies of one envelope and wait for the engine to have taken them."""
        if self.engine == "redis":
            cmd = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(self.target),
                self.target,
                len(envelope),
                envelope,
            )
            self.sock.sendall(cmd * n)
            replies = 0
            while replies < n:  # one ":<subscribers>\r\n" per PUBLISH
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                if chunk.startswith(b"-"):
                    raise RuntimeError(f"Redis refused PUBLISH: {chunk[:200]!r}")
                replies += chunk.count(b"\r\n")
        else:
            cmd = b"PUB %s %d\r\n%s\r\n" % (self.target, len(envelope), envelope)
            self.sock.sendall(cmd * n + b"PING\r\n")
            data = self._read_until(b"PONG\r\n")
            if b"-ERR" in data:
                raise RuntimeError(f"NATS refused PUB: {data[:200]!r}")
            if data.count(b"PING\r\n"):  # a server ping: answer it
                self.sock.sendall(b"PONG\r\n" * data.count(b"PING\r\n"))

    def close(self) -> None:
        self.sock.close()


def intake_publisher_main(
    engine: str,
    url: str,
    shared: IntakeShared,
    window: int,
    chunk: int,
    cpus: set[int] | None,
) -> None:
    child_process(cpus)
    from eventcast.backplane.base import encode_envelope
    from eventcast.events import Event

    publisher = RawPublisher(engine, url)
    shared.pub_ready.value = 1
    seq = 0
    rate_now, origin, sent = -1.0, 0.0, 0
    try:
        while not shared.pub_stop.value:
            target = shared.rate.value
            if target < 0:  # paused
                time.sleep(0.001)
                continue
            if target > 0:  # open loop at a fixed rate
                now = time.monotonic()
                if target != rate_now:
                    rate_now, origin, sent = target, now, 0
                due = int((now - origin) * target) - sent
                if due > window:  # cannot keep up: do not burst to catch up
                    origin, sent, due = now, 0, chunk
                n = min(chunk, due)
                if n <= 0:
                    time.sleep(0.0005)
                    continue
                sent += n
            else:  # closed loop: at most `window` publications not yet counted
                rate_now = -1.0
                n = min(chunk, window - (seq - shared.received.value))
                if n < min(chunk, window // 20):
                    time.sleep(0.0002)
                    continue
            # One envelope per write: a fresh timestamp, encoded once, sent n times.
            envelope = encode_envelope(
                FOREIGN_NODE, Event(topic=TOPIC, data={"ts": time.time_ns(), "seq": seq})
            )
            publisher.send(envelope, n)
            seq += n
            shared.published.value = seq
    finally:
        publisher.close()


class IntakeRun:
    """One subscriber process and its publisher, measured in phases."""

    def __init__(
        self, system: str, engine: str, url: str, args: argparse.Namespace, cpus: Any
    ) -> None:
        self.system = system
        self.engine = engine
        self.url = url
        self.args = args
        self.cpus = cpus
        self.ctx = multiprocessing.get_context("fork")
        self.shared = IntakeShared(self.ctx)
        self.queue = self.ctx.Queue()
        self.node: Any = None
        self.publisher: Any = None
        self.phase_id = 0
        self.engine_pid = engine_pid(engine)
        self.profile_to: str | None = None
        if args.profile and system == "eventcast":
            fd, self.profile_to = tempfile.mkstemp(prefix=f"eventcast-intake-{engine}-")
            os.close(fd)

    def start(self) -> None:
        kind = self.system if self.system == "eventcast" else f"{self.system}-{self.engine}"
        self.node = self.ctx.Process(
            target=intake_node_main,
            args=(
                kind,
                self.url,
                self.shared,
                self.queue,
                self.cpus[0] if self.cpus else None,
                self.profile_to,
            ),
            daemon=True,
        )
        self.node.start()
        self._wait(self.shared.ready, self.node, "the subscriber did not start")
        self.shared.rate.value = 0.0
        self.publisher = self.ctx.Process(
            target=intake_publisher_main,
            args=(
                self.engine,
                self.url,
                self.shared,
                self.args.window,
                self.args.chunk,
                self.cpus[1] if self.cpus else None,
            ),
            daemon=True,
        )
        self.publisher.start()
        self._wait(self.shared.pub_ready, self.publisher, "the publisher did not connect")

    @staticmethod
    def _wait(flag: Any, proc: Any, message: str) -> None:
        deadline = time.monotonic() + 20
        while not flag.value:
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError(message)
            time.sleep(0.02)

    def measure(self, label: str, target_rate: float) -> dict[str, Any]:
        args = self.args
        shared = self.shared
        if target_rate > 0:  # let the subscriber catch up with the previous load first
            shared.rate.value = -1.0
            deadline = time.monotonic() + 30
            while shared.published.value > shared.received.value:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        shared.rate.value = target_rate
        time.sleep(args.warmup)
        assert self.node is not None
        assert self.publisher is not None
        self.phase_id += 1
        node_pid, pub_pid = self.node.pid, self.publisher.pid
        user0, sys0 = process_times(node_pid)
        pub0, eng0, busy0 = cpu_of(pub_pid), cpu_of(self.engine_pid), system_busy()
        r0, p0 = shared.received.value, shared.published.value
        t0 = time.perf_counter()
        shared.phase.value = self.phase_id
        time.sleep(args.seconds)
        shared.phase.value = 0
        elapsed = time.perf_counter() - t0
        user1, sys1 = process_times(node_pid)
        pub1, eng1, busy1 = cpu_of(pub_pid), cpu_of(self.engine_pid), system_busy()
        r1, p1 = shared.received.value, shared.published.value
        if not self.node.is_alive() or not self.publisher.is_alive():
            raise RuntimeError(f"{self.system}/{self.engine}: a process died during the window")
        node_cpu = (user1 + sys1) - (user0 + sys0)
        engine_cpu = eng1 - eng0
        known = node_cpu + (pub1 - pub0) + (0.0 if engine_cpu != engine_cpu else engine_cpu)
        received = r1 - r0
        return {
            "system": self.system,
            "engine": self.engine,
            "load": label,
            "phase": self.phase_id,
            "seconds": elapsed,
            "published_per_s": (p1 - p0) / elapsed,
            "received_per_s": received / elapsed,
            "node_cpu_pct": node_cpu / elapsed * 100,
            "node_system_share": (sys1 - sys0) / max(node_cpu, 1e-9),
            "cpu_us_per_publication": node_cpu / max(received, 1) * 1e6,
            "publisher_cpu_pct": (pub1 - pub0) / elapsed * 100,
            "engine_cpu_pct": engine_cpu / elapsed * 100,
            "other_cpu_pct": max(0.0, (busy1 - busy0) - known) / elapsed * 100,
        }

    def finish(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Stop both processes; attach latencies to the rows; return the node's extras."""
        self.stop_publisher()
        self.shared.stop.value = 1
        result: dict[str, Any] = {}
        try:
            result = self.queue.get(timeout=20)
        except Exception:
            result = {"error": "no result from the subscriber"}
        for row in rows:
            lat = result.get("latency", {}).get(row["phase"], [])
            row["latency_samples"] = len(lat)
            row["p50_ms"] = percentile(lat, 50) / 1e6
            row["p99_ms"] = percentile(lat, 99) / 1e6
            row["dropped"] = result.get("dropped", 0)
        return result

    def stop_publisher(self) -> None:
        if self.publisher is not None:
            self.shared.pub_stop.value = 1
            self.publisher.join(5)
            if self.publisher.is_alive():
                self.publisher.kill()
                self.publisher.join()
            self.publisher = None

    def close(self) -> None:
        self.shared.stop.value = 1
        with contextlib.suppress(Exception):
            self.stop_publisher()
        if self.node is not None:
            self.node.join(10)
            if self.node.is_alive():
                self.node.kill()
                self.node.join()
            self.node = None


def run_intake(
    engine: str, url: str, args: argparse.Namespace, cpus: Any, prefix: str
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for system in ("raw", "lean", "eventcast"):
        run = IntakeRun(system, engine, with_prefix(url, f"{prefix}_{system}"), args, cpus)
        mine: list[dict[str, Any]] = []
        try:
            run.start()
            full = run.measure("full", 0.0)
            mine.append(full)
            mine.append(run.measure("half", max(1.0, full["received_per_s"] / 2)))
            extra = run.finish(mine)
            if extra.get("error"):
                print(f"  {system}/{engine}: subscriber error {extra['error']}", flush=True)
            if extra.get("undecodable"):
                print(f"  {system}/{engine}: {extra['undecodable']} undecodable", flush=True)
        finally:
            run.close()
        for row in mine:
            print(
                f"  {system:<9} {engine:<5} {row['load']:<4} "
                f"{rate(row['received_per_s']):>9} taken in, "
                f"{row['cpu_us_per_publication']:.2f} µs CPU/publication, "
                f"p99 {row['p99_ms']:.1f} ms, other CPU {row['other_cpu_pct']:.0f}%",
                flush=True,
            )
        rows.extend(mine)
        if run.profile_to:
            parts = print_profile(run.profile_to, f"eventcast subscriber on {engine}, cProfile")
            for row in mine:
                row["profile_us_per_publication"] = parts
            with contextlib.suppress(OSError):
                os.unlink(run.profile_to)
    return rows


#: Parts of the subscriber, found in a profile by (file suffix, function name).
PROFILE_PARTS = (
    ("redis-py get_message (read, parse, per message)", "redis/asyncio/client.py", "get_message"),
    ("RedisBackplane._drain (all of the reader)", "backplane/redis.py", "_drain"),
    ("nats-py protocol parser (incl. _process_msg)", "nats/protocol/parser.py", "parse"),
    ("nats-py _process_msg (Msg, pending queue)", "nats/aio/client.py", "_process_msg"),
    ("nats-py subscription task (callback)", "nats/aio/subscription.py", "_wait_for_msgs"),
    ("Bus._on_backplane_messages", "eventcast/bus.py", "_on_backplane_messages"),
    ("  decode_envelope", "backplane/base.py", "decode_envelope"),
    ("  ring append (Subscription.append)", "eventcast/subscription.py", "append"),
    ("  _count_topic", "eventcast/bus.py", "_count_topic"),
    ("consumer: Subscription.get_batch", "eventcast/subscription.py", "get_batch"),
)


def print_profile(path: str, title: str, limit: int = 22) -> dict[str, float]:
    """Print the top functions and what each part costs per publication (under cProfile)."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    entries: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    publications = sum(
        v[1] for k, v in entries.items() if k[2] == "decode_envelope" and k[0].endswith("base.py")
    )
    parts: dict[str, float] = {}
    for label, suffix, name in PROFILE_PARTS:
        cum = sum(v[3] for k, v in entries.items() if k[2] == name and k[0].endswith(suffix))
        if cum and publications:
            parts[label] = cum / publications * 1e6
    print(f"\n-- {title}: {publications} publications decoded --")
    print("cumulative time per publication (cProfile; coroutines include awaits: compare shares):")
    for label, value in parts.items():
        print(f"  {label:<52} {value:6.2f} µs")
    stats.sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    start = text.find("   ncalls")
    print(text[start:] if start >= 0 else text)
    sys.stdout.flush()
    return parts


def intake_breakdown(n: int = 50_000) -> dict[str, float]:
    """The bus's own cost per backplane publication, in process, without I/O (µs)."""
    import gc

    import msgspec

    from eventcast import Bus
    from eventcast.backplane import MemoryBackplane
    from eventcast.backplane.base import Envelope, decode_envelope, encode_envelope
    from eventcast.events import Event

    payloads = [
        encode_envelope(FOREIGN_NODE, Event(topic=TOPIC, data={"ts": time.time_ns(), "seq": i}))
        for i in range(n)
    ]
    out: dict[str, float] = {}
    decode_struct = msgspec.json.Decoder(Envelope).decode
    decode_any = msgspec.json.Decoder().decode

    def timed(fn: Any) -> float:
        gc.collect()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best / n * 1e6

    out["msgspec: envelope struct"] = timed(lambda: [decode_struct(p) for p in payloads])
    envs = [decode_struct(p) for p in payloads]
    out["msgspec: data (bytes(raw) + decode)"] = timed(
        lambda: [decode_any(bytes(e.data)) for e in envs]
    )
    # Results dropped at once (kept, 50,000 live objects make the GC dominate).
    out["decode_envelope (all of it)"] = timed(
        lambda: [None for p in payloads if decode_envelope(p) is None]
    )

    async def through_bus() -> float:
        backplane = MemoryBackplane()
        bus = Bus(backplane=backplane, maxsize=n + 1)
        await bus.start()
        try:
            sub = bus.subscribe(TOPIC, maxsize=n + 1)
            handler = bus.backplane.on_messages  # what the backplane's reader calls
            best = float("inf")
            for _ in range(3):
                gc.collect()
                t = time.perf_counter()
                for i in range(0, n, 1024):
                    handler(payloads[i : i + 1024])
                    got = 0
                    while got < len(payloads[i : i + 1024]):
                        got += len(await sub.get_batch(4096))
                best = min(best, time.perf_counter() - t)
            return best / n * 1e6
        finally:
            await bus.close()

    out["bus: _on_backplane_messages + get_batch"] = uvloop.run(through_bus())
    return out


# -- part 2: 1 node against 3 nodes -------------------------------------------------------


def node_config(path: str, backplane_url: str, name: str, secret: str) -> None:
    """A TOML config for `eventcast serve`: live namespaces, no log, the limits lifted."""
    lines = [
        f'token_hmac_secret = "{secret}"',
        f'api_key = "{API_KEY}"',
        'log_url = "memory://"',
        f'backplane_url = "{backplane_url}"',
        f'node_name = "{name}"',
        # All the load comes from one host and one publisher: lift the abuse limits.
        "connections_per_user = 1000000",
        "connection_rate = 1e9",
        "command_rate = 1e9",
        "user_command_rate = 1e9",
        "client_queue_bytes = 8388608",
        "",
        # hub.py's clients subscribe to `bench` and `durable:bench`: both live here.
        "[[namespaces]]",
        'name = ""',
        "allow_subscribe_for_client = true",
        "",
        "[[namespaces]]",
        'name = "durable"',
        "allow_subscribe_for_client = true",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class HttpPublisher(asyncio.Protocol):
    """One keep-alive connection posting /api/publish; counts replies and errors."""

    def __init__(self, port: int, shared: Any) -> None:
        self.port = port
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.in_flight = 0
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def publish(self, ts: int, seq: int) -> None:
        body = b'{"channel":"%s","data":{"ts":%d,"seq":%d}}' % (TOPIC.encode(), ts, seq)
        assert self.transport is not None
        self.transport.write(
            b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Authorization: apikey %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (self.port, API_KEY.encode(), len(body), body)
        )
        self.in_flight += 1

    def data_received(self, data: bytes) -> None:
        data = self.buf + data
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                break
            head = data[:end].lower()
            i = head.find(b"content-length:")
            j = head.find(b"\r\n", i)
            length = int(head[i + 15 : j if j >= 0 else len(head)]) if i >= 0 else 0
            if len(data) < end + 4 + length:
                break
            body = data[end + 4 : end + 4 + length]
            if not head.startswith(b"http/1.1 200") or b'"error"' in body:
                self.shared.pub_errors.value += 1
                if DEBUG:
                    print("publish failed:", data[: end + 4 + length], file=sys.stderr)
            data = data[end + 4 + length :]
            self.in_flight -= 1
        self.buf = data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def http_publish_loop(port: int, connections: int, shared: Any) -> None:
    loop = asyncio.get_running_loop()

    async def connect() -> HttpPublisher:
        conn = HttpPublisher(port, shared)
        await loop.create_connection(lambda: conn, "127.0.0.1", port)
        return conn

    conns = [await connect() for _ in range(connections)]
    shared.pub_ready.value = 1
    seq = turn = 0
    rate_now, origin, sent = -1.0, 0.0, 0
    while not shared.pub_stop.value:
        await asyncio.sleep(0.001)
        for i, conn in enumerate(conns):
            if conn.lost.done():  # the server's keep-alive timeout closed an idle one
                conns[i] = await connect()
        target = shared.rate.value
        if target <= 0:
            rate_now = -1.0
            continue
        now = loop.time()
        if target != rate_now:
            rate_now, origin, sent = target, now, 0
        due = int((now - origin) * target) - sent
        if due > 1000:  # cannot keep up: do not burst to catch up
            origin, sent, due = now, 0, 0
        for _ in range(max(0, due)):
            conn = conns[turn % connections]  # round robin: none stays idle
            turn += 1
            conn.publish(time.time_ns(), seq)
            seq += 1
        sent += max(0, due)
        shared.published.value = seq
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()


def http_publisher_main(port: int, connections: int, shared: Any, cpus: set[int] | None) -> None:
    child_process(cpus)
    uvloop.run(http_publish_loop(port, connections, shared))


class NodesRun:
    """N `eventcast serve` processes, client workers spread over them, one publisher."""

    def __init__(
        self,
        label: str,
        backplane_url: str,
        nodes: int,
        engine: str | None,
        args: argparse.Namespace,
        cpus: Any,
    ) -> None:
        import hub  # benchmarks/hub.py: the raw-socket WebSocket client workers

        self.hub = hub
        self.label = label
        self.backplane_url = backplane_url
        self.n_nodes = nodes
        self.engine = engine
        self.args = args
        self.cpus = cpus
        self.ctx = multiprocessing.get_context("fork")
        self.workers = max(nodes, args.workers)
        self.shared = hub.Shared(self.ctx, self.workers)
        self.queue = self.ctx.Queue()
        self.tmp = tempfile.mkdtemp(prefix="eventcast-backplane-bench-")
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logs: list[str] = []
        self.procs: list[Any] = []
        self.publisher: Any = None
        self.phase_id = 0
        self.engine_pid = engine_pid(engine) if engine else None
        from eventcast.server.auth import mint_token

        self.token = mint_token(secret=hub.SECRET, user="bench", ttl=None).encode()

    def start(self) -> None:
        hub = self.hub
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
        for i in range(self.n_nodes):
            port = hub.free_port()
            config = os.path.join(self.tmp, f"node{i + 1}.toml")
            node_config(config, self.backplane_url, f"bench-node-{i + 1}", hub.SECRET)
            log = os.path.join(self.tmp, f"node{i + 1}.log")
            cmd = [sys.executable, "-m", "eventcast", "serve", "--port", str(port)]
            cmd += ["--config", config]
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
                )
            self.nodes.append(proc)
            self.ports.append(port)
            self.logs.append(log)
            if self.cpus:
                os.sched_setaffinity(proc.pid, self.cpus[0])
        for proc, port, log in zip(self.nodes, self.ports, self.logs, strict=True):
            try:
                hub.wait_for_port(port, proc)
                self._wait_ready(port, proc)
            except RuntimeError:
                with open(log, errors="replace") as f:
                    print(f.read()[-3000:], file=sys.stderr)
                raise
        clients = self.args.clients
        per = [
            clients // self.workers + (1 if i < clients % self.workers else 0)
            for i in range(self.workers)
        ]
        first = 0
        for i, n in enumerate(per):
            proc = self.ctx.Process(
                target=hub.worker_main,
                args=(
                    i,
                    "eventcast",
                    self.ports[i % self.n_nodes],
                    n,
                    first,
                    self.shared,
                    self.token,
                    self.queue,
                    self.cpus[1] if self.cpus else None,
                ),
                daemon=True,
            )
            proc.start()
            self.procs.append(proc)
            first += n
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(self.shared.ready) + sum(self.shared.failed) >= clients:
                break
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError("a node exited")
            time.sleep(0.1)
        ready = sum(self.shared.ready)
        if ready < clients:
            raise RuntimeError(f"only {ready} of {clients} clients subscribed")
        self.per_worker = per
        self.shared.rate.value = 0.0
        self.publisher = self.ctx.Process(
            target=http_publisher_main,
            args=(
                self.ports[0],
                self.args.api_connections,
                self.shared,
                self.cpus[1] if self.cpus else None,
            ),
            daemon=True,
        )
        self.publisher.start()
        deadline = time.monotonic() + 20
        while not self.shared.pub_ready.value:
            if time.monotonic() > deadline or not self.publisher.is_alive():
                raise RuntimeError("the publisher could not connect")
            time.sleep(0.02)

    @staticmethod
    def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """Until GET /readyz answers 200 (the backplane is connected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the node exited with {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"node on {port} not ready within {timeout}s")

    def measure(self, target_rate: float) -> dict[str, Any]:
        args = self.args
        shared = self.shared
        shared.rate.value = target_rate
        time.sleep(args.warmup)
        self.phase_id += 1
        pids = [p.pid for p in self.nodes]
        gen = [p.pid for p in self.procs] + [self.publisher.pid]
        cpu0 = [process_times(p) for p in pids]
        gen0, eng0, busy0 = sum(cpu_of(p) for p in gen), cpu_of(self.engine_pid), system_busy()
        d0 = list(shared.delivered)
        p0, e0 = shared.published.value, shared.pub_errors.value
        t0 = time.perf_counter()
        shared.phase.value = self.phase_id
        time.sleep(args.seconds)
        shared.phase.value = 0
        elapsed = time.perf_counter() - t0
        cpu1 = [process_times(p) for p in pids]
        gen1, eng1, busy1 = sum(cpu_of(p) for p in gen), cpu_of(self.engine_pid), system_busy()
        d1 = list(shared.delivered)
        p1 = shared.published.value
        for proc in self.nodes:
            if proc.poll() is not None:
                raise RuntimeError("a node exited during the window")
        if not self.publisher.is_alive():
            raise RuntimeError("the publisher died during the window")
        node_cpu = [(u1 + s1) - (u0 + s0) for (u0, s0), (u1, s1) in zip(cpu0, cpu1, strict=True)]
        node_sys = sum(s1 - s0 for (_, s0), (_, s1) in zip(cpu0, cpu1, strict=True))
        deliveries = sum(d1) - sum(d0)
        published = p1 - p0
        engine_cpu = eng1 - eng0
        known = sum(node_cpu) + (gen1 - gen0) + (0.0 if engine_cpu != engine_cpu else engine_cpu)
        return {
            "setup": self.label,
            "nodes": self.n_nodes,
            "rate": target_rate,
            "phase": self.phase_id,
            "clients": args.clients,
            "seconds": elapsed,
            "publications_per_s": published / elapsed,
            "deliveries_per_s": deliveries / elapsed,
            "delivered_share": deliveries / max(1, published * args.clients),
            "nodes_cpu_pct": sum(node_cpu) / elapsed * 100,
            "node1_cpu_pct": node_cpu[0] / elapsed * 100,
            "nodes_system_share": node_sys / max(sum(node_cpu), 1e-9),
            "cpu_us_per_delivery": sum(node_cpu) / max(deliveries, 1) * 1e6,
            "loadgen_cpu_pct": (gen1 - gen0) / elapsed * 100,
            "engine_cpu_pct": engine_cpu / elapsed * 100,
            "other_cpu_pct": max(0.0, (busy1 - busy0) - known) / elapsed * 100,
            "publish_errors": shared.pub_errors.value - e0,
        }

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """Stop the clients; attach latencies (all clients, and nodes 2-3 alone)."""
        self.stop_publisher()
        self.shared.stop.value = 1
        results: dict[int, dict[str, Any]] = {}
        for _ in self.procs:
            try:
                index, result = self.queue.get(timeout=30)
            except Exception:
                break
            results[index] = result
        for row in rows:
            groups: dict[str, tuple[list[int], list[int]]] = {"all": ([], []), "remote": ([], [])}
            for index, result in results.items():
                entry = result["latency"].get(row["phase"])
                if not entry:
                    continue
                keys = ["all"] + (["remote"] if index % self.n_nodes != 0 else [])
                for key in keys:
                    groups[key][0].extend(entry[0])
                    groups[key][1].extend(entry[1])
            for key, (lat, weights) in groups.items():
                row[f"{key}_p50_ms"] = weighted(lat, weights, 50)
                row[f"{key}_p99_ms"] = weighted(lat, weights, 99)
            row["latency_samples"] = len(groups["all"][0])
            row["lost_clients"] = sum(self.shared.failed)

    def stop_publisher(self) -> None:
        if self.publisher is not None:
            self.shared.pub_stop.value = 1
            self.publisher.join(5)
            if self.publisher.is_alive():
                self.publisher.kill()
                self.publisher.join()
            self.publisher = None

    def close(self) -> None:
        import shutil

        self.shared.stop.value = 1
        with contextlib.suppress(Exception):
            self.stop_publisher()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for node in self.nodes:
            if node.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_nodes(
    label: str,
    backplane_url: str,
    nodes: int,
    engine: str | None,
    args: argparse.Namespace,
    cpus: Any,
) -> list[dict[str, Any]]:
    run = NodesRun(label, backplane_url, nodes, engine, args, cpus)
    rows: list[dict[str, Any]] = []
    try:
        start = time.perf_counter()
        run.start()
        print(
            f"  {label}: {nodes} node(s), {args.clients} clients subscribed "
            f"in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
        for target in args.rate:
            rows.append(run.measure(target))
        run.finish(rows)
    finally:
        run.close()
    for row in rows:
        print(
            f"  {label:<15} {row['rate']:>5g}/s: {rate(row['deliveries_per_s']):>9} deliveries, "
            f"p50 {row['all_p50_ms']:.1f} ms, p99 {row['all_p99_ms']:.1f} ms, "
            f"nodes CPU {row['nodes_cpu_pct']:.0f}%, other {row['other_cpu_pct']:.0f}%",
            flush=True,
        )
    return rows


# -- cleanup ------------------------------------------------------------------------------


def cleanup_redis(url: str, prefix: str) -> int:
    """Delete the keys under our unique prefix (presence hashes, if any)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def cleanup_nats(url: str, buckets: list[str]) -> int:
    """Delete the presence buckets (JetStream key-value) the nodes created."""

    async def run() -> int:
        import nats
        from nats.js.errors import NotFoundError

        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1)
        deleted = 0
        try:
            js = nc.jetstream()
            for bucket in buckets:
                with contextlib.suppress(NotFoundError):
                    await js.delete_key_value(bucket)
                    deleted += 1
        finally:
            await nc.close()
        return deleted

    return asyncio.run(run())


# -- tables ------------------------------------------------------------------------------------


def print_intake(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'engine':<6} | {'subscriber':<10} | {'load':<4} | {'taken in/s':>10} "
        f"| {'CPU µs/pub':>10} | {'vs raw':>6} | {'sub CPU (kernel)':>16} | {'publisher':>9} "
        f"| {'engine':>6} | {'other':>5} | {'p50 ms':>7} | {'p99 ms':>7}"
    )
    raw = {(r["engine"], r["load"]): r for r in rows if r["system"] == "raw"}
    for r in rows:
        base = raw.get((r["engine"], r["load"]))
        ratio = (
            f"{r['cpu_us_per_publication'] / base['cpu_us_per_publication']:5.1f}x" if base else "-"
        )
        print(
            f"{r['engine']:<6} | {r['system']:<10} | {r['load']:<4} | "
            f"{rate(r['received_per_s']):>10} | {r['cpu_us_per_publication']:10.2f} | "
            f"{ratio:>6} | {r['node_cpu_pct']:4.0f}% ({r['node_system_share'] * 100:2.0f}% sys) "
            f"    | {r['publisher_cpu_pct']:8.0f}% | {r['engine_cpu_pct']:5.0f}% "
            f"| {r['other_cpu_pct']:4.0f}% | {r['p50_ms']:7.2f} | {r['p99_ms']:7.2f}"
        )
        if r.get("dropped"):
            print(f"{'':<6}   ({r['dropped']} dropped by the subscription)")
    sys.stdout.flush()


def print_nodes(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'setup':<15} | {'pubs/s':>6} | {'deliveries/s':>12} | {'delivered':>9} "
        f"| {'p50 ms':>6} | {'p99 ms':>6} | {'remote p50':>10} | {'remote p99':>10} "
        f"| {'nodes CPU':>9} | {'µs/deliv':>8} | {'engine':>6} | {'loadgen':>7} | {'other':>5}"
    )
    for r in rows:
        print(
            f"{r['setup']:<15} | {r['publications_per_s']:6.0f} | "
            f"{rate(r['deliveries_per_s']):>12} | {r['delivered_share'] * 100:8.1f}% | "
            f"{r['all_p50_ms']:6.1f} | {r['all_p99_ms']:6.1f} | "
            f"{r['remote_p50_ms']:10.1f} | {r['remote_p99_ms']:10.1f} | "
            f"{r['nodes_cpu_pct']:8.0f}% | {r['cpu_us_per_delivery']:8.1f} | "
            f"{r['engine_cpu_pct']:5.0f}% | {r['loadgen_cpu_pct']:6.0f}% | "
            f"{r['other_cpu_pct']:4.0f}%"
        )
        problems = []
        if r["publish_errors"]:
            problems.append(f"{r['publish_errors']} publish errors")
        if r["lost_clients"]:
            problems.append(f"{r['lost_clients']} clients lost")
        if problems:
            print(f"{'':<15}   ({', '.join(problems)})")
    sys.stdout.flush()


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    redis_url, nats_url = default_urls()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, fewer clients")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"subset of {PARTS}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {ENGINES}")
    parser.add_argument("--seconds", type=float, help="measuring window (default 5; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds before a window (default 2; quick 1)")
    parser.add_argument(
        "--window", type=int, default=10_000, help="intake full load: publications in flight"
    )
    parser.add_argument("--chunk", type=int, default=500, help="intake: publications per write")
    parser.add_argument("--clients", type=int, help="nodes: subscribers (default 300; quick 150)")
    parser.add_argument("--workers", type=int, default=3, help="nodes: client processes")
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        help="nodes: publications/s through node 1's HTTP API (repeatable; default 20, 100, 250)",
    )
    parser.add_argument(
        "--api-connections", type=int, default=8, help="nodes: publisher's HTTP connections"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile eventcast's subscriber")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--redis-url", default=redis_url, help="(env EVENTCAST_BENCH_REDIS)")
    parser.add_argument("--nats-url", default=nats_url, help="(env EVENTCAST_BENCH_NATS)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.clients is None:
        args.clients = 150 if args.quick else 300
    if not args.rate:
        args.rate = [100.0] if args.quick else [20.0, 100.0, 250.0]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for p in parts:
        if p not in PARTS:
            parser.error(f"unknown part {p!r}")
    for e in engines:
        if e not in ENGINES:
            parser.error(f"unknown engine {e!r}")
    urls = {"redis": args.redis_url, "nats": args.nats_url}
    ports = {"redis": 6379, "nats": 4222}
    available = []
    for engine in engines:
        if reachable(urls[engine], ports[engine]):
            available.append(engine)
        else:
            print(f"(skipping {engine}: {urls[engine]} is not reachable)")

    cores = sorted(os.sched_getaffinity(0))
    cpus = None
    if not args.no_pin and len(cores) >= 2:
        cpus = ({cores[0]}, set(cores[1:]))
    if HERE not in sys.path:
        sys.path.insert(0, HERE)  # for hub (the client workers)

    prefix = f"ecbench_{os.getpid()}_{secrets.token_hex(3)}"
    print(header("scale-out over a backplane"))
    print(
        f"(window {args.seconds:g}s after {args.warmup:g}s warm-up; "
        + (
            f"subscribers/nodes on CPU {sorted(cpus[0])}, load generators on {sorted(cpus[1])}; "
            if cpus
            else "no CPU pinning; "
        )
        + f"load average {loadavg()}; "
        f"prefix {prefix})",
        flush=True,
    )
    out: dict[str, Any] = {
        "machine": machine(),
        "settings": vars(args),
        "intake": [],
        "breakdown": {},
        "nodes": [],
    }
    buckets: list[str] = []
    try:
        if "intake" in parts:
            print("\n## intake per node", flush=True)
            for engine in available:
                out["intake"].extend(run_intake(engine, urls[engine], args, cpus, prefix))
            out["breakdown"] = intake_breakdown()
            print_intake(out["intake"])
            print("\nthe bus's own cost per backplane publication (in process, no I/O, best of 3):")
            for name, value in out["breakdown"].items():
                print(f"  {name:<42} {value:6.2f} µs")
        if "nodes" in parts:
            print("\n## 1 node against 3 nodes", flush=True)
            setups: list[tuple[str, str, int, str | None]] = [("1 node", "memory://", 1, None)]
            for engine in available:
                node_prefix = f"{prefix}_nodes_{engine}"
                setups.append(
                    (f"3 nodes, {engine}", with_prefix(urls[engine], node_prefix), 3, engine)
                )
                if engine == "nats":
                    buckets.append(f"{node_prefix}_presence")
            for label, url, n, engine in setups:
                out["nodes"].extend(run_nodes(label, url, n, engine, args, cpus))
            print_nodes(out["nodes"])
    finally:
        if "redis" in available:
            with contextlib.suppress(Exception):
                deleted = cleanup_redis(urls["redis"], prefix)
                if deleted:
                    print(f"(deleted {deleted} Redis keys under {prefix})")
        if "nats" in available and buckets:
            with contextlib.suppress(Exception):
                cleanup_nats(urls["nats"], buckets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


if __name__ == "__main__":
    main()
