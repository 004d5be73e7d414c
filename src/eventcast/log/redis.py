"""``redis://``: a log shared by several processes, on Redis Streams (Redis 7.0+).

redis-py's asyncio client (``pip install 'eventcast[redis]'``), with retries on
connection errors and timeouts. The URL is ``redis://host:port/db`` (or
``rediss://`` for TLS); ``?prefix=name`` sets the prefix of every key (default
``eventcast``); other query parameters go to redis-py.

Keys, for a topic ``T`` under prefix ``P``:

* ``P:stream:T``: the topic's events, one stream entry per event with the
  entry id ``<offset>-1``, so that reads are ``XRANGE``/``XREVRANGE`` by offset;
* ``P:meta:T``: a hash with the stream's ``epoch`` and ``top`` (its last offset),
  created by the topic's first append (or truncation), never by a position;
* ``P:ikey:<len(T)>:T:K``: idempotency key ``K`` (``"<epoch> <offset> <expires>"``,
  expiring with the dedup window; the length makes the name unambiguous);
* ``P:store`` and ``P:gens``: the store id and the generation counters (a hash
  of at most 65,536 fields) from which topics without a meta hash get their
  epoch (see :mod:`eventcast.log.base`);
* ``P:dead_letters``: the dead letters, a sorted set scored by id, bounded;
* ``P:batch:<token>``: the outcome of one append, for a few minutes, so that an
  append retried after a lost reply is not committed twice.

Every append batch is one Lua script (``EVALSHA``, loaded on demand). A script
runs atomically, but Redis does not roll back the writes of a script that
fails half-way: the script therefore checks everything that could fail (key
types, the meta hash, the stream's last id) before its first write, so a batch
across topics is committed entirely or not at all. Inside, each topic's offsets
come from its ``top`` counter, so any number of processes can append to the
same topic with no gap.

Size retention trims each stream exactly (``XADD … MAXLEN = size``). Age
retention filters reads by the stored event time, :meth:`RedisStreamsLog.prune`
trims the expired head of each stream, and when a topic's retention has a
``ttl`` the stream and meta keys expire ``ttl`` after its last publication:
**a topic that saw no publication for ``ttl`` seconds is forgotten entirely, so
its next position has a new epoch** (all its events were past their age anyway;
the epoch differs because the stream claimed its generation when it was born).
:meth:`RedisStreamsLog.prune` also forgets streams left with no entries.

The epoch lives in the meta hash: a Redis that was flushed, or restarted
without persistence, has lost it (and the store id), and every stream starts
again under a new epoch, so subscribers learn plainly that they cannot resume. Redis acknowledges
a write once it is in memory: with ``appendfsync always`` it survives a crash
of the server, otherwise the last second (or more) of writes may be lost
together with the epoch guarantee that relies on the meta hash being lost too.
"""

from __future__ import annotations

import asyncio
import builtins
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import msgspec

