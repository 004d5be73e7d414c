"""The asyncio client against a real hub: commands, subscriptions, reconnect, recovery, tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

import eventcast
from eventcast import EARLIEST, Event, Position
from eventcast.client import Client, Subscription, websocket_url
from eventcast.exceptions import (
    ClientClosedError,
    ConfigurationError,
    HandshakeError,
    PositionLostError,
    ReplyError,
    SubscriberExistsError,
    SubscriptionClosedError,
)
from eventcast.testing import TestHub
from tests.server.conftest import StartHub
from tests.server.hubtools import NAMESPACES, SECRET, WAIT, HubServer, token

ROOM: dict[str, Any] = {
    "name": "room",
    "presence": True,
    "allow_presence_for_subscriber": True,
    "allow_subscribe_for_client": True,
}
FAST = {"min_reconnect_delay": 0.02, "max_reconnect_delay": 0.2, "timeout": WAIT}


async def take(sub: Subscription, n: int) -> list[Event]:
    """The next ``n`` events (a safety timeout, never a synchronisation device)."""
    async with asyncio.timeout(WAIT):
        return [await anext(sub) for _ in range(n)]


class Gate:
    """Refuses new WebSocket handshakes (503) while closed; tells when one was refused."""

    def __init__(self, server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = True
        self.refused = asyncio.Event()
        hub = server.hub
        original = hub.check_handshake

        def check(scope: Any, transport: str) -> tuple[int, str] | None:
            if not self.open:
                self.refused.set()
                return 503, "paused by the test"
            return original(scope, transport)

        monkeypatch.setattr(hub, "check_handshake", check)

    async def wait_refused(self) -> None:
        await asyncio.wait_for(self.refused.wait(), WAIT)


async def kick(server: HubServer, user: str, code: int = 3000) -> None:
    """Disconnect ``user`` through the HTTP API with a reconnect code."""
    await server.api("disconnect", user=user, disconnect={"code": code, "reason": "test kick"})


def expired_token(user: str) -> str:
    """A connection token that expired a minute ago."""
    return jwt.encode({"sub": user, "exp": int(time.time()) - 60}, SECRET, algorithm="HS256")


@pytest.fixture
async def client(hub: HubServer) -> AsyncIterator[Client]:
    async with eventcast.connect(hub.base, token=token("alice"), **FAST) as made:
        yield made


# Tests of command semantics run on the in-memory hub of eventcast.testing (the same hub
# code, no socket); the transport-level ones above and below keep real sockets.


@pytest.fixture
async def memory_hub() -> AsyncIterator[TestHub]:
    async with TestHub(namespaces=[*NAMESPACES, ROOM], token_hmac_secret=SECRET) as made:
        yield made


@pytest.fixture
async def memory_client(memory_hub: TestHub) -> AsyncIterator[Client]:
    async with memory_hub.client(user="alice") as made:
        yield made


def test_websocket_url_forms() -> None:
    assert websocket_url("http://h:8000") == "ws://h:8000/connection/websocket"
    assert websocket_url("https://h") == "wss://h/connection/websocket"
    assert websocket_url("ws://h:1/") == "ws://h:1/connection/websocket"
    assert websocket_url("ws://h/connection/websocket") == "ws://h/connection/websocket"
    assert websocket_url("wss://h/realtime") == "wss://h/realtime/connection/websocket"
    with pytest.raises(ConfigurationError):
        websocket_url("ftp://h")
    with pytest.raises(ConfigurationError):
        websocket_url("localhost:8000")


@pytest.mark.parametrize("form", ["base", "ws", "full"])
async def test_connect_with_every_url_form(hub: HubServer, form: str) -> None:
    url = {
        "base": hub.base,
        "ws": hub.base.replace("http://", "ws://"),
        "full": hub.ws_url,
    }[form]
    async with eventcast.connect(url, token=token("alice")) as client:
        assert client.connected
        assert client.client_id in hub.hub.connections
        assert hub.hub.connections[client.client_id].user == "alice"
    assert client.closed
    assert not client.connected


async def test_subscribe_receive_publish_and_history(hub: HubServer, client: Client) -> None:
    channel = "news.basic"
    async with client.subscribe(channel) as sub:
        assert sub.position is not None
        epoch = sub.position.epoch
        assert sub.position == Position(0, epoch)
        await client.publish(channel, {"n": 1, "text": "héllo ✓"})
        await hub.publish(channel, {"n": 2}, tags={"kind": "api"})
        first, second = await take(sub, 2)
        assert (first.topic, first.data, first.offset, first.epoch) == (
            channel,
            {"n": 1, "text": "héllo ✓"},
            1,
            epoch,
        )
        assert (second.data, second.offset, dict(second.tags)) == ({"n": 2}, 2, {"kind": "api"})
        assert sub.position == Position(2, epoch)

    history = await client.history(channel, limit=10)
    assert history.position == Position(2, epoch)
    assert [(e.offset, e.data) for e in history.events] == [
        (1, {"n": 1, "text": "héllo ✓"}),
        (2, {"n": 2}),
    ]
    newest = await client.history(channel, limit=1, reverse=True)
    assert [e.offset for e in newest.events] == [2]
    after_one = await client.history(channel, limit=10, since=Position(1, epoch))
    assert [e.offset for e in after_one.events] == [2]
    only_position = await client.history(channel)
    assert only_position.events == []
    assert only_position.position == Position(2, epoch)


async def test_pattern_subscription_yields_concrete_topics(hub: HubServer, client: Client) -> None:
    async with client.subscribe("live:sport.>") as sub:
        assert sub.position is None
        await hub.publish("live:sport.football", {"goal": 1})
        await hub.publish("live:sport.tennis.final", {"ace": 2})
        events = await take(sub, 2)
    assert [(e.topic, e.data, e.offset) for e in events] == [
        ("live:sport.football", {"goal": 1}, None),
        ("live:sport.tennis.final", {"ace": 2}, None),
    ]


async def test_since_replays_what_was_missed(hub: HubServer, client: Client) -> None:
    channel = "news.since"
    for n in range(1, 5):
        await hub.publish(channel, {"n": n})
    epoch = (await client.history(channel)).position.epoch
    async with client.subscribe(channel, since=Position(2, epoch)) as sub:
        assert sub.recovered
        got = await take(sub, 2)
        assert [e.offset for e in got] == [3, 4]
    async with client.subscribe(channel, since=EARLIEST) as sub:
        assert sub.recovered
        got = await take(sub, 4)
        assert [e.data for e in got] == [{"n": n} for n in range(1, 5)]
    async with client.subscribe(channel, since=(4, epoch)) as sub:
        await hub.publish(channel, {"n": 5})
        [live] = await take(sub, 1)
        assert live.offset == 5


async def test_subscribe_errors_are_typed(memory_client: Client) -> None:
    client = memory_client
    with pytest.raises(ReplyError) as info:
        await client.subscribe("nope:x").__aenter__()
    assert info.value.code == 102  # unknown channel
    with pytest.raises(ReplyError) as info:
        async with client.subscribe("priv:secret"):
            pass
    assert info.value.code == 103  # permission denied: a subscription token is needed
    async with client.subscribe("news.twice"):
        with pytest.raises(SubscriberExistsError):
            await client.subscribe("news.twice").__aenter__()


async def test_subscription_token(memory_hub: TestHub, memory_client: Client) -> None:
    hub, client = memory_hub, memory_client
    sub_token = token("alice", channel="priv:secret")
    async with client.subscribe("priv:secret", token=sub_token) as sub:
        await hub.publish("priv:secret", {"ok": True})
        [event] = await take(sub, 1)
    assert event.data == {"ok": True}


async def test_rpc(memory_hub: TestHub, memory_client: Client) -> None:
    hub, client = memory_hub, memory_client

    async def echo(conn: Any, data: Any) -> Any:
        return {"echo": data, "user": conn.user}

    hub.hub.register_rpc("echo", echo)
    assert await client.rpc("echo", [1, "two"]) == {"echo": [1, "two"], "user": "alice"}
    with pytest.raises(ReplyError) as info:
        await client.rpc("no.such.method", {})
    assert (info.value.code, info.value.message) == (104, "method not found")
    assert not info.value.temporary


async def test_send_reaches_the_message_handler(memory_hub: TestHub, memory_client: Client) -> None:
    hub, client = memory_hub, memory_client
    received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def handler(conn: Any, data: Any) -> None:
        if not received.done():
            received.set_result((conn.user, data))

    hub.hub.message_handler = handler
    await client.send({"hello": "hub"})
    assert await asyncio.wait_for(received, WAIT) == ("alice", {"hello": "hub"})


async def test_publish_refused_and_unencodable(memory_client: Client) -> None:
    client = memory_client
    with pytest.raises(ReplyError) as info:
        await client.publish("priv:secret", {"x": 1})
    assert info.value.code == 103
    with pytest.raises(eventcast.EncodeError):
        await client.publish("news.a", {"x": object()})


async def test_presence(memory_hub: TestHub) -> None:
    async with (
        memory_hub.client(user="alice", info={"name": "Alice"}) as alice,
        memory_hub.client(user="bob") as bob,
        alice.subscribe("room:lobby"),
        bob.subscribe("room:lobby"),
    ):
        presence = await alice.presence("room:lobby")
        assert set(presence) == {alice.client_id, bob.client_id}
        assert alice.client_id is not None
        me = presence[alice.client_id]
        assert (me.client, me.user, me.conn_info) == (alice.client_id, "alice", {"name": "Alice"})
        stats = await bob.presence_stats("room:lobby")
        assert (stats.num_clients, stats.num_users) == (2, 2)
        with pytest.raises(ReplyError) as info:
            await alice.presence("news.a")  # no presence in that namespace
        assert info.value.code == 108


async def test_reconnect_recovers_what_was_missed_exactly_once(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(hub, monkeypatch)
    channel = "news.recovery"
    async with (
        eventcast.connect(hub.base, token=token("carol"), **FAST) as client,
        client.subscribe(channel, on_lost="raise") as sub,
    ):
        first_id = client.client_id
        for n in (1, 2, 3):
            await hub.publish(channel, {"n": n})
        assert [e.offset for e in await take(sub, 3)] == [1, 2, 3]

        gate.open = False
        await kick(hub, "carol")  # 3000: reconnect
        await gate.wait_refused()  # the client noticed and is retrying
        for n in (4, 5, 6):
            await hub.publish(channel, {"n": n})  # certainly missed: the hub refuses it
        gate.open = True
        missed = await take(sub, 3)
        await hub.publish(channel, {"n": 7})
        [sentinel] = await take(sub, 1)

        assert [(e.offset, e.data) for e in [*missed, sentinel]] == [
            (n, {"n": n}) for n in (4, 5, 6, 7)
        ]
        assert sub.recovered
        assert sub.lost == 0
        assert client.connects == 2
        assert client.client_id != first_id
        assert hub.hub.recoveries[True] == 1
        assert sub.position is not None
        assert sub.position.offset == 7


async def test_unrecoverable_resubscribe_raises_with_on_lost_raise(
    start_hub: StartHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_hub(replay_cap=2)
    gate = Gate(server, monkeypatch)
    channel = "news.lost"
    async with (
        eventcast.connect(server.base, token=token("dave"), **FAST) as client,
        client.subscribe(channel, on_lost="raise") as sub,
    ):
        await server.publish(channel, {"n": 1})
        [first] = await take(sub, 1)
        gate.open = False
        await kick(server, "dave")
        await gate.wait_refused()
        for n in (2, 3, 4):  # three missed, over the replay cap of two
            await server.publish(channel, {"n": n})
        gate.open = True
        with pytest.raises(PositionLostError) as info:
            await take(sub, 1)
        assert info.value.topic == channel
        assert info.value.position == Position(4, first.epoch or "")
        assert sub.position == Position(4, first.epoch or "")
        assert not sub.recovered
        assert sub.lost == 1
        # Iterating again goes on from the new position.
        await server.publish(channel, {"n": 5})
        [after] = await take(sub, 1)
        assert (after.offset, after.data) == (5, {"n": 5})


@pytest.mark.parametrize("on_lost", ["raise", "continue"])
async def test_wrong_epoch_since(hub: HubServer, client: Client, on_lost: Any) -> None:
    channel = f"news.epoch-{on_lost}"
    await hub.publish(channel, {"n": 1})
    async with client.subscribe(channel, since=Position(1, "bad"), on_lost=on_lost) as sub:
        assert not sub.recovered
        assert sub.lost == 1
        await hub.publish(channel, {"n": 2})
        if on_lost == "raise":
            with pytest.raises(PositionLostError):
                await take(sub, 1)
        [event] = await take(sub, 1)
        assert (event.offset, event.data) == (2, {"n": 2})
        assert sub.position == Position(2, event.epoch or "")


async def test_server_unsubscribe_ends_the_iterator(
    memory_hub: TestHub, memory_client: Client
) -> None:
    hub, client = memory_hub, memory_client
    async with client.subscribe("news.kicked") as sub:
        await hub.api("unsubscribe", user="alice", channel="news.kicked")
        with pytest.raises(SubscriptionClosedError, match="2000"):
            await take(sub, 1)
        assert not sub.active
    # The client itself is fine.
    assert (await client.history("news.kicked")).events == []


async def test_terminal_disconnect_fails_the_client(memory_hub: TestHub) -> None:
    async with memory_hub.client(user="erin") as client:
        async with client.subscribe("news.terminal") as sub:
            # force disconnect, no reconnect
            await memory_hub.api(
                "disconnect", user="erin", disconnect={"code": 3503, "reason": "test kick"}
            )
            with pytest.raises(ClientClosedError) as info:
                await take(sub, 1)
            assert (info.value.code, info.value.reason) == (3503, "test kick")
        assert client.closed
        with pytest.raises(ClientClosedError):
            await client.publish("news.terminal", 1)


async def test_close_is_idempotent_and_ends_iterators(hub: HubServer) -> None:
    client = await eventcast.connect(hub.base, token=token("frank"))
    sub = await client.subscribe("news.close")
    waiting = asyncio.ensure_future(take(sub, 1))
    await client.publish("news.close", 1)
    assert [e.data for e in await waiting] == [1]
    pending = asyncio.ensure_future(take(sub, 1))
    await client.close()
    await client.close()
    with pytest.raises(StopAsyncIteration):
        await pending
    with pytest.raises(ClientClosedError):
        await client.history("news.close")


async def test_close_survives_cancellation(hub: HubServer) -> None:
    client = await eventcast.connect(hub.base, token=token("gina"))
    sub = await client.subscribe("news.cancel")
    # A deadline already passed: close() starts, and its caller is cancelled at its first await.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await client.close()
    await client.close()  # waits for the shielded shutdown to finish
    assert client.closed
    assert not sub.active
    assert all(t.done() for t in client._tasks)
    assert client._supervisor is not None
    assert client._supervisor.done()


async def test_token_refresh_before_expiry(hub: HubServer) -> None:
    asked = asyncio.Event()
    fresh = token("hana", ttl=600)

    async def get_token() -> str:
        asked.set()
        return fresh

    async with eventcast.connect(
        hub.base, token=token("hana", ttl=2), get_token=get_token, **FAST
    ) as client:
        await asyncio.wait_for(asked.wait(), WAIT)
        # Commands are answered in order: once this one is, the refresh was too.
        await client.history("news.refresh")
        assert client.refreshes == 1
        assert client.connects == 1
        assert client.client_id is not None
        conn = hub.hub.connections[client.client_id]
        assert conn.expires_at is not None
        assert conn.expires_at > time.time() + 300


async def test_expired_token_is_replaced_through_the_callback(hub: HubServer) -> None:
    calls = 0

    def get_token() -> str:  # a plain function works too
        nonlocal calls
        calls += 1
        return token("ivan")

    async with eventcast.connect(
        hub.base, token=expired_token("ivan"), get_token=get_token, **FAST
    ) as client:
        assert calls == 1
        assert client.connects == 1
        assert hub.hub.connections[client.client_id or ""].user == "ivan"


async def test_expired_token_without_callback_is_a_handshake_error(hub: HubServer) -> None:
    with pytest.raises(HandshakeError) as info:
        await eventcast.connect(hub.base, token=expired_token("ivan"))
    assert info.value.code == 109


async def test_invalid_token_is_a_handshake_error(hub: HubServer) -> None:
    with pytest.raises(HandshakeError) as info:
        await eventcast.connect(hub.base, token="not-a-jwt")
    assert info.value.code == 3500
