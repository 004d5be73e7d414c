"""Everything eventcast does with uvicorn's internals, in one place.

``eventcast serve`` runs the hub under uvicorn and relies on parts of it that
uvicorn does not document:

* **the HTTP protocol class** (``HttpToolsProtocol``), subclassed to bound every
  request of a connection: its request line and headers in size (431, then the
  connection is closed) and in time (``header_timeout``, armed again for each
  request of a keep-alive connection), and its body in time (a backstop to the
  ASGI-level limit of :mod:`eventcast.server._http`, for bodies nobody reads),
  and its pipelined requests in number (:data:`MAX_PIPELINED`, through its flow
  control); whose request cycles write a response's head and body in one write
  (:class:`HeadWithBody`, through the cycle's ``transport``); and which answers
  the hub's HTTP API itself when a call's body came whole with its head (its
  parser state, pipeline and keep-alive handling);
* **the WebSocket protocol class** (``WebSocketsSansIOProtocol``), subclassed so
  that a text frame which is not UTF-8 is closed with 1007 without the ERROR and
  traceback uvicorn logs for it;
* **the transports** behind uvicorn's ``send`` callables, which the hub's fast
  path writes pre-framed bytes to;
* **the server's shutdown and signal handling** (``Server.shutdown``,
  ``capture_signals`` and ``_captured_signals``), for the graceful stop.

:func:`check` verifies each of them against the installed uvicorn and names its
version when one is missing; :func:`make_server` calls it, so a uvicorn that
changed fails at start rather than running without the protections, and
``tests/server/test_uvicorn_adapter.py`` calls it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

from .._tasks import release_unawaited
from ..exceptions import ConfigurationError
from ..protocol.framing import closing_response
from ..protocol.websocket import offered_subprotocols

if TYPE_CHECKING:
    import uvicorn

    from .api import Answer

__all__ = [
    "HeadWithBody",
    "check",
    "forwarded_headers",
    "http_protocol",
    "http_transport",
    "make_server",
    "receive_ready",
    "uvicorn_version",
    "websocket_protocol",
    "websocket_transport",
]

#: How long a refused connection keeps draining what the client still sends before it
#: is closed, so the refusal (431) reaches the client instead of being lost to a reset.
LINGER: Final = 2.0
#: Past the ASGI body timeout, how long the protocol waits before it closes a
#: connection whose request body never completed (the application answers 408 first).
BODY_GRACE: Final = 1.0
#: Requests a connection may have queued behind the one being answered (pipelined).
#: Past it, the protocol stops reading the connection until the queue is shorter.
MAX_PIPELINED: Final = 16
#: Bytes of a read fed to the parser at a time when many request heads may end
#: in it, so that it stops being parsed (into request cycles) once MAX_PIPELINED
#: wait. A read with fewer line feeds than two per MAX_PIPELINED heads is fed whole.
_FEED_SLICE: Final = 4096

#: The undocumented uvicorn names eventcast relies on: ``(module, class, attributes)``.
_INTERNALS: Final = (
    (
        "uvicorn.protocols.http.httptools_impl",
        "HttpToolsProtocol",
        (
            "connection_made",
            "connection_lost",
            "data_received",
            "on_message_begin",
            "on_headers_complete",
            "on_message_complete",
            "on_body",
            "on_response_complete",
            "_should_upgrade",
            "_unset_keepalive_if_required",
        ),
    ),
    ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle", ("send", "receive")),
    ("uvicorn.protocols.http.httptools_impl", "STATUS_LINE", ()),
    (
        "uvicorn.protocols.http.flow_control",
        "FlowControl",
        ("pause_reading", "resume_reading", "pause_writing", "resume_writing"),
    ),
    ("uvicorn.protocols.utils", "get_client_addr", ()),
    (
        "uvicorn.protocols.websockets.websockets_sansio_impl",
        "WebSocketsSansIOProtocol",
        ("send_receive_event_to_app", "handle_parser_exception", "send", "data_received"),
    ),
    ("uvicorn.server", "Server", ("shutdown", "capture_signals", "startup")),
    ("uvicorn.middleware.proxy_headers", "ProxyHeadersMiddleware", ("__call__",)),
)
#: Instance attributes (assigned in methods, so not visible on the class).
_INSTANCE_ATTRIBUTES: Final = {
    "HttpToolsProtocol": (
        "transport",
        "cycle",
        "parser",
        "loop",
        "app",
        "flow",
        "pipeline",
        "headers",
        "url",
        "scope",
        "expect_100_continue",
        "client",
        "server",
        "limit_concurrency",
        "root_path",
        "server_state",
        "tasks",
        "access_log",
        "access_logger",
        "timeout_keep_alive",
    ),
    "RequestResponseCycle": (
        "transport",
        "chunked_encoding",
        "response_complete",
        "message_event",
        "keep_alive",
        "disconnected",
    ),
    "FlowControl": ("read_paused", "write_paused"),
    "WebSocketsSansIOProtocol": (
        "transport",
        "handshake_complete",
        "conn",
        "frames",
        "curr_msg_data_type",
        "close_sent",
        "logger",
    ),
    "Server": ("servers", "_captured_signals"),
}


def uvicorn_version() -> str:
    """The installed uvicorn's version (``"not installed"`` without it)."""
    try:
        import uvicorn
    except ImportError:
        return "not installed"
    return str(uvicorn.__version__)


