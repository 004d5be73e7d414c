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
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

from .._caches import remember
from ..events import Event
from ..exceptions import (
    AuthError,
    BackplaneError,
    EncodeError,
    KeySetError,
    LogError,
    TokenExpiredError,
)
from ..protocol import codes
from ..protocol.frames import SubscribeRequest
from ..protocol.sse import (
    RESPONSE_HEADERS,
    Cursor,
    parse_cursor,
    retry,
    sse_body,
    subscribed_event,
)
from ..topics import is_pattern
from ._http import error_response
from ._uvicorn import http_transport
from .channels import Membership
from .connection import Connection
from .errors import CommandError
from .httpio import cors_headers, header, refuse_stream

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["SSEEndpoint", "SSEStreams", "start_stream", "wait_stream"]

logger = logging.getLogger("eventcast.server")

#: Most cursors interned (the table is cleared past it).
_CURSORS_LIMIT: Final = 10_000


class SSEStreams:
    """The SSE streams of a hub: opening them, and encoding batches for their positions.

    A stream's ``id:`` is its composite cursor, so the same batch reads
    differently for streams at different positions. Bodies are encoded once
    per event; streams at the same position share one interned cursor, and so
    one payload object per batch, which the writer frames once for all.

    Args:
        hub: the hub the streams belong to.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._cursors: dict[str, Cursor] = {}

    def deliver(self, conn: Connection, events: list[Event], cache: dict[Any, Any]) -> int:
        """Queue a batch on an SSE stream; return how many events could not be encoded.

        ``cache`` is shared by the streams receiving the same batch.
        """
        failures = 0
        start: Cursor = conn.cursor
        shared = cache.get(id(start))
        if shared is not None and shared[0] is start:
            conn.cursor = shared[1]
            if shared[2]:
                conn.enqueue(shared[2])
            return 0
        out: list[bytes] = []
        cursor = start
        for event in events:
            body = cache.get(event.id)
            if body is None:
                try:
                    body = cache[event.id] = sse_body(event)
                except EncodeError as exc:
                    failures += 1
                    logger.warning("skipping an event on %r for SSE: %s", event.topic, exc)
                    continue
            if (
                event.offset is not None
                and event.epoch is not None
                and (event.topic in cursor.topics)
            ):
                cursor = cursor.advance(event.id, event.topic, event.offset, event.epoch)
                message = cursor.message.get(event.id)
                if message is None:
                    message = cursor.message[event.id] = b"id: %s\n%s" % (
                        cursor.text.encode(),
                        body,
                    )
                out.append(message)
            else:
                out.append(body)
        payload = out[0] if len(out) == 1 else b"".join(out)
        cache[id(start)] = (start, cursor, payload)
        conn.cursor = cursor
        if payload:
            conn.enqueue(payload)
        return failures

    def _intern(self, cursor: Cursor) -> Cursor:
        """One object per cursor text, so streams at the same position share their work."""
        known = self._cursors.get(cursor.text)
        if known is not None:
            return known
        return remember(self._cursors, cursor.text, cursor, _CURSORS_LIMIT)

    async def open(
        self, conn: Connection, topics: list[str], cursor: Cursor | None, *, malformed: bool = False
    ) -> tuple[bool, bool]:
        """Subscribe an SSE connection to ``topics``, replaying what ``cursor`` missed.

        Queues the ``subscribed`` event, the replayed events and the live
        events held meanwhile, in that order; each durable topic then keeps a
        handoff so no offset reaches the stream twice (see
        :mod:`eventcast.replay`). Returns ``(recovered, was_recovering)``.

        Raises:
            CommandError: a topic is invalid or not permitted.
        """
        hub = self._hub
        channels = hub.channels
        grants = {}
        for topic in topics:
            grants[topic] = await hub.commands.authorize(
                conn, SubscribeRequest(channel=topic), server_side=False
            )
        namespaces = {topic: grant.namespace for topic, grant in grants.items()}
        was_recovering = cursor is not None or malformed
        recovered = not malformed
        known = cursor.as_dict() if cursor is not None else {}
        start: dict[str, tuple[int, str]] = {}
        replays: list[Event] = []
        try:
            for topic, grant in grants.items():
                membership = Membership(channel=topic, expires_at=grant.expires_at, info=grant.info)
                await channels.join(conn, topic, membership)
                hub.commands.arm_subscription(conn, membership, grant)
            for topic in topics:
                if namespaces[topic].history_size <= 0 or is_pattern(topic):
                    continue
                since = known.get(topic)
                if since is None:
                    recovered = recovered and not was_recovering
                replay = await hub.replay(topic, since)
                conn.channels[topic].handoff = replay.handoff()
                if replay.recovered:
                    assert since is not None
                    start[topic] = since
                    replays.extend(replay.events)
                else:
                    recovered = recovered and since is None
                    start[topic] = (replay.position.offset, replay.position.epoch)
        except BaseException:
            for topic in topics:
                channels.leave(conn, topic)
            raise
        recovered = recovered and was_recovering
        conn.cursor = self._intern(Cursor.of(start))
        hub.recoveries[recovered] += was_recovering
        conn.enqueue(subscribed_event(topics, recovered, {"was_recovering": was_recovering}))
        if replays:
            hub.channels.encode_failures += self.deliver(conn, replays, {})
        for membership in list(conn.channels.values()):
            if membership.held is not None:
                channels.release(conn, membership)
        return recovered, was_recovering

    def arm(self, conn: Connection) -> None:
        """Start an SSE stream's heartbeat and close it when its token expires."""
        loop = asyncio.get_running_loop()
        interval = self._hub.settings.sse_heartbeat

        def beat() -> None:
            if conn.closed:
                return
            conn.enqueue(b": ping\n\n")
            loop.call_later(interval, beat)

        loop.call_later(interval, beat)
        conn.arm_expiry()


