"""No duplicate at the replay-to-live handoff, even inside the log's commit-to-fan-out window.

A log commits offset N (so ``position()`` and ``read()`` see it) before the
publisher gets N back and fans it out. A client that resubscribes inside that
window replays N from the log; when the publisher then fans N out, the client
must not get it a second time. These tests hold the window open on purpose:
the log's append commits, then waits for the test before handing the event
back, while a client resubscribes over a real socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from eventcast import Event
from eventcast.log.base import EventLog

from .hubtools import WAIT, HubServer, RawClient, token
from .ssetools import open_sse


class Window:
    """Holds the log's commit-to-fan-out window open for the next append."""

    def __init__(self) -> None:
        self._committed = asyncio.Event()
        self._gate = asyncio.Event()

    async def committed(self) -> None:
        """Wait until the append committed (readers see it; the publisher does not yet)."""
        async with asyncio.timeout(WAIT):
            await self._committed.wait()

    def release(self) -> None:
        """Hand the committed event back to the publisher, which fans it out."""
        self._gate.set()


@asynccontextmanager
async def window_held_open(log: EventLog) -> AsyncIterator[Window]:
    """Hold the next append's hand-back until ``window.release()`` is called."""
    window = Window()
    append = log._appending
    # What the bus awaits for a plain durable publish: the commit, then the
    # fan-out (``then``), held apart here.
    append_then = log._append_then

    async def delayed(event: Event, then: Callable[[list[Event]], object]) -> Event:
        committed = await append((event,))  # committed: readers see it from now on
        window._committed.set()
        await window._gate.wait()
        then(committed)
        return committed[0]

    log._append_then = delayed  # type: ignore[method-assign]
    try:
        yield window
    finally:
        window.release()
        log._append_then = append_then  # type: ignore[method-assign]


async def test_websocket_resubscribe_inside_the_commit_window(hub: HubServer) -> None:
    channel = "handoff.ws"
    log = hub.hub.bus.log
    assert log is not None
    first = await hub.publish(channel, {"n": 1})
    epoch = first["epoch"]
    async with window_held_open(log) as window:
        publishing = asyncio.ensure_future(hub.publish(channel, {"n": 2}))
        # Offset 2 is committed and visible, but not fanned out yet.
        await window.committed()
        assert (await log.position(channel)).offset == 2
        async with await RawClient.open(hub.ws_url) as client:
            await client.connect(token("bob"))
            result = await client.subscribe(channel, recover=True, offset=1, epoch=epoch)
            assert result["recovered"] is True
            assert [p["offset"] for p in result["publications"]] == [2]
            window.release()
            assert (await publishing)["offset"] == 2
            await hub.publish(channel, {"n": 3})
            push = await client.publication()
            # Not offset 2 again: the handoff dropped the late live copy.
            assert push["pub"]["offset"] == 3, push
            assert not [m for m in client.inbox if "pub" in m.get("push", {})]


async def test_websocket_fresh_subscribe_inside_the_commit_window(hub: HubServer) -> None:
    """Without recovery the reply's position is the head: nothing at or below it comes live."""
    channel = "handoff.fresh"
    log = hub.hub.bus.log
    assert log is not None
    await hub.publish(channel, {"n": 1})
    async with window_held_open(log) as window:
        publishing = asyncio.ensure_future(hub.publish(channel, {"n": 2}))
        await window.committed()
        assert (await log.position(channel)).offset == 2
        async with await RawClient.open(hub.ws_url) as client:
            await client.connect(token("bob"))
            result = await client.subscribe(channel)
            assert result["offset"] == 2
            window.release()
            await publishing
            await hub.publish(channel, {"n": 3})
            assert (await client.publication())["pub"]["offset"] == 3


async def test_sse_resume_inside_the_commit_window(hub: HubServer) -> None:
    channel = "handoff.sse"
    log = hub.hub.bus.log
    assert log is not None
    first = await hub.publish(channel, {"n": 1})
    last_id = f"1;{channel}!1!{first['epoch']}"
    async with window_held_open(log) as window:
        publishing = asyncio.ensure_future(hub.publish(channel, {"n": 2}))
        await window.committed()
        assert (await log.position(channel)).offset == 2
        headers = {"Last-Event-ID": last_id}
        async with open_sse(hub.base, [channel], token=token(), headers=headers) as stream:
            assert (await stream.subscribed())["recovered"] is True
            replayed = (await stream.event()).json()
            assert replayed["offset"] == 2
            window.release()
            await publishing
            await hub.publish(channel, {"n": 3})
            # The late live copy of 2 never reaches the stream: the next event is 3.
            assert (await stream.event()).json()["offset"] == 3
