"""A response's head waits for its body, so a small response leaves in one write.

``HeadWithBody`` is driven directly over a real socket pair (its writes are
what the peer reads), then the shapes of response it must not hold back are
sent for real to an in-process hub: chunked streams, ``HEAD``, and
``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from eventcast.server._uvicorn import HeadWithBody

from .hubtools import API_KEY, WAIT, HubServer

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n"


class Cycle:
    """What HeadWithBody reads and writes of uvicorn's request cycle."""

    transport: Any = None


@dataclass
class Pair:
    """A transport on one end of a socket pair, the peer socket, and a cycle writing to it."""

    transport: asyncio.Transport
    peer: socket.socket
    cycle: Cycle

    def held(self) -> HeadWithBody:
        """A fresh HeadWithBody between the cycle and the transport."""
        held = HeadWithBody(self.cycle, self.transport, asyncio.get_running_loop())
        self.cycle.transport = held
        return held

    def writer(self) -> object:
        """What the cycle writes to now."""
        return self.cycle.transport

    async def read(self, size: int) -> bytes:
        """What the peer reads, ``size`` bytes."""
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(WAIT):
            while len(data) < size:
                data += await loop.sock_recv(self.peer, 65536)
        return data


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    ours, theirs = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=ours)
    theirs.setblocking(False)
    try:
        yield Pair(transport, theirs, Cycle())
    finally:
        transport.close()
        theirs.close()


async def test_the_head_of_a_sized_response_leaves_with_its_body(pair: Pair) -> None:
    held = pair.held()
    held.write(HEAD)
    assert pair.transport.get_write_buffer_size() == 0
    assert pair.writer() is held  # the head waits
    held.write(b"{}")
    assert pair.writer() is pair.transport  # stepped aside after the body
    assert await pair.read(len(HEAD) + 2) == HEAD + b"{}"


async def test_a_head_whose_body_does_not_follow_leaves_at_the_end_of_the_turn(
    pair: Pair,
) -> None:
    pair.held().write(HEAD)  # a HEAD request's answer: no body follows
    assert await pair.read(len(HEAD)) == HEAD
    assert pair.writer() is pair.transport


async def test_other_first_writes_pass_through_and_close_flushes(pair: Pair) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    pair.held().write(chunked)
    assert pair.writer() is pair.transport  # a stream: out of the way at once
    assert await pair.read(len(chunked)) == chunked
    second = pair.held()
    second.write(HEAD)
    second.close()  # the cycle closes (no keep-alive): the head goes first
    assert await pair.read(len(HEAD)) == HEAD
    assert second.is_closing()  # other attributes are the transport's


async def _exchange(hub: HubServer, request: bytes, bodies: list[bool]) -> list[bytes]:
    """Send raw bytes; return the responses' heads (and bodies, where ``bodies`` says)."""
    host, port = hub.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        out: list[bytes] = []
        async with asyncio.timeout(WAIT):
            for has_body in bodies:
                head = await reader.readuntil(b"\r\n\r\n")
                out.append(head)
                for line in head.split(b"\r\n") if has_body else []:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length" and int(value):
                        out.append(await reader.readexactly(int(value)))
        return out
    finally:
        writer.close()


async def test_head_requests_and_keep_alive_answer_in_order(hub: HubServer) -> None:
    request = b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    head1, head2, body2 = await _exchange(hub, request, [False, True])
    assert head1.startswith(b"HTTP/1.1 200 ")
    assert head2.startswith(b"HTTP/1.1 200 ")
    assert body2 == b'{"status":"ok"}'


async def test_expect_100_continue_then_the_api_answer(hub: HubServer) -> None:
    body = b'{"channel": "writes.c", "data": {"n": 1}}'
    host, port = hub.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (API_KEY.encode(), len(body))
        )
        async with asyncio.timeout(WAIT):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answer = await reader.readexactly(length)
        assert b'"offset":1' in answer
    finally:
        writer.close()


async def test_a_431_behind_a_head_answer_comes_after_it(hub: HubServer) -> None:
    """A refused head pipelined behind a HEAD request: the HEAD's answer (held for
    a body that never comes) goes out before the 431."""
    oversized = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n" % (
        b"a" * (4 * hub.settings.max_header_size)
    )
    host, port = hub.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        # The oversized head arrives in reads of its own (a head that starts behind
        # another request within one read is counted from the next read).
        for start in range(0, len(oversized), 4096):
            writer.write(oversized[start : start + 4096])
            await writer.drain()
            await asyncio.sleep(0)
        async with asyncio.timeout(WAIT):
            first = await reader.readuntil(b"\r\n\r\n")
            second = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ")
        assert second.startswith(b"HTTP/1.1 431 ")
    finally:
        writer.close()
