"""Every consumer type against its real server: N messages in, N publications out, in order."""

from __future__ import annotations

from typing import Any

from eventcast.ingest.base import ConsumerState

from .conftest import eventually, running_consumers, take
from .sources import Source, source

__all__ = ["source"]


async def test_messages_in_order_and_garbage_to_dead_letters(
    source: Source, ingest_hub: Any
) -> None:
    hub = await ingest_hub([source.consumer()])
    (consumer,) = running_consumers(hub)
    await eventually(lambda: consumer.state is ConsumerState.RUNNING)
    async with hub.hub.bus.subscribe(source.channel, maxsize=1000) as sub:
        await source.produce(range(1, 101))
        await source.produce_garbage()
        await source.produce(range(101, 201))
        events = await take(sub, 200)
    assert [e.data["seq"] for e in events] == list(range(1, 201))
    assert [e.offset for e in events] == list(range(1, 201))
    await eventually(lambda: consumer.stats.dead_letters == 1)
    (letter,) = hub.hub.bus.dead_letters.list(subscriber="ingest:src")
    assert letter.reason in ("undecodable", "bad_command")
    await eventually(lambda: consumer.stats.processed == 201)
    assert consumer.stats.errors == 0
