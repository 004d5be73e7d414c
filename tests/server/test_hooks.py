"""In-process application hooks (AppHooks) against the real hub, raw protocol and centrifuge-python.

The hooks here stand for an application's own logic: sessions by cookie or by
connect data, a channel refused, a publication rewritten, RPCs answered, and
sessions and subscriptions refreshed by the hub rather than the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from eventcast.exceptions import ConfigurationError
from eventcast.protocol import codes
from eventcast.protocol.codes import Disconnect
from eventcast.server.errors import CommandError
from eventcast.server.hooks import (
    AppHooks,
    ConnectRequest,
    ConnectResult,
    PublishRequest,
    PublishResult,
    RefreshRequest,
    RefreshResult,
    RPCRequest,
    RPCResult,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeOptions,
    SubscribeRequest,
    SubscribeResult,
)

from .conftest import StartHub
from .hubtools import WAIT, HubServer, RawClient
from .jstools import run_hooks_js
from .opstools import Clients, subscription
from .ssetools import open_sse

#: Sessions of the application, by cookie value.
SESSIONS = {"s-alice": "alice", "s-bob": "bob"}

NAMESPACES: list[dict[str, Any]] = [
    # Durable, so a frame's publishes run concurrently (they share a group commit).
    {"name": "", "history_size": 20, "history_ttl": 300},
    {"name": "personal", "presence": True, "allow_presence_for_subscriber": True},
    {"name": "secret"},
    {"name": "live"},
]


@dataclass
class App:
    """The application behind the hooks: what each hook was asked."""

    hooks: AppHooks = field(default_factory=lambda: AppHooks(timeout=0.5))
    asked: dict[str, list[Any]] = field(default_factory=dict)
    publishing: int = 0
    refreshes: list[str] = field(default_factory=list)

    def saw(self, kind: str, request: Any) -> None:
        self.asked.setdefault(kind, []).append(request)


def application() -> App:
    app = App()
    hooks = app.hooks

    @hooks.on_connect
    async def connect(request: ConnectRequest) -> ConnectResult:
        app.saw("connect", request)
        session = request.cookies.get("session") or (request.data or {}).get("session")
        if session == "s-banned":
            raise CommandError(Disconnect(4501, "banned"))
        user = SESSIONS.get(session or "")
        if user is None:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN)
        expiring = (request.data or {}).get("expire_in")
        return ConnectResult(
            user=user,
            expire_at=None if expiring is None else time.time() + expiring,
            info={"name": user.title()},
            data={"hello": user},
            channels=[f"personal:{user}"],
            subs={
                f"personal:{user}": SubscribeOptions(info={"role": "owner"}),
                "live:news": SubscribeOptions(data={"welcome": "news"}),
            },
            meta={"tenant": "acme", "session": session},
        )

    @hooks.on_refresh
    async def refresh(request: RefreshRequest) -> RefreshResult:
        app.saw("refresh", request)
        if len(app.asked["refresh"]) == 1:
            return RefreshResult(expire_at=time.time() + 0.3, info={"name": "refreshed"})
        return RefreshResult(expired=True)

    @hooks.on_subscribe
    async def subscribe(request: SubscribeRequest) -> SubscribeResult:
        app.saw("subscribe", request)
        if request.channel.startswith("secret:"):
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        expiring = (request.data or {}).get("expire_in")
        return SubscribeResult(
            data={"joined": request.channel},
            expire_at=None if expiring is None else time.time() + expiring,
        )

    @hooks.on_sub_refresh
    async def sub_refresh(request: SubRefreshRequest) -> SubRefreshResult:
        app.saw("sub_refresh", request)
        if len(app.asked["sub_refresh"]) == 1:
            return SubRefreshResult(expire_at=time.time() + 0.3)
        return SubRefreshResult(expired=True)

    @hooks.on_publish
    async def publish(request: PublishRequest) -> PublishResult:
        app.saw("publish", request)
        app.publishing += 1
        overlapping = app.publishing > 1
        # Let other tasks run: a call made concurrently would start now.
        for _ in range(3):
            await asyncio.sleep(0)
        app.publishing -= 1
        text = request.data.get("text", "")
        return PublishResult(
            data={"text": text.upper(), "by": request.user, "overlapping": overlapping},
            tags={"checked": "yes"},
        )

    @hooks.on_rpc
    async def rpc(request: RPCRequest) -> RPCResult:
        app.saw("rpc", request)
        if request.method == "boom":
            raise RuntimeError("a secret detail that must not be logged")
        if request.method == "hang":
            await asyncio.Event().wait()  # never answers: the hub's timeout ends it
        if request.method == "not-json":
            return RPCResult(data=b"{not json")
        return RPCResult(
            data={"method": request.method, "user": request.user, "meta": request.meta}
        )

    return app


@pytest.fixture
async def hooked(start_hub: StartHub) -> tuple[HubServer, App]:
    app = application()
    hub = await start_hub(hooks=app.hooks, namespaces=NAMESPACES)
    return hub, app


async def open_raw(hub: HubServer, session: str | None = None) -> RawClient:
    headers = {"Cookie": f"session={session}; other=1"} if session else None
    return await RawClient.open(hub.ws_url, additional_headers=headers)


async def test_connect_hook_admits_a_client_without_a_token(
    hooked: tuple[HubServer, App],
) -> None:
    hub, app = hooked
    async with await open_raw(hub, "s-alice") as client:
        result = await client.connect(data={"from": "raw"}, name="raw-client", version="1.2")
        assert result["data"] == {"hello": "alice"}
        assert "expires" not in result
        # The hook's server-side channels, with the data it gave one of them.
        assert set(result["subs"]) == {"personal:alice", "live:news"}
        assert result["subs"]["live:news"]["data"] == {"welcome": "news"}
        (request,) = app.asked["connect"]
        assert request.client == result["client"]
        assert request.user == ""
        assert request.transport == "websocket"
        assert request.cookies["session"] == "s-alice"
        assert request.headers["cookie"].startswith("session=s-alice")
        assert request.address == "127.0.0.1"
        assert (request.data, request.name, request.version) == (
            {"from": "raw"},
            "raw-client",
            "1.2",
        )

        # The user and connection info the hook returned: presence shows them.
        presence = await client.request("presence", {"channel": "personal:alice"})
        (entry,) = presence["presence"]["presence"].values()
        assert entry["user"] == "alice"
        assert entry["conn_info"] == {"name": "Alice"}
        assert entry["chan_info"] == {"role": "owner"}
        # Publications on a server-side channel arrive; later hooks get user and meta.
        await hub.publish("personal:alice", {"note": 1})
        push = await client.publication()
        assert (push["channel"], push["pub"]["data"]) == ("personal:alice", {"note": 1})
        answer = await client.request("rpc", {"method": "whoami", "data": {"q": 1}})
        assert answer["rpc"]["data"] == {
            "method": "whoami",
            "user": "alice",
            "meta": {"tenant": "acme", "session": "s-alice"},
        }


async def test_connect_hook_refusals_close_the_connection(hooked: tuple[HubServer, App]) -> None:
    hub, _ = hooked
    async with await open_raw(hub, "s-banned") as client:
        await client.command("connect", {})
        assert await client.closed() == (4501, "banned")
    async with await open_raw(hub, "s-nobody") as client:
        await client.command("connect", {})
        assert await client.closed() == (3500, "invalid token")


async def test_every_transport_asks_the_same_hooks(hooked: tuple[HubServer, App]) -> None:
    """HTTP-streaming (and its ``/emulation`` commands) and the unidirectional transports
    are admitted by the connect hook and subscribe through the subscribe hook."""
    hub, app = hooked
    alice = {"cookie": "session=s-alice", "content-type": "application/json"}
    connect = json.dumps({"id": 1, "connect": {"data": {"via": "stream"}}})
    async with (
        httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client,
        client.stream("POST", "/connection/http_stream", content=connect, headers=alice) as stream,
    ):
        lines = stream.aiter_lines()

        async def message() -> dict[str, Any]:
            async with asyncio.timeout(WAIT):
                decoded: dict[str, Any] = json.loads(await anext(lines))
                return decoded

        result = (await message())["connect"]
        assert result["data"] == {"hello": "alice"}
        assert set(result["subs"]) == {"personal:alice", "live:news"}
        request = app.asked["connect"][-1]
        assert (request.transport, request.protocol) == ("http_stream", "json")
        assert (request.cookies["session"], request.data) == ("s-alice", {"via": "stream"})
        # A later command, by /emulation: the subscribe hook refuses it.
        commands = json.dumps({"id": 2, "subscribe": {"channel": "secret:plans"}})
        body = {"session": result["session"], "node": result["node"], "data": commands}
        assert (await client.post("/emulation", json=body)).status_code == 200
        assert await message() == {"id": 2, "error": {"code": 103, "message": "permission denied"}}
        assert app.asked["subscribe"][-1].channel == "secret:plans"

    async with httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client:
        # Unidirectional: the hook's user and server-side channels, or its refusal.
        async with client.stream(
            "POST", "/connection/uni_http_stream", content=b"{}", headers=alice
        ) as stream:
            async with asyncio.timeout(WAIT):
                first = json.loads(await anext(stream.aiter_lines()))
        assert set(first["connect"]["subs"]) == {"personal:alice", "live:news"}
        assert app.asked["connect"][-1].transport == "uni_http_stream"
        nobody = {"cookie": "session=s-nobody"}
        refused = await client.post("/connection/uni_http_stream", content=b"{}", headers=nobody)
        assert json.loads(refused.text) == {"disconnect": {"code": 3500, "reason": "invalid token"}}


async def test_centrifuge_python_through_the_hooks(hooked: tuple[HubServer, App]) -> None:
    hub, app = hooked
    clients = Clients()
    client, events = clients.new(hub.ws_url, data={"session": "s-bob"})
    room, room_events = subscription(client, "chat.room", data={"why": "reading"})
    secret, secret_events = subscription(client, "secret:plans")
    try:
        await client.connect()
        connected = await events.next("connected")
        assert connected.data == {"hello": "bob"}
        server_side = {ctx.channel: ctx for ctx in await events.take("subscribed", 2)}
        assert set(server_side) == {"personal:bob", "live:news"}
        assert server_side["live:news"].data == {"welcome": "news"}
        await hub.publish("personal:bob", {"for": "bob"})
        pushed = await events.next("publication")
        assert (pushed.channel, pushed.pub.data) == ("personal:bob", {"for": "bob"})

        # A subscription the hook allows, with its data; one it refuses: error 103.
        await room.subscribe()
        subscribed = await room_events.next("subscribed")
        assert subscribed.data == {"joined": "chat.room"}
        assert app.asked["subscribe"][0].data == {"why": "reading"}
        await secret.subscribe()
        unsubscribed = await secret_events.next("unsubscribed")
        assert unsubscribed.code == 103

        # A publication rewritten by the hook reaches subscribers rewritten.
        await room.publish({"text": "hello"})
        publication = await room_events.next("publication")
        assert publication.pub.data == {"text": "HELLO", "by": "bob", "overlapping": False}
        assert publication.pub.tags == {"checked": "yes"}
        history = await hub.api("history", channel="chat.room", limit=10)
        assert [p["data"]["text"] for p in history["publications"]] == ["HELLO"]

        # The rpc hook answers.
        answer = await client.rpc("whoami", {"q": 2})
        assert answer.data["user"] == "bob"
        assert answer.data["meta"]["tenant"] == "acme"
    finally:
        await clients.close()


async def test_failing_hooks_answer_100_in_one_log_line(
    hooked: tuple[HubServer, App], caplog: pytest.LogCaptureFixture
) -> None:
    hub, _ = hooked
    caplog.set_level(logging.WARNING, logger="eventcast")
    async with await open_raw(hub, "s-alice") as client:
        await client.connect()
        for method in ("boom", "hang", "not-json"):
            reply = await client.request("rpc", {"method": method})
            assert reply["error"] == {
                "code": 100,
                "message": "internal server error",
                "temporary": True,
            }, method
        # The connection stays usable: a failure is not the client's fault.
        assert (await client.request("rpc", {"method": "ok"}))["rpc"]["data"]["user"] == "alice"
    lines = [r.getMessage() for r in caplog.records if "rpc hook" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "RuntimeError" in lines[0]
    assert "timed out" in lines[1]
    assert "HookError" in lines[2]
    assert not any(r.exc_info for r in caplog.records)
    assert "secret detail" not in caplog.text
    async with httpx.AsyncClient(timeout=WAIT) as http:
        metrics = (await http.get(f"{hub.base}/metrics")).text
    for outcome, count in (("error", 2), ("timeout", 1), ("ok", 1)):
        assert f'eventcast_hook_calls_total{{hook="rpc",result="{outcome}"}} {count}.0' in metrics
    assert 'eventcast_hook_calls_total{hook="connect",result="ok"} 1.0' in metrics


async def test_publish_hook_calls_keep_the_order_of_a_frame(
    hooked: tuple[HubServer, App],
) -> None:
    """A frame's durable publishes run concurrently; their hooks are called one by one, in order."""
    hub, app = hooked
    async with await open_raw(hub, "s-alice") as client:
        await client.connect()
        frame = "\n".join(
            f'{{"id": {n}, "publish": {{"channel": "orders", "data": {{"text": "order {n}"}}}}}}'
            for n in range(1, 9)
        )
        await client.send_raw(frame)
        replies = [await client.reply(n) for n in range(1, 9)]
        assert all("error" not in reply for reply in replies), replies
    assert [r.data["text"] for r in app.asked["publish"]] == [f"order {n}" for n in range(1, 9)]
    history = await hub.api("history", channel="orders", limit=20)
    assert [p["data"] for p in history["publications"]] == [
        {"text": f"ORDER {n}", "by": "alice", "overlapping": False} for n in range(1, 9)
    ]


