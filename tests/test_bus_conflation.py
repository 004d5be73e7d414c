"""``Overflow.CONFLATE``: a subscriber that falls behind keeps only the newest event per key."""

from __future__ import annotations

import asyncio
import random

import pytest

from eventcast import Bus, ConfigurationError, Event, Overflow, Position, Subscription
from eventcast.bus import Namespace

from .test_bus import SAFETY, Recorder, datas, drain


def ticker(bus: Bus, symbol: str, price: float, *, topic: str = "prices") -> Event:
    return bus.publish_nowait(topic, {"symbol": symbol, "price": price}, tags={"symbol": symbol})


def accounted(sub: Subscription, published: int) -> None:
    """Every event a subscriber was offered is delivered, buffered, dropped or conflated."""
    stats = sub.statistics()
    assert stats.delivered + stats.buffered + stats.dropped + stats.conflated == published


async def test_a_slow_subscriber_keeps_the_newest_event_per_key_a_fast_one_everything() -> None:
    async with Bus() as bus:
        fast = bus.subscribe("prices", maxsize=100)
        slow = bus.subscribe(
            "prices", id="slow", maxsize=4, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        events = [ticker(bus, symbol, n) for n in range(5) for symbol in "ABC"]
        assert drain(fast) == events
        # 15 events, 3 symbols: after the overflow only the newest per symbol is
        # kept, in publication order.
        got = drain(slow)
        assert [(e.data["symbol"], e.data["price"]) for e in got] == [("A", 4), ("B", 4), ("C", 4)]
        stats = slow.statistics()
        assert (stats.conflated, stats.dropped, stats.delivered) == (12, 0, 3)
        accounted(slow, 15)
        assert fast.statistics().conflated == 0
        assert len(bus.dead_letters) == 0  # replaced, not lost: no dead letters
        assert bus.statistics()["dropped"] == 0


async def test_conflation_starts_only_when_the_buffer_overflows() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(
            "prices", maxsize=4, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        for n in range(4):
            ticker(bus, "A", n)
        assert sub.statistics().conflated == 0  # full, not behind yet
        assert [e.data["price"] for e in drain(sub)] == [0, 1, 2, 3]
        # Keeping up (never more than maxsize behind), it sees every event.
        for n in range(20):
            ticker(bus, "A", n)
            if n % 4 == 3:
                assert [e.data["price"] for e in drain(sub)] == list(range(n - 3, n + 1))
        assert sub.statistics().conflated == 0
        # Behind: the five buffered events of A become the newest one.
        for n in range(5):
            ticker(bus, "A", 100 + n)
        assert [e.data["price"] for e in drain(sub)] == [104]
        assert sub.statistics().conflated == 4
        # Drained, it is back on the shared ring and sees everything again.
        for n in range(3):
            ticker(bus, "A", 200 + n)
        assert [e.data["price"] for e in drain(sub)] == [200, 201, 202]
        accounted(sub, 4 + 20 + 5 + 3)


async def test_the_key_is_the_topic_and_the_tag() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(
            "prices.*", maxsize=3, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        ticker(bus, "A", 1, topic="prices.fx")
        a2 = ticker(bus, "A", 2, topic="prices.equity")  # the same tag in another topic
        bus.publish_nowait("prices.fx", "status: open")
        closed = bus.publish_nowait("prices.fx", "status: closed")  # untagged: one key per topic
        a3 = ticker(bus, "A", 3, topic="prices.fx")
        assert drain(sub) == [a2, closed, a3]
        assert sub.statistics().conflated == 2
        assert len(bus.dead_letters) == 0


async def test_without_a_conflation_key_the_key_is_the_topic() -> None:
    async with Bus(overflow=Overflow.CONFLATE, maxsize=2) as bus:
        sub = bus.subscribe(["a", "b"])
        for n in range(6):
            bus.publish_nowait("a" if n % 3 else "b", n)
        assert datas(drain(sub)) == [3, 5]
        assert sub.conflation_key is None
        assert sub.statistics().conflated == 4


async def test_offsets_tell_the_reader_what_it_skipped() -> None:
    async with Bus(log="memory://", namespaces={"d": Namespace(history_size=100)}) as bus:
        sub = bus.subscribe(
            "d:prices", maxsize=2, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        for n in range(10):
            await bus.publish("d:prices", n, tags={"symbol": "AB"[n % 2]})
        got = drain(sub)
        assert [e.offset for e in got] == [9, 10]
        # The reader saw offsets 9 and 10 only: 8 events were conflated away.
        assert sub.statistics().conflated == 8


async def test_more_keys_than_room_drop_the_oldest() -> None:
    drops = Recorder()
    async with Bus(on_drop=drops) as bus:
        sub = bus.subscribe(
            "prices", id="s", maxsize=3, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        events = [ticker(bus, symbol, 1) for symbol in "ABCDEF"]
        ticker(bus, "F", 2)
        ticker(bus, "G", 1)
        got = drain(sub)
        assert [(e.data["symbol"], e.data["price"]) for e in got] == [("E", 1), ("F", 2), ("G", 1)]
        letters = bus.dead_letters.list(subscriber="s")
        assert [letter.event for letter in letters] == events[:4]  # A to D: gone for good
        assert {letter.reason for letter in letters} == {"overflow_drop_oldest"}
        stats = sub.statistics()
        assert (stats.dropped, stats.conflated) == (4, 1)
        assert len(drops.calls) == 1  # reported once per episode
        accounted(sub, 8)


async def test_a_slow_ticker_client_stays_connected_and_current() -> None:
    # 100 instruments, a reader that takes a few events now and then: it is never
    # closed, its buffer stays bounded, and once drained it holds the latest price
    # of every instrument.
    rng = random.Random(3)
    async with Bus() as bus:
        fast = bus.subscribe("prices", maxsize=200_000)
        slow = bus.subscribe(
            "prices", maxsize=128, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        latest: dict[str, float] = {}
        seen: dict[str, float] = {}
        symbols = [f"S{i:03}" for i in range(100)]
        for n in range(20_000):
            symbol = rng.choice(symbols)
            latest[symbol] = n
            ticker(bus, symbol, n)
            if n % 500 == 0:
                for event in slow.get_nowait_batch(10):
                    seen[event.data["symbol"]] = event.data["price"]
            assert slow.buffered <= 128
        for event in drain(slow):
            seen[event.data["symbol"]] = event.data["price"]
        assert not slow.closed
        assert seen == latest
        assert len(drain(fast)) == 20_000
        stats = slow.statistics()
        assert stats.dropped == 0  # 100 keys fit in 128
        assert stats.delivered < 1_000
        accounted(slow, 20_000)


async def test_an_async_for_reader_is_woken_and_conflated() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(
            "prices", maxsize=2, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        received: list[tuple[str, float]] = []
        first = asyncio.Event()

        async def read() -> None:
            async for event in sub:
                received.append((event.data["symbol"], event.data["price"]))
                first.set()
                if event.data["price"] == 99:
                    return

        reader = asyncio.create_task(read())
        ticker(bus, "A", 0)
        await asyncio.wait_for(first.wait(), SAFETY)
        for n in range(1, 10):  # no await: the reader falls behind
            ticker(bus, "AB"[n % 2], n)
        ticker(bus, "A", 99)
        await asyncio.wait_for(reader, SAFETY)
        assert received == [("A", 0), ("B", 9), ("A", 99)]


async def test_a_resume_replays_the_newest_event_per_key() -> None:
    async with Bus(log="memory://", namespaces={"d": Namespace(history_size=100)}) as bus:
        first = await bus.publish("d:p", 0, tags={"symbol": "A"})
        for n in range(1, 10):
            await bus.publish("d:p", n, tags={"symbol": "AB"[n % 2]})
        assert first.epoch is not None
        sub = bus.subscribe(
            "d:p",
            maxsize=10,
            overflow=Overflow.CONFLATE,
            conflation_key="symbol",
            since=Position(first.offset or 0, first.epoch),
        )
        assert await sub.ready() is True
        assert [(e.data, e.offset) for e in drain(sub)] == [(8, 9), (9, 10)]
        assert sub.statistics().conflated == 7


async def test_a_redrive_into_a_conflating_subscriber_conflates() -> None:
    async with Bus() as bus:
        sub = bus.subscribe(
            "prices", id="s", maxsize=2, overflow=Overflow.CONFLATE, conflation_key="symbol"
        )
        for symbol in "ABC":
            ticker(bus, symbol, 1)
        assert [e.data["symbol"] for e in drain(sub)] == ["B", "C"]  # A dropped: 3 keys, room for 2
        ticker(bus, "A", 2)
        assert await bus.dead_letters.redrive(subscriber="s") == 1
        # The redriven A (price 1) is older than the buffered A (price 2), but it
        # arrived later: it is the one kept, at its place, newest.
        assert [(e.data["symbol"], e.data["price"]) for e in drain(sub)] == [("A", 1)]
        assert sub.statistics().conflated == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conflation_key": "symbol"}, "needs overflow=Overflow.CONFLATE"),
        ({"conflation_key": "symbol", "overflow": Overflow.DROP_OLDEST}, "needs overflow"),
        ({"conflation_key": "", "overflow": Overflow.CONFLATE}, "non-empty tag name"),
        ({"conflation_key": 3, "overflow": Overflow.CONFLATE}, "non-empty tag name"),
    ],
)
async def test_conflation_key_validation(kwargs: dict[str, object], message: str) -> None:
    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match=message):
            bus.subscribe("prices", **kwargs)  # type: ignore[arg-type]
        assert bus.subscribers() == []
        assert bus.topics() == []
