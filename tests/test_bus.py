"""The asyncio event bus: subscribing, publishing, overflow, dead letters, handlers, acks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from eventcast import (
    AckTimeoutError,
    Bus,
    BusClosedError,
    ConfigurationError,
    DeadLetter,
    DeliveryError,
    EncodeError,
    Event,
    EventcastError,
    InvalidTopicError,
    LogError,
    Overflow,
    PositionError,
    SlowConsumerError,
    SubscriberExistsError,
    SubscriberNotFoundError,
    Subscription,
    SubscriptionClosedError,
    SubscriptionStatistics,
)

SAFETY = 5.0  # a safety net only: every wait below ends on an event long before


async def until(condition: Callable[[], object], *, steps: int = 1000) -> None:
    """Let other tasks run until ``condition()`` holds (no wall-clock waiting)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def drain(sub: Subscription) -> list[Event]:
    out: list[Event] = []
    while (event := sub.get_nowait()) is not None:
        out.append(event)
    return out


def datas(events: list[Event]) -> list[object]:
    return [e.data for e in events]


def drop_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "eventcast.bus"
        and r.levelno == logging.WARNING
        and "is dropping events" in r.getMessage()
    ]


class Recorder:
    """An error_handler / on_drop callback that records its calls and can be awaited."""

    def __init__(self, expected: int = 1) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.expected = expected
        self.done = asyncio.Event()

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)
        if len(self.calls) >= self.expected:
            self.done.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.done.wait(), SAFETY)


# -- subscribing ----------------------------------------------------------------


async def test_subscribe_publish_get() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(["orders", "notifications"], id="client1", maxsize=10)
        assert sub.id == "client1"
        assert sub.topics == ("orders", "notifications")
        published = await bus.publish("orders", {"n": 1})
        assert isinstance(published, Event)
        got = await asyncio.wait_for(sub.get(), SAFETY)
        assert got is published
        assert got.topic == "orders"
        assert got.data == {"n": 1}
        assert isinstance(got.time, float)
        assert len(got.id) == 32
        assert bus.get_subscriber("client1") is sub
        assert bus.subscribers() == [sub]


async def test_iterator_ends_cleanly_on_unsubscribe() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("orders", id="client1")
        received: list[object] = []
        three = asyncio.Event()

        async def consume() -> str:
            async for event in sub:
                received.append(event.data)
                if len(received) == 3:
                    three.set()
            return "ended"

        task = asyncio.create_task(consume())
        for i in range(3):
            await bus.publish("orders", i)
        await asyncio.wait_for(three.wait(), SAFETY)
        await bus.unsubscribe("client1")
        assert await asyncio.wait_for(task, SAFETY) == "ended"
        assert received == [0, 1, 2]
        assert sub.closed
        assert bus.subscribers() == []


async def test_waiting_get_raises_when_unsubscribed() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("orders", id="c")
        waiting = asyncio.create_task(sub.get())
        await until(lambda: sub._waiter is not None)
        await bus.unsubscribe("c")
        with pytest.raises(SubscriptionClosedError):
            await asyncio.wait_for(waiting, SAFETY)


async def test_get_raises_once_closed() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("orders")
        bus.publish_nowait("orders", 1)
        sub.close()
        sub.close()  # idempotent
        assert sub.closed
        with pytest.raises(SubscriptionClosedError, match="closed"):
            await sub.get()
        with pytest.raises(SubscriptionClosedError):
            await sub.get_batch()
        with pytest.raises(SubscriptionClosedError):
            sub.get_nowait()
        assert [e async for e in sub] == []
        # Publishing after the subscriber left reaches nobody and raises nothing.
        await bus.publish("orders", 2)
        assert sub.statistics().closed


async def test_duplicate_id_raises_and_leaves_the_first_alone() -> None:
    async with Bus() as bus:
        first = bus.subscribe("orders", id="client1")
        with pytest.raises(SubscriberExistsError, match="client1"):
            bus.subscribe("other", id="client1")
        with pytest.raises(SubscriberExistsError):
            bus.on("other", lambda e: None, id="client1")
        assert bus.topics() == ["orders"]
        assert bus.get_subscriber("client1") is first
        event = await bus.publish("orders", 1)
        assert first.get_nowait() is event
        # Once gone, the id can be used again.
        await bus.unsubscribe("client1")
        again = bus.subscribe("other", id="client1")
        assert again is not first
        assert bus.get_subscriber("client1") is again


async def test_unknown_id_raises() -> None:
    async with Bus() as bus:
        with pytest.raises(SubscriberNotFoundError, match="nobody"):
            await bus.unsubscribe("nobody")
        with pytest.raises(SubscriberNotFoundError):
            bus.get_subscriber("nobody")
        bus.subscribe("orders", id="c")
        await bus.unsubscribe("c")
        with pytest.raises(SubscriberNotFoundError):
            await bus.unsubscribe("c")


@pytest.mark.parametrize("bad_id", ["", 42])
async def test_bad_id_raises(bad_id: Any) -> None:
    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match="id"):
            bus.subscribe("orders", id=bad_id)
        assert bus.topics() == []


async def test_context_manager_subscription_gets_an_auto_id_and_closes() -> None:
    async with Bus() as bus:
        taken = bus.subscribe("x", id="sub-1")
        async with bus.subscribe("orders.*") as sub2:
            assert sub2.id != "sub-1"
            assert sub2.id.startswith("sub-")
            event = await bus.publish("orders.created", 1)
            assert await sub2.get() is event
        assert sub2.closed
        assert [s.id for s in bus.subscribers()] == [taken.id]
        assert "orders.*" not in bus.topics()
        ids = {bus.subscribe("a").id for _ in range(5)}
        assert len(ids) == 5


