"""Bidirectional emulation at the byte level: HTTP-streaming, SSE emulation, ``POST /emulation``.

centrifuge-js over these transports is in test_centrifuge_js.py; here a raw
HTTP client checks what it cannot see: statuses, bounds, the Protobuf stream,
the coexistence with eventcast's SSE stream, and a command relayed from one
node to the node holding the stream, over a real Redis backplane.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from eventcast.protocol import protobuf
from eventcast.protocol.frames import Command, ConnectRequest, SubscribeRequest

from .conftest import StartHub
from .hubtools import WAIT, HubServer, token, until


class Stream:
    """The reading side of an emulation stream (JSON lines)."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self._lines = lines

    async def message(self) -> dict[str, Any]:
        """The next message that is not a ping."""
        async with asyncio.timeout(WAIT):
            async for line in self._lines:
                if line.strip() and line.strip() != "{}":
                    message: dict[str, Any] = json.loads(line)
                    return message
        raise AssertionError("the stream ended")


@asynccontextmanager
async def http_stream(server: HubServer, user: str) -> AsyncIterator[tuple[Stream, dict[str, Any]]]:
    """An HTTP-streaming connection: yields its stream and the connect result."""
    connect = json.dumps({"id": 1, "connect": {"token": token(user)}})
    async with (
        httpx.AsyncClient(timeout=WAIT) as client,
        client.stream(
            "POST",
            f"{server.base}/connection/http_stream",
            content=connect,
            headers={"content-type": "application/json"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        stream = Stream(response.aiter_lines())
        reply = await stream.message()
        yield stream, reply["connect"]


async def emulate(server: HubServer, body: dict[str, Any] | bytes, **headers: str) -> int:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await client.post(
            f"{server.base}/emulation",
            content=content,
            headers={"content-type": "application/json", **headers},
        )
        return response.status_code


def commands(*lines: dict[str, Any]) -> str:
    return "\n".join(json.dumps(line) for line in lines)


async def test_http_stream_session_takes_commands_from_emulation(hub: HubServer) -> None:
    async with http_stream(hub, "emma") as (stream, connect):
        # The node is the hub's cluster id (as Centrifugo's), which emulation requests name.
        node = connect["node"]
        assert node == hub.hub.cluster.node_id
        session = connect["session"]
        assert len(session) >= 32
        assert session != connect["client"]
        data = commands(
            {"id": 2, "subscribe": {"channel": "live:news"}},
            {"id": 3, "presence": {"channel": "live:news"}},
        )
        status = await emulate(hub, {"session": session, "node": node, "data": data})
        assert status == 200
        assert (await stream.message()) == {"id": 2, "subscribe": {}}
        assert (await stream.message())["error"]["code"] == 108  # no presence in "live"
        await hub.publish("live:news", {"headline": "hello"})
        push = (await stream.message())["push"]
        assert push == {"channel": "live:news", "pub": {"data": {"headline": "hello"}}}

        # The hub ends the stream with a disconnect push (an HTTP body has no close code).
        await hub.api("disconnect", user="emma", disconnect={"code": 3503, "reason": "bye"})
        end = await stream.message()
        assert end == {"push": {"disconnect": {"code": 3503, "reason": "bye"}}}
    # The session is gone from this node: 204, as centrifuge-js expects.
    status = await emulate(hub, {"session": session, "node": node, "data": data})
    assert status == 204


async def test_http_stream_in_protobuf(hub: HubServer) -> None:
    connect = protobuf.encode_command(Command(id=1, connect=ConnectRequest(token=token("pia"))))
    async with (
        httpx.AsyncClient(timeout=WAIT) as client,
        client.stream(
            "POST",
            f"{hub.base}/connection/http_stream",
            content=connect,
            headers={"content-type": "application/octet-stream"},
        ) as response,
    ):
        assert response.headers["content-type"] == "application/octet-stream"
        buffer = b""
        chunks = response.aiter_bytes()

        async def reply() -> Any:
            nonlocal buffer
            async with asyncio.timeout(WAIT):
                while True:
                    try:
                        replies = protobuf.decode_replies(buffer)
                    except Exception:
                        replies = []
                    replies = [r for r in replies if r.id or r.push is not None]
                    if replies:
                        buffer = b""
                        return replies[0]
                    buffer += await anext(chunks)

        result = (await reply()).connect
        subscribe = protobuf.encode_command(
            Command(id=2, subscribe=SubscribeRequest(channel="live:bin"))
        )
        body = protobuf.encode_emulation_request(result.node, result.session, subscribe)
        status = await emulate(hub, body, **{"content-type": "application/octet-stream"})
        assert status == 200
        assert (await reply()).id == 2
        await hub.publish("live:bin", {"n": 1})
        push = (await reply()).push
        assert push.channel == "live:bin"
        assert json.loads(bytes(push.pub.data)) == {"n": 1}


async def test_sse_emulation_and_eventcast_sse_share_a_path(hub: HubServer) -> None:
    connect = json.dumps({"id": 1, "connect": {"token": token("sam")}})
    async with (
        httpx.AsyncClient(timeout=WAIT) as client,
        client.stream(
            "GET", f"{hub.base}/connection/sse", params={"cf_connect": connect}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        async with asyncio.timeout(WAIT):
            first = await anext(lines)
        assert first.startswith("data: ")
        assert "connect" in json.loads(first.removeprefix("data: "))
    # Without cf_connect, the same path is eventcast's stream (which wants topics).
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.get(f"{hub.base}/connection/sse")
        assert response.status_code == 400
        assert "topic" in response.json()["error"]


async def test_emulation_bounds_and_bad_input(start_hub: StartHub) -> None:
    server = await start_hub(max_message_size=1024)
    assert await emulate(server, b"{not json") == 400
    assert await emulate(server, b"\xff\xfe", **{"content-type": "application/octet-stream"}) == 400
    assert await emulate(server, {"session": "x", "node": "", "data": "a" * 4000}) == 413
    # An unknown session of this node (or of no node) is gone.
    here = server.hub.cluster.node_id
    assert await emulate(server, {"session": "nope", "node": here, "data": "{}"}) == 204
    # A single node has no other node to relay to.
    assert await emulate(server, {"session": "nope", "node": "elsewhere", "data": "{}"}) == 404
    async with httpx.AsyncClient(timeout=WAIT) as client:
        big = json.dumps({"id": 1, "connect": {"token": "x" * 2000}})
        response = await client.post(f"{server.base}/connection/http_stream", content=big)
        assert response.status_code == 413
        response = await client.get(f"{server.base}/connection/sse", params={"cf_connect": big})
        assert response.status_code == 413
        # Cross-origin: refused unless allowed; a preflight of an allowed origin is answered.
        response = await client.post(
            f"{server.base}/emulation", content=b"{}", headers={"origin": "https://evil.test"}
        )
        assert response.status_code == 403


async def test_a_command_reaches_the_node_holding_the_stream(
    start_hub: StartHub, redis_service: str, run_id: str
) -> None:
    """``POST /emulation`` on node B for a stream on node A: relayed on the cluster channel."""
    backplane = f"{redis_service}?prefix=emulation-{run_id}"
    node_a = await start_hub(node_name="node-a", backplane_url=backplane)
    node_b = await start_hub(node_name="node-b", backplane_url=backplane)
    a_id = node_a.hub.cluster.node_id
    await until(lambda: a_id in node_b.hub.cluster.nodes, "node B to know node A")
    async with http_stream(node_a, "nina") as (stream, connect):
        assert connect["node"] == a_id
        data = commands({"id": 2, "subscribe": {"channel": "live:relay"}})
        # Sent to node B, which does not hold the session: relayed to node A.
        request = {"session": connect["session"], "node": a_id, "data": data}
        assert await emulate(node_b, request) == 200
        assert (await stream.message()) == {"id": 2, "subscribe": {}}
        await node_a.publish("live:relay", {"via": "a"})
        assert (await stream.message())["push"]["pub"]["data"] == {"via": "a"}
        # A session node A no longer has: its answer (204) comes back through node B.
        gone = {"session": "no-such-session", "node": a_id, "data": data}
        assert await emulate(node_b, gone) == 204
    # A node the cluster does not know: 404 at once.
    nobody = {"session": "x", "node": "no-such-node", "data": data}
    assert await emulate(node_b, nobody) == 404
    # A node that stops answering: 404 once the relay's wait is over.
    node_b.hub.emulation.relay.timeout = 0.2  # type: ignore[attr-defined]
    node_a.hub.bus.cluster_listeners.clear()  # node A hears nothing more (it stays in B's table)
    assert await emulate(node_b, request) == 404
