"""The real centrifuge-python SDK against the hub: recovery, client commands, patterns, tokens.

The flows of the client protocol run in both encodings (``protocol``: JSON, and
Protobuf as ``Client(use_protobuf=True)`` selects it, with the WebSocket
subprotocol ``centrifuge-protobuf``). In Protobuf a publication's data is
bytes: the SDK hands them over as they are, so the tests decode the JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from centrifuge import (
    Client,
    ClientState,
    DeltaType,
    Filter,
    ReplyError,
)

from .conftest import StartHub
from .hubtools import NAMESPACES, WAIT, HubServer, RawClient, token
from .opstools import Clients, Recorder, subscription

BOTH = pytest.mark.parametrize("protocol", ["json", "protobuf"], indirect=True)

ClientFactory = Callable[..., tuple[Client, Recorder]]


@pytest.fixture
def protocol(request: pytest.FixtureRequest) -> str:
    """The encoding the SDK speaks (``json`` unless a test is parametrized with :data:`BOTH`)."""
    return str(getattr(request, "param", "json"))


def data(value: Any, protocol: str) -> Any:
    """A publication's data as the test compares it (Protobuf carries the JSON bytes)."""
    return json.loads(value) if protocol == "protobuf" else value


def payload(value: Any, protocol: str) -> Any:
    """Data to publish from the SDK (Protobuf: JSON bytes)."""
    return json.dumps(value).encode() if protocol == "protobuf" else value


@pytest.fixture
async def make_client(hub: HubServer, protocol: str) -> AsyncIterator[ClientFactory]:
    """Build centrifuge-python clients of the hub; disconnect them after the test."""
    clients = Clients()

    def make(
        connect_token: str = "", *, server: HubServer = hub, **kwargs: Any
    ) -> tuple[Client, Recorder]:
        return clients.new(
            server.ws_url, connect_token, use_protobuf=protocol == "protobuf", **kwargs
        )

    yield make
    await clients.close()


@BOTH
async def test_recovery_after_reconnect(
    hub: HubServer, make_client: ClientFactory, protocol: str
) -> None:
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
    assert [data(ctx.pub.data, protocol) for ctx in live] == payloads[:3]

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
    assert [data(ctx.pub.data, protocol) for ctx in missed] == payloads[3:]

    # Exactly once: the next live publication is the very next one.
    await hub.publish(channel, {"n": 7})
    sentinel = await sub_events.next("publication")
    assert (sentinel.pub.offset, data(sentinel.pub.data, protocol)) == (7, {"n": 7})
    assert sub_events.pending("publication") == 0
    assert sub_events.counts["publication"] == 7
    assert events.counts["connected"] == 2


@BOTH
async def test_publish_and_history_from_client(
    hub: HubServer, make_client: ClientFactory, protocol: str
) -> None:
    client, _ = make_client(token("bob"))
    sub, sub_events = subscription(client, "chat.room1")
    await client.connect()
    await sub.subscribe()
    await sub_events.next("subscribed")

    await sub.publish(payload({"text": "one"}, protocol))
    await client.publish("chat.room1", payload({"text": "two"}, protocol))
    got = await sub_events.take("publication", 2)
    assert [(c.pub.offset, data(c.pub.data, protocol)) for c in got] == [
        (1, {"text": "one"}),
        (2, {"text": "two"}),
    ]

    history = await client.history("chat.room1", limit=10)
    assert history.offset == 2
    assert history.epoch
    assert [(p.offset, data(p.data, protocol)) for p in history.publications] == [
        (1, {"text": "one"}),
        (2, {"text": "two"}),
    ]
    newest = await sub.history(limit=1, reverse=True)
    assert [(p.offset, data(p.data, protocol)) for p in newest.publications] == [
        (2, {"text": "two"})
    ]
    position_only = await client.history("chat.room1")
    assert position_only.publications == []
    assert position_only.offset == 2


