"""Cancellation: consumers, blocked publishers, acked publishers and close() itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from eventcast import Bus, BusClosedError, Event, Overflow, Subscription, SubscriptionClosedError

SAFETY = 5.0  # a safety net only: every wait below ends on an event long before


async def until(condition: Callable[[], object], *, steps: int = 1000) -> None:
    """Let other tasks run until ``condition()`` holds (no wall-clock waiting)."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def cancel(task: asyncio.Task[object]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def waiting_on(sub: Subscription) -> bool:
    return sub._waiter is not None or bool(sub._extra_waiters)


async def _consume_forever(sub: Subscription, out: list[object]) -> None:
    async for event in sub:
        out.append(event.data)


READERS = {
    "get": lambda sub, out: _get_forever(sub, out),
    "get_batch": lambda sub, out: _batch_forever(sub, out),
    "async for": _consume_forever,
}


async def _get_forever(sub: Subscription, out: list[object]) -> None:
    while True:
        out.append((await sub.get()).data)


async def _batch_forever(sub: Subscription, out: list[object]) -> None:
    while True:
        out.extend(e.data for e in await sub.get_batch(10))


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("policy", [Overflow.DROP_OLDEST, Overflow.DROP_NEWEST, Overflow.BLOCK])
async def test_cancelling_a_waiting_consumer_leaves_the_bus_consistent(
    reader: str, policy: Overflow
) -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="victim", maxsize=4, overflow=policy)
        other = bus.subscribe("t", id="other", maxsize=100)
        seen: list[object] = []
        task = asyncio.create_task(READERS[reader](sub, seen))
        await bus.publish("t", 0)
        await until(lambda: seen == [0] and waiting_on(sub))
        await cancel(task)
        assert not waiting_on(sub)

        # Other subscribers still receive; the cancelled subscription still gets
        # later events, from the same buffer, in order.
        for i in range(1, 4):
            await bus.publish("t", i)
        assert [e.data for e in await other.get_batch(100)] == [0, 1, 2, 3]
        assert sub.statistics().buffered == 3
        assert (await asyncio.wait_for(sub.get(), SAFETY)).data == 1
        again: list[object] = []
        second = asyncio.create_task(READERS[reader](sub, again))
        await until(lambda: again == [2, 3])
        bus.publish_nowait("t", 4)
        await until(lambda: again == [2, 3, 4])
        await cancel(second)
        assert sub.statistics().dropped == 0

        # Closing still ends everything.
        third = asyncio.create_task(_consume_forever(sub, again))
        await until(lambda: waiting_on(sub))
        await bus.close()
        await asyncio.wait_for(third, SAFETY)
        assert sub.closed
        assert other.closed
        with pytest.raises(SubscriptionClosedError):
            await sub.get()


async def test_cancelling_get_with_an_event_ready_loses_nothing() -> None:
    # The wake-up and the cancellation land in the same loop iteration.
    async with Bus() as bus:
        sub = bus.subscribe("t")
        getter = asyncio.create_task(sub.get())
        await until(lambda: waiting_on(sub))
        event = bus.publish_nowait("t", 1)
        getter.cancel()
        try:
            got = await getter
        except asyncio.CancelledError:
            # Cancelled before it took the event: the event is still buffered.
            assert await asyncio.wait_for(sub.get(), SAFETY) is event
        else:
            assert got is event
            assert sub.get_nowait() is None


async def test_two_readers_one_cancelled() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t")
        first = asyncio.create_task(sub.get())
        second = asyncio.create_task(sub.get())
        await until(lambda: sub._waiter is not None and sub._extra_waiters)
        await cancel(first)
        event = bus.publish_nowait("t", 1)
        assert await asyncio.wait_for(second, SAFETY) is event


