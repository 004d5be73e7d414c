"""Crash safety of the Redis log: a writer killed with SIGKILL mid-stream loses nothing acked.

The child appends as fast as it can from several tasks at once (so that it is
killed with scripts in flight) and prints each acknowledged append. After the
kill every acknowledged offset must be stored with its event, offsets must be
exactly 1..top, and the log must carry on from top under the same epoch.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import textwrap
from collections.abc import Iterator

import pytest
import redis

from eventcast import Event, LogError
from eventcast.log import Retention
from eventcast.log.redis import RedisStreamsLog
from tests.conftest import RUN_ID

pytestmark = pytest.mark.redis

ACKS = 300
WRITERS = 4

#: Each writer task appends one event at a time, and prints
#: "offset writer i id" once the append returned (it is acknowledged), forever.
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from eventcast import Event
    from eventcast.log import Retention
    from eventcast.log.redis import RedisStreamsLog

    async def writer(log, w):
        i = 0
        while True:
            [event] = await log.append(
                [Event(topic="crash", data={"w": w, "i": i, "pad": "x" * 200},
                       tags={"i": str(i)})]
            )
            print(event.offset, w, i, event.id, event.epoch, flush=True)
            i += 1

    async def main(url, writers):
        log = RedisStreamsLog(url)
        await log.open()
        log.retention = lambda topic: Retention(size=10**9)
        await asyncio.gather(*(writer(log, w) for w in range(writers)))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)

_prefixes = itertools.count()


@pytest.fixture
def redis_target(redis_service: str) -> Iterator[str]:
    prefix = f"ectest:{RUN_ID}:crash{next(_prefixes)}"
    yield f"{redis_service}?prefix={prefix}"
    with redis.Redis.from_url(redis_service) as client:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


async def _crash_child(url: str) -> list[tuple[int, int, int, str, str]]:
    """Run the child until it acknowledged ACKS appends, SIGKILL it, return the acks."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        url,
        str(WRITERS),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    acks: list[tuple[int, int, int, str, str]] = []
    try:
        async with asyncio.timeout(90):  # a guard against a stuck child
            while len(acks) < ACKS:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError(f"child exited: {(await proc.stderr.read()).decode()}")
                offset, w, i, event_id, epoch = line.decode().split()
                acks.append((int(offset), int(w), int(i), event_id, epoch))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return acks


async def test_redis_acknowledged_appends_survive_sigkill(redis_target: str) -> None:
    acks = await _crash_child(redis_target)
    # Concurrent writers: each one's acks are in increasing offset order.
    for w in range(WRITERS):
        mine = [offset for offset, writer, _, _, _ in acks if writer == w]
        assert mine == sorted(mine)
    assert len({offset for offset, *_ in acks}) == len(acks)
    epochs = {epoch for *_, epoch in acks}
    assert len(epochs) == 1

    log = RedisStreamsLog(redis_target)
    await log.open()
    try:
        log.retention = lambda topic: Retention(size=10**9)
        stored: list[Event] = []
        after = 0
        while page := await log.read("crash", after=after, limit=250):
            stored += page
            after = page[-1].offset or 0
        position = await log.position("crash")
        top = position.offset
        # Offsets are exactly 1..top: no gap, no duplicate, nothing half-written.
        assert [e.offset for e in stored] == list(range(1, top + 1))
        assert top >= len(acks)
        assert position.epoch in epochs
        by_offset = {e.offset: e for e in stored}
        for offset, w, i, event_id, epoch in acks:
            event = by_offset[offset]
            assert event.id == event_id
            assert event.epoch == epoch
            assert event.data == {"w": w, "i": i, "pad": "x" * 200}
            assert dict(event.tags) == {"i": str(i)}
        # Each writer's events are stored in the order it appended them, without gaps.
        for w in range(WRITERS):
            mine = [e.data["i"] for e in stored if e.data["w"] == w]
            assert mine == list(range(len(mine)))
        [event] = await log.append([Event(topic="crash", data="after")])
        assert event.offset == top + 1
        assert event.epoch == position.epoch
    finally:
        await log.close()


async def test_failed_script_writes_nothing(redis_target: str) -> None:
    """A batch the server rejects leaves no trace: no meta hash, no counter, no entry."""
    prefix = redis_target.partition("prefix=")[2]
    log = RedisStreamsLog(redis_target)
    await log.open()
    try:
        await log.append([Event(topic="a", data=1)])
        with redis.Redis.from_url(redis_target.partition("?")[0]) as client:
            # A topic never written whose stream key holds a hash: XADD would fail.
            client.hset(f"{prefix}:stream:b", "not", "a stream")
            before = {k: client.type(k) for k in client.scan_iter(f"{prefix}:*")}
            with pytest.raises(LogError) as raised:
                await log.append(
                    [
                        Event(topic="new", data=2, idempotency_key="fine"),
                        Event(topic="a", data=3),
                        Event(topic="b", data=4),
                    ]
                )
            assert raised.value.__cause__ is not None
            after = {k: client.type(k) for k in client.scan_iter(f"{prefix}:*")}
            assert after == before  # no meta hash, stream or key for "new"
            assert client.hget(f"{prefix}:meta:a", "top") == b"1"
            assert client.xlen(f"{prefix}:stream:a") == 1
        assert [e.offset for e in await log.append([Event(topic="a", data=5)])] == [2]
    finally:
        await log.close()


async def test_a_retried_append_is_not_committed_twice(redis_target: str) -> None:
    """redis-py retries a command whose reply was lost: the same call returns the same result."""
    log = RedisStreamsLog(redis_target)
    await log.open()
    try:
        items = [
            ("r", "id-1", 1.5, b'"x"', False, None, None),
            ("r", "id-2", 2.5, b'"y"', False, b'{"t":"1"}', "k"),
            ("s", "id-3", 3.5, b"raw", True, None, None),
        ]
        keys, args = log._append_call(items, "token-1")
        first = await log._script("append", "append", keys, args)
        again = await log._script("append", "append", keys, args)  # the "retry"
        assert [int(r[0]) for r in first[1]] == [int(r[0]) for r in again[1]] == [1, 2, 1]
        assert again[0] == first[0]
        assert [e.id for e in await log.read("r")] == ["id-1", "id-2"]
        assert [e.id for e in await log.read("s")] == ["id-3"]
        # A new call (a new token) is a new append.
        keys, args = log._append_call(items[:1], "token-2")
        third = await log._script("append", "append", keys, args)
        assert int(third[1][0][0]) == 3
        # And the client retries connection errors and timeouts with the asyncio Retry.
        from redis.asyncio.retry import Retry
        from redis.exceptions import ConnectionError, TimeoutError

        client = log._client
        assert client is not None
        retry = client.connection_pool.connection_kwargs["retry"]
        assert isinstance(retry, Retry)
        assert {ConnectionError, TimeoutError} <= set(retry._supported_errors)
    finally:
        await log.close()
