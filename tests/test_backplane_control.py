"""The backplanes' control channel: every node hears it from the start, apart from publications.

One contract for the memory, Redis, Redis Cluster (sharded pub/sub, on a private
cluster of three masters) and NATS backplanes: a broadcast reaches every
other node once, a message addressed to a node reaches it alone, no topic
filter (not even ``>``) receives control messages, and the bus's link hands
them to the cluster listeners, never to topic subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest

from eventcast import Bus
from eventcast.backplane import Backplane, MemoryBackplane, MemoryBroker
from eventcast.backplane.base import is_control
from eventcast.backplane.nats import NATSBackplane
from eventcast.backplane.redis import RedisBackplane
from eventcast.exceptions import BackplaneError
from tests.conftest import RUN_ID
from tests.scale.conftest import redis_cluster, until
from tests.server.hubtools import WAIT

_prefixes = itertools.count()


class Inbox:
    """What one backplane delivered, and a way to wait for it."""

    def __init__(self, backplane: Backplane) -> None:
        self.payloads: list[bytes] = []
        self._changed = asyncio.Event()
        backplane.on_messages = self._deliver

    def _deliver(self, batch: Sequence[bytes]) -> None:
        self.payloads.extend(batch)
        self._changed.set()

    async def until(self, condition: Callable[[list[bytes]], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not condition(self.payloads):
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture(scope="module")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis Cluster of three masters for this module."""
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as servers:
        yield f"redis+cluster://127.0.0.1:{servers.seed}"


@pytest.fixture(
    params=["memory", "redis", pytest.param("redis+cluster", marks=pytest.mark.slow), "nats"]
)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Any]]:
    """Build open backplanes ("nodes") sharing one engine and prefix."""
    prefix = f"ectest_{RUN_ID}_c{next(_prefixes)}"
    broker = MemoryBroker()
    url = ""
    if request.param == "redis":
        url = request.getfixturevalue("redis_service")
    elif request.param == "redis+cluster":
        url = request.getfixturevalue("redis_cluster_url")
    elif request.param == "nats":
        url = request.getfixturevalue("nats_service")
    made: list[Backplane] = []

    async def node() -> tuple[Backplane, Inbox]:
        backplane: Backplane
        if request.param == "memory":
            backplane = MemoryBackplane(broker)
        elif request.param.startswith("redis"):
            backplane = RedisBackplane(f"{url}?prefix={prefix}")
        else:
            backplane = NATSBackplane(f"{url}?prefix={prefix}")
        inbox = Inbox(backplane)
        made.append(backplane)
        await backplane.open()
        return backplane, inbox

    try:
        yield node
    finally:
        for backplane in made:
            await backplane.close()


async def _settled(nodes: list[tuple[Backplane, Inbox]]) -> None:
    """Every node hears every other node's control messages.

    Each node sends a mark again until every other node heard it (a sharded
    subscription in Redis Cluster takes effect with nothing to wait on), then
    a fence: a node's messages arrive in the order it sent them, so once the
    fence is heard no repeated mark can arrive after the inboxes are cleared.
    Redis and NATS also echo a broadcast to its sender: there the sender waits
    for its own fence too, or its own marks could arrive after the clearing.
    """
    for i, (sender, own) in enumerate(nodes):
        mark = b'{"ready":%d}' % i
        others = [inbox for backplane, inbox in nodes if backplane is not sender]
        async with asyncio.timeout(WAIT):
            while not all(mark in inbox.payloads for inbox in others):
                await sender.publish_control(mark)
                with contextlib.suppress(TimeoutError):
                    for inbox in others:
                        await inbox.until(lambda got, mark=mark: mark in got, timeout=0.2)
        fence = b'{"fence":%d}' % i
        await sender.publish_control(fence)
        echoed = [] if isinstance(sender, MemoryBackplane) else [own]
        for inbox in others + echoed:
            await inbox.until(lambda got, fence=fence: fence in got)
    for _, inbox in nodes:
        inbox.payloads.clear()


async def test_a_broadcast_reaches_every_other_node_once(make: Callable[[], Any]) -> None:
    nodes = [await make() for _ in range(3)]
    await _settled(nodes)
    (a, inbox_a), (_, inbox_b), (_, inbox_c) = nodes
    await a.publish_control(b'{"hello":"everyone"}')
    await a.publish_control(b'{"last":1}')
    for inbox in (inbox_b, inbox_c):
        await inbox.until(lambda got: b'{"last":1}' in got)
        assert inbox.payloads == [b'{"hello":"everyone"}', b'{"last":1}']
    # The sender may hear its own broadcast (Redis and NATS echo it): once at most.
    assert inbox_a.payloads.count(b'{"hello":"everyone"}') <= 1


