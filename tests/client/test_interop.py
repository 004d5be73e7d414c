"""Interoperability both ways with the official SDKs, through the hub.

* centrifuge-js (node) publishes with ``centrifuge.publish``; our client receives;
* our client publishes; centrifuge-python receives.
"""

from __future__ import annotations

import asyncio
from typing import Any

from centrifuge import (
    Client as CentrifugeClient,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

import eventcast
from tests.server.hubtools import WAIT, HubServer, token
from tests.server.jstools import run_js


async def test_our_client_receives_what_centrifuge_js_publishes(hub: HubServer) -> None:
    channel = "interop.from-js"
    count = 5
    async with (
        eventcast.connect(hub.base, token=token("py-reader")) as client,
        client.subscribe(channel) as sub,
    ):
        result = await run_js(
            "publish.mjs",
            HUB_WS_URL=hub.ws_url,
            HUB_TOKEN=token("js-writer"),
            HUB_CHANNEL=channel,
            HUB_COUNT=str(count),
        )
        assert result["error"] is None
        assert len(result["published"]) == count

        async with asyncio.timeout(WAIT):
            events = [await anext(sub) for _ in range(count)]
    assert [e.data for e in events] == result["published"]
    assert [e.offset for e in events] == list(range(1, count + 1))
    assert {e.topic for e in events} == {channel}
    assert events[0].data["text"] == "héllo 1 ✓"


class _Events(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.subscribed: asyncio.Future[SubscribedContext] = (
            asyncio.get_running_loop().create_future()
        )
        self.publications: asyncio.Queue[PublicationContext] = asyncio.Queue()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        if not self.subscribed.done():
            self.subscribed.set_result(ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.publications.put_nowait(ctx)


async def test_centrifuge_python_receives_what_our_client_publishes(hub: HubServer) -> None:
    channel = "interop.from-python"
    payloads: list[Any] = [
        {"n": 1, "text": "héllo ✓"},
        [1, 2, 3],
        "a string",
        42,
        {"nested": {"list": [None, True, 1.5]}},
    ]
    reader = CentrifugeClient(hub.ws_url, token=token("centrifuge-reader"), proxy=None)
    events = _Events()
    sub = reader.new_subscription(channel, events=events)
    try:
        await reader.connect()
        await sub.subscribe()
        await asyncio.wait_for(events.subscribed, WAIT)
        async with eventcast.connect(hub.base, token=token("py-writer")) as writer:
            for payload in payloads:
                await writer.publish(channel, payload)
        received = [
            await asyncio.wait_for(events.publications.get(), WAIT) for _ in range(len(payloads))
        ]
    finally:
        await reader.disconnect()
    assert [ctx.pub.data for ctx in received] == payloads
    assert [ctx.pub.offset for ctx in received] == list(range(1, len(payloads) + 1))
    assert events.publications.empty()