@functools.cache
def _missing() -> tuple[str, ...]:
    """The internals this module needs that the installed uvicorn lacks (checked once)."""
    import importlib
    import inspect

    missing: list[str] = []
    for module_name, class_name, names in _INTERNALS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{class_name}")
            continue
        missing += [f"{class_name}.{name}" for name in names if not hasattr(cls, name)]
        expected = _INSTANCE_ATTRIBUTES.get(class_name, ())
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # no source shipped: nothing more to check
            continue
        missing += [
            f"{class_name}().{name}"
            for name in expected
            if not re.search(rf"self\.{name}\s*(?::[^=\n]*)?=", source)  # assigned somewhere
        ]
    return tuple(missing)


def check() -> None:
    """Verify that the installed uvicorn has every internal this module relies on.

    Raises:
        ConfigurationError: one is missing; the message names them and the
            installed uvicorn version.
    """
    missing = _missing()
    if missing:
        raise ConfigurationError(
            f"uvicorn {uvicorn_version()} lacks internals eventcast relies on "
            f"({', '.join(missing)}): install a uvicorn version eventcast supports"
        )


# -- transports of the fast path ---------------------------------------------------------------


def _writable(transport: object) -> asyncio.WriteTransport | None:
    from .connection import writable_transport

    return writable_transport(transport)


