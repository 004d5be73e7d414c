"""publish_nowait's fast path: a topic checked once goes straight to its rings.

Each test first publishes on a topic (so the fast path knows it), then changes
what the checks depend on, and shows the next publish sees the change.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from eventcast import (
    Bus,
    BusClosedError,
    Event,
    InvalidDataError,
    InvalidTopicError,
    Namespace,
    Overflow,
    _caches,
)
from eventcast.log.sqlite import SQLiteLog

from .writergate import WriterGate


async def test_a_subscriber_added_after_the_first_publish_receives_the_next() -> None:
    async with Bus() as bus:
        first = bus.subscribe("room.1")
        bus.publish_nowait("room.1", 1)
        exact = bus.subscribe("room.1")
        pattern = bus.subscribe("room.*")
        bus.publish_nowait("room.1", 2)
        assert [e.data for e in await first.get_batch()] == [1, 2]
        assert [e.data for e in await exact.get_batch()] == [2]
        assert [e.data for e in await pattern.get_batch()] == [2]


async def test_an_unsubscribed_subscriber_gets_nothing_more() -> None:
    async with Bus() as bus:
        stays = bus.subscribe("room.1")
        leaves = bus.subscribe("room.*")
        bus.publish_nowait("room.1", 1)
        await leaves.aclose()
        bus.publish_nowait("room.1", 2)
        assert [e.data for e in await stays.get_batch()] == [1, 2]
        assert bus.statistics()["dropped"] == 0
        assert leaves.statistics().delivered == 0  # it was closed unread


async def test_a_closed_bus_refuses_a_topic_the_fast_path_knew() -> None:
    bus = Bus()
    bus.subscribe("room.1")
    bus.publish_nowait("room.1", 1)
    await bus.close()
    with pytest.raises(BusClosedError):
        bus.publish_nowait("room.1", 2)


async def test_a_subscriber_closed_by_its_own_overflow_leaves_the_route() -> None:
    async with Bus() as bus:
        slow = bus.subscribe("room.1", maxsize=2, overflow=Overflow.DISCONNECT)
        other = bus.subscribe("room.1", maxsize=100)
        for i in range(5):
            bus.publish_nowait("room.1", i)
        assert slow.closed
        assert [e.data for e in await other.get_batch()] == [0, 1, 2, 3, 4]


async def test_typed_topics_are_checked_on_every_publish() -> None:
    spec = {"type": "integer"}
    async with Bus(namespaces={"orders": Namespace(schema=spec)}) as bus:
        bus.publish_nowait("orders:eu", 1)
        bus.publish_nowait("orders:eu", 2)
        with pytest.raises(InvalidDataError):
            bus.publish_nowait("orders:eu", "three")


async def test_topic_statistics_count_every_publish() -> None:
    async with Bus(count_topics=True) as bus:
        for i in range(3):
            bus.publish_nowait("room.1", i)
        assert bus.topic_stats["room.1"][0] == 3
        assert bus.topic_stats["room.1"][2] > 0  # the last event's time


async def test_a_topic_whose_counters_were_dropped_is_counted_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fast path counts into the counters its route holds: when the table
    # drops them to make room, the route goes too, and the next publish makes
    # new ones (as for a topic never seen).
    monkeypatch.setattr(_caches, "TOPIC_SPARE", 2)
    async with Bus(count_topics=True) as bus:
        bus.publish_nowait("a", 1)
        bus.publish_nowait("a", 2)
        bus.publish_nowait("b", 1)
        bus.publish_nowait("c", 1)  # "a" is dropped
        assert list(bus.topic_stats) == ["b", "c"]
        bus.publish_nowait("a", 3)
        bus.publish_nowait("a", 4)
        assert list(bus.topic_stats) == ["c", "a"]
        assert bus.topic_stats["a"][0] == 2
        assert bus.topic_stats["c"][0] == 1


async def test_tags_and_bad_names_take_the_checked_path() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("room.1")
        bus.publish_nowait("room.1", 1)
        tagged = bus.publish_nowait("room.1", 2, tags={"k": "v"})
        assert dict(tagged.tags) == {"k": "v"}
        with pytest.raises(InvalidTopicError):
            bus.publish_nowait("room..1", 3)
        assert [dict(e.tags) for e in await sub.get_batch()] == [{}, {"k": "v"}]


def test_the_fast_path_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_caches, "TOPIC_SPARE", 8)
    bus = Bus()
    for i in range(20):
        bus.publish_nowait(f"t.{i}", i)
    assert 0 < len(bus._live_routes) <= 8
    assert 0 < len(bus._router._routes) <= 8


@pytest.mark.parametrize("count_topics", [False, True])
def test_the_fast_path_cache_grows_with_the_topics_subscribed(
    monkeypatch: pytest.MonkeyPatch, count_topics: bool
) -> None:
    # A fixed bound below the topics in use would empty the cache over and over
    # (and, counting topics as the hub does, drop counters and routes in turn).
    monkeypatch.setattr(_caches, "TOPIC_SPARE", 8)
    bus = Bus(count_topics=count_topics)
    subs = [bus.subscribe(f"t.{i}") for i in range(50)]
    for _ in range(3):
        for i in range(50):
            bus.publish_nowait(f"t.{i}", i)
    assert len(bus._live_routes) == 50
    assert all(s.get_nowait() is not None for s in subs)
    if count_topics:
        assert len(bus.topic_stats) == 50
        assert all(bus.topic_stats[f"t.{i}"][0] == 3 for i in range(50))


def test_a_new_channel_leaves_the_other_topics_routes_cached() -> None:
    bus = Bus()
    a = bus.subscribe("room.a")
    bus.publish_nowait("room.a", 1)
    bus.publish_nowait("room.b", 1)  # nobody subscribed: its (empty) route is cached too
    assert set(bus._live_routes) == {"room.a", "room.b"}
    b = bus.subscribe("room.b")
    assert set(bus._live_routes) == {"room.a"}  # only room.b's route changed
    bus.publish_nowait("room.b", 2)
    assert [e.data for e in b.get_nowait_batch()] == [2]
    a.close()
    assert set(bus._live_routes) == {"room.b"}
    bus.publish_nowait("room.a", 3)  # nobody left on room.a: routed nowhere
    assert bus._live_routes["room.a"][0] == ()
    bus.subscribe("room.*")  # a pattern may match any topic: every route is forgotten
    assert bus._live_routes == {}


# -- a durable publish's fast path: a durable, untyped topic checked once --------------

DURABLE = {
    "d": Namespace(history_size=10),
    "typed": Namespace(history_size=10, schema={"type": "integer"}),
}


async def test_a_durable_topic_known_to_the_fast_path_still_commits_in_order() -> None:
    async with Bus(namespaces=DURABLE) as bus:
        sub = bus.subscribe("d:a")
        published = [await bus.publish("d:a", i) for i in range(3)]
        assert "d:a" in bus._durable_topics
        assert [e.offset for e in published] == [1, 2, 3]
        assert [(e.offset, e.data) for e in await sub.get_batch()] == [(1, 0), (2, 1), (3, 2)]
        assert [e.offset for e in (await bus.history("d:a")).events] == [1, 2, 3]


async def test_a_closed_bus_refuses_a_durable_topic_the_fast_path_knew() -> None:
    bus = Bus(namespaces=DURABLE)
    await bus.publish("d:a", 1)
    await bus.close()
    with pytest.raises(BusClosedError):
        await bus.publish("d:a", 2)


async def test_typed_durable_topics_are_checked_on_every_publish() -> None:
    async with Bus(namespaces=DURABLE) as bus:
        await bus.publish("typed:a", 1)
        await bus.publish("typed:a", 2)
        assert "typed:a" not in bus._durable_topics
        with pytest.raises(InvalidDataError):
            await bus.publish("typed:a", "three")


async def test_a_blocking_subscriber_makes_a_known_durable_topic_wait_for_room() -> None:
    async with Bus(namespaces=DURABLE) as bus:
        await bus.publish("d:a", 0)
        slow = bus.subscribe("d:a", maxsize=1, overflow=Overflow.BLOCK, block_timeout=5)
        await bus.publish("d:a", 1)  # fills it
        waiting = asyncio.ensure_future(bus.publish("d:a", 2))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the fast path did not skip the wait
        assert (await slow.get()).data == 1
        assert (await waiting).offset == 3
        assert (await slow.get()).data == 2


async def test_keys_tags_and_acks_on_a_known_durable_topic_take_the_checked_path() -> None:
    async with Bus(namespaces=DURABLE) as bus:
        handled: list[int] = []

        async def handler(event: Event) -> None:
            handled.append(event.data)

        bus.on("d:a", handler)
        await bus.publish("d:a", 1)
        tagged = await bus.publish("d:a", 2, tags={"k": "v"})
        keyed = await bus.publish("d:a", 3, idempotency_key="k")
        again = await bus.publish("d:a", 4, idempotency_key="k")
        acked = await bus.publish("d:a", 5, ack=True)
        assert dict(tagged.tags) == {"k": "v"}
        assert again.id == keyed.id  # stored once
        assert handled[-1] == 5
        assert acked.offset == 4  # the repeat took no offset
        assert [e.data for e in (await bus.history("d:a")).events] == [1, 2, 3, 5]


async def test_publish_known_leaves_a_known_durable_topic_to_publish() -> None:
    async with Bus(namespaces=DURABLE) as bus:
        sub = bus.subscribe("d:a")
        assert bus.publish_known("d:a", 0) is None  # durable: nothing published
        await bus.publish("d:a", 1)
        assert bus.publish_known("d:a", 2) is None  # still nothing, without routing
        assert (await bus.publish("d:a", 3)).offset == 2
        assert [e.data for e in await sub.get_batch()] == [1, 3]


# -- a durable publish fanned out by its commit group (SQLite groups one turn's appends) --


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/events.db"


async def test_a_burst_of_durable_publishes_is_fanned_out_in_offset_order(
    sqlite_url: str,
) -> None:
    async with Bus(log=sqlite_url, namespaces=DURABLE) as bus:
        sub = bus.subscribe("d:>", maxsize=1_000)
        await bus.publish("d:a", 0)  # known to the fast path from now on
        log = bus.log
        assert isinstance(log, SQLiteLog)
        observed = bus.append_latency.count
        # Plain publishes (the fast path, fanned out by their group), ones with
        # an idempotency key (committed without the callback, fanned out by
        # their publishers: other groups) and another topic, all made in one
        # turn of the loop.
        published = await asyncio.gather(
            *(
                bus.publish("d:a", i, idempotency_key=f"k{i}")
                if i % 7 == 0
                else bus.publish("d:a", i)
                for i in range(1, 200)
            ),
            *(bus.publish("d:b", i) for i in range(50)),
        )
        got: list[Event] = []
        async with asyncio.timeout(10):
            while len(got) < 1 + len(published):
                got.extend(await sub.get_batch())
        a = [e.offset for e in got if e.topic == "d:a"]
        assert a == list(range(1, 200 + 1))
        assert [e.offset for e in got if e.topic == "d:b"] == list(range(1, 51))
        assert {e.id for e in got} >= {e.id for e in published}
        assert bus._sequencer.gaps == 0  # nothing arrived out of order, nothing was re-read
        assert bus.append_latency.count == observed + len(published)


async def test_a_cancelled_durable_publish_that_was_committed_is_still_fanned_out(
    sqlite_url: str,
) -> None:
    async with Bus(log=sqlite_url, namespaces=DURABLE) as bus:
        sub = bus.subscribe("d:a")
        await bus.publish("d:a", 0)
        log = bus.log
        assert log is not None
        gate = WriterGate(log)
        publishing = asyncio.ensure_future(bus.publish("d:a", 1))
        try:
            assert await gate.entered()
            publishing.cancel()
        finally:
            gate.release()
        with pytest.raises(asyncio.CancelledError):
            await publishing
        async with asyncio.timeout(10):
            got = [await sub.get(), await sub.get()]
        assert [(e.offset, e.data) for e in got] == [(1, 0), (2, 1)]
        assert bus._sequencer.gaps == 0


async def test_durable_publishes_fanned_out_by_their_group_are_counted(sqlite_url: str) -> None:
    async with Bus(log=sqlite_url, namespaces=DURABLE, count_topics=True) as bus:
        sub = bus.subscribe("d:a", maxsize=100)
        published = [await bus.publish("d:a", 0)]
        published += await asyncio.gather(*(bus.publish("d:a", i) for i in range(1, 30)))
        assert bus.statistics()["published"] == 30
        events, offset, _ = bus.topic_stats["d:a"]
        assert (events, offset) == (30, 30)
        assert [e.offset for e in await sub.get_batch()] == list(range(1, 31))
