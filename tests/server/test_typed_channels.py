"""Typed channels through the hub: client publishes, the HTTP API, metrics, typed subscriptions."""

from __future__ import annotations

import logging

import msgspec
import pytest

from eventcast.exceptions import InvalidDataError, ReplyError
from eventcast.server.config import Settings
from eventcast.testing import TestHub, assert_received, wait_for_publication


class Order(msgspec.Struct):
    id: str
    quantity: int


ORDERS = {
    "name": "orders",
    "history_size": 10,
    "allow_subscribe_for_client": True,
    "allow_publish_for_client": True,
    "schema": {
        "type": "object",
        "properties": {"id": {"type": "string"}, "quantity": {"type": "integer"}},
        "required": ["id", "quantity"],
    },
}


async def test_every_entry_point_refuses_data_breaking_the_schema(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "a-body-that-must-not-be-logged"
    async with TestHub(namespaces=[ORDERS]) as hub, hub.client(user="alice") as alice:
        async with alice.subscribe("orders:eu") as sub:
            with pytest.raises(ReplyError) as by_client:
                await alice.publish("orders:eu", {"id": "o-1", "quantity": secret})
            assert by_client.value.code == 107
            assert "does not match the schema" in by_client.value.message
            assert "$.quantity" in by_client.value.message
            with pytest.raises(ReplyError) as by_api:
                await hub.publish("orders:eu", {"quantity": 1})
            assert by_api.value.code == 107
            assert "required" in by_api.value.message
            with pytest.raises(InvalidDataError):
                await hub.bus.publish("orders:eu", {"id": 5, "quantity": 1})
            await alice.publish("orders:eu", {"id": "o-2", "quantity": 2})
            await hub.publish("orders:eu", {"id": "o-3", "quantity": 3})
            events = await assert_received(
                sub, [{"id": "o-2", "quantity": 2}, {"id": "o-3", "quantity": 3}]
            )
            assert [e.offset for e in events] == [1, 2]  # nothing refused was stored
        metrics = (await hub.http.get("/metrics")).text
        assert (
            'eventcast_publications_refused_total{namespace="orders",reason="schema"} 3.0'
            in metrics
        )
        batch = await hub.api(
            "batch",
            commands=[
                {"publish": {"channel": "orders:eu", "data": {"id": "ok", "quantity": 1}}},
                {"publish": {"channel": "orders:eu", "data": []}},
            ],
        )
        assert "publish" in batch["replies"][0]
        assert batch["replies"][1]["error"]["code"] == 107
    assert secret not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_live_typed_channel_refuses_misfits_on_the_api_paths_without_await() -> None:
    # A live channel's publications (the first one included) run without a
    # coroutine; the schema's refusal is the same 107 there.
    live = {**ORDERS, "name": "ticks", "history_size": 0}
    async with TestHub(namespaces=[live]) as hub, hub.client(user="alice") as alice:
        async with alice.subscribe("ticks:eu") as sub:
            with pytest.raises(ReplyError) as by_api:
                await hub.publish("ticks:eu", {"quantity": 1})  # the channel's first
            assert by_api.value.code == 107
            assert "required" in by_api.value.message
            batch = await hub.api(
                "batch",
                commands=[
                    {"publish": {"channel": "ticks:eu", "data": {"id": "a", "quantity": 1}}},
                    {"publish": {"channel": "ticks:eu", "data": {"id": 2}}},
                    {"publish": {"channel": "ticks:eu", "data": {"id": "b", "quantity": 2}}},
                ],
            )
            assert batch["replies"][0] == batch["replies"][2] == {"publish": {}}
            assert batch["replies"][1]["error"]["code"] == 107
            await assert_received(sub, [{"id": "a", "quantity": 1}, {"id": "b", "quantity": 2}])
        metrics = (await hub.http.get("/metrics")).text
        assert (
            'eventcast_publications_refused_total{namespace="ticks",reason="schema"} 2.0' in metrics
        )


async def test_typed_subscription_decodes_and_flags_misfits() -> None:
    untyped = {**ORDERS, "name": "free", "schema": None, "allow_history_for_client": True}
    async with TestHub(namespaces=[untyped]) as hub, hub.client(user="alice") as alice:
        async with alice.subscribe("free:x", type=Order) as sub:
            await hub.publish("free:x", {"id": "o-1", "quantity": 1})
            await hub.publish("free:x", {"id": "o-2"})
            await hub.publish("free:x", {"id": "o-3", "quantity": 3})
            assert (await wait_for_publication(sub)).data == Order("o-1", 1)
            with pytest.raises(InvalidDataError, match="does not fit Order"):
                await wait_for_publication(sub)
            event = await wait_for_publication(sub)  # the stream goes on
            assert event.data == Order("o-3", 3)
            assert event.offset == 3
        history = await alice.history("free:x", limit=1, since=(0, event.epoch or ""), type=Order)
        assert history.events[0].data == Order("o-1", 1)


def test_schema_from_toml(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    config = tmp_path / "eventcast.toml"
    config.write_text(
        '[[namespaces]]\nname = "orders"\n[namespaces.schema]\ntype = "object"\nrequired = ["id"]\n'
    )
    ns = Settings.load(config).namespace("orders:x")
    assert ns is not None
    assert ns.data_schema is not None
    assert ns.to_bus().schema is ns.data_schema
