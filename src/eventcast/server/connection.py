"""One client connection of the hub: a bounded outgoing queue and a coalescing writer.

Everything queued for a connection during one turn of the event loop is
written as one write: one WebSocket frame (the Centrifuge protocol allows
several messages per frame: newline-separated in JSON, length-delimited in
Protobuf) or one HTTP chunk. The connection's
:class:`~eventcast.server.wires.Wire` says how messages are joined and framed
for its transport, and its :class:`~eventcast.protocol.encodings.Encoding`
how they are encoded. When the hub runs under ``eventcast serve`` (uvicorn's
sans-I/O WebSocket protocol, its httptools HTTP protocol), frames are written
pre-framed straight to the socket's transport, and a frame shared by many
connections (one batch of publications on one channel) is built once per wire.
Mounted in another server, the connection falls back to ASGI ``send`` from
one writer task per connection.

The queue is bounded in bytes (default 1 MiB, counting what the transport
still holds): a connection that cannot keep up is closed with 3008 "slow" and
recovers on reconnect; the others are never delayed by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..protocol.codes import DISCONNECT_EXPIRED, DISCONNECT_SLOW, Disconnect
from ..protocol.encodings import JSON, Encoding
from ..protocol.framing import frame_chunk
from ..protocol.session import ServerSession
from .wires import Wire, wire_for

if TYPE_CHECKING:
    from .channels import Membership

__all__ = ["Connection", "Dispatchable", "Flusher", "FrameCache"]

logger = logging.getLogger("eventcast.server")

#: Default bound of a connection's outgoing queue, in bytes.
DEFAULT_QUEUE_BYTES: Final = 1_048_576

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class FrameCache:
    """The frames built in one flush, so a payload shared by many connections is framed once.

    The connections of one channel are flushed one after another, so the last
    frame built answers nearly every lookup with two identity checks (see
    :meth:`Connection.flush`); the others are kept per framing function and
    payload identity (the payload is kept, so its id cannot be reused meanwhile).
    """

    __slots__ = ("_built", "frame", "framing", "payload")

    def __init__(self) -> None:
        #: The last payload framed, its framing function and its frame.
        self.payload: bytes | None = None
        self.framing: Callable[[bytes], bytes] | None = None
        self.frame = b""
        self._built: dict[tuple[Callable[[bytes], bytes], int], tuple[bytes, bytes]] = {}

    def __len__(self) -> int:
        """How many frames were built."""
        return len(self._built)

    def build(self, framing: Callable[[bytes], bytes], payload: bytes) -> bytes:
        """``payload`` framed by ``framing`` (built once per flush), now the last one."""
        key = (framing, id(payload))
        entry = self._built.get(key)
        if entry is None or entry[0] is not payload:
            entry = self._built[key] = (payload, framing(payload))
        self.payload, self.framing, self.frame = payload, framing, entry[1]
        return entry[1]


def writable_transport(transport: object) -> asyncio.WriteTransport | None:
    """Return ``transport`` if it can be written to directly, else ``None``.

    Duck-typed on purpose: uvloop's transports implement the interface without
    subclassing ``asyncio.WriteTransport``.
    """
    for name in ("write", "is_closing", "get_write_buffer_size"):
        if not callable(getattr(transport, name, None)):
            return None
    return transport  # type: ignore[return-value]


class Dispatchable(Protocol):
    """What :meth:`Flusher.dispatch_later` takes: a channel's dispatcher."""

    def dispatch(self, frames: FrameCache | None) -> None:
        """Give what is buffered to the members (never raises).

        With ``frames``, the only channel dispatched in this turn: a member's
        payload may be written at once (:meth:`Connection.write_now`), framed
        through ``frames``; without, it is queued for the turn's flush.
        """


