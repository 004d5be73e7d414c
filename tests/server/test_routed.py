"""A subscribe is answered only once other nodes' publications reach this node.

Found by the chaos harness in CI (``nats-backplane``, ``node-kill``): a node
subscribed a new channel on the backplane in the background, after the client
already had its subscribe reply, and the first publication made on another
node in that window never arrived (``lost at offset 1``). Now each engine
confirms a subscription (a PING's answer after it: the server handles a
connection's commands in order) and the hub waits for it before it reads the
log's head and replies; so do SSE streams and the bus's own resumes.

The hub-level tests hold the window open on purpose: node B's backplane waits
300 ms before it subscribes, while the client subscribes and node A publishes
at once, over real sockets and a real Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from eventcast import Bus, Namespace, Position
from eventcast.backplane import open_backplane
from eventcast.backplane._lean import Pings
from eventcast.backplane.base import Backplane
from eventcast.exceptions import BackplaneError

from .conftest import StartHub
from .hubtools import WAIT, HubServer, RawClient, token
from .ssetools import open_sse

WINDOW = 0.3  # seconds node B's backplane waits before it subscribes


def _prefix() -> str:
    return f"routed{uuid.uuid4().hex[:10]}"


def slow_to_subscribe(backplane: Backplane, delay: float = WINDOW, only: str | None = None) -> None:
    """Make ``backplane`` wait ``delay`` seconds before each subscription (or ``only`` one)."""
    subscribe = backplane.subscribe

    async def late(topic_filter: str) -> None:
        if only is None or topic_filter == only:
            await asyncio.sleep(delay)
        await subscribe(topic_filter)

    backplane.subscribe = late  # type: ignore[method-assign]


async def unconfirming_node(
    start_hub: StartHub, redis_url: str, monkeypatch: pytest.MonkeyPatch, only: str | None = None
) -> HubServer:
    """A node whose backplane confirms subscriptions (or ``only`` one) after the route timeout."""
    monkeypatch.setattr("eventcast._link.ROUTE_TIMEOUT", 0.3)
    node = await start_hub(backplane_url=f"{redis_url}?prefix={_prefix()}", node_name="b")
    backplane = node.hub.bus.backplane
    assert backplane is not None
    slow_to_subscribe(backplane, 1.0, only)
    return node


@asynccontextmanager
async def two_nodes(
    start_hub: StartHub, redis_url: str
) -> AsyncIterator[tuple[HubServer, HubServer]]:
    url = f"{redis_url}?prefix={_prefix()}"
    a = await start_hub(backplane_url=url, node_name="a")
    b = await start_hub(backplane_url=url, node_name="b")
    backplane = b.hub.bus.backplane
    assert backplane is not None
    slow_to_subscribe(backplane)
    yield a, b


@pytest.mark.redis
async def test_a_websocket_subscribe_is_answered_once_other_nodes_reach_it(
    start_hub: StartHub, redis_service: str
) -> None:
    async with two_nodes(start_hub, redis_service) as (a, b):
        client = await RawClient.open(b.ws_url)
        async with client:
            await client.connect(token("bob"))
            loop = asyncio.get_running_loop()
            began = loop.time()
            await client.subscribe("live:routed")
            assert loop.time() - began >= WINDOW  # the reply waited for the backplane
            await a.publish("live:routed", {"n": 1})
            push = await client.publication()
            assert push["pub"]["data"] == {"n": 1}


@pytest.mark.redis
async def test_a_durable_first_publication_on_another_node_is_not_lost(
    start_hub: StartHub, redis_service: str, postgres_service: str
) -> None:
    """The chaos harness's case: a shared log, offset 1 published on A right after B's reply."""
    schema = _prefix()
    log_url = f"{postgres_service}?schema={schema}"
    url = f"{redis_service}?prefix={_prefix()}"
    a = await start_hub(backplane_url=url, log_url=log_url, node_name="a")
    b = await start_hub(backplane_url=url, log_url=log_url, node_name="b")
    backplane = b.hub.bus.backplane
    assert backplane is not None
    slow_to_subscribe(backplane)
    async with await RawClient.open(b.ws_url) as client:
        await client.connect(token("bob"))
        result = await client.subscribe("routed.durable")
        assert result.get("offset", 0) == 0
        assert (await a.publish("routed.durable", {"n": 1}))["offset"] == 1
        push = await client.publication()
        assert push["pub"]["offset"] == 1


@pytest.mark.redis
async def test_an_sse_stream_opens_once_other_nodes_reach_it(
    start_hub: StartHub, redis_service: str
) -> None:
    async with (
        two_nodes(start_hub, redis_service) as (a, b),
        open_sse(b.base, ["live:routed.sse"], token=token()) as stream,
    ):
        await stream.subscribed()
        await a.publish("live:routed.sse", {"n": 1})
        assert (await stream.event()).json()["data"] == {"n": 1}


@pytest.mark.redis
async def test_a_bus_resume_reads_the_head_once_other_nodes_reach_it(
    redis_service: str, postgres_service: str
) -> None:
    schema = _prefix()
    backplane_url = f"{redis_service}?prefix={_prefix()}"
    log_url = f"{postgres_service}?schema={schema}"
    namespaces = {"": Namespace(history_size=100)}
    a = Bus(log=log_url, backplane=backplane_url, namespaces=namespaces)
    b_backplane = open_backplane(backplane_url)
    slow_to_subscribe(b_backplane)
    b = Bus(log=log_url, backplane=b_backplane, namespaces=namespaces)
    async with a, b:
        first = await a.publish("routed.bus", b"1")
        assert first.offset == 1
        assert first.epoch is not None
        sub = b.subscribe("routed.bus", since=Position(1, first.epoch))
        assert await sub.ready() is True
        second = await a.publish("routed.bus", b"2")
        async with asyncio.timeout(WAIT):
            got = await anext(aiter(sub))
        assert got.offset == second.offset == 2


@pytest.mark.parametrize(
    "engine",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("nats", marks=pytest.mark.nats)],
)
async def test_an_engine_subscription_is_in_effect_when_subscribe_returns(
    engine: str, request: pytest.FixtureRequest
) -> None:
    """Many fresh filters, each published to from another connection the moment it returns."""
    base: str = request.getfixturevalue(f"{engine}_service")
    url = f"{base}?prefix={_prefix()}"
    node, publisher = open_backplane(url), open_backplane(url)
    got: list[bytes] = []
    arrived = asyncio.Event()

    def receive(batch: Sequence[bytes]) -> None:
        got.extend(batch)
        if len(got) >= 200:
            arrived.set()

    node.on_messages = receive
    try:
        await node.open()
        await publisher.open()
        for i in range(200):
            topic = f"routed.engine.t{i}"
            await node.subscribe(topic)
            await publisher.publish([(topic, b"%d" % i)])
        async with asyncio.timeout(WAIT):
            await arrived.wait()
        assert got == [b"%d" % i for i in range(200)]
    finally:
        await node.close()
        await publisher.close()


@pytest.mark.redis
async def test_an_unconfirmed_subscription_is_an_internal_error_not_a_false_ack(
    start_hub: StartHub,
    redis_service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The backplane never confirms: the subscribe gets error 100, the connection stays usable."""
    b = await unconfirming_node(start_hub, redis_service, monkeypatch, only="live:stuck")
    async with await RawClient.open(b.ws_url) as client:
        await client.connect(token("bob"))
        reply = await client.request("subscribe", {"channel": "live:stuck"})
        assert reply["error"]["code"] == 100, reply
        assert "live:stuck" not in b.hub.channels.by_name
        # Once the engine answers again, the same connection subscribes.
        await asyncio.sleep(1.0)
        await client.subscribe("live:after")
    assert "Traceback" not in caplog.text


