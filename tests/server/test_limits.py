"""Each limit exceeded with the right code, while a neighbouring connection keeps working.

The rate limits run on a fake clock (the hub's token buckets are built with it),
so "a burst" means exactly the configured number of tokens, whatever the speed
of the machine.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from eventcast.server import commands as commands_module, hub as hub_module
from eventcast.server.limits import TokenBucket, origin_allowed

from .conftest import StartHub
from .hubtools import WAIT, HubServer, RawClient, token
from .opstools import FakeClock

OpenClient = Callable[..., Awaitable[RawClient]]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Make the hub's token buckets (connection and command rates) run on a fake clock."""
    fake = FakeClock()
    bucket = functools.partial(TokenBucket, clock=fake)
    monkeypatch.setattr(hub_module, "TokenBucket", bucket)  # the connection rate
    monkeypatch.setattr(commands_module, "TokenBucket", bucket)  # the command rates
    return fake


@pytest.fixture
async def open_client() -> AsyncIterator[OpenClient]:
    """Open raw protocol clients; close them after the test."""
    opened: list[RawClient] = []

    async def open_(url: str, **kwargs: Any) -> RawClient:
        client = await RawClient.open(url, **kwargs)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        await client.close()


async def neighbour(server: HubServer, open_client: OpenClient, channel: str) -> RawClient:
    """Another user's connection, subscribed to ``channel``."""
    client = await open_client(server.ws_url)
    await client.connect(token("neighbour"))
    await client.subscribe(channel)
    return client


async def still_works(server: HubServer, channel: str, *clients: RawClient) -> None:
    """Each of ``clients`` still receives the next publication on ``channel``."""
    result = await server.publish(channel, {"still": "works"})
    for client in clients:
        push = await client.publication()
        assert push["channel"] == channel
        assert push["pub"]["data"] == {"still": "works"}
        assert push["pub"]["offset"] == result["offset"]


async def sse_status(server: HubServer, **headers: str) -> int:
    """The status of an SSE handshake (a stream that opens is closed at once)."""
    async with (
        httpx.AsyncClient(timeout=WAIT) as http,
        http.stream(
            "GET",
            f"{server.base}/connection/sse",
            params={"topic": "news"},
            headers={"Authorization": f"Bearer {token('sse-user')}", **headers},
        ) as response,
    ):
        return response.status_code


async def test_channels_per_connection(start_hub: StartHub, open_client: OpenClient) -> None:
    server = await start_hub(channels_per_connection=2)
    other = await neighbour(server, open_client, "news.limit")
    await other.subscribe("news.other")  # the neighbour is at its limit too

    client = await open_client(server.ws_url)
    await client.connect(token("alice"))
    await client.subscribe("news.limit")
    await client.subscribe("news.b")
    reply = await client.request("subscribe", {"channel": "news.c"})
    assert reply["error"]["code"] == 106
    assert reply["error"]["message"] == "channel limit"
    assert "news.c" not in (await server.api("channels"))["channels"]

    # An error reply, not a disconnect: both connections still get publications.
    await still_works(server, "news.limit", client, other)
    # Leaving a channel makes room for another.
    assert "error" not in await client.request("unsubscribe", {"channel": "news.b"})
    await client.subscribe("news.c")
    await still_works(server, "news.c", client)


async def test_connections_per_user(start_hub: StartHub, open_client: OpenClient) -> None:
    server = await start_hub(connections_per_user=1)
    other = await neighbour(server, open_client, "news.users")
    first = await open_client(server.ws_url)
    first_id = (await first.connect(token("alice")))["client"]
    await first.subscribe("news.users")

    second = await open_client(server.ws_url)
    await second.command("connect", {"token": token("alice")})
    assert await second.closed() == (3504, "connection limit")

    await still_works(server, "news.users", first, other)

    # The limit counts live connections: once the first is gone, alice may connect.
    conn = server.hub.connections[first_id]
    await first.close()
    await conn.wait_closed()
    third = await open_client(server.ws_url)
    assert (await third.connect(token("alice")))["client"] != first_id


async def test_connections_per_user_does_not_count_anonymous_clients(
    start_hub: StartHub, open_client: OpenClient
) -> None:
    """Anonymous clients have no user id: they are not one user sharing one budget."""
    server = await start_hub(connections_per_user=1, allow_anonymous=True)
    clients = [await open_client(server.ws_url) for _ in range(3)]
    ids = {(await client.connect())["client"] for client in clients}
    assert len(ids) == 3
    assert len(server.hub.connections) == 3


async def test_connection_rate_websocket_and_sse(
    start_hub: StartHub, open_client: OpenClient, clock: FakeClock
) -> None:
    server = await start_hub(connection_rate=2)  # burst: 2 handshakes
    other = await neighbour(server, open_client, "news.rate")  # handshake 1
    await open_client(server.ws_url)  # handshake 2

    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws_url, open_timeout=WAIT):
            pass
    assert refused.value.response.status_code == 429
    assert await sse_status(server) == 429
    assert server.hub.refused["rate"] == 2
    await still_works(server, "news.rate", other)

    # Half a second later there is a token for one more handshake.
    clock.advance(0.5)
    client = await open_client(server.ws_url)
    await client.connect(token("late"))
    with pytest.raises(InvalidStatus) as again:
        async with connect(server.ws_url, open_timeout=WAIT):
            pass
    assert again.value.response.status_code == 429
    clock.advance(0.5)
    assert await sse_status(server) == 200