class Flusher:
    """The end of a loop turn: channels dispatch, then every connection queued to is written.

    Work queued during a turn (:meth:`dispatch_later`, :meth:`schedule`) is
    done once, in one callback at its end. First the channels that got events
    dispatch them (which queues payloads on their members' connections), then
    each connection queued to is written once, as one frame (see
    :meth:`Connection.flush`); a payload shared by many connections (one batch
    of one channel) is framed once. A reply queued in the turn goes out in
    the same frame as the publications dispatched after it. When a single
    channel dispatches, nothing else can join its payload, so its members
    with nothing queued are written during its dispatch
    (:meth:`Connection.write_now`).

    A channel queued again while it dispatches (it has more than one batch
    buffered) dispatches in the next turn, so reads are not starved.
    """

    __slots__ = ("_channels", "_dirty", "_scheduled")

    def __init__(self) -> None:
        self._channels: list[Dispatchable] = []
        self._dirty: list[Connection] = []
        self._scheduled = False

    def schedule(self, conn: Connection) -> None:
        """Write ``conn``'s queue at the end of this loop turn."""
        self._dirty.append(conn)
        if not self._scheduled:
            self._arm()

    def dispatch_later(self, channel: Dispatchable) -> None:
        """Dispatch ``channel`` at the end of this loop turn (before the writes)."""
        self._channels.append(channel)
        if not self._scheduled:
            self._arm()

    def _arm(self) -> None:
        """Have the end of this loop turn (or of the next, from :meth:`_end`) do the work."""
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._end)

    def _end(self) -> None:
        frames = FrameCache()
        ready = self._channels
        try:
            if ready:
                self._channels = []
                if len(ready) == 1:  # one channel: its members' payloads need no flush
                    ready[0].dispatch(frames)
                else:
                    for channel in ready:
                        channel.dispatch(None)
        finally:  # (whatever happened, the next turn's work gets its callback)
            dirty, self._dirty = self._dirty, []
            self._scheduled = False
            if self._channels:  # queued again while dispatching: the next turn
                self._arm()
        for conn in dirty:
            conn.flush(frames)


class _Hot:
    """The fields a delivery reads and writes, laid out first in a connection.

    CPython lays a class's slots out in sorted order, a base class's before its
    subclass's: these 13 fit in two cache lines with the object's header, so a
    delivery to a member whose lines left the cache misses two lines, not six.
    """

    __slots__ = (
        "_first",
        "_flusher",
        "_frame",
        "_pending",
        "_pending_size",
        "_scheduled",
        "_transport",
        "bytes_out",
        "closed",
        "encoding",
        "messages_out",
        "queue_limit",
        "sse",
    )


