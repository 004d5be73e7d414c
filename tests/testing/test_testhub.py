"""TestHub: the real hub in memory, its clients, disconnects, limits and helpers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from eventcast import Bus
from eventcast.client import Client, ClientPresence
from eventcast.exceptions import (
    ConfigurationError,
    EventcastError,
    HandshakeError,
    ReplyError,
)
from eventcast.server.app import create_app
from eventcast.server.config import Settings
from eventcast.testing import (
    DEFAULT_NAMESPACES,
    TestHub,
    assert_received,
    collect,
    wait_for_publication,
)

ROOM = {
    "name": "room",
    "presence": True,
    "join_leave": True,
    "force_push_join_leave": True,
    "allow_subscribe_for_client": True,
    "allow_presence_for_subscriber": True,
}


async def test_publish_through_the_api_reaches_a_client() -> None:
    async with TestHub() as hub, hub.client(user="alice") as alice:
        async with alice.subscribe("news") as sub:
            result = await hub.publish("news", {"n": 1})
            assert result["offset"] == 1
            event = await wait_for_publication(sub)
        assert event.data == {"n": 1}
        assert event.position is not None
        assert event.position.offset == 1
        assert alice.client_id in hub.hub.connections


async def test_disconnect_then_recover_exactly_once() -> None:
    async with TestHub() as hub, hub.client(user="alice") as alice:
        async with alice.subscribe("news") as sub:
            await hub.publish("news", 1)
            await assert_received(sub, [1])
            await hub.disconnect(alice)
            assert alice.client_id not in hub.hub.connections  # the hub forgot it
            for n in (2, 3, 4):
                await hub.publish("news", n)
            events = await assert_received(sub, [2, 3, 4])
            assert [e.offset for e in events] == [2, 3, 4]
            assert sub.recovered
            await hub.publish("news", 5)
            await assert_received(sub, [5])
            assert (await alice.history("news")).position.offset == 5  # a command: connected
            assert alice.connects == 2
        assert hub.hub.recoveries[True] == 1


async def test_disconnect_is_a_network_failure_for_the_hub() -> None:
    """The hub drops the connection's presence and pushes its leave; the client comes back."""
    async with TestHub(namespaces=[ROOM]) as hub:
        joined: list[ClientPresence] = []
        left: list[ClientPresence] = []
        async with (
            hub.client(user="alice") as alice,
            hub.client(user="bob") as bob,
            bob.subscribe("room:1", on_join=joined.append, on_leave=left.append),
            alice.subscribe("room:1") as alice_sub,
        ):
            assert {p.user for p in (await bob.presence("room:1")).values()} == {"alice", "bob"}
            first_id = alice.client_id
            await hub.disconnect(alice)
            assert {p.user for p in (await bob.presence("room:1")).values()} == {"bob"}
            assert [p.client for p in left] == [first_id]
            await alice.presence("room:1")  # waits for the reconnect
            assert alice.client_id != first_id
            assert alice_sub.state == "subscribed"
            assert [p.user for p in joined] == ["alice", "alice"]
            assert {p.user for p in (await bob.presence("room:1")).values()} == {"alice", "bob"}


async def test_permissions_and_limits_apply_as_in_production() -> None:
    namespaces = [*DEFAULT_NAMESPACES, {"name": "admin"}]
    async with (
        TestHub(namespaces=namespaces, channels_per_connection=2) as hub,
        hub.client(user="alice") as alice,
    ):
        with pytest.raises(ReplyError) as refused:
            await alice.subscribe("admin:audit")
        assert refused.value.code == 103
        with pytest.raises(ReplyError) as unknown:
            await alice.subscribe("nowhere:x")
        assert unknown.value.code == 102
        await alice.subscribe("a")
        await alice.subscribe("b")
        with pytest.raises(ReplyError) as limit:
            await alice.subscribe("c")
        assert limit.value.code == 106


