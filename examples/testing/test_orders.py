"""The orders API tested end to end with eventcast.testing: no server, no port."""

from __future__ import annotations

import httpx
import pytest
from orders import Order, create_api

from eventcast.exceptions import ReplyError
from eventcast.testing import TestHub, wait_for_publication

NAMESPACES = [
    {
        "name": "orders",
        "history_size": 100,
        "history_ttl": 300,
        "allow_subscribe_for_client": True,
        "schema": Order,
    },
    {"name": "admin"},  # no client may subscribe
]


async def test_new_orders_reach_subscribers() -> None:
    async with TestHub(namespaces=NAMESPACES) as hub:
        api = create_api(hub.app)
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=api), base_url="http://test"
            ) as http,
            hub.client(user="alice") as alice,
            alice.subscribe("orders:new", type=Order) as orders,
        ):
            response = await http.post("/orders", json={"id": "o-1", "item": "book"})
            assert response.status_code == 201
            event = await wait_for_publication(orders)
            assert event.data == Order(id="o-1", item="book", quantity=1)

            # A network failure: alice reconnects and recovers what she missed.
            await hub.disconnect(alice)
            await http.post("/orders", json={"id": "o-2", "item": "pen", "quantity": 3})
            event = await wait_for_publication(orders)
            assert event.data.id == "o-2"
            assert orders.recovered

            # A channel alice has no right to.
            with pytest.raises(ReplyError) as refused:
                await alice.subscribe("admin:audit")
            assert refused.value.code == 103  # permission denied