async def test_refresh_hook_extends_then_ends_the_session(hooked: tuple[HubServer, App]) -> None:
    hub, app = hooked
    async with await open_raw(hub, "s-alice") as client:
        result = await client.connect(data={"expire_in": 0.2})
        # The hub refreshes the session itself: the client is not told to.
        assert "expires" not in result
        assert await client.closed() == (3005, "connection expired")
    first, second = app.asked["refresh"]
    assert (first.user, first.meta["tenant"]) == ("alice", "acme")
    assert second.client == first.client


async def test_sub_refresh_hook_extends_then_ends_the_subscription(
    hooked: tuple[HubServer, App],
) -> None:
    hub, app = hooked
    async with await open_raw(hub, "s-alice") as client:
        await client.connect()
        result = await client.subscribe("chat.expiring", data={"expire_in": 0.2})
        assert "expires" not in result
        assert await client.closed() == (3006, "subscription expired")
    assert [r.channel for r in app.asked["sub_refresh"]] == ["chat.expiring"] * 2


async def test_sse_streams_authenticate_and_subscribe_through_the_hooks(
    hooked: tuple[HubServer, App],
) -> None:
    hub, app = hooked
    async with open_sse(hub.base, ["chat.sse"], cookies={"session": "s-bob"}) as stream:
        assert stream.status == 200
        subscribed = await stream.event()
        assert subscribed.type == "subscribed"
        await hub.publish("chat.sse", {"n": 1})
        event = await stream.event()
        assert event.json()["data"] == {"n": 1}
    assert app.asked["connect"][-1].transport == "sse"
    assert app.asked["subscribe"][-1].channel == "chat.sse"
    async with open_sse(hub.base, ["secret:x"], cookies={"session": "s-bob"}) as stream:
        assert stream.status == 403
    async with open_sse(hub.base, ["chat.sse"], cookies={"session": "s-nobody"}) as stream:
        assert stream.status == 401


