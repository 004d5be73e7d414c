"""A FastAPI application with the eventcast hub mounted at ``/realtime``.

Run it with uvicorn (settings come from ``EVENTCAST_*`` environment variables
and, optionally, the TOML file named by ``EVENTCAST_CONFIG``)::

    EVENTCAST_TOKEN_HMAC_SECRET=change-me EVENTCAST_API_KEY=change-me-too \\
        uvicorn fastapi_app:app --app-dir examples

* Clients connect to ``ws://HOST/realtime/connection/websocket`` (Centrifuge
  protocol) or ``http://HOST/realtime/connection/sse?topic=orders``.
* The hub's HTTP API is at ``/realtime/api/<method>``, its metrics at
  ``/realtime/metrics``.
* ``POST /orders`` publishes the order to the ``orders`` channel in process.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from eventcast.asgi import create_app, hub_lifespan
from eventcast.server.config import Settings

settings = Settings.load(os.environ.get("EVENTCAST_CONFIG") or None)
realtime = create_app(settings)
hub = realtime.hub


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Starlette does not run a mounted app's lifespan: enter the hub's here.
    async with hub_lifespan(realtime):
        # ... open the application's own resources here ...
        yield


app = FastAPI(title="orders", lifespan=lifespan)
app.mount("/realtime", realtime)


class Order(BaseModel):
    id: str
    item: str
    quantity: int = 1


@app.post("/orders", status_code=201)
async def create_order(order: Order) -> dict[str, Any]:
    """Store the order (not shown), then tell every subscriber of ``orders``."""
    event = await hub.publish("orders", order.model_dump())
    return {"order": order.model_dump(), "offset": event.offset, "epoch": event.epoch}
