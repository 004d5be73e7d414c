"""The AsyncAPI 3.0 document: valid against the official schema, true to the settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from eventcast.cli import main
from eventcast.server.asyncapi import asyncapi_document
from eventcast.server.config import Settings
from eventcast.testing import TestHub
from tests.conftest import REQUIRE_SERVICES

SPECS = Path(__file__).resolve().parents[1] / "js" / "node_modules" / "@asyncapi" / "specs"


class Line(msgspec.Struct):
    sku: str
    quantity: int


class Order(msgspec.Struct):
    id: str
    lines: list[Line]


NAMESPACES: list[dict[str, Any]] = [
    {
        "name": "orders",
        "history_size": 10,
        "allow_subscribe_for_client": True,
        "allow_publish_for_client": True,
        "schema": Order,
    },
    {
        "name": "prices",
        "allow_subscribe_for_anonymous": True,
        "allow_subscribe_for_client": True,
        "allow_patterns": True,
        "schema": {"title": "Price", "type": "object", "required": ["symbol", "bid"]},
    },
    {"name": "admin"},
]


def validator() -> Any:
    """A validator of the official AsyncAPI 3.0.0 JSON Schema (npm @asyncapi/specs)."""
    jsonschema = pytest.importorskip("jsonschema")
    path = SPECS / "schemas" / "3.0.0.json"
    if not path.is_file():
        message = "tests/js/node_modules/@asyncapi/specs is missing: run scripts/setup.sh"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    schema = json.loads(path.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def assert_valid(document: dict[str, Any]) -> None:
    errors = sorted(validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_the_official_schema_catches_a_broken_document() -> None:
    document = asyncapi_document(Settings.load(namespaces=NAMESPACES))
    del document["servers"]["websocket"]["protocol"]
    assert list(validator().iter_errors(document))
    document = asyncapi_document(Settings.load(namespaces=NAMESPACES))
    document["operations"]["orders.receive"]["action"] = "publish"  # AsyncAPI 2's word
    assert list(validator().iter_errors(document))
    document = asyncapi_document(Settings.load(namespaces=NAMESPACES))
    document["channels"]["admin"]["messages"]["publication"]["payload"] = {"type": 5}
    assert list(validator().iter_errors(document))


def test_document_is_valid_and_follows_the_namespaces() -> None:
    document = asyncapi_document(
        Settings.load(namespaces=NAMESPACES), host="rt.example.com", secure=True
    )
    assert_valid(document)
    assert document["asyncapi"] == "3.0.0"
    assert document["servers"]["websocket"]["protocol"] == "wss"
    assert document["servers"]["sse"]["pathname"] == "/connection/sse"
    channels = document["channels"]
    assert set(channels) == {"default", "orders", "prices", "admin"}
    assert channels["orders"]["address"] == "orders:{channel}"
    payload = channels["orders"]["messages"]["publication"]["payload"]
    assert payload == {"$ref": "#/components/schemas/Order"}
    schemas = document["components"]["schemas"]
    assert schemas["Order"]["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/Line"}
    assert channels["prices"]["messages"]["publication"]["payload"]["title"] == "Price"
    operations = document["operations"]
    assert operations["orders.send"]["action"] == "send"
    assert "orders.receive" in operations
    assert "prices.send" not in operations  # clients may not publish there
    assert "admin.send" not in operations
    assert "subscription token" in operations["admin.receive"]["description"]
    assert channels["prices"]["x-eventcast-permissions"]["allow_patterns"] is True


def test_cli_writes_the_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "eventcast.toml"
    config.write_text(
        '[[namespaces]]\nname = "news"\nallow_subscribe_for_client = true\n'
        '[namespaces.schema]\ntype = "object"\nrequired = ["title"]\n'
    )
    assert main(["asyncapi", "--config", str(config), "--host", "hub:9000"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert_valid(document)
    payload = document["channels"]["news"]["messages"]["publication"]["payload"]
    assert payload == {"type": "object", "required": ["title"]}
    out = tmp_path / "asyncapi.json"
    assert main(["asyncapi", "--config", str(config), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["servers"]["websocket"]["host"] == "localhost:8000"


async def test_served_only_when_enabled() -> None:
    async with TestHub() as hub:
        assert (await hub.http.get("/asyncapi.json")).status_code == 404
    async with TestHub(asyncapi=True, namespaces=NAMESPACES) as hub:
        response = await hub.http.get("/asyncapi.json")
        assert response.status_code == 200
        document = response.json()
        assert document["servers"]["websocket"]["host"] == "testhub"
        assert_valid(document)