from .._urls import pop_option, redact_password
from ..deadletters import DeadLetter
from ..events import Event, Position
from ..exceptions import ConfigurationError, LogError
from .base import (
    AppendItem,
    EventLog,
    append_items,
    committed,
    epoch_bucket,
    letter_to_row,
    log_error,
    new_epoch,
    new_store_id,
    now,
    row_to_letter,
    stored_event,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisStreamsLog"]

_T = TypeVar("_T")

#: The key prefix used when the URL does not name one.
DEFAULT_PREFIX: Final = "eventcast"
#: How long the outcome of an append is kept for a retry of the same call, in ms.
BATCH_MEMORY_MS: Final = 300_000

_PREFIX = re.compile(r"^[A-Za-z0-9_\-:.@/]{1,200}$")

# One event to append: (topic, id, time, payload, binary, tags, ikey).
_Item = AppendItem

# KEYS: [1] batch token key, then per topic (meta, stream), then the idempotency
# keys, then the store id and the generation counters. ARGV: t, expires, window
# ms, #topics, #events, batch ms, store id if new, then per topic (topic, bucket,
# size, ttl ms or 0), then per event (topic index, ikey KEYS index or 0, ikey,
# id, time, payload, binary, tags or ""). A topic without a meta hash is born
# under its empty epoch, claimed from its bucket's counter (see log.base).
# Returns {epochs, results}; a result is {offset} for an event stored by this
# call, {offset, fields} for an event already stored (idempotent repeat, or
# every event when the call is a retry of a committed one).
_APPEND = """#!lua
local t = tonumber(ARGV[1])
local expires = ARGV[2]
local window_ms = ARGV[3]
local ntopics = tonumber(ARGV[4])
local nevents = tonumber(ARGV[5])
local batch_ms = ARGV[6]
local E = 7 + 4 * ntopics
local STORE, GENS = KEYS[#KEYS - 1], KEYS[#KEYS]

local function typeof(key)
  return redis.call('TYPE', key)['ok']
end
local function offset_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end
local function fail(msg)
  return redis.error_reply('ERR eventcast: ' .. msg)
end

-- A retry of a call that was committed: return what it stored.
local bt = typeof(KEYS[1])
if bt ~= 'none' and bt ~= 'string' then return fail('wrong type for ' .. KEYS[1]) end
local done = redis.call('GET', KEYS[1])
if done then
  local epochs, results = {}, {}
  for e in string.gmatch(string.match(done, '^([^|]*)'), '%S+') do epochs[#epochs + 1] = e end
  local i = 0
  for off in string.gmatch(string.match(done, '|(.*)$'), '%S+') do
    i = i + 1
    local j = tonumber(ARGV[E + 8 * (i - 1) + 1])
    local found = redis.call('XRANGE', KEYS[2 * j + 1], off, off)
    if #found > 0 then
      results[i] = {tonumber(off), found[1][2]}
    else
      results[i] = {tonumber(off)}
    end
  end
  return {epochs, results}
end

-- Phase 1: read and validate everything; nothing is written before phase 2.
local epochs, tops, fresh, changed = {}, {}, {}, {}
local stt, gt = typeof(STORE), typeof(GENS)
if stt ~= 'none' and stt ~= 'string' then return fail('wrong type for ' .. STORE) end
if gt ~= 'none' and gt ~= 'hash' then return fail('wrong type for ' .. GENS) end
local store = redis.call('GET', STORE)
local store_new = not store
if store_new then store = ARGV[7] end
local claims, claimed = {}, {}
for j = 1, ntopics do
  local meta, stream = KEYS[2 * j], KEYS[2 * j + 1]
  local mt, st = typeof(meta), typeof(stream)
  if mt ~= 'none' and mt ~= 'hash' then return fail('wrong type for ' .. meta) end
  if st ~= 'none' and st ~= 'stream' then return fail('wrong type for ' .. stream) end
  if mt == 'hash' then
    local m = redis.call('HMGET', meta, 'epoch', 'top')
    local top = tonumber(m[2])
    if not m[1] or not top then return fail('corrupt stream metadata in ' .. meta) end
    epochs[j], tops[j], fresh[j] = m[1], top, false
    if st == 'stream' then
      local info = redis.call('XINFO', 'STREAM', stream)
      for k = 1, #info, 2 do
        if info[k] == 'last-generated-id' and offset_of(info[k + 1]) > top then
          return fail('stream ' .. stream .. ' is ahead of its metadata')
        end
      end
    end
  else
    local topic, bucket = ARGV[8 + 4 * (j - 1)], ARGV[9 + 4 * (j - 1)]
    if not claims[bucket] then
      claims[bucket] = 0
      claimed[#claimed + 1] = bucket
    end
    local gen = (tonumber(redis.call('HGET', GENS, bucket)) or 0) + claims[bucket]
    claims[bucket] = claims[bucket] + 1
    local epoch = redis.sha1hex(store .. '\\n' .. topic .. '\\n' .. string.format('%d', gen))
    epochs[j], tops[j], fresh[j] = string.sub(epoch, 1, 8), 0, true
  end
end

local function fields_of(i)
  local b = E + 8 * (i - 1)
  local fields = {'t', ARGV[b + 5], 'i', ARGV[b + 4], 'd', ARGV[b + 6], 'b', ARGV[b + 7]}
  if ARGV[b + 8] ~= '' then
    fields[#fields + 1] = 'g'
    fields[#fields + 1] = ARGV[b + 8]
  end
  if tonumber(ARGV[b + 2]) > 0 then
    fields[#fields + 1] = 'k'
    fields[#fields + 1] = ARGV[b + 3]
  end
  return fields
end

local results, writes, keys = {}, {}, {}
local pending = {}
for i = 1, nevents do
  local b = E + 8 * (i - 1)
  local j, ki, ikey = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), ARGV[b + 3]
  local slot = j .. '\0' .. ikey
  if ki > 0 and pending[slot] then
    -- A repeat of an event stored earlier in this very batch.
    results[i] = {results[pending[slot]][1], fields_of(pending[slot])}
  else
    if ki > 0 then
      local name = KEYS[ki]
      local kt = typeof(name)
      if kt ~= 'none' and kt ~= 'string' then return fail('wrong type for ' .. name) end
      local v = redis.call('GET', name)
      if v and not fresh[j] then
        local epoch, off, exp = string.match(v, '^(%S+) (%d+) (%S+)$')
        if epoch == epochs[j] and tonumber(exp) > t then
          local found = redis.call('XRANGE', KEYS[2 * j + 1], off, off)
          if #found > 0 then results[i] = {tonumber(off), found[1][2]} end
        end
      end
    end
    if results[i] == nil then
      tops[j] = tops[j] + 1
      changed[j] = true
      results[i] = {tops[j]}
      writes[#writes + 1] = i
      if ki > 0 then
        pending[slot] = i
        keys[#keys + 1] = i
      end
    end
  end
end

-- Phase 2: write (nothing below can fail: every key's type was checked above).
if store_new then redis.call('SET', STORE, store) end
for _, bucket in ipairs(claimed) do redis.call('HINCRBY', GENS, bucket, claims[bucket]) end
for j = 1, ntopics do
  if fresh[j] then
    redis.call('DEL', KEYS[2 * j + 1])
    redis.call('HSET', KEYS[2 * j], 'epoch', epochs[j], 'top', 0)
  end
end
for _, i in ipairs(writes) do
  local j = tonumber(ARGV[E + 8 * (i - 1) + 1])
  local size = ARGV[10 + 4 * (j - 1)]
  local id = string.format('%d-1', results[i][1])
  redis.call('XADD', KEYS[2 * j + 1], 'MAXLEN', '=', size, id, unpack(fields_of(i)))
end
for _, i in ipairs(keys) do
  local b = E + 8 * (i - 1)
  local j = tonumber(ARGV[b + 1])
  local value = epochs[j] .. ' ' .. string.format('%d', results[i][1]) .. ' ' .. expires
  redis.call('SET', KEYS[tonumber(ARGV[b + 2])], value, 'PX', window_ms)
end
for j = 1, ntopics do
  if changed[j] or fresh[j] then
    redis.call('HSET', KEYS[2 * j], 'top', tops[j])
  end
  local ttl_ms = tonumber(ARGV[11 + 4 * (j - 1)])
  if ttl_ms > 0 then
    redis.call('PEXPIRE', KEYS[2 * j], ttl_ms)
    redis.call('PEXPIRE', KEYS[2 * j + 1], ttl_ms)
  else
    redis.call('PERSIST', KEYS[2 * j])
    redis.call('PERSIST', KEYS[2 * j + 1])
  end
end

local offsets = {}
for i = 1, nevents do
  offsets[i] = string.format('%d', results[i][1])
end
redis.call('SET', KEYS[1], table.concat(epochs, ' ') .. '|' .. table.concat(offsets, ' '),
  'PX', batch_ms)
return {epochs, results}
"""

# KEYS: meta, stream. ARGV: after, upper offset or "+", limit, reverse (1/0),
# size, cutoff. Returns {} for an unknown topic, else {epoch, entries}.
_READ = """#!lua flags=no-writes
local m = redis.call('HMGET', KEYS[1], 'epoch', 'top')
if not m[1] then return {} end
local top = tonumber(m[2]) or 0
local after, upper = tonumber(ARGV[1]), ARGV[2]
local limit, reverse = tonumber(ARGV[3]), ARGV[4] == '1'
local size, cutoff = tonumber(ARGV[5]), tonumber(ARGV[6])
local lower = math.max(after, top - size) + 1
local out = {}
if upper ~= '+' and tonumber(upper) < lower then return {m[1], out} end
local lo, hi = string.format('%d', lower), upper
while #out < limit do
  local want = limit - #out
  local chunk
  if reverse then
    chunk = redis.call('XREVRANGE', KEYS[2], hi, lo, 'COUNT', want)
  else
    chunk = redis.call('XRANGE', KEYS[2], lo, hi, 'COUNT', want)
  end
  for _, e in ipairs(chunk) do
    if tonumber(e[2][2]) >= cutoff then out[#out + 1] = e end
  end
  if #chunk < want then break end
  local last = tonumber(string.match(chunk[#chunk][1], '^(%d+)'))
  if reverse then
    if last - 1 < lower then break end
    hi = string.format('%d', last - 1)
  else
    lo = string.format('%d', last + 1)
  end
end
return {m[1], out}
"""

# KEYS: ikey, meta, stream. ARGV: t. Returns {} or {epoch, entry id, fields}.
_LOOKUP = """#!lua flags=no-writes
local v = redis.call('GET', KEYS[1])
if not v then return {} end
local epoch, off, exp = string.match(v, '^(%S+) (%d+) (%S+)$')
if not epoch or tonumber(exp) <= tonumber(ARGV[1]) then return {} end
if redis.call('HGET', KEYS[2], 'epoch') ~= epoch then return {} end
local found = redis.call('XRANGE', KEYS[3], off, off)
if #found == 0 then return {} end
return {epoch, found[1][1], found[1][2]}
"""

# KEYS: meta, store, gens. ARGV: topic, bucket. Returns {epoch, top}, writing
# nothing: a topic without a meta hash has offset 0 and its empty epoch.
_POSITION = """#!lua flags=no-writes
local m = redis.call('HMGET', KEYS[1], 'epoch', 'top')
if m[1] and tonumber(m[2]) then return {m[1], tonumber(m[2])} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('ERR eventcast: corrupt stream metadata in ' .. KEYS[1])
end
local store = redis.call('GET', KEYS[2]) or ''
local gen = tonumber(redis.call('HGET', KEYS[3], ARGV[2])) or 0
local epoch = redis.sha1hex(store .. '\\n' .. ARGV[1] .. '\\n' .. string.format('%d', gen))
return {string.sub(epoch, 1, 8), 0}
"""

# KEYS: meta, stream, gens. ARGV: new epoch, ttl ms or 0, bucket. Returns the
# top offset. A stream created here claims a generation of its bucket.
_TRUNCATE = """#!lua
local mt, st = redis.call('TYPE', KEYS[1])['ok'], redis.call('TYPE', KEYS[2])['ok']
if mt ~= 'none' and mt ~= 'hash' then
  return redis.error_reply('ERR eventcast: wrong type for ' .. KEYS[1])
end
if st ~= 'none' and st ~= 'stream' then
  return redis.error_reply('ERR eventcast: wrong type for ' .. KEYS[2])
end
local gt = redis.call('TYPE', KEYS[3])['ok']
if gt ~= 'none' and gt ~= 'hash' then
  return redis.error_reply('ERR eventcast: wrong type for ' .. KEYS[3])
end
if mt == 'none' then redis.call('HINCRBY', KEYS[3], ARGV[3], 1) end
local top = tonumber(redis.call('HGET', KEYS[1], 'top')) or 0
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'top', top)
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return top
"""

# KEYS: meta, stream. ARGV: size, cutoff or "". Returns the entries removed.
# A stream left without entries is forgotten (meta and stream deleted).
_PRUNE = """#!lua
local st = redis.call('TYPE', KEYS[2])['ok']
if st == 'none' and redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  redis.call('DEL', KEYS[1])
  return 0
end
if st ~= 'stream' then return 0 end
local top = tonumber(redis.call('HGET', KEYS[1], 'top'))
if not top then return 0 end
local removed = 0
local floor = top - tonumber(ARGV[1])
if floor >= 1 then
  removed = redis.call('XTRIM', KEYS[2], 'MINID', '=', string.format('%d', floor + 1))
end
if ARGV[2] ~= '' then
  local cutoff = tonumber(ARGV[2])
  local start, minid = '-', nil
  while true do
    local chunk = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', 200)
    local young = false
    for _, e in ipairs(chunk) do
      if tonumber(e[2][2]) >= cutoff then
        young = true
        break
      end
      minid = tonumber(string.match(e[1], '^(%d+)')) + 1
    end
    if young or #chunk < 200 then break end
    start = string.format('%d', minid)
  end
  if minid then
    removed = removed + redis.call('XTRIM', KEYS[2], 'MINID', '=', string.format('%d', minid))
  end
end
if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
return removed
"""

_encode_row = msgspec.msgpack.Encoder().encode
_decode_row = msgspec.msgpack.Decoder().decode


def split_url(url: str) -> tuple[str, str]:
    """Split a log URL into the redis-py URL and the key prefix (``?prefix=``).

    Raises:
        ConfigurationError: the URL is not a Redis URL or the prefix is invalid.
    """
    if urlsplit(url).scheme.lower() not in ("redis", "rediss"):
        raise ConfigurationError(f"not a Redis URL: {redact_password(url)!r}")
    rest, option = pop_option(url, "prefix")
    prefix = DEFAULT_PREFIX if option is None else option
    if not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"invalid key prefix {prefix!r} in {redact_password(url)!r}: "
            "use 1-200 letters, digits and _ - : . @ /"
        )
    return rest, prefix


