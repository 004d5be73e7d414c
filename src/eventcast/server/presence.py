"""Presence: who is subscribed to a channel, behind a small abstraction.

Each entry is one client in one channel: its client id, user id and
connection info. Entries carry a TTL and each node refreshes its own, so the
entries of a node that crashed expire on their own. ``MemoryPresence`` keeps
them in process; the scale-out backends keep them in Redis or NATS so every
node sees the same presence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

import msgspec

from ..exceptions import EventcastError
from ..protocol.frames import NO_DATA, ClientInfo, PresenceResult, PresenceStatsResult, raw

__all__ = [
    "DEFAULT_PRESENCE_TTL",
    "MemoryPresence",
    "Presence",
    "PresenceInfo",
    "PresenceKeeper",
    "client_info",
]

logger = logging.getLogger("eventcast.server")
_encode = msgspec.json.Encoder().encode

#: Seconds a presence entry lives unless refreshed.
DEFAULT_PRESENCE_TTL: Final = 60.0

#: One client's entry: ``{"client", "user", "conn_info"?, "chan_info"?}``.
PresenceInfo = Mapping[str, Any]


class Presence(ABC):
    """Where presence entries live. Every method raises only ``EventcastError``."""

    @abstractmethod
    async def add(self, channel: str, client: str, info: PresenceInfo, ttl: float) -> None:
        """Add or refresh one client's entry in a channel for ``ttl`` seconds."""

    @abstractmethod
    async def remove(self, channel: str, client: str) -> None:
        """Remove one client's entry from a channel."""

    @abstractmethod
    async def get(self, channel: str) -> dict[str, PresenceInfo]:
        """Return the live entries of a channel, by client id."""

    async def stats(self, channel: str) -> tuple[int, int]:
        """Return ``(number of clients, number of unique users)`` in a channel."""
        entries = await self.get(channel)
        return len(entries), len({info.get("user", "") for info in entries.values()})

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release here
        """Release resources. Idempotent."""


