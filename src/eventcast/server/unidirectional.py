"""Unidirectional transports: pushes only, for clients with no SDK (Centrifugo's formats).

A client sends one connect request (``token``, ``data``, ``name``,
``version``, ``subs`` with ``recover``/``offset``/``epoch`` per channel,
``headers``); the hub authenticates it, subscribes it to the channels of its
token (server-side subscriptions, recovering where ``subs`` asks) and then
only pushes, in JSON, without a ``Reply`` around them
(:data:`~eventcast.protocol.encodings.UNI_JSON`):
``{"connect": {…}}`` first, then ``{"channel": "…", "pub": {…}}``, ``join``,
``leave``, ``subscribe``, ``unsubscribe``, ``message``, ``refresh``; ``{}``
every ``ping_interval`` (nothing to answer); ``{"disconnect": {code, reason}}``
last.

==============================  ===========================  ======================================
endpoint                        connect request              what the client reads
==============================  ===========================  ======================================
``/connection/uni_websocket``   the first message, or the    one text frame per push
                                ``cf_connect`` URL parameter
``POST /connection/uni_http_    the request body             one JSON push per line
stream``
``/connection/uni_sse``         the ``cf_connect`` URL       one SSE event (``data:``) per push
                                parameter (``GET``), or the
                                body (``POST``)
==============================  ===========================  ======================================

The connect request is bounded by ``max_message_size`` and must arrive within
``handshake_timeout`` (a WebSocket message) or ``body_timeout`` (a request body,
bounded as every body is: :mod:`eventcast.server._http`); a malformed one gets
400 (HTTP) or closes the WebSocket with 3501. A refused connect (an invalid
token, say) ends the connection with a ``disconnect`` push: 3500 for
authentication, 3501 for a bad request, 3004 for a server error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import Request as HTTPRequest

from ..protocol import codes
from ..protocol.codec import ProtocolError, decode_connect_request
from ..protocol.codes import ClientError, Disconnect
from ..protocol.encodings import UNI_JSON
from ..protocol.frames import ConnectRequest
from ..protocol.session import Request
from ..protocol.sse import RESPONSE_HEADERS
from ._http import BodyError, error_response, read_body, refuse_body
from ._uvicorn import websocket_transport
from .connection import Connection
from .driver import finish, keep_alive, take_message
from .httpio import accept_websocket, cors_headers, refuse_stream, stream_headers
from .sse import start_stream, wait_stream

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "UniHttpStreamEndpoint",
    "UniSSEEndpoint",
    "UniWebSocketEndpoint",
    "connect_in_url",
    "connect_uni",
    "uni_websocket_message",
]

logger = logging.getLogger("eventcast.server")


def _refused(error: ClientError | None) -> Disconnect:
    """The disconnect a unidirectional client gets for a refused connect."""
    if error is None:
        return codes.DISCONNECT_BAD_REQUEST
    if error.code in (codes.ERROR_UNAUTHORIZED.code, codes.ERROR_TOKEN_EXPIRED.code):
        return Disconnect(codes.DISCONNECT_INVALID_TOKEN.code, error.message)
    if error.code == codes.ERROR_INTERNAL.code:
        return codes.DISCONNECT_SERVER_ERROR
    return Disconnect(codes.DISCONNECT_BAD_REQUEST.code, error.message)


async def connect_uni(hub: Hub, conn: Connection, request: ConnectRequest) -> None:
    """Run a unidirectional client's connect request; close the connection if refused.

    The ``{"connect": …}`` push (the connect result) is queued on success,
    followed by the publications of its server-side subscriptions.
    """
    command = Request(1, "connect", request)
    session = conn.session
    if session.admit(command):
        await hub.handle(conn, command)
    if not session.connected_state and not conn.closed:
        conn.close(_refused(session.last_error))


def _parse_connect(data: bytes | str) -> ConnectRequest | None:
    try:
        return decode_connect_request(data or b"{}")
    except ProtocolError:
        return None


def connect_in_url(scope: dict[str, Any]) -> str | None:
    """The connect request a unidirectional WebSocket URL carries (``?cf_connect=``), if any."""
    given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("cf_connect")
    return given[0] if given else None


async def uni_websocket_message(hub: Hub, conn: Connection, data: bytes | str, limit: int) -> None:
    """A unidirectional WebSocket client's message: the first is its connect request.

    Pushes only from then on: whatever else the client sends is dropped.
    """
    if conn.messages_in or not take_message(conn, data, limit):
        return
    request = _parse_connect(data)
    if request is None:
        conn.close(codes.DISCONNECT_BAD_REQUEST)
    else:
        await connect_uni(hub, conn, request)


class UniWebSocketEndpoint:
    """``/connection/uni_websocket`` through ASGI (``eventcast serve`` has its own protocol)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        hub: Hub = scope["app"].state.hub
        settings = hub.settings
        if not await accept_websocket(hub, scope, receive, send, "uni_websocket"):
            return
        await send({"type": "websocket.accept"})
        raw_send = scope.get("eventcast.send", send)
        transport = websocket_transport(raw_send)
        conn = hub.new_connection(
            send=raw_send if transport is not None else send,
            transport=transport,
            transport_name="uni_websocket",
            scope=scope,
            encoding=UNI_JSON,
        )
        cancel = keep_alive(conn, settings, pongs=False)
        try:
            data: bytes | str | None = connect_in_url(scope)
            if data is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(settings.handshake_timeout):
                        first = await receive()
                        if first["type"] == "websocket.disconnect":
                            conn.lost()
                            return
                        data = first.get("text") or first.get("bytes") or b""
            if data is None:
                conn.close(codes.DISCONNECT_STALE)
            else:
                await uni_websocket_message(hub, conn, data, settings.max_message_size)
            # Pushes only from now on: whatever the client sends is read and dropped.
            while conn.is_open():
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    conn.lost()
                    return
        finally:
            await finish(conn, cancel)


