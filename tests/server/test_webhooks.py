"""Lifecycle webhooks: at least once through a killed and restarted endpoint, dead letters, signing.

The receivers follow the Standard Webhooks specification
(:mod:`tests.server.webhook_receiver`): each checks every signature and
records the idempotency id of every event.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from eventcast.server.config import Settings
from eventcast.server.hub import Hub
from eventcast.server.webhooks import sign

from .apptools import listening_socket, serve_app
from .conftest import StartHub
from .hubtools import WAIT, HubServer, RawClient, free_port, token
from .webhook_receiver import Receiver, verify

SECRET = "whsec_" + "c2VjcmV0LWtleS1vZi10aGUtd2ViaG9vay10ZXN0cw=="
ROOT = Path(__file__).resolve().parents[2]


def webhook_settings(url: str, **overrides: Any) -> dict[str, Any]:
    """Fast retries (the endpoint comes back within them) and no vacated delay."""
    return {
        "webhooks": [{"url": url, "secret": SECRET}],
        "webhook_retries": 100,
        "webhook_backoff": 0.02,
        "webhook_max_backoff": 0.25,
        "webhook_timeout": 1.0,
        "webhook_vacated_delay": 0,
        **overrides,
    }


class ReceiverProcess:
    """The receiver as a process of its own, to kill with SIGKILL and start again on its port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        self.process = process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.server.webhook_receiver",
            str(self.port),
            str(self.log),
            SECRET,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")},
        )
        health = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                try:
                    if (await client.get(health)).status_code == 200:
                        return
                except httpx.HTTPError:
                    if time.monotonic() > deadline or process.returncode is not None:
                        raise
                await asyncio.sleep(0.05)  # polling another process's readiness

    async def kill(self) -> None:
        """SIGKILL: no goodbye to the hub's open connections."""
        process = self.process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.fixture
async def receiver_process(tmp_path: Path) -> AsyncIterator[ReceiverProcess]:
    receiver = ReceiverProcess(tmp_path / "received.jsonl")
    try:
        yield receiver
    finally:
        await receiver.kill()


async def session(hub: HubServer, n: int) -> str:
    """One client's life: connect, subscribe to its own channel, leave. Returns its id."""
    async with await RawClient.open(hub.ws_url) as client:
        result = await client.connect(token(f"user{n}"))
        await client.subscribe(f"wh.c{n}")
        return str(result["client"])


async def test_every_event_arrives_through_a_killed_and_restarted_endpoint(
    start_hub: StartHub, receiver_process: ReceiverProcess
) -> None:
    await receiver_process.start()
    hub = await start_hub(**webhook_settings(receiver_process.url))
    clients = []
    for n in range(24):
        if n == 8:
            await receiver_process.kill()  # mid-run: events keep coming meanwhile
        if n == 16:
            await receiver_process.start()  # the same port
        clients.append(await session(hub, n))
    expected = {
        *(("connect", c) for c in clients),
        *(("disconnect", c) for c in clients),
        *(("channel_occupied", f"wh.c{n}") for n in range(24)),
        *(("channel_vacated", f"wh.c{n}") for n in range(24)),
    }

    def seen() -> set[tuple[str, str]]:
        return {
            (r["type"], r["data"].get("client") or r["data"].get("channel"))
            for r in receiver_process.records()
        }

    deadline = time.monotonic() + 30
    while not expected <= seen():
        assert time.monotonic() < deadline, sorted(expected - seen())
        await asyncio.sleep(0.1)  # polling another process's file
    records = receiver_process.records()
    assert all(r["valid"] for r in records)
    assert all(r["header_id"] == r["id"] for r in records)
    # At least once: a retried event keeps its id, so the receiver can drop repeats.
    by_id: dict[str, set[tuple[str, str]]] = {}
    for r in records:
        by_id.setdefault(r["id"], set()).add((r["type"], json.dumps(r["data"], sort_keys=True)))
    assert all(len(kinds) == 1 for kinds in by_id.values())
    assert len(by_id) == len(expected)
    assert {r["node"] for r in records} == {"test-node"}
    disconnects = [r for r in records if r["type"] == "disconnect"]
    assert {r["data"]["user"] for r in disconnects} == {f"user{n}" for n in range(24)}
    assert (await hub.api("dead_letters"))["dead_letters"] == []
    assert hub.hub.webhooks is not None
    (endpoint,) = hub.hub.webhooks.endpoints
    assert endpoint.delivered == len(expected)


async def test_undelivered_events_become_dead_letters_and_redrive(start_hub: StartHub) -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hooks"  # bound, not listening yet: refused
    hub = await start_hub(
        **webhook_settings(url, webhook_retries=2, webhooks=[{"url": url, "events": ["connect"]}])
    )
    client_id = await session(hub, 1)
    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT
    while not letters:
        assert time.monotonic() < deadline
        letters = (await hub.api("dead_letters", subscriber="webhook:0:127.0.0.1"))["dead_letters"]
        await asyncio.sleep(0.05)  # the retries run in the background
    (letter,) = letters
    assert (letter["topic"], letter["reason"], letter["attempts"]) == (
        "connect",
        "webhook_failed",
        3,
    )
    assert letter["data"]["type"] == "connect"
    assert letter["data"]["data"]["client"] == client_id
    receiver = Receiver(secret="")
    async with serve_app(receiver.app, sock):
        assert (await hub.api("dead_letters_redrive", subscriber="webhook:0:127.0.0.1")) == {
            "redriven": 1
        }
        await receiver.wait(lambda: bool(receiver.records))
    (record,) = receiver.records
    # The same event, with its idempotency id: a receiver that saw it already can tell.
    assert (record["id"], record["header_id"]) == (letter["data"]["id"], letter["data"]["id"])
    assert (await hub.api("dead_letters"))["dead_letters"] == []


