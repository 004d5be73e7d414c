"""Server-initiated pushes: message, refresh, subscribe and unsubscribe."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from eventcast.testing import TestHub, wait_for_publication
from tests.server.hubtools import WAIT, RawClient, token


async def test_message_push_reaches_only_the_user() -> None:
    """On the in-memory hub of eventcast.testing, through the Python client's on_message."""
    received: dict[str, list[Any]] = {"alice": [], "bob": []}
    arrived = asyncio.Event()

    def inbox(user: str) -> Any:
        def on_message(data: Any) -> None:
            received[user].append(data)
            arrived.set()

        return on_message

    async with (
        TestHub() as hub,
        hub.client(user="alice", on_message=inbox("alice")) as alice,
        hub.client(user="bob", on_message=inbox("bob")) as bob,
    ):
        assert await hub.hub.send_message("alice", {"hello": "alice"}) == 1
        await asyncio.wait_for(arrived.wait(), WAIT)
        assert received["alice"] == [{"hello": "alice"}]
        # bob got nothing: his command's reply comes after anything queued before it.
        await bob.history("news")
        assert received["bob"] == []
        assert alice.connected


async def test_refresh_push_extends_the_connection(hub):
    async with await RawClient.open(hub.ws_url) as client:
        result = await client.connect(token("carol", ttl=600))
        assert result["expires"] is True
        later = time.time() + 3600
        assert await hub.hub.refresh_user("carol", later) == 1
        push = await client.message()
        refresh = push["push"]["refresh"]
        assert refresh["expires"] is True
        assert 3500 <= refresh["ttl"] <= 3600
        conn = hub.hub.connections_of("carol")[0]
        assert conn.expires_at == later


async def test_server_side_subscribe_and_unsubscribe_pushes() -> None:
    """On the in-memory hub: the pushes reach the client's server-side subscription."""
    async with TestHub() as hub, hub.client(user="dave") as client:
        news = client.server_subscription("news")
        assert await hub.hub.subscribe_user("dave", "news") == 1
        await hub.publish("news", {"n": 1})
        assert (await wait_for_publication(news)).data == {"n": 1}
        assert client.server_channels == {"news"}
        assert await hub.hub.unsubscribe_user("dave", "news") == 1
        await client.history("news")  # replies come after the push queued before them
        assert client.server_channels == frozenset()  # code 2000: the subscription is over
        assert "news" not in hub.hub.connections_of("dave")[0].channels