async def test_command_rate_per_connection(
    start_hub: StartHub, open_client: OpenClient, clock: FakeClock
) -> None:
    server = await start_hub(command_rate=5)
    other = await neighbour(server, open_client, "news.cmd")
    client = await open_client(server.ws_url)
    await client.connect(token("alice"))
    await client.subscribe("news.cmd")  # command 1

    # A burst of commands: 4 tokens are left, then error 111 (temporary).
    ids = [await client.command("history", {"channel": "news.cmd"}) for _ in range(16)]
    replies = [await client.reply(i) for i in ids]
    assert all("history" in r for r in replies[:4]), replies[:4]
    for reply in replies[4:]:
        assert reply["error"] == {"code": 111, "message": "too many requests", "temporary": True}

    # The limit is per connection: the neighbour's commands are not affected.
    assert "history" in await other.request("history", {"channel": "news.cmd"})
    # Rejected commands are not the client's fault: still connected, still delivered to.
    await still_works(server, "news.cmd", client, other)
    clock.advance(1)
    assert "history" in await client.request("history", {"channel": "news.cmd"})


async def test_user_command_rate_is_shared_by_the_users_connections(
    start_hub: StartHub, open_client: OpenClient, clock: FakeClock
) -> None:
    server = await start_hub(command_rate=100, user_command_rate=4)
    other = await neighbour(server, open_client, "news.user")
    first = await open_client(server.ws_url)
    second = await open_client(server.ws_url)
    await first.connect(token("alice"))
    await second.connect(token("alice"))

    await first.subscribe("news.user")  # alice's tokens: 4 -> 3
    await second.subscribe("news.user")  # 3 -> 2
    assert "history" in await first.request("history", {"channel": "news.user"})  # 1
    assert "history" in await second.request("history", {"channel": "news.user"})  # 0
    for client in (first, second):
        reply = await client.request("history", {"channel": "news.user"})
        assert reply["error"]["code"] == 111

    # Another user has a budget of its own.
    assert "history" in await other.request("history", {"channel": "news.user"})
    await still_works(server, "news.user", other, first, second)
    clock.advance(0.25)  # one token for alice
    assert "history" in await second.request("history", {"channel": "news.user"})
    assert (await first.request("history", {"channel": "news.user"}))["error"]["code"] == 111


async def test_origin_allowlist(start_hub: StartHub, open_client: OpenClient) -> None:
    server = await start_hub(allowed_origins=["http://good.example"])
    other = await neighbour(server, open_client, "news.origin")  # no Origin header: allowed

    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws_url, origin="http://evil.example", open_timeout=WAIT):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    assert await sse_status(server, Origin="http://evil.example") == 403
    assert server.hub.refused["origin"] == 2

    good = await open_client(server.ws_url, origin="http://good.example")
    await good.connect(token("alice"))
    await good.subscribe("news.origin")
    await still_works(server, "news.origin", good, other)


# -- the pieces, without I/O --------------------------------------------------------------


def test_token_bucket_burst_and_refill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2, clock=clock)  # burst: one second's worth
    assert bucket.burst == 2
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.advance(0.25)
    assert not bucket.take()  # half a token
    clock.advance(0.25)
    assert bucket.take()
    assert not bucket.take()
    clock.advance(100)  # refills up to the burst only
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_token_bucket_explicit_burst_and_weights() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1, burst=5, clock=clock)
    assert bucket.take(3)
    assert not bucket.take(3)  # 2 left: a failed take takes nothing
    assert bucket.take(2)
    clock.advance(1)
    assert bucket.take()
    # A rate below one per second still holds one token.
    slow = TokenBucket(0.1, clock=clock)
    assert slow.burst == 1
    assert slow.take()
    assert not slow.take()
    clock.advance(10)
    assert slow.take()


@pytest.mark.parametrize("rate", [0, -1])
def test_token_bucket_rejects_a_rate_that_is_not_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        TokenBucket(rate)


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        (None, "hub.example", [], True),  # not a browser
        (None, None, ["http://good.example"], True),
        ("http://good.example", "hub.example", ["http://good.example"], True),
        ("http://evil.example", "hub.example", ["http://good.example"], False),
        ("https://good.example", "hub.example", ["http://good.example"], False),  # scheme
        ("http://good.example:8080", "hub.example", ["http://good.example"], False),  # port
        ("http://anything.example", "hub.example", ["*"], True),
        ("http://hub.example:8000", "hub.example:8000", [], True),  # same origin
        ("http://HUB.example:8000", "hub.example:8000", [], True),
        ("http://hub.example", "hub.example:8000", [], False),
        ("http://other.example", "hub.example", [], False),
        ("http://other.example", None, [], False),
        # With an allowlist, the same origin must be listed too.
        ("http://hub.example", "hub.example", ["http://good.example"], False),
    ],
)
def test_origin_allowed(
    origin: str | None, host: str | None, allowed: list[str], expected: bool
) -> None:
    assert origin_allowed(origin, host, allowed) is expected