async def test_centrifuge_js_through_the_hooks(hooked: tuple[HubServer, App]) -> None:
    hub, _ = hooked
    result = await run_hooks_js(hub, "s-alice")
    assert result["connectedData"] == {"hello": "alice"}
    assert {s["channel"]: s["data"] for s in result["serverSubscribed"]} == {
        "personal:alice": None,
        "live:news": {"welcome": "news"},
    }
    assert result["serverPublications"] == [
        {"channel": "personal:alice", "data": {"note": "for you"}}
    ]
    assert result["denied"]["code"] == 103
    assert result["roomPublications"] == [
        {"text": "HELLO FROM JS", "by": "alice", "overlapping": False}
    ]
    assert result["rpc"] == {
        "method": "whoami",
        "user": "alice",
        "meta": {"tenant": "acme", "session": "s-alice"},
    }


def test_the_hooks_api_is_exported_from_eventcast_asgi() -> None:
    import eventcast.asgi
    from eventcast.server import hooks

    for name in (
        "AppHooks",
        "Hooks",
        "ClientRequest",
        "ConnectRequest",
        "ConnectResult",
        "RefreshRequest",
        "RefreshResult",
        "SubscribeOptions",
        "SubscribeRequest",
        "SubscribeResult",
        "PublishRequest",
        "PublishResult",
        "SubRefreshRequest",
        "SubRefreshResult",
        "RPCRequest",
        "RPCResult",
    ):
        assert name in eventcast.asgi.__all__
        assert getattr(eventcast.asgi, name) is getattr(hooks, name)
    assert eventcast.asgi.CommandError is CommandError


