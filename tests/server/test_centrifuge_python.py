"""The real centrifuge-python SDK against the hub: recovery, client commands, patterns, tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from centrifuge import (
    Client,
    ClientState,
    ReplyError,
)

from .hubtools import WAIT, HubServer, token
from .opstools import Clients, Recorder, subscription

ClientFactory = Callable[..., tuple[Client, Recorder]]


@pytest.fixture
async def make_client(hub: HubServer) -> AsyncIterator[ClientFactory]:
    """Build centrifuge-python clients of the hub; disconnect them after the test."""
    clients = Clients()

    def make(connect_token: str = "", **kwargs: Any) -> tuple[Client, Recorder]:
        return clients.new(hub.ws_url, connect_token, **kwargs)

    yield make
    await clients.close()


async def test_recovery_after_reconnect(hub: HubServer, make_client: ClientFactory) -> None:
    channel = "news.recovery"
    client, events = make_client(token("alice"))
    sub, sub_events = subscription(client, channel, recoverable=True)
    await client.connect()
    await sub.subscribe()
    first = await sub_events.next("subscribed")
    assert first.recoverable
    assert not first.was_recovering
    assert first.stream_position is not None
    epoch = first.stream_position.epoch

    payloads = [
        {"n": n, "text": "héllo ✓", "nested": {"list": [n, None, True]}} for n in range(1, 7)
    ]
    for n, payload in enumerate(payloads[:3], start=1):
        assert await hub.publish(channel, payload) == {"offset": n, "epoch": epoch}
    live = await sub_events.take("publication", 3)
    assert [ctx.pub.offset for ctx in live] == [1, 2, 3]
    assert [ctx.pub.data for ctx in live] == payloads[:3]

    await client.disconnect()
    assert client.state == ClientState.DISCONNECTED
    for n, payload in enumerate(payloads[3:], start=4):
        assert await hub.publish(channel, payload) == {"offset": n, "epoch": epoch}

    await client.connect()
    again = await sub_events.next("subscribed")
    assert again.was_recovering
    assert again.recovered
    assert again.stream_position is not None
    assert again.stream_position.epoch == epoch
    assert again.stream_position.offset == 6
    missed = await sub_events.take("publication", 3)
    assert [ctx.pub.offset for ctx in missed] == [4, 5, 6]
    assert [ctx.pub.data for ctx in missed] == payloads[3:]

    # Exactly once: the next live publication is the very next one.
    await hub.publish(channel, {"n": 7})
    sentinel = await sub_events.next("publication")
    assert (sentinel.pub.offset, sentinel.pub.data) == (7, {"n": 7})
    assert sub_events.pending("publication") == 0
    assert sub_events.counts["publication"] == 7
    assert events.counts["connected"] == 2


async def test_publish_and_history_from_client(hub: HubServer, make_client: ClientFactory) -> None:
    client, _ = make_client(token("bob"))
    sub, sub_events = subscription(client, "chat.room1")
    await client.connect()
    await sub.subscribe()
    await sub_events.next("subscribed")

    await sub.publish({"text": "one"})
    await client.publish("chat.room1", {"text": "two"})
    got = await sub_events.take("publication", 2)
    assert [(c.pub.offset, c.pub.data) for c in got] == [(1, {"text": "one"}), (2, {"text": "two"})]

    history = await client.history("chat.room1", limit=10)
    assert history.offset == 2
    assert history.epoch
    assert [(p.offset, p.data) for p in history.publications] == [
        (1, {"text": "one"}),
        (2, {"text": "two"}),
    ]
    newest = await sub.history(limit=1, reverse=True)
    assert [(p.offset, p.data) for p in newest.publications] == [(2, {"text": "two"})]
    position_only = await client.history("chat.room1")
    assert position_only.publications == []
    assert position_only.offset == 2


async def test_pattern_subscription_carries_the_topic(
    hub: HubServer, make_client: ClientFactory
) -> None:
    client, _ = make_client(token("carol"))
    sub, sub_events = subscription(client, "live:orders.*")
    await client.connect()
    await sub.subscribe()
    await sub_events.next("subscribed")

    await hub.publish("live:orders.eu", {"id": 1})
    await hub.publish("live:other.eu", {"id": "not matched"})
    await hub.publish("live:orders.us", {"id": 2}, tags={"kind": "new"})
    got = await sub_events.take("publication", 2)
    assert [c.pub.data for c in got] == [{"id": 1}, {"id": 2}]
    assert got[0].pub.tags == {"topic": "live:orders.eu"}
    assert got[1].pub.tags == {"kind": "new", "topic": "live:orders.us"}


async def test_rpc_unknown_method_and_presence_errors(
    hub: HubServer, make_client: ClientFactory
) -> None:
    client, _ = make_client(token("dave"))
    await client.connect()
    with pytest.raises(ReplyError) as rpc_error:
        await client.rpc("no-such-method", {"x": 1})
    assert rpc_error.value.code == 104
    with pytest.raises(ReplyError) as presence_error:
        await client.presence("news")
    assert presence_error.value.code == 108
    assert presence_error.value.message == "not available"
    with pytest.raises(ReplyError) as stats_error:
        await client.presence_stats("news")
    assert stats_error.value.code == 108
    # Errors are replies, not disconnects.
    assert client.state == ClientState.CONNECTED


async def test_server_side_subscriptions_from_token(
    hub: HubServer, make_client: ClientFactory
) -> None:
    client, events = make_client(token("erin", channels=["alerts.erin", "live:ticker"]))
    await client.connect()
    subscribed = await events.take("subscribed", 2)
    assert {ctx.channel for ctx in subscribed} == {"alerts.erin", "live:ticker"}
    durable = next(ctx for ctx in subscribed if ctx.channel == "alerts.erin")
    assert durable.recoverable

    await hub.publish("alerts.erin", {"level": "high"})
    await hub.publish("live:ticker", {"price": 42})
    got = await events.take("publication", 2)
    assert [(c.channel, c.pub.data) for c in got] == [
        ("alerts.erin", {"level": "high"}),
        ("live:ticker", {"price": 42}),
    ]
    assert got[0].pub.offset == 1
    assert client.get_subscription("alerts.erin") is None  # server-side, not client-side


async def test_token_refresh_keeps_the_connection(
    hub: HubServer, make_client: ClientFactory
) -> None:
    first = token("frank", ttl=2)
    refreshed: asyncio.Queue[float] = asyncio.Queue()

    async def get_token() -> str:
        refreshed.put_nowait(time.time())
        return token("frank", ttl=2)

    client, events = make_client(first, get_token=get_token)
    await client.connect()
    assert (await events.next("connecting")).code == 0  # "connect called"
    connected = await events.next("connected")
    original_expiry = hub.hub.connections[connected.client].expires_at
    assert original_expiry is not None

    # Each refresh happens when the previous token's ttl is up; by the third the
    # first token has expired (and the server checks 50 ms after expiry).
    for _ in range(3):
        called_at = await asyncio.wait_for(refreshed.get(), WAIT)
    assert called_at > original_expiry + 0.05
    # Let the third refresh command complete: a round trip on the same connection.
    await client.history("news", limit=0)
    assert client.state == ClientState.CONNECTED
    assert events.counts["connecting"] == 1
    assert events.counts["disconnected"] == 0
    conn = hub.hub.connections[connected.client]
    assert conn.expires_at is not None
    assert conn.expires_at > original_expiry


async def test_token_expiry_without_refresh_closes_with_3005(
    hub: HubServer, make_client: ClientFactory
) -> None:
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        raise RuntimeError("the token service is down")

    client, events = make_client(token("grace", ttl=2), get_token=get_token)
    await client.connect()
    assert (await events.next("connecting")).code == 0  # "connect called"
    await events.next("connected")
    connecting = await events.next("connecting")  # the server closed the connection
    assert (connecting.code, connecting.reason) == (3005, "connection expired")
    assert calls >= 1
