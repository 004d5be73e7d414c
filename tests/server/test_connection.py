"""A Connection alone: its queue, coalescing, limits and close, on a real socket pair.

No hub is involved: a connection only needs a flusher, a writer (a socket
transport here, or ASGI ``send``) and an ``on_closed`` callback.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest

from eventcast.protocol import codes
from eventcast.protocol.framing import frame_text
from eventcast.server.connection import Connection, Flusher, FrameCache

WAIT = 5.0


class Peer:
    """The client end of a socket pair, reading what the connection wrote."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def read_exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), WAIT)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[asyncio.WriteTransport, Peer]]:
    """A real connected socket pair: the server side's transport, and the peer."""
    left, right = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=left)
    reader, writer = await asyncio.open_connection(sock=right)
    try:
        yield transport, Peer(reader)  # type: ignore[misc]
    finally:
        transport.close()
        writer.close()


def make(
    transport: asyncio.WriteTransport | None,
    closed: list[Connection],
    *,
    sent: list[MutableMapping[str, Any]] | None = None,
    flusher: Flusher | None = None,
    queue_limit: int = 1 << 20,
) -> Connection:
    async def send(message: MutableMapping[str, Any]) -> None:
        if sent is not None:
            sent.append(message)

    return Connection(
        flusher=flusher or Flusher(),
        on_closed=closed.append,
        send=send,
        transport=transport,
        queue_limit=queue_limit,
    )


async def test_messages_of_one_loop_turn_go_out_in_one_frame(
    pair: tuple[asyncio.WriteTransport, Peer],
) -> None:
    transport, peer = pair
    conn = make(transport, [])
    conn.enqueue(b'{"a":1}')
    conn.enqueue(b'{"b":2}')
    expected = frame_text(b'{"a":1}\n{"b":2}')
    assert await peer.read_exactly(len(expected)) == expected
    assert (conn.messages_out, conn.bytes_out) == (2, len(b'{"a":1}\n{"b":2}'))


async def test_one_shared_payload_is_framed_once_for_every_connection(
    pair: tuple[asyncio.WriteTransport, Peer],
) -> None:
    transport, peer = pair
    flusher = Flusher()
    first = make(transport, [], flusher=flusher)
    second = make(transport, [], flusher=flusher)
    payload = b'{"push":{"channel":"c","pub":{"data":1}}}'
    other = b'{"push":{"channel":"d","pub":{"data":2}}}'
    third = make(transport, [], flusher=flusher)
    first.enqueue(payload)
    third.enqueue(other)
    second.enqueue(payload)
    frames = FrameCache()
    for conn in (first, third, second):
        conn.flush(frames)
    assert len(frames) == 2  # one frame built per payload, whatever the order
    expected = frame_text(payload) + frame_text(other) + frame_text(payload)
    assert await peer.read_exactly(len(expected)) == expected


class _Channel:
    """A dispatcher that queues ``payload`` on ``conn`` and, ``again`` times, asks for
    another dispatch (as a channel with more than one batch buffered does)."""

    def __init__(
        self, flusher: Flusher, conn: Connection, payload: bytes, again: int, written: list[bytes]
    ) -> None:
        self.flusher, self.conn, self.payload, self.again = flusher, conn, payload, again
        self.written = written
        #: How many writes had been made when each dispatch ran.
        self.seen: list[int] = []

    def dispatch(self, frames: FrameCache | None) -> None:
        self.seen.append(len(self.written))
        if frames is None:
            self.conn.enqueue(self.payload)
        else:
            self.conn.write_now(self.payload, frames)
        if self.again:
            self.again -= 1
            self.flusher.dispatch_later(self)


