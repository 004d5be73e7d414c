"""The chaos harness: real hubs, real sockets, faults, and a history checker (``make chaos``).

Every scenario starts its own private servers on free ports (``eventcast
serve`` processes, and where needed a private ``redis-server`` or
``nats-server``, or a schema of its own on the shared PostgreSQL), connects
lean Centrifuge WebSocket clients that record every publication they receive
(those replayed in subscribe replies included), publishes to a durable channel
through the HTTP API while it injects its faults, then publishes a last
*fence* publication, waits until every client has it, and hands the histories
to the checker (``_history.py``): per client no acknowledged publication lost
since it first subscribed, no duplicate, offsets strictly increasing, the data
acknowledged at each offset, and ``recovered: false`` only where retention was
really exceeded. Each scenario prints one line: PASS or FAIL, with delivered,
lost, duplicated, out of order, resumes (recovered / asked), p50/p99 latency
of live publications (publish call to arrival) and the hubs' RSS before and
after.

Scenarios (``--only`` takes a comma-separated list):

* ``steady``: 200 clients, 50 publications/s, one node (SQLite log);
* ``kill9``: one node SIGKILLed and restarted on the same data and port while
  100 clients reconnect and recover;
* ``slow``: two nodes at once, each with 100 clients at 50 publications/s and
  a consumer of a bulk channel (50 publications/s of 32 KiB); on one node that
  consumer never reads: it must be closed with 3008, and the p99 of the 100
  others must stay within 2x of their twins' on the other node;
* ``churn``: 100 clients dropping their sockets (TCP RST) every 0.5-3 s and
  resubscribing with recovery, 100 publications/s;
* ``redis-backplane`` / ``nats-backplane``: three nodes over a private Redis
  (NATS) backplane, sharing a PostgreSQL log; the backplane is SIGKILLed and
  restarted on the same port (``/readyz`` must say 503, then 200 again);
* ``node-kill``: three nodes (private Redis backplane, PostgreSQL log); one is
  SIGKILLed and its clients move to the others and recover there;
* ``postgres-churn`` / ``redis-log-churn``: the churn scenario on one node with
  the PostgreSQL log (a schema of its own) / the Redis Streams log (a private
  ``redis-server``).

Profiles: the default (``make chaos``) runs about 10 minutes; ``--short`` (CI,
``tests/benchmarks/test_chaos.py``) under 3 minutes. ``--seconds S`` sets every
scenario's length, ``--repeat N`` runs each selected scenario N times (each
with fresh servers). The long runs of issue 12 are ``make chaos-long``:
``--only churn --seconds 300`` and ``--only kill9 --short --repeat 20``.

    python benchmarks/chaos.py [--short] [--only churn,kill9] [--seconds S] [--repeat N]
                               [--json results.json] [--seed N] [--keep]

Exit status 0 when every scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import httpx
import uvloop

from _chaos_clients import DataPool, Probe, Publisher, RefusedError, Subscriber
from _common import header, loadavg, machine, percentile, process_cpu
from _fleet import API_KEY, DEADLINE, SECRET, Fleet, HubNode, Proc
from _history import Received, Retention, Verdict, check, summary

CHANNEL: Final = "chaos.stream"
#: The durable namespace every hub runs (the defaults elsewhere: replay cap 300, 1 MiB queues).
NAMESPACE: Final = {
    "name": "",
    "history_size": 1000,
    "history_ttl": 600,
    "allow_subscribe_for_client": True,
    "allow_recovery": True,
}
#: A live-only namespace for the scenarios' own probes (interest churn, routing checks).
PROBES: Final = {"name": "probe", "allow_subscribe_for_client": True}
#: The slow consumer scenario's bulk live channel.
BULK: Final = "probe:bulk"
RETENTION: Final = Retention(history_size=1000, replay_cap=300, history_ttl=600)
#: Churn: each client drops its socket after uniform(0.5, 3) seconds.
CHURN: Final = (0.5, 3.0)
#: How long every client has to receive the fence publication.
DRAIN: Final = 30.0
#: The slow consumer scenario: the others' p99 may grow at most this much.
SLOW_P99_FACTOR: Final = 2.0
DEFAULT_POSTGRES: Final = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Profile:
    """Seconds of load per scenario, and how many faults each injects."""

    steady: float = 60
    kill9: float = 60
    kills: int = 3
    slow: float = 30
    churn: float = 60
    backplane: float = 45
    flaps: int = 2
    node_kill: float = 45
    log_churn: float = 45


PROFILES: Final = {
    "full": Profile(),
    "short": Profile(
        steady=15,
        kill9=12,
        kills=1,
        slow=12,
        churn=15,
        backplane=10,
        flaps=1,
        node_kill=10,
        log_churn=8,
    ),
}


@dataclass
class Outcome:
    """One scenario run: the checker's verdict and the scenario's own checks."""

    scenario: str
    verdict: Verdict
    clients: int
    rate: float
    seconds: float
    rss_before: list[float | None]
    rss_after: list[float | None]
    #: The scenario's own checks: (what, held).
    checks: list[tuple[str, bool]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def ok(self) -> bool:
        """The checker found nothing and every check of the scenario held."""
        return self.verdict.ok and all(held for _, held in self.checks)

    def line(self) -> str:
        """The scenario's one line."""
        v = self.verdict

        def mib(values: list[float | None]) -> str:
            return "+".join("-" if x is None else f"{x:.0f}" for x in values)

        text = (
            f"{'PASS' if self.ok else 'FAIL'} {self.scenario:<16} {self.clients:>3} clients "
            f"{self.rate:g}/s {self.seconds:g}s: delivered {v.delivered} "
            f"(replayed {v.replayed}), lost {v.lost}, duplicated {v.duplicated}, "
            f"out of order {v.out_of_order}, recovered {v.recovered}/{v.resumes}, "
            f"p50 {v.percentile_ms(50):.1f} ms, p99 {v.percentile_ms(99):.1f} ms, "
            f"hub RSS {mib(self.rss_before)} -> {mib(self.rss_after)} MiB, "
            f"load {self.figures.get('loadavg', '?')}"
        )
        failed = [what for what, held in self.checks if not held]
        other = {k.value: n for k, n in v.counts.items()}
        if failed or other:
            text += " | " + "; ".join([*failed, *(f"{k}: {n}" for k, n in other.items())])
        return text

    def to_json(self) -> dict[str, Any]:
        """Everything about the run, JSON-ready."""
        return {
            "scenario": self.scenario,
            "ok": self.ok,
            "clients": self.clients,
            "rate": self.rate,
            "seconds": self.seconds,
            "wall_seconds": round(self.wall, 1),
            "rss_mib_before": self.rss_before,
            "rss_mib_after": self.rss_after,
            "checks": [{"check": what, "held": held} for what, held in self.checks],
            **summary(self.verdict),
            **self.figures,
        }


