"""Resuming with ``since=`` while publishers race: no gap and no duplicate at the handoff.

Several publisher tasks publish continuously to one durable topic while
subscribers join at random moments with ``since=`` at random positions (some
taken before the race started, some at the head, some ``"earliest"``). Each
subscriber must then receive exactly the offsets ``since + 1 … final`` (or,
when ``recovered`` is False, a contiguous run from its first live event to the
final offset), and exactly the events the log stored under those offsets.

Nothing here waits on the clock: subscribers join when the publishers have
reached a given count (an ``asyncio.Condition``), and every consumer stops on
the last event, published after every subscriber has joined.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings, strategies as st

from eventcast import EARLIEST, Bus, Event, Namespace, Position, Subscription
from tests.conftest import RUN_ID

SAFETY = 30.0  # a safety net only: every wait ends on an event long before
TOPIC = "d:race"
END = "end"

_schemas = itertools.count()


@dataclass(frozen=True)
class Joiner:
    """One subscriber of a race.

    Attributes:
        at: joins once this many events were published during the race.
        since: ``"earliest"``, ``"head"`` (the position read just before
            subscribing), ``("pre", i)`` (the i-th position taken before the
            race) or ``("back", n)`` (n offsets behind the head).
    """

    at: int
    since: object


@dataclass
class Outcome:
    joiner: Joiner
    since: int  # the offset resumed after (0 for earliest)
    recovered: bool | None = None
    events: list[Event] = field(default_factory=list)


@contextlib.asynccontextmanager
async def open_bus(kind: str, where: str | None, replay_cap: int) -> AsyncIterator[Bus]:
    """A bus on ``memory://``, on SQLite in the directory ``where``, or on the URL ``where``."""
    namespaces = {"d": Namespace(history_size=100_000)}
    if kind == "memory":
        log = "memory://"
    elif kind == "sqlite":
        # NORMAL: a commit is still durable against a crash of the process,
        # and the race runs many of them.
        log = f"sqlite:///{Path(str(where)) / 'race.db'}?synchronous=NORMAL"
    else:
        assert where is not None
        log = where
    async with Bus(log=log, namespaces=namespaces, replay_cap=replay_cap) as bus:
        yield bus


async def race(
    bus: Bus,
    *,
    rng: random.Random,
    before: int,
    publishers: int,
    per_publisher: int,
    joiners: list[Joiner],
    writers: list[Bus] | None = None,
) -> tuple[list[Outcome], list[Event]]:
    """Run one race on ``bus``; return each subscriber's outcome and the stored stream.

    Publisher ``p`` publishes on ``writers[p % len(writers)]`` (default: ``bus``
    alone); the subscribers are all on ``bus``, which learns of what another
    writer published only from the log.
    """
    writers = writers or [bus]
    start = await bus.position(TOPIC)  # a fresh stream: offset 0
    assert start.offset == 0
    pre = [start]
    for i in range(before):
        position = (await bus.publish(TOPIC, ["pre", i])).position
        assert position is not None
        pre.append(position)
    progress = asyncio.Condition()
    published = 0

    async def publisher(p: int) -> None:
        nonlocal published
        writer = writers[p % len(writers)]
        for i in range(per_publisher):
            await writer.publish(TOPIC, [p, i])
            async with progress:
                published += 1
                progress.notify_all()
            await asyncio.sleep(0)  # a yield, so the in-memory log interleaves too

    async def consume(sub: Subscription, outcome: Outcome) -> None:
        while True:
            event = await sub.get()
            outcome.events.append(event)
            if event.data == END:
                return

    async def joiner(j: Joiner) -> tuple[Outcome, asyncio.Task[None]]:
        async with progress:
            await progress.wait_for(lambda: published >= j.at)
        since: Position | str
        if j.since == EARLIEST:
            since = EARLIEST
            offset = 0
        elif j.since == "head":
            since = await bus.position(TOPIC)
            offset = since.offset
        elif isinstance(j.since, tuple) and j.since[0] == "pre":
            position = pre[min(j.since[1], len(pre) - 1)]
            since, offset = position, position.offset
        else:
            assert isinstance(j.since, tuple)
            head = await bus.position(TOPIC)
            offset = max(0, head.offset - j.since[1])
            since = Position(offset, head.epoch)
        sub = bus.subscribe(TOPIC, since=since, maxsize=1_000_000)
        outcome = Outcome(j, offset)
        task = asyncio.create_task(consume(sub, outcome))
        outcome.recovered = await sub.ready()
        return outcome, task

    rng.shuffle(joiners)
    runners = [asyncio.create_task(publisher(p)) for p in range(publishers)]
    joined = await asyncio.gather(*(joiner(j) for j in joiners))
    await asyncio.gather(*runners)
    end = await bus.publish(TOPIC, END)
    async with asyncio.timeout(SAFETY):
        await asyncio.gather(*(task for _, task in joined))
    assert end.offset == before + publishers * per_publisher + 1
    stored = (await bus.history(TOPIC, limit=100_000)).events
    assert [e.offset for e in stored] == list(range(1, end.offset + 1))
    return [outcome for outcome, _ in joined], stored