async def test_the_turn_ends_with_the_dispatch_then_one_write_with_the_reply(
    pair: tuple[asyncio.WriteTransport, Peer],
) -> None:
    transport, peer = pair
    flusher = Flusher()
    conn = make(transport, [], flusher=flusher)
    written: list[bytes] = []
    real_write = transport.write

    def write(data: Any) -> None:
        written.append(bytes(data))
        real_write(data)

    transport.write = write  # type: ignore[method-assign]
    reply, push = b'{"id":1,"publish":{}}', b'{"push":1}'
    channel = _Channel(flusher, conn, push, 1, written)
    conn.enqueue(reply)  # queued first (its write scheduled) ...
    flusher.dispatch_later(channel)  # ... the dispatch still comes before the write
    expected = frame_text(reply + b"\n" + push) + frame_text(push)
    assert await peer.read_exactly(len(expected)) == expected
    # The reply and the first dispatch in one write; the channel queued again while
    # dispatching dispatched in a later turn (after that write), written on its own.
    assert written == [frame_text(reply + b"\n" + push), frame_text(push)]
    assert channel.seen == [0, 1]


async def test_a_payload_is_written_at_once_unless_something_is_queued_before_it(
    pair: tuple[asyncio.WriteTransport, Peer],
) -> None:
    transport, peer = pair
    flusher = Flusher()
    idle = make(transport, [], flusher=flusher)
    busy = make(transport, [], flusher=flusher)
    frames = FrameCache()
    payload = b'{"push":{"channel":"c","pub":{"data":1}}}'
    busy.enqueue(b'{"id":1,"publish":{}}')  # a reply, queued earlier in the turn
    idle.write_now(payload, frames)  # written now: nothing could join it
    busy.write_now(payload, frames)  # queued behind the reply, one frame at the flush
    assert len(frames) == 1
    assert (idle.messages_out, busy.messages_out) == (1, 0)
    expected = frame_text(payload)
    assert await peer.read_exactly(len(expected)) == expected
    both = frame_text(b'{"id":1,"publish":{}}\n' + payload)
    assert await peer.read_exactly(len(both)) == both  # at the end of the turn
    assert busy.messages_out == 2


async def test_a_queue_over_its_limit_closes_with_3008_once(
    pair: tuple[asyncio.WriteTransport, Peer],
) -> None:
    transport, _ = pair
    closed: list[Connection] = []
    conn = make(transport, closed, queue_limit=10)
    conn.enqueue(b"x" * 11)
    assert conn.closed
    assert conn.disconnect == codes.DISCONNECT_SLOW
    conn.enqueue(b"more")  # ignored once closed
    conn.close(codes.DISCONNECT_SHUTDOWN)  # idempotent: the first reason stays
    assert conn.disconnect == codes.DISCONNECT_SLOW
    assert closed == [conn]


async def test_the_asgi_path_sends_text_then_the_close_frame() -> None:
    sent: list[MutableMapping[str, Any]] = []
    closed: list[Connection] = []
    written = asyncio.Event()

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        written.set()

    conn = Connection(flusher=Flusher(), on_closed=closed.append, send=send, transport=None)
    conn.enqueue(b'{"a":1}')
    conn.enqueue(b'{"b":2}')
    await asyncio.wait_for(written.wait(), WAIT)
    conn.close(codes.DISCONNECT_SHUTDOWN)
    await asyncio.wait_for(conn.wait_closed(), WAIT)
    assert sent[0] == {"type": "websocket.send", "text": '{"a":1}\n{"b":2}'}
    assert sent[-1] == {"type": "websocket.close", "code": 3001, "reason": "shutdown"}
    assert closed == [conn]


async def test_a_lost_peer_is_forgotten_without_a_close_frame() -> None:
    sent: list[MutableMapping[str, Any]] = []
    closed: list[Connection] = []
    conn = make(None, closed, sent=sent)
    conn.lost()
    conn.lost()
    await asyncio.wait_for(conn.wait_closed(), WAIT)
    assert closed == [conn]
    assert not [m for m in sent if m["type"] == "websocket.close"]


async def test_expiry_closes_with_3005() -> None:
    closed: list[Connection] = []
    conn = make(None, closed)
    conn.expires_at = time.time()  # already expired
    conn.arm_expiry()
    await asyncio.wait_for(conn.wait_closed(), WAIT)
    assert conn.disconnect == codes.DISCONNECT_EXPIRED
    assert closed == [conn]
