"""SIGTERM on a real ``eventcast serve`` process: clients told to reconnect, recovery after restart.

The clients reach the server through a gate (a TCP proxy the test can close), so
that "publications made after the restart, before the clients are back" is a
fact the test arranges, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from centrifuge import ClientState

from .hubtools import API_KEY, WAIT, free_port, token, write_config
from .opstools import Clients, Gate, ServeProcess, subscription

CHANNEL = "news.shutdown"


@pytest.fixture
async def process(tmp_path: Path) -> AsyncIterator[ServeProcess]:
    config = write_config(tmp_path / "eventcast.toml", tmp_path)
    server = ServeProcess(port=free_port(), config=config)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def gate(process: ServeProcess) -> AsyncIterator[Gate]:
    proxy = Gate(process.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    made = Clients()
    yield made
    await made.close()


async def publish(base: str, data: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        response = await http.post(
            f"{base}/api/publish",
            json={"channel": CHANNEL, "data": data},
            headers={"X-API-Key": API_KEY},
        )
    body: dict[str, Any] = response.json()
    assert "result" in body, body
    result: dict[str, Any] = body["result"]
    return result


def assert_clean(server: ServeProcess) -> None:
    output = server.output()
    assert "Traceback" not in output, output
    assert " ERROR " not in output, output


async def test_sigterm_then_restart_recovers_every_publication(
    process: ServeProcess, gate: Gate, clients: Clients
) -> None:
    users = []
    for name in ("alice", "bob"):
        client, events = clients.new(gate.ws_url, token(name))
        sub, sub_events = subscription(client, CHANNEL, recoverable=True)
        await client.connect()
        assert (await events.next("connecting")).code == 0  # "connect called"
        await events.next("connected")
        await sub.subscribe()
        subscribed = await sub_events.next("subscribed")
        assert subscribed.recoverable
        users.append((client, events, sub_events))

    first = [await publish(process.base, {"n": n}) for n in (1, 2)]
    assert [r["offset"] for r in first] == [1, 2]
    epoch = first[0]["epoch"]
    for _, _, sub_events in users:
        got = await sub_events.take("publication", 2)
        assert [(c.pub.offset, c.pub.data) for c in got] == [(1, {"n": 1}), (2, {"n": 2})]

    # The clients may not come back until the test says so.
    gate.open = False
    process.signal(signal.SIGTERM)
    for client, events, _ in users:
        connecting = await events.next("connecting")
        assert (connecting.code, connecting.reason) == (3001, "shutdown")
        assert client.state == ClientState.CONNECTING  # 3001: the SDK reconnects by itself
    assert await process.wait() == 0
    assert_clean(process)
    assert any(
        "Shutting down" in line or "Finished server process" in line for line in process.stderr
    )

    # The same port, the same log: publications made before the clients are back.
    await asyncio.to_thread(process.start)
    later = [await publish(process.base, {"n": n}) for n in (3, 4, 5)]
    assert [(r["offset"], r["epoch"]) for r in later] == [(3, epoch), (4, epoch), (5, epoch)]
    for client, _, _ in users:
        assert client.state == ClientState.CONNECTING

    gate.open = True
    for _, events, sub_events in users:
        await events.next("connected")
        again = await sub_events.next("subscribed")
        assert again.was_recovering
        assert again.recovered
        assert again.stream_position is not None
        assert (again.stream_position.epoch, again.stream_position.offset) == (epoch, 5)
        missed = await sub_events.take("publication", 3)
        assert [(c.pub.offset, c.pub.data) for c in missed] == [
            (3, {"n": 3}),
            (4, {"n": 4}),
            (5, {"n": 5}),
        ]

    # Exactly once: the next live publication is the very next one, for both.
    assert (await publish(process.base, {"n": 6}))["offset"] == 6
    for _, events, sub_events in users:
        live = await sub_events.next("publication")
        assert (live.pub.offset, live.pub.data) == (6, {"n": 6})
        assert sub_events.counts["publication"] == 6
        assert events.counts["connected"] == 2

    # A second SIGTERM, with the clients connected again, is as clean.
    process.signal(signal.SIGTERM)
    for _, events, _ in users:
        assert (await events.next("connecting")).code == 3001
    assert await process.wait() == 0
    assert_clean(process)