def hub_settings(**settings: Any) -> dict[str, Any]:
    """A node's settings: the durable namespace, the probes' namespace, ``settings``."""
    return {"namespaces": [NAMESPACE, PROBES], **settings}


def mint(user: str) -> str:
    """A connection token of the private hubs."""
    from eventcast.server.auth import mint_token

    return mint_token(secret=SECRET, user=user, ttl=None)


def up(*nodes: HubNode) -> Callable[[], list[str]]:
    """The HTTP base URLs of those of ``nodes`` that are up (asked again at each call)."""
    return lambda: [node.base for node in nodes if node.up]


class Load:
    """Subscribers and a publisher over some nodes; the run's histories.

    Args:
        nodes: the hub nodes (clients are spread over them in turn).
        clients: how many subscribers.
        rate: publications per second.
        seed: the seed of every random choice (churn intervals, jitter).
        churn: the subscribers' churn interval (``None``: no churn).
        pad: bytes of padding per publication.
    """

    def __init__(
        self,
        nodes: Sequence[HubNode],
        *,
        clients: int,
        rate: float,
        seed: int,
        churn: tuple[float, float] | None = None,
        pad: int = 0,
    ) -> None:
        self.nodes = list(nodes)
        rng = random.Random(seed)
        pool = DataPool()
        self.subscribers = [
            Subscriber(
                f"c{i}",
                CHANNEL,
                mint(f"c{i}"),
                self.ports,
                i % len(self.nodes),
                pool,
                random.Random(rng.random()),
                churn,
            )
            for i in range(clients)
        ]
        self.publisher = Publisher(CHANNEL, up(*self.nodes), API_KEY, rate, pad=pad)
        self.tasks: list[asyncio.Task[None]] = []
        #: Clients whose task ended with an error (a harness defect: it must stay empty).
        self.crashed: list[str] = []

    def ports(self) -> list[int]:
        """Every node's port (a client of a dead node moves on to the next one)."""
        return [node.port for node in self.nodes]

    async def connect(self) -> None:
        """Start every subscriber and wait until each has subscribed."""
        loop = asyncio.get_running_loop()
        for subscriber in self.subscribers:
            task = loop.create_task(subscriber.run(), name=subscriber.name)
            task.add_done_callback(self._ended)
            self.tasks.append(task)
        await self._all(lambda s: s.subscribed, "every client to subscribe")

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A client's task ends only when cancelled: report any other end at once."""
        if task.cancelled():
            return
        exc = task.exception()
        self.crashed.append(f"{task.get_name()}: {exc!r}")
        print(f"  client {task.get_name()} crashed: {exc!r}", file=sys.stderr, flush=True)

    async def _all(self, event: Callable[[Subscriber], asyncio.Event], what: str) -> None:
        waits = [event(s).wait() for s in self.subscribers]
        try:
            async with asyncio.timeout(DRAIN):
                await asyncio.gather(*waits)
        except TimeoutError:
            late = [s.name for s in self.subscribers if not event(s).is_set()]
            print(f"  timed out waiting for {what}: {len(late)} late ({late[:5]})", flush=True)

    async def run(self, seconds: float, faults: Callable[[], Awaitable[None]] | None) -> None:
        """Publish for ``seconds`` while ``faults`` run."""
        jobs: list[Awaitable[None]] = [self.publisher.run(seconds)]
        if faults is not None:
            jobs.append(faults())
        await asyncio.gather(*jobs)

    async def drain(self) -> int:
        """Stop the churn, publish the fence, wait until every client has it; its offset."""
        for subscriber in self.subscribers:
            subscriber.calm()
        end = await self.publisher.fence()
        for subscriber in self.subscribers:
            subscriber.expect(end)
        await self._all(lambda s: s.reached, f"every client to reach offset {end}")
        return end

    def verdict(self, end: int) -> Verdict:
        """The checker's verdict on the run."""
        histories = [s.history for s in self.subscribers]
        return check(self.publisher.publishes, histories, RETENTION, end=end)

    def figures(self) -> dict[str, Any]:
        """The clients' and the publisher's own counts."""
        failures: dict[str, int] = {}
        closes: dict[str, int] = {}
        for s in self.subscribers:
            for key, count in s.failures.items():
                failures[key] = failures.get(key, 0) + count
            for code, count in s.closes.items():
                closes[str(code)] = closes.get(str(code), 0) + count
        acks = [p.acked_at - p.sent_at for p in self.publisher.publishes if p.acked_at is not None]
        return {
            # Publish call to acknowledgement (the log's commit included), for comparison
            # with the delivery latency.
            "ack_ms": {"p50": percentile(acks, 50) * 1000, "p99": percentile(acks, 99) * 1000},
            "connections": sum(s.sessions for s in self.subscribers),
            "drops": sum(s.drops for s in self.subscribers),
            "connect_failures": failures,
            "close_codes": closes,
            "publish_errors": dict(self.publisher.errors),
        }

    def timeline(self, bucket: float = 5.0) -> list[dict[str, float]]:
        """Live latency (ms) by ``bucket`` seconds of publish time: p50, p99, and how many."""
        sent = {p.offset: p.sent_at for p in self.publisher.publishes if p.offset is not None}
        if not sent:
            return []
        start = min(sent.values())
        buckets: dict[int, list[float]] = {}
        for subscriber in self.subscribers:
            for record in subscriber.history.records():
                if isinstance(record, Received) and not record.replayed:
                    at = sent.get(record.offset)
                    if at is not None:
                        buckets.setdefault(int((at - start) / bucket), []).append(record.at - at)
        return [
            {
                "from_s": index * bucket,
                "p50": round(percentile(values, 50) * 1000, 1),
                "p99": round(percentile(values, 99) * 1000, 1),
                "n": len(values),
            }
            for index, values in sorted(buckets.items())
        ]

    async def close(self) -> None:
        """Stop every client and the publisher."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.publisher.aclose()


async def exercise(
    name: str,
    nodes: Sequence[HubNode],
    *,
    clients: int,
    rate: float,
    seconds: float,
    seed: int,
    churn: tuple[float, float] | None = None,
    faults: Callable[[], Awaitable[None]] | None = None,
    pad: int = 0,
    before: Callable[[Load], Awaitable[None]] | None = None,
) -> tuple[Outcome, Load]:
    """Run a load over ``nodes`` (already started) and check its histories."""
    started = time.monotonic()
    rss_before = [n.rss_mib() for n in nodes]
    rss_timeline: list[list[float | None]] = []
    load = Load(nodes, clients=clients, rate=rate, seed=seed, churn=churn, pad=pad)
    try:
        await load.connect()
        if before is not None:
            await before(load)
        cpu = [(n.pid, process_cpu(n.pid)) for n in nodes]
        own_cpu, began = time.process_time(), time.monotonic()
        sampler = asyncio.get_running_loop().create_task(sample_rss(nodes, rss_timeline))
        try:
            await load.run(seconds, faults)
        finally:
            sampler.cancel()
        load_seconds = time.monotonic() - began
        # CPU share of each node over the load (None for a node restarted meanwhile).
        hub_cpu = [
            round((process_cpu(pid) - used) / load_seconds, 2)
            if n.alive() and n.pid == pid
            else None
            for n, (pid, used) in zip(nodes, cpu, strict=True)
        ]
        own_cpu = round((time.process_time() - own_cpu) / load_seconds, 2)
        end = await load.drain()
        rss_after = [n.rss_mib() for n in nodes]
        verdict = load.verdict(end)
    finally:
        await load.close()
    outcome = Outcome(name, verdict, clients, rate, seconds, rss_before, rss_after)
    outcome.figures.update(
        load.figures(),
        end_offset=end,
        hub_cpu=hub_cpu,
        harness_cpu=own_cpu,
        latency_timeline=load.timeline(),
        rss_timeline=rss_timeline,
        # The machine's load average at the end: the latencies depend on it (shared cores).
        loadavg=loadavg().split()[0],
    )
    outcome.checks.append((f"client crashes: {load.crashed or 'none'}", not load.crashed))
    outcome.wall = time.monotonic() - started
    return outcome, load


async def sample_rss(nodes: Sequence[HubNode], into: list[list[float | None]]) -> None:
    """Append the nodes' RSS (MiB) every 5 seconds until cancelled (does a node grow?)."""
    while True:
        into.append([None if (r := n.rss_mib()) is None else round(r, 1) for n in nodes])
        await asyncio.sleep(5.0)  # the sampling period