async def test_topic_table_is_emptied_when_the_last_subscriber_leaves() -> None:
    async with Bus() as bus:
        a = bus.subscribe("orders", id="a")
        b = bus.subscribe("orders", id="b")
        c = bus.subscribe(["orders", "orders.>"], id="c")
        h = bus.on("system.*", lambda e: None, id="h")
        assert bus.topics() == ["orders", "orders.>", "system.*"]
        assert len(bus._router.rings) == 3
        await bus.publish("orders", 1)

        await bus.unsubscribe("a")
        assert bus.topics() == ["orders", "orders.>", "system.*"]
        await bus.unsubscribe("b")
        assert bus.topics() == ["orders", "orders.>", "system.*"]
        assert ("orders",) not in bus._router.rings
        c.close()
        assert bus.topics() == ["system.*"]
        await bus.unsubscribe(h.id)
        assert bus.topics() == []
        assert bus._router.rings == {}
        assert len(bus._router) == 0
        assert bus.statistics()["rings"] == 0
        assert bus.statistics()["subscribers"] == 0
        # Nobody listens now: publishing routes to nothing.
        await bus.publish("orders", 2)
        assert a.closed
        assert b.closed


# -- topics and patterns ------------------------------------------------------------


async def test_patterns() -> None:
    async with Bus() as bus:
        star = bus.subscribe("orders.*")
        tail = bus.subscribe("orders.>")
        any_one = bus.subscribe("*")
        ns = bus.subscribe("chat:room.*")
        exact = bus.subscribe("dialog#42,43")
        for topic in ["orders", "orders.created", "orders.created.eu", "chat:room.1", "room.1"]:
            await bus.publish(topic, topic)
        await bus.publish("dialog#42,43", "dm")
        assert datas(drain(star)) == ["orders.created"]
        assert datas(drain(tail)) == ["orders.created", "orders.created.eu"]
        assert datas(drain(any_one)) == ["orders", "dm"]  # one segment each
        assert datas(drain(ns)) == ["chat:room.1"]
        assert datas(drain(exact)) == ["dm"]


@pytest.mark.parametrize("bad", ["", "a..b", "a b", "ns:", "a.*", "a.>"])
async def test_publish_rejects_invalid_topics(bad: str) -> None:
    async with Bus() as bus:
        sub = bus.subscribe(">")
        with pytest.raises(InvalidTopicError):
            await bus.publish(bad, 1)
        with pytest.raises(InvalidTopicError):
            bus.publish_nowait(bad, 1)
        assert sub.get_nowait() is None
        assert bus.statistics()["published"] == 0


@pytest.mark.parametrize("bad", ["", "a..b", ">.a", "a b", ["ok", "b..c"], []])
async def test_subscribe_rejects_invalid_patterns(bad: Any) -> None:
    async with Bus() as bus:
        with pytest.raises(InvalidTopicError):
            bus.subscribe(bad)
        assert bus.topics() == []
        assert bus.subscribers() == []


async def test_multi_topic_subscription_keeps_publish_order() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(["orders", "notifications", "x.>", "x.*"])
        other = bus.subscribe("orders")
        sequence = [("orders", 0), ("notifications", 1), ("x.y", 2), ("skip", 3), ("orders", 4)]
        sequence += [("x.y.z", 5), ("notifications", 6), ("orders", 7)]
        for topic, n in sequence:
            await bus.publish(topic, n)
        got = await sub.get_batch(100)
        # In publish order, and an event matching two filters arrives once.
        assert datas(got) == [0, 1, 2, 4, 5, 6, 7]
        assert datas(drain(other)) == [0, 4, 7]


# -- publishing ---------------------------------------------------------------------


async def test_publish_many() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(["orders", "system"])
        events = await bus.publish_many([("orders", 1), ("system", 2), ("elsewhere", 3)])
        assert [e.topic for e in events] == ["orders", "system", "elsewhere"]
        got = await sub.get_batch(10)
        assert got == events[:2]
        assert got[0] is events[0]
        assert bus.statistics()["published"] == 3


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_publish_many_with_an_invalid_topic_publishes_nothing(position: int) -> None:
    async with Bus() as bus:
        sub = bus.subscribe(">")
        items: list[tuple[str, object]] = [("a", 1), ("b", 2), ("c", 3)]
        items[position] = ("bad..topic", 0)
        with pytest.raises(InvalidTopicError):
            await bus.publish_many(items)
        assert sub.get_nowait() is None
        assert bus.statistics()["published"] == 0
        with pytest.raises(TypeError, match="pairs"):
            await bus.publish_many([("a", 1), "b"])  # type: ignore[list-item]
        assert sub.get_nowait() is None


async def test_publish_nowait() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("orders")
        event = bus.publish_nowait("orders", 1, tags={"k": "v"})
        assert isinstance(event, Event)
        assert event.tags["k"] == "v"
        assert await sub.get() is event


async def test_publish_with_tags_and_idempotency_key() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("orders")
        event = await bus.publish("orders", 1, tags={"k": "v"}, idempotency_key="key-1")
        got = await sub.get()
        assert got is event
        assert dict(got.tags) == {"k": "v"}
        assert got.idempotency_key == "key-1"


