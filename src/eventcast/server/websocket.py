"""The hub's WebSocket endpoints under ``eventcast serve``: a WebSocket protocol of its own.

uvicorn's HTTP protocol reads the request head, bounded in size and time (see
:mod:`eventcast.server._uvicorn`), and hands an upgrade to the WebSocket
protocol class it was given. For the hub's two WebSocket endpoints (:data:`ENDPOINTS`)
that class is :class:`HubWebSocket`: it answers the handshake, then feeds each
client message straight to the endpoint's handler (the command driver,
:func:`~eventcast.server.driver.run_frame`, or the unidirectional connect), and
the hub's connection writes pre-framed bytes straight to the socket's
transport. Any other upgrade (an app that is not the hub's, or another path)
goes to uvicorn's own WebSocket protocol and the ASGI app.

What this saves per connection, against uvicorn's protocol and the ASGI app:
no ASGI task with its chain of coroutine frames, no ASGI message queue and
events, no sans-I/O parser generator and no kept handshake request: an idle
connection is this protocol object, its :class:`~eventcast.protocol.websocket.FrameReader`,
the hub's :class:`~eventcast.server.connection.Connection`, and the transport
(``docs/performance.md``, goal 3). Each client message costs no ASGI
round trip either: its commands run in the read's callback while none must be
awaited (publications into live channels), and a task runs them only from the
first that must.

Bounds: a message is at most ``max_message_size`` bytes (1009 past it, refused
on the frame's header); at most :data:`READ_AHEAD` bytes of messages wait while
the commands of earlier ones run (the socket is not read meanwhile); what the
server writes (replies, pongs) is bounded by the connection's queue limit
(3008 past it); a close the client does not answer ends the connection
:data:`CLOSE_TIMEOUT` seconds after the close frame left the server (a client that
does not read gets up to :data:`DRAIN_TIMEOUT` seconds to reach it, so that it
learns why it was closed, 3008 "slow" included).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .._tasks import release_unawaited
from ..protocol import codes
from ..protocol.codes import Disconnect
from ..protocol.encodings import UNI_JSON, Encoding
from ..protocol.framing import OP_BINARY, closing_response
from ..protocol.websocket import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    BadHandshake,
    FrameReader,
    Unmask,
    accept_response,
    close_code,
    close_frame,
    control_frame,
    read_handshake,
    unmask as python_unmask,
)
from ._http import error_body
from .connection import Connection
from .driver import keep_alive, run_frame_now
from .httpio import websocket_terms
from .unidirectional import connect_in_url, uni_websocket_message

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "CLOSE_TIMEOUT",
    "DRAIN_TIMEOUT",
    "ENDPOINTS",
    "READ_AHEAD",
    "Endpoint",
    "HubWebSocket",
]

logger = logging.getLogger("eventcast.server")
#: The handshake lines uvicorn's own WebSocket protocol writes (its error logger, whose
#: records eventcast redacts: see ``eventcast.server._logs``).
access = logging.getLogger("uvicorn.error")

#: Runs a client message: ``None`` when it ran at once, else what runs the rest.
Handler = Callable[["Hub", Connection, bytes, int], Awaitable[None] | None]
Terms = Callable[[dict[str, Any]], tuple[Encoding, str | None]]


def _uni_terms(scope: dict[str, Any]) -> tuple[Encoding, str | None]:
    """A unidirectional connection: unidirectional JSON, no subprotocol."""
    return UNI_JSON, None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One WebSocket endpoint of the hub: what its connections are and do with messages."""

    #: The transport's name (``websocket``, ``uni_websocket``: see ``wires.WIRES``).
    transport: str
    #: What runs each client message, in order: ``(hub, conn, message, limit)``;
    #: it returns ``None`` when the message ran at once, else what to await.
    handle: Handler
    #: Whether the client answers pings (a unidirectional one cannot).
    pongs: bool
    #: Unidirectional: the connect request may come in the URL (``?cf_connect=``).
    connect_in_url: bool
    #: The connection's encoding, and the subprotocol the handshake answer names.
    terms: Terms


#: The paths this protocol serves (other upgrades go to uvicorn's protocol).
ENDPOINTS: Final = {
    b"/connection/websocket": Endpoint("websocket", run_frame_now, True, False, websocket_terms),
    b"/connection/uni_websocket": Endpoint(
        "uni_websocket", uni_websocket_message, False, True, _uni_terms
    ),
}
#: Bytes of client messages that may wait while earlier ones run; past it the
#: socket is not read until they have run.
READ_AHEAD: Final = 1_048_576
#: Seconds a client has to answer the server's close frame before the
#: connection is dropped.
CLOSE_TIMEOUT: Final = 5.0
#: Seconds the close frame may wait behind data a client does not read before the
#: connection is dropped (what waits is bounded by ``client_queue_bytes``).
DRAIN_TIMEOUT: Final = 60.0


