"""Server-initiated pushes: message, refresh, subscribe and unsubscribe (real sockets)."""

from __future__ import annotations

import time

from tests.server.hubtools import RawClient, token


async def test_message_push_reaches_only_the_user(hub):
    async with (
        await RawClient.open(hub.ws_url) as alice,
        await RawClient.open(hub.ws_url) as bob,
    ):
        await alice.connect(token("alice"))
        await bob.connect(token("bob"))
        assert hub.hub.send_message("alice", {"hello": "alice"}) == 1
        message = await alice.message()
        assert message == {"push": {"message": {"data": {"hello": "alice"}}}}
        # bob got nothing: his next message is the reply to his own command.
        reply = await bob.request("ping", {})
        assert "error" not in reply


async def test_refresh_push_extends_the_connection(hub):
    async with await RawClient.open(hub.ws_url) as client:
        result = await client.connect(token("carol", ttl=600))
        assert result["expires"] is True
        later = time.time() + 3600
        assert hub.hub.refresh_user("carol", later) == 1
        push = await client.message()
        refresh = push["push"]["refresh"]
        assert refresh["expires"] is True
        assert 3500 <= refresh["ttl"] <= 3600
        conn = hub.hub.connections_of("carol")[0]
        assert conn.expires_at == later


async def test_server_side_subscribe_and_unsubscribe_pushes(hub):
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(token("dave"))
        assert await hub.hub.subscribe_user("dave", "news") == 1
        push = await client.message()
        assert push["push"]["channel"] == "news"
        assert "subscribe" in push["push"]
        await hub.publish("news", {"n": 1})
        publication = await client.publication()
        assert publication["pub"]["data"] == {"n": 1}
        assert hub.hub.unsubscribe_user("dave", "news") == 1
        push = await client.message()
        assert push["push"]["unsubscribe"]["code"] == 2000
        assert "news" not in hub.hub.connections_of("dave")[0].channels
