"""The live web dashboard at ``/``: static files shipped in the package, fed by the hub.

The page (``static/``, no build step) reads:

* ``GET /dashboard/api/stream?tail=PATTERN`` — Server-Sent Events: ``stats``
  twice a second (connections, subscriptions, topics with their traffic and last
  offsets, drops, slow disconnects, dead letters) and ``tail`` events for the
  topics matching the chosen patterns;
* ``POST /dashboard/api/publish`` — the publish form;
* ``GET /dashboard/api/dead-letters`` and ``POST /dashboard/api/dead-letters/redrive``.

When ``admin_token`` is set, every dashboard call needs it: as
``Authorization: Bearer <token>``, or as the ``eventcast_admin`` cookie that
``POST /dashboard/api/login`` sets (HttpOnly, SameSite=Strict).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from importlib.resources import files
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..exceptions import EventcastError, InvalidTopicError
from ..protocol.sse import RESPONSE_HEADERS, encode_event, retry
from ..subscription import Overflow
from ..topics import validate_pattern
from .errors import CommandError
from .hub import Hub

__all__ = ["dashboard_routes"]

_encode = msgspec.json.Encoder().encode
_COOKIE = "eventcast_admin"
_STATIC = files("eventcast.server") / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}


def _authorized(request: Request, hub: Hub) -> bool:
    secret = hub.settings.admin_token
    if secret is None:
        return True
    expected = secret.get_secret_value().encode()
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    given = given or request.cookies.get(_COOKIE)
    return given is not None and hmac.compare_digest(given.encode(), expected)


def _denied() -> Response:
    return JSONResponse({"error": "admin token required"}, status_code=401)


def snapshot(hub: Hub) -> dict[str, Any]:
    """Everything the dashboard shows, as JSON-ready data."""
    transports = {"websocket": 0, "sse": 0}
    for conn in list(hub.connections.values()):
        transports[conn.transport_name] = transports.get(conn.transport_name, 0) + 1
    bus = hub.bus.statistics()
    topics = [
        {"topic": topic, "count": count, "last_offset": offset, "last_time": at}
        for topic, (count, offset, at) in hub.bus.topic_stats.items()
    ]
    return {
        "time": time.time(),
        "node": hub.stats(),
        "connections": transports,
        "subscriptions": sum(len(c.members) for c in hub.channels.by_name.values()),
        "channels": len(hub.channels),
        "topics": topics,
        "published": bus["published"],
        "dropped": bus["dropped"],
        "slow_disconnects": hub.disconnects.get(3008, 0),
        "disconnects": {str(k): v for k, v in sorted(hub.disconnects.items())},
        "dead_letters": bus["dead_letters"],
        "backplane_up": hub.backplane_up(),
        "consumers": consumers.status() if (consumers := hub.consumers) else [],
    }


async def index(request: Request) -> Response:
    """The dashboard page (static; it asks for the admin token when one is needed)."""
    return _static("index.html")


async def static(request: Request) -> Response:
    """The page's script and style sheet."""
    name = request.path_params["name"]
    if name not in ("app.js", "style.css"):
        return Response(status_code=404)
    return _static(name)


def _static(name: str) -> Response:
    body = (_STATIC / name).read_bytes()
    suffix = name[name.rfind(".") :]
    return Response(
        body,
        media_type=_TYPES[suffix],
        headers={"cache-control": "no-cache", "x-content-type-options": "nosniff"},
    )


async def login(request: Request) -> Response:
    """Exchange the admin token for an HttpOnly cookie."""
    hub: Hub = request.app.state.hub
    secret = hub.settings.admin_token
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        return JSONResponse({"error": "body is not JSON"}, status_code=400)
    token = body.get("token") if isinstance(body, dict) else None
    if secret is None:
        return JSONResponse({"ok": True})
    if not isinstance(token, str) or not hmac.compare_digest(
        token.encode(), secret.get_secret_value().encode()
    ):
        return _denied()
    response = JSONResponse({"ok": True})
    response.set_cookie(_COOKIE, token, httponly=True, samesite="strict", path="/")
    return response


async def stats(request: Request) -> Response:
    """One stats snapshot (for scripts; the page uses the stream)."""
    hub: Hub = request.app.state.hub
    if not _authorized(request, hub):
        return _denied()
    return Response(_encode(snapshot(hub)), media_type="application/json")


