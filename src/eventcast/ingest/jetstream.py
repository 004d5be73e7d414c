"""The NATS JetStream consumer (``type = "nats_jetstream"``): a durable pull consumer.

It binds to (or creates) a durable consumer with explicit acknowledgement on
an existing stream, fetches up to ``batch`` messages at a time, dispatches
them in stream order and acknowledges each only after the hub has committed
it. A message not acknowledged within ``ack_wait`` is delivered again by the
server.

JetStream delivers new messages before it redelivers unacknowledged ones, which
would reorder a channel after a crash. So when the consumer (re)connects and
finds messages delivered but never acknowledged by its previous incarnation,
it recreates the durable consumer at its *ack floor* (the last message
acknowledged in order): everything after it is delivered again, in stream
order, and what was already published is deduplicated by its key. This makes
a durable consumer the property of one hub node: give each node its own
``durable_consumer_name`` (or run the consumer on one node).

A message's identity is its stream sequence number: the publication's
idempotency key is ``"<stream>:<sequence>"``, so a redelivered message is
stored once (within the log's dedup window).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

from .base import CommandTarget, Consumer, Incoming, JetStreamOptions

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = ["JetStreamConsumer"]

#: Seconds one fetch waits for messages before asking again.
FETCH_TIMEOUT: Final = 5.0
#: Seconds between two looks at the consumer's pending count (its lag).
LAG_INTERVAL: Final = 5.0


class JetStreamConsumer(Consumer):
    """Consumes a JetStream stream with a durable pull consumer (nats-py)."""

    type = "nats_jetstream"
    source_name = "NATS"
    options: JetStreamOptions

    def __init__(self, name: str, target: CommandTarget, options: JetStreamOptions) -> None:
        super().__init__(name, target, options)
        self._durable = options.durable_consumer_name or f"eventcast-{name}"

    async def _consume(self) -> None:
        import nats
        from nats.errors import Error as NatsError, TimeoutError as FetchTimeout
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        options = self.options
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            if not failed.done():
                failed.set_exception(exc)

        async def on_closed() -> None:
            if not failed.done():
                failed.set_exception(self._source_error("the server closed the connection"))

        try:
            nc = await nats.connect(
                servers=[options.url.get_secret_value()],
                allow_reconnect=False,
                connect_timeout=10,
                error_cb=on_error,
                closed_cb=on_closed,
            )
        except (NatsError, OSError, TimeoutError) as exc:
            raise self._source_error(exc) from exc
        lag: asyncio.Task[None] | None = None
        try:
            js = nc.jetstream()
            config = ConsumerConfig(
                durable_name=self._durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=options.ack_wait,
                max_ack_pending=max(options.batch * 4, 1000),
                filter_subject=options.subject,
            )
            try:
                info = await js.consumer_info(options.stream, self._durable)
            except NotFoundError:
                info = None
            if info is not None and info.num_ack_pending:
                # Delivered before a crash, never acknowledged: restart at the ack
                # floor so they come again before anything newer (see above).
                floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
                await js.delete_consumer(options.stream, self._durable)
                config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = floor + 1
            sub = await js.pull_subscribe(
                options.subject or "", durable=self._durable, stream=options.stream, config=config
            )
            lag = asyncio.create_task(self._measure_lag(sub))
            self._connected()
            while True:
                if failed.done():
                    failed.result()
                if lag.done():
                    lag.result()
                try:
                    messages = await sub.fetch(options.batch, timeout=FETCH_TIMEOUT)
                except FetchTimeout:
                    continue
                await self._dispatch([self._incoming(m) for m in messages])
                for message in messages:
                    await message.ack()
        except (NatsError, OSError) as exc:
            raise self._source_error(exc) from exc
        finally:
            if lag is not None:
                lag.cancel()
            if not failed.done():
                failed.cancel()
            await asyncio.shield(nc.close())

    def _incoming(self, message: Msg) -> Incoming:
        sequence = message.metadata.sequence.stream
        return Incoming(
            body=message.data, key=f"{self.options.stream}:{sequence}", topic=message.subject
        )

    async def _measure_lag(self, sub: Any) -> None:
        while True:
            info = await sub.consumer_info()
            self.stats.lag = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            await asyncio.sleep(LAG_INTERVAL)