def _fast_unmask() -> Unmask:
    try:  # websockets' C implementation (installed with the server extra)
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover - a platform without its wheel
        return python_unmask
    return apply_mask


_unmask: Final = _fast_unmask()


class HubWebSocket(asyncio.Protocol):
    """One client's WebSocket connection to the hub, from the handshake on.

    Built by :func:`~eventcast.server._uvicorn.websocket_protocol`'s class once
    it has seen that the upgrade is for the hub's endpoint: :meth:`start` takes
    the transport and the request head and answers the handshake.
    """

    __slots__ = (
        "_cancel_timers",
        "_close_received",
        "_close_sent",
        "_close_timer",
        "_connections",
        "_drain_deadline",
        "_endpoint",
        "_failed",
        "_hub",
        "_inbox",
        "_inbox_bytes",
        "_paused",
        "_reader",
        "_tasks",
        "_transport",
        "_worker",
        "conn",
    )

    def __init__(self, hub: Hub, endpoint: Endpoint, server_state: Any) -> None:
        self._hub = hub
        self._endpoint = endpoint
        #: uvicorn's registries: the connections it shuts down, the tasks it awaits.
        self._connections: set[Any] = server_state.connections
        self._tasks: set[asyncio.Task[None]] = server_state.tasks
        self._transport: asyncio.Transport | None = None
        self._reader: FrameReader | None = None
        self.conn: Connection | None = None
        self._cancel_timers: Any = None
        #: Client messages waiting for the ones before them (``None``: none).
        self._inbox: list[bytes] | None = None
        self._inbox_bytes = 0
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        self._close_sent = False
        self._close_received = False
        #: The client broke the protocol: the TCP closes right after the close frame.
        self._failed = False
        self._close_timer: asyncio.TimerHandle | None = None
        #: When the close frame must have left the server (``None``: it has).
        self._drain_deadline: float | None = None

    # -- the handshake ---------------------------------------------------------------------

    def start(
        self,
        transport: asyncio.Transport,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        scope: dict[str, Any],
    ) -> None:
        """Answer the opening handshake of ``scope`` (refusing it, or becoming the protocol)."""
        self._transport = transport
        hub = self._hub
        try:
            handshake = read_handshake(method, target, headers)
        except BadHandshake as exc:
            _log_handshake(scope, target, str(exc.status))
            self._refuse(closing_response(exc.status, exc.reason.encode(), headers=exc.headers))
            return
        endpoint = self._endpoint
        refusal = hub.check_handshake(scope, endpoint.transport)
        if refusal is not None:
            status, message = refusal
            _log_handshake(scope, target, str(status))
            self._refuse(closing_response(status, error_body(message), b"application/json"))
            return
        encoding, subprotocol = endpoint.terms(scope)
        _log_handshake(scope, target, "[accepted]")
        transport.write(accept_response(handshake, subprotocol))
        transport.set_protocol(self)
        self._reader = FrameReader(hub.settings.max_message_size, _unmask)
        conn = self.conn = hub.new_connection(
            send=self._send,
            transport=transport,
            transport_name=endpoint.transport,
            scope=scope,
            encoding=encoding,
        )
        self._cancel_timers = keep_alive(conn, hub.settings, pongs=endpoint.pongs)
        self._connections.add(self)
        if endpoint.connect_in_url:
            connect = connect_in_url(scope)
            if connect is not None:
                self._take(connect.encode())

    def _refuse(self, response: bytes) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(response)
        transport.close()

    # -- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        conn = self.conn
        if reader is None or conn is None:
            return
        for opcode, payload in reader.feed(data):
            if opcode <= OP_BINARY:
                if not (self._close_sent or self._close_received):
                    self._take(payload)
            elif opcode == OP_PING:
                if not self._close_sent:
                    self._write(control_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._closed_by_client(payload)
                return
        error = reader.error
        if error is not None:
            self._fail(Disconnect(error.code, error.reason))

    def _take(self, message: bytes) -> None:
        """Run a client message's commands now, or after those of the messages before it.

        A message whose commands need no await (publications into live
        channels) runs here, in the read's callback; the first that must be
        awaited continues in a task, which runs the messages that arrive
        meanwhile after it.
        """
        if self._worker is None:
            conn = self.conn
            assert conn is not None
            hub = self._hub
            try:
                pending = self._endpoint.handle(hub, conn, message, hub.settings.max_message_size)
            except Exception as exc:
                self._internal_error(conn, exc)
                return
            if pending is None:
                return
            task = asyncio.get_running_loop().create_task(self._run(pending))
            self._worker = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(release_unawaited, pending))
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = []
        inbox.append(message)
        self._inbox_bytes += len(message)
        transport = self._transport
        if self._inbox_bytes > READ_AHEAD and not self._paused and transport is not None:
            self._paused = True
            transport.pause_reading()

    async def _run(self, pending: Awaitable[None]) -> None:
        """The rest of a message's commands, then those of each message that arrived
        meanwhile, in order."""
        conn = self.conn
        assert conn is not None
        hub = self._hub
        limit = hub.settings.max_message_size
        handle = self._endpoint.handle
        try:
            await pending
            while self._inbox is not None and conn.is_open():
                inbox, self._inbox = self._inbox, None
                self._inbox_bytes = 0
                self._resume()
                for data in inbox:
                    if not conn.is_open():
                        break
                    rest = handle(hub, conn, data, limit)
                    if rest is not None:
                        await rest
        except Exception as exc:
            self._internal_error(conn, exc)
        finally:
            self._worker = None
            self._inbox = None
            self._inbox_bytes = 0
            self._resume()

    @staticmethod
    def _internal_error(conn: Connection, exc: Exception) -> None:
        """A bug running a client's commands: the client is told, the log says what."""
        logger.error(
            "connection %s: internal error running commands (%s)",
            conn.id,
            type(exc).__name__,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )
        conn.close(codes.DISCONNECT_SERVER_ERROR)

    def _resume(self) -> None:
        """Read the socket again (its messages have run, or will not: the client's close
        frame must still be read)."""
        if self._paused:
            self._paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    # -- writing and closing ---------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        """Write a frame of the protocol's own (a pong), bounded like the connection's queue."""
        transport = self._transport
        conn = self.conn
        if transport is None or conn is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() + len(frame) > conn.queue_limit:
            conn.close(codes.DISCONNECT_SLOW)
            transport.abort()
            return
        transport.write(frame)

    async def _send(self, message: Any) -> None:
        """The connection's ASGI-style ``send``, which it calls for its close alone.

        (It writes its data pre-framed straight to the transport it was given.)
        """
        if message["type"] == "websocket.close":
            self._send_close(message.get("code", 1000), message.get("reason") or "")

    def _send_close(self, code: int, reason: str) -> None:
        """Send the close frame (once); the client's answer, or the timeout, ends the TCP."""
        transport = self._transport
        if self._close_sent or transport is None or transport.is_closing():
            return
        self._close_sent = True
        transport.write(close_frame(code, reason))
        if self._close_received or self._failed:
            transport.close()  # (RFC 6455 §7.1.7: a failed connection is not drained)
        else:
            loop = asyncio.get_running_loop()
            if transport.get_write_buffer_size():
                self._drain_deadline = loop.time() + DRAIN_TIMEOUT
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._close_expired)

    def _close_expired(self) -> None:
        """No answer to the close frame in time: drop the TCP (or wait while it drains)."""
        self._close_timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        deadline = self._drain_deadline
        if deadline is not None:
            loop = asyncio.get_running_loop()
            if not transport.get_write_buffer_size():
                self._drain_deadline = None  # it left: CLOSE_TIMEOUT more for the answer
                self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._close_expired)
                return
            if loop.time() < deadline:
                self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._close_expired)
                return
        transport.abort()

    def _closed_by_client(self, payload: bytes) -> None:
        """The client's close frame: answer it (unless ours went first) and close the TCP."""
        self._close_received = True
        transport = self._transport
        assert transport is not None
        if not self._close_sent:
            code, _ = close_code(payload)
            self._close_sent = True
            if not transport.is_closing():
                transport.write(close_frame(code) if code is not None else control_frame(OP_CLOSE))
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.lost()
        transport.close()

    def _fail(self, disconnect: Disconnect) -> None:
        """The client broke the protocol: close with the RFC's code (or drop, if closing)."""
        self._inbox = None
        self._failed = True
        conn = self.conn
        transport = self._transport
        if conn is not None and not conn.closed:
            conn.close(disconnect)
        elif transport is not None and not self._close_sent:
            self._send_close(disconnect.code, disconnect.reason)
        elif transport is not None:
            transport.close()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._cancel_timers is not None:
            self._cancel_timers()
            self._cancel_timers = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._inbox = None
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.lost()

    def shutdown(self) -> None:
        """uvicorn's server is stopping: close with 1012 (the hub already said 3001)."""
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.close(Disconnect(1012, "service restart"))
        elif not self._close_sent and self._transport is not None:
            self._transport.close()


def _log_handshake(scope: dict[str, Any], target: bytes, outcome: str) -> None:
    """The line uvicorn logs for each WebSocket handshake: client, target, outcome."""
    if access.isEnabledFor(logging.INFO):
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        access.info('%s - "WebSocket %s" %s', peer, target.decode("latin-1"), outcome)