def check(outcomes: list[Outcome], stored: list[Event]) -> None:
    final = stored[-1].offset
    assert final is not None
    by_offset = {e.offset: e for e in stored}
    for outcome in outcomes:
        got = [e.offset for e in outcome.events]
        assert outcome.recovered is not None, outcome.joiner
        assert got, outcome.joiner
        if outcome.recovered:
            first = outcome.since + 1
        else:
            first = got[0]
            assert first is not None
            assert first > outcome.since, outcome.joiner
            assert outcome.joiner.since != EARLIEST
        assert got == list(range(first, final + 1)), (outcome.joiner, outcome.since, got[:20])
        # Exactly the stored events, not merely the right numbers.
        assert [e.id for e in outcome.events] == [by_offset[o].id for o in got]
        assert [e.data for e in outcome.events] == [by_offset[o].data for o in got]
        epochs = {e.epoch for e in outcome.events}
        assert epochs == {stored[0].epoch}


def joiners_for(rng: random.Random, n: int, total: int, before: int) -> list[Joiner]:
    kinds: list[object] = [
        EARLIEST,
        "head",
        ("pre", 0),
        ("pre", before),
        ("pre", before // 2),
        ("back", 1),
        ("back", 7),
        ("back", 40),
        ("back", 400),
    ]
    return [Joiner(rng.randint(0, total), rng.choice(kinds)) for _ in range(n)]


# -- stress ----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    kind = request.param
    if kind == "memory":
        yield kind, None
    elif kind == "sqlite":
        yield kind, str(tmp_path)
    elif kind == "redis":
        url = request.getfixturevalue("redis_service")
        prefix = f"ecrace-{RUN_ID}-{next(_schemas)}"
        try:
            yield kind, f"{url}?prefix={prefix}"
        finally:
            client = redis.Redis.from_url(url)
            try:
                keys = list(client.scan_iter(match=f"{prefix}*"))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()
    else:
        url = request.getfixturevalue("postgres_service")
        schema = f"ecrace_{RUN_ID}_{next(_schemas)}"
        try:
            yield kind, f"{url}?schema={schema}"
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize("replay_cap", [100_000, 60])
async def test_resume_while_publishers_race(
    backend: tuple[str, str | None], replay_cap: int
) -> None:
    kind, where = backend
    rng = random.Random(f"{kind}-{replay_cap}")
    publishers, per_publisher, before = 6, 150, 30
    joiners = joiners_for(rng, 40, publishers * per_publisher, before)
    async with open_bus(kind, where, replay_cap) as bus:
        outcomes, stored = await race(
            bus,
            rng=rng,
            before=before,
            publishers=publishers,
            per_publisher=per_publisher,
            joiners=joiners,
        )
    check(outcomes, stored)
    recovered = [o.recovered for o in outcomes]
    assert True in recovered
    assert all(o.recovered for o in outcomes if o.joiner.since == EARLIEST)
    if replay_cap == 60:
        # ("back", 400) and the oldest positions are past the cap.
        assert False in recovered
    else:
        assert all(recovered)


@pytest.mark.parametrize("replay_cap", [100_000, 60])
async def test_resume_while_another_writer_races(
    backend: tuple[str, str | None], replay_cap: int
) -> None:
    # A second bus on the same log publishes too (for PostgreSQL, a second
    # PostgresLog on the schema, as another process would; for memory and
    # SQLite, the same log instance). The subscribers' bus sees those events
    # only through the log, when it fills the gap before its own next event:
    # the log is then ahead of its live stream, and a resume must still hand
    # over with no duplicate.
    kind, where = backend
    rng = random.Random(f"two-{kind}-{replay_cap}")
    publishers, per_publisher, before = 6, 120, 30
    joiners = joiners_for(rng, 30, publishers * per_publisher, before)
    async with contextlib.AsyncExitStack() as stack:
        bus = await stack.enter_async_context(open_bus(kind, where, replay_cap))
        if kind == "postgres":
            other = await stack.enter_async_context(open_bus(kind, where, replay_cap))
        else:
            namespaces = {"d": Namespace(history_size=100_000)}
            other = Bus(log=bus.log, namespaces=namespaces, replay_cap=replay_cap)
            await stack.enter_async_context(other)
        outcomes, stored = await race(
            bus,
            rng=rng,
            before=before,
            publishers=publishers,
            per_publisher=per_publisher,
            joiners=joiners,
            writers=[bus, other],
        )
    check(outcomes, stored)
    assert {e.data[0] for e in stored if isinstance(e.data, list)} >= {0, 1}
    assert all(o.recovered for o in outcomes if o.joiner.since == EARLIEST)


# -- property ------------------------------------------------------------------------------------

joiner_strategy = st.builds(
    Joiner,
    at=st.integers(0, 60),
    since=st.one_of(
        st.just(EARLIEST),
        st.just("head"),
        st.tuples(st.just("pre"), st.integers(0, 20)),
        st.tuples(st.just("back"), st.integers(0, 30)),
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["memory", "memory", "sqlite"]),
    publishers=st.integers(1, 4),
    per_publisher=st.integers(0, 15),
    before=st.integers(0, 10),
    replay_cap=st.integers(0, 25),
    joiners=st.lists(joiner_strategy, min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_resume_under_racing_property(
    kind: str,
    publishers: int,
    per_publisher: int,
    before: int,
    replay_cap: int,
    joiners: list[Joiner],
    seed: int,
) -> None:
    total = publishers * per_publisher
    joiners = [Joiner(min(j.at, total), j.since) for j in joiners]

    async def main(where: str | None) -> tuple[list[Outcome], list[Event]]:
        async with open_bus(kind, where, replay_cap) as bus:
            return await race(
                bus,
                rng=random.Random(seed),
                before=before,
                publishers=publishers,
                per_publisher=per_publisher,
                joiners=joiners,
            )

    with tempfile.TemporaryDirectory() as directory:
        outcomes, stored = asyncio.run(main(directory if kind == "sqlite" else None))
    check(outcomes, stored)
    for outcome in outcomes:
        if outcome.joiner.since == EARLIEST:
            assert outcome.recovered is True


async def test_resume_inside_the_commit_window_gives_no_duplicate(
    backend: tuple[str, str | None],
) -> None:
    """The log commits N before the publisher fans it out: a resume in between replays N,
    and the late live copy of N is never given again (see eventcast.replay)."""
    kind, where = backend
    async with open_bus(kind, where, 100) as bus:
        log = bus.log
        assert log is not None
        first = await bus.publish(TOPIC, 1)
        committed = asyncio.Event()
        gate = asyncio.Event()
        append = log._appending
        # What the bus awaits for a plain durable publish: the commit, then the
        # fan-out (``then``), held apart here.
        append_then = log._append_then

        async def delayed(event: Event, then: Any) -> Event:
            stored = await append((event,))
            committed.set()
            await gate.wait()
            then(stored)
            return stored[0]

        log._append_then = delayed  # type: ignore[method-assign]
        publishing = asyncio.ensure_future(bus.publish(TOPIC, 2))
        async with asyncio.timeout(SAFETY):
            await committed.wait()
        log._append_then = append_then  # type: ignore[method-assign]
        assert first.position is not None
        async with bus.subscribe(TOPIC, since=first.position) as sub:
            assert sub.recovered is True
            gate.set()
            await publishing
            await bus.publish(TOPIC, 3)
            got = [await asyncio.wait_for(sub.get(), SAFETY) for _ in range(2)]
            assert [e.offset for e in got] == [2, 3]
            assert sub.get_nowait() is None
