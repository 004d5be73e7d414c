"""The Redis Streams consumer (``type = "redis_stream"``): a consumer group into the hub.

The group is created at the start of each stream (``XGROUP CREATE … 0
MKSTREAM``) if missing, so nothing added before the hub first ran is missed.
Entries are read with ``XREADGROUP`` in batches of ``count``, dispatched in
stream order and acknowledged (``XACK``) only after the hub has committed
them. On every (re)start the consumer first reads its own pending entries
(delivered before a crash, never acknowledged), then new ones.

An entry's identity is its stream entry id: the publication's idempotency key
is ``"<stream>:<entry id>"``, so a redelivered entry is stored once (within
the log's dedup window).

Entry fields: in command mode, ``method`` and ``payload`` (the command's
parameters as JSON), as Centrifugo's consumer reads them; or ``payload``
alone, holding ``{"method", "payload"}``. In data mode, ``payload`` holds the
data. The field names are options.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import CommandRejectedError
from .base import CommandTarget, Consumer, Incoming, RedisStreamOptions

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisStreamConsumer"]

#: Seconds between two looks at the group's lag.
LAG_INTERVAL: Final = 5.0


class RedisStreamConsumer(Consumer):
    """Consumes Redis streams through a consumer group (redis-py, asyncio)."""

    type = "redis_stream"
    source_name = "Redis"
    options: RedisStreamOptions

    def __init__(self, name: str, target: CommandTarget, options: RedisStreamOptions) -> None:
        super().__init__(name, target, options)
        self._reader = options.consumer_name or name
        self._method_field = options.method_field.encode()
        self._payload_field = options.payload_field.encode()

    async def _consume(self) -> None:
        from redis.asyncio import Redis
        from redis.exceptions import RedisError

        options = self.options
        client: Redis = Redis.from_url(
            options.url.get_secret_value(),
            socket_timeout=options.block + 10,
            socket_connect_timeout=10,
        )
        lag: asyncio.Task[None] | None = None
        try:
            for stream in options.streams:
                await self._create_group(client, stream)
            lag = asyncio.create_task(self._measure_lag(client))
            self._connected()
            # Own pending entries first (id 0), then new ones (">").
            for stream in options.streams:
                while await self._read(client, {stream: "0"}, block=None):
                    pass
            block = int(options.block * 1000)
            streams = dict.fromkeys(options.streams, ">")
            while True:
                if lag.done():
                    lag.result()  # raises its failure
                await self._read(client, streams, block=block)
        except RedisError as exc:
            raise self._source_error(exc) from exc
        finally:
            if lag is not None:
                lag.cancel()
            await asyncio.shield(client.aclose())

    async def _create_group(self, client: Redis, stream: str) -> None:
        from redis.exceptions import ResponseError

        try:
            await client.xgroup_create(stream, self.options.consumer_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self, client: Redis, streams: dict[str, str], *, block: int | None) -> int:
        """Read, dispatch and acknowledge one batch; return how many entries it had."""
        options = self.options
        answer: Any = await client.xreadgroup(
            options.consumer_group,
            self._reader,
            streams,  # type: ignore[arg-type]
            count=options.count,
            block=block,
        )
        total = 0
        for raw_stream, entries in answer or ():
            stream = raw_stream.decode() if isinstance(raw_stream, bytes) else str(raw_stream)
            items: list[Incoming] = []
            ids: list[bytes] = []
            for entry_id, fields in entries:
                ids.append(entry_id)
                if fields is None:  # deleted while pending: nothing to publish
                    continue
                item = self._incoming(stream, entry_id.decode(), fields)
                if item is not None:
                    items.append(item)
            if items:
                await self._dispatch(items)
            if ids:
                await client.xack(stream, options.consumer_group, *ids)
            total += len(ids)
        return total

    def _incoming(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Incoming | None:
        payload = fields.get(self._payload_field)
        key = f"{stream}:{entry_id}"
        if payload is None:
            item = Incoming(body=b"", key=key, topic=stream)
            self._reject(
                item,
                CommandRejectedError(
                    f"entry {entry_id} of {stream!r} has no {self.options.payload_field!r} field",
                    "undecodable",
                ),
            )
            self.stats.processed += 1
            return None
        method = fields.get(self._method_field)
        return Incoming(
            body=payload,
            key=key,
            topic=stream,
            method=method.decode(errors="replace") if method is not None else None,
        )

    async def _measure_lag(self, client: Redis) -> None:
        group = self.options.consumer_group.encode()
        while True:
            lag = 0
            for stream in self.options.streams:
                for info in await client.xinfo_groups(stream):
                    name = info.get("name")
                    if name in (group, group.decode()):
                        lag += int(info.get("lag") or 0) + int(info.get("pending") or 0)
            self.stats.lag = lag
            await asyncio.sleep(LAG_INTERVAL)