@BOTH
async def test_pattern_subscription_carries_the_topic(
    hub: HubServer, make_client: ClientFactory, protocol: str
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
    assert [data(c.pub.data, protocol) for c in got] == [{"id": 1}, {"id": 2}]
    assert got[0].pub.tags == {"topic": "live:orders.eu"}
    assert got[1].pub.tags == {"kind": "new", "topic": "live:orders.us"}


@BOTH
async def test_rpc_unknown_method_and_presence_errors(
    hub: HubServer, make_client: ClientFactory, protocol: str
) -> None:
    client, _ = make_client(token("dave"))
    await client.connect()
    with pytest.raises(ReplyError) as rpc_error:
        await client.rpc("no-such-method", payload({"x": 1}, protocol))
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


@BOTH
async def test_server_side_subscriptions_from_token(
    hub: HubServer, make_client: ClientFactory, protocol: str
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
    assert [(c.channel, data(c.pub.data, protocol)) for c in got] == [
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


# -- presence, deltas, tags filters, cache recovery mode (both encodings) ------------------

#: Namespaces of the wire features, beside the test server's usual ones.
FEATURES: list[dict[str, Any]] = [
    {
        "name": "room",
        "presence": True,
        "join_leave": True,
        "allow_subscribe_for_client": True,
        "allow_presence_for_subscriber": True,
    },
    {
        "name": "ticker",
        "history_size": 100,
        "history_ttl": 300,
        "force_recovery": True,
        "allow_subscribe_for_client": True,
        "allowed_delta_types": ["fossil"],
    },
    {
        "name": "state",
        "history_size": 10,
        "history_ttl": 300,
        "force_recovery": True,
        "force_recovery_mode": "cache",
        "allow_subscribe_for_client": True,
    },
    {"name": "plain", "allow_subscribe_for_client": True, "allow_tags_filter": False},
]


@pytest.fixture
async def features(start_hub: StartHub) -> HubServer:
    return await start_hub(namespaces=[*NAMESPACES, *FEATURES])


def quote(n: int) -> dict[str, Any]:
    """A ~2 KB document of which each update changes a few fields."""
    return {
        "symbol": "S1",
        "bid": 100 + n,
        "ask": 101 + n,
        "volume": 1000 * n,
        "depth": [{"level": level, "size": level * 10} for level in range(40)],
        "notes": "Indicative prices. " * 20,
    }


@BOTH
async def test_presence_and_join_leave(
    features: HubServer, make_client: ClientFactory, protocol: str
) -> None:
    alice, _ = make_client(token("alice"), server=features)
    bob, _ = make_client(token("bob"), server=features)
    alice_sub, alice_events = subscription(alice, "room:lobby", join_leave=True)
    bob_sub, bob_events = subscription(bob, "room:lobby")
    await alice.connect()
    await alice_sub.subscribe()
    await alice_events.next("subscribed")
    await bob.connect()
    await bob_sub.subscribe()
    await bob_events.next("subscribed")

    presence = await alice_sub.presence()
    assert sorted(info.user for info in presence.clients.values()) == ["alice", "bob"]
    stats = await bob_sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (2, 2)
    # Alice wanted join/leave pushes: she sees Bob join, then leave.
    assert (await alice_events.next("join")).info.user == "bob"
    await bob_sub.unsubscribe()
    assert (await alice_events.next("leave")).info.user == "bob"


@BOTH
async def test_delta_compressed_subscription_stays_exact_across_recovery(
    features: HubServer, make_client: ClientFactory, protocol: str
) -> None:
    channel = "ticker:S1"
    client, _ = make_client(token("dora"), server=features)
    sub, events = subscription(client, channel, delta=DeltaType.FOSSIL)
    await client.connect()
    await sub.subscribe()
    await events.next("subscribed")
    assert sub._delta_negotiated  # the reply said delta: true

    async with await RawClient.open(features.ws_url) as raw:
        await raw.connect(token("raw-delta"))
        assert (await raw.subscribe(channel, delta="fossil"))["delta"] is True
        for n in range(1, 4):
            await features.publish(channel, quote(n))
        got = await events.take("publication", 3)
        assert [(c.pub.offset, data(c.pub.data, protocol)) for c in got] == [
            (n, quote(n)) for n in range(1, 4)
        ]
        # On the wire: the first in full (a JSON string), the next ones as deltas.
        pushes = [(await raw.publication())["pub"] for _ in range(3)]
        assert [p.get("delta", False) for p in pushes] == [False, True, True]
        assert json.loads(pushes[0]["data"]) == quote(1)
        assert len(pushes[2]["data"]) < len(json.dumps(quote(3))) / 4

    await client.disconnect()
    for n in range(4, 6):
        await features.publish(channel, quote(n))
    await client.connect()
    again = await events.next("subscribed")
    assert again.recovered
    recovered = await events.take("publication", 2)
    await features.publish(channel, quote(6))
    live = await events.next("publication")
    assert [(c.pub.offset, data(c.pub.data, protocol)) for c in [*recovered, live]] == [
        (n, quote(n)) for n in range(4, 7)
    ]


@BOTH
async def test_tags_filter_delivers_matching_publications_only(
    features: HubServer, make_client: ClientFactory, protocol: str
) -> None:
    client, _ = make_client(token("erik"), server=features)
    wanted = Filter.all(Filter.eq("symbol", "S1"), Filter.gt("size", "10"))
    sub, events = subscription(client, "live:quotes", tags_filter=wanted)
    await client.connect()
    await sub.subscribe()
    await events.next("subscribed")
    published = [("S1", "5"), ("S2", "50"), ("S1", "50"), ("S1", "11"), ("S3", "99")]
    for n, (symbol, size) in enumerate(published):
        await features.publish("live:quotes", {"n": n}, tags={"symbol": symbol, "size": size})
    got = await events.take("publication", 2)
    assert [data(c.pub.data, protocol) for c in got] == [{"n": 2}, {"n": 3}]
    await features.publish("live:quotes", {"n": 9}, tags={"symbol": "S1", "size": "12"})
    assert data((await events.next("publication")).pub.data, protocol) == {"n": 9}

    # A namespace that turns filters off refuses them (107), and a malformed filter too.
    refused, refused_events = subscription(client, "plain:x", tags_filter=Filter.eq("a", "b"))
    await refused.subscribe()
    assert (await refused_events.next("unsubscribed")).code == 107
    bad, bad_events = subscription(client, "live:bad", tags_filter=Filter.gt("size", "ten"))
    await bad.subscribe()
    assert (await bad_events.next("unsubscribed")).code == 107


@BOTH
async def test_cache_recovery_mode_gives_the_latest_publication(
    features: HubServer, make_client: ClientFactory, protocol: str
) -> None:
    channel = "state:now-playing"
    for n in range(1, 4):
        await features.publish(channel, {"track": n})
    client, _ = make_client(token("fay"), server=features)
    sub, events = subscription(client, channel)
    await client.connect()
    await sub.subscribe()
    subscribed = await events.next("subscribed")
    assert subscribed.recovered
    latest = await events.next("publication")
    assert (latest.pub.offset, data(latest.pub.data, protocol)) == (3, {"track": 3})
    await features.publish(channel, {"track": 4})
    live = await events.next("publication")
    assert (live.pub.offset, data(live.pub.data, protocol)) == (4, {"track": 4})
    assert events.pending("publication") == 0