async def test_publish_threadsafe_from_a_thread() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("orders")
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[concurrent.futures.Future[Event]] = loop.create_future()
        threads: list[int] = []

        def worker() -> None:
            threads.append(threading.get_ident())
            future = bus.publish_threadsafe("orders", {"from": "thread"})
            loop.call_soon_threadsafe(handed.set_result, future)

        thread = threading.Thread(target=worker)
        thread.start()
        future = await asyncio.wait_for(handed, SAFETY)
        assert isinstance(future, concurrent.futures.Future)
        event = await asyncio.wait_for(asyncio.wrap_future(future), SAFETY)
        got = await asyncio.wait_for(sub.get(), SAFETY)
        assert got is event
        assert got.data == {"from": "thread"}
        await asyncio.to_thread(thread.join, SAFETY)
        assert threads
        assert threads[0] != threading.get_ident()


async def test_publish_threadsafe_on_a_closed_or_unstarted_bus() -> None:
    unstarted = Bus()
    future = unstarted.publish_threadsafe("orders", 1)
    with pytest.raises(BusClosedError):
        future.result(timeout=0)
    bus = Bus()
    await bus.start()
    await bus.close()
    future = bus.publish_threadsafe("orders", 1)
    with pytest.raises(BusClosedError):
        future.result(timeout=0)


async def test_get_batch() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("orders")
        for i in range(5):
            bus.publish_nowait("orders", i)
        assert datas(await sub.get_batch(3)) == [0, 1, 2]
        assert datas(await sub.get_batch(10)) == [3, 4]
        waiting = asyncio.create_task(sub.get_batch(10))
        await until(lambda: sub._waiter is not None)
        assert not waiting.done()
        event = bus.publish_nowait("orders", 5)
        batch = await asyncio.wait_for(waiting, SAFETY)
        assert batch == [event]
        with pytest.raises(ValueError, match="max_items"):
            await sub.get_batch(0)


async def test_subscription_statistics() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(["orders", "x.*"], id="s", maxsize=3, overflow=Overflow.DROP_NEWEST)
        for i in range(5):
            bus.publish_nowait("orders", i)
        await sub.get()
        stats = sub.statistics()
        assert isinstance(stats, SubscriptionStatistics)
        assert stats.id == "s"
        assert stats.topics == ("orders", "x.*")
        assert stats.buffered == 2
        assert stats.delivered == 1
        assert stats.dropped == 2
        assert stats.max_size == 3
        assert stats.policy is Overflow.DROP_NEWEST
        assert stats.closed is False
        assert sub.buffered == 2
        bus_stats = bus.statistics()
        assert bus_stats["published"] == 5
        assert bus_stats["dropped"] == 2
        assert bus_stats["subscribers"] == 1
        assert bus_stats["dead_letters"] == 2
        sub.close()
        assert sub.statistics().closed is True
        assert sub.statistics().delivered == 1


async def test_statistics_count_deliveries_in_ring_mode() -> None:
    async with Bus() as bus:
        a = bus.subscribe("t", maxsize=4)
        b = bus.subscribe("t", maxsize=4)  # shares a's ring
        for i in range(3):
            bus.publish_nowait("t", i)
        assert len(await a.get_batch(2)) == 2
        assert a.statistics().delivered == 2
        assert a.statistics().buffered == 1
        assert b.statistics().delivered == 0
        assert b.statistics().buffered == 3


# -- overflow policies ------------------------------------------------------------------


async def test_drop_oldest() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=3, overflow=Overflow.DROP_OLDEST)
        events = [bus.publish_nowait("t", i) for i in range(10)]
        assert sub.statistics().buffered == 3
        assert datas(await sub.get_batch(100)) == [7, 8, 9]
        stats = sub.statistics()
        assert stats.dropped == 7
        assert stats.delivered == 3
        assert bus.statistics()["dropped"] == 7
        letters = bus.dead_letters.list()
        assert [letter.event for letter in letters] == events[:7]
        assert all(letter.event is e for letter, e in zip(letters, events, strict=False))
        assert {letter.reason for letter in letters} == {"overflow_drop_oldest"}
        assert {letter.subscriber for letter in letters} == {"s"}
        assert all(isinstance(letter.time, float) and letter.time > 0 for letter in letters)


async def test_drop_newest() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=3, overflow=Overflow.DROP_NEWEST)
        events = [bus.publish_nowait("t", i) for i in range(10)]
        assert datas(await sub.get_batch(100)) == [0, 1, 2]
        assert sub.statistics().dropped == 7
        assert sub.statistics().delivered == 3
        letters = bus.dead_letters.list(subscriber="s")
        assert [letter.event for letter in letters] == events[3:]
        assert {letter.reason for letter in letters} == {"overflow_drop_newest"}
        # Once drained it receives new events again.
        after = bus.publish_nowait("t", 10)
        assert await sub.get() is after


async def test_drop_policies_only_touch_the_slow_subscriber() -> None:
    async with Bus() as bus:
        slow = bus.subscribe("t", id="slow", maxsize=2, overflow=Overflow.DROP_OLDEST)
        fast = bus.subscribe("t", id="fast", maxsize=100)
        for i in range(10):
            bus.publish_nowait("t", i)
        assert datas(drain(fast)) == list(range(10))
        assert datas(drain(slow)) == [8, 9]
        assert fast.statistics().dropped == 0
        assert {letter.subscriber for letter in bus.dead_letters} == {"slow"}


