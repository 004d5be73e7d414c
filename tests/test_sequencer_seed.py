"""Concurrent local publishes that return from the log out of order, on a topic just subscribed.

Found by the chaos harness (``redis-log-churn``, one node, Redis Streams log):
every client of a fresh channel missed offset 1. Two publishes were in flight;
offset 2's returned from the log first, and the sequencer, tracking the topic
from the first event it saw, took offset 1 for delivered already and dropped it.
A topic's tracking now starts where a reader's replay put it (``Bus.replay``),
so offset 2 is held while offset 1 is read from the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from eventcast import Bus, Event, LogError, Namespace, Position, _sequencer as sequencer_module

WAIT = 10.0


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_later_offset_returned_first_does_not_hide_the_earlier(
    kind: str, tmp_path: Path
) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/events.db"
    async with Bus(log=url, namespaces={"": Namespace(history_size=100)}) as bus:
        log = bus.log
        assert log is not None
        sub = bus.subscribe("fresh")
        replay = await bus.replay("fresh", None)  # what a hub does before it answers
        assert replay.position.offset == 0

        # The first append commits (offset 1) and then waits; the second commits
        # (offset 2) and returns at once: offset 2 reaches the bus first.
        # (What the bus awaits for a plain durable publish: the commit, then the
        # fan-out, ``then``.)
        append = log._appending
        gate = asyncio.Event()
        first = True

        async def out_of_order(event: Event, then: Callable[[list[Event]], object]) -> Event:
            nonlocal first
            mine, first = first, False
            committed = await append((event,))
            if mine:
                await gate.wait()
            then(committed)
            return committed[0]

        log._append_then = out_of_order  # type: ignore[method-assign]
        one = asyncio.ensure_future(bus.publish("fresh", 1))
        await asyncio.sleep(0.05)
        two = await bus.publish("fresh", 2)
        assert two.offset == 2
        gate.set()
        assert (await one).offset == 1
        got = []
        async with asyncio.timeout(WAIT):
            while len(got) < 2:
                got.append((await sub.get()).offset)
        assert got == [1, 2]
        await asyncio.sleep(0.05)
        assert sub.buffered == 0  # and offset 1 once only


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_an_event_the_head_read_saw_before_its_fan_out_still_reaches_every_reader(
    kind: str, tmp_path: Path
) -> None:
    """A replay seeds a fresh topic at a head that holds an event not fanned out yet.

    Found looping ``test_resume_beyond_the_replay_cap_is_not_recovered``: the
    seed took the event for delivered, so readers the replay did not give it
    to (a reader that was not recovered, a plain subscriber) never got it.
    """
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/events.db"
    async with Bus(log=url, namespaces={"": Namespace(history_size=100)}) as bus:
        log = bus.log
        assert log is not None
        plain = bus.subscribe("fresh")  # the topic is not tracked yet
        append = log._appending
        gate = asyncio.Event()
        stored = asyncio.Event()

        async def late_fan_out(event: Event, then: Callable[[list[Event]], object]) -> Event:
            committed = await append((event,))
            stored.set()
            await gate.wait()  # committed: the log's head has it; not fanned out yet
            then(committed)
            return committed[0]

        original = log._append_then
        log._append_then = late_fan_out  # type: ignore[method-assign]
        one = asyncio.ensure_future(bus.publish("fresh", 1))
        await asyncio.wait_for(stored.wait(), WAIT)
        head = await bus.position("fresh")
        assert head.offset == 1
        epoch = head.epoch
        other = "0" * 8 if epoch != "0" * 8 else "1" * 8
        lost = bus.subscribe("fresh", since=Position(1, other))  # not recovered
        exact = bus.subscribe("fresh", since=Position(0, epoch))  # replays offset 1
        assert await asyncio.wait_for(lost.ready(), WAIT) is False
        assert await asyncio.wait_for(exact.ready(), WAIT) is True
        gate.set()
        first = await asyncio.wait_for(one, WAIT)
        log._append_then = original  # type: ignore[method-assign]
        two = await bus.publish("fresh", 2)
        late_echo = first  # offset 1 again, after the stream passed the head
        bus._sequencer.deliver(late_echo)
        for sub in (plain, lost, exact):
            got: list[Event] = []
            async with asyncio.timeout(WAIT):
                while len(got) < 2:
                    got.append(await sub.get())
            assert got == [first, two], sub.id
            await asyncio.sleep(0.01)
            assert sub.buffered == 0  # each once


async def test_more_owed_events_than_it_can_tell_apart_are_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sequencer_module, "PENDING_LIMIT", 2)
    async with Bus(log="memory://", namespaces={"": Namespace(history_size=100)}) as bus:
        gaps: list[tuple[str, bool]] = []
        bus.gap_listeners.append(lambda topic, durable: gaps.append((topic, durable)))
        sub = bus.subscribe("t")
        bus._sequencer.seed("t", 5, "e1")
        owed = [Event(topic="t", data=i, offset=i, epoch="e1") for i in (1, 2, 3)]
        for event in owed:
            bus._sequencer.deliver(event)
        assert gaps == [("t", True)]  # the third could not be told apart: recover
        assert [sub.get_nowait(), sub.get_nowait(), sub.get_nowait()] == [*owed[:2], None]
        bus._sequencer.deliver(owed[0])  # the window is closed: a repeat is dropped
        assert sub.get_nowait() is None


async def test_an_owed_event_held_behind_a_gap_the_log_cannot_fill_is_still_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Bus(log="memory://", namespaces={"": Namespace(history_size=100)}) as bus:
        log = bus.log
        assert log is not None
        gaps: list[tuple[str, bool]] = []
        bus.gap_listeners.append(lambda topic, durable: gaps.append((topic, durable)))
        sub = bus.subscribe("t")
        bus._sequencer.seed("t", 5, "e1")

        reading, fail = asyncio.Event(), asyncio.Event()

        async def unreadable(*args: object, **kwargs: object) -> list[Event]:
            reading.set()
            await fail.wait()
            raise LogError("the log is down")

        monkeypatch.setattr(log, "read", unreadable)
        late = Event(topic="t", data=7, offset=7, epoch="e1")  # 6 is missing: held
        owed = Event(topic="t", data=4, offset=4, epoch="e1")  # committed before the seed
        bus._sequencer.deliver(late)
        await asyncio.wait_for(reading.wait(), WAIT)
        bus._sequencer.deliver(owed)  # comes while the gap is read: held too
        fail.set()
        async with asyncio.timeout(WAIT):
            assert [await sub.get(), await sub.get()] == [owed, late]
        assert gaps == [("t", True)]  # 6 could not be read: the readers recover
        bus._sequencer.deliver(owed)  # past the head now: a repeat is dropped
        await asyncio.sleep(0.01)
        assert sub.get_nowait() is None
