"""The hub as an ASGI application (Starlette), and ``eventcast serve``.

``create_app(settings)`` returns the app; its lifespan opens the bus and log and
closes them, telling every client to reconnect. ``serve()`` runs it under
uvicorn with uvloop and httptools, permessage-deflate off, and the message size
limit enforced by the WebSocket layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from ..protocol import codes
from ..protocol.codes import Disconnect
from . import _uvicorn
from ._http import RequestLimits
from ._logs import configure_logging, install_redaction
from ._uvicorn import websocket_transport as _raw_transport
from .api import handle_api
from .config import Settings
from .connection import Connection
from .dashboard import dashboard_routes, log_access_mode
from .hub import Hub
from .metrics import metrics_endpoint
from .sse import SSEEndpoint

__all__ = ["HubApp", "create_app", "serve"]

logger = logging.getLogger("eventcast.server")


class WebSocketEndpoint:
    """``/connection/websocket``: the Centrifuge client protocol, JSON encoding."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        hub: Hub = app.state.hub
        settings = hub.settings
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        refusal = hub.check_handshake(scope, "websocket")
        if refusal is not None:
            await _deny(scope, send, *refusal)
            return
        await send({"type": "websocket.accept"})
        raw_send = scope.get("eventcast.send", send)
        transport = _raw_transport(raw_send)
        conn = Connection(
            hub,
            send=raw_send if transport is not None else send,
            transport=transport,
            queue_limit=settings.client_queue_bytes,
            max_bad_commands=settings.max_bad_commands,
        )
        loop = asyncio.get_running_loop()
        stale = loop.call_later(settings.handshake_timeout, self._stale, conn)
        pinger = loop.call_later(settings.ping_interval, self._ping, conn, -1)
        try:
            await self._serve(conn, hub, receive, settings.max_message_size)
        finally:
            stale.cancel()
            pinger.cancel()
            if not conn.closed:
                conn.lost()
            # Returning ends the ASGI connection: first let the close frame go out.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await conn.wait_closed()

    @staticmethod
    def _stale(conn: Connection) -> None:
        if not conn.session.connected_state and not conn.closed:
            conn.close(codes.DISCONNECT_STALE)

    def _ping(self, conn: Connection, pongs_before: int) -> None:
        if conn.closed:
            return
        settings = conn.hub.settings
        loop = asyncio.get_running_loop()
        if not conn.session.connected_state:
            loop.call_later(settings.ping_interval, self._ping, conn, -1)
            return
        conn.session.ping()
        conn.send_session_output()
        pongs = conn.session.pongs
        loop.call_later(settings.pong_timeout, self._check_pong, conn, pongs)

    def _check_pong(self, conn: Connection, pongs_at_ping: int) -> None:
        if conn.closed:
            return
        if conn.session.pongs == pongs_at_ping:
            conn.close(codes.DISCONNECT_NO_PONG)
            return
        settings = conn.hub.settings
        asyncio.get_running_loop().call_later(
            max(0.0, settings.ping_interval - settings.pong_timeout), self._ping, conn, -1
        )

    async def _serve(self, conn: Connection, hub: Hub, receive: Receive, limit: int) -> None:
        session = conn.session
        while conn.is_open():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                conn.lost()
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            conn.messages_in += 1
            conn.bytes_in += len(data)
            if len(data) > limit:
                conn.close(Disconnect(codes.CLOSE_MESSAGE_TOO_BIG, "message too big"))
                return
            requests = session.receive(data)
            i = 0
            while i < len(requests) and conn.is_open():
                request = requests[i]
                if not session.admit(request):
                    conn.send_session_output()
                    i += 1
                    continue
                if _durable_publish(hub, request):
                    # Consecutive durable publishes of one frame run together, so
                    # they share a group commit (replies carry their ids). Live
                    # publishes never wait, so they run in line: the whole frame
                    # then reaches the channel's dispatcher as one batch.
                    group = [request]
                    while (
                        i + len(group) < len(requests)
                        and _durable_publish(hub, requests[i + len(group)])
                        and session.admit(requests[i + len(group)])
                    ):
                        group.append(requests[i + len(group)])
                    if len(group) > 1:
                        await asyncio.gather(*(hub.handle(conn, r) for r in group))
                    else:
                        await hub.handle(conn, request)
                    i += len(group)
                    continue
                await hub.handle(conn, request)
                i += 1
            conn.send_session_output()


def _durable_publish(hub: Hub, request: Any) -> bool:
    """Whether a command publishes into a durable channel (its publish awaits a commit)."""
    if request.method != "publish":
        return False
    channel = getattr(request.body, "channel", "")
    try:
        return bool(channel) and hub.bus.namespace(channel).durable
    except Exception:
        return False


