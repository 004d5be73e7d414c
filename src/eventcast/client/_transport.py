"""How the client reaches a hub: a small transport interface and its WebSocket implementation.

The client (:mod:`eventcast.client._client`) drives the sans-I/O
:class:`~eventcast.protocol.client.ClientSession` over one :class:`Transport`
at a time, and opens a new one through an :data:`Opener` after each
connection ends. Two implementations exist, as websockets has its protocol
and its adapters:

* :class:`WebSocketTransport` over the network (``websockets``), opened by
  :func:`websocket_opener`;
* the in-memory transport of :mod:`eventcast.testing`, which drives the hub's
  ASGI application directly (no socket, no port).

A transport carries whole protocol messages (WebSocket text frames), in
order. Error contract: ``send`` and ``recv`` raise only
:class:`TransportClosed` once the connection is over, carrying the close code
and reason the server sent (``None`` when it sent none: a network failure);
an opener raises only :class:`~eventcast.exceptions.HandshakeError`.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Literal, TypeAlias

from websockets.asyncio.client import ClientConnection, connect as ws_connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from .. import __version__
from ..exceptions import HandshakeError

__all__ = ["Opener", "Transport", "TransportClosed", "WebSocketTransport", "websocket_opener"]


class TransportClosed(Exception):
    """The connection is over (internal to the client; never raised to applications).

    Attributes:
        code: the close code the server sent, or ``None`` (no close frame: the
            network failed, or the connection was aborted).
        reason: the server's close reason (``""`` when none).
    """

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class Transport(abc.ABC):
    """One open connection to a hub that carries protocol messages (text frames)."""

    @abc.abstractmethod
    async def send(self, data: bytes) -> None:
        """Send one message (UTF-8 JSON, one or more newline-separated commands).

        Raises:
            TransportClosed: the connection is over.
        """

    @abc.abstractmethod
    async def recv(self) -> bytes:
        """Wait for the next message from the hub.

        Raises:
            TransportClosed: the connection is over (with the server's close code, if any).
        """

    @abc.abstractmethod
    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection with a close handshake. Idempotent."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the connection at once, without a close handshake. Idempotent."""


#: Opens one connection to the hub. Raises :class:`~eventcast.exceptions.HandshakeError`.
Opener: TypeAlias = Callable[[], Awaitable[Transport]]


class WebSocketTransport(Transport):
    """A :class:`Transport` over a ``websockets`` client connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send(data, text=True)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def recv(self) -> bytes:
        try:
            return await self.ws.recv(decode=False)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    def abort(self) -> None:
        self.ws.transport.abort()


def _closed(exc: ConnectionClosed) -> TransportClosed:
    received = exc.rcvd
    if received is None:
        return TransportClosed(None, "connection lost")
    return TransportClosed(received.code, received.reason)


def websocket_opener(
    url: str,
    *,
    timeout: float,
    max_size: int | None,
    headers: dict[str, str] | None = None,
    proxy: str | Literal[True] | None = True,
) -> Opener:
    """Return an :data:`Opener` of WebSocket connections to ``url``.

    Args:
        url: the hub's WebSocket endpoint (``ws://host/connection/websocket``).
        timeout: seconds allowed for the opening handshake; also bounds the close.
        max_size: the largest message accepted from the hub, in bytes.
        headers: extra HTTP headers of the handshake.
        proxy: passed to ``websockets`` (``True``: from the environment).
    """

    async def open_websocket() -> Transport:
        try:
            ws = await ws_connect(
                url,
                open_timeout=timeout,
                ping_interval=None,
                close_timeout=min(timeout, 2.0),
                max_size=max_size,
                additional_headers=headers,
                proxy=proxy,
                user_agent_header=f"eventcast-python/{__version__}",
            )
        except TimeoutError:
            raise HandshakeError(f"timed out opening {url}") from None
        except (OSError, WebSocketException) as exc:
            raise HandshakeError(f"cannot open {url}: {exc}") from exc
        return WebSocketTransport(ws)

    return open_websocket