async def _serve_stream(
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    *,
    transport_name: str,
    from_query: bool,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Serve a unidirectional HTTP stream: its connect request, 200, pushes until it ends.

    ``from_query``: the connect request is the ``cf_connect`` parameter, not the body.
    """
    hub: Hub = scope["app"].state.hub
    if await refuse_stream(hub, scope, send, transport_name):
        return
    request = await _connect_request(hub, scope, receive, send, from_query=from_query)
    if request is None:
        return
    conn = hub.new_connection(
        send=send, transport=None, transport_name=transport_name, scope=scope, encoding=UNI_JSON
    )
    cancel = keep_alive(conn, hub.settings, pongs=False)
    try:
        await start_stream(scope, send, conn, headers)
        await connect_uni(hub, conn, request)
        await wait_stream(conn, receive)
    finally:
        cancel()
        if not conn.closed:
            conn.lost()


async def _connect_request(
    hub: Hub, scope: dict[str, Any], receive: Any, send: Any, *, from_query: bool
) -> ConnectRequest | None:
    """Read and decode the connect request (answering 4xx and returning ``None`` if bad)."""
    settings = hub.settings
    cors = cors_headers(scope)
    data: bytes | str
    if from_query:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        data = (query.get("cf_connect") or [""])[0]
        if len(data) > settings.max_message_size:
            await error_response(send, 413, "cf_connect is too large", cors)
            return None
    else:
        try:
            data = await read_body(HTTPRequest(scope, receive), settings.max_message_size)
        except BodyError as exc:
            await refuse_body(send, exc, cors)
            return None
    request = _parse_connect(data)
    if request is None:
        await error_response(send, 400, "malformed connect request", cors)
    return request


class UniHttpStreamEndpoint:
    """``POST /connection/uni_http_stream``."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _serve_stream(
            scope,
            receive,
            send,
            transport_name="uni_http_stream",
            from_query=False,
            headers=stream_headers(scope, b"application/json"),
        )


class UniSSEEndpoint:
    """``GET /connection/uni_sse?cf_connect=…`` (or ``POST`` with the request as the body)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _serve_stream(
            scope,
            receive,
            send,
            transport_name="uni_sse",
            from_query=scope.get("method") == "GET",
            headers=[*RESPONSE_HEADERS, *cors_headers(scope)],
        )
