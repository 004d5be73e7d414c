"""Crash safety of the Redis log: a writer killed with SIGKILL mid-stream loses nothing acked.

The child appends as fast as it can from several tasks at once (so that it is
killed with scripts in flight) and prints each acknowledged append. After the
kill every acknowledged offset must be stored with its event, offsets must be
exactly 1..top, and the log must carry on from top under the same epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import redis

from eventcast import Event, LogError
from eventcast.log.redis import RedisStreamsLog
from tests.conftest import RUN_ID
from tests.log.crashtools import Child, check_survivors

pytestmark = pytest.mark.redis

ACKS = 300
WRITERS = 4

_prefixes = itertools.count()


@pytest.fixture
def redis_target(redis_service: str) -> Iterator[str]:
    prefix = f"ectest:{RUN_ID}:crash{next(_prefixes)}"
    yield f"{redis_service}?prefix={prefix}"
    with redis.Redis.from_url(redis_service) as client:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


async def test_redis_acknowledged_appends_survive_sigkill(redis_target: str) -> None:
    child = await Child.start(redis_target, "solo", WRITERS)
    try:
        await child.read_acks(ACKS)
    finally:
        await child.kill()
    log = RedisStreamsLog(redis_target)
    await log.open()
    try:
        await check_survivors(log, [child], WRITERS)
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
