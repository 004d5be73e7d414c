"""``examples/fastapi_app.py``: the hub mounted in a FastAPI app, served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from centrifuge import ClientState

from eventcast.asgi import create_app, hub_lifespan

from .hubtools import API_KEY, WAIT, RawClient, make_settings, token, write_config
from .opstools import Clients, subscription

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app.py"


def load_example(config: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import the example afresh, configured by ``config`` (it reads EVENTCAST_CONFIG)."""
    monkeypatch.setenv("EVENTCAST_CONFIG", str(config))
    name = "eventcast_example_fastapi_app"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@dataclass
class Running:
    base: str
    server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://", 1) + "/realtime/connection/websocket"

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, WAIT)


async def run(app: Any) -> Running:
    """Serve ``app`` with plain uvicorn (as a host application would) on a free port."""
    # IPPROTO_TCP explicitly, so that asyncio sets TCP_NODELAY on accepted sockets (see
    # conftest.start_hub): otherwise each two-part response waits for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    started = asyncio.Event()
    startup = server.startup

    async def startup_then_signal(sockets: list[socket.socket] | None = None) -> None:
        try:
            await startup(sockets=sockets)
        finally:
            started.set()

    server.startup = startup_then_signal  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    waiter = asyncio.ensure_future(started.wait())
    try:
        await asyncio.wait({waiter, task}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not server.started:
        if task.done():
            task.result()
        raise AssertionError("uvicorn did not start")
    return Running(f"http://127.0.0.1:{port}", server, task)


@pytest.fixture
async def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    module = load_example(write_config(tmp_path / "eventcast.toml", tmp_path), monkeypatch)
    yield module
    with contextlib.suppress(Exception):
        await module.hub.close()


async def test_fastapi_app_publishes_orders_in_process(example: Any) -> None:
    running = await run(example.app)
    clients = Clients()
    try:
        assert not example.hub.bus.closed  # the host's lifespan opened the hub
        client, events = clients.new(running.ws_url, token("alice"))
        sub, sub_events = subscription(client, "orders")
        await client.connect()
        assert (await events.next("connecting")).code == 0  # "connect called"
        await events.next("connected")
        await sub.subscribe()
        await sub_events.next("subscribed")

        async with httpx.AsyncClient(base_url=running.base, timeout=WAIT) as http:
            created = await http.post("/orders", json={"id": "o-1", "item": "book"})
            assert created.status_code == 201, created.text
            body = created.json()
            assert body["order"] == {"id": "o-1", "item": "book", "quantity": 1}
            assert body["offset"] == 1
            got = await sub_events.next("publication")
            assert got.pub.data == {"id": "o-1", "item": "book", "quantity": 1}
            assert got.pub.offset == 1

            # The hub's HTTP API, under the mount point.
            api = await http.post(
                "/realtime/api/publish",
                json={"channel": "orders", "data": {"id": "o-2", "item": "pen"}},
                headers={"X-API-Key": API_KEY},
            )
            assert api.json() == {"result": {"offset": 2, "epoch": body["epoch"]}}
            assert (await sub_events.next("publication")).pub.data == {"id": "o-2", "item": "pen"}
            history = await http.post(
                "/realtime/api/history",
                json={"channel": "orders", "limit": 10},
                headers={"X-API-Key": API_KEY},
            )
            assert [p["data"]["id"] for p in history.json()["result"]["publications"]] == [
                "o-1",
                "o-2",
            ]
            assert (await http.get("/realtime/readyz")).json() == {"status": "ok"}
            metrics = await http.get("/realtime/metrics")
            assert 'eventcast_connections{transport="websocket"} 1.0' in metrics.text
            # The host's own routes are unaffected by the mount.
            assert (await http.get("/openapi.json")).json()["info"]["title"] == "orders"

        # Shutdown: uvicorn closes the WebSocket, the host's lifespan closes the hub.
        await running.stop()
        # Plain uvicorn closes WebSockets itself before the lifespan ends (no 3001,
        # which needs eventcast serve): the SDK sees the transport close and reconnects.
        connecting = await events.next("connecting")
        assert (connecting.code, connecting.reason) == (1, "transport closed")
        assert client.state == ClientState.CONNECTING
        assert example.hub.closing
        assert example.hub.bus.closed
        assert example.hub.connections == {}
    finally:
        await clients.close()
        if not running.task.done():
            await running.stop()


async def test_hub_lifespan_opens_and_closes_the_hub(tmp_path: Path) -> None:
    realtime = create_app(make_settings(tmp_path))
    async with hub_lifespan(realtime) as hub:
        assert hub is realtime.hub
        event = await hub.bus.publish("news.lifespan", {"n": 1})
        assert event.offset == 1
        assert not hub.bus.closed
    assert realtime.hub.bus.closed
    assert realtime.hub.closing


async def test_a_raw_client_through_the_mount(example: Any) -> None:
    running = await run(example.app)
    try:
        async with await RawClient.open(running.ws_url) as client:
            await client.connect(token("bob"))
            await client.subscribe("orders")
            async with httpx.AsyncClient(base_url=running.base, timeout=WAIT) as http:
                response = await http.post(
                    "/orders", json={"id": "o-9", "item": "cup", "quantity": 2}
                )
            assert response.status_code == 201
            push = await client.publication()
            assert push["channel"] == "orders"
            assert push["pub"]["data"] == {"id": "o-9", "item": "cup", "quantity": 2}
    finally:
        await running.stop()