async def test_block_makes_the_publisher_wait_for_room() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", maxsize=2, overflow=Overflow.BLOCK, block_timeout=SAFETY)
        await bus.publish("t", 0)
        await bus.publish("t", 1)
        publisher = asyncio.create_task(bus.publish("t", 2))
        await until(lambda: sub._space_waiters)
        assert not publisher.done()  # the publisher is waiting for room
        assert sub.buffered == 2
        assert (await sub.get()).data == 0
        event = await asyncio.wait_for(publisher, SAFETY)
        assert event.data == 2
        assert datas(await sub.get_batch(10)) == [1, 2]
        assert sub.statistics().dropped == 0
        assert len(bus.dead_letters) == 0


async def test_block_with_an_async_for_consumer_loses_nothing() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", maxsize=1, overflow=Overflow.BLOCK, block_timeout=SAFETY)
        received: list[object] = []

        async def consume() -> None:
            async for event in sub:
                received.append(event.data)

        consumer = asyncio.create_task(consume())
        for i in range(20):
            await bus.publish("t", i)
        await until(lambda: len(received) == 20, steps=10_000)
        assert received == list(range(20))
        assert sub.statistics().dropped == 0
        sub.close()
        await asyncio.wait_for(consumer, SAFETY)


async def test_block_timeout_makes_a_dead_letter() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=2, overflow=Overflow.BLOCK, block_timeout=0.05)
        await bus.publish("t", 0)
        await bus.publish("t", 1)
        late = await bus.publish("t", 2)  # waits block_timeout, then gives up
        assert sub.statistics().dropped == 1
        [letter] = bus.dead_letters.list()
        assert letter.event is late
        assert letter.reason == "block_timeout"
        assert letter.subscriber == "s"
        assert datas(await sub.get_batch(10)) == [0, 1]


async def test_block_publish_nowait_never_waits() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=1, overflow=Overflow.BLOCK, block_timeout=SAFETY)
        bus.publish_nowait("t", 0)
        dropped = bus.publish_nowait("t", 1)  # full: no waiting, a dead letter instead
        assert [letter.event for letter in bus.dead_letters.list(reason="block_timeout")] == [
            dropped
        ]
        assert sub.statistics().dropped == 1
        assert datas(drain(sub)) == [0]


async def test_disconnect_closes_the_slow_consumer() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=2, overflow=Overflow.DISCONNECT)
        other = bus.subscribe("t", id="other", maxsize=10)
        events = [bus.publish_nowait("t", i) for i in range(3)]
        assert sub.closed
        stats = sub.statistics()
        assert stats.closed
        assert stats.dropped == 3
        with pytest.raises(SlowConsumerError, match="overflowed"):
            await sub.get()
        with pytest.raises(SlowConsumerError):
            async for _ in sub:
                pass
        letters = bus.dead_letters.list(subscriber="s")
        assert [letter.event for letter in letters] == events
        assert {letter.reason for letter in letters} == {"slow_consumer"}
        assert [s.id for s in bus.subscribers()] == ["other"]
        assert datas(drain(other)) == [0, 1, 2]
        assert bus.statistics()["dropped"] == 3


async def test_disconnect_ends_a_waiting_iterator_with_slow_consumer_error() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", maxsize=1, overflow=Overflow.DISCONNECT)
        received: list[object] = []
        first = asyncio.Event()

        async def consume() -> None:
            async for event in sub:
                received.append(event.data)
                first.set()
                await asyncio.Event().wait()  # a consumer stuck on its work

        consumer = asyncio.create_task(consume())
        bus.publish_nowait("t", 0)
        await asyncio.wait_for(first.wait(), SAFETY)
        bus.publish_nowait("t", 1)
        bus.publish_nowait("t", 2)  # overflows: disconnect
        assert sub.closed
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        with pytest.raises(SlowConsumerError):
            await sub.get()
        assert received == [0]


# -- drop reporting: once per episode ------------------------------------------------------


@pytest.mark.parametrize("policy", [Overflow.DROP_OLDEST, Overflow.DROP_NEWEST, Overflow.BLOCK])
@pytest.mark.parametrize("how", ["get_nowait", "get_batch", "get"])
async def test_drops_are_reported_once_per_episode(
    caplog: pytest.LogCaptureFixture, policy: Overflow, how: str
) -> None:
    caplog.set_level(logging.WARNING, logger="eventcast.bus")
    on_drop = Recorder()
    async with Bus(on_drop=on_drop) as bus:
        sub = bus.subscribe("t", id="s", maxsize=2, overflow=policy)

        async def drain_all() -> int:
            count = 0
            if how == "get_nowait":
                count = len(drain(sub))
            elif how == "get_batch":
                while sub.buffered:
                    count += len(await sub.get_batch(1))
            else:
                while sub.buffered:
                    await sub.get()
                    count += 1
            return count

        for i in range(12):  # ten drops, one episode
            bus.publish_nowait("t", i)
        assert sub.statistics().dropped == 10
        assert len(drop_warnings(caplog)) == 1
        assert "'s'" in drop_warnings(caplog)[0].getMessage()
        assert len(on_drop.calls) == 1
        assert on_drop.calls[0][0] is sub
        assert on_drop.calls[0][1].startswith(("overflow_", "block_"))

        assert await drain_all() == 2  # the episode ends once the buffer is drained
        for i in range(2):  # fills the buffer, no drop
            bus.publish_nowait("t", i)
        assert len(drop_warnings(caplog)) == 1
        for i in range(5):  # a second episode
            bus.publish_nowait("t", i)
        assert len(drop_warnings(caplog)) == 2
        assert len(on_drop.calls) == 2
        assert sub.statistics().dropped == 15
        assert len(bus.dead_letters.list(subscriber="s")) == 15
        assert bus.statistics()["dropped"] == 15


