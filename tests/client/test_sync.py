"""The synchronous client: the asyncio client on a background loop, used from plain threads."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import eventcast.sync
from eventcast import Event, History, Position
from eventcast.exceptions import ClientClosedError, HandshakeError, ReplyError
from tests.server.hubtools import WAIT, HubServer, free_port, token


def sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "eventcast-sync-client"]


async def test_sync_client_from_a_plain_thread(hub: HubServer) -> None:
    channel = "news.sync"

    def work() -> tuple[Event, History, bool]:
        with eventcast.sync.connect(hub.base, token=token("sam"), timeout=WAIT) as client:
            with client.subscribe(channel) as sub:
                assert sub.position is not None
                client.publish(channel, {"n": 1})
                event = sub.get(timeout=WAIT)
                assert sub.position == Position(1, event.epoch or "")
            history = client.history(channel, limit=10)
            with pytest.raises(ReplyError) as info:
                client.rpc("missing")
            assert info.value.code == 104
            client.close()
            client.close()  # idempotent
        return event, history, client.closed

    event, history, closed = await asyncio.to_thread(work)
    assert (event.topic, event.data, event.offset) == (channel, {"n": 1}, 1)
    assert [e.data for e in history.events] == [{"n": 1}]
    assert closed
    assert sync_threads() == []


async def test_sync_client_is_thread_safe(hub: HubServer) -> None:
    channel = "news.threads"

    def work() -> list[int]:
        with eventcast.sync.connect(hub.base, token=token("tom")) as client:
            sub = client.subscribe(channel)

            def publish_five(worker: int) -> None:
                for n in range(5):
                    client.publish(channel, {"worker": worker, "n": n})

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(publish_five, range(4)))
            seen = [sub.get(timeout=WAIT) for _ in range(20)]
            history = client.history(channel, limit=100)
            assert [e.offset for e in history.events] == list(range(1, 21))
            return [e.offset or 0 for e in seen]

    offsets = await asyncio.to_thread(work)
    assert offsets == list(range(1, 21))


async def test_close_from_another_thread_ends_iteration(hub: HubServer) -> None:
    def work() -> list[Event]:
        client = eventcast.sync.connect(hub.base, token=token("uma"))
        sub = client.subscribe("news.iter")
        client.publish("news.iter", "first")
        got: list[Event] = []
        first = threading.Event()

        def consume() -> None:
            for event in sub:
                got.append(event)
                first.set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert first.wait(WAIT)
        client.close()  # the consumer's loop ends
        consumer.join(WAIT)
        assert not consumer.is_alive()
        with pytest.raises(ClientClosedError):
            client.publish("news.iter", "late")
        return got

    got = await asyncio.to_thread(work)
    assert [e.data for e in got] == ["first"]
    assert sync_threads() == []


async def test_sync_connect_failure_is_typed_and_leaks_no_thread() -> None:
    port = free_port()

    def work() -> None:
        eventcast.sync.connect(f"ws://127.0.0.1:{port}", timeout=WAIT)

    with pytest.raises(HandshakeError):
        await asyncio.to_thread(work)
    assert sync_threads() == []
