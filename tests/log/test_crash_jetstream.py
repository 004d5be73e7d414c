"""Crash safety of the JetStream log: writers killed with SIGKILL mid-append lose nothing acked.

One child process appends from several tasks at once and is killed with
publishes in flight. Then two processes append to the same topic at once (their
publishes conflict and are retried) and one is killed while the other goes on.
Afterwards every acknowledged offset is stored with its event, offsets are
exactly 1..top, and the log carries on from top under the same epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from eventcast.log.jetstream import JetStreamLog
from tests.conftest import RUN_ID
from tests.log.crashtools import Child, check_survivors
from tests.log.natstools import delete_streams

pytestmark = pytest.mark.nats

ACKS = 300
WRITERS = 4

_prefixes = itertools.count()


@pytest.fixture
async def js_target(nats_service: str) -> AsyncIterator[str]:
    prefix = f"ectest-{RUN_ID}-crash{next(_prefixes)}"
    yield nats_service.replace("nats://", "nats+jetstream://", 1) + f"?prefix={prefix}"
    await delete_streams(nats_service, prefix)


async def _survivors(url: str, children: list[Child]) -> None:
    log = JetStreamLog(url)
    await log.open()
    try:
        await check_survivors(log, children, WRITERS)
    finally:
        await log.close()


async def test_jetstream_acknowledged_appends_survive_sigkill(js_target: str) -> None:
    child = await Child.start(js_target, "solo", WRITERS)
    try:
        await child.read_acks(ACKS)
    finally:
        await child.kill()
    await _survivors(js_target, [child])


async def test_a_writer_killed_beside_another_loses_nothing_acknowledged(js_target: str) -> None:
    first = await Child.start(js_target, "first", WRITERS)
    second = await Child.start(js_target, "second", WRITERS)
    try:
        await first.read_acks(ACKS // 2)
        await second.read_acks(ACKS // 2)
        await first.kill()  # mid-append, while the other process keeps appending
        await second.read_acks(ACKS // 2)
    finally:
        await first.kill()
        await second.kill()
    await _survivors(js_target, [first, second])