async def test_a_raising_on_drop_is_logged_not_propagated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def on_drop(sub: Subscription, reason: str) -> None:
        raise RuntimeError("bad callback")

    async with Bus(on_drop=on_drop) as bus:
        sub = bus.subscribe("t", maxsize=1, overflow=Overflow.DROP_NEWEST)
        bus.publish_nowait("t", 0)
        bus.publish_nowait("t", 1)  # must not raise
        assert sub.statistics().dropped == 1
        assert any("on_drop" in r.getMessage() for r in caplog.records)


# -- dead letters ------------------------------------------------------------------------


async def test_dead_letter_store_is_bounded() -> None:
    async with Bus(dead_letters=5) as bus:
        sub = bus.subscribe("t", id="s", maxsize=1, overflow=Overflow.DROP_NEWEST)
        events = [bus.publish_nowait("t", i) for i in range(9)]  # eight drops
        store = bus.dead_letters
        assert store.maxsize == 5
        assert len(store) == 5
        assert store.evicted == 3
        letters = store.list()
        assert [letter.event for letter in letters] == events[4:]  # the oldest were evicted
        ids = [letter.id for letter in letters]
        assert ids == sorted(ids)
        assert len(set(ids)) == 5
        assert sub.statistics().dropped == 8  # statistics still count every drop
        assert bus.statistics()["dead_letters"] == 5


async def test_dead_letters_list_filters_and_removal() -> None:
    async with Bus() as bus:
        a = bus.subscribe("t", id="a", maxsize=1, overflow=Overflow.DROP_NEWEST)
        b = bus.subscribe(["t", "u"], id="b", maxsize=1, overflow=Overflow.DROP_OLDEST)
        for i in range(3):
            bus.publish_nowait("t", i)
        bus.publish_nowait("u", 3)
        assert a.statistics().dropped == 2
        assert b.statistics().dropped == 3
        store = bus.dead_letters
        assert len(store) == 5
        assert [x.subscriber for x in store.list(subscriber="a")] == ["a", "a"]
        assert {x.reason for x in store.list(subscriber="a")} == {"overflow_drop_newest"}
        assert len(store.list(reason="overflow_drop_oldest")) == 3
        assert store.list(subscriber="a", reason="overflow_drop_oldest") == []
        assert len(store.list(topic="t")) == 5
        assert store.list(topic="u") == []
        assert len(store.list(limit=2)) == 2
        first = store.list()[0]
        assert isinstance(first, DeadLetter)
        assert store.get(first.id) is first
        assert store.get(10**9) is None
        assert list(store) == store.list()
        store.remove([first])
        assert store.get(first.id) is None
        assert len(store) == 4
        store.clear()
        assert len(store) == 0
        assert "0/" in repr(store)


async def test_redrive_delivers_the_event_again() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=2, overflow=Overflow.DROP_NEWEST)
        events = [bus.publish_nowait("t", i) for i in range(4)]
        assert datas(drain(sub)) == [0, 1]
        assert await bus.dead_letters.redrive(subscriber="s") == 2
        assert len(bus.dead_letters) == 0
        got = drain(sub)
        assert got == events[2:]
        assert got[0] is events[2]
        # Back in step: later events arrive after the redriven ones, in order.
        later = bus.publish_nowait("t", 4)
        assert await sub.get() is later


async def test_redrive_to_a_waiting_consumer_wakes_it() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=1, overflow=Overflow.DROP_NEWEST)
        bus.publish_nowait("t", 0)
        lost = bus.publish_nowait("t", 1)
        assert (await sub.get()).data == 0
        waiting = asyncio.create_task(sub.get())
        await until(lambda: sub._waiter is not None)
        assert await bus.dead_letters.redrive(reason="overflow_drop_newest") == 1
        assert await asyncio.wait_for(waiting, SAFETY) is lost


async def test_redrive_selects_by_id_and_keeps_letters_of_departed_subscribers() -> None:
    async with Bus() as bus:
        gone = bus.subscribe("t", id="gone", maxsize=1, overflow=Overflow.DROP_NEWEST)
        stay = bus.subscribe("t", id="stay", maxsize=1, overflow=Overflow.DROP_NEWEST)
        bus.publish_nowait("t", 0)
        bus.publish_nowait("t", 1)
        bus.publish_nowait("t", 2)
        gone.close()
        assert await bus.dead_letters.redrive(subscriber="gone") == 0
        assert len(bus.dead_letters.list(subscriber="gone")) == 2
        drain(stay)
        second = bus.dead_letters.list(subscriber="stay")[1]
        assert await bus.dead_letters.redrive(ids=[second.id]) == 1
        assert stay.get_nowait() is second.event
        assert len(bus.dead_letters.list(subscriber="stay")) == 1


async def test_redrive_into_a_full_subscriber_drops_again() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="s", maxsize=1, overflow=Overflow.DROP_NEWEST)
        bus.publish_nowait("t", 0)
        lost = bus.publish_nowait("t", 1)
        [old] = bus.dead_letters.list()
        assert await bus.dead_letters.redrive() == 1  # still full: dropped again
        [new] = bus.dead_letters.list()
        assert new.event is lost
        assert new.id != old.id
        assert sub.statistics().dropped == 2
        assert datas(drain(sub)) == [0]