class MemoryPresence(Presence):
    """Presence in process, with TTL expiry (for one node, and for tests).

    Args:
        clock: the wall clock, injectable for tests.
        max_entries: bound on the entries kept; past it the oldest expire first.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_entries: int = 1_000_000
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._channels: dict[str, dict[str, tuple[PresenceInfo, float]]] = {}
        self._count = 0

    async def add(self, channel: str, client: str, info: PresenceInfo, ttl: float) -> None:
        entries = self._channels.get(channel)
        if entries is None or client not in entries:
            if self._count >= self._max_entries:
                self._sweep(force=True)
            self._count += 1
        # Looked up after the sweep, which drops channels it leaves empty.
        self._channels.setdefault(channel, {})[client] = (dict(info), self._clock() + ttl)

    async def remove(self, channel: str, client: str) -> None:
        entries = self._channels.get(channel)
        if entries is not None and entries.pop(client, None) is not None:
            self._count -= 1
            if not entries:
                del self._channels[channel]

    async def get(self, channel: str) -> dict[str, PresenceInfo]:
        entries = self._channels.get(channel)
        if not entries:
            return {}
        now = self._clock()
        expired = [client for client, (_, deadline) in entries.items() if deadline <= now]
        for client in expired:
            del entries[client]
            self._count -= 1
        if not entries:
            del self._channels[channel]
            return {}
        return {client: info for client, (info, _) in entries.items()}

    def _sweep(self, *, force: bool = False) -> None:
        now = self._clock()
        for channel in list(self._channels):
            entries = self._channels[channel]
            for client in [c for c, (_, d) in entries.items() if d <= now]:
                del entries[client]
                self._count -= 1
            if not entries:
                del self._channels[channel]
        if force and self._count >= self._max_entries:
            oldest = min(
                ((d, ch, c) for ch, e in self._channels.items() for c, (_, d) in e.items()),
                default=None,
            )
            if oldest is not None:
                _, channel, client = oldest
                del self._channels[channel][client]
                self._count -= 1


def open_presence(url: str, *, prefix: str) -> Presence:
    """Build the :class:`Presence` a URL names; Redis and NATS connect on first use.

    * ``memory://``: :class:`MemoryPresence` (this node only);
    * ``redis://`` / ``rediss://``: ``RedisPresence``, hashes under ``{prefix}:presence:``
      (``redis+cluster://``: the same on Redis Cluster);
    * ``nats://`` / ``tls://``: ``NATSPresence``, the JetStream bucket ``{prefix}_presence``.

    Raises:
        ConfigurationError: the scheme is unknown, the URL or prefix is invalid,
            or the client library of the backend is not installed.
    """
    from ..exceptions import ConfigurationError
    from ._kv import require_driver

    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not a presence URL: {url!r} (expected e.g. redis://host:6379)")
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryPresence()
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        require_driver("redis", "Redis presence", "redis")
        from .presence_redis import RedisPresence

        return RedisPresence(url, prefix=prefix)
    if scheme in ("nats", "tls"):
        require_driver("nats", "NATS presence", "nats")
        from .presence_nats import NATSPresence

        return NATSPresence(url, prefix=prefix)
    raise ConfigurationError(
        f"unknown presence URL scheme {scheme!r}; expected memory://, redis:// or nats://"
    )


class PresenceKeeper:
    """Keeps this node's presence entries in the store: added, refreshed, removed.

    Each entry lives ``ttl`` seconds; the keeper refreshes this node's entries
    every ``ttl / 3`` so those of a node that crashed expire on their own.

    Args:
        store: returns the presence store (read on each call, so it can be swapped).
        ttl: how long an entry lives unless refreshed, in seconds.
    """

    def __init__(self, store: Callable[[], Presence], ttl: float) -> None:
        self._store = store
        self.ttl = ttl

    async def add(self, channel: str, conn: Client) -> None:
        """Add (or refresh) a client's entry in a channel.

        Raises:
            EventcastError: the store failed.
        """
        membership = conn.channels.get(channel)
        chan_info = None if membership is None else membership.info
        await self._store().add(channel, conn.id, client_info(conn, chan_info), self.ttl)

    async def remove(self, channel: str, client: str) -> None:
        """Remove a client's entry from a channel (logged, not raised, on failure)."""
        try:
            await self._store().remove(channel, client)
        except EventcastError as exc:
            logger.warning("presence removal failed: %s", exc)

    async def refresh(self, members: Callable[[], Iterable[tuple[str, Client]]]) -> None:
        """Refresh every entry ``members()`` lists, every ``ttl / 3`` seconds, forever."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            for channel, conn in list(members()):
                try:
                    await self.add(channel, conn)
                except EventcastError as exc:
                    logger.warning("presence refresh failed: %s", exc)

    async def entries(self, channel: str) -> PresenceResult:
        """The clients in a channel, as the protocol and the API return them."""
        entries = await self._store().get(channel)
        return PresenceResult(
            presence={
                client: ClientInfo(
                    user=str(info.get("user", "")),
                    client=str(info.get("client", client)),
                    conn_info=raw(_encode(info["conn_info"])) if "conn_info" in info else NO_DATA,
                    chan_info=raw(_encode(info["chan_info"])) if "chan_info" in info else NO_DATA,
                )
                for client, info in entries.items()
            }
        )

    async def stats(self, channel: str) -> PresenceStatsResult:
        """How many clients and unique users are in a channel."""
        clients, users = await self._store().stats(channel)
        return PresenceStatsResult(num_clients=clients, num_users=users)


class Subscribed(Protocol):
    """What presence knows of a client's subscription (a ``Membership``)."""

    #: Channel info of the subscriber (from a subscribe hook), encoded once.
    info: bytes | None


class Client(Protocol):
    """What presence knows of a client (a :class:`~eventcast.server.connection.Connection`)."""

    id: str
    user: str
    #: Connection info from the token or the connect hook, encoded once (``None`` when absent).
    info: bytes | None

    @property
    def channels(self) -> Mapping[str, Subscribed]:
        """The client's subscriptions, by channel."""
        ...


def client_info(conn: Client, chan_info: bytes | None = None) -> dict[str, Any]:
    """A client's presence entry and join/leave info: client, user, connection and channel info."""
    info: dict[str, Any] = {"client": conn.id, "user": conn.user}
    if conn.info is not None:
        info["conn_info"] = msgspec.json.decode(conn.info)
    if chan_info is not None:
        info["chan_info"] = msgspec.json.decode(chan_info)
    return info
