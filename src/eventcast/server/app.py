"""The hub as an ASGI application (Starlette), and ``eventcast serve``.

``create_app(settings)`` returns the app; its lifespan opens the bus and log and
closes them, telling every client to reconnect. ``serve()`` runs it under
uvicorn with uvloop and httptools, permessage-deflate off, and the message size
limit enforced by the WebSocket layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, Final

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..exceptions import EventcastError
from . import _uvicorn
from ._http import RequestLimits
from ._logs import configure_logging, install_redaction
from ._uvicorn import websocket_transport
from .api import ApiEndpoint, api_method
from .config import Settings
from .connection import Connection
from .dashboard import dashboard_routes, log_access_mode
from .driver import finish, keep_alive, run_frame
from .emulation import EmulationEndpoint, HttpStreamEndpoint, SSERoute
from .hooks import Hooks
from .httpio import accept_websocket, websocket_terms
from .hub import Hub
from .metrics import metrics_endpoint
from .unidirectional import UniHttpStreamEndpoint, UniSSEEndpoint, UniWebSocketEndpoint

__all__ = ["HubApp", "create_app", "serve"]

logger = logging.getLogger("eventcast.server")


class WebSocketEndpoint:
    """``/connection/websocket``: the Centrifuge client protocol, JSON or Protobuf.

    A client asks for Protobuf as the SDKs do (the subprotocol
    ``centrifuge-protobuf``, echoed in the handshake answer, or
    ``?cf_protocol=protobuf`` / ``?format=protobuf``): see
    :func:`~eventcast.protocol.encodings.websocket_encoding`.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        hub: Hub = app.state.hub
        settings = hub.settings
        if not await accept_websocket(hub, scope, receive, send, "websocket"):
            return
        encoding, subprotocol = websocket_terms(scope)
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if subprotocol is not None:
            accept["subprotocol"] = subprotocol
        await send(accept)
        raw_send = scope.get("eventcast.send", send)
        transport = websocket_transport(raw_send)
        conn = hub.new_connection(
            send=raw_send if transport is not None else send,
            transport=transport,
            scope=scope,
            encoding=encoding,
        )
        cancel = keep_alive(conn, settings)
        try:
            await self._serve(conn, hub, receive, settings.max_message_size)
        finally:
            await finish(conn, cancel)

    async def _serve(self, conn: Connection, hub: Hub, receive: Receive, limit: int) -> None:
        while conn.is_open():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                conn.lost()
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            await run_frame(hub, conn, data, limit)


