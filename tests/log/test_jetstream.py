"""The JetStream log beyond the contract: URLs, several writers, lost replies, take-backs,
long reads, the limits the server enforces, and topics the server forgets by itself."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from eventcast import ConfigurationError, Event, LogError
from eventcast.deadletters import DeadLetter
from eventcast.log import Retention, open_log
from eventcast.log.jetstream import JetStreamLog, split_url
from tests.conftest import RUN_ID
from tests.log.natstools import delete_streams, stream_names, subjects
from tests.scale.conftest import until

pytestmark = pytest.mark.nats

_prefixes = itertools.count()


def ev(topic: str, data: Any, **kwargs: Any) -> Event:
    return Event(topic=topic, data=data, **kwargs)


@pytest.fixture
async def target(nats_service: str) -> AsyncIterator[tuple[str, str]]:
    """A JetStream log URL with a prefix of this test's own, and that prefix."""
    prefix = f"ectest-{RUN_ID}-js{next(_prefixes)}"
    url = nats_service.replace("nats://", "nats+jetstream://", 1) + f"?prefix={prefix}"
    try:
        yield url, prefix
    finally:
        await delete_streams(nats_service, prefix)


@pytest.fixture
async def logs(target: tuple[str, str]) -> AsyncIterator[list[JetStreamLog]]:
    """Open logs on the target (append to the list); all closed afterwards."""
    opened: list[JetStreamLog] = []
    try:
        yield opened
    finally:
        for log in opened:
            await log.close()


async def open_js(url: str, logs: list[JetStreamLog], **kwargs: Any) -> JetStreamLog:
    log = JetStreamLog(url, **kwargs)
    await log.open()
    logs.append(log)
    return log


async def read_all(log: JetStreamLog, topic: str) -> list[Event]:
    out: list[Event] = []
    while page := await log.read(topic, after=out[-1].offset if out else 0, limit=97):
        out += page
    return out


# -- URLs --------------------------------------------------------------------------------


def test_urls() -> None:
    assert split_url("nats+jetstream://h1:4222,h2:4223?prefix=app-1&replicas=3") == (
        ["nats://h1:4222", "nats://h2:4223"],
        "app-1",
        3,
    )
    assert split_url("nats+jetstream+tls://u:p@h:4222") == (["tls://u:p@h:4222"], "eventcast", 1)
    log = open_log("nats+jetstream://127.0.0.1:4222?prefix=x")
    assert isinstance(log, JetStreamLog)
    assert "prefix='x'" in repr(log)
    assert "secret" not in repr(JetStreamLog("nats+jetstream://u:secret@h:4222"))