class Connection(_Hot):
    """A connected client: protocol session, subscriptions and outgoing queue.

    The connection knows nothing of the hub: it writes through ``send`` (ASGI)
    or straight to ``transport``, schedules fast-path writes on ``flusher``,
    and reports its end once to ``on_closed``.

    Args:
        flusher: coalesces fast-path writes to the end of the loop turn.
        on_closed: called once when the connection closes or is lost.
        send: the ASGI send callable (the portable path).
        transport: the socket's transport, to write pre-framed bytes to.
        queue_limit: bound of the outgoing queue, in bytes (3008 past it).
        max_bad_commands: malformed commands tolerated before 3509.
        transport_name: the transport (a key of :data:`~eventcast.server.wires.WIRES`:
            ``websocket``, ``sse``, ``http_stream``, ``sse_emulation``,
            ``uni_websocket``, ``uni_http_stream``, ``uni_sse``).
        encoding: the encoding of the protocol's messages.
        start_writer: start writing now (an HTTP stream attaches later).
        headers: the headers of the connection's HTTP request (ASGI's raw pairs).
        address: the client's IP address, if known.

    Raises:
        ValueError: the transport is unknown or cannot carry the encoding.
    """

    __slots__ = (
        "_closed_event",
        "_closer",
        "_closing",
        "_finished",
        "_on_closed",
        "_send",
        "_separator",
        "_wake",
        "_writer",
        "address",
        "anonymous",
        "bucket",
        "bytes_in",
        "channels",
        "cursor",
        "disconnect",
        "expires_at",
        "headers",
        "hooks_lock",
        "id",
        "info",
        "issued_at",
        "messages_in",
        "meta",
        "on_expire",
        "session",
        "session_id",
        "sse_end",
        "token_id",
        "transport_name",
        "user",
        "wire",
    )

    def __init__(
        self,
        *,
        flusher: Flusher,
        on_closed: Callable[[Connection], None],
        send: Send,
        transport: asyncio.WriteTransport | None,
        queue_limit: int = DEFAULT_QUEUE_BYTES,
        max_bad_commands: int = 10,
        transport_name: str = "websocket",
        encoding: Encoding = JSON,
        start_writer: bool = True,
        headers: Sequence[tuple[bytes, bytes]] = (),
        address: str | None = None,
    ) -> None:
        #: How messages are joined and framed for the transport.
        self.wire: Wire = wire_for(transport_name, encoding)
        #: The encoding of the protocol's messages (replies and pushes).
        self.encoding = encoding
        self._flusher = flusher
        self._on_closed = on_closed
        self.id = str(uuid.uuid4())
        self.session = ServerSession(max_bad_commands=max_bad_commands, encoding=encoding)
        #: The emulation session id of an HTTP-streaming or SSE emulation
        #: connection (its ``connect`` result names it; empty otherwise).
        self.session_id = ""
        self.user = ""
        #: Connection info from the token, encoded once (``None`` when absent).
        self.info: bytes | None = None
        self.expires_at: float | None = None
        #: Called instead of closing with 3005 when :attr:`expires_at` passes
        #: (a refresh hook decides then).
        self.on_expire: Callable[[Connection], None] | None = None
        #: The connection token's id (``jti``) and issue time (``iat``), if it had them.
        self.token_id: str | None = None
        self.issued_at: float | None = None
        self.anonymous = True
        #: The headers of the connection's HTTP request (ASGI's raw pairs).
        self.headers = headers
        #: The client's IP address, if known.
        self.address = address
        #: What the connect hook attached (given to later hooks, never to the client).
        self.meta: Any = None
        #: Keeps this connection's hook calls in order (created on first use).
        self.hooks_lock: asyncio.Lock | None = None
        self.transport_name = transport_name
        #: Channels this connection is subscribed to, with their state.
        self.channels: dict[str, Membership] = {}
        self.queue_limit = queue_limit
        self._send = send
        self._transport = transport
        # What is queued: the first payload, and the ones after it (a connection is
        # usually queued one payload per loop turn: no list is touched then).
        self._first: bytes | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False
        #: HTTP streams only: ends the response (set by the endpoint).
        self.sse_end: Callable[[bytes], Awaitable[None]] | None = None
        self._wake: asyncio.Event | None = None
        self.closed = False
        self.disconnect: Disconnect | None = None
        #: Set on the first :meth:`wait_closed` (most connections never need one).
        self._closed_event: asyncio.Event | None = None
        self._finished = False
        self.messages_out = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.bytes_in = 0
        #: eventcast's own SSE stream (not the Centrifuge protocol).
        self.sse = self.wire.eventcast_sse
        self._frame = self.wire.frame
        self._separator = self.wire.separator
        #: SSE only: the stream's composite cursor (see eventcast.protocol.sse).
        self.cursor: Any = None
        #: The command rate limiter (created on first use).
        self.bucket: Any = None
        if start_writer:
            self.attach(send, transport)

    def attach(self, send: Send, transport: asyncio.WriteTransport | None) -> None:
        """Start writing: straight to ``transport`` if given, else through ASGI ``send``."""
        self._send = send
        self._transport = transport
        if transport is None and self._writer is None:
            self._wake = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"eventcast-writer-{self.id}"
            )
            if self._first is not None:
                self._scheduled = True
                self._wake.set()
        elif transport is not None and self._first is not None:
            self._scheduled = True
            self._flusher.schedule(self)

    # -- queueing --------------------------------------------------------------------

    def enqueue(self, data: bytes) -> None:
        """Queue encoded messages (one or several, newline-joined) for the next write."""
        if self.closed:
            return
        if self._first is None:  # (_queue, inline: once per delivery)
            self._first = data
        else:
            self._pending.append(data)
        size = self._pending_size = self._pending_size + len(data)
        if size > self.queue_limit:
            self.close(DISCONNECT_SLOW)
            return
        if not self._scheduled:
            if self._transport is not None:
                self._scheduled = True
                self._flusher.schedule(self)
            elif self._wake is not None:
                self._scheduled = True
                self._wake.set()

    def push(self, channel: str, kind: str, body: Any) -> None:
        """Queue a push of ``kind`` (``message``, ``refresh`` …) in the connection's encoding."""
        self.enqueue(self.encoding.encode_push(channel, kind, body))

    def send_session_output(self) -> None:
        """Queue whatever the protocol session has produced (replies, errors)."""
        out = self.session.data_to_send()
        if len(out) > 1:  # (one reply, the usual, goes as it is)
            out = [self._separator.join([message for message in out if message])]
        if out and out[0]:
            self.enqueue(out[0])
        disconnect = self.session.disconnect
        if disconnect is not None and not self.closed:
            self.close(disconnect)

    def _queue(self, data: bytes) -> None:
        """Queue ``data`` after whatever is queued (no bound, no schedule)."""
        if self._first is None:
            self._first = data
        else:
            self._pending.append(data)

    def _take(self) -> bytes | None:
        data = self._first
        if data is None:
            return None
        pending = self._pending
        if pending:
            data = self._separator.join([data, *pending])
            self.messages_out += 1 + len(pending)
            pending.clear()
        else:
            self.messages_out += 1
        self._first = None
        self._pending_size = 0
        self._scheduled = False
        self.bytes_out += len(data)
        return data

    def write_now(self, data: bytes, frames: FrameCache) -> None:
        """Write a payload shared by many connections at once, when nothing is queued.

        What a channel's dispatch does for a member at the end of a loop turn in
        which it is the only channel dispatched (see :class:`Flusher`): no other
        payload could join it in one write, so it is written without waiting
        for the turn's flush. Anything queued or due before it (a reply) keeps
        it queued, behind, as :meth:`enqueue` would.
        """
        if self._scheduled or self._first is not None or self._transport is None or self.closed:
            self.enqueue(data)
            return
        self._first = data
        self.flush(frames)

    def flush(self, frames: FrameCache | None = None) -> None:
        """Write what is queued as one frame (fast path: straight to the transport).

        ``frames`` caches frames by framing and payload identity, so one
        payload shared by many connections of one wire is framed once.
        """
        transport = self._transport
        if transport is None or self.closed:
            return
        payload = self._first
        if payload is not None and frames is not None and not self._pending:
            if payload is frames.payload and self._frame is frames.framing:
                frame = frames.frame
            else:
                frame = frames.build(self._frame, payload)
            self._first = None
            self._pending_size = 0
            self._scheduled = False
            self.messages_out += 1
            self.bytes_out += len(payload)
        else:
            data = self._take()
            if data is None:
                self._scheduled = False
                return
            frame = self._frame(data)
        if transport.is_closing():
            self._abort()
            return
        if transport.get_write_buffer_size() + len(frame) > self.queue_limit:
            self.close(DISCONNECT_SLOW)
            return
        transport.write(frame)

    def _messages(self, data: bytes) -> list[dict[str, Any]]:
        """A payload as ASGI messages (one, or one per message where the wire says so)."""
        wire = self.wire
        if not wire.websocket:
            return [{"type": "http.response.body", "body": wire.body(data), "more_body": True}]
        parts = data.split(b"\n") if wire.frame_per_message else [data]
        if wire.binary:
            return [{"type": "websocket.send", "bytes": part} for part in parts]
        return [{"type": "websocket.send", "text": part.decode()} for part in parts]

    async def _send_all(self, data: bytes) -> None:
        for message in self._messages(data):
            await self._send(message)

    async def _write_loop(self) -> None:
        wake = self._wake
        assert wake is not None
        try:
            while not self.closed:
                await wake.wait()
                wake.clear()
                data = self._take()
                if data is not None:
                    await self._send_all(data)
        except (OSError, RuntimeError) as exc:
            logger.debug("connection %s: write failed: %s", self.id, exc)
            self._abort()
        except asyncio.CancelledError:
            pass

    # -- closing ---------------------------------------------------------------------------

    def close(self, disconnect: Disconnect) -> None:
        """Close the connection with a protocol disconnect code. Idempotent."""
        if self.closed:
            return
        if self._transport is not None and not self._closing:
            self._closing = True
            self.flush()  # what was queued before the close goes first
            if not self.is_open():  # the flush closed it: too slow (3008) or already gone
                return
        self.closed = True
        self.disconnect = disconnect
        self.session.close(disconnect)
        if self._transport is not None:
            self._first = None
            self._pending = []
            self._pending_size = 0
        if self.wire.disconnect_push:
            # The last message, whatever the queue's bound: the code and reason.
            self._queue(
                self.encoding.encode_push(
                    "", "disconnect", {"code": disconnect.code, "reason": disconnect.reason}
                )
            )
        self._on_closed(self)
        loop = asyncio.get_running_loop()
        self._closer = loop.create_task(
            self._send_close(disconnect), name=f"eventcast-close-{self.id}"
        )

    async def _send_close(self, disconnect: Disconnect) -> None:
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        with contextlib.suppress(Exception):
            data = self._take()
            if data is not None:
                transport = self._transport
                if transport is not None:
                    if not transport.is_closing():
                        transport.write(self._frame(data))
                elif writer is not None:  # the ASGI path, once the response has started
                    await self._send_all(data)
            if not self.wire.websocket and not self.sse:
                await self._sse_end(b"")
            elif self.sse:
                # Ends the stream; a retry hint tells EventSource when to come back.
                hint = b"retry: %d\n\n" % (1000 if disconnect.reconnect else 86_400_000)
                if self._transport is not None and not self._transport.is_closing():
                    self._transport.write(frame_chunk(hint))
                    hint = b""
                await self._sse_end(hint)
            else:
                await self._send(
                    {
                        "type": "websocket.close",
                        "code": disconnect.code,
                        "reason": disconnect.reason,
                    }
                )
        self._finish()

    async def _sse_end(self, body: bytes) -> None:
        end = self.sse_end
        if end is not None:
            await end(body)

    def _abort(self) -> None:
        """The peer went away: forget the connection without a close handshake."""
        if self.closed:
            return
        self.closed = True
        self.disconnect = Disconnect(3000, "connection closed")
        self._first = None
        self._pending = []
        self._on_closed(self)
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()
        self._finish()

    def arm_expiry(self) -> None:
        """Close the connection with 3005 "expired" once :attr:`expires_at` passes.

        With :attr:`on_expire` set, that is called instead. Re-arming after a
        refresh is safe: a timer whose expiry was replaced does nothing when it
        fires.
        """
        expected = self.expires_at
        if expected is None:
            return

        def check() -> None:
            if self.expires_at == expected and not self.closed:
                if self.on_expire is not None:
                    self.on_expire(self)
                else:
                    self.close(DISCONNECT_EXPIRED)

        delay = max(0.0, expected - time.time())
        asyncio.get_running_loop().call_later(delay + 0.05, check)

    @property
    def fast_path(self) -> bool:
        """Whether frames go pre-framed straight to the socket's transport."""
        return self._transport is not None

    def queued_bytes(self) -> int:
        """Bytes queued and not yet written (including what the transport holds)."""
        held = self._transport.get_write_buffer_size() if self._transport is not None else 0
        return self._pending_size + held

    def is_open(self) -> bool:
        """Whether the connection is still open (a call, so it is re-read after awaits)."""
        return not self.closed

    def lost(self) -> None:
        """Called when the transport reports the peer disconnected."""
        self._abort()

    def _finish(self) -> None:
        """The close frame (or the end of the stream) went out, or the peer left."""
        self._finished = True
        if self._closed_event is not None:
            self._closed_event.set()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        if self._finished:
            return
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
        await self._closed_event.wait()

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user!r} channels={len(self.channels)}>"
