"""The MQTT consumer against the real Mosquitto: topics into channels, acks after commit."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from eventcast.ingest.base import ConsumerState
from tests.conftest import ensure_service

from .conftest import eventually, running_consumers, take, unique

aiomqtt = pytest.importorskip("aiomqtt")


@pytest.fixture
async def mosquitto() -> AsyncIterator[str]:
    """The shared broker; the hub's persistent sessions of the test are ended after it."""
    ensure_service("mosquitto")
    sessions.clear()
    yield "mqtt://127.0.0.1:1883"
    for client_id in sessions:
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=client_id, clean_session=True):
            pass


#: The client ids (persistent sessions) the current test's consumers used.
sessions: list[str] = []


def mqtt_consumer(url: str, root: str, **options: Any) -> dict[str, Any]:
    sessions.append(unique("ec"))
    return {
        "name": "sensors",
        "type": "mqtt",
        "mqtt": {
            "url": url,
            "topics": [f"{root}/#"],
            "channel": "iot:{topic}",
            "client_id": sessions[-1],
            **options,
        },
    }


async def test_readings_become_publications_on_templated_channels(
    mosquitto: str, ingest_hub: Any
) -> None:
    root = unique("sensors")
    hub = await ingest_hub([mqtt_consumer(mosquitto, root, idempotency_key_field="id")])
    (consumer,) = running_consumers(hub)
    await eventually(lambda: consumer.state is ConsumerState.RUNNING)
    bus = hub.hub.bus
    async with (
        bus.subscribe(f"iot:{root}.>") as sub,
        aiomqtt.Client("127.0.0.1", 1883, identifier=unique("pub")) as client,
    ):
        for i in range(50):
            await client.publish(f"{root}/s{i % 3}/temp", b'{"id": %d, "t": 21.5}' % i, qos=1)
        await client.publish(f"{root}/raw", b"\x00\x01binary", qos=1)
        events = await take(sub, 51)
    assert [e.data["id"] for e in events[:50]] == list(range(50))
    assert events[0].topic == f"iot:{root}.s0.temp"
    assert events[1].topic == f"iot:{root}.s1.temp"
    assert all(e.offset for e in events)  # the iot namespace is durable
    raw = events[50]
    assert raw.topic == f"iot:{root}.raw"
    assert base64.b64decode(raw.data) == b"\x00\x01binary"
    assert dict(raw.tags) == {"encoding": "base64"}
    assert events[7].idempotency_key == f"{root}/s1/temp:7"


async def test_bad_topics_are_dead_letters_and_retained_messages_skipped(
    mosquitto: str, ingest_hub: Any
) -> None:
    root = unique("sensors")
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=unique("pub")) as client:
        # Retained before the hub subscribes: the broker sends it on subscription.
        await client.publish(f"{root}/old", b'{"stale": true}', qos=1, retain=True)
        hub = await ingest_hub([mqtt_consumer(mosquitto, root)])
        (consumer,) = running_consumers(hub)
        await eventually(lambda: consumer.state is ConsumerState.RUNNING)
        async with hub.hub.bus.subscribe(f"iot:{root}.>") as sub:
            await client.publish(f"{root}/with space", b"{}", qos=1)
            await client.publish(f"{root}/ok", b'{"fresh": true}', qos=1)
            events = await take(sub, 1)
        assert [e.data for e in events] == [{"fresh": True}]
        await eventually(lambda: consumer.stats.dead_letters == 1)
        (letter,) = hub.hub.bus.dead_letters.list(subscriber="ingest:sensors")
        assert letter.reason == "bad_command"
        assert letter.event.data == "{}"
        assert consumer.stats.processed == 3
        await client.publish(f"{root}/old", b"", qos=1, retain=True)  # clear it