@pytest.mark.parametrize(
    "url",
    [
        "nats://h:4222",
        "nats+jetstream://",
        "nats+jetstream://h:4222?prefix=a_b",  # "_" separates the prefix in stream names
        "nats+jetstream://h:4222?prefix=a.b",
        "nats+jetstream://h:4222?prefix=",
        "nats+jetstream://h:4222?replicas=0",
        "nats+jetstream://h:4222?replicas=x",
        "nats+jetstream://h:4222?bogus=1",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        JetStreamLog(url)


async def test_an_unreachable_server_fails_open_with_a_log_error() -> None:
    from tests.server.hubtools import free_port

    log = JetStreamLog(f"nats+jetstream://127.0.0.1:{free_port()}", connect_timeout=0.5)
    with pytest.raises(LogError, match="could not open") as info:
        await log.open()
    assert info.value.__cause__ is not None
    await log.close()
    await log.close()


# -- several writers ------------------------------------------------------------------------


async def two_processes(
    url: str, logs: list[JetStreamLog], *, retention: int
) -> tuple[JetStreamLog, JetStreamLog]:
    """Two logs with connections of their own, keeping ``retention`` events per topic."""
    first, second = await open_js(url, logs), await open_js(url, logs)
    for log in (first, second):
        log.set_retention(lambda topic: Retention(size=retention))
    return first, second


async def test_two_processes_append_to_one_topic_without_gaps(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    # Two logs with connections of their own stand for two processes: their
    # publishes conflict on the topic's last sequence and are retried.
    first, second = await two_processes(target[0], logs, retention=10_000)

    async def writer(log: JetStreamLog, w: int) -> list[Event]:
        return [(await log.append([ev("shared", {"w": w, "i": i})]))[0] for i in range(25)]

    results = await asyncio.gather(*(writer((first, second)[w % 2], w) for w in range(8)))
    acked = {e.id: e.offset for events in results for e in events}
    stored = await read_all(first, "shared")
    assert [e.offset for e in stored] == list(range(1, 201))
    assert {e.id: e.offset for e in stored} == acked
    assert len({e.epoch for e in stored}) == 1
    for events in results:  # each writer saw its own appends in order
        assert [e.data["i"] for e in events] == list(range(25))
        assert [e.offset for e in events] == sorted(e.offset or 0 for e in events)


async def test_two_processes_creating_one_stream_at_once_both_append(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    # Both processes create a namespace's stream at the same moment. The
    # later creation could be refused for overlapping subjects, and a direct
    # get sent while the other's stream was not serving them yet went
    # unanswered (a 10 s timeout): about one round in a hundred failed.
    first, second = await two_processes(target[0], logs, retention=100)
    for round_ in range(200):
        topic = f"n{round_}:t"
        events = await asyncio.gather(first.append([ev(topic, 1)]), second.append([ev(topic, 2)]))
        assert sorted(e[0].offset or 0 for e in events) == [1, 2]


async def test_a_foreign_stream_on_the_subjects_is_still_a_conflict(
    target: tuple[str, str], logs: list[JetStreamLog], nats_service: str
) -> None:
    url, prefix = target
    log = await open_js(url, logs)
    nc = await nats.connect(nats_service)
    try:
        await nc.jetstream().add_stream(name=f"{prefix}_foreign", subjects=[f"{prefix}.ev.f.>"])
        with pytest.raises(LogError, match="subjects overlap"):
            await log.append([ev("f:t", 1)])
        assert await log.append([ev("other:t", 1)])  # other namespaces still work
    finally:
        await nc.close()


async def test_a_writer_that_keeps_losing_is_given_way(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    # Two "processes" appending flat out to one topic: the one that remembers
    # the head publishes once per round trip, the one that lost needs two, and
    # without giving way it lost 16 times in a row and failed (LogError) within
    # a second. Now each makes progress and neither fails.
    first, second = await two_processes(target[0], logs, retention=10**6)
    counts = [0, 0]
    stop = asyncio.Event()

    async def writer(index: int) -> None:
        log = (first, second)[index]
        while not stop.is_set():
            await log.append([ev("contended", {"w": index})])
            counts[index] += 1

    writers = [asyncio.ensure_future(writer(i % 2)) for i in range(8)]
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*writers)  # no LogError from either side
    assert min(counts) >= max(counts) / 5, counts
    assert first.asked_way + second.asked_way > 0
    stored = await read_all(first, "contended")
    assert [e.offset for e in stored] == list(range(1, sum(counts) + 1))


async def test_requests_to_give_way_are_bounded(
    target: tuple[str, str],
    logs: list[JetStreamLog],
    nats_service: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Requests for topics this process never appends to (whose asker died
    # before saying it was done) are forgotten once their pause is over and
    # room is needed; while every pause is live, a request beyond the bound
    # is ignored (it is a hint).
    url, prefix = target
    monkeypatch.setattr("eventcast.log.jetstream.GIVE_WAY_FOR", 0.5)
    log = await open_js(url, logs, max_topics=2)
    other = await nats.connect(nats_service)
    try:
        for topic in ("a", "b"):
            await other.publish(f"{prefix}.yield.~.{topic}", b"Yasker")
        await other.flush()
        await until(lambda: len(log._ways) == 2, "two requests noted")
        await other.publish(f"{prefix}.yield.~.c", b"Yasker")
        await other.flush()
        await asyncio.sleep(0.05)  # the first two are still live: c is ignored
        assert set(log._ways) == {f"{prefix}.yield.~.a", f"{prefix}.yield.~.b"}
        await asyncio.sleep(0.5)  # their pauses are over
        await other.publish(f"{prefix}.yield.~.d", b"Yasker")
        await other.flush()
        await until(lambda: f"{prefix}.yield.~.d" in log._ways, "d noted")
        assert set(log._ways) == {f"{prefix}.yield.~.d"}
    finally:
        await other.close()


async def test_concurrent_appends_are_packed_into_few_messages(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    log = await open_js(target[0], logs)
    results = await asyncio.gather(*(log.append([ev("burst", i)]) for i in range(100)))
    assert sorted(r[0].offset or 0 for r in results) == list(range(1, 101))
    assert log.commits < 50  # group commit: one message carries many appends
    assert [e.data for e in await read_all(log, "burst")] == [r[0].data for r in results]


async def test_a_lost_reply_is_not_committed_twice(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    url, _ = target
    log, other = await open_js(url, logs), await open_js(url, logs)
    await log.append([ev("t", 0)])
    publish = log._publish
    lost = [True, True]

    async def lose_the_reply(subject: str, body: bytes, headers: dict[str, str]) -> Any:
        ack = await publish(subject, body, headers)
        if ".ev." in subject and lost:
            lost.pop()
            if not lost:  # the second time, another writer also appends right after
                await other.append([ev("t", "other")])
            raise TimeoutError  # the message is stored, its acknowledgement is lost
        return ack

    log._publish = lose_the_reply  # type: ignore[method-assign]
    [first] = await log.append([ev("t", 1)])
    [second] = await log.append([ev("t", 2)])
    stored = await read_all(log, "t")
    assert [e.data for e in stored] == [0, 1, 2, "other"]
    assert [e.offset for e in stored] == [1, 2, 3, 4]
    assert (first.offset, second.offset) == (2, 3)


async def test_a_failed_multi_topic_append_is_taken_back(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    log = await open_js(target[0], logs)
    await log.append([ev("a", 1)])
    before = await log.position("a")
    publish = log._publish

    async def refuse_z(subject: str, body: bytes, headers: dict[str, str]) -> Any:
        if subject.endswith(".z"):
            headers = {**headers, "Nats-Expected-Stream": "no-such-stream"}
        return await publish(subject, body, headers)

    log._publish = refuse_z  # type: ignore[method-assign]
    # "a" is published first (topic order), then "z" is refused: "a" is taken back.
    with pytest.raises(LogError, match="expected stream"):
        await log.append([ev("a", 2), ev("a", 3), ev("z", 4)])
    assert await log.position("a") == before
    assert [e.data for e in await read_all(log, "a")] == [1]
    assert (await log.position("z")).offset == 0
    # A topic the failed append created is taken back entirely.
    with pytest.raises(LogError, match="expected stream"):
        await log.append([ev("b", 7), ev("z", 8)])
    assert (await log.position("b")).offset == 0
    assert await log.read("b") == []
    log._publish = publish  # type: ignore[method-assign]
    assert [e.offset for e in await log.append([ev("a", 5), ev("z", 6), ev("b", 9)])] == [2, 1, 1]
    assert [e.data for e in await read_all(log, "a")] == [1, 5]


async def test_a_take_back_never_leaves_a_gap(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    url, _ = target
    log, other = await open_js(url, logs), await open_js(url, logs)
    publish = log._publish

    async def refuse_z_after_another_writer(
        subject: str, body: bytes, headers: dict[str, str]
    ) -> Any:
        if subject.endswith(".z"):
            await other.append([ev("a", "other")])  # lands after this append's "a"
            headers = {**headers, "Nats-Expected-Stream": "no-such-stream"}
        return await publish(subject, body, headers)

    log._publish = refuse_z_after_another_writer  # type: ignore[method-assign]
    with pytest.raises(LogError, match="stays there"):
        await log.append([ev("a", 1), ev("z", 2)])
    # The message of "a" could not be taken back without a gap: it stays, and says so.
    stored = await read_all(log, "a")
    assert [(e.offset, e.data) for e in stored] == [(1, 1), (2, "other")]


# -- reading ---------------------------------------------------------------------------------


async def test_long_interleaved_streams_read_exactly(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    log = await open_js(target[0], logs)
    log.set_retention(lambda topic: Retention(size=10_000))
    scans = 0
    scan = log._scan

    def counting_scan(*args: Any) -> Any:
        nonlocal scans
        scans += 1
        return scan(*args)

    log._scan = counting_scan  # type: ignore[method-assign]
    # One message per event, two topics interleaved (and a pack of 50 in the middle):
    # offsets and sequences differ, so every read has to search.
    for i in range(1, 151):
        await log.append([ev("x", i)])
        await log.append([ev("y", -i)])
        if i == 75:
            await log.append([ev("x", f"p{j}") for j in range(50)])
    xs = await read_all(log, "x")
    assert [e.offset for e in xs] == list(range(1, 201))
    assert scans > 0  # pages of 97 messages went through a consumer
    for after in (0, 1, 74, 75, 100, 124, 125, 126, 199, 200):
        page = await log.read("x", after=after, limit=7)
        assert [e.offset for e in page] == list(range(after + 1, min(after + 7, 200) + 1))
    assert [e.offset for e in await log.read("x", before=130, limit=6, reverse=True)] == list(
        range(129, 123, -1)
    )
    assert [e.data for e in await log.read("y", after=149)] == [-150]
    # No consumer is left behind on the server.
    nc = await nats.connect(target[0].replace("nats+jetstream://", "nats://").partition("?")[0])
    try:
        js = nc.jetstream()

        async def no_consumer() -> bool:
            return not (await js.stream_info(f"{target[1]}_ev_~")).state.consumer_count

        await until(no_consumer, "the read's consumers to be deleted")
    finally:
        await nc.close()


# -- limits on the server ----------------------------------------------------------------------


async def test_the_server_enforces_each_namespace_retention(
    target: tuple[str, str], logs: list[JetStreamLog], nats_service: str
) -> None:
    url, prefix = target
    log = await open_js(url, logs, dedup_window=60)
    log.set_retention(
        lambda topic: Retention(size=3, ttl=30) if topic.startswith("s:") else (Retention(size=100))
    )
    assert await stream_names(nats_service, prefix) == [f"{prefix}_dl", f"{prefix}_meta"]
    await log.position("s:never")  # reading creates nothing
    assert await stream_names(nats_service, prefix) == [f"{prefix}_dl", f"{prefix}_meta"]
    for i in range(5):
        await log.append([ev("s:t", i)])
    await log.append([ev("plain", 1)])
    nc = await nats.connect(nats_service)
    try:
        js = nc.jetstream()
        small = (await js.stream_info(f"{prefix}_ev_s")).config
        # One message more than the retention: room for a marker (see the module).
        assert (small.max_msgs_per_subject, small.max_age, small.duplicate_window) == (4, 30, 30)
        assert (await js.stream_info(f"{prefix}_ev_s")).state.messages == 4
        plain = (await js.stream_info(f"{prefix}_ev_~")).config
        assert (plain.max_msgs_per_subject, plain.max_age) == (101, 0)
        assert plain.duplicate_window == 60
        # A topic of the namespace that keeps more widens the stream's limits.
        log.set_retention(lambda topic: Retention(size=50))
        await log.append([ev("s:t", 5)])
        wide = (await js.stream_info(f"{prefix}_ev_s")).config
        assert (wide.max_msgs_per_subject, wide.max_age) == (51, 0)
    finally:
        await nc.close()


async def test_a_topic_the_server_expires_comes_back_under_a_new_epoch(
    target: tuple[str, str], logs: list[JetStreamLog], nats_service: str
) -> None:
    url, prefix = target
    log = await open_js(url, logs)
    log.set_retention(lambda topic: Retention(size=10, ttl=0.5))
    empty = await log.position("brief")
    [event] = await log.append([ev("brief", 1)])
    assert (event.offset, event.epoch) == (1, empty.epoch)

    # The server drops the message at max_age, and with it all the topic's state.
    async def expired() -> bool:
        return not await subjects(nats_service, f"{prefix}_ev_~")

    await until(expired, "the server to expire the topic's message")
    after = await log.position("brief")
    assert after.offset == 0
    assert after.epoch != empty.epoch  # the birth claimed the old empty epoch
    [again] = await log.append([ev("brief", 2)])
    assert (again.offset, again.epoch) == (1, after.epoch)


async def test_dead_letters_are_bounded(target: tuple[str, str], logs: list[JetStreamLog]) -> None:
    log = await open_js(target[0], logs, dead_letters=3)
    letters = [
        DeadLetter(event=ev(f"dl.{n}", n), subscriber="s", reason="r", attempts=1, id=n)
        for n in range(1, 6)
    ]
    await log.save_dead_letters(letters)
    assert [d.id for d in await log.load_dead_letters(10)] == [3, 4, 5]
    assert [d.event.data for d in await log.load_dead_letters(2)] == [4, 5]


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelled_appends_and_close_leave_no_gap_and_no_hang(
    target: tuple[str, str], logs: list[JetStreamLog]
) -> None:
    url, _ = target
    log = await open_js(url, logs)
    tasks = [asyncio.create_task(log.append([ev("c", i)])) for i in range(60)]
    await asyncio.sleep(0)  # let them queue behind the topic's writer
    for task in tasks[::2]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    acked = [r[0] for r in done if isinstance(r, list)]
    assert len(acked) >= 30  # every append not cancelled was committed
    # A cancelled append is committed or not, never half: offsets have no gap.
    stored = await read_all(log, "c")
    assert [e.offset for e in stored] == list(range(1, len(stored) + 1))
    assert {e.id for e in acked} <= {e.id for e in stored}
    # Closing while appends are queued: each ends (committed or LogError), none hangs.
    pending = [asyncio.create_task(log.append([ev("c", f"late {i}")])) for i in range(20)]
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await log.close()
        results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, list | LogError) for r in results)
    await log.close()  # idempotent
    with pytest.raises(LogError):
        await log.append([ev("c", "after close")])
    other = await open_js(url, logs)
    after = await read_all(other, "c")
    assert [e.offset for e in after] == list(range(1, len(after) + 1))
    committed = {r[0].id for r in results if isinstance(r, list)}
    assert committed <= {e.id for e in after}
