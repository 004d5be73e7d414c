"""Embed the hub in another ASGI application (FastAPI, Starlette, ...).

.. code-block:: python

    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from eventcast.asgi import create_app, hub_lifespan

    realtime = create_app(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with hub_lifespan(realtime):  # opens the bus and log; closes them after
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount("/realtime", realtime)

    @app.post("/orders")
    async def create_order(order: dict) -> dict:
        await realtime.hub.publish("orders", order)  # in process: no HTTP hop
        return order

A mounted application's own lifespan is not run by Starlette or FastAPI: the
host must enter :func:`hub_lifespan` from its lifespan, or the hub is never
opened. See ``docs/embedding.md``.

The application decides who connects, subscribes and publishes, and answers
RPCs, with in-process hooks (``create_app(settings, hooks=hooks)``, see
``docs/hooks.md``)::

    hooks = AppHooks()

    @hooks.on_connect
    async def connect(request: ConnectRequest) -> ConnectResult:
        user = await user_of_session(request.cookies.get("session"))
        if user is None:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN)
        return ConnectResult(user=user.id, channels=[f"user:{user.id}"])
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from .server.app import HubApp, create_app
from .server.errors import CommandError
from .server.hooks import (
    AppHooks,
    ClientRequest,
    ConnectRequest,
    ConnectResult,
    Hooks,
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
from .server.hub import Hub

__all__ = [
    "AppHooks",
    "ClientRequest",
    "CommandError",
    "ConnectRequest",
    "ConnectResult",
    "Hooks",
    "Hub",
    "HubApp",
    "PublishRequest",
    "PublishResult",
    "RPCRequest",
    "RPCResult",
    "RefreshRequest",
    "RefreshResult",
    "SubRefreshRequest",
    "SubRefreshResult",
    "SubscribeOptions",
    "SubscribeRequest",
    "SubscribeResult",
    "create_app",
    "hub_lifespan",
]


@contextlib.asynccontextmanager
async def hub_lifespan(app: HubApp) -> AsyncIterator[Hub]:
    """Run the hub application's startup and shutdown around the ``async with`` body.

    On entry the hub opens its bus and log; on exit it tells connected clients
    to reconnect (3001) and closes the bus and the log. Yields the :class:`Hub`.
    """
    async with app.router.lifespan_context(app):
        yield app.hub
