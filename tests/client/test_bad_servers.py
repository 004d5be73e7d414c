"""The client against servers that misbehave: garbage, hang-ups, silence, refusal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import eventcast
from eventcast.exceptions import (
    HandshakeError,
    ReplyTimeoutError,
    SlowConsumerError,
)
from eventcast.protocol.codec import ProtocolError
from tests.server.hubtools import WAIT, free_port

Script = Callable[["Peer"], Awaitable[None]]
CONNECT_REPLY = {"id": 1, "connect": {"client": "fake", "version": "0", "ping": 25, "pong": True}}


class Peer:
    """One client connection as the fake server sees it."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.closed_by_client = asyncio.get_running_loop().create_future()

    async def command(self) -> dict[str, Any]:
        """The next command the client sent (one per line)."""
        data = await asyncio.wait_for(self.ws.recv(), WAIT)
        message: dict[str, Any] = json.loads(data.split("\n")[0] if isinstance(data, str) else data)
        return message

    async def send(self, *messages: dict[str, Any] | str) -> None:
        await self.ws.send("\n".join(m if isinstance(m, str) else json.dumps(m) for m in messages))

    async def accept_connect(self, **result: Any) -> dict[str, Any]:
        command = await self.command()
        assert "connect" in command
        await self.send({"id": command["id"], "connect": {**CONNECT_REPLY["connect"], **result}})
        return command

    async def until_closed(self) -> None:
        try:
            async with asyncio.timeout(WAIT):
                async for _ in self.ws:
                    pass
        except ConnectionClosed:
            pass


class FakeHub:
    """A WebSocket server on a free port running ``scripts`` (the last one repeats)."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.count = 0
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        script = self.scripts[min(self.count, len(self.scripts) - 1)]
        self.count += 1
        peer = Peer(ws)
        self.peers.put_nowait(peer)
        await script(peer)

    async def next_peer(self) -> Peer:
        return await asyncio.wait_for(self.peers.get(), WAIT)


@pytest.fixture
async def fake() -> AsyncIterator[Callable[..., Awaitable[FakeHub]]]:
    servers: list[Any] = []

    async def start(*scripts: Script) -> FakeHub:
        made = FakeHub(*scripts)
        server = await serve(made.handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        made.url = f"ws://127.0.0.1:{port}"
        return made

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def garbage_first(peer: Peer) -> None:
    await peer.send("this is not { json")
    await peer.until_closed()


async def test_garbage_after_accept_is_a_handshake_error(fake: Any) -> None:
    server = await fake(garbage_first)
    with pytest.raises(HandshakeError) as info:
        async with asyncio.timeout(WAIT):
            await eventcast.connect(server.url)
    assert isinstance(info.value.__cause__, ProtocolError)
    assert info.value.code is None


async def test_closed_mid_handshake_is_a_handshake_error(fake: Any) -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.command()  # read connect, then go away without answering
        await peer.ws.close(1011, "gone")

    server = await fake(hang_up)
    with pytest.raises(HandshakeError) as info:
        async with asyncio.timeout(WAIT):
            await eventcast.connect(server.url)
    assert info.value.code == 1011


async def test_closed_during_the_http_upgrade_is_a_handshake_error() -> None:
    accepted = asyncio.Event()

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HandshakeError):
            async with asyncio.timeout(WAIT):
                await eventcast.connect(f"ws://127.0.0.1:{port}")
        assert accepted.is_set()
    finally:
        server.close()
        await server.wait_closed()


async def test_connection_refused_is_a_handshake_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(HandshakeError) as info:
        async with asyncio.timeout(WAIT):
            await eventcast.connect(f"http://127.0.0.1:{port}")
    assert isinstance(info.value.__cause__, OSError)


async def test_http_error_status_is_a_handshake_error() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HandshakeError, match="403"):
            async with asyncio.timeout(WAIT):
                await eventcast.connect(f"ws://127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()


async def test_no_connect_reply_times_out_with_a_handshake_error(fake: Any) -> None:
    async def mute(peer: Peer) -> None:
        await peer.command()
        await peer.until_closed()

    server = await fake(mute)
    with pytest.raises(HandshakeError, match="in time"):
        async with asyncio.timeout(WAIT):
            await eventcast.connect(server.url, timeout=0.3)


async def test_command_without_reply_raises_reply_timeout(fake: Any) -> None:
    async def ignore_commands(peer: Peer) -> None:
        await peer.accept_connect()
        await peer.until_closed()

    server = await fake(ignore_commands)
    async with eventcast.connect(server.url, timeout=0.3) as client:
        with pytest.raises(ReplyTimeoutError):
            await client.publish("a", 1)
        assert client.connected  # a slow reply does not break the connection


async def test_pings_are_answered(fake: Any) -> None:
    pong: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def pinger(peer: Peer) -> None:
        await peer.accept_connect()
        await peer.send("{}")
        pong.set_result(await asyncio.wait_for(peer.ws.recv(), WAIT))  # type: ignore[arg-type]
        await peer.until_closed()

    server = await fake(pinger)
    async with eventcast.connect(server.url):
        assert await asyncio.wait_for(pong, WAIT) == "{}"


async def test_a_silent_server_is_replaced(fake: Any) -> None:
    async def silent(peer: Peer) -> None:
        await peer.accept_connect(ping=1)  # promises a ping every second, never sends one
        await peer.until_closed()
        peer.closed_by_client.set_result(True)

    server = await fake(silent)
    async with eventcast.connect(server.url, ping_margin=0.1, min_reconnect_delay=0.01) as client:
        first = await server.next_peer()
        second = await server.next_peer()  # the client gave up on the first and reconnected
        assert await asyncio.wait_for(first.closed_by_client, WAIT)
        assert second is not first
        assert client.connects >= 1


async def test_garbage_after_connect_makes_the_client_reconnect(fake: Any) -> None:
    second_connect: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def then_garbage(peer: Peer) -> None:
        await peer.accept_connect()
        await peer.send("\x00\x01 garbage")
        await peer.until_closed()

    async def well_behaved(peer: Peer) -> None:
        second_connect.set_result(await peer.accept_connect())
        await peer.until_closed()

    server = await fake(then_garbage, well_behaved)
    async with eventcast.connect(server.url, token="t0", min_reconnect_delay=0.01) as client:
        command = await asyncio.wait_for(second_connect, WAIT)
        assert command["connect"]["token"] == "t0"
        assert server.count == 2
        assert not client.closed


async def test_slow_consumer_gets_a_typed_error_and_unsubscribes(fake: Any) -> None:
    unsubscribed: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def flood(peer: Peer) -> None:
        await peer.accept_connect()
        subscribe = await peer.command()
        assert subscribe["subscribe"]["channel"] == "c"
        pubs = [{"push": {"channel": "c", "pub": {"data": n}}} for n in (1, 2, 3)]
        await peer.send({"id": subscribe["id"], "subscribe": {}}, *pubs)  # one frame
        unsubscribe = await peer.command()
        unsubscribed.set_result(unsubscribe)
        await peer.send({"id": unsubscribe["id"], "unsubscribe": {}})
        await peer.until_closed()

    server = await fake(flood)
    async with eventcast.connect(server.url) as client:
        sub = await client.subscribe("c", buffer=2)
        assert (await asyncio.wait_for(unsubscribed, WAIT))["unsubscribe"] == {"channel": "c"}
        assert not sub.active
        async with asyncio.timeout(WAIT):
            assert [(await anext(sub)).data for _ in range(2)] == [1, 2]
            with pytest.raises(SlowConsumerError):
                await anext(sub)