@pytest.mark.redis
async def test_an_unconfirmed_sse_subscription_is_503_not_a_stream(
    start_hub: StartHub,
    redis_service: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = await unconfirming_node(start_hub, redis_service, monkeypatch)
    async with open_sse(b.base, ["live:stuck.sse"], token=token()) as stream:
        assert stream.response.status_code == 503
    assert "live:stuck.sse" not in b.hub.channels.by_name
    assert "Traceback" not in caplog.text


def test_a_pong_answers_the_oldest_ping_even_one_given_up_on() -> None:
    async def scenario() -> None:
        pings = Pings()
        sent: list[str] = []
        gave_up = asyncio.ensure_future(pings.barrier(lambda: sent.append("1"), 0.05, "X"))
        with pytest.raises(BackplaneError):
            await gave_up
        waiting = asyncio.ensure_future(pings.barrier(lambda: sent.append("2"), WAIT, "X"))
        await asyncio.sleep(0)
        assert pings.answered()  # the first PING's late answer: not the second's
        await asyncio.sleep(0)
        assert not waiting.done()
        assert pings.answered()
        await waiting
        assert not pings.answered()  # nothing in flight
        lost = asyncio.ensure_future(pings.barrier(lambda: None, WAIT, "X"))
        await asyncio.sleep(0)
        pings.lost()
        with pytest.raises(BackplaneError):
            await lost
        assert sent == ["1", "2"]

    asyncio.run(scenario())