def websocket_transport(send: Any) -> asyncio.WriteTransport | None:
    """The socket transport behind uvicorn's sans-I/O WebSocket protocol, if that is the server.

    Writing pre-framed bytes straight to it is eventcast's fast path; any
    other server gets the portable ASGI path (``None``).
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
    return _writable(owner.transport)


@functools.cache
def _cycle_class() -> type | None:
    try:
        from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
    except ImportError:  # pragma: no cover - uvicorn is part of the server extra
        return None
    return RequestResponseCycle


def receive_ready(receive: Any) -> bool:
    """Whether ``receive`` (an HTTP request's) returns without waiting: what it returns is here.

    uvicorn's httptools protocol sets its cycle's ``message_event`` when body
    bytes (or the disconnect) arrived; then ``receive()`` does not wait, and
    needs no timeout. Any other server: ``False`` (the caller times it).
    """
    owner = getattr(receive, "__self__", None)
    cls = _cycle_class()
    if cls is None or not isinstance(owner, cls):
        return False
    event: asyncio.Event = getattr(owner, "message_event")  # noqa: B009 (an internal, checked)
    return event.is_set()


def http_transport(send: Any) -> asyncio.WriteTransport | None:
    """The transport behind uvicorn's httptools protocol, when the response is chunked."""
    owner = getattr(send, "__self__", None)
    if owner is None or not getattr(owner, "chunked_encoding", False):
        return None
    return _writable(getattr(owner, "transport", None))


# -- the HTTP protocol -------------------------------------------------------------------------


_HEAD_TOO_LARGE: Final = closing_response(431, b"request line and headers too large")


def http_protocol(
    *, header_timeout: float, body_timeout: float, max_head: int
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, with every request's head and body bounded.

    Args:
        header_timeout: seconds a client has to send each request's line and
            headers, from its first byte (from the connection for the first
            request); past it the connection is closed.
        body_timeout: seconds a request body has to arrive once its headers
            did. The ASGI layer answers 408 at that point; this protocol closes
            the connection :data:`BODY_GRACE` seconds later if the body still
            has not ended (a body nobody reads, on a keep-alive connection).
        max_head: the most bytes of a request line and headers. Past it the
            client gets 431 and the connection is closed. The count is exact
            for every request that starts at the beginning of a read (the first
            of a connection, and the next of a keep-alive connection, whether or
            not its whole head is in that read); a request pipelined behind
            another in the same read is counted from the next bytes fed on
            (a read in which many heads can end is fed in slices of 4 KiB;
            within one, no header is concatenated piece by piece).

    At most :data:`MAX_PIPELINED` requests wait behind the one being answered;
    past that the connection is not read until the queue is shorter. A call of
    the hub's API (``POST /api/<method>``, when the app served is the hub's)
    whose declared body arrived with its head, on a connection with nothing
    else in flight, is answered by the protocol itself with the API's rules
    (:func:`~eventcast.server.api.answer_api_body`): no ASGI cycle, task or
    middleware, and no coroutine when the method needs no await.
    """
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    from uvicorn.protocols.utils import get_client_addr

    from .api import API_TARGETS, answer_api_body, api_method, api_response_head

    class HeldFlow(FlowControl):
        """uvicorn's flow control, whose reading stays paused while ``held``.

        uvicorn resumes reading whenever a request cycle waits for its body,
        even with requests queued; the protocol holds reading while
        :data:`MAX_PIPELINED` requests wait, and lets go itself.
        """

        held = False

        def resume_reading(self) -> None:
            if not self.held:
                super().resume_reading()

    class HardenedHttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with bounded request heads and bodies."""

        #: The hub served, when the app is the hub's own (its API is answered here).
        _hub: Any = None
        #: An API call taken over (:meth:`_take_api`) whose body is arriving.
        _api: _ApiCall | None = None
        #: Bytes read but not parsed, held while MAX_PIPELINED requests wait.
        _unfed: bytes | None = None
        _flow: HeldFlow
        #: When the connection went idle after an answer of this protocol's
        #: (``None``: a request is in progress), and the timer that checks it.
        _idle_since: float | None = None
        _idle_timer: asyncio.TimerHandle | None = None
        _timer: asyncio.TimerHandle | None = None
        #: The timer to arm once the current read is fed: ``(delay, callback)``.
        _due: tuple[float, Callable[[], None]] | None = None
        _in_head = True
        #: A new request's head began while the current read was fed.
        _new_head = False
        #: The last request ended and the next has not begun: the next bytes are a head.
        _between = False
        #: The bytes being fed began between requests (their first is a head's).
        _head_at_start = False
        _head_bytes = 0
        _refused = False
        #: ``_due`` of a head: its timeout and what closes the connection past it.
        _head_due: tuple[float, Callable[[], None]]
        #: The hub's ``max_body_size``, when the hub's API is answered here.
        _max_body = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._flow = self.flow = HeldFlow(self.transport)
            self._arm(header_timeout, self._head_too_slow)
            self._head_due = (header_timeout, self._head_too_slow)
            app = self.app
            if getattr(app, "api", None) is not None and not self.root_path:
                self._hub = _hub_of(app)
                self._max_body = self._hub.settings.max_body_size

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # draining after a refusal
            if self._unfed is not None:  # held: keep what arrives after it, in order
                self._unfed += data
                return
            self._received(data)

        def _received(self, data: bytes) -> None:
            # uvicorn would parse a whole read of pipelined requests into request
            # cycles, and each cycle that starts resumes reading: a client that
            # pipelines without reading answers had the server hold ~2.3 KB per
            # request, without a bound. Feed a read in slices and hold the rest,
            # not reading, while MAX_PIPELINED requests wait.
            # A read in which few heads can end (a body, one request) is fed whole:
            # slicing a large body only costs a parser call per slice.
            sliced = len(data) > _FEED_SLICE and not _few_heads(data)
            while True:
                if len(self.pipeline) >= MAX_PIPELINED:
                    self._hold(data)
                    break
                if not sliced or len(data) <= _FEED_SLICE:
                    self._feed(data)
                    break
                self._feed(data[:_FEED_SLICE])
                data = data[_FEED_SLICE:]
                if self._refused or self.transport.get_protocol() is not self:
                    return  # refused (431), or upgraded to WebSocket
                if self.transport.is_closing():
                    return
            if self._api is not None and not self.transport.is_closing():
                self._hand_back()  # its body did not end within this read
            # Arm the timer of a head or body that did not end within this read (one that
            # did, the common case, costs no timer at all).
            due = self._due
            if due is not None and not self._refused:
                self._due = None
                self._arm(*due)

        def _feed(self, data: bytes) -> None:
            # Between requests, what comes next is a head: counted from this first byte.
            self._head_at_start = between = self._between
            if (self._in_head or between) and len(data) > max_head - self._head_bytes:
                # Feed only what the limit allows: the head may end inside it.
                room = max(0, max_head - self._head_bytes)
                self._new_head = False
                if room:
                    super().data_received(data[:room])
                    if self.transport.is_closing() or self.transport.get_protocol() is not self:
                        return  # answered 400, or upgraded to WebSocket
                if self._head_pending() and not self._new_head:
                    self._refuse()  # the same head, past the limit
                    return
                data = data[room:]
            if self._in_head or between:
                # (A head that starts inside this slice, behind another request, is
                # counted from the next slice: within one nothing is quadratic.)
                self._head_bytes += len(data)
            super().data_received(data)

        def _hold(self, data: bytes) -> None:
            """Keep unparsed bytes, and stop reading, until the queue is shorter."""
            self._unfed = data
            self._flow.pause_reading()
            self._flow.held = True

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts the next request queued, if any
            unfed = self._unfed
            if unfed is None or len(self.pipeline) >= MAX_PIPELINED:
                return
            if self.transport.is_closing():
                return
            self._unfed = None
            self._received(unfed)
            if self._unfed is None:  # not held again: read on
                self._flow.held = False
                self._flow.resume_reading()

        def _head_pending(self) -> bool:
            """Whether a request's line and headers are still arriving (parser callbacks
            change it while data is fed)."""
            return self._in_head

        def on_message_begin(self) -> None:
            # uvicorn's own request state, but its scope: the hub's API calls answered
            # here need only a few of its keys, so uvicorn's is made when a request
            # goes its way (_uvicorn_scope).
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
            # (A request behind one answered within this read: no keep-alive timeout
            # while it runs; uvicorn's data_received cancels it only as a read begins.)
            self._unset_keepalive_if_required()
            self._idle_since = None
            if not self._in_head:  # a further request on a keep-alive connection
                self._in_head = True
                # A head that starts the bytes being fed is counted from their start
                # (see _feed); one behind another request within them, from the next.
                self._new_head = not self._head_at_start
                self._head_at_start = self._between = False
                if self._new_head:
                    self._head_bytes = 0
                self._disarm()
                self._due = self._head_due

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            if self._hub is not None:
                self._api = self._take_api()
                if self._api is not None:
                    return
            self._start_cycle()

        def _uvicorn_scope(self) -> None:
            """Make the scope uvicorn's ``on_message_begin`` makes, for the request whose
            line and headers were taken (see :meth:`on_message_begin`)."""
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()
            self.url, self.headers, self.expect_100_continue = url, headers, expect
            self.scope["headers"] = headers

        def _start_cycle(self) -> None:
            """uvicorn's request cycle, its body timed and its small responses in one write."""
            self._uvicorn_scope()
            upgrade = self.parser.should_upgrade() and self._should_upgrade()
            super().on_headers_complete()
            if not upgrade:
                self._due = (body_timeout + BODY_GRACE, self._body_too_slow)
                cycle = self.cycle
                if cycle is not None:
                    # A small response in one write: see HeadWithBody.
                    held = HeadWithBody(cycle, self.transport, self.loop)
                    cycle.transport = cast("asyncio.Transport", held)

        def on_body(self, body: bytes) -> None:
            call = self._api
            if call is None:
                super().on_body(body)
            else:
                call.body.append(body)

        def on_message_complete(self) -> None:
            self._disarm()
            self._between = True
            self._head_bytes = 0
            call = self._api
            if call is None:
                super().on_message_complete()
                return
            self._api = None
            self._answer_api(call)

        # -- the HTTP API, answered here ------------------------------------------------
        #
        # A call of the hub's API (POST /api/<method>) whose body is declared and
        # within max_body_size, on a connection with nothing else in flight, is
        # answered by this protocol: no ASGI cycle, task or middleware, and no
        # coroutine at all when the method needs no await (a publication to a live
        # channel). The rules are the API's own (answer_api_body). Anything else,
        # and a call whose body does not end within the read that ended its head,
        # goes through uvicorn's cycle and the app as before (_hand_back).

        def _take_api(self) -> _ApiCall | None:
            """The API call this request is, when it is one this protocol answers."""
            parser = self.parser
            if (
                parser.get_method() != b"POST"
                or not self.url.startswith(b"/api/")
                or parser.get_http_version() != "1.1"
                or parser.should_upgrade()
                or self.expect_100_continue
                or self.pipeline
                or (self.cycle is not None and not self.cycle.response_complete)
                or self.flow.write_paused  # the client is not reading: uvicorn waits
                or self.limit_concurrency is not None
            ):
                return None
            length = None
            for name, value in self.headers:
                if name == b"content-length":
                    if length is not None or not value.isdigit():
                        return None
                    length = int(value)
                elif name == b"transfer-encoding":
                    return None
            if length is None or length > self._max_body:
                return None
            target = API_TARGETS.get(self.url)
            if target is not None:  # a method's plain path (the common case)
                path, method = target
            else:
                try:
                    path = self.url.decode("ascii")
                except UnicodeDecodeError:
                    return None
                found = api_method(path)
                if found is None or "%" in path or "?" in path:
                    return None
                method = found
            scope = {
                "type": "http",
                "method": "POST",
                "path": path,
                "headers": self.headers,
                "client": self.client,
                "server": self.server,
            }
            return _ApiCall(method, scope, parser.should_keep_alive())

        def _hand_back(self) -> None:
            """Give a call whose body is still arriving to uvicorn's cycle, with what came."""
            call = self._api
            assert call is not None
            self._api = None
            self._start_cycle()
            for chunk in call.body:
                super().on_body(chunk)

        def _answer_api(self, call: _ApiCall) -> None:
            body = call.body[0] if len(call.body) == 1 else b"".join(call.body)
            answer = answer_api_body(self._hub, call.method, call.scope, body)
            if isinstance(answer, tuple):
                self._respond(answer, call)
                return
            # The method awaits: uvicorn sees a response in flight (requests behind it
            # wait in its pipeline), and a task answers.
            self.cycle = call  # type: ignore[assignment]
            task = self.loop.create_task(self._answer_later(call, answer))
            task.add_done_callback(self.tasks.discard)
            task.add_done_callback(functools.partial(release_unawaited, answer))
            self.tasks.add(task)

        async def _answer_later(self, call: _ApiCall, answer: Awaitable[Answer]) -> None:
            try:
                result = await answer
            except BaseException:
                call.response_complete = True
                self.transport.close()
                raise
            if not call.disconnected:
                self._respond(result, call)

        def _respond(self, answer: Answer, call: _ApiCall) -> None:
            """Write an answer in one write, then what uvicorn does after a response."""
            status, body, lines, own = api_response_head(answer)
            closes = False
            if own:
                more, closes = _header_lines(own)
                lines += more
            defaults = self.server_state.default_headers
            head = _DEFAULT_HEAD
            if head[0] is not defaults:
                head = _default_head(defaults)
            keep_alive = call.keep_alive and not head[2] and not closes
            out = [STATUS_LINE[status], head[1], lines]
            if not keep_alive:
                out.append(b"connection: close\r\n")
            out += (b"\r\n", body)
            call.response_complete = True
            transport = self.transport
            if self.access_log:
                self.access_logger.info(
                    '%s - "POST %s HTTP/1.1" %d',
                    get_client_addr(call.scope),  # type: ignore[arg-type]
                    call.scope["path"],
                    status,
                )
            if not transport.is_closing():
                transport.write(b"".join(out))
                if not keep_alive:
                    transport.close()
            if self.pipeline or self._unfed is not None:
                self.on_response_complete()  # requests wait behind this one
                return
            # uvicorn's on_response_complete, without a keep-alive timer armed and
            # cancelled for every request (2 µs): one timer checks the idle time.
            self.server_state.total_requests += 1
            if transport.is_closing():
                return
            if self._flow.read_paused:
                self._flow.resume_reading()
            self._idle_since = self.loop.time()
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

        def _idle_check(self) -> None:
            """Close a connection idle for ``timeout_keep_alive`` since this protocol's answer."""
            self._idle_timer = None
            since = self._idle_since
            if since is None or self.transport.is_closing():
                return  # busy again (its next idle time arms a check), or gone
            left = since + self.timeout_keep_alive - self.loop.time()
            if left > 0:
                self._idle_timer = self.loop.call_later(left, self._idle_check)
            else:
                self.transport.close()

        def _arm(self, delay: float, callback: Callable[[], None]) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, callback)

        def _disarm(self) -> None:
            self._due = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _head_too_slow(self) -> None:
            self._timer = None
            if self._in_head and not self.transport.is_closing():
                self.transport.close()

        def _body_too_slow(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def _refuse(self) -> None:
            """Answer 431 (unless a response is in flight), then drain and close."""
            self._refused = True
            transport = self.transport
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                transport.close()  # a pipelined request behind one still answering
                return
            held: object = getattr(cycle, "transport", None)  # (none: an API call answered here)
            if isinstance(held, HeadWithBody):
                held.flush()  # the answer before it (to a HEAD) goes first
            transport.write(_HEAD_TOO_LARGE)
            # Half-close and drain what the client still sends before closing, or the
            # close would reset the connection and the 431 could be lost.
            if transport.can_write_eof():
                transport.write_eof()
            self._arm(LINGER, transport.close)

    return HardenedHttpProtocol


#: The server's default headers (``date`` and the configured ones) as written
#: in a response, for the list they were made from: ``(list, lines, closes)``,
#: where ``closes`` says one of them is ``connection: close``. uvicorn
#: replaces that list (once a second, for the date), never changes it.
_DEFAULT_HEAD: tuple[object, bytes, bool] = (None, b"", False)


def _default_head(defaults: list[tuple[bytes, bytes]]) -> tuple[object, bytes, bool]:
    """Remember how ``defaults`` are written (see :data:`_DEFAULT_HEAD`)."""
    global _DEFAULT_HEAD
    _DEFAULT_HEAD = (defaults, *_header_lines(defaults))
    return _DEFAULT_HEAD


def _header_lines(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """Headers as written in a response's head, and whether one is ``connection: close``."""
    out: list[bytes] = []
    closes = False
    for name, value in headers:
        if name == b"connection" and b"close" in value.lower():
            closes = True
        out += (name, b": ", value, b"\r\n")
    return b"".join(out), closes


def _few_heads(data: bytes) -> bool:
    """Whether at most :data:`MAX_PIPELINED` request heads can end in ``data``.

    A head ends with two line feeds; the search stops at the first
    ``2 * MAX_PIPELINED + 1`` of them (each ``find`` is a ``memchr``: a read of
    body bytes with no line feed costs one pass).
    """
    at = -1
    for _ in range(2 * MAX_PIPELINED + 1):
        at = data.find(b"\n", at + 1)
        if at < 0:
            return True
    return False


class _ApiCall:
    """An API call answered by the HTTP protocol itself; while a task answers it,
    it stands as the connection's request cycle for uvicorn (the attributes
    uvicorn reads of one: ``response_complete``, ``keep_alive``, ``disconnected``
    and ``message_event``)."""

    __slots__ = ("body", "disconnected", "keep_alive", "method", "response_complete", "scope")

    class _NoWaiter:
        """``message_event``: nobody waits for the body of a call answered here."""

        @staticmethod
        def set() -> None:
            """Nothing to wake."""

    message_event: ClassVar[_NoWaiter] = _NoWaiter()

    def __init__(self, method: str, scope: dict[str, Any], keep_alive: bool) -> None:
        self.method = method
        #: The request's scope (the connection's next request gets a scope of its own).
        self.scope = scope
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.response_complete = False
        self.disconnected = False


class HeadWithBody:
    """A request's transport, as its response cycle sees it: a head that announces a
    body (``content-length``) waits for the body's first bytes, so that a small
    response leaves in one write (one system call and one segment, not two).

    The head is written at the latest at the end of the loop turn. On any other
    first write (a chunked head, a ``100 Continue``) this object steps aside: the
    cycle writes to the socket's transport directly from then on.
    """

    __slots__ = ("_cycle", "_head", "_loop", "_transport")

    def __init__(
        self, cycle: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._cycle = cycle
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._step_aside()
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/1.1 ") and b"\r\ncontent-length: " in data:
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self._step_aside()
            self._transport.write(data)

    def flush(self) -> None:
        """Write the head held, if any."""
        head = self._head
        if head is not None:
            self._step_aside()
            self._transport.write(head)

    def _step_aside(self) -> None:
        self._head = None
        if self._cycle.transport is self:
            self._cycle.transport = self._transport

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# -- the WebSocket protocol --------------------------------------------------------------------


def websocket_protocol() -> type[asyncio.Protocol]:
    """The WebSocket protocol class ``eventcast serve`` gives uvicorn.

    uvicorn builds one for each upgrade, once its HTTP protocol has read the
    request head (bounded by :func:`http_protocol`), and feeds it the head
    again. An upgrade to one of the hub's WebSocket endpoints (``/connection/websocket``
    and ``/connection/uni_websocket``, when the served app is the hub's) becomes the
    hub's own protocol,
    :class:`~eventcast.server.websocket.HubWebSocket`: no ASGI task, queue
    or parser generator per connection. Any other upgrade goes to uvicorn's
    sans-I/O protocol and the ASGI app, with one change: a text frame that is
    not UTF-8 is closed with 1007 as RFC 6455 requires, without the ERROR and
    traceback uvicorn logs for it (anyone could flood the log with them).
    """
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    from .websocket import ENDPOINTS, HubWebSocket

    class QuietWebSocketsProtocol(WebSocketsSansIOProtocol):
        """uvicorn's WebSocket protocol, without a traceback for invalid UTF-8."""

        def send_receive_event_to_app(self) -> None:
            if self.curr_msg_data_type == "text" and not self.close_sent:
                frames = self.frames
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                try:
                    data.decode()
                except UnicodeDecodeError:
                    self.frames = []
                    self.conn.send_close(1007, "invalid UTF-8")
                    self.handle_parser_exception()
                    return
            super().send_receive_event_to_app()

    class WebSocketUpgrade(asyncio.Protocol):
        """Takes an upgrade from uvicorn's HTTP protocol and hands it to the protocol for it."""

        #: The protocol of every other upgrade: uvicorn's, quiet on invalid UTF-8.
        other: type[asyncio.Protocol] = QuietWebSocketsProtocol
        #: The forwarded-headers rule of each hub served (built on first use).
        forwarded: ClassVar[dict[Any, Any]] = {}

        def __init__(
            self,
            config: uvicorn.Config,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            self.config = config
            self.server_state = server_state
            self.app_state = app_state
            self.loop = _loop
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            transport = self.transport
            assert transport is not None
            head = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
            method, target = head[0].split(b" ", 2)[:2]
            hub = _hub_of(self.config.app)
            endpoint = ENDPOINTS.get(target.partition(b"?")[0])
            if hub is None or endpoint is None:
                other = self.other(  # type: ignore[call-arg]
                    config=self.config,
                    server_state=self.server_state,
                    app_state=self.app_state,
                    _loop=self.loop,
                )
                other.connection_made(transport)
                transport.set_protocol(other)
                other.data_received(data)
                return
            headers = [_header(line) for line in head[1:] if line]
            scope = _websocket_scope(transport, target, headers)
            rule = self.forwarded.get(hub)
            if rule is None:
                rule = forwarded_headers(_keep_scope, hub.settings.forwarded_allow_ips)
                self.forwarded[hub] = rule
            _apply(rule, scope)
            HubWebSocket(hub, endpoint, self.server_state).start(
                transport, method, target, headers, scope
            )

    return WebSocketUpgrade


def _hub_of(app: Any) -> Any:
    """The hub an app serves (``None``: the app is not the hub's own)."""
    from .hub import Hub

    hub = getattr(app, "hub", None)
    return hub if isinstance(hub, Hub) else None


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b": ")
    return name, value


def _websocket_scope(
    transport: asyncio.BaseTransport, target: bytes, headers: list[tuple[bytes, bytes]]
) -> dict[str, Any]:
    """What the hub reads of a WebSocket request, in ASGI's terms (a scope)."""
    peer = transport.get_extra_info("peername")
    client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
    path, _, query = target.partition(b"?")
    return {
        "type": "websocket",
        "scheme": "wss" if transport.get_extra_info("sslcontext") is not None else "ws",
        "path": path.decode("latin-1"),
        "query_string": query,
        "headers": headers,
        "client": client,
        "subprotocols": offered_subprotocols(headers),
    }


async def _keep_scope(scope: Any, receive: Any, send: Any) -> None:
    """The app behind the forwarded-headers rule when only the scope is wanted."""


def _apply(middleware: Any, scope: dict[str, Any]) -> None:
    """Run an ASGI middleware that only rewrites the scope, synchronously.

    uvicorn's forwarded-headers middleware awaits nothing but the app it wraps,
    which here returns at once: one step of the coroutine runs it whole.
    """
    step = middleware(scope, None, None)
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("the forwarded-headers middleware awaited something")


# -- proxies -----------------------------------------------------------------------------------


def forwarded_headers(app: Any, trusted_hosts: list[str]) -> Any:
    """Wrap an ASGI app so forwarded requests carry their original client address.

    Uses uvicorn's ``ProxyHeadersMiddleware``: when the direct peer is one of
    ``trusted_hosts`` (addresses, networks, or ``"*"``), the client address and
    scheme come from ``X-Forwarded-For`` and ``X-Forwarded-Proto``.
    """
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    return ProxyHeadersMiddleware(app, trusted_hosts=trusted_hosts)


# -- the server --------------------------------------------------------------------------------


def make_server(
    config: uvicorn.Config, *, before_shutdown: Callable[[], Awaitable[None]]
) -> uvicorn.Server:
    """A uvicorn server that runs ``before_shutdown`` before it closes connections.

    On SIGTERM or SIGINT it stops accepting, awaits ``before_shutdown`` (the hub
    tells its clients to reconnect), then lets uvicorn close what is left. A
    graceful stop exits with status 0.

    Raises:
        ConfigurationError: the installed uvicorn lacks an internal this module
            relies on (see :func:`check`).
    """
    import uvicorn

    check()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:
                server.close()  # stop accepting first
            await before_shutdown()
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                # uvicorn re-raises the signal that stopped it, so the process would
                # die of SIGTERM (exit 143); a graceful stop is a success: exit 0.
                self._captured_signals.clear()

    return Server(config)
