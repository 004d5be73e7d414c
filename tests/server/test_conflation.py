"""Latest-value conflation (namespace ``conflation_key``) with real sockets.

A slow client is a WebSocket client that stops reading (``max_queue=1``: the
``websockets`` client then stops reading from its socket), with small socket
buffers on both ends so that what the hub writes piles up in the hub's
transport at once rather than in the kernel.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx

from .conftest import StartHub
from .hubtools import NAMESPACES, WAIT, HubServer, RawClient, token, until

QUEUE = 128 * 1024
TICKER = {
    "name": "tick",
    "history_size": 1000,
    "history_ttl": 300,
    "allow_subscribe_for_client": True,
    "conflation_key": "symbol",
}
UNCONFLATED = {**TICKER, "name": "flood", "conflation_key": None}
SYMBOLS = [f"S{n}" for n in range(10)]
FILLER = "x" * 2000


async def slow_client(server: HubServer, user: str) -> tuple[RawClient, Any]:
    """A connected client whose socket buffers are tiny; returns it and its hub connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.base.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    client = await RawClient.open(server.ws_url, sock=sock, max_queue=1)
    result = await client.connect(token(user))
    conn = server.hub.connections[result["client"]]
    conn._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return client, conn


async def publish_ticks(server: HubServer, channel: str, count: int) -> None:
    for n in range(count):
        symbol = SYMBOLS[n % len(SYMBOLS)]
        await server.hub.publish(
            channel, {"symbol": symbol, "n": n, "filler": FILLER}, tags={"symbol": symbol}
        )


async def test_a_slow_client_is_conflated_and_stays_current(start_hub: StartHub) -> None:
    server = await start_hub(
        namespaces=[*NAMESPACES, TICKER, UNCONFLATED], client_queue_bytes=QUEUE
    )
    channel = "tick:prices"
    count = 400
    async with await RawClient.open(server.ws_url) as fast:
        await fast.connect(token("fast"))
        await fast.subscribe(channel)
        slow, slow_conn = await slow_client(server, "slow")
        async with slow:
            await slow.subscribe(channel)
            fast_offsets: list[int] = []

            async def read_fast() -> None:
                while len(fast_offsets) < count:
                    fast_offsets.append((await fast.publication())["pub"]["offset"])

            reader = asyncio.ensure_future(read_fast())
            await publish_ticks(server, channel, count)
            await asyncio.wait_for(reader, WAIT)
            # The fast client saw every publication; the slow one is held back, not cut off.
            assert fast_offsets == list(range(1, count + 1))
            assert not slow_conn.closed
            membership = slow_conn.channels[channel]
            assert membership.backlog is not None
            assert len(membership.backlog) <= len(SYMBOLS)
            assert server.hub.channels.conflated > 0

            # The slow client reads again: it gets the newest value of every symbol.
            newest = {SYMBOLS[n % len(SYMBOLS)]: n + 1 for n in range(count)}
            seen: dict[str, int] = {}
            offsets: list[int] = []
            while seen != newest:
                pub = (await slow.publication())["pub"]
                offsets.append(pub["offset"])
                seen[pub["tags"]["symbol"]] = pub["offset"]
            assert offsets == sorted(set(offsets))  # in order, never twice
            assert len(offsets) < count  # the stale ones were skipped
            assert not slow_conn.closed
            await until(lambda: membership.backlog is None, "the backlog is released")

            # Once it has caught up, it sees every publication again.
            await server.hub.publish(channel, {"symbol": "S0", "n": count}, tags={"symbol": "S0"})
            assert (await slow.publication())["pub"]["offset"] == count + 1

    async with httpx.AsyncClient(timeout=WAIT) as client:
        metrics = (await client.get(f"{server.base}/metrics")).text
    conflated = server.hub.channels.conflated
    assert f"eventcast_publications_conflated_total {float(conflated)}" in metrics


async def test_without_conflation_a_slow_client_is_disconnected(start_hub: StartHub) -> None:
    server = await start_hub(namespaces=[*NAMESPACES, UNCONFLATED], client_queue_bytes=QUEUE)
    slow, slow_conn = await slow_client(server, "slow")
    async with slow:
        await slow.subscribe("flood:prices")
        await publish_ticks(server, "flood:prices", 200)
        await until(lambda: slow_conn.closed, "the slow client is closed")
        assert slow_conn.disconnect.code == 3008
