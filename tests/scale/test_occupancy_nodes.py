"""``channel_occupied``/``channel_vacated`` webhooks across two ``eventcast serve`` nodes.

Over Redis and over NATS: one event of each per occupancy period whichever
node the members are on, also when members join and leave on both nodes at
once; and when a node is killed (SIGKILL), its share of a channel expires and
the surviving node sends ``channel_vacated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.server.apptools import listening_socket, serve_app
from tests.server.hubtools import RawClient, token
from tests.server.webhook_receiver import Receiver

from .conftest import drop_redis_keys, unique

SECRET = "whsec_" + "b2NjdXBhbmN5LWFjcm9zcy1ub2Rlcy1zZWNyZXQtMDEy"
#: How long a node's share lives unless refreshed (it refreshes every third of it).
TTL = 1.5


async def _drop_nats_buckets(url: str, prefix: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for bucket in ("presence", "occupancy"):
            with contextlib.suppress(Exception):  # the bucket may not exist
                await js.delete_key_value(f"{prefix}_{bucket}")
    finally:
        await nc.close()


async def _member(url: str, user: str, channel: str) -> RawClient:
    client = await RawClient.open(url)
    await client.connect(token(user))
    await client.subscribe(channel)
    return client


@pytest.mark.parametrize(
    "engine",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("nats", marks=pytest.mark.nats)],
)
async def test_one_occupied_and_one_vacated_across_two_nodes(
    engine: str, nodes: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{engine}_service")
    prefix = unique("occ")
    receiver = Receiver(SECRET)
    events = ("channel_occupied", "channel_vacated")

    def of(channel: str) -> list[tuple[str, str]]:
        return [(r["type"], r["node"]) for r in receiver.records if r["data"]["channel"] == channel]

    try:
        async with serve_app(receiver.app, listening_socket()) as base:
            first, second = await nodes(
                2,
                backplane_url=f"{url}?prefix={prefix}",
                log_url="memory://",
                presence_ttl=TTL,
                webhook_vacated_delay=0.2,
                webhook_backoff=0.05,
                webhooks=[{"url": f"{base}/hooks", "secret": SECRET, "events": list(events)}],
            )
            # Members come and go on both nodes: one event of each.
            a = await _member(first.ws_url, "a", "live:room")
            await receiver.wait(lambda: len(of("live:room")) == 1)
            b = await _member(second.ws_url, "b", "live:room")
            await a.close()
            await b.close()
            await receiver.wait(lambda: len(of("live:room")) == 2)
            # Whichever node gave its share up last sent it.
            assert [t for t, _ in of("live:room")] == list(events)
            assert of("live:room")[0] == ("channel_occupied", "node-0")

            # Both nodes at once: still one of each.
            members = await asyncio.gather(
                *(_member(n.ws_url, f"u{i}", "live:hall") for i, n in enumerate((first, second)))
            )
            await receiver.wait(lambda: len(of("live:hall")) == 1)
            await asyncio.gather(*(m.close() for m in members))
            await receiver.wait(lambda: len(of("live:hall")) == 2)

            # A node that crashes: its share expires, the other node vacates the channel.
            crashing = await _member(second.ws_url, "c", "live:crash")
            await receiver.wait(lambda: len(of("live:crash")) == 1)
            second.signal(signal.SIGKILL)
            await second.wait()
            await receiver.wait(lambda: len(of("live:crash")) == 2, timeout=4 * TTL + 5)
            with contextlib.suppress(Exception):
                await crashing.close()
            assert of("live:crash") == [
                ("channel_occupied", "node-1"),
                ("channel_vacated", "node-0"),
            ]
            # Nothing more came meanwhile (no second event of any period).
            assert [t for t, _ in of("live:hall")] == list(events)
            assert len(receiver.records) == 6
            assert all(r["valid"] for r in receiver.records)
            assert len({r["id"] for r in receiver.records}) == 6
    finally:
        if engine == "redis":
            drop_redis_keys(url, prefix)
        else:
            await _drop_nats_buckets(url, prefix)