async def shut_down(outcome: Outcome, nodes: Sequence[HubNode]) -> None:
    """Stop the nodes still up with SIGTERM (a graceful shutdown), then read their logs.

    A node must exit with status 0 and no node may have written a traceback
    during the whole run, its shutdown included (errors are logged on one line).
    """
    running = [n for n in nodes if n.alive()]
    await asyncio.gather(*(n.stop() for n in running))
    codes = [n.process.returncode if n.process is not None else None for n in running]
    outcome.checks.append((f"graceful exits {codes}", all(code == 0 for code in codes)))
    tracebacks = sum(n.tracebacks() for n in nodes)
    outcome.checks.append((f"{tracebacks} tracebacks in the hub logs", tracebacks == 0))


# -- scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What every scenario gets from the command line."""

    profile: Profile
    seed: int
    postgres: str
    keep: bool


Scenario = Callable[[Fleet, Options], Awaitable[Outcome]]


async def steady(fleet: Fleet, opts: Options) -> Outcome:
    """200 clients, 50 publications/s, one node."""
    node = fleet.hub(hub_settings())
    await node.start()
    outcome, _ = await exercise(
        "steady", [node], clients=200, rate=50, seconds=opts.profile.steady, seed=opts.seed
    )
    return outcome


async def kill9(fleet: Fleet, opts: Options) -> Outcome:
    """The node is SIGKILLed and restarted on the same data; clients recover."""
    node = fleet.hub(hub_settings())
    await node.start()
    seconds, kills = opts.profile.kill9, opts.profile.kills
    downtimes: list[float] = []

    async def faults() -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for k in range(kills):
            # The fault schedule: evenly spread over the run.
            await asyncio.sleep(max(0.0, began + seconds * (k + 1) / (kills + 1) - loop.time()))
            down = loop.time()
            node.kill()
            await node.start()
            downtimes.append(loop.time() - down)

    outcome, load = await exercise(
        "kill9", [node], clients=100, rate=50, seconds=seconds, seed=opts.seed, faults=faults
    )
    v = outcome.verdict
    outcome.figures.update(kills=kills, downtime_s=[round(d, 2) for d in downtimes])
    outcome.checks.append((f"{len(downtimes)}/{kills} kills done", len(downtimes) == kills))
    enough = v.resumes >= len(load.subscribers) * kills
    outcome.checks.append((f"{v.resumes} resumes after {kills} kills", enough))
    return outcome


