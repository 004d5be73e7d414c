"""Small ASGI helpers of the hub's transports: headers, CORS, bounded bodies, answers, handshakes.

Bytes from outside are bounded in size and time here: :func:`read_body`
refuses a body over its limit (whatever ``Content-Length`` says) and one that
takes longer than its timeout to arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec

from .connection import writable_transport
from .limits import origin_allowed

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "BodyError",
    "accept_websocket",
    "cors_headers",
    "deny_handshake",
    "error_response",
    "header",
    "origin_ok",
    "preflight",
    "raw_websocket_transport",
    "read_body",
    "refuse_stream",
]

_encode = msgspec.json.Encoder().encode

#: What a cross-origin client may send to the HTTP transports (preflight answer).
_ALLOW_HEADERS: Final = b"content-type, authorization, last-event-id"


class BodyError(Exception):
    """A request body is too large (``status`` 413) or too slow (408), or the client left."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The value of a request header (the first one), or ``None``."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def cors_headers(scope: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """The CORS answer headers for a request with an ``Origin`` (already allowed)."""
    origin = header(scope, b"origin")
    if origin is None:
        return []
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]


async def read_body(receive: Any, *, limit: int, timeout: float) -> bytes:
    """Read a whole request body of at most ``limit`` bytes within ``timeout`` seconds.

    Raises:
        BodyError: the body is over the limit (413), too slow (408), or the
            client disconnected (499).
    """
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BodyError(499, "client disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BodyError(413, f"request body over {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise BodyError(408, "request body too slow") from None


async def error_response(
    send: Any, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with ``status`` and ``{"error": message}``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": _encode({"error": message})})


async def preflight(send: Any, headers: list[tuple[bytes, bytes]]) -> None:
    """Answer a CORS preflight (``OPTIONS``) of an allowed origin."""
    await send(
        {
            "type": "http.response.start",
            "status": 204,
            "headers": [
                *headers,
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", _ALLOW_HEADERS),
                (b"access-control-max-age", b"600"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


def origin_ok(hub: Hub, scope: Mapping[str, Any]) -> bool:
    """Whether the request's ``Origin`` (if any) is allowed (``allowed_origins``)."""
    allowed = hub.settings.allowed_origins
    return origin_allowed(header(scope, b"origin"), header(scope, b"host"), allowed)


async def refuse_stream(hub: Hub, scope: Mapping[str, Any], send: Any, transport: str) -> bool:
    """Answer what must not open a stream; return whether it answered.

    A CORS preflight (``OPTIONS``) is answered here (403 for an origin not
    allowed); a refused handshake gets 403 (origin), 429 (the new-connection
    rate) or 503 (shutting down).
    """
    if scope.get("method") == "OPTIONS":
        if origin_ok(hub, scope):
            await preflight(send, cors_headers(scope))
        else:
            await error_response(send, 403, "origin not allowed")
        return True
    refusal = hub.check_handshake(scope, transport)
    if refusal is None:
        return False
    status, message = refusal
    await error_response(send, status, message, cors_headers(scope) if status != 403 else [])
    return True


# -- WebSocket handshakes ------------------------------------------------------------------


def raw_websocket_transport(send: Any) -> asyncio.WriteTransport | None:
    """The socket transport behind uvicorn's sans-I/O WebSocket protocol, if that is the server.

    Writing pre-framed bytes straight to it is eventcast's fast path; any
    other server gets the portable ASGI path.
    """
    owner = getattr(send, "__self__", None)
    if owner is None:
        return None
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
    except ImportError:  # pragma: no cover - uvicorn is part of the server extra
        return None
    if not isinstance(owner, WebSocketsSansIOProtocol) or not owner.handshake_complete:
        return None
    return writable_transport(owner.transport)


async def accept_websocket(
    hub: Hub, scope: Mapping[str, Any], receive: Any, send: Any, transport: str
) -> bool:
    """Take a WebSocket handshake: ``False`` if it was refused (403, 429, 503) or abandoned.

    The caller then sends ``websocket.accept`` (with a subprotocol, maybe).
    """
    message = await receive()
    if message["type"] != "websocket.connect":
        return False
    refusal = hub.check_handshake(scope, transport)
    if refusal is not None:
        await deny_handshake(scope, send, *refusal)
        return False
    return True


async def deny_handshake(scope: Mapping[str, Any], send: Any, status: int, message: str) -> None:
    """Refuse a WebSocket handshake with an HTTP status (403, 429, 503)."""
    body = _encode({"error": message})
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # the server cannot send a status: a close before accept is a 403
        await send({"type": "websocket.close", "code": 1008})
