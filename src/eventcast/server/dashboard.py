"""The live web dashboard at ``/``: static files shipped in the package, fed by the hub.

The page (``static/``, no build step) reads:

* ``GET /dashboard/api/stream?tail=PATTERN`` — Server-Sent Events: ``stats``
  twice a second (connections, subscriptions, topics with their traffic and last
  offsets, drops, slow disconnects, dead letters) and ``tail`` events for the
  topics matching the chosen patterns;
* ``POST /dashboard/api/publish`` — the publish form;
* ``GET /dashboard/api/dead-letters`` and ``POST /dashboard/api/dead-letters/redrive``;
* ``GET /dashboard/api/session`` — the CSRF token of the page's session.

The dashboard reads every channel (private ``#`` channels included) and
publishes, so who may use it is strict:

* **Without** ``admin_token`` (the default) the dashboard, its files and its API
  answer **loopback clients only**, addressed by a loopback host name
  (``localhost``, ``127.0.0.1``, ``[::1]``: a DNS-rebound name is refused). A
  request forwarded by a trusted proxy (``forwarded_allow_ips``) counts as its
  original client. Anyone else gets 403. The startup log says so in one line.
* **With** ``admin_token`` the page and its files are public (the page asks for
  the token) and the API needs a session: ``POST /dashboard/api/login`` with the
  token (rate-limited per client address: ``admin_login_rate``) sets the
  ``eventcast_admin`` cookie (HttpOnly, SameSite=Strict, ``admin_session_ttl``
  long) holding a signed session value, an expiry and a random id signed with a
  key derived from the token, never the token itself, and returns the session's
  CSRF token. Scripts may send ``Authorization: Bearer <admin_token>`` instead.

State-changing requests (login, publish, redrive) accept only
``application/json`` bodies and refuse a cross-origin ``Origin``; with a cookie
session they also need the ``Origin`` header and the session's CSRF token in
``X-CSRF-Token``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Final

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._caches import remember
from ..exceptions import EventcastError, InvalidTopicError
from ..protocol.frames import int_in_range
from ..protocol.sse import RESPONSE_HEADERS, encode_event, retry
from ..subscription import Overflow
from ..topics import validate_pattern
from ._http import BodyError, client_host, is_loopback, read_json
from .errors import CommandError
from .hub import Hub
from .limits import TokenBucket, origin_allowed

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["Dashboard", "dashboard_routes", "log_access_mode"]

logger = logging.getLogger("eventcast.server")

_encode = msgspec.json.Encoder().encode
_COOKIE: Final = "eventcast_admin"
_CSRF_HEADER: Final = "x-csrf-token"
_STATIC = files("eventcast.server") / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
#: The largest login body (``{"token": ...}``), in bytes.
LOGIN_BODY_LIMIT: Final = 4096
#: The largest redrive body (``{"ids": [...]}``), in bytes.
REDRIVE_BODY_LIMIT: Final = 65_536
#: Login attempts a client address may make at once (then ``admin_login_rate`` per second).
LOGIN_BURST: Final = 5
#: Client addresses whose login buckets are remembered (past it they start afresh).
_MAX_LOGIN_BUCKETS: Final = 10_000
_SESSION_VERSION: Final = "v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Sessions:
    """Signed dashboard sessions: ``v1.<expiry>.<random id>.<HMAC-SHA256>``.

    The signing key is derived from the admin token, so changing the token ends
    every session; the cookie never holds the token.

    Args:
        admin_token: the hub's ``admin_token``.
        ttl: seconds a session lasts.
        clock: wall-clock seconds, injectable for tests.
    """

    def __init__(
        self, admin_token: str, ttl: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = hmac.new(
            admin_token.encode("utf-8", "surrogatepass"),
            b"eventcast dashboard session key",
            hashlib.sha256,
        ).digest()
        self.ttl = ttl
        self._clock = clock

    def _sign(self, text: str) -> str:
        data = text.encode("utf-8", "surrogatepass")
        return _b64(hmac.new(self._key, data, hashlib.sha256).digest())

    def issue(self) -> str:
        """A new session value."""
        expires = int(self._clock() + self.ttl)
        body = f"{_SESSION_VERSION}.{expires}.{_b64(secrets.token_bytes(18))}"
        return f"{body}.{self._sign(body)}"

    def verify(self, value: str) -> str | None:
        """The id of a valid, unexpired session value, or ``None``."""
        body, _, signature = value.rpartition(".")
        if not hmac.compare_digest(signature.encode("utf-8", "replace"), self._sign(body).encode()):
            return None
        parts = body.split(".")
        if len(parts) != 3:
            return None
        version, expires, session_id = parts
        if version != _SESSION_VERSION or not (expires.isascii() and expires.isdigit()):
            return None
        if int(expires) < self._clock():
            return None
        return session_id

    def csrf(self, session_id: str) -> str:
        """The CSRF token bound to a session."""
        return self._sign(f"csrf.{session_id}")


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who is calling: a cookie session's id, or ``None`` (a loopback client, a bearer)."""

    session: str | None = None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _denied() -> Response:
    return _error(401, "admin token required")


