"""Connections to the shared engines behind the hub's stores: one Redis client, one NATS KV bucket.

Presence (:mod:`~eventcast.server.presence_redis`,
:mod:`~eventcast.server.presence_nats`) and the access store of blocked users
and revoked tokens (:mod:`~eventcast.server.access_redis`,
:mod:`~eventcast.server.access_nats`) keep their data in Redis or in a
JetStream key-value bucket. They share how they connect: on first use (or
:meth:`open`), once even when many tasks ask at the same moment, with bounded
timeouts, and with every driver error translated into
:class:`~eventcast.exceptions.BackplaneError`. ``close()`` is idempotent and
final, also when cancelled. The drivers are imported lazily.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ..exceptions import BackplaneError, ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "KVEntry",
    "NATSBucket",
    "RedisConnection",
    "decode_key_token",
    "encode_key_token",
    "require_driver",
]

logger = logging.getLogger("eventcast.server")

_T = TypeVar("_T")
_H = TypeVar("_H")


def require_driver(module: str, what: str, extra: str) -> None:
    """Check that a store's driver is installed.

    Raises:
        ConfigurationError: it is not; the message names the extra to install.
    """
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"{what} needs {module}: pip install 'eventcast[{extra}]'"
        ) from exc


def encode_key_token(text: str) -> str:
    """Encode any string as one token of a KV key (``k`` + base32, no padding)."""
    return "k" + base64.b32encode(text.encode()).decode().rstrip("=")


def decode_key_token(token: str) -> str:
    """The string :func:`encode_key_token` encoded.

    Raises:
        ValueError: ``token`` is not such a token.
    """
    raw = token[1:]
    try:
        return base64.b32decode(raw + "=" * (-len(raw) % 8)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not an encoded key token: {token[:40]!r}") from exc


class _OpenedOnce(ABC, Generic[_H]):
    """A connection opened on first use, once even when many tasks ask at the same moment.

    Subclasses say how to connect and how to let go; :meth:`close` is final.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._handle: _H | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @abstractmethod
    async def _connect(self) -> _H:
        """Connect (within the timeouts), or raise ``BackplaneError`` having released it all."""

    @abstractmethod
    async def _release(self, handle: _H) -> None:
        """Close what :meth:`_connect` opened (quietly)."""

    async def _opened(self) -> _H:
        if self._closed:
            raise BackplaneError(f"the {self.what} store is closed")
        handle = self._handle
        if handle is not None:
            return handle
        async with self._lock:
            handle = self._current()
            if handle is not None:  # opened by another task meanwhile
                return handle
            handle = await self._connect()
            if self._is_closed():  # closed while connecting
                await asyncio.shield(self._release(handle))
                raise BackplaneError(f"the {self.what} store is closed")
            self._handle = handle
            return handle

    # Calls, not attributes: they are read again after an await.
    def _current(self) -> _H | None:
        return self._handle

    def _is_closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the connection. Idempotent and final, also when cancelled."""
        self._closed = True
        handle, self._handle = self._handle, None
        if handle is not None:
            await asyncio.shield(self._release(handle))


class RedisConnection(_OpenedOnce["Redis"]):
    """One Redis (or Redis Cluster) client, connected on first use.

    Args:
        url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS,
            ``redis+cluster://`` for Redis Cluster).
        what: what the connection is for, in error messages ("presence").
        connect_timeout: seconds to wait for a connection to Redis.
        timeout: seconds to wait for a reply.
        retries: retries of a command after a connection error or timeout.

    Raises:
        ConfigurationError: not a Redis URL, or bad timeouts.
    """

    def __init__(
        self,
        url: str,
        *,
        what: str,
        connect_timeout: float = 5.0,
        timeout: float = 5.0,
        retries: int = 3,
    ) -> None:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster") or not sep:
            raise ConfigurationError(f"not a Redis URL: {url!r}")
        #: ``redis+cluster://``: the data lives on Redis Cluster (one key per command).
        self.cluster = scheme.endswith("+cluster")
        if self.cluster:
            url = f"{scheme.removesuffix('+cluster')}://{rest}"
        if connect_timeout <= 0 or timeout <= 0 or retries < 0:
            raise ConfigurationError("timeouts must be positive and retries >= 0")
        super().__init__(what)
        self.url = url
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retries = retries

    @property
    def client(self) -> Redis | None:
        """The client, once connected."""
        return self._handle

    async def open(self) -> Redis:
        """Connect to Redis and check it answers; return the client. Idempotent.

        Raises:
            BackplaneError: Redis is unreachable, or the connection is closed.
        """
        return await self._opened()

    async def _connect(self) -> Redis:
        from redis.asyncio import Redis, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError, RedisError, TimeoutError

        client = (RedisCluster if self.cluster else Redis).from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.connect_timeout,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), self.retries),
            retry_on_error=[ConnectionError, TimeoutError],
        )
        try:
            async with asyncio.timeout(self.connect_timeout * 3):
                await client.ping()
        except BaseException as exc:
            await asyncio.shield(client.aclose())
            if isinstance(exc, RedisError | OSError | TimeoutError):
                raise BackplaneError(f"cannot reach Redis for {self.what}: {exc}") from exc
            raise
        # RedisCluster offers every command used by the stores (each touches one key).
        return cast("Redis", client)

    async def _release(self, handle: Redis) -> None:
        await handle.aclose()

    async def run(self, action: str, fn: Callable[[Redis], Awaitable[_T]]) -> _T:
        """Run ``fn`` with the client (connecting first if needed).

        Raises:
            BackplaneError: Redis failed; the message says which action.
        """
        from redis.exceptions import RedisError

        client = self.client or await self.open()
        try:
            return await fn(client)
        except (RedisError, OSError) as exc:
            raise BackplaneError(
                f"{self.what} could not {action}: {type(exc).__name__}: {exc}"
            ) from exc


class NATSBucket(_OpenedOnce[tuple[Any, Any]]):
    """One JetStream key-value bucket (created if missing), connected on first use.

    Args:
        url: ``nats://host:4222`` (several comma-separated servers allowed).
        bucket: the bucket's name.
        what: what the bucket is for, in error messages ("presence").
        ttl: the bucket's max age (``None``: entries never expire by age).
        connect_timeout: seconds to reach NATS.
        timeout: seconds to wait for one operation.

    Raises:
        ConfigurationError: not a NATS URL, or bad timeouts.
    """

    def __init__(
        self,
        url: str,
        *,
        bucket: str,
        what: str,
        ttl: float | None = None,
        connect_timeout: float = 5.0,
        timeout: float = 5.0,
    ) -> None:
        scheme, sep, rest = url.partition("://")
        if scheme.lower() not in ("nats", "tls", "nats+jetstream") or not sep:
            raise ConfigurationError(f"not a NATS URL: {url!r}")
        if (ttl is not None and ttl <= 0) or connect_timeout <= 0 or timeout <= 0:
            raise ConfigurationError("ttl and timeouts must be positive")
        scheme = "nats" if scheme.lower() == "nats+jetstream" else scheme
        netloc = rest.partition("/")[0].partition("?")[0]
        self.servers = [f"{scheme}://{host}" for host in netloc.split(",") if host]
        super().__init__(what)
        self.bucket = bucket
        self.ttl = ttl
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    async def open(self) -> Any:
        """Connect and create the bucket if it is missing; return it. Idempotent.

        Raises:
            BackplaneError: NATS is unreachable, or the bucket is closed.
        """
        return (await self._opened())[1]

    async def _connect(self) -> tuple[Any, Any]:
        import nats
        from nats.errors import Error as NATSError
        from nats.js.errors import BucketNotFoundError

        async def error(exc: Exception) -> None:
            logger.warning("NATS %s error: %s", self.what, exc)

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
                    options: dict[str, Any] = {"bucket": self.bucket, "history": 1}
                    if self.ttl is not None:
                        options["ttl"] = self.ttl
                    kv = await js.create_key_value(**options)
        except BaseException as exc:
            if nc is not None:
                await asyncio.shield(self._release((nc, None)))
            if isinstance(exc, NATSError | OSError | TimeoutError):
                raise BackplaneError(
                    f"cannot open the NATS {self.what} bucket {self.bucket!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            raise
        return nc, kv

    async def _release(self, handle: tuple[Any, Any]) -> None:
        with contextlib.suppress(Exception):
            await handle[0].close()

    async def jetstream(self) -> Any:
        """The JetStream context of the connection (opening it first if needed).

        Raises:
            BackplaneError: NATS cannot be reached, or the bucket is closed.
        """
        nc, _ = await self._opened()
        return nc.jetstream(timeout=self.timeout)

    def error(self, action: str, exc: BaseException) -> BackplaneError:
        """A driver error, translated (``raise bucket.error(...) from exc``)."""
        return BackplaneError(f"{self.what} could not {action}: {type(exc).__name__}: {exc}")

    async def run(self, action: str, fn: Callable[[Any], Awaitable[_T]]) -> _T:
        """Run ``fn`` with the bucket (opening it first if needed), within the timeout.

        Raises:
            BackplaneError: NATS failed; the message says which action.
        """
        from nats.errors import Error as NATSError

        kv = await self.open()
        try:
            async with asyncio.timeout(self.timeout):
                return await fn(kv)
        except (NATSError, OSError, TimeoutError) as exc:
            raise self.error(action, exc) from exc

    async def latest(self, pattern: str) -> list[KVEntry]:
        """The last entry of every key matching ``pattern`` (delete markers included).

        Read with an ordered consumer delivering the last message of each
        subject, counting what it will deliver from its own info: nats-py's
        ``watch()`` may say "nothing more" before messages already on their
        way arrive, and an empty answer is then wrongly empty.

        Raises:
            BackplaneError: NATS failed or did not answer in time.
        """
        from nats.js.api import DeliverPolicy

        handle = await self._opened()
        js = handle[0].jetstream(timeout=self.timeout)
        prefix = f"$KV.{self.bucket}."

        async def read(kv: Any) -> list[KVEntry]:
            sub = await js.subscribe(
                prefix + pattern,
                stream=f"KV_{self.bucket}",
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                inactive_threshold=30.0,
            )
            try:
                info = await sub.consumer_info()
                expected = info.delivered.consumer_seq + info.num_pending
                entries = []
                for _ in range(expected):
                    msg = await sub.next_msg(timeout=self.timeout)
                    headers = msg.header or {}
                    entries.append(
                        KVEntry(
                            key=msg.subject[len(prefix) :],
                            value=msg.data,
                            revision=msg.metadata.sequence.stream,
                            deleted=bool(headers.get("KV-Operation"))
                            or bool(headers.get("Nats-Marker-Reason")),
                        )
                    )
                return entries
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

        return await self.run("read entries", read)


@dataclass(frozen=True, slots=True)
class KVEntry:
    """The last message of one key of a bucket.

    Attributes:
        key: the key (without the bucket's subject prefix).
        value: the value (empty for a delete marker).
        revision: the message's stream sequence (for a conditional delete).
        deleted: a delete or purge marker, not a value.
    """

    key: str
    value: bytes
    revision: int
    deleted: bool
