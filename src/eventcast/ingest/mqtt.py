"""The MQTT consumer (``type = "mqtt"``): topic filters on a broker, into channels.

It subscribes with QoS 1 (by default) in a **persistent session** (clean
session off, a fixed client id), so the broker keeps what is published to the
filters while the hub is down and delivers it when the hub returns. Each
message is acknowledged (PUBACK) only after the hub has committed its
publication: acknowledgements are manual, never automatic on receipt. A hub
killed in between gets the message again from the broker on reconnect.

MQTT gives a message no identity that survives a redelivery (the packet id is
reused), so exactly-once storage needs one in the payload: with
``idempotency_key_field = "id"``, a JSON payload's ``id`` (with the topic)
becomes the publication's idempotency key. Without it, delivery to durable
channels is at-least-once: a crash between commit and PUBACK can publish a
reading twice.

Retained messages that the broker sends again on every (re)subscription are
skipped (acknowledged, counted as processed): they are old state, not new
readings. Set ``retained = true`` to publish them as well.

The broker bounds the unacknowledged messages in flight per client
(Mosquitto's ``max_inflight_messages``, 20 by default), which bounds the batch
the consumer holds; the client's own incoming queue is bounded too.
"""

from __future__ import annotations

import ssl
from typing import Any, Final
from urllib.parse import urlsplit

from .._urls import redact_password
from ..exceptions import ConfigurationError
from .base import CommandTarget, Consumer, Incoming, MqttOptions

__all__ = ["MqttConsumer"]

#: Bound of the client's queue of received, unprocessed messages.
MAX_QUEUED: Final = 1000
#: Most messages dispatched together.
MAX_BATCH: Final = 256


class MqttConsumer(Consumer):
    """Consumes MQTT topic filters (aiomqtt, on paho-mqtt)."""

    type = "mqtt"
    source_name = "MQTT broker"
    options: MqttOptions

    def __init__(self, name: str, target: CommandTarget, options: MqttOptions) -> None:
        super().__init__(name, target, options)
        url = options.url.get_secret_value()
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ConfigurationError(
                f"consumer {name!r}: the MQTT url must be mqtt://host[:port] or mqtts://…, "
                f"not {redact_password(url)!r}"
            )
        self._tls = parts.scheme in ("mqtts", "ssl")
        self._host = parts.hostname
        self._port = parts.port or (8883 if self._tls else 1883)
        self._username = parts.username
        self._password = parts.password
        self._client_id = options.client_id or f"eventcast-{name}"

    async def _consume(self) -> None:
        import aiomqtt

        options = self.options
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            identifier=self._client_id,
            clean_session=options.clean_session,
            keepalive=options.keepalive,
            max_queued_incoming_messages=MAX_QUEUED,
            tls_context=ssl.create_default_context() if self._tls else None,
            timeout=10,
        )
        # Acknowledge after the commit, never on receipt. aiomqtt does not wrap
        # paho's manual acknowledgements: this is the one place using its client.
        paho = client._client
        paho.manual_ack_set(True)
        try:
            async with client:
                for topic in options.topics:
                    await client.subscribe(topic, qos=options.qos)
                self._connected()
                messages = client.messages
                async for first in messages:
                    batch = [first]
                    while len(messages) and len(batch) < MAX_BATCH:
                        batch.append(await anext(messages))
                    await self._take(batch)
                    for message in batch:
                        if message.qos > 0:
                            paho.ack(message.mid, message.qos)
        except aiomqtt.MqttError as exc:
            raise self._source_error(exc) from exc

    async def _take(self, batch: list[Any]) -> None:
        items = []
        for message in batch:
            if message.retain and not self.options.retained:
                self.stats.processed += 1
                continue
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            items.append(Incoming(body=bytes(payload), topic=message.topic.value))
        if items:
            await self._dispatch(items)
