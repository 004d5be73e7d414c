"""Three hubs in one process sharing a real backplane: every action and answer covers every node.

Each hub is the real server on a real socket (``start_hub``); they share a
Redis or a NATS server under a prefix of the test's own. An action sent to
node A through the HTTP API (or the Python ``Hub``) takes effect on a client
connected to node C, and A's answer names no missing node, so every node
applied it within ``cluster_request_timeout``. ``tests/scale/test_control.py``
runs the same on three ``eventcast serve`` processes.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest

from eventcast.server.cluster import channel_glob
from eventcast.server.errors import CommandError
from eventcast.server.user_limit import USER_CONNECTIONS
from tests.conftest import RUN_ID
from tests.scale.conftest import drop_redis_keys, until

from .conftest import StartHub
from .hubtools import SECRET, WAIT, HubServer, RawClient, token
from .ssetools import Retry, open_sse

StartNodes = Callable[..., Awaitable[list[HubServer]]]

_prefixes = itertools.count()

#: Cluster timings of the test nodes: quick heartbeats, a node dropped after 1.5 s.
FAST = {"cluster_heartbeat": 0.2, "cluster_node_timeout": 1.5, "cluster_request_timeout": 2.0}


async def _drop_nats_buckets(url: str, prefix: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for bucket in ("presence", "access"):
            with contextlib.suppress(Exception):  # the bucket may not exist
                await js.delete_key_value(f"{prefix}_{bucket}")
    finally:
        await nc.close()


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("nats", marks=pytest.mark.nats),
    ]
)
async def start_nodes(
    request: pytest.FixtureRequest, start_hub: StartHub
) -> AsyncIterator[StartNodes]:
    """Start hubs sharing one backplane (``await start_nodes(3, **settings)``)."""
    service: str = request.getfixturevalue(f"{request.param}_service")
    prefix = f"ectest_{RUN_ID}_n{next(_prefixes)}"
    started: list[HubServer] = []

    async def start(count: int = 3, **overrides: Any) -> list[HubServer]:
        servers = []
        for _ in range(count):
            server = await start_hub(
                backplane_url=f"{service}?prefix={prefix}",
                node_name=f"node-{len(started)}",
                **{**FAST, **overrides},
            )
            started.append(server)
            servers.append(server)
        await until(
            lambda: all(len(s.hub.cluster.nodes) == len(started) - 1 for s in started),
            "every node knows the others",
        )
        return servers

    try:
        yield start
    finally:
        for server in started:
            await server.hub.close()
        if request.param == "redis":
            drop_redis_keys(service, prefix)
        else:
            await _drop_nats_buckets(service, prefix)


OpenClient = Callable[..., Awaitable[tuple[RawClient, str]]]


@pytest.fixture
async def open_client() -> AsyncIterator[OpenClient]:
    """Connect raw protocol clients (``client, client_id = await open_client(server, token)``)."""
    opened: list[RawClient] = []

    async def open_(server: HubServer, connect_token: str) -> tuple[RawClient, str]:
        client = await RawClient.open(server.ws_url)
        opened.append(client)
        result = await client.connect(connect_token)
        return client, result["client"]

    yield open_
    for client in opened:
        await client.close()


async def refused(server: HubServer, connect_token: str) -> tuple[int | None, str]:
    """Connect with a token the node refuses; return the close code and reason."""
    client = await RawClient.open(server.ws_url)
    await client.command("connect", {"token": connect_token})
    return await client.closed()


async def push(client: RawClient, kind: str) -> dict[str, Any]:
    """The next push of ``kind`` (other messages are skipped)."""
    while True:
        message = await client.message()
        body = message.get("push")
        if body is not None and kind in body:
            return body  # type: ignore[no-any-return]


async def test_info_lists_every_node_with_its_figures(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, b, c = await start_nodes(3)
    client, _ = await open_client(c, token("alice"))
    await client.subscribe("live:news")
    for server in (a, b, c):
        await until(lambda server=server: _node(server, "node-2")["num_subs"] == 1, "C's heartbeat")
    info = await a.api("info")
    assert [n["name"] for n in info["nodes"]] == ["node-0", "node-1", "node-2"]
    assert len({n["uid"] for n in info["nodes"]}) == 3
    for node in info["nodes"]:
        assert set(node) == {
            "uid",
            "name",
            "version",
            "uptime",
            "num_clients",
            "num_users",
            "num_channels",
            "num_subs",
        }
    node_c = _node(a, "node-2")
    assert (node_c["num_clients"], node_c["num_users"], node_c["num_channels"]) == (1, 1, 1)
    text = await _metrics(a)
    assert "eventcast_cluster_nodes 3.0" in text


def _node(server: HubServer, name: str) -> dict[str, Any]:
    return next(n for n in server.hub.cluster.info() if n["name"] == name)


async def _metrics(server: HubServer) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=WAIT) as http:
        return (await http.get(f"{server.base}/metrics")).text


async def test_disconnect_sent_to_a_closes_the_connection_on_c(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, b, c = await start_nodes(3)
    on_b, _ = await open_client(b, token("bob"))
    on_c, _ = await open_client(c, token("bob"))
    kept, kept_id = await open_client(c, token("bob"))
    # The whitelisted connection stays; the others, on B and C, are closed.
    answer = await a.api(
        "disconnect", user="bob", disconnect={"code": 4000, "reason": "bye"}, whitelist=[kept_id]
    )
    assert answer == {}
    assert await on_c.closed() == (4000, "bye")
    assert await on_b.closed() == (4000, "bye")
    assert "error" not in await kept.request("ping")
    # The Python Hub method does the same from another node, and counts.
    assert await b.hub.disconnect_user("bob") == 1
    assert await kept.closed() == (3503, "force disconnect")


async def test_unsubscribe_and_subscribe_sent_to_a_reach_a_client_on_c(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, _, c = await start_nodes(3)
    client, _ = await open_client(c, token("carol"))
    await client.subscribe("live:old")
    assert await a.api("unsubscribe", user="carol", channel="live:old") == {}
    unsubscribed = await push(client, "unsubscribe")
    assert unsubscribed == {
        "channel": "live:old",
        "unsubscribe": {"code": 2000, "reason": "server unsubscribe"},
    }
    assert await a.api("subscribe", user="carol", channel="live:new") == {}
    subscribed = await push(client, "subscribe")
    assert subscribed["channel"] == "live:new"
    await a.publish("live:new", {"hello": "carol"})
    publication = await client.publication()
    assert (publication["channel"], publication["pub"]["data"]) == ("live:new", {"hello": "carol"})
    # Python: the count is the cluster's.
    assert await a.hub.unsubscribe_user("carol", "live:new") == 1
    assert await a.hub.subscribe_user("carol", "live:again") == 1


async def test_refresh_and_message_sent_to_a_reach_a_client_on_c(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, _, c = await start_nodes(3)
    client, _ = await open_client(c, token("dave", ttl=60))
    later = int(time.time()) + 3600
    assert await a.api("refresh", user="dave", expire_at=later) == {}
    refresh = (await push(client, "refresh"))["refresh"]
    assert refresh["expires"] is True
    assert 3500 <= refresh["ttl"] <= 3600
    (conn,) = c.hub.registry.of("dave")
    assert conn.expires_at == later
    assert await a.hub.send_message("dave", {"note": 1}) == 1
    assert (await push(client, "message"))["message"] == {"data": {"note": 1}}
    assert await a.api("refresh", user="dave", expired=True) == {}
    assert await client.closed() == (3005, "connection expired")


async def test_channels_answers_for_every_node_and_names_the_silent_ones(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, b, c = await start_nodes(3)
    for server, channels in ((a, ["live:x"]), (b, ["live:x", "live:y"]), (c, ["live:y", "z"])):
        client, _ = await open_client(server, token("erin"))
        for channel in channels:
            await client.subscribe(channel)
    result = await b.api("channels")
    assert result == {
        "channels": {
            "live:x": {"num_clients": 2},
            "live:y": {"num_clients": 2},
            "z": {"num_clients": 1},
        }
    }
    assert await c.api("channels", pattern="live:*") == {
        "channels": {"live:x": {"num_clients": 2}, "live:y": {"num_clients": 2}}
    }
    assert (await a.api("channels", pattern="{z,live:y}"))["channels"] == {
        "live:y": {"num_clients": 2},
        "z": {"num_clients": 1},
    }
    # C stops answering (it still sends heartbeats): it is named, not left out silently.
    c.hub.bus.cluster_listeners.remove(c.hub.cluster.table._receive)
    started = time.monotonic()
    result = await a.api("channels")
    assert time.monotonic() - started < FAST["cluster_request_timeout"] + 1
    uid = c.hub.cluster.node_id
    assert result["missing_nodes"] == [f"node-2 ({uid})"]
    assert result["channels"] == {"live:x": {"num_clients": 2}, "live:y": {"num_clients": 1}}


async def test_a_node_that_stops_is_dropped_at_once_and_a_silent_one_after_its_timeout(
    start_nodes: StartNodes,
) -> None:
    a, b, c = await start_nodes(3)
    await c.hub.close()  # says goodbye
    await until(lambda: len(a.hub.cluster.nodes) == 1, "A drops C", timeout=1.0)
    # B's heartbeats stop (as if it hung): dropped after cluster_node_timeout.
    (beat,) = [t for t in b.hub.tasks.tasks if t.get_name() == "eventcast-heartbeat"]
    beat.cancel()
    started = time.monotonic()
    await until(lambda: not a.hub.cluster.nodes, "A drops B")
    elapsed = time.monotonic() - started
    assert FAST["cluster_node_timeout"] - 0.5 < elapsed < FAST["cluster_node_timeout"] + 1.5
    assert [n["name"] for n in (await a.api("info"))["nodes"]] == ["node-0"]


async def test_connections_per_user_counts_every_node(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, b, c = await start_nodes(3, connections_per_user=2)
    first, _ = await open_client(a, token("frank"))
    await open_client(b, token("frank"))
    assert await refused(c, token("frank")) == (3504, "connection limit")
    # A connection that ends frees its place on every node.
    await first.close()
    await until(lambda: not a.hub.registry.of("frank"), "A forgets frank's first connection")
    presence = c.hub.presence
    await until(lambda: _count(presence.get(USER_CONNECTIONS + "frank"), 1), "one entry left")
    fourth, _ = await open_client(c, token("frank"))
    assert "error" not in await fourth.request("ping")


async def _count(entries: Awaitable[dict[str, Any]], n: int) -> bool:
    return len(await entries) == n


async def test_a_blocked_user_is_closed_everywhere_and_refused_until_unblocked(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, b, c = await start_nodes(3)
    on_c, _ = await open_client(c, token("mallory"))
    other, _ = await open_client(c, token("trent"))
    assert await a.api("block_user", user="mallory", expire_at=int(time.time()) + 600) == {}
    assert await on_c.closed() == (3503, "blocked")
    assert "error" not in await other.request("ping")
    for server in (a, b, c):
        assert await refused(server, token("mallory")) == (3503, "blocked")
    assert await b.api("unblock_user", user="mallory") == {}
    again, _ = await open_client(c, token("mallory"))
    assert "error" not in await again.request("ping")


async def test_a_revoked_token_is_closed_everywhere_and_refused(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, _, c = await start_nodes(3)
    revoked = token("peggy", token_id="t-1")
    on_c, _ = await open_client(c, revoked)
    fine, _ = await open_client(c, token("peggy", token_id="t-2"))
    assert await a.api("revoke_token", uid="t-1") == {}
    assert await on_c.closed() == (3500, "token revoked")
    assert "error" not in await fine.request("ping")
    assert await refused(a, revoked) == (3500, "token revoked")


def _token_issued(user: str, issued_at: float, **claims: Any) -> str:
    payload = {"sub": user, "iat": int(issued_at), "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


async def test_invalidated_user_tokens_are_closed_everywhere_and_new_ones_accepted(
    start_nodes: StartNodes, open_client: OpenClient
) -> None:
    a, _, c = await start_nodes(3)
    now = time.time()
    old, _ = await open_client(c, _token_issued("victor", now - 100))
    subscribed, _ = await open_client(c, _token_issued("wendy", now))
    old_token = _token_issued("wendy", now - 100, channel="priv:room")
    await subscribed.subscribe("priv:room", token=old_token)
    assert await a.api("invalidate_user_tokens", user="victor", issued_before=int(now - 50)) == {}
    assert await old.closed() == (3500, "token revoked")
    fresh, _ = await open_client(c, _token_issued("victor", now))
    assert "error" not in await fresh.request("ping")
    # With a channel: that channel's subscription tokens, not the connection.
    assert (
        await a.api(
            "invalidate_user_tokens", user="wendy", channel="priv:room", issued_before=int(now - 50)
        )
        == {}
    )
    assert await push(subscribed, "unsubscribe") == {
        "channel": "priv:room",
        "unsubscribe": {"code": 2000, "reason": "token revoked"},
    }
    reply = await subscribed.request("subscribe", {"channel": "priv:room", "token": old_token})
    assert reply["error"] == {"code": 103, "message": "token revoked"}
    await subscribed.subscribe("priv:room", token=_token_issued("wendy", now, channel="priv:room"))


@pytest.mark.parametrize(
    ("pattern", "matches", "others"),
    [
        ("", ["a", "chat:room.1"], []),
        ("chat:*", ["chat:", "chat:room.1", "chat:a:b"], ["chat", "news"]),
        ("*.1", ["chat:room.1", "x.1"], ["x.10", "x.2"]),
        ("room.?", ["room.1", "room.x"], ["room.", "room.10"]),
        ("room.[12]", ["room.1", "room.2"], ["room.3"]),
        ("room.[!12]", ["room.3"], ["room.1"]),
        ("room.[a-c]", ["room.b"], ["room.d"]),
        ("{chat,news}:*", ["chat:x", "news:y"], ["sport:z"]),
        ("a\\*b", ["a*b"], ["axb"]),
        ("a{b,{c,d}}e", ["abe", "ace", "ade"], ["ae", "abde"]),
    ],
)
def test_the_channels_pattern_matches_as_centrifugo_does(
    pattern: str, matches: list[str], others: list[str]
) -> None:
    match = channel_glob(pattern)
    assert all(match(name) for name in matches)
    assert not any(match(name) for name in others)


@pytest.mark.parametrize("pattern", ["[abc", "a{b,c", "trailing\\", "x" * 1025])
def test_a_malformed_channels_pattern_is_a_bad_request(pattern: str) -> None:
    with pytest.raises(CommandError) as raised:
        channel_glob(pattern)
    assert raised.value.code == 107


async def test_a_blocked_users_sse_stream_ends_and_a_new_one_is_refused(
    start_nodes: StartNodes,
) -> None:
    a, _, c = await start_nodes(3)
    async with open_sse(c.base, ["live:feed"], token=token("oscar")) as stream:
        assert stream.status == 200
        await stream.subscribed()
        assert await a.hub.block_user("oscar") == 1
        rest = await stream.rest()  # C ends the response
        assert isinstance(rest[-1], Retry)
    async with open_sse(a.base, ["live:feed"], token=token("oscar")) as refused_stream:
        assert refused_stream.status == 401
        assert refused_stream.response.json() == {"error": "blocked"}
