"""Exactly-once effect across a crash: ``eventcast serve`` SIGKILLed in mid-consumption.

For every source: a producer writes N messages at a steady pace while a real
hub process consumes them into a durable channel; the hub is killed with
SIGKILL once part of them is published, and started again. The channel's
history then holds every message exactly once, in order: 0 lost (nothing was
acknowledged before its commit) and 0 duplicated (the redelivered ones carry
the same idempotency key).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.hubtools import API_KEY, WAIT, free_port
from tests.server.ssetools import HubProcess

from .conftest import eventually
from .sources import Source, source

pytestmark = pytest.mark.slow

#: Messages per source, and how many must be published before the kill.
N = 600
KILL_AFTER = 150


def write_config(directory: Path) -> Path:
    path = directory / "eventcast.toml"
    path.write_text(
        f'api_key = "{API_KEY}"\n'
        f'log_url = "sqlite:///{directory}/events.db"\n'
        'node_name = "ingest-test"\n'
        "\n[[namespaces]]\n"
        'name = "orders"\n'
        "history_size = 5000\n"
        "history_ttl = 600\n"
    )
    return path


async def api(base: str, method: str, **params: Any) -> Any:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.post(
            f"{base}/api/{method}", json=params, headers={"X-API-Key": API_KEY}
        )
    body = response.json()
    assert "error" not in body, body
    return body["result"]


async def top(base: str, channel: str) -> int:
    """The channel's latest offset (0 while it has none), or -1 if the hub does not answer."""
    try:
        result = await api(base, "history", channel=channel, limit=0)
    except httpx.HTTPError:
        return -1
    return int(result.get("offset") or 0)


async def consumer_running(base: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            ready = (await client.get(f"{base}/readyz")).json()
    except httpx.HTTPError:
        return False
    return bool(ready.get("consumers", {}).get("src") == "running")


__all__ = ["source"]


async def test_sigkill_mid_consumption_loses_and_duplicates_nothing(
    source: Source, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    hub = HubProcess(
        config, free_port(), env={"EVENTCAST_CONSUMERS": json.dumps([source.consumer()])}
    )
    await asyncio.to_thread(hub.start)
    try:
        await eventually(lambda: consumer_running(hub.base))

        async def produce() -> None:
            for start in range(1, N + 1, 10):
                await source.produce(range(start, min(start + 10, N + 1)))
                await asyncio.sleep(0.01)  # a steady pace, so the kill lands mid-stream

        producer = asyncio.create_task(produce())
        await eventually(lambda: _at_least(hub.base, source.channel, KILL_AFTER), WAIT * 3)
        assert not producer.done(), "the kill must land while messages still arrive"
        await asyncio.to_thread(hub.kill)
        await asyncio.to_thread(hub.start)
        await producer
        await eventually(lambda: _at_least(hub.base, source.channel, N), WAIT * 3)
        history = await api(hub.base, "history", channel=source.channel, limit=N + 100)
    finally:
        await asyncio.to_thread(hub.stop)
    publications = history["publications"]
    seqs = [p["data"]["seq"] for p in publications]
    assert len(seqs) == N, f"{N - len(set(seqs))} lost, {len(seqs) - len(set(seqs))} duplicated"
    assert seqs == list(range(1, N + 1))
    assert [p["offset"] for p in publications] == list(range(1, N + 1))
    assert "Traceback" not in "".join(hub.output)


async def _at_least(base: str, channel: str, offset: int) -> bool:
    return await top(base, channel) >= offset
