"""Presence shared by every node, in Redis.

One hash per channel, ``{prefix}:presence:{channel}``, maps each client id to
the JSON ``{"info": …, "expires_at": …}``: ``expires_at`` is a wall-clock time,
so every node agrees on which entries are live (nodes' clocks are assumed to be
roughly in sync). Expired entries are filtered out on read and deleted, only if
nobody refreshed them meanwhile. The hash itself expires when its
longest-lived entry does, so a channel whose nodes all crashed disappears.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from ..exceptions import ConfigurationError
from ._kv import RedisConnection
from .presence import Presence, PresenceInfo

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisPresence"]

_T = TypeVar("_T")

#: The key prefix used when none is given.
DEFAULT_PREFIX: Final = "eventcast"

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

# KEYS: the channel's hash. ARGV: client, value, client, value, … of entries
# seen expired. Deletes each one only if it still holds that value (a node may
# have refreshed it since it was read). Returns how many were deleted.
_DELETE_IF_UNCHANGED = """
local n = 0
for k = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[k]) == ARGV[k + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[k])
  end
end
return n
"""


class RedisPresence(Presence):
    """:class:`Presence` in Redis, shared by every node using the same prefix.

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS).
        prefix: the prefix of every key.
        connect_timeout: seconds to wait for a connection to Redis.
        timeout: seconds to wait for a reply.
        retries: retries of a command after a connection error or timeout.
        clock: the wall clock (seconds since the epoch), injectable for tests.

    The client connects on :meth:`open`, or on first use.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = 5.0,
        timeout: float = 5.0,
        retries: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = RedisConnection(
            url, what="presence", connect_timeout=connect_timeout, timeout=timeout, retries=retries
        )
        if not prefix:
            raise ConfigurationError("the presence key prefix must not be empty")
        #: ``redis+cluster://``: the hashes live on Redis Cluster (one key per command).
        self.cluster = self._redis.cluster
        self.url = self._redis.url
        self.prefix = prefix
        self._clock = clock
        self._delete_script: AsyncScript | None = None

    def _key(self, channel: str) -> str:
        return f"{self.prefix}:presence:{channel}"

    async def open(self) -> None:
        """Connect to Redis and check it answers. Idempotent."""
        client = await self._redis.open()
        if self._delete_script is None:
            self._delete_script = client.register_script(_DELETE_IF_UNCHANGED)

    async def close(self) -> None:
        """Close the connections. Idempotent, also when cancelled."""
        await self._redis.close()

    async def run(self, action: str, fn: Callable[[Redis], Awaitable[_T]]) -> _T:
        """Run ``await fn(client)`` on the connected client (connecting first if needed).

        Other stores sharing this Redis (channel occupancy) run here too.

        Raises:
            BackplaneError: Redis failed (the message says what ``action`` was).
        """
        if self._delete_script is None:
            await self.open()
        return await self._redis.run(action, fn)

    async def add(self, channel: str, client: str, info: PresenceInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ConfigurationError("a presence TTL must be positive")
        key = self._key(channel)
        value = _encode({"info": dict(info), "expires_at": self._clock() + ttl})
        ms = max(1, math.ceil(ttl * 1000))

        async def run(redis: Redis) -> None:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, client, value)
                # The hash lives as long as its longest-lived entry: NX sets a
                # first expiry, GT only ever extends it.
                pipe.pexpire(key, ms, nx=True)
                pipe.pexpire(key, ms, gt=True)
                await pipe.execute()

        await self.run("add an entry", run)

    async def remove(self, channel: str, client: str) -> None:
        key = self._key(channel)

        async def run(redis: Redis) -> None:
            await redis.hdel(key, client)

        await self.run("remove an entry", run)

    async def get(self, channel: str) -> dict[str, PresenceInfo]:
        key = self._key(channel)

        async def fetch(redis: Redis) -> dict[Any, Any]:
            return dict(await redis.hgetall(key))

        raw = await self.run("read entries", fetch)
        now = self._clock()
        live: dict[str, PresenceInfo] = {}
        expired: list[bytes] = []
        for field, value in raw.items():
            try:
                entry = _decode(value)
                info, expires_at = entry["info"], float(entry["expires_at"])
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                expires_at, info = -math.inf, None  # unreadable: drop it
            if expires_at <= now or not isinstance(info, dict):
                expired += [field, value]
            else:
                live[field.decode() if isinstance(field, bytes) else field] = info
        if expired:
            script = self._delete_script
            assert script is not None

            async def delete(redis: Redis) -> None:
                await script(keys=[key], args=expired, client=redis)

            await self.run("delete expired entries", delete)
        return live

    def __repr__(self) -> str:
        return f"<RedisPresence prefix={self.prefix!r}>"
