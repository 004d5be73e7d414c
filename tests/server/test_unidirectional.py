"""Unidirectional transports (uni_websocket, uni_http_stream, uni_sse) with plain clients.

A client with no SDK: a connect request in, JSON pushes out, in Centrifugo's
formats; server-side subscriptions come from the token's ``channels``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import StartHub
from .hubtools import WAIT, HubServer, token
from .securitytools import exchange, status_of


async def pushes(lines: AsyncIterator[str], prefix: str = "") -> AsyncIterator[dict[str, Any]]:
    """The pushes of a stream of lines (``prefix``: ``data: `` for SSE), pings skipped."""
    async for line in lines:
        if not line.startswith(prefix):
            continue
        text = line.removeprefix(prefix).strip()
        if text and text != "{}":
            yield json.loads(text)


async def next_push(stream: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        return await anext(stream)


async def until_closed(ws: Any) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes the WebSocket, and its close code."""
    messages = []
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(WAIT):
            while True:
                messages.append(json.loads(await ws.recv()))
    return messages, ws.close_code


async def test_uni_http_stream_pushes_server_side_subscriptions(hub: HubServer) -> None:
    for n in range(1, 4):
        await hub.publish("alerts.uni", {"n": n})
    epoch = (await hub.api("history", channel="alerts.uni", limit=0))["epoch"]
    request = {
        "token": token("ulla", channels=["alerts.uni", "live:uni"]),
        "subs": {"alerts.uni": {"recover": True, "offset": 1, "epoch": epoch}},
    }
    async with (
        httpx.AsyncClient(timeout=WAIT) as client,
        client.stream("POST", f"{hub.base}/connection/uni_http_stream", json=request) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        stream = pushes(response.aiter_lines())
        connected = (await next_push(stream))["connect"]
        assert connected["ping"] == 25
        subs = connected["subs"]
        assert set(subs) == {"alerts.uni", "live:uni"}
        recovered = subs["alerts.uni"]
        assert recovered["recovered"] is True
        assert [p["offset"] for p in recovered["publications"]] == [2, 3]
        await hub.publish("live:uni", {"live": True})
        await hub.publish("alerts.uni", {"n": 4})
        assert await next_push(stream) == {"channel": "live:uni", "pub": {"data": {"live": True}}}
        assert await next_push(stream) == {
            "channel": "alerts.uni",
            "pub": {"data": {"n": 4}, "offset": 4},
        }
        await hub.api("disconnect", user="ulla", disconnect={"code": 3503, "reason": "bye"})
        assert await next_push(stream) == {"disconnect": {"code": 3503, "reason": "bye"}}


async def test_uni_sse_one_event_per_push(hub: HubServer) -> None:
    connect_request = json.dumps({"token": token("uwe", channels=["live:sse"])})
    async with (
        httpx.AsyncClient(timeout=WAIT) as client,
        client.stream(
            "GET", f"{hub.base}/connection/uni_sse", params={"cf_connect": connect_request}
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = pushes(response.aiter_lines(), prefix="data: ")
        assert "connect" in await next_push(stream)
        # One batch of two publications: still one event (one data line) per push.
        batch = await hub.call(
            "batch",
            {
                "commands": [
                    {"publish": {"channel": "live:sse", "data": {"n": 1}}},
                    {"publish": {"channel": "live:sse", "data": {"n": 2}}},
                ]
            },
        )
        assert batch.status_code == 200
        assert (await next_push(stream))["pub"]["data"] == {"n": 1}
        assert (await next_push(stream))["pub"]["data"] == {"n": 2}


async def test_uni_websocket_first_message_or_url(hub: HubServer) -> None:
    url = hub.ws_url.replace("/websocket", "/uni_websocket")
    async with connect(url, open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"token": token("vic", channels=["live:ws"])}))
        first = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert set(first["connect"]["subs"]) == {"live:ws"}
        await hub.publish("live:ws", {"n": 1})
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {
            "channel": "live:ws",
            "pub": {"data": {"n": 1}},
        }
        await ws.send("anything: the client is not heard after connect")
        await hub.publish("live:ws", {"n": 2})
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["pub"]["data"] == {"n": 2}

    params = urlencode({"cf_connect": json.dumps({"token": token("val", channels=["live:ws"])})})
    async with connect(f"{url}?{params}", open_timeout=WAIT) as ws:
        assert "connect" in json.loads(await asyncio.wait_for(ws.recv(), WAIT))


async def test_uni_refusals(start_hub: StartHub) -> None:
    hub = await start_hub(max_message_size=2048, handshake_timeout=0.5, body_timeout=0.5)
    url = hub.ws_url.replace("/websocket", "/uni_websocket")
    # An invalid token: a disconnect push, then the close frame with the same code.
    async with connect(url, open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"token": "not-a-token"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {
            "disconnect": {"code": 3500, "reason": "invalid token"}
        }
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 3500
    # Malformed: 3501; nothing sent in time: 3502 "stale".
    for first, code in (("{not json", 3501), (None, 3502)):
        async with connect(url, open_timeout=WAIT) as ws:
            if first is not None:
                await ws.send(first)
            messages, closed = await until_closed(ws)
            assert closed == code
            assert messages[-1]["disconnect"]["code"] == code
    async with httpx.AsyncClient(timeout=WAIT) as client:
        stream_url = f"{hub.base}/connection/uni_http_stream"
        assert (await client.post(stream_url, content=b"[1, 2")).status_code == 400
        assert (await client.post(stream_url, content=b"x" * 4096)).status_code == 413
        sse_url = f"{hub.base}/connection/uni_sse"
        response = await client.get(sse_url, params={"cf_connect": "x" * 4096})
        assert response.status_code == 413
        # A body that stops arriving: 408 after body_timeout, as every body of the hub.
        slow = (
            b"POST /connection/uni_http_stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Length: 100\r\n\r\n{"token": '
        )
        answer, _ = await asyncio.to_thread(exchange, hub, slow)
        assert status_of(answer) == 408
        # A refused connect over HTTP: 200, then the disconnect push ends the stream.
        response = await client.post(stream_url, json={"token": "bad"})
        assert response.status_code == 200
        assert json.loads(response.text) == {
            "disconnect": {"code": 3500, "reason": "invalid token"}
        }
