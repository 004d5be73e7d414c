"""``/connection/sse``: a Server-Sent Events stream for a plain browser ``EventSource``.

.. code-block:: javascript

    const source = new EventSource("/connection/sse?topic=news&topic=prices.*",
                                   {withCredentials: true});
    source.addEventListener("subscribed", (e) => console.log(JSON.parse(e.data)));
    source.onmessage = (e) => console.log(JSON.parse(e.data));   // {topic, offset, ...}

Topics come from repeated ``topic`` query parameters. The token comes from the
``Authorization: Bearer`` header, the cookie named by ``sse_cookie``, or the
``access_token`` query parameter (redacted from logs, as every secret-looking
query parameter is: see :mod:`eventcast.server._logs`). The browser's
``Last-Event-ID`` header (or a ``lastEventID`` query parameter on the first
connection) resumes every durable topic exactly; see
:mod:`eventcast.protocol.sse` for the event format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import parse_qs

import msgspec

from ..exceptions import AuthError, TokenExpiredError
from ..protocol import codes
from ..protocol.codes import ClientError
from ..protocol.sse import parse_cursor, retry
from ._uvicorn import http_transport as _raw_http_transport
from .connection import Connection
from .hub import CommandError, Hub

__all__ = ["SSEEndpoint"]

logger = logging.getLogger("eventcast.server")
_encode = msgspec.json.Encoder().encode


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _cookie(scope: dict[str, Any], name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class SSEEndpoint:
    """The ASGI endpoint of ``/connection/sse``."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        hub: Hub = scope["app"].state.hub
        settings = hub.settings
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        origin = _header(scope, b"origin")
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            cors = [
                (b"access-control-allow-origin", origin.encode()),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin"),
            ]
        refusal = hub.check_handshake(scope, "sse")
        if refusal is not None:
            status, message = refusal
            await self._error(send, status, message, cors if status != 403 else [])
            return
        topics = list(dict.fromkeys(query.get("topic", [])))
        if not topics:
            await self._error(send, 400, "at least one topic query parameter is required", cors)
            return
        if len(topics) > settings.channels_per_connection:
            await self._error(
                send, 400, f"at most {settings.channels_per_connection} topics per stream", cors
            )
            return
        token = None
        auth = _header(scope, b"authorization")
        if auth and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        token = (
            token or _cookie(scope, settings.sse_cookie) or (query.get("access_token") or [None])[0]
        )
        conn = Connection(
            hub,
            send=send,
            transport=None,
            queue_limit=settings.client_queue_bytes,
            transport_name="sse",
            start_writer=False,
        )
        try:
            hub.authenticate(conn, token)
        except TokenExpiredError:
            await self._error(send, 401, "token expired", cors)
            return
        except AuthError:
            await self._error(send, 401, "invalid or missing token", cors)
            return
        except CommandError as exc:
            answer = exc.answer
            text = answer.message if isinstance(answer, ClientError) else answer.reason
            status = 429 if answer.code == codes.DISCONNECT_CONNECTION_LIMIT.code else 401
            await self._error(send, status, text, cors)
            return
        last_id = _header(scope, b"last-event-id") or (query.get("lastEventID") or [None])[0]
        cursor = parse_cursor(last_id, topics)
        malformed = last_id is not None and cursor is None
        # Subscribe before answering, so a bad topic gets a 4xx status rather than a
        # 200 stream with an error in it; what is queued meanwhile waits for attach().
        conn.enqueue(retry(int(settings.sse_retry * 1000)))
        hub._register(conn)
        try:
            await hub.sse_open(conn, topics, cursor, malformed=malformed)
        except CommandError as exc:
            hub._forget(conn)
            answer = exc.answer
            message = answer.message if isinstance(answer, ClientError) else answer.reason
            status = 403 if answer.code == codes.ERROR_PERMISSION_DENIED.code else 400
            await self._error(send, status, message, cors)
            return
        except Exception:
            hub._forget(conn)
            logger.exception("SSE subscribe failed")
            await self._error(send, 500, "internal server error", cors)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *cors,
                ],
            }
        )

        async def end(body: bytes) -> None:
            await send({"type": "http.response.body", "body": body, "more_body": False})

        if conn.closed:  # closed while subscribing (shutdown, or a full queue)
            await end(retry(1000))
            return
        raw_send = scope.get("eventcast.send", send)
        conn.sse_end = end
        conn.attach(raw_send, _raw_http_transport(raw_send))
        hub.arm_sse(conn)
        await self._wait(conn, receive)

    @staticmethod
    async def _wait(conn: Connection, receive: Any) -> None:
        """Race the client's disconnect against the stream's end (as Starlette does)."""
        closed = asyncio.ensure_future(conn.wait_closed())
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({closed, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if disconnected.done() and not conn.closed:
                conn.lost()
            for task in (closed, disconnected):
                task.cancel()
            if conn.closed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await conn.wait_closed()

    @staticmethod
    async def _error(send: Any, status: int, message: str, headers: list[Any]) -> None:
        body = _encode({"error": message})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *headers],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _until_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