# -- handler subscribers -------------------------------------------------------------------


async def test_sync_and_async_handlers() -> None:
    async with Bus() as bus:
        sync_seen: list[object] = []
        async_seen: list[object] = []
        both = asyncio.Event()

        def check() -> None:
            if len(sync_seen) == 3 and len(async_seen) == 3:
                both.set()

        def sync_handler(event: Event) -> None:
            sync_seen.append(event.data)
            check()

        async def async_handler(event: Event) -> None:
            await asyncio.sleep(0)
            async_seen.append(event.data)
            check()

        h1 = bus.on("orders.>", sync_handler)
        h2 = bus.on(["orders.*"], async_handler, id="async")
        assert h2.id == "async"
        for i in range(3):
            await bus.publish(f"orders.n{i}", i)
        await bus.publish("other", "ignored")
        await asyncio.wait_for(both.wait(), SAFETY)
        assert sync_seen == [0, 1, 2]
        assert async_seen == [0, 1, 2]
        assert h1.processed == 3
        assert h2.processed == 3
        assert h1.failed == 0


async def test_handlers_registered_before_start_run_once_started() -> None:
    bus = Bus()
    seen: list[Event] = []
    done = asyncio.Event()

    def handler(event: Event) -> None:
        seen.append(event)
        done.set()

    bus.on("t", handler)
    async with bus:
        event = await bus.publish("t", 1)
        await asyncio.wait_for(done.wait(), SAFETY)
        assert seen == [event]


async def test_a_failing_handler_is_retried_then_dead_lettered() -> None:
    errors = Recorder()
    async with Bus(backoff=0.001, max_backoff=0.002, error_handler=errors) as bus:
        attempts: list[object] = []
        good_seen: list[object] = []
        good_done = asyncio.Event()

        def failing(event: Event) -> None:
            attempts.append(event.data)
            if event.data == "bad":
                raise ValueError("boom")

        def good(event: Event) -> None:
            good_seen.append(event.data)
            if len(good_seen) == 2:
                good_done.set()

        h = bus.on("t", failing, id="failing", retries=2)
        bus.on("t", good, id="good")
        plain = bus.subscribe("t", id="plain")
        bad = await bus.publish("t", "bad")
        await bus.publish("t", "fine")
        await errors.wait()
        await asyncio.wait_for(good_done.wait(), SAFETY)
        await until(lambda: h.processed == 1)

        assert attempts == ["bad", "bad", "bad", "fine"]  # 1 + 2 retries, then moves on
        assert h.failed == 1
        [letter] = bus.dead_letters.list(subscriber="failing")
        assert letter.event is bad
        assert letter.reason == "handler_error"
        assert letter.attempts == 3
        assert letter.error is not None
        assert "ValueError" in letter.error
        assert "boom" in letter.error
        [(error, recorded)] = errors.calls
        assert isinstance(error, DeliveryError)
        assert error.failed == ("failing",)
        assert recorded is letter
        # Nobody else was affected.
        assert good_seen == ["bad", "fine"]
        assert datas(drain(plain)) == ["bad", "fine"]
        assert bus.dead_letters.list(subscriber="good") == []


async def test_handler_backoff_grows_and_is_capped() -> None:
    from eventcast.handlers import backoff_delay

    for attempt in range(8):
        delay = backoff_delay(attempt, 0.1, 1.0)
        full = min(1.0, 0.1 * 2**attempt)
        assert full / 2 <= delay <= full


async def test_a_failing_handler_with_the_default_error_handler_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Bus(backoff=0.001) as bus:
        calls: list[int] = []

        def failing(event: Event) -> None:
            calls.append(1)
            raise RuntimeError("nope")

        h = bus.on("t", failing, retries=0)
        await bus.publish("t", 1)
        await until(lambda: h.failed == 1)
        assert calls == [1]
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert any("nope" in r.getMessage() for r in errors)


async def test_async_error_handler_is_awaited_in_the_background() -> None:
    seen: list[tuple[EventcastError, DeadLetter | None]] = []
    done = asyncio.Event()

    async def on_error(error: EventcastError, letter: DeadLetter | None) -> None:
        await asyncio.sleep(0)
        seen.append((error, letter))
        done.set()

    async with Bus(error_handler=on_error) as bus:
        bus.on("t", lambda e: 1 / 0, retries=0)
        await bus.publish("t", 1)
        await asyncio.wait_for(done.wait(), SAFETY)
        [(error, letter)] = seen
        assert isinstance(error, DeliveryError)
        assert letter is not None
        assert "ZeroDivisionError" in (letter.error or "")


async def test_unsubscribing_a_handler_stops_its_task() -> None:
    async with Bus() as bus:
        h = bus.on("t", lambda e: None, id="h")
        task = h._task
        assert task is not None
        await bus.unsubscribe("h")
        assert task.done()
        assert h.subscription.closed
        assert bus.topics() == []


# -- publish with acknowledgement ---------------------------------------------------------


async def test_ack_returns_after_every_handler_processed() -> None:
    async with Bus() as bus:
        sync_seen: list[Event] = []
        async_seen: list[Event] = []

        async def slow_handler(event: Event) -> None:
            for _ in range(5):
                await asyncio.sleep(0)  # some awaiting work
            async_seen.append(event)

        bus.on("orders.>", sync_seen.append)
        bus.on("orders.*", slow_handler)
        plain = bus.subscribe("orders.*")

        event = await bus.publish("orders.created", 1, ack=True, timeout=SAFETY)
        assert sync_seen == [event]
        assert async_seen == [event]
        assert plain.get_nowait() is event

        # Without ack the publisher does not wait for handlers.
        quick = await bus.publish("orders.created", 2)
        assert async_seen == [event]
        await bus.publish("orders.created", 3, ack=True, timeout=SAFETY)
        assert quick in async_seen


