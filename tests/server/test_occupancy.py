"""One contract for every channel occupancy store: memory, Redis and NATS decide alike.

Several store instances over one Redis prefix (one NATS bucket) stand for
several nodes; concurrent changes must make exactly one of them see a channel
become occupied, and exactly one see it vacated. Then the node side,
:class:`~eventcast.server.occupancy.OccupancyKeeper`, with its vacated delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from eventcast.server.occupancy import (
    Change,
    MemoryOccupancy,
    Occupancy,
    OccupancyKeeper,
    occupancy_for,
)
from eventcast.server.occupancy_nats import NATSOccupancy
from eventcast.server.presence_nats import NATSPresence

from .test_presence_backends import ENGINES, Kind, engine


class Stores:
    """Occupancy stores ("nodes") of one kind over one shared engine."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.memory: MemoryOccupancy | None = None

    def node(self) -> Occupancy:
        kind = self.kind
        if kind.name == "memory":
            if self.memory is None:
                self.memory = MemoryOccupancy(clock=lambda: kind.clock[0])
            return self.memory
        presence = kind.node()
        if isinstance(presence, NATSPresence):
            # NATS shares use the nodes' clocks: the test's clock lets time pass at once.
            return NATSOccupancy(presence, clock=lambda: kind.clock[0])
        return occupancy_for(presence)

    async def expire(self, seconds: float) -> None:
        """Let ``seconds`` pass: test clocks jump; Redis (its own TIME) needs real time."""
        self.kind.clock[0] += seconds
        if self.kind.name == "redis":
            await asyncio.sleep(seconds)  # the subject here is time itself: Redis's clock


@pytest.fixture(params=ENGINES)
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    async with engine(request) as kind:
        yield Stores(kind)


async def test_first_share_occupies_and_last_vacates(stores: Stores) -> None:
    one, two = stores.node(), stores.node()
    assert await one.join("room", "n1", 60) is Change.OCCUPIED
    assert await two.join("room", "n2", 60) is Change.NONE
    assert await one.join("room", "n1", 60) is Change.NONE  # a refresh
    assert await one.leave("room", "n1") is False
    assert await two.leave("room", "n2") is True
    assert await two.leave("room", "n2") is False
    assert await one.join("room", "n1", 60) is Change.OCCUPIED  # a new occupancy period
    assert await one.join("other", "n1", 60) is Change.OCCUPIED
    assert await one.sweep() == []


async def test_concurrent_changes_are_decided_once(stores: Stores) -> None:
    nodes = [stores.node() for _ in range(6)]
    for round_ in range(3):
        channel = f"busy.{round_}"
        joined = await asyncio.gather(
            *(node.join(channel, f"n{i}", 60) for i, node in enumerate(nodes))
        )
        assert sorted(c.value for c in joined) == [0, 0, 0, 0, 0, 1]
        left = await asyncio.gather(*(node.leave(channel, f"n{i}") for i, node in enumerate(nodes)))
        assert sorted(left) == [False] * 5 + [True]


async def test_expired_shares_are_swept_by_one_node(stores: Stores) -> None:
    crashed, first, second = stores.node(), stores.node(), stores.node()
    assert await crashed.join("orphan", "crashed", 0.3) is Change.OCCUPIED
    assert await crashed.join("kept", "crashed", 60) is Change.OCCUPIED
    await stores.expire(0.5)
    swept = await asyncio.gather(first.sweep(), second.sweep())
    assert sorted(swept, key=len) == [[], ["orphan"]]
    assert await first.join("kept", "first", 60) is Change.NONE


async def test_a_join_after_an_unswept_expiry_reoccupies(stores: Stores) -> None:
    crashed, survivor = stores.node(), stores.node()
    assert await crashed.join("room", "crashed", 0.3) is Change.OCCUPIED
    await stores.expire(0.5)
    assert await survivor.join("room", "survivor", 60) is Change.REOCCUPIED
    assert await survivor.sweep() == []


class Events:
    """What a keeper emitted, awaited in order."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def emit(self, kind: str, channel: str) -> None:
        self.emitted.append((kind, channel))
        self.changed.set()

    async def until(self, count: int) -> list[tuple[str, str]]:
        async with asyncio.timeout(10):
            while len(self.emitted) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.emitted


def keeper(store: Occupancy, node: str, events: Events) -> OccupancyKeeper:
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.add(task)
        return task

    made = OccupancyKeeper(
        store,
        node=node,
        ttl=60,
        vacated_delay=0.2,
        emit=events.emit,
        spawn=spawn,
    )
    made.start()
    return made


async def test_keepers_of_two_nodes(stores: Stores) -> None:
    events = Events()
    one = keeper(stores.node(), "n1", events)
    two = keeper(stores.node(), "n2", events)
    try:
        one.local("lobby", True)
        two.local("lobby", True)
        assert await events.until(1) == [("channel_occupied", "lobby")]
        one.local("lobby", False)
        # Gone and back within the delay: nothing to tell.
        two.local("lobby", False)
        two.local("lobby", True)
        two.local("lobby", False)
        assert await events.until(2) == [
            ("channel_occupied", "lobby"),
            ("channel_vacated", "lobby"),
        ]
        one.local("hall", True)
        await events.until(3)
    finally:
        await two.aclose()
        await one.aclose()  # a graceful stop gives its shares up at once
    assert events.emitted == [
        ("channel_occupied", "lobby"),
        ("channel_vacated", "lobby"),
        ("channel_occupied", "hall"),
        ("channel_vacated", "hall"),
    ]