async def test_settings_are_those_of_eventcast_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTCAST_ALLOW_ANONYMOUS", "true")  # ignored by TestHub
    async with TestHub() as hub:
        assert hub.settings.log_url == "memory://"
        assert not hub.settings.allow_anonymous
        with pytest.raises(HandshakeError):
            await hub.client().start()
    async with TestHub(allow_anonymous=True) as hub, hub.client() as anonymous:
        assert anonymous.connected
    with pytest.raises(ConfigurationError, match="replay_cap"):
        TestHub(replay_cap=0)


async def test_an_existing_app_is_served() -> None:
    settings = Settings.load(
        log_url="memory://", token_hmac_secret="s" * 32, api_key="k", allow_anonymous=True
    )
    app = create_app(settings)
    with pytest.raises(ConfigurationError):
        TestHub(app, node_name="x")
    async with TestHub(app) as hub, hub.client(user="carol") as carol:
        assert hub.app is app
        assert carol.connected
        with pytest.raises(ReplyError) as refused:
            await hub.publish("x:y", 1)
        assert refused.value.code == 102


async def test_a_refused_handshake_is_a_handshake_error() -> None:
    async with TestHub() as hub:
        with pytest.raises(HandshakeError, match="403"):
            await hub.client(user="eve", headers={"Origin": "https://evil.example"}).start()
        assert hub.hub.refused["origin"] == 1


async def test_a_hub_that_cannot_start_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    hub = TestHub(log_url=f"sqlite:///{blocker}/events.db")
    with pytest.raises(EventcastError, match="could not start"):
        await hub.start()
    await hub.aclose()  # idempotent, even after a failed start


async def test_closing_the_hub_closes_its_clients() -> None:
    hub = TestHub()
    await hub.start()
    client = await hub.client(user="alice").start()
    await hub.aclose()
    await hub.aclose()
    assert client.closed
    with pytest.raises(EventcastError, match="not running"):
        hub.client(user="bob")


async def test_disconnect_needs_a_connected_client_of_this_hub() -> None:
    async with TestHub() as hub, TestHub() as other:
        stranger = other.client(user="x")
        with pytest.raises(ValueError, match="not a client"):
            await hub.disconnect(stranger)
        idle = hub.client(user="y")
        with pytest.raises(ValueError, match="no open connection"):
            await hub.disconnect(idle)


async def test_helpers_fail_with_a_clear_message() -> None:
    async with (
        TestHub() as hub,
        hub.client(user="alice") as alice,
        alice.subscribe("news") as sub,
    ):
        with pytest.raises(AssertionError, match=r"no publication on 'news' within 0.05 s"):
            await wait_for_publication(sub, timeout=0.05)
        await hub.publish("news", {"kind": "noise"})
        with pytest.raises(AssertionError, match="skipped 1 not matching"):
            await wait_for_publication(
                sub, timeout=0.05, where=lambda e: e.data["kind"] == "signal"
            )
        await hub.publish("news", 1)
        await hub.publish("news", 3)
        with pytest.raises(AssertionError, match=r"first difference at index 1: 3 != 2"):
            await assert_received(sub, [1, 2])
        with pytest.raises(AssertionError, match="received 0 of 1 events"):
            await collect(sub, 1, timeout=0.05)


async def test_helpers_work_on_bus_subscriptions() -> None:
    async with Bus() as bus, bus.subscribe("jobs.*") as sub:
        await bus.publish("jobs.done", {"id": 1})
        assert (await wait_for_publication(sub)).data == {"id": 1}


async def test_many_clients_and_a_fast_round_trip() -> None:
    """The in-memory hub is fast enough for unit tests: 20 clients, one broadcast."""
    started = time.perf_counter()
    async with TestHub() as hub:
        clients: list[Client] = [await hub.client(user=f"u{n}").start() for n in range(20)]
        subs = [await c.subscribe("all") for c in clients]
        await hub.publish("all", "hello")
        events = await asyncio.gather(*(wait_for_publication(s) for s in subs))
        assert {e.data for e in events} == {"hello"}
    assert time.perf_counter() - started < 2.0