async def test_a_message_to_one_node_reaches_it_alone(make: Callable[[], Any]) -> None:
    nodes = [await make() for _ in range(3)]
    await _settled(nodes)
    (a, inbox_a), (b, inbox_b), (_, inbox_c) = nodes
    await a.publish_control(b'{"to":"b"}', b.node_id)
    await a.publish_control(b'{"to":"everyone"}')
    await inbox_c.until(lambda got: b'{"to":"everyone"}' in got)
    await inbox_b.until(lambda got: b'{"to":"everyone"}' in got)
    assert inbox_b.payloads == [b'{"to":"b"}', b'{"to":"everyone"}']
    assert inbox_c.payloads == [b'{"to":"everyone"}']
    assert b'{"to":"b"}' not in inbox_a.payloads


async def test_no_topic_filter_receives_control_messages(make: Callable[[], Any]) -> None:
    nodes = [await make() for _ in range(2)]
    (a, _), (b, inbox_b) = nodes
    for wide in (">", "*", "live:>", "a.>", "a.b"):
        await b.subscribe(wide)
    await _settled(nodes)
    await a.publish_control(b'{"once":true}', b.node_id)
    await a.publish_control(b'{"once":false}')
    await a.publish([("a.b", b'["publication"]')])
    await inbox_b.until(lambda got: b'["publication"]' in got)
    # Each control message once (never also through a pattern), in order, before it.
    assert [p for p in inbox_b.payloads if is_control(p)] == [b'{"once":true}', b'{"once":false}']


async def test_a_closed_backplane_sends_and_hears_no_control_message(
    make: Callable[[], Any],
) -> None:
    nodes = [await make() for _ in range(2)]
    await _settled(nodes)
    (a, _), (b, inbox_b) = nodes
    await b.close()
    if not isinstance(b, MemoryBackplane):
        with pytest.raises(BackplaneError):
            await b.publish_control(b'{"from":"closed"}')
    await a.publish_control(b'{"to":"closed"}', b.node_id)
    await a.publish_control(b'{"to":"all"}')
    await asyncio.sleep(0)  # the memory broker delivers on the next loop turn
    assert inbox_b.payloads == []


def test_control_payloads_are_objects_and_envelopes_are_arrays() -> None:
    assert is_control(b'{"type":"heartbeat"}')
    assert not is_control(b'["node",0,"topic"]')
    assert not is_control(b"")


class Heard:
    """A cluster listener that keeps what it heard, and a way to wait for it."""

    def __init__(self, bus: Bus) -> None:
        self.payloads: list[bytes] = []
        self._arrived = asyncio.Event()
        bus.cluster_listeners.append(self._listen)

    def _listen(self, payload: bytes) -> None:
        self.payloads.append(payload)
        self._arrived.set()

    async def first(self) -> bytes:
        async with asyncio.timeout(WAIT):
            await self._arrived.wait()
        return self.payloads[0]


@pytest.fixture
async def buses() -> AsyncIterator[tuple[Bus, Bus]]:
    """Two buses ("nodes") sharing a memory broker; b subscribed to ``news``, interest settled."""
    broker = MemoryBroker()
    async with (
        Bus(backplane=MemoryBackplane(broker)) as a,
        Bus(backplane=MemoryBackplane(broker)) as b,
    ):
        yield a, b


async def _news(bus: Bus) -> Any:
    sub = bus.subscribe("news")
    backplane = bus.backplane
    assert backplane is not None
    await until(lambda: "news" in backplane.filters, "interest in news")
    return sub


async def test_the_link_hands_control_messages_to_cluster_listeners(
    buses: tuple[Bus, Bus],
) -> None:
    a, b = buses
    heard = Heard(b)
    sub = await _news(b)
    assert b.backplane is not None
    a.send_cluster(b'{"to":"b"}', b.backplane.node_id)
    a.publish_nowait("news", {"n": 1})
    assert await heard.first() == b'{"to":"b"}'
    assert (await asyncio.wait_for(sub.get(), WAIT)).data == {"n": 1}
    assert heard.payloads == [b'{"to":"b"}']
    assert sub.buffered == 0
    with pytest.raises(ValueError, match="JSON object"):
        a.send_cluster(b'["not", "an", "object"]')


async def test_a_control_message_nobody_handles_is_counted_and_logged(
    buses: tuple[Bus, Bus], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = buses
    sub = await _news(b)
    a.send_cluster(b'{"nobody":"listens"}')
    a.publish_nowait("news", {"n": 1})
    await asyncio.wait_for(sub.get(), WAIT)
    assert b.backplane_stats["undecodable"] == 1
    skipped = [r for r in caplog.records if "skipping a backplane message" in r.message]
    assert [r.levelno for r in skipped] == [logging.WARNING]


async def test_control_messages_over_the_size_bound_are_not_sent(
    buses: tuple[Bus, Bus],
) -> None:
    from eventcast._link import MAX_CONTROL_BYTES

    a, b = buses
    heard = Heard(b)
    a.send_cluster(b'{"x":"' + b"x" * MAX_CONTROL_BYTES + b'"}')
    a.send_cluster(b'{"small":1}')
    assert await heard.first() == b'{"small":1}'
    assert a.backplane_stats["control_dropped"] == 1