async def test_cancel_a_publisher_blocked_on_a_block_subscriber() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("t", id="b", maxsize=1, overflow=Overflow.BLOCK, block_timeout=SAFETY)
        other = bus.subscribe("t", id="other")
        bus.publish_nowait("t", 0)
        publisher = asyncio.create_task(bus.publish("t", "never"))
        await until(lambda: sub._space_waiters)
        await cancel(publisher)
        assert sub._space_waiters == []
        # The cancelled publish delivered nothing to anyone.
        assert [e.data for e in await other.get_batch(10)] == [0]
        assert (await sub.get()).data == 0
        assert sub.get_nowait() is None
        assert len(bus.dead_letters) == 0
        assert bus.statistics()["published"] == 1
        # The bus works on: the next publish goes through without waiting.
        event = await asyncio.wait_for(bus.publish("t", 1), SAFETY)
        assert await sub.get() is event
        assert await other.get() is event


async def test_close_wakes_a_publisher_blocked_on_a_block_subscriber() -> None:
    bus = Bus()
    await bus.start()
    sub = bus.subscribe("t", maxsize=1, overflow=Overflow.BLOCK, block_timeout=SAFETY)
    bus.publish_nowait("t", 0)
    publisher = asyncio.create_task(bus.publish("t", 1))
    await until(lambda: sub._space_waiters)
    await bus.close()
    with pytest.raises(BusClosedError):
        await asyncio.wait_for(publisher, SAFETY)
    assert bus.statistics()["published"] == 1


async def test_close_while_an_acked_publish_waits_raises_in_the_publisher() -> None:
    bus = Bus()
    await bus.start()
    started = asyncio.Event()

    async def stuck(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    bus.on("t", stuck)
    publisher = asyncio.create_task(bus.publish("t", 1, ack=True, timeout=SAFETY))
    await asyncio.wait_for(started.wait(), SAFETY)
    await bus.close()
    with pytest.raises(BusClosedError, match="acknowledged"):
        await asyncio.wait_for(publisher, SAFETY)
    assert bus._handlers.acks == {}
    assert bus._tasks.tasks == set()


async def test_cancelling_an_acked_publish_cleans_up() -> None:
    async with Bus() as bus:
        started = asyncio.Event()
        release = asyncio.Event()
        seen: list[object] = []

        async def slow(event: Event) -> None:
            started.set()
            await release.wait()
            seen.append(event.data)

        h = bus.on("t", slow)
        publisher = asyncio.create_task(bus.publish("t", 1, ack=True, timeout=SAFETY))
        await asyncio.wait_for(started.wait(), SAFETY)
        await cancel(publisher)
        assert bus._handlers.acks == {}
        release.set()
        await until(lambda: h.processed == 1)
        # The handler carries on with later events.
        await bus.publish("t", 2, ack=True, timeout=SAFETY)
        assert seen == [1, 2]


async def test_close_cancelled_midway_still_leaves_the_bus_closed() -> None:
    before = asyncio.all_tasks()
    bus = Bus()
    await bus.start()
    sub = bus.subscribe("t")
    in_handler = asyncio.Event()
    refused = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(event: Event) -> None:
        in_handler.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            refused.set()
            await release.wait()  # holds close() up until cancelled again

    bus.on("t", stubborn)
    await bus.publish("t", 1)
    await asyncio.wait_for(in_handler.wait(), SAFETY)
    closing = asyncio.create_task(bus.close())
    await asyncio.wait_for(refused.wait(), SAFETY)
    assert not closing.done()  # close() waits for the handler task
    await cancel(closing)

    assert bus.closed
    assert sub.closed
    assert bus.subscribers() == []
    with pytest.raises(BusClosedError):
        await bus.publish("t", 2)
    with pytest.raises(BusClosedError):
        bus.subscribe("t")
    await bus.close()  # idempotent, returns at once
    release.set()
    await asyncio.wait_for(asyncio.gather(*bus._tasks.tasks, return_exceptions=True), SAFETY)
    await until(lambda: not bus._tasks.tasks)
    assert asyncio.all_tasks() == before
