"""The HTTP side of the hub's transports: headers, CORS, and refused handshakes.

Every transport (WebSocket, eventcast's SSE, HTTP-streaming, SSE emulation,
the unidirectional ones) answers a cross-origin client and a refused
handshake the same way, here. Request bodies are read and bounded by
:mod:`eventcast.server._http` (its middleware and :func:`~._http.read_body`),
and the sockets behind uvicorn's protocols are found by
:mod:`eventcast.server._uvicorn`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

from ..protocol.encodings import Encoding, get_encoding, websocket_encoding
from ._http import error_body, error_response
from .limits import origin_allowed

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "accept_websocket",
    "cors_headers",
    "deny_handshake",
    "header",
    "origin_ok",
    "preflight",
    "refuse_stream",
    "stream_headers",
    "websocket_terms",
]

#: What a cross-origin client may send to the HTTP transports (preflight answer).
_ALLOW_HEADERS: Final = b"content-type, authorization, last-event-id"


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


def stream_headers(scope: Mapping[str, Any], media_type: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a streamed response (not SSE): its type, no caching or proxy
    buffering, and CORS."""
    return [
        (b"content-type", media_type),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        *cors_headers(scope),
    ]


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


def websocket_terms(scope: Mapping[str, Any]) -> tuple[Encoding, str | None]:
    """A WebSocket connection's encoding, and the subprotocol its handshake answer names.

    See :func:`~eventcast.protocol.encodings.websocket_encoding`: the
    ``centrifuge-protobuf`` subprotocol, or ``?cf_protocol=protobuf`` /
    ``?format=protobuf``, asks for Protobuf.
    """
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    name, subprotocol = websocket_encoding(scope.get("subprotocols") or (), query)
    return get_encoding(name), subprotocol


async def deny_handshake(scope: Mapping[str, Any], send: Any, status: int, message: str) -> None:
    """Refuse a WebSocket handshake with an HTTP status (403, 429, 503)."""
    body = error_body(message)
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
