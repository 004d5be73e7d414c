"""Join/leave, server-side subscriptions, subscription token refresh and states, against a hub.

Run over real sockets (the in-process uvicorn hub of tests/server), so the
client's WebSocket transport is exercised too; the sync client gets the same.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest

import eventcast
import eventcast.sync
from eventcast import Event
from eventcast.client import Client, ClientPresence
from eventcast.exceptions import ReplyError, SubscriptionClosedError
from eventcast.testing import assert_received, wait_for_publication
from tests.server.conftest import StartHub
from tests.server.hubtools import NAMESPACES, SECRET, WAIT, HubServer, token

ROOM: dict[str, Any] = {
    "name": "room",
    "presence": True,
    "join_leave": True,
    "allow_subscribe_for_client": True,
    "allow_presence_for_subscriber": True,
}
FAST = {"min_reconnect_delay": 0.02, "max_reconnect_delay": 0.2, "timeout": WAIT}


async def wait_for(condition: Any, what: str, event: asyncio.Event) -> None:
    """Wait until ``condition()`` holds, re-checked whenever ``event`` is set."""
    async with asyncio.timeout(WAIT):
        while not condition():
            event.clear()
            await event.wait()


async def test_join_and_leave_reach_the_callbacks(start_hub: StartHub) -> None:
    hub = await start_hub(namespaces=[*NAMESPACES, ROOM])
    changed = asyncio.Event()
    joins: list[ClientPresence] = []
    leaves: list[ClientPresence] = []

    def on_join(who: ClientPresence) -> None:
        joins.append(who)
        changed.set()

    def on_leave(who: ClientPresence) -> None:
        leaves.append(who)
        changed.set()

    async with eventcast.connect(hub.base, token=token("alice"), **FAST) as alice:
        async with alice.subscribe("room:1", on_join=on_join, on_leave=on_leave) as sub:
            assert sub.join_leave
            async with (
                eventcast.connect(hub.base, token=token("bob"), **FAST) as bob,
                bob.subscribe("room:1"),
            ):
                await wait_for(lambda: any(j.user == "bob" for j in joins), "bob's join", changed)
                bob_id = bob.client_id
            await wait_for(lambda: bool(leaves), "bob's leave", changed)
            assert [(p.user, p.client) for p in leaves] == [("bob", bob_id)]
        # Without join_leave the hub sends none (the namespace does not force them).
        async with alice.subscribe("room:2") as quiet:
            assert not quiet.join_leave


async def test_server_side_subscriptions_are_delivered_and_recovered(hub: HubServer) -> None:
    seen: list[Event] = []
    client = eventcast.connect(
        hub.base, token=token("sam", channels=["news.server"]), on_publication=seen.append, **FAST
    )
    news = client.server_subscription("news.server")  # asked before connecting: nothing missed
    assert news.server_side
    async with client:
        assert client.server_channels == frozenset({"news.server"})
        assert news.state == "subscribed"
        await hub.publish("news.server", 1)
        await assert_received(news, [1])
        conn = hub.hub.connections[client.client_id or ""]
        conn.close(eventcast.server.hub.codes.DISCONNECT_SHUTDOWN)  # reconnect (3001)
        await hub.publish("news.server", 2)
        await hub.publish("news.server", 3)
        events = await assert_received(news, [2, 3])
        assert [e.offset for e in events] == [2, 3]
        assert client.server_subscription("news.server") is news
        # A channel the server subscribes the client to through the HTTP API.
        late = client.server_subscription("news.late")
        await hub.api("subscribe", user="sam", channel="news.late")
        await hub.publish("news.late", "hello")
        assert (await wait_for_publication(late)).data == "hello"
        assert client.server_channels == {"news.server", "news.late"}
        # Client-side subscriptions are not mixed in.
        async with client.subscribe("news.own") as own:
            await hub.publish("news.own", "mine")
            await assert_received(own, ["mine"])
    assert [e.data for e in seen if e.topic == "news.server"] == [1, 2, 3]
    assert [e.data for e in seen if e.topic == "news.late"] == ["hello"]
    assert not [e for e in seen if e.topic == "news.own"]
    assert news.state == "unsubscribed"


async def test_subscription_token_is_refreshed_before_it_expires(hub: HubServer) -> None:
    calls: list[str] = []
    asked = asyncio.Event()

    async def get_token(channel: str) -> str:
        calls.append(channel)
        asked.set()
        return token("tia", channel=channel, ttl=1.5)  # the hub reports ttl 1: refresh at 0.8 s

    async with (
        eventcast.connect(hub.base, token=token("tia"), **FAST) as client,
        client.subscribe("priv:feed", get_token=get_token) as sub,
    ):
        assert calls == ["priv:feed"]  # no token given: asked for the first one
        # Time is the subject: two refreshes take us past the first token's expiry.
        await wait_for(lambda: len(calls) == 3, "two refreshes", asked)
        await client.history("news.tick")  # answered after the refresh (in order)
        assert sub.refreshes == 2
        assert client.connects == 1  # never disconnected for an expired subscription
        await hub.publish("priv:feed", "still here")
        assert (await wait_for_publication(sub)).data == "still here"


async def test_a_refused_subscription_token_ends_the_subscription(hub: HubServer) -> None:
    async def wrong_channel(channel: str) -> str:
        return token("tia", channel="priv:other")

    async with eventcast.connect(hub.base, token=token("tia"), **FAST) as client:
        with pytest.raises(ReplyError) as refused:
            await client.subscribe("priv:feed", get_token=wrong_channel)
        assert refused.value.code == 103

    failing_calls = 0

    def failing(channel: str) -> str:
        nonlocal failing_calls
        failing_calls += 1
        if failing_calls > 1:
            raise RuntimeError("the token service is down")
        return token("tia", channel=channel, ttl=1.5)

    async with eventcast.connect(hub.base, token=token("tia"), **FAST) as client:
        async with client.subscribe("priv:feed", get_token=failing) as sub:
            with pytest.raises(SubscriptionClosedError, match="token service is down"):
                await asyncio.wait_for(anext(sub), WAIT)
        assert client.connected  # the client goes on


async def test_states_follow_the_sdk_specification(hub: HubServer) -> None:
    states: list[str] = []
    changed = asyncio.Event()

    def on_state(state: str) -> None:
        states.append(state)
        changed.set()

    client = eventcast.connect(hub.base, token=token("sid"), on_state=on_state, **FAST)
    assert client.state == "disconnected"
    async with client:
        sub = client.subscribe("news.states")
        assert sub.state == "subscribing"
        await sub
        assert sub.state == "subscribed"
        hub.hub.connections[client.client_id or ""].close(
            eventcast.server.hub.codes.DISCONNECT_SHUTDOWN
        )
        await wait_for(lambda: states.count("connected") == 2, "the reconnect", changed)
        await client.history("news.states")
        assert sub.state == "subscribed"
        await sub.unsubscribe()
        assert sub.state == "unsubscribed"
    assert states == ["connecting", "connected", "connecting", "connected", "disconnected"]


def test_backoff_is_jittered_exponential_and_capped() -> None:
    """The SDK spec's backoff: grows exponentially from the minimum, capped, with jitter."""
    client = Client("ws://localhost:1", min_reconnect_delay=0.1, max_reconnect_delay=2.0)
    random.seed(7)
    for attempt in range(12):
        ceiling = min(2.0, 0.1 * 2**attempt)
        delays = [client._backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, so clients do not reconnect in step


async def test_sync_client_gets_the_same(hub: HubServer) -> None:
    def work() -> tuple[list[Any], list[str], int]:
        joined: list[str] = []
        with eventcast.sync.connect(
            hub.base, token=token("sue", channels=["news.sync-server"]), **FAST
        ) as client:
            server = client.server_subscription("news.sync-server")
            with client.subscribe(
                "priv:sync",
                get_token=lambda channel: token("sue", channel=channel),
                on_join=lambda who: joined.append(who.user),
            ) as own:
                client.publish("news.sync-server", {"n": 1})
                client.publish("news.sync-server", {"n": 2})
                got = [server.get(timeout=WAIT).data, server.get(timeout=WAIT).data]
                assert own.state == "subscribed"
                assert client.state == "connected"
                return got, joined, own.refreshes

    got, joined, refreshes = await asyncio.to_thread(work)
    assert got == [{"n": 1}, {"n": 2}]
    assert joined == []  # priv has no join_leave
    assert refreshes == 0
    assert not [t for t in threading.enumerate() if t.name == "eventcast-sync-client"]


async def test_a_failing_token_callback_fails_only_its_subscribe() -> None:
    """On the in-memory hub: the error is a SubscriptionClosedError chaining the cause."""
    from eventcast.testing import TestHub

    def down(channel: str) -> str:
        raise RuntimeError("the token service is down")

    async with (
        TestHub(namespaces=NAMESPACES, token_hmac_secret=SECRET) as hub,
        hub.client(user="tia") as client,
        client.subscribe("news.other") as other,
    ):
        with pytest.raises(SubscriptionClosedError, match="returned int"):
            await client.subscribe("priv:a", get_token=lambda channel: 42)  # type: ignore[arg-type, return-value]
        with pytest.raises(SubscriptionClosedError, match="token service is down") as info:
            await client.subscribe("priv:b", get_token=down)
        assert isinstance(info.value.__cause__, RuntimeError)
        await hub.publish("news.other", "fine")
        assert (await wait_for_publication(other)).data == "fine"
        assert client.connected
