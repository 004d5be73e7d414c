"""Three ``eventcast serve`` processes sharing one backplane and one log.

Over Redis (log: PostgreSQL), over NATS (log: Redis Streams) and on NATS alone
(log: JetStream): clients spread over the nodes receive every publication made
through any node's HTTP API, once each and in offset order; a client moved from
one node to another recovers exactly what it missed; presence on one node lists
the clients of all.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.server.opstools import Clients

from .conftest import drop_redis_keys, unique
from .tools import Subscriber, assert_exact, connect_subscriber, gather_all

pytestmark = [pytest.mark.slow]

CHANNELS = ["scale.alpha", "scale.beta"]
ROUNDS = 15
MISSED = 6


async def _three_node_scenario(nodes: list[Any]) -> None:
    clients = Clients()
    try:
        # Two clients per node, each subscribed to both channels.
        subscribers: list[Subscriber] = []
        epochs: dict[str, str] = {}
        for index, node in enumerate(nodes):
            for _ in range(2):
                subscriber, subscribed = await connect_subscriber(
                    clients, node.ws_url, index, CHANNELS
                )
                for channel, ctx in subscribed.items():
                    assert ctx.stream_position is not None
                    assert ctx.stream_position.offset == 0
                    epochs.setdefault(channel, ctx.stream_position.epoch)
                    assert ctx.stream_position.epoch == epochs[channel]
                subscribers.append(subscriber)

        # Presence on node B lists the clients of all three nodes.
        for channel in CHANNELS:
            presence = await nodes[1].api("presence", channel=channel)
            assert set(presence["presence"]) == {s.client_id for s in subscribers}
            stats = await nodes[1].api("presence_stats", channel=channel)
            assert stats["num_clients"] == len(subscribers)

        # Publish round-robin through every node's API; offsets are 1..n per channel.
        published: dict[str, list[Any]] = {channel: [] for channel in CHANNELS}
        calls = 0
        for n in range(1, ROUNDS + 1):
            for channel in CHANNELS:
                node = nodes[calls % len(nodes)]
                calls += 1
                data = {"n": n, "channel": channel, "via": node.port}
                result = await node.api("publish", channel=channel, data=data)
                assert result == {"offset": n, "epoch": epochs[channel]}
                published[channel].append(data)

        async def check(subscriber: Subscriber) -> None:
            for channel in CHANNELS:
                got = await subscriber.take(channel, ROUNDS)
                assert [ctx.pub.data for ctx in got] == published[channel]
                assert_exact(subscriber.offsets[channel], 1, ROUNDS, channel)

        await gather_all(*(check(s) for s in subscribers))

        # A client moves from node A to node C, missing some publications on the way.
        mover = subscribers[0]
        assert mover.node == 0
        positions = {channel: mover.position(channel, epochs[channel]) for channel in CHANNELS}
        await mover.client.disconnect()
        subscribers.remove(mover)
        for n in range(ROUNDS + 1, ROUNDS + MISSED + 1):
            for channel in CHANNELS:
                node = nodes[calls % len(nodes)]
                calls += 1
                result = await node.api("publish", channel=channel, data={"n": n})
                assert result["offset"] == n

        moved, subscribed = await connect_subscriber(
            clients, nodes[2].ws_url, 2, CHANNELS, since=positions
        )
        for channel, ctx in subscribed.items():
            assert ctx.was_recovering, channel
            assert ctx.recovered, channel
            assert ctx.stream_position.offset == ROUNDS + MISSED
        for channel in CHANNELS:
            got = await moved.take(channel, MISSED)
            assert [ctx.pub.data for ctx in got] == [
                {"n": n} for n in range(ROUNDS + 1, ROUNDS + MISSED + 1)
            ]
        # The others got the same publications live.
        for subscriber in subscribers:
            for channel in CHANNELS:
                await subscriber.take(channel, MISSED)
        subscribers.append(moved)

        # Once each: a final publication per channel is the very next one everywhere.
        final = ROUNDS + MISSED + 1
        for channel in CHANNELS:
            result = await nodes[1].api("publish", channel=channel, data={"n": "final"})
            assert result["offset"] == final
        for subscriber in subscribers:
            for channel in CHANNELS:
                [last] = await subscriber.take(channel, 1)
                assert (last.pub.offset, last.pub.data) == (final, {"n": "final"})
                _, recorder = subscriber.subs[channel]
                assert recorder.pending("publication") == 0
        for subscriber in subscribers:
            first = ROUNDS + 1 if subscriber is moved else 1
            for channel in CHANNELS:
                assert_exact(subscriber.offsets[channel], first, final, channel)

        # The moved client is listed in presence, the one that left is not.
        presence = await nodes[1].api("presence", channel=CHANNELS[0])
        assert set(presence["presence"]) == {s.client_id for s in subscribers}
    finally:
        await clients.close()


@pytest.mark.redis
@pytest.mark.postgres
async def test_three_nodes_over_redis_with_a_postgres_log(
    nodes: Callable[..., Any], redis_service: str, pg_log_url: str
) -> None:
    prefix = unique("bp")
    try:
        started = await nodes(
            3, backplane_url=f"{redis_service}?prefix={prefix}", log_url=pg_log_url
        )
        await _three_node_scenario(started)
    finally:
        drop_redis_keys(redis_service, prefix)


@pytest.mark.nats
@pytest.mark.redis
async def test_three_nodes_over_nats_with_a_redis_streams_log(
    nodes: Callable[..., Any], nats_service: str, redis_log_url: str
) -> None:
    prefix = unique("bp")
    try:
        started = await nodes(
            3, backplane_url=f"{nats_service}?prefix={prefix}", log_url=redis_log_url
        )
        await _three_node_scenario(started)
        for node in started:  # they remove their presence entries as they stop
            node.signal(signal.SIGTERM)
        for node in started:
            assert await node.wait() == 0
    finally:
        await _delete_presence_bucket(nats_service, prefix)


@pytest.mark.nats
async def test_three_nodes_on_nats_alone_with_a_jetstream_log(
    nodes: Callable[..., Any], nats_service: str, js_log_url: str
) -> None:
    # A deployment on NATS alone: backplane, presence and the durable log.
    prefix = unique("bp")
    try:
        started = await nodes(
            3, backplane_url=f"{nats_service}?prefix={prefix}", log_url=js_log_url
        )
        await _three_node_scenario(started)
    finally:
        await _delete_presence_bucket(nats_service, prefix)


async def _delete_presence_bucket(url: str, prefix: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(Exception):  # the bucket may not exist
            await js.delete_key_value(f"{prefix}_presence")
    finally:
        await nc.close()
