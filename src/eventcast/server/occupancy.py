"""Which channels are occupied anywhere in the cluster (``channel_occupied``/``_vacated``).

A channel is *occupied* from its first subscriber on any node until its last
one, on every node, is gone. Each node keeps a **share** of a channel in a
store all nodes see while it has members there: the store answers, atomically,
whether adding a share made the channel occupied, and whether removing one
left it vacated, so exactly one node sends each event per occupancy period.

* :class:`MemoryOccupancy`: in process, for one node;
* ``RedisOccupancy`` (:mod:`~eventcast.server.occupancy_redis`): one Lua script
  per change over a per-channel hash of node -> expiry and an index;
* ``NATSOccupancy`` (:mod:`~eventcast.server.occupancy_nats`): a JetStream KV
  entry per channel, changed by compare-and-set on its revision.

Shares carry an expiry that their node refreshes (every ``ttl / 3``), so the
share of a node that crashed expires; every node sweeps channels whose shares
all expired and the one whose sweep removes the channel sends
``channel_vacated``. A node that joins a channel whose previous occupancy
ended by expiry and was not swept yet sends ``channel_vacated`` for it first,
then ``channel_occupied``.

:class:`OccupancyKeeper` is this node's side: it learns from the hub's
channels when a channel gets its first local member or loses its last one,
waits ``vacated_delay`` seconds before giving up a share (a member that comes
back meanwhile keeps it), and applies the changes to the store from one
supervised task, in order, coalesced per channel (so its work is bounded by
the number of channels, whatever the churn).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import EventcastError
from ..handlers import backoff_delay

if TYPE_CHECKING:
    from .presence import Presence

__all__ = [
    "Change",
    "MemoryOccupancy",
    "Occupancy",
    "OccupancyKeeper",
    "occupancy_for",
]

logger = logging.getLogger("eventcast.server")

#: Channels looked at by one sweep for expired shares.
SWEEP_LIMIT: Final = 1000
#: Seconds :meth:`OccupancyKeeper.aclose` may spend giving up this node's shares.
CLOSE_TIMEOUT: Final = 5.0


class Change(enum.Enum):
    """What a share's change did to its channel."""

    #: Nothing the cluster would notice.
    NONE = 0
    #: The channel became occupied.
    OCCUPIED = 1
    #: The channel's previous occupancy had ended by expiry (a crashed node):
    #: it was vacated, then occupied again.
    REOCCUPIED = 2


class Occupancy(ABC):
    """The store of the nodes' shares of channels. Every method raises only ``EventcastError``."""

    @abstractmethod
    async def join(self, channel: str, node: str, ttl: float) -> Change:
        """Add or refresh ``node``'s share of ``channel`` for ``ttl`` seconds."""

    @abstractmethod
    async def leave(self, channel: str, node: str) -> bool:
        """Remove ``node``'s share; return whether that left the channel vacated."""

    @abstractmethod
    async def sweep(self, limit: int = SWEEP_LIMIT) -> list[str]:
        """Vacate channels whose every share expired; return those this call vacated."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release here
        """Release resources. Idempotent."""


class MemoryOccupancy(Occupancy):
    """Shares in process (one node, and tests).

    Args:
        clock: a monotonic clock, injectable for tests.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: Occupied channels: node -> when its share expires.
        self._channels: dict[str, dict[str, float]] = {}

    def _live(self, shares: dict[str, float]) -> dict[str, float]:
        now = self._clock()
        return {node: expiry for node, expiry in shares.items() if expiry > now}

    async def join(self, channel: str, node: str, ttl: float) -> Change:
        shares = self._channels.get(channel)
        if shares is None:
            self._channels[channel] = {node: self._clock() + ttl}
            return Change.OCCUPIED
        live = self._live(shares)
        change = Change.NONE if live else Change.REOCCUPIED
        live[node] = self._clock() + ttl
        self._channels[channel] = live
        return change

    async def leave(self, channel: str, node: str) -> bool:
        shares = self._channels.get(channel)
        if shares is None:
            return False
        shares.pop(node, None)
        if self._live(shares):
            return False
        del self._channels[channel]
        return True

    async def sweep(self, limit: int = SWEEP_LIMIT) -> list[str]:
        vacated = [name for name, shares in self._channels.items() if not self._live(shares)]
        vacated = vacated[:limit]
        for name in vacated:
            del self._channels[name]
        return vacated


