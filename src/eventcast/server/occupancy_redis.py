"""Channel occupancy shared by every node, in Redis (beside Redis presence).

Each occupied channel has a hash ``{<prefix>:occupancy}:<channel>`` of node ->
expiry (milliseconds, Redis server time, so nodes' clocks do not matter), and
an entry in the sorted set ``{<prefix>:occupancy}`` scored by when its last
share expires. The sorted set is the record of which channels are occupied;
the hash tag puts both keys in one slot, so each change is one Lua script,
atomic on Redis and on Redis Cluster.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

from .occupancy import SWEEP_LIMIT, Change, Occupancy

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .presence_redis import RedisPresence

__all__ = ["RedisOccupancy"]

# KEYS: the channel's hash, the index. ARGV: node, ttl (ms), channel.
# Drops expired shares, adds or refreshes the node's, and answers 1 when the
# channel was not occupied, 2 when its previous occupancy had ended by expiry
# (no live share, the node's own included), else 0.
_JOIN: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local shares = redis.call('HGETALL', KEYS[1])
local live = 0
local last = now + ttl
for i = 1, #shares, 2 do
  local expiry = tonumber(shares[i + 1])
  if expiry and expiry > now then
    live = live + 1
    if expiry > last then last = expiry end
  else
    redis.call('HDEL', KEYS[1], shares[i])
  end
end
local result = 0
if not redis.call('ZSCORE', KEYS[2], ARGV[3]) then
  result = 1
elseif live == 0 then
  result = 2
end
redis.call('HSET', KEYS[1], ARGV[1], now + ttl)
redis.call('PEXPIRE', KEYS[1], last - now + ttl)
redis.call('ZADD', KEYS[2], last, ARGV[3])
return result
"""

# KEYS: the channel's hash, the index. ARGV: node ('' to only sweep), channel.
# Removes the node's share and the expired ones; when none is left, removes
# the channel and answers 1 (this call vacated it), else 0.
_LEAVE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then redis.call('HDEL', KEYS[1], ARGV[1]) end
local shares = redis.call('HGETALL', KEYS[1])
local last = 0
for i = 1, #shares, 2 do
  local expiry = tonumber(shares[i + 1])
  if expiry and expiry > now then
    if expiry > last then last = expiry end
  else
    redis.call('HDEL', KEYS[1], shares[i])
  end
end
if last > 0 then
  redis.call('ZADD', KEYS[2], last, ARGV[2])
  return 0
end
redis.call('DEL', KEYS[1])
return redis.call('ZREM', KEYS[2], ARGV[2])
"""


# KEYS: the index. ARGV: the most channels to return.
# The channels whose every share expired (by Redis's clock, one key: fine on a cluster).
_EXPIRED: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""


class RedisOccupancy(Occupancy):
    """:class:`~eventcast.server.occupancy.Occupancy` in the Redis of a ``RedisPresence``.

    Args:
        presence: the presence store whose connection (and key prefix) it shares.
    """

    def __init__(self, presence: RedisPresence) -> None:
        self._presence = presence
        tag = f"{{{presence.prefix}:occupancy}}"
        self._index = tag
        self._hash_prefix = f"{tag}:"
        self._scripts: dict[str, Any] = {}

    def _script(self, redis: Redis, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = redis.register_script(source)
        return script

    async def join(self, channel: str, node: str, ttl: float) -> Change:
        keys = [self._hash_prefix + channel, self._index]
        args = [node, max(1, math.ceil(ttl * 1000)), channel]

        async def run(redis: Redis) -> Any:
            return await self._script(redis, "join", _JOIN)(keys=keys, args=args, client=redis)

        return Change(int(await self._presence.run("record a channel's occupancy", run)))

    async def leave(self, channel: str, node: str) -> bool:
        keys = [self._hash_prefix + channel, self._index]

        async def run(redis: Redis) -> Any:
            return await self._script(redis, "leave", _LEAVE)(
                keys=keys, args=[node, channel], client=redis
            )

        return bool(await self._presence.run("release a channel's occupancy", run))

    async def sweep(self, limit: int = SWEEP_LIMIT) -> list[str]:
        index = self._index

        async def expired(redis: Redis) -> list[Any]:
            found: list[Any] = await self._script(redis, "expired", _EXPIRED)(
                keys=[index], args=[limit], client=redis
            )
            return found

        vacated: list[str] = []
        for raw in await self._presence.run("find expired channel occupancy", expired):
            channel = raw.decode() if isinstance(raw, bytes) else str(raw)
            if await self.leave(channel, ""):
                vacated.append(channel)
        return vacated

    def __repr__(self) -> str:
        return f"<RedisOccupancy index={self._index!r}>"
