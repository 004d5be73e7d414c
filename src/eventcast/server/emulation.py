"""Bidirectional emulation: HTTP-streaming and SSE connections, commands by ``POST /emulation``.

centrifuge-js falls back to these transports where WebSocket is blocked
(corporate proxies). A connection is an HTTP response streamed for as long
as the client stays; what the client says after ``connect`` comes in separate
requests:

* ``POST /connection/http_stream``: the body is the client's first commands
  (``connect``), JSON (``Content-Type: application/json``) or Protobuf
  (``application/octet-stream``); the response streams replies and pushes,
  JSON one per line or Protobuf length-delimited;
* ``GET /connection/sse?cf_connect=<JSON commands>``: the same in an
  ``EventSource``, JSON only, each write one SSE event whose data lines are
  the messages. eventcast's own SSE stream lives at the same path: a request
  with a ``cf_connect`` parameter (centrifuge-js always sends one) is an
  emulation connection, any other is eventcast's stream (:class:`SSERoute`);
* ``POST /emulation``: ``{"session", "node", "data"}`` (JSON, or Protobuf
  ``EmulationRequest`` by its content type) carries more commands of the
  session that the ``connect`` result named. Their replies go on the stream.
  Answers: 200 (delivered), 204 (the session is gone: its stream has ended),
  404 (no node of that name answered), 400/413/408 for a bad body.

The session id is a random secret (not the client id, which other clients
see in presence): whoever holds it speaks as that connection.

**Across nodes.** A load balancer may send an emulation request to a node
other than the one holding the stream. The ``connect`` result's ``node`` is the
holder's cluster id (``uid`` in ``info``), and :meth:`Emulation.handle` runs a
request here when the session is here, else hands it to
:attr:`Emulation.relay`, whose one method ``deliver(node, request) -> HTTP
status`` is the whole contract. The default relay is the cluster's control
channel (:meth:`Cluster.relay_emulation
<eventcast.server.cluster.Cluster.relay_emulation>`): the request goes to that
node alone, which answers with the status; an unknown node, or no answer
within :data:`RELAY_TIMEOUT` seconds, is 404.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import parse_qs

from starlette.requests import Request

from ..exceptions import EventcastError
from ..protocol.codec import ProtocolError
from ..protocol.encodings import JSON, get_encoding, stream_encoding
from ..protocol.frames import EmulationRequest
from ..protocol.sse import RESPONSE_HEADERS
from ._http import BodyError, error_response, read_body, refuse_body
from .connection import Connection
from .driver import keep_alive, run_frame
from .httpio import cors_headers, header, origin_ok, preflight, refuse_stream, stream_headers
from .sse import SSEEndpoint, start_stream, wait_stream

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "RELAY_TIMEOUT",
    "ClusterRelay",
    "Emulation",
    "EmulationEndpoint",
    "EmulationRelay",
    "HttpStreamEndpoint",
    "SSERoute",
]

logger = logging.getLogger("eventcast.server")

#: Seconds a node waits for the node holding a session to answer a relayed request.
RELAY_TIMEOUT: Final = 5.0


class EmulationRelay(Protocol):
    """Delivers an emulation request to the node holding its session."""

    async def deliver(self, node: str, request: EmulationRequest) -> int:
        """Deliver ``request`` to ``node``; return the HTTP status to answer with."""
        ...


class ClusterRelay:
    """:class:`EmulationRelay` over the cluster's control channel (the default).

    Args:
        hub: the hub whose :attr:`~eventcast.server.hub.Hub.cluster` carries requests.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        #: Seconds to wait for the holder's answer before answering 404.
        self.timeout = RELAY_TIMEOUT

    async def deliver(self, node: str, request: EmulationRequest) -> int:
        """Send ``request`` to the node with id ``node``; its answer, or 404."""
        return await self._hub.cluster.relay_emulation(node, request, timeout=self.timeout)