def occupancy_for(presence: Presence, *, prefix: str = "eventcast") -> Occupancy:
    """The occupancy store beside a presence store: the same engine, shared by the same nodes."""
    from .presence import MemoryPresence

    if isinstance(presence, MemoryPresence):
        return MemoryOccupancy()
    from .presence_nats import NATSPresence
    from .presence_redis import RedisPresence

    if isinstance(presence, RedisPresence):
        from .occupancy_redis import RedisOccupancy

        return RedisOccupancy(presence)
    if isinstance(presence, NATSPresence):
        from .occupancy_nats import NATSOccupancy

        return NATSOccupancy(presence)
    return MemoryOccupancy()


#: Emits one event: ``(kind, channel)`` with kind ``channel_occupied`` or ``channel_vacated``.
Emit = Callable[[str, str], None]
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class OccupancyKeeper:
    """This node's shares: applied in order from one task, refreshed, swept (see the module).

    Args:
        store: the shared store.
        node: this node's name (unique in the cluster).
        ttl: how long a share lives unless refreshed, in seconds.
        vacated_delay: seconds a channel must stay empty here before this
            node gives up its share.
        emit: called with each event this node must send, in order.
        spawn: runs a supervised background task.
    """

    def __init__(
        self,
        store: Occupancy,
        *,
        node: str,
        ttl: float,
        vacated_delay: float,
        emit: Emit,
        spawn: Spawn,
    ) -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self.vacated_delay = vacated_delay
        self._emit = emit
        self._spawn = spawn
        #: Channels with local members (or within their vacated delay).
        self._wanted: set[str] = set()
        #: Channels whose share is in the store.
        self._held: set[str] = set()
        self._dirty: dict[str, None] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[Any] | None = None
        self._closed = False

    def start(self) -> None:
        """Start applying changes (in the running loop). Idempotent."""
        if self._task is None and not self._closed:
            self._wake = asyncio.Event()
            if self._dirty:
                self._wake.set()
            self._task = self._spawn(self._run(), "eventcast-occupancy")

    def local(self, channel: str, occupied: bool) -> None:
        """A channel got its first member on this node, or lost its last one."""
        if self._closed:
            return
        timer = self._timers.pop(channel, None)
        if timer is not None:
            timer.cancel()
        if occupied:
            self._want(channel, True)
        elif self.vacated_delay > 0:
            loop = asyncio.get_running_loop()
            self._timers[channel] = loop.call_later(self.vacated_delay, self._delay_passed, channel)
        else:
            self._want(channel, False)

    def _delay_passed(self, channel: str) -> None:
        self._timers.pop(channel, None)
        self._want(channel, False)

    def _want(self, channel: str, wanted: bool) -> None:
        if wanted:
            self._wanted.add(channel)
        else:
            self._wanted.discard(channel)
        self._dirty[channel] = None
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.ttl / 3
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_refresh):
                    await wake.wait()
            wake.clear()
            try:
                await self._apply()
                if loop.time() >= next_refresh:
                    await self._refresh()
                    next_refresh = loop.time() + self.ttl / 3
                failures = 0
            except EventcastError as exc:
                # The store is down: try again with backoff; shares live on for their TTL.
                logger.warning("channel occupancy could not be updated: %s", exc)
                wake.set()
                await asyncio.sleep(backoff_delay(failures, 0.5, self.ttl / 3))
                failures += 1

    async def _apply(self) -> None:
        """Bring the store to what this node wants, channel by channel, in order."""
        while self._dirty:
            channel = next(iter(self._dirty))
            if channel in self._wanted and channel not in self._held:
                self._changed(channel, await self.store.join(channel, self.node, self.ttl))
                self._held.add(channel)
            elif channel not in self._wanted and channel in self._held:
                vacated = await self.store.leave(channel, self.node)
                self._held.discard(channel)
                if vacated:
                    self._emit("channel_vacated", channel)
            del self._dirty[channel]

    async def _refresh(self) -> None:
        """Extend this node's shares; vacate channels whose shares all expired."""
        for channel in sorted(self._held):
            if channel in self._held and channel not in self._dirty:
                self._changed(channel, await self.store.join(channel, self.node, self.ttl))
        for channel in await self.store.sweep():
            self._emit("channel_vacated", channel)

    def _changed(self, channel: str, change: Change) -> None:
        if change is Change.REOCCUPIED:
            self._emit("channel_vacated", channel)
        if change is not Change.NONE:
            self._emit("channel_occupied", channel)

    async def aclose(self) -> None:
        """Give up this node's shares now (a graceful stop), bounded in time. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        self._wanted.clear()
        for channel in self._held:
            self._dirty[channel] = None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._apply()
        except (TimeoutError, EventcastError) as exc:
            logger.warning("could not give up this node's channel occupancy: %r", exc)
        finally:
            await self.store.close()
