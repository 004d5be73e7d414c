"""One producer per real source, so every consumer type runs the same tests.

A :class:`Source` knows its consumer's settings entry, how to put message
number ``seq`` into the source (``{"seq": seq}`` published to one durable
channel), how to put an undecodable message there, and how to clean up.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from eventcast.ingest.helpers import outbox_publish_async
from eventcast.ingest.outbox import create_outbox
from tests.conftest import ensure_service

from .conftest import unique


class Source(ABC):
    """A source of one consumer type, with names unique to the test."""

    type: str
    service: str

    def __init__(self) -> None:
        self.root = unique("src")
        #: The durable channel every message of the test is published to.
        self.channel = f"orders:{self.root}"

    @abstractmethod
    def consumer(self) -> dict[str, Any]:
        """The consumer's settings entry."""

    async def open(self) -> None:  # noqa: B027  # most sources need nothing created
        """Create what the source needs before the hub starts."""

    @abstractmethod
    async def produce(self, seqs: range) -> None:
        """Put messages ``{"seq": s}`` for each ``s`` into the source, in order."""

    @abstractmethod
    async def produce_garbage(self) -> None:
        """Put one message that cannot be decoded into the source."""

    async def close(self) -> None:  # noqa: B027  # overridden by the sources that create things
        """Remove what the test created."""


class PostgresSource(Source):
    type = "postgresql"
    service = "postgres"
    dsn = "postgresql://postgres@127.0.0.1:5432/test"

    async def open(self) -> None:
        await create_outbox(self.dsn, self.root)

    def consumer(self) -> dict[str, Any]:
        return {
            "name": "src",
            "type": "postgresql",
            # Small batches: a kill lands in the middle of the stream.
            "postgresql": {
                "dsn": self.dsn,
                "outbox_table_name": self.root,
                "partition_select_limit": 20,
            },
        }

    async def produce(self, seqs: range) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            for seq in seqs:
                async with conn.transaction():
                    await outbox_publish_async(conn, self.channel, {"seq": seq}, table=self.root)

    async def produce_garbage(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                f"INSERT INTO {self.root} (method, payload) VALUES ('publish', '[1, 2]')"
            )

    async def close(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(f'DROP TABLE IF EXISTS "{self.root}" CASCADE')
            await conn.execute(f'DROP FUNCTION IF EXISTS "{self.root}_notify"() CASCADE')


class MqttSource(Source):
    """Data messages: the topic ``<root>/x`` becomes the channel ``orders:<root>.x``."""

    type = "mqtt"
    service = "mosquitto"

    def __init__(self) -> None:
        super().__init__()
        self.channel = f"orders:{self.root}.x"
        self._client: Any = None

    def consumer(self) -> dict[str, Any]:
        return {
            "name": "src",
            "type": "mqtt",
            "mqtt": {
                "url": "mqtt://127.0.0.1:1883",
                "topics": [f"{self.root}/#"],
                "channel": "orders:{topic}",
                "client_id": self.root,
                "idempotency_key_field": "seq",
            },
        }

    async def _connected(self) -> Any:
        import aiomqtt

        if self._client is None:
            self._client = aiomqtt.Client("127.0.0.1", 1883, identifier=f"{self.root}-pub")
            await self._client.__aenter__()
        return self._client

    async def produce(self, seqs: range) -> None:
        client = await self._connected()
        for seq in seqs:
            await client.publish(f"{self.root}/x", json.dumps({"seq": seq}), qos=1)

    async def produce_garbage(self) -> None:
        client = await self._connected()
        await client.publish(f"{self.root}/bad topic", b"{}", qos=1)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.__aexit__(None, None, None)
        import aiomqtt

        # End the consumer's persistent session on the broker.
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=self.root, clean_session=True):
            pass