def _glob_escape(text: str) -> str:
    """Escape a literal for a ``SCAN MATCH`` pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: Sequence[bytes]) -> dict[bytes, bytes]:
    return {raw[k]: raw[k + 1] for k in range(0, len(raw), 2)}


def _entry_event(topic: str, epoch: str, entry_id: bytes, raw: Sequence[bytes]) -> Event:
    """Rebuild a stored event from a stream entry."""
    f = _fields(raw)
    ikey = f.get(b"k")
    return stored_event(
        topic,
        int(entry_id.partition(b"-")[0]),
        epoch,
        f[b"i"].decode(),
        float(f[b"t"]),
        f[b"d"],
        f[b"b"] == b"1",
        f.get(b"g"),
        None if ikey is None else ikey.decode(),
    )


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisStreamsLog(EventLog):
    """The :class:`EventLog` on Redis Streams, safe to share between processes.

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS);
            ``?prefix=name`` sets the key prefix (default ``eventcast``).
        dedup_window: how long idempotency keys are remembered, in seconds.
        max_connections: the most connections kept open (callers wait for one).
        dead_letters: the most dead letters kept (the oldest are dropped).
        connect_timeout: seconds to wait for a connection to the server.
        timeout: seconds to wait for a reply (and for a free connection).
        retries: retries of a command after a connection error or a timeout,
            with exponential backoff (an append retried after a lost reply
            returns what the first attempt committed, never commits twice).
        health_check_interval: seconds after which an idle connection is
            checked with a ``PING`` before use.
    """

    def __init__(
        self,
        url: str,
        *,
        dedup_window: float = 120.0,
        max_connections: int = 50,
        dead_letters: int = 10_000,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        retries: int = 3,
        health_check_interval: int = 30,
    ) -> None:
        super().__init__(dedup_window=dedup_window)
        if max_connections < 1 or dead_letters < 1 or retries < 0:
            raise ValueError("max_connections and dead_letters must be positive, retries >= 0")
        if connect_timeout <= 0 or timeout <= 0 or health_check_interval < 0:
            raise ValueError("timeouts must be positive")
        self._redis_url, self.prefix = split_url(url)
        self.url = redact_password(url)
        self.max_connections = max_connections
        self.max_dead_letters = dead_letters
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retries = retries
        self.health_check_interval = health_check_interval
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._opened = False
        self._closed = False

    # -- keys -----------------------------------------------------------------------

    def _meta(self, topic: str) -> str:
        return f"{self.prefix}:meta:{topic}"

    def _stream(self, topic: str) -> str:
        return f"{self.prefix}:stream:{topic}"

    def _ikey(self, topic: str, key: str) -> str:
        return f"{self.prefix}:ikey:{len(topic)}:{topic}:{key}"

    @property
    def _letters(self) -> str:
        return f"{self.prefix}:dead_letters"

    @property
    def _store(self) -> str:
        return f"{self.prefix}:store"

    @property
    def _gens(self) -> str:
        return f"{self.prefix}:gens"

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the server (Redis 7.0+) and load the scripts. Idempotent."""
        if self._opened:
            return
        if self._closed:
            raise LogError("the log is closed")
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, RedisError, TimeoutError

        pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
            self._redis_url,
            max_connections=self.max_connections,
            timeout=self.timeout,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.connect_timeout,
            health_check_interval=self.health_check_interval,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), self.retries),
            retry_on_error=[ConnectionError, TimeoutError],
        )
        client = Redis(connection_pool=pool)
        try:
            async with asyncio.timeout(self.connect_timeout * 3):
                await client.ping()
                scripts = {
                    name: client.register_script(source)
                    for name, source in (
                        ("append", _APPEND),
                        ("read", _READ),
                        ("lookup", _LOOKUP),
                        ("position", _POSITION),
                        ("truncate", _TRUNCATE),
                        ("prune", _PRUNE),
                    )
                }
                for script in scripts.values():
                    # Fails plainly on a server older than 7.0 (no #!lua shebang).
                    script.sha = await client.script_load(script.script)
                await client.set(f"{self.prefix}:store", new_store_id(), nx=True)
        except BaseException as exc:
            await asyncio.shield(client.aclose(close_connection_pool=True))
            if isinstance(exc, RedisError | OSError | TimeoutError):
                raise log_error(f"open {self.url!r}", exc) from exc
            raise
        self._client = client
        self._scripts = scripts
        self._opened = True

    async def close(self) -> None:
        """Close every connection. Idempotent, also when cancelled."""
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await asyncio.shield(client.aclose(close_connection_pool=True))

    # -- running commands ------------------------------------------------------------------

    def _ready(self) -> Redis:
        client = self._client
        if not self._opened or self._closed or client is None:
            raise LogError("the log is not open")
        return client

    async def _run(self, action: str, fn: Callable[[Redis], Awaitable[_T]]) -> _T:
        """Run ``fn`` with the client, translating every Redis error into LogError."""
        from redis.exceptions import RedisError

        client = self._ready()
        try:
            return await fn(client)
        except (RedisError, OSError) as exc:
            raise log_error(action, exc) from exc

    async def _script(self, action: str, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]

        async def run(client: Redis) -> Any:
            return await script(keys=keys, args=args, client=client)

        return await self._run(action, run)

    def _append_call(self, items: Sequence[_Item], token: str) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of the append script for one batch."""
        t = now()
        topics: dict[str, int] = {}
        for item in items:
            topics.setdefault(item[0], len(topics) + 1)
        keys = [f"{self.prefix}:batch:{token}"]
        args: list[Any] = [
            repr(t),
            repr(t + self.dedup_window),
            _ms(self.dedup_window),
            len(topics),
            len(items),
            BATCH_MEMORY_MS,
            new_store_id(),
        ]
        for topic in topics:
            retention = self.retention(topic)
            keys += [self._meta(topic), self._stream(topic)]
            args += [
                topic,
                epoch_bucket(topic),
                retention.size,
                0 if retention.ttl is None else _ms(retention.ttl),
            ]
        for topic, event_id, at, payload, binary, tags, ikey in items:
            index = 0
            if ikey is not None:
                keys.append(self._ikey(topic, ikey))
                index = len(keys)
            args += [
                topics[topic],
                index,
                "" if ikey is None else ikey,
                event_id,
                repr(at),
                payload,
                "1" if binary else "0",
                b"" if tags is None else tags,
            ]
        keys += [self._store, self._gens]
        return keys, args

    # -- writing -----------------------------------------------------------------------------

    async def append(self, events: Sequence[Event]) -> builtins.list[Event]:
        """Commit events atomically (one script); see :meth:`EventLog.append`."""
        if not events:
            return []
        items: list[_Item] = append_items(events)
        self._ready()
        keys, args = self._append_call(items, secrets.token_hex(12))
        epochs_raw, results = await self._script("append", "append", keys, args)
        topics = list(dict.fromkeys(item[0] for item in items))
        epochs = dict(zip(topics, map(_text, epochs_raw), strict=True))
        out: list[Event] = []
        for event, item, result in zip(events, items, results, strict=True):
            epoch = epochs[event.topic]
            offset = int(result[0])
            if len(result) > 1:
                stored = _entry_event(event.topic, epoch, f"{offset}-1".encode(), result[1])
                if stored.id != event.id:  # an idempotent repeat: the original event
                    out.append(stored)
                    continue
            out.append(committed(event, offset, epoch, item[3]))
        return out

    def _ttl_ms(self, topic: str) -> int:
        ttl = self.retention(topic).ttl
        return 0 if ttl is None else _ms(ttl)

    async def truncate(self, topic: str) -> Position:
        """Remove a topic's history and start a new epoch; return the new position."""
        epoch = new_epoch()
        top = await self._script(
            "truncate",
            "truncate",
            [self._meta(topic), self._stream(topic), self._gens],
            [epoch, self._ttl_ms(topic), epoch_bucket(topic)],
        )
        return Position(int(top), epoch)

    async def prune(self, now_: float | None = None) -> int:
        """Drop events past their topic's retention (size and age); return how many."""
        t = now() if now_ is None else now_
        pattern = _glob_escape(f"{self.prefix}:meta:") + "*"
        start = len(self.prefix) + len(":meta:")

        async def topics(client: Redis) -> set[str]:
            return {_text(key)[start:] async for key in client.scan_iter(pattern, count=1000)}

        removed = 0
        for topic in sorted(await self._run("prune", topics)):
            retention = self.retention(topic)
            cutoff = "" if retention.ttl is None else repr(t - retention.ttl)
            removed += int(
                await self._script(
                    "prune",
                    "prune",
                    [self._meta(topic), self._stream(topic)],
                    [retention.size, cutoff],
                )
            )
        return removed

    async def check(self) -> None:
        """Raise :class:`LogError` unless the log can accept writes now (a tiny write)."""

        async def run(client: Redis) -> None:
            await client.set(f"{self.prefix}:checked", repr(now()))

        await self._run("check", run)

    async def save_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Store dead letters (those whose data cannot be encoded are skipped)."""
        rows = [row for row in map(letter_to_row, letters) if row is not None]
        if not rows:
            return
        key = self._letters

        async def run(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                for row in rows:
                    pipe.zremrangebyscore(key, row[0], row[0])
                    pipe.zadd(key, {_encode_row(row): row[0]})
                pipe.zremrangebyrank(key, 0, -self.max_dead_letters - 1)
                await pipe.execute()

        await self._run("save dead letters", run)

    async def delete_dead_letters(self, ids: Sequence[int]) -> None:
        """Remove stored dead letters by id."""
        if not ids:
            return
        key = self._letters

        async def run(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                for lid in ids:
                    pipe.zremrangebyscore(key, lid, lid)
                await pipe.execute()

        await self._run("delete dead letters", run)

    # -- reading -----------------------------------------------------------------------------

    async def read(
        self,
        topic: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> builtins.list[Event]:
        """Return retained events of ``topic``; see :meth:`EventLog.read`."""
        self._ready()
        if limit <= 0:
            return []
        if before is not None and before <= 1:
            return []
        retention = self.retention(topic)
        cutoff = -1.0 if retention.ttl is None else now() - retention.ttl
        reply = await self._script(
            "read",
            "read",
            [self._meta(topic), self._stream(topic)],
            [
                max(after, 0),
                "+" if before is None else before - 1,
                limit,
                "1" if reverse else "0",
                retention.size,
                repr(cutoff),
            ],
        )
        if not reply:
            return []
        epoch = _text(reply[0])
        return [_entry_event(topic, epoch, entry_id, raw) for entry_id, raw in reply[1]]

    async def position(self, topic: str) -> Position:
        """Return the latest position of a topic (writes nothing; see :mod:`.base`)."""
        epoch, top = await self._script(
            "read a position",
            "position",
            [self._meta(topic), self._store, self._gens],
            [topic, epoch_bucket(topic)],
        )
        return Position(int(top), _text(epoch))

    async def earliest(self, topic: str) -> int | None:
        """Return the smallest retained offset of a topic, or ``None``."""
        first = await self.read(topic, limit=1)
        return first[0].offset if first else None

    async def lookup(self, topic: str, idempotency_key: str) -> Event | None:
        """Return the event stored under this idempotency key within the dedup window."""
        reply = await self._script(
            "look up an idempotency key",
            "lookup",
            [self._ikey(topic, idempotency_key), self._meta(topic), self._stream(topic)],
            [repr(now())],
        )
        if not reply:
            return None
        epoch, entry_id, raw = reply
        return _entry_event(topic, _text(epoch), entry_id, raw)

    async def load_dead_letters(self, limit: int) -> builtins.list[DeadLetter]:
        """Return up to ``limit`` stored dead letters (the newest), oldest first."""
        self._ready()
        if limit <= 0:
            return []
        key = self._letters

        async def run(client: Redis) -> list[Any]:
            return list(await client.zrange(key, -limit, -1))

        return [
            row_to_letter(_decode_row(raw)) for raw in await self._run("load dead letters", run)
        ]

    def __repr__(self) -> str:
        return f"<RedisStreamsLog {self.url!r} prefix={self.prefix!r}>"
