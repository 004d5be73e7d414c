"""Presence, presence stats and join/leave pushes over real connections; presence TTLs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from centrifuge import ClientState, ReplyError

from eventcast.server.presence import MemoryPresence

from .conftest import StartHub
from .hubtools import NAMESPACES, HubServer, RawClient, token
from .opstools import Clients, FakeClock, subscription

ROOM: dict[str, Any] = {
    "name": "room",
    "presence": True,
    "join_leave": True,
    "allow_presence_for_subscriber": True,
    "allow_subscribe_for_client": True,
}
CHANNEL = "room:lobby"


@pytest.fixture
async def server(start_hub: StartHub) -> HubServer:
    return await start_hub(namespaces=[*NAMESPACES, ROOM])


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    made = Clients()
    yield made
    await made.close()


async def join(server: HubServer, clients: Clients, user: str, **sub_options: Any) -> Any:
    """Connect ``user`` (with connection info) and subscribe to the room; return the pieces."""
    client, events = clients.new(server.ws_url, token(user, info={"name": user.title()}))
    sub, sub_events = subscription(client, CHANNEL, **sub_options)
    await client.connect()
    client_id = (await events.next("connected")).client
    await sub.subscribe()
    await sub_events.next("subscribed")
    return client, client_id, sub, sub_events


async def test_presence_lists_clients_with_their_info(server: HubServer, clients: Clients) -> None:
    alice, alice_id, alice_sub, _ = await join(server, clients, "alice")
    _, bob_id, _, _ = await join(server, clients, "bob")

    # From a client (a subscriber may ask), through the SDK.
    result = await alice_sub.presence()
    assert set(result.clients) == {alice_id, bob_id}
    assert result.clients[alice_id].client == alice_id
    assert result.clients[alice_id].user == "alice"
    assert result.clients[alice_id].conn_info == {"name": "Alice"}
    assert result.clients[bob_id].user == "bob"
    assert result.clients[bob_id].conn_info == {"name": "Bob"}

    # From the HTTP API.
    api = await server.api("presence", channel=CHANNEL)
    assert api["presence"] == {
        alice_id: {"client": alice_id, "user": "alice", "conn_info": {"name": "Alice"}},
        bob_id: {"client": bob_id, "user": "bob", "conn_info": {"name": "Bob"}},
    }

    stats = await alice.presence_stats(CHANNEL)
    assert (stats.num_clients, stats.num_users) == (2, 2)
    assert await server.api("presence_stats", channel=CHANNEL) == {
        "num_clients": 2,
        "num_users": 2,
    }

    # A second connection of alice: one more client, the same users.
    _, alice2_id, _, _ = await join(server, clients, "alice")
    assert alice2_id != alice_id
    stats = await alice.presence_stats(CHANNEL)
    assert (stats.num_clients, stats.num_users) == (3, 2)
    assert await server.api("presence_stats", channel=CHANNEL) == {
        "num_clients": 3,
        "num_users": 2,
    }
    api = await server.api("presence", channel=CHANNEL)
    assert api["presence"][alice2_id]["user"] == "alice"


async def test_join_and_leave_pushes_go_to_who_asked(server: HubServer, clients: Clients) -> None:
    _, carol_id, _, watcher = await join(server, clients, "carol", join_leave=True)
    _, bob_id, _, quiet = await join(server, clients, "bob")  # did not ask for join/leave
    assert (await watcher.next("join")).info.client == bob_id

    # Someone subscribes, then unsubscribes.
    dave, dave_id, dave_sub, _ = await join(server, clients, "dave")
    joined = await watcher.next("join")
    assert (joined.info.client, joined.info.user) == (dave_id, "dave")
    assert joined.info.conn_info == {"name": "Dave"}
    await dave_sub.unsubscribe()
    left = await watcher.next("leave")
    assert (left.info.client, left.info.user) == (dave_id, "dave")
    assert dave_id not in (await server.api("presence", channel=CHANNEL))["presence"]

    # Someone subscribes, then disconnects.
    erin, erin_id, _, _ = await join(server, clients, "erin")
    assert (await watcher.next("join")).info.client == erin_id
    await erin.disconnect()
    left = await watcher.next("leave")
    assert (left.info.client, left.info.user) == (erin_id, "erin")
    presence = (await server.api("presence", channel=CHANNEL))["presence"]
    assert set(presence) == {carol_id, bob_id}

    # The subscriber who did not ask got none of it: a publication sent after
    # everything above reaches it with no join or leave before it.
    await server.publish(CHANNEL, {"after": "all"})
    assert (await quiet.next("publication")).pub.data == {"after": "all"}
    assert quiet.counts["join"] == 0
    assert quiet.counts["leave"] == 0
    # The watcher saw every join and leave after its own subscribe, and only those.
    assert (await watcher.next("publication")).pub.data == {"after": "all"}
    assert watcher.counts["join"] == 3  # bob, dave, erin
    assert watcher.counts["leave"] == 2  # dave, erin
    assert dave.state == ClientState.CONNECTED


async def test_a_lost_connection_leaves_presence(server: HubServer, clients: Clients) -> None:
    _, _, _, watcher = await join(server, clients, "carol", join_leave=True)
    raw = await RawClient.open(server.ws_url)
    client_id = (await raw.connect(token("mallory")))["client"]
    await raw.subscribe(CHANNEL)
    assert (await watcher.next("join")).info.client == client_id
    assert client_id in (await server.api("presence", channel=CHANNEL))["presence"]

    # The TCP connection dies without a close handshake.
    transport = raw.ws.transport
    assert transport is not None
    transport.abort()
    left = await watcher.next("leave")
    assert (left.info.client, left.info.user) == (client_id, "mallory")
    assert client_id not in (await server.api("presence", channel=CHANNEL))["presence"]
    assert await server.api("presence_stats", channel=CHANNEL) == {
        "num_clients": 1,
        "num_users": 1,
    }


async def test_presence_needs_the_namespace_option_and_permission(
    server: HubServer, clients: Clients
) -> None:
    client, _ = clients.new(server.ws_url, token("alice"))
    await client.connect()
    # "news" is in the namespace without presence.
    for call in (client.presence, client.presence_stats):
        with pytest.raises(ReplyError) as error:
            await call("news")
        assert error.value.code == 108
    for method in ("presence", "presence_stats"):
        answer = (await server.call(method, {"channel": "news"})).json()
        assert answer["error"]["code"] == 108
    # The room allows presence for subscribers only: alice is not one.
    with pytest.raises(ReplyError) as denied:
        await client.presence(CHANNEL)
    assert denied.value.code == 103


async def test_entries_expire_when_no_longer_refreshed(server: HubServer, clients: Clients) -> None:
    """The entries of a node that stopped refreshing them (it crashed) go away after the TTL."""
    clock = FakeClock()
    server.hub.presence = MemoryPresence(clock=clock)
    _, alice_id, _, _ = await join(server, clients, "alice")
    assert set((await server.api("presence", channel=CHANNEL))["presence"]) == {alice_id}
    clock.advance(server.settings.presence_ttl - 1)
    assert set((await server.api("presence", channel=CHANNEL))["presence"]) == {alice_id}
    clock.advance(2)
    assert (await server.api("presence", channel=CHANNEL))["presence"] == {}
    assert await server.api("presence_stats", channel=CHANNEL) == {
        "num_clients": 0,
        "num_users": 0,
    }


# -- MemoryPresence ---------------------------------------------------------------------------


async def test_memory_presence_ttl_refresh_and_remove() -> None:
    clock = FakeClock()
    presence = MemoryPresence(clock=clock)
    await presence.add("c", "1", {"client": "1", "user": "u1"}, ttl=10)
    await presence.add("c", "2", {"client": "2", "user": "u1"}, ttl=10)
    await presence.add("c", "3", {"client": "3", "user": "u2"}, ttl=30)
    assert set(await presence.get("c")) == {"1", "2", "3"}
    assert await presence.stats("c") == (3, 2)

    clock.advance(9)
    await presence.add("c", "2", {"client": "2", "user": "u1"}, ttl=10)  # refreshed
    clock.advance(1)  # entry 1 is 10 s old: expired (deadline <= now)
    assert set(await presence.get("c")) == {"2", "3"}
    assert await presence.stats("c") == (2, 2)
    clock.advance(9.5)
    assert set(await presence.get("c")) == {"3"}
    await presence.remove("c", "3")
    assert await presence.get("c") == {}
    assert await presence.stats("c") == (0, 0)
    await presence.remove("c", "3")  # idempotent
    await presence.remove("other", "x")


async def test_memory_presence_keeps_info_and_channels_apart() -> None:
    clock = FakeClock()
    presence = MemoryPresence(clock=clock)
    info = {"client": "1", "user": "u", "conn_info": {"name": "U"}}
    await presence.add("a", "1", info, ttl=5)
    await presence.add("b", "1", {"client": "1", "user": "u"}, ttl=50)
    info["user"] = "changed"  # the stored entry is a copy
    assert await presence.get("a") == {
        "1": {"client": "1", "user": "u", "conn_info": {"name": "U"}}
    }
    clock.advance(5)
    assert await presence.get("a") == {}
    assert set(await presence.get("b")) == {"1"}


async def test_memory_presence_bound_evicts_the_oldest() -> None:
    clock = FakeClock()
    presence = MemoryPresence(clock=clock, max_entries=2)
    await presence.add("c", "old", {"user": "a"}, ttl=10)
    clock.advance(1)
    await presence.add("c", "mid", {"user": "b"}, ttl=10)
    await presence.add("d", "new", {"user": "c"}, ttl=10)  # over the bound: "old" goes
    assert set(await presence.get("c")) == {"mid"}
    assert set(await presence.get("d")) == {"new"}
    # Expired entries are swept before anything live is evicted.
    clock.advance(10)  # "mid" and "new" expire at 11; now 1011 -> both expired
    await presence.add("c", "a", {"user": "a"}, ttl=10)
    await presence.add("c", "b", {"user": "b"}, ttl=10)
    assert set(await presence.get("c")) == {"a", "b"}
    assert await presence.get("d") == {}
