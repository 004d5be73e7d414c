"""A group commit's events fanned out as one lot (``Sequencer.deliver_many``,
``_Ring.extend``), with the same outcome as one event at a time.

SQLite commits the appends made while its writer is busy in one transaction,
and the bus fans the group out at once: a run of one topic's consecutive
events goes to each ring in one step, members woken once. Every overflow
policy must see each event as it would have one by one, so the lot falls
back to per-event appends where a policy acts inside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from eventcast import Bus, Event, Namespace, Overflow, SlowConsumerError, Subscription

from .writergate import WriterGate

NAMESPACES = {"": Namespace(history_size=10_000)}
WAIT = 10.0


async def in_one_group(
    bus: Bus, publishes: Sequence[Callable[[], Awaitable[Event]]]
) -> list[Event]:
    """Run ``publishes`` while the writer is held, so they commit in one group."""
    log = bus.log
    assert log is not None
    gate = WriterGate(log)
    holder = asyncio.ensure_future(bus.publish("held", None))
    try:
        assert await gate.entered()
        commits = log.commits  # type: ignore[attr-defined]
        tasks = [asyncio.ensure_future(publish()) for publish in publishes]
        await asyncio.sleep(0)
    finally:
        gate.release()
    async with asyncio.timeout(WAIT):
        await holder
        events = list(await asyncio.gather(*tasks))
    # the held commit, then every publish in one group
    assert log.commits - commits == 2  # type: ignore[attr-defined]
    return events


async def drain(sub: Subscription) -> list[Event]:
    got: list[Event] = []
    while (batch := sub.get_nowait_batch()) != []:
        got += batch
    return got


async def test_a_group_of_interleaved_topics_reaches_each_subscriber_in_offset_order(
    tmp_path: Path,
) -> None:
    async with Bus(log=f"sqlite:///{tmp_path}/e.db", namespaces=NAMESPACES) as bus:
        topics = ["room.a", "room.b", "room.c"]
        # Known to the sequencer before the group, at offsets 1, 8 and 15: the
        # group's first runs of 7 (2-8, 9-15, 16-22) follow on from one topic
        # to the next (each topic's own epoch keeps them apart here; the last
        # test gives two topics one epoch).
        before = {topic: 1 + 7 * k for k, topic in enumerate(topics)}
        for topic, count in before.items():
            for _ in range(count):
                await bus.publish(topic, -1)
        exact = {topic: bus.subscribe(topic) for topic in topics}
        everything = bus.subscribe("room.*")
        waiting = asyncio.ensure_future(everything.get())  # woken by the group
        await asyncio.sleep(0)
        # Runs of one topic (the lot path) and single events (one by one).
        order = [topics[i // 7 % 3] if i < 210 else topics[i % 3] for i in range(300)]
        published = await in_one_group(
            bus, [partial(bus.publish, t, i) for i, t in enumerate(order)]
        )
        async with asyncio.timeout(WAIT):
            first = await waiting
        for topic, sub in exact.items():
            got = await drain(sub)
            mine = [e for e in published if e.topic == topic]
            first_offset = before[topic] + 1
            assert [e.offset for e in got] == list(range(first_offset, first_offset + len(mine)))
            assert [e.data for e in got] == [e.data for e in sorted(mine, key=_offset)]
        rest = [first, *await drain(everything)]
        assert sorted(e.id for e in rest) == sorted(e.id for e in published)
        for topic in topics:
            offsets = [e.offset for e in rest if e.topic == topic]
            assert offsets == list(range(before[topic] + 1, before[topic] + 101))
        assert bus._sequencer.gaps == 0


def _offset(event: Event) -> int:
    assert event.offset is not None
    return event.offset


POLICIES: list[dict[str, Any]] = [
    {"overflow": Overflow.DROP_OLDEST},
    {"overflow": Overflow.DROP_NEWEST},
    {"overflow": Overflow.DISCONNECT},
    {"overflow": Overflow.CONFLATE, "conflation_key": "k"},
]


async def outcome(
    url: str, policy: dict[str, Any], grouped: bool
) -> tuple[list[tuple[int | None, object]], int, int, bool]:
    """Two bursts of 40 publishes into a subscriber of ``maxsize`` 10 that reads
    nothing between them, committed as two groups or one publish at a time:
    (what it reads, dropped, conflated, whether it was closed as too slow)."""
    async with Bus(log=url, namespaces=NAMESPACES) as bus:
        await bus.publish("t", -1)
        sub = bus.subscribe("t", maxsize=10, **policy)
        reader = bus.subscribe("t")  # a neighbour in the same ring, reading all
        for burst in range(2):
            publishes = [
                partial(bus.publish, "t", i, tags={"k": str(i % 4)})
                for i in range(burst * 40, burst * 40 + 40)
            ]
            if grouped:
                await in_one_group(bus, publishes)
            else:
                for publish in publishes:
                    await publish()
            assert [e.data for e in await drain(reader)] == list(range(burst * 40, burst * 40 + 40))
        slow = False
        try:
            got = [(e.offset, e.data) for e in await drain(sub)]
        except SlowConsumerError:
            got, slow = [], True
        stats = sub.statistics()
        return got, stats.dropped, stats.conflated, slow


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["overflow"].name)
async def test_every_overflow_policy_sees_a_group_as_one_event_at_a_time(
    policy: dict[str, Any], tmp_path: Path
) -> None:
    grouped = await outcome(f"sqlite:///{tmp_path}/g.db", policy, grouped=True)
    single = await outcome(f"sqlite:///{tmp_path}/s.db", policy, grouped=False)
    assert grouped == single
    got, dropped, conflated, slow = grouped
    if policy["overflow"] is Overflow.DROP_OLDEST:
        assert [data for _, data in got] == list(range(70, 80))
        assert dropped == 70
    elif policy["overflow"] is Overflow.DROP_NEWEST:
        assert [data for _, data in got] == list(range(10))
        assert dropped == 70
    elif policy["overflow"] is Overflow.DISCONNECT:
        assert slow
    else:  # the newest of each of the 4 keys
        assert [data for _, data in got] == [76, 77, 78, 79]
        assert conflated == 76


async def test_a_ring_keeps_few_events_once_its_members_read_the_groups(tmp_path: Path) -> None:
    async with Bus(log=f"sqlite:///{tmp_path}/e.db", namespaces=NAMESPACES, maxsize=65_536) as bus:
        await bus.publish("t", -1)
        sub = bus.subscribe("t")
        read = 0
        for _burst in range(5):
            await in_one_group(bus, [partial(bus.publish, "t", i) for i in range(500)])
            read += len(await drain(sub))
        await in_one_group(bus, [partial(bus.publish, "t", "last")])
        read += len(await drain(sub))
        assert read == 2_501
        ring = sub._ring
        assert ring is not None
        # Read lots are let go at the next trim: at most the last lot and the
        # one before it (the trim interval doubles while a lot is unread).
        assert len(ring.events) <= 1_000


async def test_a_run_never_spans_two_topics_even_at_following_offsets_and_one_epoch() -> None:
    # Real logs give each topic its own epoch; a store with one epoch for all
    # (or two epochs that happen to match) must still not merge the runs.
    async with Bus() as bus:
        x, y = bus.subscribe("x"), bus.subscribe("y")
        sequencer = bus._sequencer
        sequencer.seed("x", 0, "e")
        sequencer.seed("y", 3, "e")
        events = [Event(topic="x", data=i, offset=i, epoch="e") for i in (1, 2, 3)]
        events += [Event(topic="y", data=i, offset=i, epoch="e") for i in (4, 5, 6)]
        sequencer.deliver_many(events)
        assert [e.data for e in await drain(x)] == [1, 2, 3]
        assert [e.data for e in await drain(y)] == [4, 5, 6]
        assert sequencer.gaps == 0