async def test_ack_without_handlers_returns_at_once() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t")
        event = await bus.publish("t", 1, ack=True)
        assert sub.get_nowait() is event


async def test_ack_with_a_failing_handler_raises_delivery_error() -> None:
    errors = Recorder()
    async with Bus(backoff=0.001, max_backoff=0.002, error_handler=errors) as bus:
        calls: list[Event] = []
        ok_seen: list[Event] = []

        def failing(event: Event) -> None:
            calls.append(event)
            raise ValueError("always")

        bus.on("t", failing, id="failing")
        bus.on("t", ok_seen.append, id="ok")
        with pytest.raises(DeliveryError, match="always") as info:
            await bus.publish("t", 1, ack=True, timeout=SAFETY, retries=2)
        assert not isinstance(info.value, AckTimeoutError)
        assert info.value.failed == ("failing",)
        assert len(calls) == 3  # one attempt per delivery, retries=2
        event = calls[0]
        assert all(c is event for c in calls)
        assert ok_seen == [event]  # the good handler got it once
        [letter] = bus.dead_letters.list(reason="ack_failed")
        assert letter.subscriber == "failing"
        assert letter.event is event
        assert letter.attempts == 3
        assert "ValueError: always" in (letter.error or "")
        assert errors.calls == [(info.value, letter)]


async def test_ack_with_a_too_slow_handler_raises_ack_timeout() -> None:
    errors = Recorder()
    async with Bus(backoff=0.001, max_backoff=0.002, error_handler=errors) as bus:
        started: list[Event] = []

        async def stuck(event: Event) -> None:
            started.append(event)
            await asyncio.Event().wait()

        bus.on("t", stuck, id="stuck")
        with pytest.raises(AckTimeoutError) as info:
            await bus.publish("t", 1, ack=True, timeout=0.05, retries=1)
        assert isinstance(info.value, DeliveryError)
        assert info.value.failed == ("stuck",)
        [letter] = bus.dead_letters.list(subscriber="stuck")
        assert letter.reason == "ack_failed"
        assert letter.attempts == 2
        assert errors.calls[0][0] is info.value
        assert started[0].data == 1


async def test_ack_with_a_handler_that_fails_once_then_succeeds() -> None:
    errors = Recorder()
    async with Bus(backoff=0.001, max_backoff=0.002, error_handler=errors) as bus:
        calls: list[Event] = []

        async def flaky(event: Event) -> None:
            calls.append(event)
            if len(calls) == 1:
                raise RuntimeError("first time")

        h = bus.on("t", flaky)
        event = await bus.publish("t", 1, ack=True, timeout=SAFETY, retries=3)
        assert calls == [event, event]
        assert h.processed == 1
        assert len(bus.dead_letters) == 0
        assert errors.calls == []


async def test_ack_rejects_bad_settings() -> None:
    async with Bus() as bus:
        bus.on("t", lambda e: None)
        with pytest.raises(ConfigurationError):
            await bus.publish("t", 1, ack=True, timeout=0)
        with pytest.raises(ConfigurationError):
            await bus.publish("t", 1, ack=True, retries=-1)


# -- events are shared, any object allowed -------------------------------------------------


async def test_events_are_shared_not_copied() -> None:
    async with Bus() as bus:
        a = bus.subscribe("t", maxsize=5)
        b = bus.subscribe(["t", "u"], maxsize=7)
        c = bus.subscribe("*")
        data = {"mutable": [1, 2]}
        event = await bus.publish("t", data)
        got = [await s.get() for s in (a, b, c)]
        assert all(g is event for g in got)
        assert got[0].data is data


class _Payload:
    """Data whose release a weak reference shows."""


@pytest.mark.parametrize("members", [1, 10, 100])
async def test_events_every_subscriber_read_are_released(members: int) -> None:
    # A large maxsize bounds how far a subscriber may fall behind, not how many
    # read events the bus keeps: a hub channel's subscriber (maxsize 65,536)
    # once kept up to 131,072 events it had delivered.
    async with Bus() as bus:
        subs = [bus.subscribe("t", maxsize=65_536) for _ in range(members)]
        refs = []
        for _ in range(5_000):
            data = _Payload()
            refs.append(weakref.ref(data))
            bus.publish_nowait("t", data)
            del data
            for sub in subs:
                assert sub.get_nowait() is not None
        alive = sum(ref() is not None for ref in refs)
        assert alive <= max(64, 32 * members)
        # Events not yet read by every subscriber are kept, however many.
        lagging = bus.subscribe("t", maxsize=65_536)
        for _ in range(5_000):
            bus.publish_nowait("t", _Payload())
            for sub in subs:
                sub.get_nowait()
        assert len(lagging.get_nowait_batch(10_000)) == 5_000


@pytest.mark.parametrize(
    "data",
    [object(), lambda: 1, {1, 2}, Exception("x"), None, b"bytes", threading.Lock()],
)
async def test_any_python_object_is_allowed_in_process(data: object) -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t")
        await bus.publish("t", data)
        bus.publish_nowait("t", data)
        await bus.publish_many([("t", data)])
        got = drain(sub)
        assert len(got) == 3
        assert all(e.data is data for e in got)


