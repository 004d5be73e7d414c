"""The backplane dies under load: a private Redis (or nats-server) killed with SIGKILL.

A publisher keeps publishing durable events through the nodes' HTTP APIs (the
log, PostgreSQL, stays up) while the backplane is killed and restarted on the
same port. Every acknowledged publication reaches every subscriber on every
node, in offset order with no gap; ``/readyz`` says 503 while the backplane is
down and 200 once it is back; every subscriber receives the final publication.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from eventcast import Bus, Namespace
from tests.server.opstools import Clients

from .conftest import PrivateNats, PrivateRedis, unique, until
from .tools import Subscriber, assert_exact, connect_subscriber

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CHANNEL = "faults.stream"


class Publisher:
    """Publishes ``{"n": i}`` through the nodes' APIs in turn until stopped; keeps the acks."""

    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes
        self.acked: list[int] = []
        self.failed = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            node = self.nodes[i % len(self.nodes)]
            i += 1
            try:
                result = await node.api("publish", channel=CHANNEL, data={"n": i})
            except (AssertionError, OSError):
                self.failed += 1
            else:
                self.acked.append(result["offset"])
            # Pacing only (the outage lasts as long as it lasts): keep the run small.
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def until_acked(self, count: int) -> None:
        await until(lambda: len(self.acked) >= count, f"{count} acknowledged publications")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def _subscribers(clients: Clients, nodes: list[Any], per_node: int = 2) -> list[Subscriber]:
    subscribers = []
    for index, node in enumerate(nodes):
        for _ in range(per_node):
            subscriber, _ = await connect_subscriber(clients, node.ws_url, index, [CHANNEL])
            subscribers.append(subscriber)
    return subscribers


async def _ready_is(nodes: list[Any], status: int) -> None:
    async def check() -> bool:
        return all([await node.ready_status() == status for node in nodes])

    try:
        await until(check, f"/readyz {status} on every node")
    except AssertionError as exc:
        logs = "\n".join(node.output()[-3000:] for node in nodes)
        raise AssertionError(f"{exc}; the nodes said:\n{logs}") from None


async def _finish(nodes: list[Any], publisher: Publisher, subscribers: list[Subscriber]) -> None:
    """Stop publishing, publish a final event, check every subscriber got every ack once."""
    await publisher.stop()
    final = await nodes[0].api("publish", channel=CHANNEL, data={"n": "final"})
    last = final["offset"]
    assert publisher.acked, "nothing was acknowledged"
    assert last > max(publisher.acked)
    for subscriber in subscribers:
        received = await subscriber.take_until(CHANNEL, last)
        del received
        offsets = subscriber.offsets[CHANNEL]
        assert set(publisher.acked) <= set(offsets)
        # No gap, no duplicate: the subscribers never reconnected, the nodes did.
        assert_exact(offsets, 1, last, f"subscriber on node {subscriber.node}")
        assert subscriber.events.counts["connected"] == 1


async def _kill_restart(server: PrivateRedis | PrivateNats, nodes: list[Any]) -> None:
    server.kill()
    await _ready_is(nodes, 503)
    await asyncio.to_thread(server.start)
    await _ready_is(nodes, 200)


@pytest.mark.redis
@pytest.mark.parametrize("flaps", [1, 5], ids=["kill-once", "flap-5-times"])
async def test_redis_killed_mid_stream(
    nodes: Callable[..., Any], private_redis: PrivateRedis, pg_log_url: str, flaps: int
) -> None:
    started = await nodes(
        2,
        backplane_url=f"{private_redis.url}?prefix={unique('bp')}",
        log_url=pg_log_url,
        presence_ttl=600,
    )
    clients = Clients()
    publisher = Publisher(started)
    try:
        subscribers = await _subscribers(clients, started)
        publisher.start()
        await publisher.until_acked(10)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for flap in range(flaps):
            await _kill_restart(private_redis, started)
            await publisher.until_acked(10 * (flap + 2))
        assert loop.time() - began < 60  # the flaps happen within a minute
        await _finish(started, publisher, subscribers)
        assert publisher.failed == 0  # the log stayed up: every publication was acked
    finally:
        await publisher.stop()
        await clients.close()


@pytest.mark.nats
async def test_nats_killed_mid_stream(
    nodes: Callable[..., Any], private_nats: PrivateNats, pg_log_url: str
) -> None:
    started = await nodes(
        2,
        backplane_url=f"{private_nats.url}?prefix={unique('bp')}",
        log_url=pg_log_url,
        presence_ttl=600,
    )
    clients = Clients()
    publisher = Publisher(started)
    try:
        subscribers = await _subscribers(clients, started)
        publisher.start()
        await publisher.until_acked(10)
        await _kill_restart(private_nats, started)
        await publisher.until_acked(len(publisher.acked) + 10)
        await _finish(started, publisher, subscribers)
        assert publisher.failed == 0
    finally:
        await publisher.stop()
        await clients.close()


# -- in process: two buses, a private Redis, and the tasks left behind --------------------------


@pytest.mark.redis
@pytest.mark.parametrize("flaps", [1, 5], ids=["kill-once", "flap-5-times"])
async def test_in_process_buses_survive_redis_kills_and_leave_no_tasks(
    private_redis: PrivateRedis, pg_log_url: str, flaps: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "eventcast")
    baseline = len(asyncio.all_tasks())
    url = f"{private_redis.url}?prefix={unique('bp')}"
    namespaces = {"": Namespace(history_size=10000)}
    a = Bus(log=pg_log_url, namespaces=namespaces, backplane=url)
    b = Bus(log=pg_log_url, namespaces=namespaces, backplane=url)
    acked: list[int] = []
    try:
        await a.start()
        await b.start()
        on_a = a.subscribe(CHANNEL)
        on_b = b.subscribe(CHANNEL)
        assert a.backplane is not None
        assert b.backplane is not None
        await until(lambda: CHANNEL in b.backplane.filters, "b's backplane subscription")

        stop = asyncio.Event()

        async def publish() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                event = await a.publish(CHANNEL, {"n": i})
                assert event.offset is not None
                acked.append(event.offset)
                await asyncio.sleep(0.01)  # pacing

        publisher = asyncio.get_running_loop().create_task(publish())
        try:
            await until(lambda: len(acked) >= 10, "publications before the kill")
            for flap in range(flaps):
                private_redis.kill()
                await until(lambda: not a.backplane.connected, "a's backplane down")
                await until(lambda: not b.backplane.connected, "b's backplane down")
                await asyncio.to_thread(private_redis.start)
                await until(lambda: a.backplane.connected, "a's backplane back")
                await until(lambda: b.backplane.connected, "b's backplane back")
                enough = 10 * (flap + 2)
                await until(lambda n=enough: len(acked) >= n, "publications after a kill")
        finally:
            stop.set()
            await publisher
        final = await a.publish(CHANNEL, {"n": "final"})
        assert final.offset is not None
        for sub in (on_a, on_b):
            got: list[int] = []
            while not got or got[-1] < final.offset:
                event = await asyncio.wait_for(sub.get(), 10)
                assert event.offset is not None
                got.append(event.offset)
            assert set(acked) <= set(got)
            assert_exact(got, 1, final.offset, "in-process subscriber")
        assert b.backplane.reconnects >= flaps
    finally:
        await a.close()
        await b.close()
    # Every task of the buses, their log pools and backplanes is gone.
    for _ in range(3):
        await asyncio.sleep(0)
    leftovers = [t for t in asyncio.all_tasks() if not t.done()]
    assert len(leftovers) == baseline, [t.get_name() for t in leftovers]
