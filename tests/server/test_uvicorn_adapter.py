"""The uvicorn adapter (``eventcast.server._uvicorn``): every internal it relies on is there.

Each check fails with a message naming the installed uvicorn version, so an
upgrade that changed an internal says so at once instead of quietly removing a
protection. The behaviour built on them is tested over real sockets in
``test_security.py`` (head and body bounds, quiet 1007), ``test_shutdown.py``
(the graceful server) and here (the fast-path transports).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect

from eventcast.exceptions import ConfigurationError
from eventcast.server import _uvicorn

from .conftest import StartHub
from .hubtools import WAIT, RawClient, token

VERSION = uvicorn.__version__


def _internal_ids() -> list[str]:
    return [f"{cls}.{name}" for _, cls, names in _uvicorn._INTERNALS for name in names]


@pytest.mark.parametrize(
    ("module", "cls", "name"),
    [(m, c, n) for m, c, names in _uvicorn._INTERNALS for n in names],
    ids=_internal_ids(),
)
def test_each_internal_exists(module: str, cls: str, name: str) -> None:
    try:
        owner = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        pytest.fail(f"uvicorn {VERSION} has no {module}.{cls}, which eventcast's adapter uses")
    if not hasattr(owner, name):
        pytest.fail(f"uvicorn {VERSION}: {cls}.{name} is gone; eventcast's adapter relies on it")


def test_every_internal_the_adapter_uses_is_there() -> None:
    _uvicorn._missing.cache_clear()
    missing = _uvicorn._missing()
    if missing:
        pytest.fail(f"uvicorn {VERSION} lacks what eventcast's adapter uses: {', '.join(missing)}")
    _uvicorn.check()  # what make_server() runs at start


def test_a_missing_internal_fails_loudly_with_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    internals = (*_uvicorn._INTERNALS, ("uvicorn.server", "Server", ("no_such_method",)))
    monkeypatch.setattr(_uvicorn, "_INTERNALS", internals)
    monkeypatch.setitem(_uvicorn._INSTANCE_ATTRIBUTES, "Server", ("_no_such_attribute",))
    _uvicorn._missing.cache_clear()  # checked once per process otherwise
    try:
        with pytest.raises(ConfigurationError) as raised:
            _uvicorn.check()
    finally:
        _uvicorn._missing.cache_clear()
    message = str(raised.value)
    assert f"uvicorn {VERSION} lacks" in message
    assert "Server.no_such_method" in message
    assert "Server()._no_such_attribute" in message
    try:
        with pytest.raises(ConfigurationError, match=f"uvicorn {VERSION}"):
            _uvicorn.make_server(uvicorn.Config(app="nowhere:app"), before_shutdown=_noop)
    finally:
        _uvicorn._missing.cache_clear()


async def _noop() -> None:
    return None


def test_the_protocol_classes_subclass_uvicorns() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    http = _uvicorn.http_protocol(header_timeout=1, body_timeout=1, max_head=1024)
    assert issubclass(http, HttpToolsProtocol), f"uvicorn {VERSION}"
    other = _uvicorn.websocket_protocol().other  # type: ignore[attr-defined]
    assert issubclass(other, WebSocketsSansIOProtocol), f"uvicorn {VERSION}"


async def test_the_hubs_websocket_endpoints_get_its_own_protocol_and_others_uvicorns(
    start_hub: StartHub,
) -> None:
    """Both WebSocket endpoints are served by HubWebSocket; any other upgrade by the ASGI app."""
    from websockets.exceptions import InvalidStatus

    from eventcast.server.websocket import HubWebSocket

    hub = await start_hub()
    async with await RawClient.open(hub.ws_url) as client:
        connected = await client.connect(token("own"))
        conn = hub.hub.connections[connected["client"]]
        assert isinstance(getattr(conn._send, "__self__", None), HubWebSocket)
        assert conn.fast_path
    uni = hub.ws_url.replace("/connection/websocket", "/connection/uni_websocket")
    async with connect(uni, open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"token": token("uni")}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert "connect" in reply, reply
        [conn] = [c for c in hub.hub.connections.values() if c.transport_name == "uni_websocket"]
        assert isinstance(getattr(conn._send, "__self__", None), HubWebSocket)
        assert conn.fast_path
    # No route: uvicorn's protocol hands it to the app, whose router refuses it.
    elsewhere = hub.ws_url.replace("/connection/websocket", "/connection/nowhere")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(elsewhere, open_timeout=WAIT):
            pass
    assert refused.value.response.status_code == 403


async def test_the_fast_path_finds_uvicorns_transports(start_hub: StartHub) -> None:
    """Under ``eventcast serve``, WebSocket and SSE connections write straight to the socket."""
    hub = await start_hub()
    async with await RawClient.open(hub.ws_url) as client:
        connected = await client.connect(token("fast"))
        conn = hub.hub.connections[connected["client"]]
        assert conn.fast_path, f"uvicorn {VERSION}: no transport behind the WebSocket send"
    async with (
        httpx.AsyncClient(timeout=WAIT) as http,
        http.stream(
            "GET",
            f"{hub.base}/connection/sse",
            params={"topic": "a"},
            headers={"Authorization": f"Bearer {token('fast-sse')}"},
        ) as response,
    ):
        lines = response.aiter_lines()
        while await anext(lines) != "event: subscribed":
            pass
        assert json.loads((await anext(lines)).removeprefix("data: "))["topics"] == ["a"]
        [conn] = [c for c in hub.hub.connections.values() if c.sse]
        assert conn.fast_path, f"uvicorn {VERSION}: no transport behind the SSE send"


def test_other_servers_get_the_portable_path() -> None:
    async def send(message: object) -> None:
        return None

    assert _uvicorn.websocket_transport(send) is None
    assert _uvicorn.http_transport(send) is None
    assert not _uvicorn.receive_ready(send)  # times every receive


def test_eventcast_serve_tunes_the_collector() -> None:
    """Start-up objects are frozen and the thresholds raised (in a process of its own)."""
    code = (
        "import gc\n"
        "from eventcast.server.app import COLLECTOR_THRESHOLDS, tune_collector\n"
        "tune_collector()\n"
        "assert gc.get_threshold() == COLLECTOR_THRESHOLDS, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