class AmqpSource(Source):
    """Command messages with a ``message_id``, in a durable queue."""

    type = "amqp"
    service = "rabbitmq"
    url = "amqp://guest:guest@127.0.0.1:5672/"

    def consumer(self) -> dict[str, Any]:
        return {"name": "src", "type": "amqp", "amqp": {"url": self.url, "queue": self.root}}

    async def open(self) -> None:
        import aio_pika

        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel()
            await channel.declare_queue(self.root, durable=True)

    async def _send(self, bodies: list[tuple[bytes, str | None]]) -> None:
        import aio_pika

        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            for body, message_id in bodies:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        message_id=message_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=self.root,
                )

    async def produce(self, seqs: range) -> None:
        await self._send(
            [
                (
                    json.dumps(
                        {
                            "method": "publish",
                            "payload": {"channel": self.channel, "data": {"seq": s}},
                        }
                    ).encode(),
                    f"m{s}",
                )
                for s in seqs
            ]
        )

    async def produce_garbage(self) -> None:
        await self._send([(b"\xff not json", None)])

    async def close(self) -> None:
        import aio_pika

        async with await aio_pika.connect(self.url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(self.root)


class RedisSource(Source):
    """Command messages as Centrifugo writes them: fields ``method`` and ``payload``."""

    type = "redis_stream"
    service = "redis"
    url = "redis://127.0.0.1:6379/0"

    def consumer(self) -> dict[str, Any]:
        return {
            "name": "src",
            "type": "redis_stream",
            "redis_stream": {"url": self.url, "streams": [self.root], "count": 20, "block": 1},
        }

    async def produce(self, seqs: range) -> None:
        from redis.asyncio import Redis

        async with Redis.from_url(self.url) as client:
            for seq in seqs:
                payload = json.dumps({"channel": self.channel, "data": {"seq": seq}})
                await client.xadd(self.root, {"method": "publish", "payload": payload})

    async def produce_garbage(self) -> None:
        from redis.asyncio import Redis

        async with Redis.from_url(self.url) as client:
            await client.xadd(self.root, {"method": "publish", "payload": "{"})

    async def close(self) -> None:
        from redis.asyncio import Redis

        async with Redis.from_url(self.url) as client:
            await client.delete(self.root)


class JetStreamSource(Source):
    """Data messages: the subject ``<root>.x`` becomes the channel ``orders:<root>.x``."""

    type = "nats_jetstream"
    service = "nats"
    url = "nats://127.0.0.1:4222"

    def __init__(self) -> None:
        super().__init__()
        self.channel = f"orders:{self.root}.x"

    def consumer(self) -> dict[str, Any]:
        return {
            "name": "src",
            "type": "nats_jetstream",
            "nats_jetstream": {
                "url": self.url,
                "stream": self.root,
                "channel": "orders:{topic}",
                "ack_wait": 2,
                "batch": 20,
            },
        }

    async def _js(self, action: Any) -> Any:
        import nats

        nc = await nats.connect(self.url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    async def open(self) -> None:
        await self._js(lambda js: js.add_stream(name=self.root, subjects=[f"{self.root}.>"]))

    async def produce(self, seqs: range) -> None:
        async def send(js: Any) -> None:
            for seq in seqs:
                await js.publish(f"{self.root}.x", json.dumps({"seq": seq}).encode())

        await self._js(send)

    async def produce_garbage(self) -> None:
        # "$" is no channel character: the channel made from this subject is invalid.
        await self._js(lambda js: js.publish(f"{self.root}.b$d", b"{}"))

    async def close(self) -> None:
        await self._js(lambda js: js.delete_stream(self.root))


SOURCES: list[type[Source]] = [PostgresSource, MqttSource, AmqpSource, RedisSource, JetStreamSource]


@pytest.fixture(params=SOURCES, ids=[cls.type for cls in SOURCES])
async def source(request: pytest.FixtureRequest) -> AsyncIterator[Source]:
    """Each source in turn, opened (its server started if down), closed after the test."""
    cls: type[Source] = request.param
    ensure_service(cls.service)
    opened = cls()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
