"""Redis Cluster: sharded pub/sub between nodes, on a private 3-master cluster."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis
from redis.crc import key_slot

from eventcast import Bus
from eventcast.server.presence import open_presence

from .conftest import RedisClusterServers as Cluster, unique, until

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _topics_on_every_shard(cluster: Cluster, prefix: str) -> list[str]:
    """Topic names whose channels hash to slots served by each of the three masters."""
    by_owner: dict[int, str] = {}
    n = 0
    while len(by_owner) < 3:
        topic = f"shard.t{n}"
        n += 1
        owner = cluster.owner(key_slot(f"{prefix}:{topic}".encode()))
        by_owner.setdefault(owner, topic)
    return sorted(by_owner.values())


async def test_sharded_pub_sub_delivers_across_nodes_on_every_shard(cluster: Cluster) -> None:
    prefix = unique("bp")
    url = f"redis+cluster://127.0.0.1:{cluster.seed}?prefix={prefix}"
    topics = _topics_on_every_shard(cluster, prefix)
    assert len({key_slot(f"{prefix}:{t}".encode()) for t in topics}) == 3
    async with Bus(backplane=url) as a, Bus(backplane=url) as b:
        assert a.backplane is not None
        assert b.backplane is not None
        subs_a = {topic: a.subscribe(topic) for topic in topics}
        subs_b = {topic: b.subscribe(topic) for topic in topics}
        everywhere = set(topics)
        await until(lambda: everywhere <= a.backplane.filters, "a's shard subscriptions")
        await until(lambda: everywhere <= b.backplane.filters, "b's shard subscriptions")
        # SSUBSCRIBE is answered by the shard that owns each channel: wait for them all.
        await until(
            lambda: _shard_subscribers(cluster, prefix, topics) == dict.fromkeys(topics, 2),
            "both nodes subscribed on every shard",
        )

        for round_ in range(3):
            for topic in topics:
                a.publish_nowait(topic, {"from": "a", "round": round_, "topic": topic})
                b.publish_nowait(topic, {"from": "b", "round": round_, "topic": topic})
        for subs, other in ((subs_a, "b"), (subs_b, "a")):
            for topic, sub in subs.items():
                got = []
                while len(got) < 6:
                    event = await asyncio.wait_for(sub.get(), 10)
                    got.append(event.data)
                # Three local, three from the other node, each once, in order per node.
                remote = [d for d in got if d["from"] == other]
                local = [d for d in got if d["from"] != other]
                assert [d["round"] for d in remote] == [0, 1, 2], got
                assert [d["round"] for d in local] == [0, 1, 2], got
                assert all(d["topic"] == topic for d in got)
        assert a.backplane_stats["undecodable"] == 0
        assert b.backplane_stats["undecodable"] == 0
        assert a.backplane.received >= 9
        assert b.backplane.received >= 9


def _shard_subscribers(cluster: Cluster, prefix: str, topics: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for topic in topics:
        channel = f"{prefix}:{topic}"
        client = redis.Redis(port=cluster.owner(key_slot(channel.encode())))
        try:
            [(_, count)] = client.execute_command("PUBSUB SHARDNUMSUB", channel)
            counts[topic] = int(count)
        finally:
            client.close()
    return counts


async def test_presence_on_redis_cluster_is_shared(cluster: Cluster) -> None:
    prefix = unique("pr")
    url = f"redis+cluster://127.0.0.1:{cluster.seed}"
    one = open_presence(url, prefix=prefix)
    two = open_presence(url, prefix=prefix)
    try:
        for n in range(3):
            await one.add(f"room{n}", "c1", {"client": "c1", "user": "alice"}, 60)
            await two.add(f"room{n}", "c2", {"client": "c2", "user": "bob"}, 60)
        for n in range(3):
            assert set(await one.get(f"room{n}")) == {"c1", "c2"}
            assert await two.stats(f"room{n}") == (2, 2)
        await two.remove("room0", "c2")
        assert set(await one.get("room0")) == {"c1"}
    finally:
        await one.close()
        await two.close()


async def test_channel_occupancy_on_redis_cluster(cluster: Cluster) -> None:
    """The occupancy keys share one hash tag, so each script's keys are in one slot."""
    from eventcast.server.occupancy import Change, occupancy_for

    url = f"redis+cluster://127.0.0.1:{cluster.seed}"
    prefix = unique("oc")
    presences = [open_presence(url, prefix=prefix) for _ in range(2)]
    one, two = (occupancy_for(p) for p in presences)
    try:
        for n in range(3):
            assert await one.join(f"room{n}", "n1", 60) is Change.OCCUPIED
            assert await two.join(f"room{n}", "n2", 60) is Change.NONE
            assert await one.leave(f"room{n}", "n1") is False
            assert await two.leave(f"room{n}", "n2") is True
        assert await one.join("brief", "n1", 0.2) is Change.OCCUPIED
        await asyncio.sleep(0.3)  # the subject is expiry by Redis's own clock
        assert await two.sweep() == ["brief"]
    finally:
        for presence in presences:
            await presence.close()


