"""The AMQP 0-9-1 consumer (``type = "amqp"``, RabbitMQ): a durable queue into the hub.

The queue is declared durable (and bound to ``exchange`` with ``routing_keys``
when an exchange is named). Up to ``prefetch`` messages are delivered
unacknowledged; they are dispatched in batches, in queue order, and
acknowledged (one ``basic.ack`` with ``multiple``) only after the hub has
committed them. A hub killed in between leaves them unacknowledged: RabbitMQ
delivers them again to the next consumer.

A message's identity is its ``message_id`` property when the publisher set
one: the publication's idempotency key is ``"<queue>:<message_id>"``, so a
redelivery is stored once. Without it, use ``idempotency_key_field`` (data
messages), or accept at-least-once delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Final

from .base import AmqpOptions, Consumer, Incoming

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

__all__ = ["AmqpConsumer"]

#: Seconds between two looks at the queue's depth (the consumer's lag).
LAG_INTERVAL: Final = 5.0
#: Seconds to wait for the broker to accept a connection.
CONNECT_TIMEOUT: Final = 10.0


class AmqpConsumer(Consumer):
    """Consumes one durable AMQP queue (aio-pika)."""

    type = "amqp"
    source_name = "AMQP broker"
    options: AmqpOptions

    async def _consume(self) -> None:
        import aio_pika
        import aiormq

        options = self.options
        try:
            connection = await aio_pika.connect(
                options.url.get_secret_value(), timeout=CONNECT_TIMEOUT
            )
        except (aiormq.AMQPError, OSError, TimeoutError) as exc:
            raise self._source_error(exc) from exc
        # Bounded by prefetch: the broker never has more unacknowledged deliveries out.
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue(options.prefetch)
        waiters: list[asyncio.Future[Any]] = []
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=options.prefetch)
            queue = await channel.declare_queue(options.queue, durable=True)
            if options.exchange:
                exchange = await channel.declare_exchange(
                    options.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                for key in options.routing_keys:
                    await queue.bind(exchange, routing_key=key)
            await queue.consume(inbox.put, no_ack=False)
            closed = asyncio.ensure_future(connection.closed())
            waiters += [closed, asyncio.ensure_future(self._measure_lag(channel))]
            self._connected()
            while True:
                getter = asyncio.ensure_future(inbox.get())
                waiters.append(getter)
                done, _ = await asyncio.wait(
                    {getter, *waiters[:2]}, return_when=asyncio.FIRST_COMPLETED
                )
                waiters.remove(getter)
                if getter not in done:
                    getter.cancel()
                    failed = waiters[1]
                    if failed.done() and not failed.cancelled() and failed.exception():
                        raise failed.exception()  # type: ignore[misc]
                    raise self._source_error("the server closed the connection")
                batch = [getter.result()]
                while not inbox.empty():
                    batch.append(inbox.get_nowait())
                await self._dispatch([self._incoming(m) for m in batch])
                await batch[-1].ack(multiple=True)
        except (aiormq.AMQPError, aio_pika.exceptions.AMQPException, OSError) as exc:
            raise self._source_error(exc) from exc
        finally:
            for waiter in waiters:
                waiter.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(connection.close())

    def _incoming(self, message: AbstractIncomingMessage) -> Incoming:
        key = f"{self.options.queue}:{message.message_id}" if message.message_id else None
        return Incoming(body=message.body, key=key, topic=message.routing_key or "")

    async def _measure_lag(self, channel: AbstractChannel) -> None:
        while True:
            queue = await channel.declare_queue(self.options.queue, passive=True)
            count: Any = queue.declaration_result.message_count
            self.stats.lag = int(count) if count is not None else None
            await asyncio.sleep(LAG_INTERVAL)
