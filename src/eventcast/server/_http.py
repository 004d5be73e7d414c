"""Request bodies of every HTTP endpoint: bounded in size and time, decoded in one place.

:class:`RequestLimits` is an ASGI middleware in front of every route of the hub,
so the limits hold whichever server runs it (``eventcast serve``, or a host
application the hub is mounted in):

* a body larger than the limit is refused with **413** as soon as its declared
  ``Content-Length`` says so, or while it streams in, before the rest is read;
* a body that has not fully arrived ``body_timeout`` seconds after the request
  started is refused with **408** and the connection is closed.

The limit is ``max_body_size`` (1 MiB by default); an endpoint that needs less
lowers it for its request with :func:`read_body`'s ``limit``. Under ``eventcast
serve`` the HTTP protocol also bounds request heads and closes connections whose
bodies never end (see :mod:`eventcast.server._uvicorn`).

Endpoints read bodies with :func:`read_body` or :func:`read_json`; both raise
:class:`BodyError`, which an endpoint may turn into its own answer format,
answer with :func:`refuse_body` (adding its own headers, CORS say), or leave to
the middleware (a JSON ``{"error": message}`` with the status). The streaming
transports (HTTP-streaming, SSE emulation, unidirectional) are plain ASGI
endpoints: they read their bodies the same way, through a ``Request`` of their
scope.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Any, Final

import msgspec
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..protocol.codec import ProtocolError, Shape, decode_json
from ._uvicorn import receive_ready

__all__ = [
    "BodyError",
    "RequestLimits",
    "client_host",
    "error_body",
    "error_response",
    "is_loopback",
    "json_body",
    "read_body",
    "read_json",
    "refuse_body",
]

_encode = msgspec.json.Encoder().encode
#: The scope key holding the body limit of the request in progress.
_LIMIT_KEY: Final = "eventcast.body_limit"


class BodyError(Exception):
    """A request body was refused: too large (413), too slow (408), not JSON (400).

    Or never finished: the client disconnected (499, which nobody reads).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """Headers of the refusal: a body that is too slow also closes the connection.

        A body that is too large does not: the server discards the rest of it
        (within the body timeout), so the client reads the 413 rather than a
        reset connection.
        """
        return {"connection": "close"} if self.status == 408 else {}


def _too_large() -> BodyError:
    return BodyError(413, "request body too large")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            # The server's parser checked it is a number; be strict anyway.
            return int(text) if text.isascii() and text.isdigit() else None
    return None


class RequestLimits:
    """ASGI middleware: every HTTP request body at most ``max_body`` bytes and ``timeout`` seconds.

    Args:
        app: the application.
        max_body: the largest body accepted, in bytes.
        timeout: seconds the whole body has to arrive, from the start of the request.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, timeout: float) -> None:
        if max_body < 0 or timeout <= 0:
            raise ValueError("max_body must be >= 0 and timeout > 0")
        self.app = app
        self.max_body = max_body
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[_LIMIT_KEY] = self.max_body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received = 0
        ended = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, ended
            if ended:  # the body is complete: what follows is the wait for a disconnect
                return await receive()
            limit: int = scope[_LIMIT_KEY]
            if received == 0:
                declared = _declared_length(scope)
                if declared is not None and declared > limit:
                    raise _too_large()
            if receive_ready(receive):  # what it returns has arrived: nothing to time
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyError(408, "request body timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large()
                ended = not message.get("more_body", False)
            else:
                ended = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyError as exc:
            if started:  # too late for a status: end the response
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await refuse_body(send, exc)


def error_body(message: str) -> bytes:
    """The JSON body of every refusal the hub answers itself: ``{"error": message}``."""
    return _encode({"error": message})


async def error_response(
    send: Send, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer (plain ASGI) with ``status`` and the JSON body ``{"error": message}``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": error_body(message)})


async def refuse_body(
    send: Send, error: BodyError, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer a refused body: its status and message, plus ``headers`` (408 also closes)."""
    own = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await error_response(send, error.status, error.message, [*headers, *own])


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """Read a request body, at most ``limit`` bytes (default: the hub's body limit).

    Raises:
        BodyError: 413 past the limit (declared or streamed), 408 past the body
            timeout, 499 when the client disconnected first.
    """
    scope = request.scope
    if limit is not None:
        current = scope.get(_LIMIT_KEY)
        scope[_LIMIT_KEY] = limit if current is None else min(current, limit)
        declared = _declared_length(scope)
        if declared is not None and declared > scope[_LIMIT_KEY]:
            raise _too_large()
    chunks: list[bytes] = []
    size = 0
    bound = scope.get(_LIMIT_KEY)
    receive = request.receive  # (read directly: Request.stream()'s generator costs ~2 µs)
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise BodyError(499, "client disconnected")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if bound is not None and size > bound:  # no middleware in front (a bare mount)
                raise _too_large()
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json(
    request: Request,
    limit: int | None = None,
    *,
    empty: Any = None,
    shape: Shape | None = None,
) -> Any:
    """Read and decode a JSON body (``empty`` when the body is blank).

    ``shape``: the body's common form, tried first (see
    :func:`~eventcast.protocol.codec.decode_json`).

    Raises:
        BodyError: 413, 408 or 499 as :func:`read_body`; 400 when the body is not
            JSON (malformed, not UTF-8, or nested too deeply).
    """
    return json_body(await read_body(request, limit), empty=empty, shape=shape)


def json_body(body: bytes, *, empty: Any = None, shape: Shape | None = None) -> Any:
    """Decode a JSON body already read (``empty`` when it is blank); as :func:`read_json`.

    Raises:
        BodyError: 400 when the body is not JSON (malformed, not UTF-8, or
            nested too deeply).
    """
    if not body.strip():
        return empty
    try:
        return decode_json(body, shape)
    except ProtocolError:
        raise BodyError(400, "body is not valid JSON") from None


# -- client addresses -------------------------------------------------------------------------


def client_host(scope: Scope) -> str | None:
    """The client's address: the forwarded one when a trusted proxy sent the request.

    (The hub's app rewrites ``scope["client"]`` from ``X-Forwarded-For`` for
    trusted proxies, as uvicorn's ``forwarded_allow_ips`` defines them.)
    """
    client = scope.get("client")
    if not client:
        return None
    return str(client[0])


def is_loopback(host: str | None) -> bool:
    """Whether an address is a loopback address (``127.0.0.0/8``, ``::1``, mapped IPv4)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