async def test_a_sharded_subscription_is_in_effect_once_routed(cluster: Cluster) -> None:
    """``Bus.routed`` returns only once the shard confirmed the SSUBSCRIBE (its reader got it).

    The shard that owns the channel is stopped (SIGSTOP) while node B
    subscribes: the command waits in the socket, so the subscription is sent
    but not made, and ``routed`` must not return until the shard answers.
    Then a publication from node A arrives at once.
    """
    prefix = unique("bp")
    url = f"redis+cluster://127.0.0.1:{cluster.seed}?prefix={prefix}"
    [topic, *_] = _topics_on_every_shard(cluster, prefix)
    owner = cluster.owner(key_slot(f"{prefix}:{topic}".encode()))
    [shard] = [server for server in cluster.servers if server.port == owner]
    async with Bus(backplane=url) as a, Bus(backplane=url) as b:
        sub = b.subscribe(topic)
        shard.process.send_signal(signal.SIGSTOP)
        try:
            routed = asyncio.ensure_future(b.routed(topic))
            await asyncio.sleep(0.5)
            assert not routed.done(), "routed before the shard answered"
        finally:
            shard.process.send_signal(signal.SIGCONT)
        await asyncio.wait_for(routed, 10)
        assert _shard_subscribers(cluster, prefix, [topic]) == {topic: 1}
        await a.publish(topic, {"topic": topic})
        event = await asyncio.wait_for(sub.get(), 10)
        assert event.data == {"topic": topic}


async def test_pattern_filters_receive_other_nodes_publications_once(cluster: Cluster) -> None:
    """Sharded pub/sub has no patterns and PSUBSCRIBE never sees SPUBLISH.

    Each publication also goes to a classic twin channel where pattern filters
    listen; a node with an exact and a pattern filter on one topic gets both
    copies and passes one on.
    """
    prefix = unique("bp")
    url = f"redis+cluster://127.0.0.1:{cluster.seed}?prefix={prefix}"
    topics = _topics_on_every_shard(cluster, prefix)
    async with Bus(backplane=url) as a, Bus(backplane=url) as b:
        pattern = b.subscribe("shard.>")
        exact = b.subscribe(topics[0])
        await b.routed("shard.>")
        await b.routed(topics[0])
        for round_ in range(3):
            for topic in topics:
                await a.publish(topic, {"topic": topic, "round": round_})
        got = [(await asyncio.wait_for(pattern.get(), 10)).data for _ in range(3 * len(topics))]
        # In order per topic (the order across topics is not kept: each twin
        # goes through the node that owns its channel's slot).
        for topic in topics:
            assert [d["round"] for d in got if d["topic"] == topic] == [0, 1, 2], got
        assert [(await asyncio.wait_for(exact.get(), 10)).data["round"] for _ in range(3)] == [
            0,
            1,
            2,
        ]
        await asyncio.sleep(0.2)  # a second copy would have arrived by now
        assert exact.buffered == 0
        assert pattern.buffered == 0
