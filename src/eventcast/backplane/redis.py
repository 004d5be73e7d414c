"""``redis://`` and ``redis+cluster://``: publications over Redis pub/sub.

* ``redis://host:6379/0?prefix=eventcast``: one Redis (or a replicated
  primary). Exact topics use ``SUBSCRIBE``; patterns use ``PSUBSCRIBE`` with a
  broader glob, and the bus filters with the exact grammar.
* ``redis+cluster://host:7000?prefix=eventcast``: Redis Cluster with sharded
  pub/sub (``SSUBSCRIBE``/``SPUBLISH``), so a channel's traffic stays on the
  shard that owns it and the cluster grows by adding shards. Sharded pub/sub
  has no patterns, and a classic ``PSUBSCRIBE`` never sees an ``SPUBLISH``: so
  each publication is also sent with a classic ``PUBLISH`` to a twin channel
  (``prefix~p:topic``, broadcast cluster-wide) where pattern filters listen
  with ``PSUBSCRIBE``. A node with an exact and a pattern filter on one topic
  gets both copies and passes one on (a bounded set of recent payloads).

Publishing uses redis-py with its *asyncio* ``Retry`` and exponential backoff
(the synchronous ``redis.retry.Retry`` silently disables retries in the asyncio
client). Subscribing on a single Redis uses a lean reader of eventcast's own
(hiredis on an asyncio protocol, see ``_redis_sub``), which hands the bus every
message of a socket read in one batch; Redis Cluster's sharded pub/sub reads
through redis-py. Either way the reader reconnects with a logged backoff,
resubscribes every filter, and reports the outage so the bus catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .._urls import pop_option, redact_password
from ..exceptions import BackplaneError, ConfigurationError
from ..topics import is_pattern
from ._redis_sub import LeanPubSub
from .base import CONTROL_CHANNEL, Backplane, BackplaneState

__all__ = ["RedisBackplane"]

logger = logging.getLogger("eventcast.backplane")

_BATCH = 1024
#: How many recent payloads a cluster node remembers to drop a publication's twin.
_RECENT = 65_536


def _split_url(url: str) -> tuple[str, str, bool]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    cluster = scheme in ("redis+cluster", "rediss+cluster")
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        raise ConfigurationError(f"not a Redis URL: {redact_password(url)!r}")
    rest, option = pop_option(url, "prefix")
    real_scheme = "rediss" if scheme.startswith("rediss") else "redis"
    return urlunsplit(urlsplit(rest)._replace(scheme=real_scheme)), option or "eventcast", cluster


class RedisBackplane(Backplane):
    """A :class:`Backplane` on Redis pub/sub (or sharded pub/sub on Redis Cluster).

    Args:
        url: ``redis://…`` or ``redis+cluster://…`` with an optional ``prefix``.
        connect_timeout: seconds to reach Redis when opening.
        max_backoff: the longest wait between reconnection attempts.
    """

    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_backoff: float = 5.0) -> None:
        super().__init__()
        self.url, self.prefix, self.cluster = _split_url(url)
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self._client: Any = None
        self._sub_client: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._attempt = 0
        #: Set when a cluster subscription may have opened a shard connection to read.
        self._sources_changed = asyncio.Event()
        #: Cluster mode: the subscriptions awaiting the shard's confirmation, by channel
        #: (or pattern) as the reader gets it.
        self._confirming: dict[bytes, asyncio.Future[None]] = {}
        #: Cluster mode: hashes of payloads received lately, while a pattern filter
        #: may bring a second copy of a publication (see the module docs).
        self._recent: OrderedDict[int, None] = OrderedDict()
        #: How many pattern filters are subscribed.
        self._patterns = 0

    def _channel(self, topic_filter: str) -> str:
        return f"{self.prefix}:{topic_filter}"

    def _pattern_channel(self, topic_filter: str) -> str:
        """Where pattern filters listen: the topic's channel, on a cluster its classic twin."""
        if self.cluster:
            return f"{self.prefix}~p:{topic_filter}"
        return self._channel(topic_filter)

    def _subscription(self, topic_filter: str) -> str:
        """What a filter subscribes to: its channel, or for a pattern its glob (PSUBSCRIBE)."""
        if is_pattern(topic_filter):
            return self._glob(self._pattern_channel(topic_filter))
        return self._channel(topic_filter)

    def _control_channel(self, node: str | None = None) -> str:
        # Outside "prefix:", so no PSUBSCRIBE of a topic pattern ("prefix:*") matches it.
        if node is None:
            return f"{self.prefix}{CONTROL_CHANNEL}"
        return f"{self.prefix}~node:{node}"

    @staticmethod
    def _glob(channel: str) -> str:
        # '*' and '>' become Redis's '*', which also matches dots: broader than
        # the grammar; the bus filters exactly. No other glob character can
        # appear in a valid name (the grammar forbids ? [ ] \).
        return channel.replace(".>", ".*").replace(">", "*")

    def _make_client(self, *, retries: int = 3) -> Any:
        from redis.asyncio import Redis, RedisCluster
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError

        retry = Retry(ExponentialBackoff(cap=self.max_backoff, base=0.05), retries=retries)
        options: dict[str, Any] = {
            "retry": retry,
            "retry_on_error": [RedisConnectionError, TimeoutError],
            "socket_connect_timeout": self.connect_timeout,
            "socket_keepalive": True,
            "health_check_interval": 10,
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        return Redis.from_url(self.url, **options)

    async def open(self) -> None:
        if self.state is BackplaneState.CLOSED:
            raise BackplaneError("the backplane is closed")
        if self._client is not None:
            return
        from redis.exceptions import RedisError

        self._client = self._make_client()
        # The subscriber's connection must not retry silently inside redis-py: a
        # reconnect there would skip the catch-up from the log. Errors reach our
        # reader, which reconnects and reports the outage to the bus.
        self._sub_client = self._client if self.cluster else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.cluster:
                    await self._client.initialize()
                await self._client.ping()
                await self._start_pubsub()
        except (RedisError, OSError, TimeoutError, BackplaneError) as exc:
            pubsub, self._pubsub = self._pubsub, None
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            client, self._client = self._client, None
            sub_client, self._sub_client = self._sub_client, None
            with contextlib.suppress(Exception):
                await client.aclose()
            with contextlib.suppress(Exception):
                if sub_client is not client:
                    await sub_client.aclose()
            raise BackplaneError(f"cannot reach Redis at {self._safe_url()}: {exc}") from exc
        self._set_state(BackplaneState.CONNECTED)
        self._reader = asyncio.get_running_loop().create_task(
            self._read_loop(), name="eventcast-redis-backplane"
        )

    def _safe_url(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}"

    async def _start_pubsub(self) -> None:
        if self.cluster:
            # Sharded pub/sub for exact topics; patterns through a node's classic pub/sub.
            pubsub = self._client.pubsub()
        else:
            # The lean reader: hiredis on a protocol of its own, batches to the bus.
            pubsub = await LeanPubSub.connect(
                self.url, timeout=self.connect_timeout, deliver=self._deliver
            )
        self._pubsub = pubsub
        # The control channel and this node's address: subscribed from the start,
        # they also keep the pub/sub connection open, so the reader always has a
        # connection to watch.
        for channel in (self._control_channel(), self._control_channel(self.node_id)):
            if self.cluster:
                await pubsub.ssubscribe(channel)
            else:
                await pubsub.subscribe(channel)
        for topic_filter in sorted(self.filters):
            await self._subscribe_on(pubsub, topic_filter)
        await self._confirm(pubsub)

    async def _confirm(self, pubsub: Any) -> None:
        """Wait until the subscriptions sent on ``pubsub`` are in effect (a PING's answer).

        In cluster mode the shards' readers take the confirmations (see
        :meth:`_subscribe_confirmed`); nothing is read yet while connecting.
        """
        if not self.cluster:
            await pubsub.barrier(self.connect_timeout)

    async def _subscribe_confirmed(self, pubsub: Any, topic_filter: str) -> None:
        """Cluster mode: subscribe, then wait for the shard's (or node's) confirmation.

        Raises:
            BackplaneError: no confirmation within the connect timeout.
        """
        channel = self._subscription(topic_filter)
        key = channel.encode()
        waiter = asyncio.get_running_loop().create_future()
        self._confirming[key] = waiter
        try:
            await self._subscribe_on(pubsub, topic_filter)
            self._sources_changed.set()  # a new shard connection gets its reader
            async with asyncio.timeout(self.connect_timeout):
                await waiter
        except TimeoutError:
            raise BackplaneError(f"Redis did not confirm the subscription to {channel!r}") from None
        finally:
            if self._confirming.get(key) is waiter:
                del self._confirming[key]

    async def _subscribe_on(self, pubsub: Any, topic_filter: str) -> None:
        channel = self._subscription(topic_filter)
        if is_pattern(topic_filter):
            await pubsub.psubscribe(channel)
        elif self.cluster:
            await pubsub.ssubscribe(channel)
        else:
            await pubsub.subscribe(channel)

    async def _read_loop(self) -> None:
        from redis.exceptions import RedisError

        self._attempt = 0
        while not self.is_closed():
            pubsub = self._pubsub
            try:
                if pubsub is None:
                    raise BackplaneError("no pub/sub connection")
                if self.cluster:
                    await self._drain_cluster(pubsub)
                else:
                    self._attempt = 0
                    await pubsub.watch()  # messages flow to the bus meanwhile
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, BackplaneError) as exc:
                if self.is_closed():
                    return
                if self.state is BackplaneState.CONNECTED:
                    logger.warning("Redis backplane lost its connection: %s", exc)
                    self._set_state(BackplaneState.DISCONNECTED)
                self._attempt += 1
                attempt = self._attempt
                delay = min(self.max_backoff, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                logger.info("Redis backplane reconnecting in %.2fs (attempt %d)", delay, attempt)
                await asyncio.sleep(delay)
                try:
                    await self._reconnect()
                except BackplaneError as failed:
                    # Still down: the next turn of the loop backs off further and
                    # tries again (the reader must never end while not closed).
                    logger.info("Redis backplane reconnection failed: %s", failed)

    async def _drain(self, pubsub: Any) -> None:
        message = await pubsub.get_message(timeout=1.0)
        if message is None:
            if not self.cluster:
                await pubsub.check_health()
            return
        batch = []
        while message is not None:
            kind = message.get("type")
            if kind in ("message", "pmessage", "smessage"):
                batch.append(message["data"])
            elif kind in ("ssubscribe", "psubscribe", "subscribe"):
                waiter = self._confirming.pop(message.get("channel") or b"", None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            if len(batch) >= _BATCH:
                break
            message = await pubsub.get_message(timeout=0)
        if batch and self.cluster:
            batch = self._first_copies(batch)
        if batch:
            self._deliver(batch)

    def _first_copies(self, batch: list[bytes]) -> list[bytes]:
        """Cluster mode: drop the second copy of a publication (sharded and pattern twin)."""
        recent = self._recent
        if not self._patterns:
            recent.clear()
            return batch
        kept = []
        for payload in batch:
            key = hash(payload)
            if key in recent:
                del recent[key]  # the twin: each publication comes at most twice
                continue
            recent[key] = None
            if len(recent) > _RECENT:
                recent.popitem(last=False)
            kept.append(payload)
        return kept

    @staticmethod
    def _cluster_sources(pubsub: Any) -> list[Any]:
        """The connections of a cluster pub/sub: one per shard subscribed, and patterns'."""
        # A shard's pub/sub is listed before its SSUBSCRIBE has made its connection;
        # it is read once it has one (subscribe() wakes the readers up then).
        sources = [p for p in pubsub.node_pubsub_mapping.values() if p.connection is not None]
        if pubsub.connection is not None:  # PSUBSCRIBE went through a node's classic pub/sub
            sources.append(pubsub)
        return sources

    async def _drain_cluster(self, pubsub: Any) -> None:
        """Read every shard's pub/sub connection at once (one reader task each).

        Sharded messages arrive on a connection per shard, never on the
        cluster pub/sub's own connection (``get_message`` there fails), and
        each must be read without waiting on the others. Returns only by
        raising: a connection failed.
        """
        loop = asyncio.get_running_loop()
        readers: dict[int, asyncio.Task[None]] = {}
        changed = self._sources_changed
        try:
            while True:
                changed.clear()
                for source in self._cluster_sources(pubsub):
                    if id(source) not in readers:
                        readers[id(source)] = loop.create_task(
                            self._read_source(source), name="eventcast-redis-shard-reader"
                        )
                waiter = loop.create_task(changed.wait())
                try:
                    done, _ = await asyncio.wait(
                        [waiter, *readers.values()], return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                for task in done:
                    if task is not waiter:
                        task.result()  # a reader ends only by raising
                        raise BackplaneError("a shard reader stopped")
        finally:
            for task in readers.values():
                task.cancel()
            await asyncio.gather(*readers.values(), return_exceptions=True)

    async def _read_source(self, source: Any) -> None:
        while True:
            await self._drain(source)
            self._attempt = 0

    async def _reconnect(self) -> None:
        from redis.exceptions import RedisError

        async with self._lock:
            old = self._pubsub
            self._pubsub = None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.aclose()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._client.ping()
                    await self._start_pubsub()
            except (RedisError, OSError, TimeoutError, BackplaneError) as exc:
                # A pub/sub left half-subscribed must not be read as if it were whole.
                failed, self._pubsub = self._pubsub, None
                if failed is not None:
                    with contextlib.suppress(Exception):
                        await failed.aclose()
                raise BackplaneError(f"Redis still unreachable: {exc}") from exc
            self.reconnects += 1
            logger.info("Redis backplane reconnected; %d filters resubscribed", len(self.filters))
            self._set_state(BackplaneState.CONNECTED)

    async def close(self) -> None:
        if self.state is BackplaneState.CLOSED:
            return
        self.state = BackplaneState.CLOSED
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        sub_client, self._sub_client = self._sub_client, None
        with contextlib.suppress(Exception):
            if pubsub is not None:
                await pubsub.aclose()
        with contextlib.suppress(Exception):
            if client is not None:
                await client.aclose()
        with contextlib.suppress(Exception):
            if sub_client is not None and sub_client is not client:
                await sub_client.aclose()

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        from redis.exceptions import RedisError

        client = self._client
        if client is None or self.state is not BackplaneState.CONNECTED:
            self.failures += len(messages)
            raise BackplaneError("the Redis backplane is not connected")
        try:
            if self.cluster:
                for topic, payload in messages:
                    await client.spublish(self._channel(topic), payload)
                    # The twin for pattern filters (sharded pub/sub has none).
                    await client.publish(self._pattern_channel(topic), payload)
            elif len(messages) == 1:
                topic, payload = messages[0]
                await client.publish(self._channel(topic), payload)
            else:
                async with client.pipeline(transaction=False) as pipe:
                    for topic, payload in messages:
                        pipe.publish(self._channel(topic), payload)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failures += len(messages)
            raise BackplaneError(f"Redis publish failed: {exc}") from exc
        self.sent += len(messages)

    async def publish_control(self, payload: bytes, node: str | None = None) -> None:
        from redis.exceptions import RedisError

        client = self._client
        if client is None or self.state is not BackplaneState.CONNECTED:
            self.failures += 1
            raise BackplaneError("the Redis backplane is not connected")
        channel = self._control_channel(node)
        try:
            if self.cluster:
                await client.spublish(channel, payload)
            else:
                await client.publish(channel, payload)
        except (RedisError, OSError) as exc:
            self.failures += 1
            raise BackplaneError(f"Redis publish failed: {exc}") from exc
        self.sent += 1

    @staticmethod
    def _reraise_cancellation() -> None:
        # redis-py's PubSub (un)subscribe can swallow a cancellation: restore it.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError

    async def subscribe(self, topic_filter: str) -> None:
        from redis.exceptions import RedisError

        if topic_filter in self.filters:
            return
        self.filters.add(topic_filter)
        self._patterns += is_pattern(topic_filter)
        pubsub = self._pubsub
        if pubsub is None or self.state is not BackplaneState.CONNECTED:
            return  # subscribed on (re)connect
        try:
            # Returns once the subscription is in effect: a publication sent
            # after this, from any node, reaches this one.
            if self.cluster:
                await self._subscribe_confirmed(pubsub, topic_filter)
            else:
                await self._subscribe_on(pubsub, topic_filter)
                await self._confirm(pubsub)
        except (RedisError, OSError, BackplaneError) as exc:
            # BackplaneError: the lean subscriber's connection died and the reader
            # has not noticed yet; its reconnect subscribes every wanted filter.
            logger.warning("Redis subscribe to %r deferred to reconnect: %s", topic_filter, exc)
        self._reraise_cancellation()
        self._sources_changed.set()

    async def unsubscribe(self, topic_filter: str) -> None:
        from redis.exceptions import RedisError

        if topic_filter not in self.filters:
            return
        self.filters.discard(topic_filter)
        self._patterns -= is_pattern(topic_filter)
        pubsub = self._pubsub
        if pubsub is None or self.state is not BackplaneState.CONNECTED:
            return
        channel = self._subscription(topic_filter)
        try:
            if is_pattern(topic_filter):
                await pubsub.punsubscribe(channel)
            elif self.cluster:
                await pubsub.sunsubscribe(channel)
            else:
                await pubsub.unsubscribe(channel)
        except (RedisError, OSError, BackplaneError) as exc:
            # The connection is lost: the reconnect subscribes only the filters kept.
            logger.warning("Redis unsubscribe from %r failed: %s", topic_filter, exc)
        self._reraise_cancellation()