async def publish(request: Request) -> Response:
    """The publish form: ``{"topic": ..., "data": <JSON>}``."""
    hub: Hub = request.app.state.hub
    if not _authorized(request, hub):
        return _denied()
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        return JSONResponse({"error": "body is not JSON"}, status_code=400)
    if not isinstance(body, dict) or not isinstance(body.get("topic"), str) or "data" not in body:
        return JSONResponse({"error": "expected {topic, data}"}, status_code=400)
    try:
        event = await hub.publish(body["topic"], body["data"])
    except CommandError as exc:
        return JSONResponse({"error": exc.message}, status_code=400)
    except EventcastError as exc:
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=503)
    return JSONResponse({"offset": event.offset, "epoch": event.epoch, "id": event.id})


async def dead_letters(request: Request) -> Response:
    """The newest dead letters (at most 200)."""
    hub: Hub = request.app.state.hub
    if not _authorized(request, hub):
        return _denied()
    letters = hub.bus.dead_letters.list()[-200:]
    body = _encode([letter.to_json() for letter in reversed(letters)])
    return Response(body, media_type="application/json")


async def redrive(request: Request) -> Response:
    """Redrive dead letters: ``{"ids": [...]}`` (all when omitted)."""
    hub: Hub = request.app.state.hub
    if not _authorized(request, hub):
        return _denied()
    try:
        body = msgspec.json.decode(await request.body() or b"{}")
    except msgspec.DecodeError:
        return JSONResponse({"error": "body is not JSON"}, status_code=400)
    ids = body.get("ids") if isinstance(body, dict) else None
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        return JSONResponse({"error": "ids must be a list of ints"}, status_code=400)
    count = await hub.bus.dead_letters.redrive(ids=ids)
    return JSONResponse({"redriven": count})


class StreamEndpoint:
    """``/dashboard/api/stream``: stats twice a second, plus a live tail (SSE)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        hub: Hub = scope["app"].state.hub
        if not _authorized(request, hub):
            await _denied()(scope, receive, send)
            return
        patterns = list(dict.fromkeys(request.query_params.getlist("tail")))
        try:
            for pattern in patterns:
                validate_pattern(pattern)
        except InvalidTopicError as exc:
            await JSONResponse({"error": str(exc)}, status_code=400)(scope, receive, send)
            return
        sub = (
            hub.bus.subscribe(patterns, maxsize=1000, overflow=Overflow.DROP_OLDEST)
            if patterns
            else None
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": list(RESPONSE_HEADERS),
            }
        )

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def produce() -> None:
            await body(retry(2000))
            while True:
                await body(encode_event(_encode(snapshot(hub)), event="stats"))
                if sub is None:
                    await asyncio.sleep(0.5)
                    continue
                deadline = asyncio.get_running_loop().time() + 0.5
                while (left := deadline - asyncio.get_running_loop().time()) > 0:
                    try:
                        async with asyncio.timeout(left):
                            events = await sub.get_batch(100)
                    except TimeoutError:
                        break
                    for event in events:
                        try:
                            data = event.encoded_data()
                        except EventcastError:
                            data = _encode(repr(event.data))
                        message = b'{"topic":%s,"offset":%s,"epoch":%s,"data":%s,"tags":%s}' % (
                            _encode(event.topic),
                            _encode(event.offset),
                            _encode(event.epoch),
                            data,
                            _encode(dict(event.tags)),
                        )
                        await body(encode_event(message, event="tail"))

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(produce()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            if sub is not None:
                sub.close()
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def dashboard_routes() -> list[Route]:
    """The dashboard's routes (mounted by :func:`eventcast.server.app.create_app`)."""
    return [
        Route("/", index),
        Route("/dashboard/static/{name}", static),
        Route("/dashboard/api/login", login, methods=["POST"]),
        Route("/dashboard/api/stats", stats),
        Route("/dashboard/api/stream", StreamEndpoint()),
        Route("/dashboard/api/publish", publish, methods=["POST"]),
        Route("/dashboard/api/dead-letters", dead_letters),
        Route("/dashboard/api/dead-letters/redrive", redrive, methods=["POST"]),
    ]
