"""Presence shared by every node, in a NATS JetStream key-value bucket.

The bucket is ``{prefix}_presence`` (created if missing), whose ``ttl`` (the
stream's max age) is the longest an entry can live without a refresh, so the
entries of a crashed node vanish by themselves. Each entry's key is the
channel and the client id, each base32-encoded (without padding, behind a
``k``) so that any string fits the key alphabet: ``k<channel>.k<client>``; its
value is the JSON ``{"info": …, "expires_at": …}`` (a wall-clock time).
Reading a channel watches ``k<channel>.*`` for the last value of each key,
filters out expired entries and deletes them unless they were refreshed
meanwhile. An entry whose own ``ttl`` is longer than the bucket's lives only
as long as the bucket's.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

from ..exceptions import ConfigurationError
from ._kv import KVEntry, NATSBucket, decode_key_token, encode_key_token
from .presence import DEFAULT_PRESENCE_TTL, Presence, PresenceInfo

__all__ = ["NATSPresence", "encode_key_token"]

#: The bucket prefix used when none is given.
DEFAULT_PREFIX: Final = "eventcast"

#: JetStream's error code for a failed "expected last subject sequence" check.
_WRONG_LAST_SEQUENCE: Final = 10071

_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,200}$")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class NATSPresence(Presence):
    """:class:`Presence` in a JetStream key-value bucket, shared by every node.

    Args:
        url: ``nats://host:4222`` (several comma-separated servers allowed).
        prefix: the bucket is named ``{prefix}_presence`` (letters, digits, ``_``, ``-``).
        ttl: the bucket's max age: no entry outlives it without a refresh.
        connect_timeout: seconds to reach NATS.
        timeout: seconds to wait for one operation.
        clock: the wall clock (seconds since the epoch), injectable for tests.

    The client connects on :meth:`open`, or on first use.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_PRESENCE_TTL,
        connect_timeout: float = 5.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        scheme = url.partition("://")[0].lower()
        if scheme not in ("nats", "tls") or "://" not in url:
            raise ConfigurationError(f"not a NATS URL: {url!r}")
        bucket = f"{prefix}_presence"
        if not _BUCKET.match(bucket):
            raise ConfigurationError(
                f"invalid presence prefix {prefix!r} for NATS: use letters, digits, '_' and '-'"
            )
        self._kv = NATSBucket(
            url,
            bucket=bucket,
            what="presence",
            ttl=ttl,
            connect_timeout=connect_timeout,
            timeout=timeout,
        )
        self.bucket = bucket
        self.servers = self._kv.servers
        #: Seconds to wait for one operation (stores sharing the connection use it too).
        self.timeout = timeout
        self.prefix = prefix
        self.ttl = ttl
        self._clock = clock

    async def open(self) -> None:
        """Connect and create the bucket if it is missing. Idempotent."""
        await self._kv.open()

    async def jetstream(self) -> Any:
        """The JetStream context of this store's connection (connecting first if needed).

        Other stores sharing this NATS connection (channel occupancy) use it.

        Raises:
            BackplaneError: NATS cannot be reached, or the store is closed.
        """
        return await self._kv.jetstream()

    async def close(self) -> None:
        """Close the connection. Idempotent, also when cancelled."""
        await self._kv.close()

    async def add(self, channel: str, client: str, info: PresenceInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ConfigurationError("a presence TTL must be positive")
        key = f"{encode_key_token(channel)}.{encode_key_token(client)}"
        value = _encode({"info": dict(info), "expires_at": self._clock() + ttl})

        async def put(kv: Any) -> None:
            await kv.put(key, value)

        await self._kv.run("add an entry", put)

    async def remove(self, channel: str, client: str) -> None:
        key = f"{encode_key_token(channel)}.{encode_key_token(client)}"

        async def purge(kv: Any) -> None:
            await kv.purge(key)

        await self._kv.run("remove an entry", purge)

    async def get(self, channel: str) -> dict[str, PresenceInfo]:
        entries = await self._kv.latest(f"{encode_key_token(channel)}.*")
        now = self._clock()
        live: dict[str, PresenceInfo] = {}
        expired: list[KVEntry] = []
        for entry in entries:
            if entry.deleted or not entry.value:  # a delete or purge marker
                continue
            try:
                value = _decode(entry.value)
                info, expires_at = value["info"], float(value["expires_at"])
                client = decode_key_token(entry.key.partition(".")[2])
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                expires_at, info = -math.inf, None  # unreadable: drop it
            if expires_at <= now or not isinstance(info, dict):
                expired.append(entry)
            else:
                live[client] = info
        for entry in expired:
            await self._kv.run("delete expired entries", _deleter(entry))
        return live

    def __repr__(self) -> str:
        return f"<NATSPresence bucket={self.bucket!r}>"


def _deleter(entry: KVEntry) -> Callable[[Any], Awaitable[None]]:
    """Delete an entry read expired, only if nobody refreshed it since it was read."""

    async def delete(kv: Any) -> None:
        from nats.js.errors import APIError

        try:
            await kv.delete(entry.key, last=entry.revision)
        except APIError as exc:
            if exc.err_code != _WRONG_LAST_SEQUENCE:
                raise

    return delete