class Emulation:
    """The emulation sessions of this node, and the delivery of their commands.

    Args:
        hub: the hub the sessions belong to.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._sessions: dict[str, tuple[Connection, asyncio.Lock]] = {}
        #: Where a request for a session on another node goes (see the module docs).
        self.relay: EmulationRelay = ClusterRelay(hub)

    def register(self, conn: Connection) -> None:
        """Give a connection a new session id (a random secret) and remember it."""
        conn.session_id = secrets.token_urlsafe(24)
        self._sessions[conn.session_id] = (conn, asyncio.Lock())

    def forget(self, conn: Connection) -> None:
        """Forget a connection's session (its stream has ended)."""
        self._sessions.pop(conn.session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    async def handle(self, request: EmulationRequest) -> int:
        """Run an emulation request here or on the node holding its session; return the status."""
        if request.session in self._sessions:
            return await self.run_local(request)
        if not request.node or request.node == self._hub.cluster.node_id:
            return 204  # the session was here and its stream has ended
        return await self.relay.deliver(request.node, request)

    async def run_local(self, request: EmulationRequest) -> int:
        """Run the commands of a request whose session is on this node (in order, one at a time)."""
        found = self._sessions.get(request.session)
        if found is None:
            return 204
        conn, lock = found
        async with lock:
            if conn.closed:
                return 204
            await run_frame(self._hub, conn, request.data, self._hub.settings.max_message_size)
        return 200


async def _stream(
    hub: Hub,
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    *,
    transport_name: str,
    encoding_name: str,
    initial: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Serve one emulation connection: answer, run its first commands, stream until it ends."""
    settings = hub.settings
    conn = hub.new_connection(
        send=send,
        transport=None,
        transport_name=transport_name,
        scope=scope,
        encoding=get_encoding(encoding_name),
    )
    emulation = hub.emulation
    emulation.register(conn)
    cancel = keep_alive(conn, settings)
    try:
        await start_stream(scope, send, conn, headers)
        # The replies of the first commands (``connect``) open the stream.
        await emulation.run_local(
            EmulationRequest(node=hub.cluster.node_id, session=conn.session_id, data=initial)
        )
        await wait_stream(conn, receive)
    finally:
        cancel()
        emulation.forget(conn)
        if not conn.closed:
            conn.lost()


class HttpStreamEndpoint:
    """``POST /connection/http_stream``: centrifuge-js's HTTP-streaming transport."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        hub: Hub = scope["app"].state.hub
        settings = hub.settings
        if await refuse_stream(hub, scope, send, "http_stream"):
            return
        cors = cors_headers(scope)
        try:
            body = await read_body(Request(scope, receive), settings.max_message_size)
        except BodyError as exc:
            await refuse_body(send, exc, cors)
            return
        name = stream_encoding(header(scope, b"content-type"))
        media = b"application/octet-stream" if name == "protobuf" else b"application/json"
        await _stream(
            hub,
            scope,
            receive,
            send,
            transport_name="http_stream",
            encoding_name=name,
            initial=body,
            headers=stream_headers(scope, media),
        )


class SSERoute:
    """``GET /connection/sse``: Centrifuge SSE emulation with ``cf_connect``, else eventcast's SSE.

    centrifuge-js's SSE transport always sends the ``cf_connect`` parameter
    (its ``connect`` command); eventcast's own stream never uses it.
    """

    def __init__(self) -> None:
        self._eventcast = SSEEndpoint()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        connect = query.get("cf_connect")
        if connect is None:
            await self._eventcast(scope, receive, send)
            return
        hub: Hub = scope["app"].state.hub
        settings = hub.settings
        if await refuse_stream(hub, scope, send, "sse_emulation"):
            return
        cors = cors_headers(scope)
        initial = connect[0].encode()
        if len(initial) > settings.max_message_size:
            await error_response(send, 413, "cf_connect is too large", cors)
            return
        await _stream(
            hub,
            scope,
            receive,
            send,
            transport_name="sse_emulation",
            encoding_name=JSON.name,
            initial=initial,
            headers=[*RESPONSE_HEADERS, *cors],
        )


class EmulationEndpoint:
    """``POST /emulation``: more commands of an emulation session (see the module docs)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        hub: Hub = scope["app"].state.hub
        settings = hub.settings
        if not origin_ok(hub, scope):
            await error_response(send, 403, "origin not allowed")
            return
        cors = cors_headers(scope)
        if scope.get("method") == "OPTIONS":
            await preflight(send, cors)
            return
        # The commands travel inside the body (JSON escapes them): room for both.
        limit = 2 * settings.max_message_size + 1024
        try:
            body = await read_body(Request(scope, receive), limit)
        except BodyError as exc:
            await refuse_body(send, exc, cors)
            return
        name = stream_encoding(header(scope, b"content-type"))
        try:
            request = get_encoding(name).decode_emulation_request(body)
        except ProtocolError as exc:
            await error_response(send, 400, str(exc), cors)
            return
        try:
            status = await hub.emulation.handle(request)
        except EventcastError as exc:
            logger.warning("emulation request failed: %s", exc)
            status = 503
        await send({"type": "http.response.start", "status": status, "headers": cors})
        await send({"type": "http.response.body", "body": b""})
