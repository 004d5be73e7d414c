"""Centrifugo's HTTP proxy: the hub driven by a backend written from Centrifugo's documentation.

The backend (:mod:`tests.server.proxy_backend`) runs under uvicorn beside the
hub; every proxy type goes through it, with the raw protocol, centrifuge-python
and centrifuge-js.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from eventcast.server.hooks import AppHooks, RPCRequest, RPCResult

from .apptools import listening_socket, serve_app
from .conftest import StartHub
from .hubtools import HubServer, RawClient
from .jstools import run_hooks_js
from .opstools import Clients, subscription
from .proxy_backend import MALFORMED, ProxyBackend

KINDS = ("connect", "refresh", "subscribe", "publish", "sub_refresh", "rpc")

NAMESPACES: list[dict[str, Any]] = [
    {
        "name": "",
        "history_size": 20,
        "history_ttl": 300,
        "proxy_subscribe": True,
        "proxy_publish": True,
        "proxy_sub_refresh": True,
    },
    {"name": "personal", "presence": True, "allow_presence_for_subscriber": True},
    {"name": "secret", "proxy_subscribe": True},
    {"name": "live"},
    # No proxy here: the namespace's own options decide.
    {"name": "open", "allow_subscribe_for_client": True},
]

Proxied = tuple[HubServer, ProxyBackend]
StartProxied = Callable[..., Awaitable[Proxied]]


@pytest.fixture
async def start_proxied(start_hub: StartHub) -> AsyncIterator[StartProxied]:
    """Start the backend and a hub whose every proxy endpoint points at it."""
    backend = ProxyBackend()
    sock = listening_socket()
    async with serve_app(backend.app, sock) as base:

        async def start(**overrides: Any) -> Proxied:
            endpoints = {f"proxy_{kind}_endpoint": f"{base}/centrifugo/{kind}" for kind in KINDS}
            settings: dict[str, Any] = {
                "namespaces": NAMESPACES,
                "proxy_http_headers": ["Cookie", "X-Request-Id"],
                **endpoints,
                **overrides,
            }
            return await start_hub(**settings), backend

        yield start


@pytest.fixture
async def proxied(start_proxied: StartProxied) -> Proxied:
    return await start_proxied(proxy_rpc_timeout=0.5)


async def test_connect_proxy_gets_the_documented_request(proxied: Proxied) -> None:
    hub, backend = proxied
    headers = {"Cookie": "session=s-alice", "X-Request-Id": "req-1", "X-Not-Listed": "no"}
    async with await RawClient.open(hub.ws_url, additional_headers=headers) as client:
        result = await client.connect(data={"screen": "wide"}, name="raw", version="0.1")
        assert result["data"] == {"hello": "alice"}
        assert set(result["subs"]) == {"personal:alice", "live:news"}
        assert result["subs"]["live:news"]["data"] == {"welcome": "news"}
        (received,) = backend.received
        assert received.path == "/centrifugo/connect"
        assert received.body == {
            "client": result["client"],
            "transport": "websocket",
            "protocol": "json",
            "encoding": "json",
            "name": "raw",
            "version": "0.1",
            "data": {"screen": "wide"},
        }
        assert received.headers["content-type"] == "application/json"
        assert received.headers["cookie"] == "session=s-alice"
        assert received.headers["x-request-id"] == "req-1"
        assert "x-not-listed" not in received.headers
        # The user and info from the backend: presence shows them.
        presence = await client.request("presence", {"channel": "personal:alice"})
        (entry,) = presence["presence"]["presence"].values()
        assert (entry["user"], entry["conn_info"]) == ("alice", {"name": "Alice"})


async def test_every_proxy_type_with_centrifuge_python(proxied: Proxied) -> None:
    hub, backend = proxied
    clients = Clients()
    client, events = clients.new(hub.ws_url, data={"session": "s-bob"})
    room, room_events = subscription(client, "chat.room", data={"hi": 1})
    secret, secret_events = subscription(client, "secret:plans")
    try:
        await client.connect()
        assert (await events.next("connected")).data == {"hello": "bob"}
        server_side = {ctx.channel for ctx in await events.take("subscribed", 2)}
        assert server_side == {"personal:bob", "live:news"}
        await hub.publish("personal:bob", {"n": 1})
        assert (await events.next("publication")).pub.data == {"n": 1}

        await room.subscribe()
        assert (await room_events.next("subscribed")).data == {"joined": "chat.room"}
        await secret.subscribe()
        assert (await secret_events.next("unsubscribed")).code == 103

        await room.publish({"text": "hello"})
        assert (await room_events.next("publication")).pub.data == {"text": "HELLO", "by": "bob"}

        answer = await client.rpc("whoami", {})
        assert answer.data == {"user": "bob", "meta": {"tenant": "acme"}}
    finally:
        await clients.close()
    subscribe, refused = backend.bodies("/centrifugo/subscribe")
    assert subscribe == {
        "client": subscribe["client"],
        "transport": "websocket",
        "protocol": "json",
        "encoding": "json",
        "user": "bob",
        "meta": {"tenant": "acme"},
        "channel": "chat.room",
        "data": {"hi": 1},
    }
    assert refused["channel"] == "secret:plans"
    (publish,) = backend.bodies("/centrifugo/publish")
    assert (publish["channel"], publish["data"], publish["user"]) == (
        "chat.room",
        {"text": "hello"},
        "bob",
    )
    (rpc,) = backend.bodies("/centrifugo/rpc")
    assert (rpc["method"], rpc["data"]) == ("whoami", {})


async def test_refresh_and_sub_refresh_proxies(proxied: Proxied) -> None:
    hub, backend = proxied
    async with await RawClient.open(hub.ws_url) as client:
        result = await client.connect(data={"session": "s-alice", "expire_in": 1})
        assert "expires" not in result
        assert await client.closed() == (3005, "connection expired")
    first, second = backend.bodies("/centrifugo/refresh")
    assert first == {
        "client": result["client"],
        "transport": "websocket",
        "protocol": "json",
        "encoding": "json",
        "user": "alice",
        "meta": {"tenant": "acme"},
    }
    assert second == first
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(data={"session": "s-alice"})
        assert "expires" not in await client.subscribe("chat.expiring", data={"expire_in": 1})
        assert await client.closed() == (3006, "subscription expired")
    sub_refreshes = backend.bodies("/centrifugo/sub_refresh")
    assert [b["channel"] for b in sub_refreshes] == ["chat.expiring"] * 2
    assert sub_refreshes[0]["user"] == "alice"


async def test_proxy_errors_and_failures(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    hub, _ = proxied
    caplog.set_level(logging.WARNING, logger="eventcast")
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(data={"session": "s-alice"})
        custom = await client.request("rpc", {"method": "custom-error"})
        assert custom["error"] == {"code": 1000, "message": "custom error"}
        for method in ("fail", "hang"):
            reply = await client.request("rpc", {"method": method})
            assert reply["error"]["code"] == 100, method
        assert (await client.request("rpc", {"method": "whoami"}))["rpc"]["data"]["user"] == "alice"
    assert not any(r.exc_info for r in caplog.records)
    messages = [r.getMessage() for r in caplog.records if "rpc hook" in r.getMessage()]
    assert any("HTTP 500" in m for m in messages), messages
    assert any("timed out" in m for m in messages), messages
    # A client the backend refuses is disconnected as it says.
    async with await RawClient.open(hub.ws_url) as client:
        await client.command("connect", {"data": {"session": "nobody"}})
        assert await client.closed() == (4501, "unauthorized")


async def test_malformed_answers_are_failures(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    hub, _ = proxied
    caplog.set_level(logging.WARNING, logger="eventcast")
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(data={"session": "s-alice"})
        for method in MALFORMED:
            reply = await client.request("rpc", {"method": method})
            assert reply["error"]["code"] == 100, (method, reply)
    lines = [r.getMessage() for r in caplog.records if "rpc hook" in r.getMessage()]
    assert len(lines) == len(MALFORMED)
    assert all("HookError" in line for line in lines)
    assert not any(r.exc_info for r in caplog.records)
    assert "oops" not in caplog.text  # bodies are never logged


async def test_namespaces_without_a_proxy_keep_their_options(proxied: Proxied) -> None:
    hub, backend = proxied
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(data={"session": "s-alice"})
        await client.subscribe("open:lobby")
        refused = await client.request("subscribe", {"channel": "live:other"})
        assert refused["error"]["code"] == 103
    assert backend.bodies("/centrifugo/subscribe") == []


async def test_binary_encoding(start_proxied: StartProxied) -> None:
    hub, backend = await start_proxied(proxy_binary_encoding=True)
    headers = {"Cookie": "session=s-alice"}
    async with await RawClient.open(hub.ws_url, additional_headers=headers) as client:
        result = await client.connect(data={"binary": True})
        # The backend's b64data, decoded: JSON again for a JSON client.
        assert result["data"] == {"hello": "alice"}
        await client.subscribe("chat.bin")
        await client.request("publish", {"channel": "chat.bin", "data": {"text": "hé"}})
        push = await client.publication()
        assert push["pub"]["data"] == {"text": "HÉ", "by": "alice"}
    connect = backend.bodies("/centrifugo/connect")[0]
    assert "data" not in connect
    assert base64.b64decode(connect["b64data"]) == b'{"binary":true}'
    publish = backend.bodies("/centrifugo/publish")[0]
    assert base64.b64decode(publish["b64data"]).decode() == '{"text":"hé"}'


async def test_calls_reuse_pooled_connections(proxied: Proxied) -> None:
    hub, backend = proxied
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(data={"session": "s-alice"})
        for n in range(20):
            reply = await client.request("rpc", {"method": "echo", "data": {"n": n}})
            assert reply["rpc"]["data"] == {"method": "echo", "echo": {"n": n}}
    peers = {r.peer for r in backend.received}
    assert len(backend.received) == 21
    assert len(peers) <= 2, peers  # keep-alive: the calls share their connections


async def test_in_process_hooks_come_before_the_proxy(start_proxied: StartProxied) -> None:
    hooks = AppHooks()

    @hooks.on_rpc
    async def rpc(request: RPCRequest) -> RPCResult:
        return RPCResult(data={"answered": "in process", "user": request.user})

    hub, backend = await start_proxied(hooks=hooks)
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(data={"session": "s-bob"})
        reply = await client.request("rpc", {"method": "anything"})
        assert reply["rpc"]["data"] == {"answered": "in process", "user": "bob"}
    assert [r.path for r in backend.received] == ["/centrifugo/connect"]


async def test_centrifuge_js_through_the_proxy(proxied: Proxied) -> None:
    hub, _ = proxied
    result = await run_hooks_js(hub, "s-alice")
    assert result["connectedData"] == {"hello": "alice"}
    assert sorted(s["channel"] for s in result["serverSubscribed"]) == [
        "live:news",
        "personal:alice",
    ]
    assert result["serverPublications"] == [
        {"channel": "personal:alice", "data": {"note": "for you"}}
    ]
    assert result["denied"]["code"] == 103
    assert result["roomPublications"] == [{"text": "HELLO FROM JS", "by": "alice"}]
    assert result["rpc"] == {"user": "alice", "meta": {"tenant": "acme"}}
