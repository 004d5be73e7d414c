"""centrifuge-python (the official Python SDK) helpers: events recorded by kind, in order."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    ErrorContext,
    PublicationContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscribedContext,
    SubscribingContext,
    SubscriptionErrorContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)

from .hubtools import WAIT

__all__ = ["ClientEvents", "Recorder", "SubEvents", "sdk_client", "subscription"]


class Recorder:
    """Events of one client or subscription, by kind, awaited in order."""

    def __init__(self) -> None:
        self.queues: defaultdict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        self.counts: defaultdict[str, int] = defaultdict(int)

    def put(self, kind: str, ctx: Any) -> None:
        self.counts[kind] += 1
        self.queues[kind].put_nowait(ctx)

    async def next(self, kind: str) -> Any:
        return await asyncio.wait_for(self.queues[kind].get(), WAIT)

    async def take(self, kind: str, n: int) -> list[Any]:
        return [await self.next(kind) for _ in range(n)]

    def pending(self, kind: str) -> int:
        return self.queues[kind].qsize()


class ClientEvents(ClientEventHandler):
    def __init__(self, recorder: Recorder) -> None:
        self.r = recorder

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.r.put("connecting", ctx)

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.r.put("connected", ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.r.put("disconnected", ctx)

    async def on_error(self, ctx: ErrorContext) -> None:
        self.r.put("error", ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self.r.put("subscribed", ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.r.put("publication", ctx)


class SubEvents(SubscriptionEventHandler):
    def __init__(self, recorder: Recorder) -> None:
        self.r = recorder

    async def on_subscribing(self, ctx: SubscribingContext) -> None:
        self.r.put("subscribing", ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.r.put("subscribed", ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.r.put("unsubscribed", ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.r.put("publication", ctx)

    async def on_error(self, ctx: SubscriptionErrorContext) -> None:
        self.r.put("error", ctx)


def subscription(client: Client, channel: str, **options: Any) -> tuple[Any, Recorder]:
    recorder = Recorder()
    return client.new_subscription(channel, events=SubEvents(recorder), **options), recorder


def sdk_client(url: str, connect_token: str = "", **kwargs: Any) -> tuple[Client, Recorder]:
    """A centrifuge-python client of the hub at ``url`` (fast reconnects), with its recorder."""
    recorder = Recorder()
    client = Client(
        url,
        events=ClientEvents(recorder),
        token=connect_token,
        proxy=None,
        min_reconnect_delay=0.05,
        max_reconnect_delay=0.5,
        **kwargs,
    )
    return client, recorder
