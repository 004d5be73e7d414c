"""The control plane on three ``eventcast serve`` processes: every action sent to node A
takes effect on a client connected to node C.

Over Redis (log: PostgreSQL), NATS alone (a memory log per node: blocks are
kept in a JetStream KV bucket) and a private Redis Cluster (log: PostgreSQL),
a client on C sees the unsubscribe push, the
subscribe push and then the new subscription's publications, the refresh
push with the longer expiry, the disconnect code; ``channels`` on A counts
C's subscribers; a blocked user and a revoked token are closed on C and
refused by every node, also after every node restarted; a node killed with
SIGKILL leaves ``info`` within its timeout. Each answer of A names no missing
node: every node applied the action within ``cluster_request_timeout`` (1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.server.hubtools import RawClient, token

from .conftest import Node, drop_redis_keys, redis_cluster, unique, until

pytestmark = [pytest.mark.slow]

#: Timings of the test nodes: a node is dropped 2 s after its last heartbeat.
TIMINGS: dict[str, Any] = {
    "cluster_heartbeat": 0.3,
    "cluster_node_timeout": 2.0,
    "cluster_request_timeout": 1.0,
}


async def push(client: RawClient, kind: str) -> dict[str, Any]:
    """The next push of ``kind`` (other messages are skipped)."""
    while True:
        body = (await client.message()).get("push")
        if body is not None and kind in body:
            return body  # type: ignore[no-any-return]


async def refused(node: Node, connect_token: str) -> tuple[int | None, str]:
    """Connect with a token the node refuses; return the close code and reason."""
    client = await RawClient.open(node.ws_url)
    await client.command("connect", {"token": connect_token})
    return await client.closed()


async def info_names(node: Node) -> list[str]:
    return sorted(n["name"] for n in (await node.api("info"))["nodes"])


async def _control_scenario(nodes: list[Node]) -> None:
    a, b, c = nodes
    everyone = ["node-0", "node-1", "node-2"]
    await until(lambda: _all_know(nodes, everyone), "every node lists every node")
    clients: list[RawClient] = []

    async def on(node: Node, connect_token: str) -> RawClient:
        client = await RawClient.open(node.ws_url)
        clients.append(client)
        await client.connect(connect_token)
        return client

    try:
        # unsubscribe: the client on C gets the unsubscribe push.
        carol = await on(c, token("carol", ttl=120))
        await carol.subscribe("live:old")
        assert await a.api("unsubscribe", user="carol", channel="live:old") == {}
        assert (await push(carol, "unsubscribe"))["unsubscribe"]["code"] == 2000

        # subscribe: the subscribe push, then the new subscription's publications.
        assert await a.api("subscribe", user="carol", channel="live:new") == {}
        assert (await push(carol, "subscribe"))["channel"] == "live:new"
        await b.api("publish", channel="live:new", data={"via": "b"})
        assert (await carol.publication())["pub"]["data"] == {"via": "b"}

        # refresh: the longer expiry.
        later = int(time.time()) + 7200
        assert await a.api("refresh", user="carol", expire_at=later) == {}
        assert 7100 <= (await push(carol, "refresh"))["refresh"]["ttl"] <= 7200

        # channels: C's subscribers are counted on A.
        other = await on(b, token("dan"))
        await other.subscribe("live:new")
        assert (await a.api("channels", pattern="live:*"))["channels"] == {
            "live:new": {"num_clients": 2}
        }

        # disconnect: the code A was given.
        assert (
            await a.api("disconnect", user="carol", disconnect={"code": 4001, "reason": "x"}) == {}
        )
        assert await carol.closed() == (4001, "x")

        # block_user: closed on C, refused by every node.
        mallory = await on(c, token("mallory"))
        assert await a.api("block_user", user="mallory") == {}
        assert await mallory.closed() == (3503, "blocked")
        # revoke_token: the connection made with it is closed.
        peggy = await on(c, token("peggy", token_id="jti-peggy"))
        assert await a.api("revoke_token", uid="jti-peggy") == {}
        assert await peggy.closed() == (3500, "token revoked")
        for node in nodes:
            assert await refused(node, token("mallory")) == (3503, "blocked")
    finally:
        for client in clients:
            await client.close()

    # Every node restarts: the block and the revocation are still there.
    for node in nodes:
        node.signal(signal.SIGTERM)
    for node in nodes:
        assert await node.wait() == 0
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
    await until(lambda: _all_know(nodes, everyone), "every node lists every node again")
    for node in nodes:
        assert await refused(node, token("mallory")) == (3503, "blocked")
        assert await refused(node, token("peggy", token_id="jti-peggy")) == (
            3500,
            "token revoked",
        )

    # SIGKILL: no goodbye; the others drop the node within its timeout.
    b.signal(signal.SIGKILL)
    killed = time.monotonic()
    await until(
        lambda: _all_know([a, c], ["node-0", "node-2"]), "B leaves info on A and C", timeout=10
    )
    gone = time.monotonic() - killed
    assert gone < TIMINGS["cluster_node_timeout"] + 2 * TIMINGS["cluster_heartbeat"] + 1.0
    # Meanwhile an action answers for the live nodes, and names none missing.
    assert await a.api("unblock_user", user="mallory") == {}
    client = await RawClient.open(c.ws_url)
    await client.connect(token("mallory"))
    await client.close()


async def _all_know(nodes: list[Node], names: list[str]) -> bool:
    for node in nodes:
        if await info_names(node) != names:
            return False
    return True


@pytest.mark.redis
@pytest.mark.postgres
async def test_control_plane_over_redis(
    nodes: Callable[..., Any], redis_service: str, pg_log_url: str
) -> None:
    prefix = unique("bp")
    try:
        started = await nodes(
            3, backplane_url=f"{redis_service}?prefix={prefix}", log_url=pg_log_url, **TIMINGS
        )
        await _control_scenario(started)
    finally:
        drop_redis_keys(redis_service, prefix)


@pytest.mark.nats
async def test_control_plane_over_nats_alone(nodes: Callable[..., Any], nats_service: str) -> None:
    """NATS and nothing else (a memory log per node): blocks live in a JetStream KV bucket."""
    prefix = unique("bp")
    try:
        started = await nodes(
            3, backplane_url=f"{nats_service}?prefix={prefix}", log_url="memory://", **TIMINGS
        )
        await _control_scenario(started)
    finally:
        await _delete_buckets(nats_service, prefix)


async def _delete_buckets(url: str, prefix: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for bucket in ("presence", "access"):
            with contextlib.suppress(Exception):  # the bucket may not exist
                await js.delete_key_value(f"{prefix}_{bucket}")
    finally:
        await nc.close()


@pytest.mark.postgres
async def test_control_plane_over_redis_cluster(
    nodes: Callable[..., Any], pg_log_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "redis-cluster"
    directory.mkdir()
    with redis_cluster(directory) as cluster:
        url = f"redis+cluster://127.0.0.1:{cluster.seed}?prefix={unique('bp')}"
        started = await nodes(3, backplane_url=url, log_url=pg_log_url, **TIMINGS)
        try:
            await _control_scenario(started)
        finally:
            for node in started:  # before the cluster they use goes away
                if node.process is not None and node.process.poll() is None:
                    node.signal(signal.SIGTERM)
                    await node.wait()
