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

import asyncio
import base64
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec

from ..exceptions import BackplaneError, ConfigurationError
from .presence import DEFAULT_PRESENCE_TTL, Presence, PresenceInfo

__all__ = ["NATSPresence", "decode_key_token", "encode_key_token"]

logger = logging.getLogger("eventcast.presence")

#: The bucket prefix used when none is given.
DEFAULT_PREFIX: Final = "eventcast"

#: JetStream's error code for a failed "expected last subject sequence" check.
_WRONG_LAST_SEQUENCE: Final = 10071

_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,200}$")

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def encode_key_token(text: str) -> str:
    """Encode any string as one token of a KV key (``k`` + base32, no padding)."""
    return "k" + base64.b32encode(text.encode()).decode().rstrip("=")


def decode_key_token(token: str) -> str:
    """The string :func:`encode_key_token` encoded."""
    raw = token[1:]
    return base64.b32decode(raw + "=" * (-len(raw) % 8)).decode()


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
        self.bucket = f"{prefix}_presence"
        if not _BUCKET.match(self.bucket):
            raise ConfigurationError(
                f"invalid presence prefix {prefix!r} for NATS: use letters, digits, '_' and '-'"
            )
        if ttl <= 0 or connect_timeout <= 0 or timeout <= 0:
            raise ConfigurationError("ttl and timeouts must be positive")
        scheme_, _, rest = url.partition("://")
        netloc = rest.partition("/")[0].partition("?")[0]
        self.servers = [f"{scheme_}://{host}" for host in netloc.split(",") if host]
        self.prefix = prefix
        self.ttl = ttl
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._clock = clock
        self._nc: Any = None
        self._kv: Any = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        """Connect and create the bucket if it is missing. Idempotent."""
        if self._closed:
            raise BackplaneError("the presence store is closed")
        if self._kv is not None:
            return
        import nats
        from nats.errors import Error as NATSError
        from nats.js.errors import BucketNotFoundError

        async def error(exc: Exception) -> None:
            logger.warning("NATS presence error: %s", exc)

        async with self._lock:
            if self._is_open():  # opened by another task meanwhile
                return
            nc: Any = None
            try:
                async with asyncio.timeout(self.connect_timeout * 3):
                    nc = await nats.connect(
                        servers=self.servers,
                        connect_timeout=self.connect_timeout,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,
                        error_cb=error,
                    )
                    js = nc.jetstream(timeout=self.timeout)
                    try:
                        kv = await js.key_value(self.bucket)
                    except BucketNotFoundError:
                        kv = await js.create_key_value(bucket=self.bucket, ttl=self.ttl, history=1)
            except BaseException as exc:
                if nc is not None:
                    await asyncio.shield(_quiet_close(nc))
                if isinstance(exc, NATSError | OSError | TimeoutError):
                    raise BackplaneError(
                        f"cannot open the NATS presence bucket {self.bucket!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                raise
            if self._is_closed():  # closed while connecting
                await asyncio.shield(_quiet_close(nc))
                raise BackplaneError("the presence store is closed")
            self._nc, self._kv = nc, kv

    def _is_open(self) -> bool:
        return self._kv is not None

    def _is_closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the connection. Idempotent, also when cancelled."""
        self._closed = True
        nc, self._nc, self._kv = self._nc, None, None
        if nc is not None:
            await asyncio.shield(_quiet_close(nc))

    async def jetstream(self) -> Any:
        """The connected JetStream context (connecting first if needed).

        Other stores sharing this NATS connection (channel occupancy) use it.

        Raises:
            BackplaneError: NATS cannot be reached, or the store is closed.
        """
        await self._bucket()
        nc = self._nc
        if nc is None:
            raise BackplaneError("the presence store is closed")
        return nc.jetstream(timeout=self.timeout)

    async def _bucket(self) -> Any:
        if self._kv is None:
            await self.open()
        if self._kv is None:
            raise BackplaneError("the presence store is closed")
        return self._kv

    def _error(self, action: str, exc: BaseException) -> BackplaneError:
        return BackplaneError(f"presence could not {action}: {type(exc).__name__}: {exc}")

    async def add(self, channel: str, client: str, info: PresenceInfo, ttl: float) -> None:
        from nats.errors import Error as NATSError

        if ttl <= 0:
            raise ConfigurationError("a presence TTL must be positive")
        kv = await self._bucket()
        key = f"{encode_key_token(channel)}.{encode_key_token(client)}"
        value = _encode({"info": dict(info), "expires_at": self._clock() + ttl})
        try:
            async with asyncio.timeout(self.timeout):
                await kv.put(key, value)
        except (NATSError, OSError, TimeoutError) as exc:
            raise self._error("add an entry", exc) from exc

    async def remove(self, channel: str, client: str) -> None:
        from nats.errors import Error as NATSError

        kv = await self._bucket()
        key = f"{encode_key_token(channel)}.{encode_key_token(client)}"
        try:
            async with asyncio.timeout(self.timeout):
                await kv.purge(key)
        except (NATSError, OSError, TimeoutError) as exc:
            raise self._error("remove an entry", exc) from exc

    async def get(self, channel: str) -> dict[str, PresenceInfo]:
        from nats.errors import Error as NATSError
        from nats.js.errors import APIError

        kv = await self._bucket()
        token = encode_key_token(channel)
        entries: list[Any] = []
        try:
            async with asyncio.timeout(self.timeout):
                watcher = await kv.watch(f"{token}.*", inactive_threshold=30.0)
                try:
                    async for entry in watcher:
                        if entry is None:  # the last value of every key was delivered
                            break
                        entries.append(entry)
                        if entry.delta == 0:
                            break
                finally:
                    with contextlib.suppress(NATSError, OSError):
                        await watcher.stop()
        except (NATSError, OSError, TimeoutError) as exc:
            raise self._error("read entries", exc) from exc
        now = self._clock()
        live: dict[str, PresenceInfo] = {}
        expired: list[Any] = []
        for entry in entries:
            if entry.operation is not None or not entry.value:  # a delete or purge marker
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
            try:
                async with asyncio.timeout(self.timeout):
                    # Only if nobody refreshed it since it was read.
                    await kv.delete(entry.key, last=entry.revision)
            except APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise self._error("delete expired entries", exc) from exc
            except (NATSError, OSError, TimeoutError) as exc:
                raise self._error("delete expired entries", exc) from exc
        return live

    def __repr__(self) -> str:
        return f"<NATSPresence bucket={self.bucket!r}>"


async def _quiet_close(nc: Any) -> None:
    with contextlib.suppress(Exception):
        await nc.close()