def test_app_hooks_refuse_a_second_registration_and_bad_timeouts() -> None:
    hooks = AppHooks()

    @hooks.on_rpc
    async def first(request: RPCRequest) -> RPCResult:
        return RPCResult()

    assert hooks.handles("rpc")
    assert not hooks.handles("connect")
    with pytest.raises(ConfigurationError, match="registered already"):
        hooks.on_rpc(first)
    with pytest.raises(ConfigurationError, match="timeout"):
        AppHooks(timeout=0)


@pytest.mark.parametrize(
    "result",
    [
        ConnectResult(user="u", channels=["not a channel!"]),
        ConnectResult(user="u", subs={"live:x": SubscribeOptions(info=b"{not json")}),
        ConnectResult(user="u", data=object()),  # no JSON form
    ],
)
async def test_a_bad_connect_result_is_the_hooks_failure(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture, result: ConnectResult
) -> None:
    hooks = AppHooks()

    @hooks.on_connect
    async def connect(request: ConnectRequest) -> ConnectResult:
        return result

    hub = await start_hub(hooks=hooks, namespaces=NAMESPACES)
    caplog.set_level(logging.WARNING, logger="eventcast")
    async with await open_raw(hub) as client:
        reply = await client.request("connect", {})
        assert reply["error"]["code"] == 100
    (line,) = [r.getMessage() for r in caplog.records if "connect hook" in r.getMessage()]
    assert "HookError" in line
    assert not any(r.exc_info for r in caplog.records)