async def metric(node: HubNode, name: str, **labels: str) -> float:
    """One sample of a node's ``/metrics`` (0 when absent)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{node.base}/metrics")).text
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        match = re.match(r"(\w+)(\{[^}]*\})? (\S+)$", line)
        if match and match[1] == name and all(w in (match[2] or "") for w in wanted):
            return float(match[3])
    return 0.0


async def slow(fleet: Fleet, opts: Options) -> Outcome:
    """A consumer that never reads beside 100 clients: closed with 3008, nobody else slowed.

    Two nodes run at once, each with 100 clients on the durable channel at 50
    publications/s and a bulk live channel taking 50 publications/s of 32 KiB.
    On one node a consumer subscribed to both channels stops reading (it fills
    the kernel's buffers and its 1 MiB queue in a few seconds); on its twin, the
    same consumer keeps reading. Whatever else the machine does weighs on both
    alike, so the two p99s compare.
    """
    seconds = opts.profile.slow
    twin, node = fleet.hub(hub_settings()), fleet.hub(hub_settings())
    await asyncio.gather(twin.start(), node.start())
    consumers = {
        twin: Probe(twin.port, mint("bulk-twin"), keep=0),
        node: Probe(node.port, mint("bulk-slow"), keep=0),
    }
    bulk = {n: Publisher(BULK, up(n), API_KEY, 50, pad=32768) for n in consumers}
    tasks: list[asyncio.Task[None]] = []

    def before(target: HubNode) -> Callable[[Load], Awaitable[None]]:
        async def start(load: Load) -> None:
            consumer = consumers[target]
            await consumer.open()
            for channel in (CHANNEL, BULK):
                await consumer.command("subscribe", {"channel": channel})
            if target is node:
                consumer.pause()
            tasks.append(asyncio.get_running_loop().create_task(bulk[target].run(seconds)))

        return start

    try:
        (baseline, _), (outcome, _) = await asyncio.gather(
            *(
                exercise(
                    "slow" if target is node else "slow-twin",
                    [target],
                    clients=100,
                    rate=50,
                    seconds=seconds,
                    seed=opts.seed,
                    before=before(target),
                )
                for target in (twin, node)
            )
        )
        await asyncio.gather(*tasks)
        closed_3008 = await metric(node, "eventcast_disconnects_total", code="3008")
        slow_consumer = consumers[node]
        slow_consumer.resume()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DEADLINE):
                await slow_consumer.ended.wait()
        twin_open = not consumers[twin].ended.is_set()
    finally:
        for task in tasks:
            task.cancel()
        for consumer in consumers.values():
            await consumer.aclose()
        for publisher in bulk.values():
            await publisher.aclose()
    code = slow_consumer.close_code
    p99, base_p99 = outcome.verdict.percentile_ms(99), baseline.verdict.percentile_ms(99)
    outcome.figures.update(
        twin=baseline.to_json(),
        server_3008=closed_3008,
        slow_close_code=code,
        slow_received=slow_consumer.received,
        twin_received=consumers[twin].received,
        p99_ratio=round(p99 / base_p99, 2) if base_p99 else None,
    )
    outcome.checks.append(("twin: no checker violation", baseline.verdict.ok))
    outcome.checks.append(("the twin's reading consumer stayed connected", twin_open))
    outcome.checks.append(
        (f"the hub closed {closed_3008:g} connection with 3008", closed_3008 == 1)
    )
    outcome.checks.append((f"the slow consumer read close code {code}", code == 3008))
    outcome.checks.append(
        (
            f"p99 {p99:.1f} ms beside it vs {base_p99:.1f} ms on the twin",
            p99 <= SLOW_P99_FACTOR * base_p99,
        )
    )
    return outcome


async def churn(
    fleet: Fleet, opts: Options, log_url: str | None = None, name: str = "churn"
) -> Outcome:
    """100 clients dropping their sockets every 0.5-3 s, 100 publications/s."""
    settings = hub_settings(**({"log_url": log_url} if log_url else {}))
    node = fleet.hub(settings)
    await node.start()
    seconds = opts.profile.churn if name == "churn" else opts.profile.log_churn
    outcome, load = await exercise(
        name, [node], clients=100, rate=100, seconds=seconds, seed=opts.seed, churn=CHURN
    )
    drops = sum(s.drops for s in load.subscribers)
    outcome.checks.append((f"{drops} drops", drops >= len(load.subscribers)))
    return outcome


async def postgres_churn(fleet: Fleet, opts: Options) -> Outcome:
    """The churn scenario over the PostgreSQL log."""
    return await churn(fleet, opts, fleet.postgres_schema(opts.postgres), "postgres-churn")


async def redis_log_churn(fleet: Fleet, opts: Options) -> Outcome:
    """The churn scenario over the Redis Streams log (a private redis-server)."""
    _, url = await fleet.redis()
    return await churn(fleet, opts, f"{url}?prefix=chaos", "redis-log-churn")


async def ready_status(node: HubNode) -> int:
    """A node's ``/readyz`` status (0 if it does not answer)."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"{node.base}/readyz")).status_code
    except httpx.HTTPError:
        return 0


async def until_ready(nodes: Sequence[HubNode], status: int) -> bool:
    """Poll the nodes' ``/readyz`` until each says ``status``; whether it happened in time."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        statuses = await asyncio.gather(*(ready_status(n) for n in nodes))
        if all(s == status for s in statuses):
            return True
        await asyncio.sleep(0.1)
    return False


async def churn_interest(node: HubNode, stop: asyncio.Event, counts: Counter[str]) -> None:
    """Subscribe and unsubscribe fresh live channels on a node until ``stop``.

    Each cycle changes the node's backplane interest twice, so some changes
    land while the backplane dies: they must wait for its reconnect, never
    break the node's interest in later channels (see :func:`routes`).
    """
    n = 0
    while not stop.is_set():
        probe = Probe(node.port, mint(f"interest-{node.name}"))
        try:
            await probe.open()
            while not stop.is_set():
                channel = f"probe:churn.{node.name}.{n}"
                n += 1
                await probe.command("subscribe", {"channel": channel})
                await probe.command("unsubscribe", {"channel": channel})
                counts["cycles"] += 1
                # Pacing: 80 commands/s, within the hub's per-connection limit.
                await asyncio.sleep(0.025)
        except (OSError, TimeoutError, RefusedError):
            counts["errors"] += 1
            await asyncio.sleep(0.2)  # the node is restarting: pace the retries
        finally:
            await probe.aclose()


async def routes(nodes: Sequence[HubNode], tag: str) -> list[str]:
    """The node pairs (``a->b``) where a publication through ``a`` never reached ``b``.

    For each node, a probe subscribes to a fresh live channel there, and every
    other node publishes to it through its API, again every 200 ms (the
    backplane subscription follows the subscribe asynchronously), until the
    probe has it or 10 seconds have passed.
    """
    failed: list[str] = []
    async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=5) as http:
        for target in nodes:
            probe = Probe(target.port, mint(f"route-{target.name}"))
            channel = f"probe:route.{tag}.{target.name}"
            try:
                await probe.open()
                await probe.command("subscribe", {"channel": channel})
                for source in nodes:
                    if source is not target and not await _reaches(http, source, probe, channel):
                        failed.append(f"{source.name}->{target.name}")
            finally:
                await probe.aclose()
    return failed


async def _reaches(http: httpx.AsyncClient, source: HubNode, probe: Probe, channel: str) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    wanted = {"from": source.name}
    while loop.time() < deadline:
        await http.post(f"{source.base}/api/publish", json={"channel": channel, "data": wanted})
        try:
            async with asyncio.timeout(0.2):
                while await probe.publications.get() != (channel, wanted):
                    pass
            return True
        except TimeoutError:
            continue
    return False


async def backplane(fleet: Fleet, opts: Options, kind: str) -> Outcome:
    """Three nodes over a private backplane that is SIGKILLed and restarted."""
    proc: Proc
    proc, url = await (fleet.redis() if kind == "redis" else fleet.nats())
    log_url = fleet.postgres_schema(opts.postgres)
    nodes = [
        fleet.hub(hub_settings(backplane_url=f"{url}?prefix=chaos", log_url=log_url))
        for _ in range(3)
    ]
    await asyncio.gather(*(n.start() for n in nodes))
    seconds, flaps = opts.profile.backplane, opts.profile.flaps
    seen: list[tuple[bool, bool]] = []
    stop, interest = asyncio.Event(), Counter[str]()

    async def faults() -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        churners = [loop.create_task(churn_interest(n, stop, interest)) for n in nodes]
        try:
            for k in range(flaps):
                await asyncio.sleep(max(0.0, began + seconds * (k + 1) / (flaps + 1) - loop.time()))
                proc.kill()
                down = await until_ready(nodes, 503)
                await fleet.restart(proc)
                seen.append((down, await until_ready(nodes, 200)))
        finally:
            stop.set()
            await asyncio.gather(*churners)

    outcome, _ = await exercise(
        f"{kind}-backplane",
        nodes,
        clients=90,
        rate=50,
        seconds=seconds,
        seed=opts.seed,
        faults=faults,
    )
    unrouted = await routes(nodes, fleet.token)
    outcome.figures.update(flaps=flaps, interest_cycles=interest["cycles"], unrouted=unrouted)
    outcome.checks.append((f"{len(seen)}/{flaps} backplane kills", len(seen) == flaps))
    outcome.checks.append(("/readyz 503 while down", all(down for down, _ in seen)))
    outcome.checks.append(("/readyz 200 once back", all(up for _, up in seen)))
    outcome.checks.append((f"new channels unrouted: {unrouted or 'none'}", not unrouted))
    return outcome


async def redis_backplane(fleet: Fleet, opts: Options) -> Outcome:
    """Three nodes over a private Redis backplane that is SIGKILLed."""
    return await backplane(fleet, opts, "redis")


async def nats_backplane(fleet: Fleet, opts: Options) -> Outcome:
    """Three nodes over a private NATS backplane that is SIGKILLed."""
    return await backplane(fleet, opts, "nats")


async def node_kill(fleet: Fleet, opts: Options) -> Outcome:
    """One of three nodes is SIGKILLed; its clients move to the others and recover there."""
    _, url = await fleet.redis()
    log_url = fleet.postgres_schema(opts.postgres)
    nodes = [
        fleet.hub(hub_settings(backplane_url=f"{url}?prefix=chaos", log_url=log_url))
        for _ in range(3)
    ]
    await asyncio.gather(*(n.start() for n in nodes))
    seconds = opts.profile.node_kill
    victim = nodes[0]

    async def faults() -> None:
        await asyncio.sleep(seconds / 2)  # the fault schedule
        victim.kill()

    outcome, load = await exercise(
        "node-kill", nodes, clients=90, rate=50, seconds=seconds, seed=opts.seed, faults=faults
    )
    moved = [s for s in load.subscribers if s.node % len(nodes) != 0 and s.sessions > 1]
    on_victim = sum(1 for i in range(len(load.subscribers)) if i % len(nodes) == 0)
    outcome.figures.update(moved=len(moved))
    outcome.checks.append((f"{len(moved)}/{on_victim} clients moved", len(moved) == on_victim))
    return outcome


SCENARIOS: Final[dict[str, Scenario]] = {
    "steady": steady,
    "kill9": kill9,
    "slow": slow,
    "churn": churn,
    "redis-backplane": redis_backplane,
    "nats-backplane": nats_backplane,
    "node-kill": node_kill,
    "postgres-churn": postgres_churn,
    "redis-log-churn": redis_log_churn,
}


async def run_one(name: str, opts: Options) -> Outcome:
    """Run one scenario in a fleet of its own; check that nothing is left behind."""
    fleet = Fleet(name, keep=opts.keep)
    try:
        outcome = await SCENARIOS[name](fleet, opts)
        await shut_down(outcome, [p for p in fleet.procs if isinstance(p, HubNode)])
    except Exception:
        if not fleet.closed:
            for proc in fleet.procs:
                print(f"--- {proc.name} ---\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        fleet.close()
    leftovers = fleet.leftovers()
    gone = not fleet.dir.exists() or opts.keep
    outcome.checks.append((f"left behind: {leftovers or 'nothing'}", not leftovers and gone))
    return outcome


async def main_async(names: list[str], opts: Options, repeat: int) -> list[Outcome]:
    """Run the scenarios in turn; print one line each."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    outcomes = []
    for name in names:
        for run in range(repeat):
            seeded = replace(opts, seed=opts.seed + run)
            outcome = await run_one(name, seeded)
            outcomes.append(outcome)
            print(outcome.line(), flush=True)
            for example in list(outcome.verdict.violations())[:5]:
                print(f"    {example}", flush=True)
    return outcomes


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse the command line, run the scenarios, print a line each; exit 1 if one failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the CI profile (< 3 minutes)")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--seconds", type=float, help="every scenario's length (overrides)")
    parser.add_argument("--repeat", type=int, default=1, help="run each scenario N times")
    parser.add_argument("--seed", type=int, default=1, help="the seed of the random choices")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="the shared PostgreSQL")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep data and logs (temp dirs)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SCENARIOS)
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}")
    profile = PROFILES["short" if args.short else "full"]
    if args.seconds:
        s = args.seconds
        profile = replace(
            profile, steady=s, kill9=s, slow=s, churn=s, backplane=s, node_kill=s, log_churn=s
        )
    opts = Options(profile, args.seed, args.postgres, args.keep)
    print(header("eventcast chaos harness"), flush=True)
    print(f"# {' '.join(['benchmarks/chaos.py', *(argv or sys.argv[1:])])}", flush=True)
    started = time.monotonic()
    try:
        outcomes = uvloop.run(main_async(names, opts, args.repeat))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("chaos: interrupted (every server it started is stopped)", file=sys.stderr)
        raise SystemExit(130) from None
    passed = sum(o.ok for o in outcomes)
    print(
        f"chaos: {passed}/{len(outcomes)} scenario runs passed "
        f"in {time.monotonic() - started:.0f}s",
        flush=True,
    )
    results = [o.to_json() for o in outcomes]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "argv": argv, "runs": results}, f, indent=2)
    if passed != len(outcomes):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
