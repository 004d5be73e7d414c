"""The sans-I/O parts of ingest: settings, decoding, channel templates, imports."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

import eventcast
from eventcast.exceptions import CommandRejectedError, ConfigurationError, IngestError
from eventcast.ingest.base import (
    Incoming,
    MqttOptions,
    decode_command,
    decode_data,
    render_channel,
)
from eventcast.server.config import Settings


def test_errors_are_exported_and_in_the_tree() -> None:
    for name in ("IngestError", "SourceError", "CommandRejectedError"):
        assert name in eventcast.__all__
        assert issubclass(getattr(eventcast, name), eventcast.EventcastError)
    assert issubclass(eventcast.CommandRejectedError, IngestError)
    assert CommandRejectedError("x").reason == "bad_command"


def test_consumers_from_toml_and_from_the_environment(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(
        '[[consumers]]\nname = "orders"\ntype = "postgresql"\n'
        '[consumers.postgresql]\ndsn = "postgresql://app:s3cret@db/shop"\n'
        'partition_poll_interval = "500ms"\nnum_partitions = 4\n'
    )
    settings = Settings.load(path)
    (orders,) = settings.consumers
    assert orders.postgresql is not None
    assert orders.postgresql.partition_poll_interval == 0.5
    assert orders.postgresql.outbox_table_name == "eventcast_outbox"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in json.dumps(settings.redacted())
    monkeypatch.setenv(
        "EVENTCAST_CONSUMERS",
        json.dumps(
            [
                {
                    "name": "sensors",
                    "type": "mqtt",
                    "mqtt": {"topics": ["sensors/#"], "channel": "iot:{topic}"},
                }
            ]
        ),
    )
    (sensors,) = Settings.load(path).consumers  # the environment wins over the file
    assert sensors.mqtt == MqttOptions(topics=["sensors/#"], channel="iot:{topic}")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "type": "mqtt"}, "needs a 'mqtt' object"),
        (
            {"name": "a", "type": "mqtt", "mqtt": {"topics": ["x"]}, "amqp": {"queue": "q"}},
            "also has amqp",
        ),
        ({"name": "a b", "type": "amqp", "amqp": {"queue": "q"}}, "invalid consumer name"),
        ({"name": "a", "type": "kafka", "kafka": {}}, "type"),
        (
            {"name": "a", "type": "mqtt", "mqtt": {"topics": ["x"], "channel": "bad {topic}"}},
            "invalid channel template",
        ),
        (
            {
                "name": "a",
                "type": "postgresql",
                "postgresql": {"dsn": "x", "outbox_table_name": "a;b"},
            },
            "invalid outbox table name",
        ),
        ({"name": "a", "type": "mqtt", "mqtt": {"topics": []}}, "topics"),
        ({"name": "a", "type": "amqp", "amqp": {"queue": "q", "prefetch": 0}}, "prefetch"),
    ],
)
def test_invalid_consumers_are_configuration_errors(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.load(consumers=[entry])


def test_a_name_used_twice_is_refused() -> None:
    entry = {"name": "a", "type": "amqp", "amqp": {"queue": "q"}}
    with pytest.raises(ConfigurationError, match="configured twice: a"):
        Settings.load(consumers=[entry, entry])


def test_command_messages() -> None:
    body = b'{"method": "publish", "payload": {"channel": "c", "data": 1}}'
    command = decode_command(Incoming(body=body, key="s:1"), 1000)
    assert (command.method, dict(command.params), command.idempotency_key) == (
        "publish",
        {"channel": "c", "data": 1},
        "s:1",
    )
    own = b'{"channel": "c", "data": 1, "idempotency_key": "mine"}'
    assert (
        decode_command(Incoming(body=own, key="s:1", method="publish"), 1000).idempotency_key
        == "mine"
    )
    for body, reason in [
        (b"{", "undecodable"),
        (b"[1]", "undecodable"),
        (b'{"method": "publish", "payload": 3}', "undecodable"),
        (b'{"method": "history", "payload": {}}', "bad_command"),
        (b'{"method": "batch", "payload": {}}', "bad_command"),
        (b'{"payload": {}}', "bad_command"),
        (b"x" * 1001, "too_large"),
    ]:
        with pytest.raises(CommandRejectedError) as caught:
            decode_command(Incoming(body=body), 1000)
        assert caught.value.reason == reason


def test_data_messages_and_channel_templates() -> None:
    options = MqttOptions(topics=["#"], channel="iot:{topic}", idempotency_key_field="id")
    command = decode_data(Incoming(body=b'{"id": 7, "t": 1}', topic="sensors/k/temp"), options)
    assert command.params == {"channel": "iot:sensors.k.temp", "data": {"id": 7, "t": 1}}
    assert command.idempotency_key == "sensors/k/temp:7"
    raw = decode_data(Incoming(body=b"\xff\x00", topic="a", key="q:1"), options)
    assert raw.params == {"channel": "iot:a", "data": "/wA=", "tags": {"encoding": "base64"}}
    assert raw.idempotency_key == "q:1"
    strict = options.model_copy(update={"binary": "reject"})
    with pytest.raises(CommandRejectedError, match="not JSON"):
        decode_data(Incoming(body=b"\xff", topic="a"), strict)
    with pytest.raises(CommandRejectedError, match="no valid channel"):
        render_channel("iot:{topic}", "a b")
    with pytest.raises(CommandRejectedError, match="no valid channel"):
        render_channel("iot:{topic}", "a//b")  # an empty level
    assert render_channel("orders", "anything") == "orders"


def test_helpers_and_consumer_bases_import_no_hub_and_no_driver() -> None:
    code = (
        "import sys\n"
        "import eventcast.ingest.helpers\n"
        "assert 'pydantic' not in sys.modules, 'helpers import pydantic'\n"
        "import eventcast.ingest.base, eventcast.ingest\n"
        "heavy = {'eventcast.server', 'starlette', 'psycopg', 'aiomqtt', 'aio_pika', 'nats'}\n"
        "heavy.add('redis')\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
