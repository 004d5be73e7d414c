"""Client-side helpers of the scale-out tests: SDK subscribers that keep every offset."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from centrifuge import Client, StreamPosition

from tests.server.hubtools import WAIT, token
from tests.server.opstools import Clients, Recorder, subscription

_users = itertools.count()


@dataclass
class Subscriber:
    """One centrifuge-python client on one node, subscribed to some channels."""

    client: Client
    events: Recorder
    node: int
    subs: dict[str, tuple[Any, Recorder]] = field(default_factory=dict)
    #: Offsets received per channel, in arrival order (duplicates kept).
    offsets: dict[str, list[int]] = field(default_factory=dict)
    client_id: str = ""

    async def take(self, channel: str, n: int, timeout: float = WAIT) -> list[Any]:
        """The next ``n`` publications of a channel (their offsets are recorded)."""
        _, recorder = self.subs[channel]
        got = [await recorder.next("publication", timeout) for _ in range(n)]
        self.offsets.setdefault(channel, []).extend(ctx.pub.offset for ctx in got)
        return got

    async def take_until(self, channel: str, offset: int, timeout: float = WAIT) -> list[int]:
        """Read publications until one at ``offset`` (or later) arrives; return all offsets."""
        _, recorder = self.subs[channel]
        seen = self.offsets.setdefault(channel, [])
        start = len(seen)
        while not seen or seen[-1] < offset:
            ctx = await recorder.next("publication", timeout)
            seen.append(ctx.pub.offset)
        return seen[start:]

    def position(self, channel: str, epoch: str) -> StreamPosition:
        return StreamPosition(offset=self.offsets[channel][-1], epoch=epoch)


async def connect_subscriber(
    clients: Clients,
    url: str,
    node: int,
    channels: list[str],
    *,
    since: dict[str, StreamPosition] | None = None,
    **client_options: Any,
) -> tuple[Subscriber, dict[str, Any]]:
    """Connect a client to ``url`` and subscribe it to ``channels`` (recoverable).

    With ``since``, each subscription starts from that position (the SDK's
    ``get_state``), as a client that moved from another node would.
    Returns the subscriber and the ``subscribed`` context of each channel.
    """
    client, events = clients.new(url, token(f"user{next(_users)}"), **client_options)
    subscriber = Subscriber(client, events, node)
    for channel in channels:
        options: dict[str, Any] = {"recoverable": True, "positioned": True}
        if since is not None:
            position = since[channel]

            async def get_state(_: str, position: StreamPosition = position) -> StreamPosition:
                return position

            options["get_state"] = get_state
        subscriber.subs[channel] = subscription(client, channel, **options)
    await client.connect()
    connected = await events.next("connected")
    subscriber.client_id = connected.client
    subscribed: dict[str, Any] = {}
    for channel, (sub, recorder) in subscriber.subs.items():
        await sub.subscribe()
        subscribed[channel] = await recorder.next("subscribed")
    return subscriber, subscribed


def assert_exact(offsets: list[int], first: int, last: int, what: str) -> None:
    """Offsets are exactly ``first..last``: in order, each once."""
    assert offsets == list(range(first, last + 1)), f"{what}: {offsets}"


async def gather_all(*coros: Any) -> list[Any]:
    return list(await asyncio.gather(*coros))