async def test_unencodable_data_fails_only_when_encoded() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t")
        event = await bus.publish("t", object())
        with pytest.raises(EncodeError):
            (await sub.get()).encoded_data()
        assert event.data is not None


# -- closing ---------------------------------------------------------------------------------


async def test_close_is_idempotent_ends_iterators_and_leaves_no_task() -> None:
    before = asyncio.all_tasks()
    bus = Bus()
    await bus.start()
    subs = [bus.subscribe("t", id=f"s{i}") for i in range(3)]
    handler_seen: list[Event] = []
    bus.on("t", handler_seen.append, id="h")

    async def stuck(event: Event) -> None:
        await asyncio.Event().wait()

    stuck_handler = bus.on("t", stuck, id="stuck")
    received: list[list[object]] = [[] for _ in subs]

    async def consume(i: int) -> str:
        async for event in subs[i]:
            received[i].append(event.data)
        return "ended"

    consumers = [asyncio.create_task(consume(i)) for i in range(3)]
    idle = bus.subscribe("never")
    getter = asyncio.create_task(idle.get_batch())
    await bus.publish("t", 1)
    await until(lambda: all(r == [1] for r in received) and handler_seen)
    await until(lambda: stuck_handler.subscription.buffered == 0)

    await bus.close()
    await bus.close()
    assert bus.closed
    results = await asyncio.wait_for(asyncio.gather(*consumers), SAFETY)
    assert results == ["ended"] * 3
    with pytest.raises(SubscriptionClosedError):
        await asyncio.wait_for(getter, SAFETY)
    assert idle.closed
    assert all(s.closed for s in subs)
    assert bus.subscribers() == []
    assert bus.topics() == []
    assert bus._tasks.tasks == set()
    assert asyncio.all_tasks() == before
    assert "closed" in repr(bus)


async def test_a_closed_bus_refuses_everything() -> None:
    async with Bus() as bus:
        pass
    assert bus.closed
    with pytest.raises(BusClosedError):
        await bus.publish("t", 1)
    with pytest.raises(BusClosedError):
        bus.publish_nowait("t", 1)
    with pytest.raises(BusClosedError):
        await bus.publish_many([("t", 1)])
    with pytest.raises(BusClosedError):
        await bus.publish("t", 1, ack=True)
    with pytest.raises(BusClosedError):
        bus.subscribe("t")
    with pytest.raises(BusClosedError):
        bus.on("t", lambda e: None)
    with pytest.raises(BusClosedError):
        await bus.start()
    assert issubclass(BusClosedError, EventcastError)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("maxsize", [0, -1, 1.5, "10", None, True])
async def test_bad_maxsize_raises_configuration_error(maxsize: Any) -> None:
    with pytest.raises(ConfigurationError, match="maxsize") as info:
        Bus(maxsize=maxsize)
    assert isinstance(info.value, ValueError)
    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match="maxsize"):
            bus.subscribe("t", maxsize=maxsize if maxsize is not None else 0)
        with pytest.raises(ConfigurationError, match="maxsize"):
            bus.on("t", lambda e: None, maxsize=maxsize if maxsize is not None else -5)
        assert bus.topics() == []
        assert bus._router.rings == {}
        assert bus.subscribers() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ack_timeout": 0},
        {"ack_retries": -1},
        {"backoff": -1.0},
        {"max_backoff": -1.0},
    ],
)
def test_bad_bus_settings_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Bus(**kwargs)


async def test_bad_subscription_settings_raise_configuration_error() -> None:
    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match="overflow"):
            bus.subscribe("t", overflow="drop_oldest")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="block_timeout"):
            bus.subscribe("t", block_timeout=-1)
        with pytest.raises(ConfigurationError, match="retries"):
            bus.on("t", lambda e: None, retries=-1)
        with pytest.raises(TypeError, match="callable"):
            bus.on("t", "not callable")  # type: ignore[arg-type]
        assert bus.topics() == []
        assert bus.subscribers() == []


@pytest.mark.parametrize(
    "error",
    [
        InvalidTopicError,
        EncodeError,
        BusClosedError,
        SubscriberExistsError,
        SubscriberNotFoundError,
        SubscriptionClosedError,
        SlowConsumerError,
        DeliveryError,
        AckTimeoutError,
        LogError,
        PositionError,
        ConfigurationError,
    ],
)
def test_every_error_derives_from_eventcast_error(error: type[Exception]) -> None:
    assert issubclass(error, EventcastError)


def test_value_errors_and_subclasses() -> None:
    for error in (InvalidTopicError, EncodeError, PositionError, ConfigurationError):
        assert issubclass(error, ValueError)
    assert issubclass(SlowConsumerError, SubscriptionClosedError)
    assert issubclass(AckTimeoutError, DeliveryError)
    assert issubclass(PositionError, LogError)


async def test_get_nowait_batch_takes_what_is_buffered_without_waiting():
    async with Bus() as bus:
        sub = bus.subscribe("nowait.batch")
        assert sub.get_nowait_batch() == []
        for i in range(5):
            bus.publish_nowait("nowait.batch", i)
        assert [e.data for e in sub.get_nowait_batch(3)] == [0, 1, 2]
        assert [e.data for e in sub.get_nowait_batch()] == [3, 4]
        with pytest.raises(ValueError, match="max_items"):
            sub.get_nowait_batch(0)
        sub.close()
        with pytest.raises(SubscriptionClosedError):
            sub.get_nowait_batch()
