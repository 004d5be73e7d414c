"""Typed channels on the bus: msgspec Structs, pydantic models and JSON Schemas."""

from __future__ import annotations

from typing import Any

import msgspec
import pydantic
import pytest

from eventcast import Bus
from eventcast.bus import Namespace
from eventcast.exceptions import ConfigurationError, InvalidDataError
from eventcast.schema import Schema, compile_schema, decoder_for


class Order(msgspec.Struct):
    id: str
    quantity: int


class PydanticOrder(pydantic.BaseModel):
    id: str
    quantity: int


JSON_ORDER: dict[str, Any] = {
    "title": "Order",
    "type": "object",
    "properties": {"id": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
    "required": ["id", "quantity"],
}

SPECS = pytest.mark.parametrize("spec", [Order, PydanticOrder, JSON_ORDER], ids=str)


@SPECS
async def test_valid_data_is_published_as_is(spec: Any) -> None:
    async with Bus(namespaces={"orders": Namespace(schema=spec)}) as bus:
        async with bus.subscribe("orders:*") as sub:
            data = {"id": "o-1", "quantity": 2}
            event = await bus.publish("orders:eu", data)
            assert event.data is data  # not converted: encoded once, as any event
            assert (await sub.get()).data is data
        await bus.publish("elsewhere", {"anything": True})  # other namespaces are untyped


@SPECS
async def test_invalid_data_is_refused_by_every_publish(spec: Any) -> None:
    async with Bus(namespaces={"orders": Namespace(schema=spec)}) as bus:
        schema = bus.namespaces["orders"].schema
        assert isinstance(schema, Schema)
        async with bus.subscribe("orders:*") as sub:
            secret = "do-not-log-this-value"
            with pytest.raises(InvalidDataError, match=r"'orders:eu'.*quantity") as refused:
                await bus.publish("orders:eu", {"id": "o-1", "quantity": secret})
            assert secret not in str(refused.value)
            assert refused.value.topic == "orders:eu"
            with pytest.raises(InvalidDataError):
                bus.publish_nowait("orders:eu", {"id": "o-1"})
            with pytest.raises(InvalidDataError):
                await bus.publish_many(
                    [("orders:eu", {"id": "o-2", "quantity": 1}), ("orders:eu", 7)]
                )
            with pytest.raises(InvalidDataError, match="not JSON"):
                await bus.publish("orders:eu", b"\xff not json")
            assert schema.refused == 4
            assert sub.statistics().delivered == 0  # nothing of a refused batch went out


async def test_instances_of_the_declared_type_pass() -> None:
    async with Bus(
        namespaces={"a": Namespace(schema=Order), "b": Namespace(schema=PydanticOrder)}
    ) as bus:
        await bus.publish("a:x", Order(id="o", quantity=1))
        await bus.publish("b:x", PydanticOrder(id="o", quantity=1))
        await bus.publish("a:x", b'{"id": "o", "quantity": 3}')  # encoded JSON is checked too


def test_bad_schemas_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="msgspec Struct"):
        Namespace(schema=int)
    with pytest.raises(ConfigurationError, match="invalid JSON Schema"):
        compile_schema({"type": "no-such-type"})
    assert compile_schema(Order).json_schema["$ref"] == "#/$defs/Order"
    assert compile_schema(JSON_ORDER).name == "Order"


@pytest.mark.parametrize("tp", [Order, PydanticOrder])
def test_decoders(tp: Any) -> None:
    decode = decoder_for(tp)
    assert decode(b'{"id": "o", "quantity": 2}', "t") == tp(id="o", quantity=2)
    with pytest.raises(InvalidDataError, match="does not fit"):
        decode(b'{"id": "o"}', "t")
    assert decoder_for(dict[str, int])(b'{"a": 1}', "t") == {"a": 1}
    with pytest.raises(ConfigurationError):
        decoder_for(object())
