"""A FastAPI application whose ``POST /orders`` route publishes to the hub it mounts.

Production builds it around the hub of its settings::

    app = create_api(create_app(Settings.load()))

and its tests around a :class:`~eventcast.testing.TestHub`'s (``test_orders.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from eventcast.asgi import HubApp, hub_lifespan


class Order(BaseModel):
    """What the ``orders`` namespace carries (its ``schema``)."""

    id: str
    item: str
    quantity: int = 1


def create_api(realtime: HubApp) -> FastAPI:
    """The application, with the hub mounted at ``/realtime``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with hub_lifespan(realtime):
            yield

    api = FastAPI(lifespan=lifespan)
    api.mount("/realtime", realtime)

    @api.post("/orders", status_code=201)
    async def create_order(order: Order) -> dict[str, Any]:
        event = await realtime.hub.bus.publish("orders:new", order.model_dump())
        return {"offset": event.offset}

    return api