def _cookie(scope: dict[str, Any], name: str) -> str | None:
    raw = header(scope, b"cookie")
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
        if await refuse_stream(hub, scope, send, "sse"):
            return
        cors = cors_headers(scope)
        topics = list(dict.fromkeys(query.get("topic", [])))
        if not topics:
            await error_response(send, 400, "at least one topic query parameter is required", cors)
            return
        if len(topics) > settings.channels_per_connection:
            await error_response(
                send, 400, f"at most {settings.channels_per_connection} topics per stream", cors
            )
            return
        token = None
        auth = header(scope, b"authorization")
        if auth and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        token = (
            token or _cookie(scope, settings.sse_cookie) or (query.get("access_token") or [None])[0]
        )
        conn = hub.new_connection(send=send, transport=None, transport_name="sse", scope=scope)
        try:
            await hub.commands.authenticate(conn, token)
        except TokenExpiredError:
            await error_response(send, 401, "token expired", cors)
            return
        except KeySetError:
            await error_response(send, 503, "token keys unavailable, retry later", cors)
            return
        except AuthError:
            await error_response(send, 401, "invalid or missing token", cors)
            return
        except CommandError as exc:
            await error_response(send, _status(exc, 401), exc.message, cors)
            return
        if hub.closing:  # began while the token keys or a hook were awaited
            await error_response(send, 503, "shutting down", cors)
            return
        last_id = header(scope, b"last-event-id") or (query.get("lastEventID") or [None])[0]
        cursor = parse_cursor(last_id, topics)
        malformed = last_id is not None and cursor is None
        # Subscribe before answering, so a bad topic gets a 4xx status rather than a
        # 200 stream with an error in it; what is queued meanwhile waits for attach().
        conn.enqueue(retry(int(settings.sse_retry * 1000)))
        hub.registry.register(conn)
        try:
            await hub.sse.open(conn, topics, cursor, malformed=malformed)
        except CommandError as exc:
            hub.connection_closed(conn)
            await error_response(send, _status(exc, 400), exc.message, cors)
            return
        except (LogError, BackplaneError) as exc:
            hub.connection_closed(conn)
            logger.warning("SSE subscribe failed: %s", exc)
            await error_response(send, 503, "temporarily unavailable", cors)
            return
        except Exception:
            hub.connection_closed(conn)
            logger.exception("SSE subscribe failed")
            await error_response(send, 500, "internal server error", cors)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*RESPONSE_HEADERS, *cors],
            }
        )

        async def end(body: bytes) -> None:
            await send({"type": "http.response.body", "body": body, "more_body": False})

        if conn.closed:  # closed while subscribing (shutdown, or a full queue)
            await end(retry(1000))
            return
        raw_send = scope.get("eventcast.send", send)
        conn.sse_end = end
        conn.attach(raw_send, http_transport(raw_send))
        hub.sse.arm(conn)
        await wait_stream(conn, receive)


def _status(exc: CommandError, default: int) -> int:
    """The HTTP status of a refusal: 429 over the user's connections, 403 denied, 503 failed."""
    code = exc.code
    if code == codes.DISCONNECT_CONNECTION_LIMIT.code:
        return 429
    if code == codes.ERROR_INTERNAL.code:
        return 503  # a hook failed: temporary
    if code == codes.ERROR_PERMISSION_DENIED.code:
        return 403
    return default


async def _until_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def start_stream(
    scope: dict[str, Any], send: Any, conn: Connection, headers: list[tuple[bytes, bytes]]
) -> None:
    """Answer 200 with ``headers`` and start writing ``conn``'s queue as the streamed body."""
    await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def end(body: bytes) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": False})

    conn.sse_end = end
    raw_send = scope.get("eventcast.send", send)
    conn.attach(raw_send, http_transport(raw_send))


async def wait_stream(conn: Connection, receive: Any) -> None:
    """Race the client's disconnect against the end of a streamed response (as Starlette does)."""
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