class HubApp(Starlette):
    """The hub's Starlette application; ``app.state.hub`` is the :class:`Hub`."""

    hub: Hub
    #: Why the lifespan could not start the hub, when it was the hub's own error.
    startup_error: EventcastError | None = None
    #: ``POST /api/<method>`` behind the app's middleware, taken ahead of the
    #: router (the API is the hub's busiest plain HTTP endpoint).
    api: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Starlette runs the lifespan; an unreachable log or backplane is an
            # operations problem, not a bug, so its report is one clear line
            # instead of the traceback Starlette formats.
            async def send_clearly(message: MutableMapping[str, Any]) -> None:
                error = self.startup_error
                if message["type"] == "lifespan.startup.failed" and error is not None:
                    message = {**message, "message": f"eventcast could not start: {error}"}
                await send(message)

            await super().__call__(scope, receive, send_clearly)
            return
        if scope["type"] in ("websocket", "http"):
            # Keep the server's own send callable for the fast path: Starlette's
            # middleware wraps the one the endpoint receives.
            scope["eventcast.send"] = send
            if (
                self.api is not None
                and scope["type"] == "http"
                and scope["method"] == "POST"
                and not scope.get("root_path")  # mounted: the router finds the route
            ):
                method = api_method(scope["path"])
                if method is not None:
                    scope["app"] = self
                    scope["path_params"] = {"method": method}
                    await self.api(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


async def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the log accepts writes and the backplane is connected.

    The state of each consumer is reported under ``consumers`` (a consumer
    retrying its source does not make the hub unready: clients are served).
    """
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
    body: dict[str, Any] = {"status": "ok"}
    consumers = hub.consumers
    if consumers:
        body["consumers"] = {c.name: c.state.value for c in consumers}
    if problems:
        body.update(status="unavailable", problems=problems)
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


async def asyncapi_endpoint(request: Request) -> Response:
    """The hub's AsyncAPI 3.0 document (the ``asyncapi`` setting turns it on)."""
    from .asyncapi import asyncapi_document

    hub: Hub = request.app.state.hub
    host = request.headers.get("host") or "localhost"
    document = asyncapi_document(hub.settings, host=host, secure=request.url.scheme == "https")
    return JSONResponse(document)


def create_app(
    settings: Settings | None = None, *, hub: Hub | None = None, hooks: Hooks | None = None
) -> HubApp:
    """Build the hub's ASGI app. Its lifespan opens the bus and log and closes them.

    Args:
        settings: the hub's settings (default: :meth:`Settings.load`).
        hub: an existing hub to serve (then ``settings`` and ``hooks`` are its own).
        hooks: the application's in-process hooks (:class:`~eventcast.server.hooks.AppHooks`).
    """
    if hub is None:
        hub = Hub(settings or Settings.load(), hooks=hooks)

    settings = hub.settings
    install_redaction()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await hub.start()
        except EventcastError as exc:
            assert isinstance(app, HubApp)
            app.startup_error = exc
            await hub.close()
            raise
        log_access_mode(settings)
        try:
            yield
        finally:
            await hub.close()

    api = ApiEndpoint(hub)
    middleware = [
        # Outermost: every part of the hub sees a forwarded request's own client.
        Middleware(_uvicorn.forwarded_headers, trusted_hosts=settings.forwarded_allow_ips),
        Middleware(RequestLimits, max_body=settings.max_body_size, timeout=settings.body_timeout),
    ]
    app = HubApp(
        routes=[
            *([Route("/asyncapi.json", asyncapi_endpoint)] if hub.settings.asyncapi else []),
            WebSocketRoute("/connection/websocket", WebSocketEndpoint()),
            Route("/connection/sse", SSERoute(), methods=["GET"]),
            Route("/connection/http_stream", HttpStreamEndpoint(), methods=["POST", "OPTIONS"]),
            Route("/emulation", EmulationEndpoint(), methods=["POST", "OPTIONS"]),
            WebSocketRoute("/connection/uni_websocket", UniWebSocketEndpoint()),
            Route(
                "/connection/uni_http_stream", UniHttpStreamEndpoint(), methods=["POST", "OPTIONS"]
            ),
            Route("/connection/uni_sse", UniSSEEndpoint(), methods=["GET", "POST", "OPTIONS"]),
            Route("/api/{method}", api, methods=["POST"]),
            Route("/metrics", metrics_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            *dashboard_routes(settings),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.hub = hub
    app.hub = hub
    stack: ASGIApp = api
    for cls, args, kwargs in reversed(middleware):
        stack = cls(stack, *args, **kwargs)
    app.api = stack
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


#: The collector's thresholds under ``eventcast serve`` (see :func:`tune_collector`).
COLLECTOR_THRESHOLDS: Final = (50_000, 20, 100)


def tune_collector() -> None:
    """Keep the garbage collector's full passes rare and short in a standalone hub.

    A hub with thousands of connections holds millions of tracked objects, and
    each full collection walks them all (200 to 250 ms with 4,000 clients), during
    which no client is served (the half-load p99 of docs/performance.md). This
    freezes what exists after start-up (imported modules, settings, the app:
    never garbage, now never walked again) and raises the thresholds, so young
    collections run about 70x less often and full ones far less often (older
    generations every 20 and 100 collections of the younger one, against 10
    and 10). Cyclic garbage is still collected. ``eventcast serve`` calls it;
    a host application that mounts the hub keeps its own collector settings.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the hub under uvicorn until interrupted (SIGINT or SIGTERM)."""
    import uvicorn

    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    options: MutableMapping[str, Any] = uvicorn_config(settings, host=host, port=port)
    config = uvicorn.Config(app, **options)
    server = make_server(app, config)
    tune_collector()
    server.run()