async def _deny(scope: Scope, send: Send, status: int, message: str) -> None:
    """Refuse a WebSocket handshake with an HTTP status (403, 429, 503)."""
    body = json.dumps({"error": message}).encode()
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # the server cannot send a status: a close before accept is a 403
        await send({"type": "websocket.close", "code": 1008})


class HubApp(Starlette):
    """The hub's Starlette application; ``app.state.hub`` is the :class:`Hub`."""

    hub: Hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] in ("websocket", "http"):
            # Keep the server's own send callable for the fast path: Starlette's
            # middleware wraps the one the endpoint receives.
            scope["eventcast.send"] = send
        await super().__call__(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """The ASGI lifespan protocol, with one clear line when the hub cannot start.

        An unreachable log or backplane is a configuration or operations
        problem, not a bug: the server reports it without a traceback.
        """
        from ..exceptions import EventcastError

        await receive()  # lifespan.startup
        context = self.router.lifespan_context(self)
        try:
            await context.__aenter__()
        except EventcastError as exc:
            await send(
                {"type": "lifespan.startup.failed", "message": f"eventcast could not start: {exc}"}
            )
            return
        except BaseException:
            import traceback

            await send({"type": "lifespan.startup.failed", "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await context.__aexit__(None, None, None)
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": f"{exc!r}"})
            return
        await send({"type": "lifespan.shutdown.complete"})


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the log accepts writes and the backplane is connected."""
    hub: Hub = request.app.state.hub
    problems: dict[str, str] = {}
    log = hub.bus.log
    if hub.closing:
        problems["hub"] = "shutting down"
    if not hub.backplane_up():
        problems["backplane"] = "disconnected"
    if log is not None:
        try:
            async with asyncio.timeout(5):
                await log.check()
        except Exception as exc:
            problems["log"] = type(exc).__name__
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ok"})


def create_app(settings: Settings | None = None, *, hub: Hub | None = None) -> HubApp:
    """Build the hub's ASGI app. Its lifespan opens the bus and log and closes them."""
    if hub is None:
        hub = Hub(settings or Settings.load())

    settings = hub.settings
    install_redaction()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        log_access_mode(settings)
        try:
            yield
        finally:
            await hub.close()

    app = HubApp(
        routes=[
            WebSocketRoute("/connection/websocket", WebSocketEndpoint()),
            Route("/connection/sse", SSEEndpoint(), methods=["GET"]),
            Route("/api/{method}", handle_api, methods=["POST"]),
            Route("/metrics", metrics_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            *dashboard_routes(settings),
        ],
        middleware=[
            # Outermost: every part of the hub sees a forwarded request's own client.
            Middleware(_uvicorn.forwarded_headers, trusted_hosts=settings.forwarded_allow_ips),
            Middleware(
                RequestLimits, max_body=settings.max_body_size, timeout=settings.body_timeout
            ),
        ],
        lifespan=lifespan,
    )
    app.state.hub = hub
    app.hub = hub
    return app


def uvicorn_config(settings: Settings, *, host: str, port: int) -> dict[str, Any]:
    """The uvicorn options ``eventcast serve`` uses."""
    return {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": _uvicorn.http_protocol(
            header_timeout=settings.handshake_timeout,
            body_timeout=settings.body_timeout,
            max_head=settings.max_header_size,
        ),
        "ws": _uvicorn.websocket_protocol(),
        "ws_max_size": settings.max_message_size,
        "ws_per_message_deflate": False,
        "ws_ping_interval": None,
        # The app applies forwarded headers itself (settings.forwarded_allow_ips).
        "proxy_headers": False,
        "lifespan": "on",
        "log_level": settings.log_level,
        "log_config": None,
        "timeout_graceful_shutdown": 10,
    }


def make_server(app: HubApp, config: Any) -> Any:
    """A uvicorn server that tells clients to reconnect before it closes connections.

    On SIGTERM or SIGINT, WebSocket clients get 3001 "shutdown" and SSE streams
    end with a retry hint while the log is still open; then uvicorn closes what
    is left and the lifespan closes the bus and the log.
    """
    return _uvicorn.make_server(config, before_shutdown=app.hub.begin_shutdown)


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the hub under uvicorn until interrupted (SIGINT or SIGTERM)."""
    import uvicorn

    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    options: MutableMapping[str, Any] = uvicorn_config(settings, host=host, port=port)
    config = uvicorn.Config(app, **options)
    make_server(app, config).run()
