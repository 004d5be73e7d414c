"""An in-memory WebSocket between the Python client and the hub's ASGI application.

:class:`MemoryTransport` is a :class:`~eventcast.client._transport.Transport`
whose other end is the hub app itself, called as an ASGI server would call it
(a ``websocket`` scope, ``receive`` and ``send``), as a task in the test's
event loop: no socket, no port, no thread. The hub runs its real endpoint,
sessions, permissions, limits and fan-out; the client runs its real reader,
reconnects and recovery.

Both directions are bounded (``max_queue`` messages each, default
:data:`DEFAULT_MAX_QUEUE`): a hub writing to a client that does not read
waits, so its per-connection byte limit (3008 "slow") applies as it would
over a socket.

:meth:`MemoryTransport.drop` is a network failure: in-flight messages are
lost, the client's next ``recv`` raises ``TransportClosed(None)`` (no close
frame), and the hub's ``receive`` returns ``websocket.disconnect`` (1006).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import MutableMapping
from typing import Any, Final

from ..client._transport import Transport, TransportClosed
from ..exceptions import HandshakeError

__all__ = ["DEFAULT_MAX_QUEUE", "MemoryTransport", "open_memory_transport"]

logger = logging.getLogger("eventcast.testing")

#: Messages buffered in each direction of an in-memory connection.
DEFAULT_MAX_QUEUE: Final = 64
#: The close code a dropped connection reports to the hub (RFC 6455: abnormal closure).
ABNORMAL_CLOSURE: Final = 1006
#: Seconds ``close()`` waits for the hub to finish with the connection.
_CLOSE_TIMEOUT: Final = 2.0

_ports = itertools.count(40000)
Message = MutableMapping[str, Any]


class _Channel:
    """A bounded FIFO of one direction, which can be ended with a final item."""

    def __init__(self, limit: int) -> None:
        self._items: deque[Any] = deque()
        self._limit = limit
        self._changed = asyncio.Event()
        self.end: Any = None

    async def put(self, item: Any) -> bool:
        """Append ``item``, waiting while full; ``False`` if the channel ended meanwhile."""
        while len(self._items) >= self._limit and self.end is None:
            self._changed.clear()
            await self._changed.wait()
        if self.end is not None:
            return False
        self._items.append(item)
        self._changed.set()
        return True

    async def get(self) -> Any:
        """The next item, or the end item once the channel ended and is drained."""
        while not self._items:
            if self.end is not None:
                return self.end
            self._changed.clear()
            await self._changed.wait()
        item = self._items.popleft()
        self._changed.set()
        return item

    def finish(self, end: Any, *, discard: bool = False) -> None:
        """End the channel with ``end`` (``discard``: lose what is still queued)."""
        if self.end is None:
            self.end = end
        if discard:
            self._items.clear()
        self._changed.set()


class MemoryTransport(Transport):
    """One in-memory WebSocket connection to a hub ASGI app (see the module docstring)."""

    def __init__(self, app: Any, scope: dict[str, Any], *, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._app = app
        self._scope = scope
        self._to_hub = _Channel(max_queue)
        self._to_client = _Channel(max_queue)
        self._connected = False
        self._accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        #: Whether the connection was dropped by :meth:`drop` (a simulated network failure).
        self.dropped = False

    def start(self) -> None:
        """Start the hub's side of the connection (the ASGI app call)."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="eventcast-testing-connection"
        )

    async def _run(self) -> None:
        try:
            await self._app(self._scope, self._receive, self._send)
        except Exception:
            logger.exception("the hub's WebSocket endpoint failed")
        finally:
            self._to_client.finish(TransportClosed(None, "the hub ended the connection"))
            if not self._accepted.done():
                self._accepted.set_exception(
                    HandshakeError("the hub closed the connection during the WebSocket handshake")
                )

    async def wait_accepted(self) -> None:
        """Wait for the hub to accept the WebSocket.

        Raises:
            HandshakeError: the hub refused the handshake (403, 429, 503) or closed it.
        """
        await self._accepted

    # -- the hub's side (ASGI) ----------------------------------------------------------

    async def _receive(self) -> Message:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        item = await self._to_hub.get()
        if isinstance(item, int):
            return {"type": "websocket.disconnect", "code": item}
        return {"type": "websocket.receive", "text": item}

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if self.dropped:
            # As uvicorn does once the peer is gone (its ClientDisconnected is an OSError).
            raise OSError("the connection was dropped")
        if kind == "websocket.accept":
            if not self._accepted.done():
                self._accepted.set_result(None)
        elif kind == "websocket.send":
            text = message.get("text")
            data = text.encode() if text is not None else bytes(message.get("bytes") or b"")
            if not await self._to_client.put(data):
                raise OSError("the client closed the connection")
        elif kind == "websocket.close":
            code = int(message.get("code", 1000))
            reason = str(message.get("reason") or "")
            if not self._accepted.done():
                self._accepted.set_exception(
                    HandshakeError(f"the hub refused the WebSocket handshake (close {code})")
                )
            self._to_client.finish(TransportClosed(code, reason))
            self._to_hub.finish(code)
        elif kind == "websocket.http.response.start":
            status = int(message.get("status", 0))
            if not self._accepted.done():
                self._accepted.set_exception(
                    HandshakeError(f"the hub refused the WebSocket handshake: HTTP {status}")
                )
        # websocket.http.response.body: the refusal's body; nothing to do.

    # -- the client's side (Transport) --------------------------------------------------

    async def send(self, data: bytes) -> None:
        end = self._to_client.end
        if end is not None or not await self._to_hub.put(data.decode()):
            raise end if isinstance(end, TransportClosed) else TransportClosed(None)

    async def recv(self) -> bytes:
        item = await self._to_client.get()
        if isinstance(item, TransportClosed):
            raise item
        data: bytes = item
        return data

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._to_client.finish(TransportClosed(code, reason))
        self._to_hub.finish(code)
        await self._wait_hub()

    def abort(self) -> None:
        self._to_client.finish(TransportClosed(None, "connection aborted"), discard=True)
        self._to_hub.finish(ABNORMAL_CLOSURE, discard=True)

    def drop(self) -> None:
        """Fail the connection as a network failure would (see the module docstring)."""
        self.dropped = True
        self._to_client.finish(TransportClosed(None, "connection lost"), discard=True)
        self._to_hub.finish(ABNORMAL_CLOSURE, discard=True)

    async def _wait_hub(self) -> None:
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await asyncio.shield(task)

    async def wait_closed(self) -> None:
        """Wait until the hub has finished with the connection (at most a short timeout)."""
        await self._wait_hub()


async def open_memory_transport(
    app: Any,
    *,
    path: str = "/connection/websocket",
    headers: list[tuple[bytes, bytes]] | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> MemoryTransport:
    """Open an in-memory WebSocket to ``app`` and wait for the hub to accept it.

    Raises:
        HandshakeError: the hub refused the handshake.
    """
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("testhub", 80),
        "client": ("127.0.0.1", next(_ports)),
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"testhub"), *(headers or [])],
        "subprotocols": [],
        "state": {},
        "extensions": {"websocket.http.response": {}},
    }
    transport = MemoryTransport(app, scope, max_queue=max_queue)
    transport.start()
    try:
        await transport.wait_accepted()
    except BaseException:
        transport.abort()
        await transport.wait_closed()
        raise
    return transport
