"""Access entries in Redis, shared by every node using the same prefix.

One hash, ``{prefix}:access``, maps each entry's key (the JSON array
``[kind, subject, channel]``) to the JSON array ``[issued_before, expire_at]``.
Entries past their ``expire_at`` are deleted when the entries are loaded. On
Redis Cluster the hash lives on one shard (the entries are few and read
together).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from ..exceptions import ConfigurationError
from ._kv import RedisConnection
from .access import AccessEntry, AccessStore, Key, entry_of

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisAccessStore"]

_encode = msgspec.json.Encoder().encode
_decode_key = msgspec.json.Decoder(tuple[str, str, str]).decode
_decode_value = msgspec.json.Decoder(tuple[float, float | None]).decode


class RedisAccessStore(AccessStore):
    """:class:`~eventcast.server.access.AccessStore` in a Redis hash.

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS,
            ``redis+cluster://`` for Redis Cluster).
        prefix: the prefix of the hash's key.
        connect_timeout: seconds to wait for a connection to Redis.
        timeout: seconds to wait for a reply.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "eventcast",
        connect_timeout: float = 5.0,
        timeout: float = 5.0,
    ) -> None:
        if not prefix:
            raise ConfigurationError("the access store key prefix must not be empty")
        self._redis = RedisConnection(
            url, what="the access store", connect_timeout=connect_timeout, timeout=timeout
        )
        self.key = f"{prefix}:access"

    async def open(self) -> None:
        await self._redis.open()

    async def close(self) -> None:
        await self._redis.close()

    async def put(self, entry: AccessEntry) -> None:
        field = _encode(entry.key)
        value = _encode((entry.issued_before, entry.expire_at))

        async def put(redis: Redis) -> None:
            await redis.hset(self.key, field, value)

        await self._redis.run("store an entry", put)

    async def remove(self, key: Key) -> None:
        field = _encode(key)

        async def remove(redis: Redis) -> None:
            await redis.hdel(self.key, field)

        await self._redis.run("remove an entry", remove)

    async def load(self, now: float) -> list[AccessEntry]:
        async def fetch(redis: Redis) -> dict[Any, Any]:
            return dict(await redis.hgetall(self.key))

        live: list[AccessEntry] = []
        dead: list[Any] = []
        for field, value in (await self._redis.run("read the entries", fetch)).items():
            try:
                kind, subject, channel = _decode_key(field)
                issued_before, expire_at = _decode_value(value)
            except msgspec.DecodeError:
                dead.append(field)  # not ours: unreadable
                continue
            entry = entry_of(kind, subject, channel, issued_before, expire_at)
            if entry is None or not entry.live(now):
                dead.append(field)
            else:
                live.append(entry)
        if dead:

            async def delete(redis: Redis) -> None:
                await redis.hdel(self.key, *dead)

            await self._redis.run("delete expired entries", delete)
        return live

    def __repr__(self) -> str:
        return f"<RedisAccessStore key={self.key!r}>"