def _loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback (or is absent: no browser)."""
    if host is None:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8000
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:  # 127.0.0.1:8000, localhost:8000
        name = name.partition(":")[0]
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def _json_body(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json"


def log_access_mode(settings: Settings) -> None:
    """Say in one startup line who may use the dashboard."""
    if settings.admin_token is None:
        logger.info(
            "dashboard: no admin_token is set, so the dashboard answers loopback clients only"
        )
    else:
        logger.info("dashboard: open to clients that log in with the admin_token")


class Dashboard:
    """The dashboard's endpoints and the rules of who may use them.

    Args:
        settings: the hub's settings (``admin_token``, ``admin_session_ttl``,
            ``admin_login_rate``).
    """

    def __init__(self, settings: Settings) -> None:
        token = settings.admin_token
        self._admin: bytes | None = None
        self.sessions: Sessions | None = None
        if token is not None:
            secret = token.get_secret_value()
            self._admin = secret.encode("utf-8", "surrogatepass")
            self.sessions = Sessions(secret, settings.admin_session_ttl)
        self._login_rate = settings.admin_login_rate
        self._login_buckets: dict[str, TokenBucket] = {}

    # -- who may -----------------------------------------------------------------------------

    @staticmethod
    def _local_refusal(request: Request) -> Response | None:
        if not is_loopback(client_host(request.scope)):
            return _error(
                403, "the dashboard answers loopback clients only (set admin_token to open it)"
            )
        if not _loopback_host(request.headers.get("host")):
            return _error(403, "the dashboard answers on a loopback host name only")
        return None

    def _caller(self, request: Request) -> _Caller | Response:
        """Who is calling the API, or the refusal to answer."""
        sessions, admin = self.sessions, self._admin
        if sessions is None or admin is None:
            return self._local_refusal(request) or _Caller()
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip().encode("utf-8", "surrogatepass")
            return _Caller() if hmac.compare_digest(given, admin) else _denied()
        value = request.cookies.get(_COOKIE)
        session = sessions.verify(value) if value else None
        return _denied() if session is None else _Caller(session)

    def _change_refusal(self, request: Request, caller: _Caller) -> Response | None:
        """Checks of a state-changing request: same origin, the CSRF token, a JSON body."""
        origin = request.headers.get("origin")
        if not origin_allowed(origin, request.headers.get("host"), ()):
            return _error(403, "cross-origin request refused")
        if caller.session is not None and self.sessions is not None:
            if origin is None:
                return _error(403, "the Origin header is required")
            given = request.headers.get(_CSRF_HEADER, "").encode("utf-8", "surrogatepass")
            if not hmac.compare_digest(given, self.sessions.csrf(caller.session).encode()):
                return _error(403, "missing or wrong CSRF token")
        if not _json_body(request.headers.get("content-type")):
            return _error(415, "only application/json bodies are accepted")
        return None

    def _login_allowed(self, request: Request) -> bool:
        host = client_host(request.scope) or ""
        bucket = self._login_buckets.get(host)
        if bucket is None:
            bucket = remember(
                self._login_buckets,
                host,
                TokenBucket(self._login_rate, LOGIN_BURST),
                _MAX_LOGIN_BUCKETS,
            )
        return bucket.take()

    # -- the page ----------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        """The dashboard page (static; it asks for the admin token when one is needed)."""
        return self._page_refusal(request) or _static("index.html")

    async def static(self, request: Request) -> Response:
        """The page's script and style sheet."""
        refusal = self._page_refusal(request)
        if refusal is not None:
            return refusal
        name = request.path_params["name"]
        if name not in ("app.js", "style.css"):
            return Response(status_code=404)
        return _static(name)

    def _page_refusal(self, request: Request) -> Response | None:
        return self._local_refusal(request) if self.sessions is None else None

    # -- the API -----------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        """Exchange the admin token for a session cookie; answer the session's CSRF token."""
        if not self._login_allowed(request):
            return _error(429, "too many login attempts", {"retry-after": "1"})
        sessions, admin = self.sessions, self._admin
        if sessions is None or admin is None:
            refusal = self._local_refusal(request)
            if refusal is not None:
                return refusal
        refusal = self._change_refusal(request, _Caller())
        if refusal is not None:
            return refusal
        try:
            body = await read_json(request, LOGIN_BODY_LIMIT)
        except BodyError as exc:
            return _error(exc.status, exc.message, exc.headers)
        if sessions is None or admin is None:
            return JSONResponse({"ok": True, "csrf": None})
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), admin
        ):
            return _denied()
        value = sessions.issue()
        session = sessions.verify(value)
        assert session is not None  # just issued
        response = JSONResponse({"ok": True, "csrf": sessions.csrf(session)})
        response.set_cookie(
            _COOKIE,
            value,
            max_age=int(sessions.ttl),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def session(self, request: Request) -> Response:
        """The CSRF token of the caller's session (``null`` when none is needed)."""
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        csrf = None
        if caller.session is not None and self.sessions is not None:
            csrf = self.sessions.csrf(caller.session)
        return JSONResponse({"csrf": csrf})

    async def stats(self, request: Request) -> Response:
        """One stats snapshot (for scripts; the page uses the stream)."""
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        hub: Hub = request.app.state.hub
        return Response(_encode(snapshot(hub)), media_type="application/json")

    async def _change(self, request: Request, limit: int | None = None) -> Any:
        """The JSON body of a state-changing request by an allowed caller, or the refusal."""
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        refusal = self._change_refusal(request, caller)
        if refusal is not None:
            return refusal
        try:
            return await read_json(request, limit, empty={})
        except BodyError as exc:
            return _error(exc.status, exc.message, exc.headers)

    async def publish(self, request: Request) -> Response:
        """The publish form: ``{"topic": ..., "data": <JSON>}``."""
        body = await self._change(request)
        if isinstance(body, Response):
            return body
        topic = body.get("topic") if isinstance(body, dict) else None
        if not isinstance(topic, str) or "data" not in body:
            return _error(400, "expected {topic, data}")
        hub: Hub = request.app.state.hub
        try:
            event = await hub.publish(topic, body["data"])
        except CommandError as exc:
            return _error(400, exc.message)
        except EventcastError as exc:
            return _error(503, f"{type(exc).__name__}: {exc}")
        return JSONResponse({"offset": event.offset, "epoch": event.epoch, "id": event.id})

    async def dead_letters(self, request: Request) -> Response:
        """The newest dead letters (at most 200)."""
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        hub: Hub = request.app.state.hub
        letters = hub.bus.dead_letters.list()[-200:]
        body = _encode([letter.to_json() for letter in reversed(letters)])
        return Response(body, media_type="application/json")

    async def redrive(self, request: Request) -> Response:
        """Redrive dead letters: ``{"ids": [...]}`` (all when omitted)."""
        body = await self._change(request, REDRIVE_BODY_LIMIT)
        if isinstance(body, Response):
            return body
        ids = body.get("ids") if isinstance(body, dict) else None
        if ids is not None and not (isinstance(ids, list) and all(int_in_range(i) for i in ids)):
            return _error(400, "ids must be a list of ints")
        hub: Hub = request.app.state.hub
        count = await hub.bus.dead_letters.redrive(ids=ids)
        return JSONResponse({"redriven": count})

    def routes(self) -> list[Route]:
        """The dashboard's routes."""
        return [
            Route("/", self.index),
            Route("/dashboard/static/{name}", self.static),
            Route("/dashboard/api/login", self.login, methods=["POST"]),
            Route("/dashboard/api/session", self.session),
            Route("/dashboard/api/stats", self.stats),
            Route("/dashboard/api/stream", StreamEndpoint(self)),
            Route("/dashboard/api/publish", self.publish, methods=["POST"]),
            Route("/dashboard/api/dead-letters", self.dead_letters),
            Route("/dashboard/api/dead-letters/redrive", self.redrive, methods=["POST"]),
        ]


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
        "subscriptions": hub.channels.subscriptions,
        "channels": len(hub.channels),
        "topics": topics,
        "published": bus["published"],
        "dropped": bus["dropped"],
        "slow_disconnects": hub.disconnects.get(3008, 0),
        "disconnects": {str(k): v for k, v in sorted(hub.disconnects.items())},
        "dead_letters": bus["dead_letters"],
        "backplane_up": hub.backplane_up(),
        "consumers": consumers.status() if (consumers := hub.consumers) else [],
        "nodes": hub.cluster.info(),
    }


def _static(name: str) -> Response:
    body = (_STATIC / name).read_bytes()
    suffix = name[name.rfind(".") :]
    return Response(
        body,
        media_type=_TYPES[suffix],
        headers={"cache-control": "no-cache", "x-content-type-options": "nosniff"},
    )


class StreamEndpoint:
    """``/dashboard/api/stream``: stats twice a second, plus a live tail (SSE)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        hub: Hub = scope["app"].state.hub
        caller = self.dashboard._caller(request)
        if isinstance(caller, Response):
            await caller(scope, receive, send)
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


def dashboard_routes(settings: Settings) -> list[Route]:
    """The dashboard's routes (mounted by :func:`eventcast.server.app.create_app`)."""
    return Dashboard(settings).routes()