async def test_events_queued_at_shutdown_survive_a_restart(tmp_path: Path) -> None:
    sock = listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
    settings = Settings.load(
        log_url=f"sqlite:///{tmp_path}/events.db",
        namespaces=[{"name": "", "history_size": 10}],
        node_name="restart-node",
        **webhook_settings(url, webhook_timeout=0.3),
    )
    hub = Hub(settings)
    await hub.start()
    assert hub.webhooks is not None
    for n in range(3):
        hub.webhooks.emit("connect", {"client": f"c{n}", "user": "u", "transport": "websocket"})
    await hub.close()
    letters = hub.bus.dead_letters.list(reason="webhook_shutdown")
    assert len(letters) == 3

    again = Hub(settings)
    await again.start()
    try:
        kept = again.bus.dead_letters.list(reason="webhook_shutdown")
        assert [letter.event.id for letter in kept] == [letter.event.id for letter in letters]
        receiver = Receiver(SECRET)
        async with serve_app(receiver.app, sock):
            assert await again.bus.dead_letters.redrive(reason="webhook_shutdown") == 3
            await receiver.wait(lambda: len(receiver.records) == 3)
        assert [r["data"]["client"] for r in receiver.records] == ["c0", "c1", "c2"]
        assert all(r["valid"] for r in receiver.records)
        assert [r["id"] for r in receiver.records] == [letter.event.id for letter in letters]
    finally:
        await again.close()


async def test_occupied_and_vacated_on_one_node(start_hub: StartHub) -> None:
    receiver = Receiver(SECRET)
    sock = listening_socket()
    async with serve_app(receiver.app, sock) as base:
        hub = await start_hub(
            **webhook_settings(
                f"{base}/hooks",
                webhook_vacated_delay=0.3,
                webhooks=[
                    {
                        "url": f"{base}/hooks",
                        "secret": SECRET,
                        "events": ["channel_occupied", "channel_vacated"],
                    }
                ],
            )
        )
        first = await RawClient.open(hub.ws_url)
        second = await RawClient.open(hub.ws_url)
        await first.connect(token("a"))
        await second.connect(token("b"))
        await first.subscribe("room.1")
        await receiver.wait(lambda: len(receiver.records) == 1)
        await second.subscribe("room.1")
        await first.close()
        # A member who leaves and comes back within the delay: still occupied.
        await second.request("unsubscribe", {"channel": "room.1"})
        await second.subscribe("room.1")
        await second.close()
        await receiver.wait(lambda: len(receiver.records) == 2)
    assert [(r["type"], r["data"]) for r in receiver.records] == [
        ("channel_occupied", {"channel": "room.1"}),
        ("channel_vacated", {"channel": "room.1"}),
    ]
    assert all(r["valid"] for r in receiver.records)


def test_signature_follows_standard_webhooks() -> None:
    body = b'{"type":"connect"}'
    header = sign(SECRET, "msg_1", 1_700_000_000, body)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": header,
    }
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body + b" ")
    assert not verify("whsec_" + "b3RoZXI=", headers, body)
    # A plain secret (no whsec_ prefix) is used as is.
    plain = {**headers, "webhook-signature": sign("plain-secret", "msg_1", 1_700_000_000, body)}
    assert verify("plain-secret", plain, body)


async def test_a_full_queue_keeps_its_oldest_events_as_dead_letters() -> None:
    sock = listening_socket()  # refused: nothing is delivered
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
    settings = Settings.load(
        log_url="memory://",
        **webhook_settings(url, webhook_queue_size=2, webhook_timeout=0.2),
    )
    hub = Hub(settings)
    await hub.start()
    try:
        assert hub.webhooks is not None
        for n in range(5):  # no await in between: the sender has not taken any yet
            hub.webhooks.emit("connect", {"client": f"c{n}", "user": "u", "transport": "sse"})
    finally:
        await hub.close()
        sock.close()
    letters = hub.bus.dead_letters

    def clients(reason: str) -> list[str]:
        return [json.loads(x.event.data)["data"]["client"] for x in letters.list(reason=reason)]

    assert clients("webhook_overflow") == ["c0", "c1", "c2"]
    assert clients("webhook_shutdown") == ["c3", "c4"]


async def test_a_cancelled_close_still_keeps_the_queued_events() -> None:
    sock = listening_socket()  # refused: the events wait in the queue
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
    hub = Hub(Settings.load(log_url="memory://", **webhook_settings(url, webhook_timeout=5.0)))
    await hub.start()
    webhooks = hub.webhooks
    assert webhooks is not None
    try:
        for n in range(3):
            webhooks.emit("connect", {"client": f"c{n}", "user": "u", "transport": "sse"})
        closing = asyncio.ensure_future(webhooks.aclose())
        await asyncio.sleep(0)  # let the close begin to wait for the sender (up to 5 s)
        assert not closing.done()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        kept = hub.bus.dead_letters.list(reason="webhook_shutdown")
        assert len(kept) == 3
        await webhooks.aclose()  # idempotent
        assert len(hub.bus.dead_letters) == 3
    finally:
        await hub.close()
        sock.close()
