"""The asyncio client: one WebSocket at a time, driven through the sans-I/O ClientSession.

Tasks and who supervises them:

* the **reader** of the current WebSocket (one per connection): feeds frames to
  the session, routes the events, answers pings, and ends when the socket
  closes, returning the close code;
* the **supervisor** (one per client): waits for the reader to end, then
  reconnects with jittered exponential backoff, or fails the client for good
  on a terminal disconnect code;
* the **token refresher** (one per connection, only with ``get_token`` and an
  expiring token);
* short helpers (a resubscribe after an unsubscribe push with code >= 2500, an
  unsubscribe after a buffer overflow).

Any of them failing unexpectedly fails the whole client: pending commands
raise, and every subscription iterator raises :class:`ClientClosedError` with
the failure chained as ``__cause__`` once its buffered events are consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import msgspec
from websockets.asyncio.client import ClientConnection, connect as ws_connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from .. import __version__
from ..events import EARLIEST, Event, History, Position, encode_data
from ..exceptions import (
    ClientClosedError,
    ConfigurationError,
    DisconnectedError,
    EventcastError,
    HandshakeError,
    PositionLostError,
    ReplyError,
    ReplyTimeoutError,
    SlowConsumerError,
    SubscriberExistsError,
    SubscriptionClosedError,
)
from ..protocol.client import (
    ClientSession,
    DisconnectReceived,
    MessageReceived,
    PublicationReceived,
    ReplyReceived,
    SessionEvent,
    SubscribedPush,
    UnsubscribedPush,
)
from ..protocol.codec import ProtocolError
from ..protocol.codes import ERROR_TOKEN_EXPIRED, Disconnect
from ..protocol.frames import (
    ConnectResult,
    HistoryResult,
    PresenceResult,
    PresenceStatsResult,
    Publication,
    RefreshResult,
    RPCResult,
    SubscribeResult,
)

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_TIMEOUT",
    "Client",
    "ClientPresence",
    "PresenceStats",
    "Subscription",
    "TokenGetter",
    "connect",
    "websocket_url",
]

logger = logging.getLogger("eventcast.client")

#: Events buffered per subscription before it fails with SlowConsumerError.
DEFAULT_BUFFER: Final = 10_000
#: Seconds allowed for the handshake and for each command's reply.
DEFAULT_TIMEOUT: Final = 10.0
#: The hub's WebSocket endpoint, added to URLs that lack it.
WEBSOCKET_PATH: Final = "/connection/websocket"

#: ``get_token``: returns a fresh connection token (may be a coroutine function).
TokenGetter: TypeAlias = Callable[[], Awaitable[str] | str]
OnLost: TypeAlias = Literal["continue", "raise"]

_decode = msgspec.json.Decoder().decode
_EMPTY_TAGS: Final[MappingProxyType[str, str]] = MappingProxyType({})


def websocket_url(url: str) -> str:
    """Normalise a hub URL to its WebSocket endpoint.

    ``http://host:8000`` -> ``ws://host:8000/connection/websocket``;
    ``https://`` -> ``wss://``; a path lacking ``/connection/websocket`` (a
    hub mounted under a prefix) gets it appended.

    Raises:
        ConfigurationError: the URL is not ``ws``, ``wss``, ``http`` or ``https``.
    """
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ConfigurationError(f"not a hub URL (ws://, wss://, http://, https://): {url!r}")
    path = parts.path
    if not path.endswith(WEBSOCKET_PATH):
        path = path.rstrip("/") + WEBSOCKET_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


@dataclass(frozen=True, slots=True)
class ClientPresence:
    """One client in a channel's presence."""

    client: str
    user: str
    conn_info: Any = None
    chan_info: Any = None


@dataclass(frozen=True, slots=True)
class PresenceStats:
    """How many clients and unique users are in a channel."""

    num_clients: int
    num_users: int


@dataclass(frozen=True, slots=True)
class _Reset:
    """A marker in a subscription's buffer: the stream resumed at ``position``."""

    position: Position | None
    lost: bool


@dataclass(frozen=True, slots=True)
class _Closed:
    """How a connection ended."""

    code: int | None
    reason: str
    error: BaseException | None = None

    @property
    def terminal(self) -> bool:
        return self.code is not None and not Disconnect(self.code, self.reason).reconnect


def _raw_value(data: msgspec.Raw) -> Any:
    return _decode(data) if data else None


def _tags(tags: dict[str, str] | None) -> Any:
    return MappingProxyType(dict(tags)) if tags else _EMPTY_TAGS


def _event(
    pub: Publication, channel: str, epoch: str | None, default_topic: str | None = None
) -> Event:
    tags = pub.tags or {}
    offset = pub.offset or None
    return Event(
        topic=pub.channel or tags.get("topic") or default_topic or channel,
        data=_raw_value(pub.data),
        time=pub.time / 1000 if pub.time else time.time(),
        offset=offset,
        epoch=epoch if offset is not None else None,
        tags=_tags(pub.tags),
        _cache=[bytes(pub.data)] if pub.data else [],
    )


# -- subscriptions ----------------------------------------------------------------------------


class Subscription:
    """A subscription to a channel (or a pattern): an async context manager and iterator.

    Iterating yields :class:`~eventcast.Event` objects in stream order. After
    a reconnect the subscription resubscribes from the position of the last
    event it received, so nothing is missed or repeated while the hub can
    recover; when it cannot (``recovered=false``), ``on_lost`` decides:
    ``"raise"`` makes the iterator raise :class:`PositionLostError` at that
    point of the stream (iterate again to go on from the new position),
    ``"continue"`` goes on; :attr:`lost` counts both.

    The buffer holds at most ``buffer`` events (default
    :data:`DEFAULT_BUFFER`); a consumer that falls further behind gets
    :class:`SlowConsumerError` after the buffered events, and the
    subscription ends (resubscribe with ``since=sub.position`` to catch up).

    Attributes:
        channel: the channel or pattern subscribed to.
        recovered: whether the last (re)subscribe recovered every missed event.
        lost: how many times the stream could not be recovered.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        *,
        since: Position | str | None,
        on_lost: OnLost,
        buffer: int,
        token: str,
    ) -> None:
        if on_lost not in ("continue", "raise"):
            raise ConfigurationError(f"on_lost must be 'continue' or 'raise', not {on_lost!r}")
        if buffer < 1:
            raise ConfigurationError("buffer must be >= 1")
        self._client = client
        self.channel = channel
        self.on_lost: OnLost = on_lost
        self.recovered = False
        self.lost = 0
        self.token = token
        self._since = since
        self._buffer = buffer
        self._items: deque[Event | _Reset] = deque()
        self._wake = asyncio.Event()
        self._epoch: str | None = None
        self._delivered: Position | None = since if isinstance(since, Position) else None
        self._error: BaseException | None = None
        self._ended = False
        self._entered = False

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} position={self.position!r}>"

    @property
    def position(self) -> Position | None:
        """The stream position after the last event yielded (``None``: not a durable stream)."""
        return self._delivered

    @property
    def active(self) -> bool:
        """Whether the subscription still receives events."""
        return not self._ended

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Subscription:
        if not self._entered:
            self._entered = True
            await self._client._subscribe(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.unsubscribe()

    def __await__(self) -> Generator[Any, None, Subscription]:
        return self.__aenter__().__await__()

    async def unsubscribe(self) -> None:
        """Stop receiving; the iterator ends after the buffered events. Idempotent."""
        if self._ended:
            return
        self._end(None)
        await self._client._unsubscribe(self)

    # -- iteration -----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._items:
                item = self._items.popleft()
                if isinstance(item, Event):
                    if item.offset is not None and item.epoch is not None:
                        self._delivered = Position(item.offset, item.epoch)
                    return item
                self._delivered = item.position
                if item.lost and self.on_lost == "raise":
                    raise PositionLostError(
                        f"the stream of {self.channel!r} could not be recovered; "
                        f"it goes on from {item.position}",
                        self.channel,
                        item.position,
                    )
                continue
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    # -- fed by the client's reader (synchronous, in stream order) -------------------------

    def _subscribed(self, result: SubscribeResult, epoch_position: Position | None) -> None:
        self.recovered = result.recovered
        self._epoch = result.epoch or None
        if result.was_recovering and not result.recovered:
            self.lost += 1
            self._put(_Reset(epoch_position, lost=True))
        elif self._delivered is None and not self._items:
            self._delivered = epoch_position

    def _publication(self, pub: Publication) -> None:
        if self._ended:
            return
        if len(self._items) >= self._buffer:
            self._end(
                SlowConsumerError(
                    f"the buffer of {self.channel!r} overflowed ({self._buffer} events); "
                    f"resubscribe with since=sub.position to catch up"
                )
            )
            self._client._forget(self, unsubscribe=True)
            return
        self._put(_event(pub, self.channel, self._epoch))

    def _put(self, item: Event | _Reset) -> None:
        self._items.append(item)
        self._wake.set()

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._wake.set()


# -- the client -------------------------------------------------------------------------------


class Client:
    """A client of an eventcast hub (any server speaking the Centrifuge protocol, JSON).

    Use :func:`connect`: ``async with eventcast.connect(url, token=...) as client``.
    All arguments are documented there.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str = "",
        get_token: TokenGetter | None = None,
        name: str = "python",
        version: str = __version__,
        timeout: float = DEFAULT_TIMEOUT,
        min_reconnect_delay: float = 0.2,
        max_reconnect_delay: float = 20.0,
        ping_margin: float = 10.0,
        buffer: int = DEFAULT_BUFFER,
        headers: dict[str, str] | None = None,
        on_message: Callable[[Any], object] | None = None,
        proxy: str | Literal[True] | None = True,
        max_size: int = 16 * 1024 * 1024,
    ) -> None:
        if timeout <= 0:
            raise ConfigurationError("timeout must be > 0")
        if not 0 < min_reconnect_delay <= max_reconnect_delay:
            raise ConfigurationError("need 0 < min_reconnect_delay <= max_reconnect_delay")
        if ping_margin < 0:
            raise ConfigurationError("ping_margin must be >= 0")
        self.url = websocket_url(url)
        self.timeout = timeout
        self.min_reconnect_delay = min_reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.ping_margin = ping_margin
        self.buffer = buffer
        self._token = token
        self._get_token = get_token
        self._name = name
        self._version = version
        self._headers = headers
        self._on_message = on_message
        self._proxy = proxy
        self._max_size = max_size
        self._session = ClientSession()
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[_Closed] | None = None
        self._connected = asyncio.Event()
        self._futures: dict[int, asyncio.Future[ReplyReceived]] = {}
        self._subscribing: dict[int, Subscription] = {}
        self._subs: dict[str, Subscription] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._failure: ClientClosedError | None = None
        self._closer: asyncio.Future[None] | None = None
        self._started = False
        #: The id the hub gave this client on its current (or last) connection.
        self.client_id: str | None = None
        #: Successful connects so far (the first one included).
        self.connects = 0
        #: Token refreshes done through ``get_token`` so far.
        self.refreshes = 0

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected" if self.connected else "connecting"
        return f"<Client {self.url} {state}>"

    @property
    def connected(self) -> bool:
        """Whether a connection is up and every subscription resubscribed."""
        return self._connected.is_set() and not self.closed

    @property
    def closed(self) -> bool:
        """Whether the client was closed, or failed for good."""
        return self._closer is not None or self._failure is not None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> Client:
        """Connect (once; no retry for the first connection).

        Raises:
            HandshakeError: the hub cannot be reached or refused the connection.
            ClientClosedError: the client was closed.
        """
        if self._started:
            self._check_open()
            return self
        self._started = True
        self._check_open()
        try:
            _, reader = await self._establish()
        except BaseException:
            await self.close()
            raise
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(reader), name="eventcast-client-supervisor"
        )
        return self

    def __await__(self) -> Generator[Any, None, Client]:
        return self.start().__await__()

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection and end every subscription. Idempotent.

        Every resource is released even if the caller is cancelled meanwhile.
        Subscription iterators end (``StopAsyncIteration``) after their
        buffered events; pending commands raise :class:`ClientClosedError`.
        """
        if self._closer is None:
            closed = ClientClosedError("the client is closed")
            for sub in list(self._subs.values()):
                sub._end(None)
            self._subs.clear()
            self._fail_futures(closed)
            self._connected.set()  # wake waiters; they see the client closed
            self._closer = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._closer)

    async def _shutdown(self) -> None:
        tasks = [t for t in (self._supervisor, self._refresher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        ws, reader = self._ws, self._reader
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(min(self.timeout, 2.0)):
                    await ws.close()
            ws.transport.abort()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closer is not None:
            raise ClientClosedError("the client is closed")

    def _fail(self, exc: BaseException) -> None:
        """Fail the client for good: every waiter and subscription sees the error."""
        if self.closed:
            return
        if isinstance(exc, ClientClosedError):
            failure = exc
        else:
            failure = ClientClosedError(f"the client failed: {exc!r}")
            failure.__cause__ = exc
        self._failure = failure
        logger.warning("eventcast client of %s failed: %s", self.url, exc)
        for sub in list(self._subs.values()):
            sub._end(failure)
        self._subs.clear()
        self._fail_futures(failure)
        self._connected.set()
        self._closer = asyncio.ensure_future(self._shutdown())

    def _fail_futures(self, exc: BaseException) -> None:
        futures = list(self._futures.values())
        self._futures.clear()
        self._subscribing.clear()
        for future in futures:
            if not future.done():
                future.set_exception(exc)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        """Run a helper task; its unexpected failure fails the client."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            error = None if t.cancelled() else t.exception()
            if error is not None:
                self._fail(error)

        task.add_done_callback(done)

    # -- connecting ---------------------------------------------------------------------

    async def _token_now(self, *, fresh: bool) -> str:
        if self._get_token is not None and (fresh or not self._token):
            value = self._get_token()
            if inspect.isawaitable(value):
                value = await value
            if not isinstance(value, str):
                raise ConfigurationError(f"get_token returned {type(value).__name__}, not str")
            self._token = value
        return self._token

    async def _open_socket(self) -> ClientConnection:
        try:
            return await ws_connect(
                self.url,
                open_timeout=self.timeout,
                ping_interval=None,
                close_timeout=min(self.timeout, 2.0),
                max_size=self._max_size,
                additional_headers=self._headers,
                proxy=self._proxy,
                user_agent_header=f"eventcast-python/{__version__}",
            )
        except TimeoutError:
            raise HandshakeError(f"timed out opening {self.url}") from None
        except (OSError, WebSocketException) as exc:
            raise HandshakeError(f"cannot open {self.url}: {exc}") from exc

    async def _establish(self) -> tuple[ClientConnection, asyncio.Task[_Closed]]:
        """One connection: socket, connect, resubscribe. A 109 gets one retry with a new token.

        Raises:
            HandshakeError: the attempt failed (``code`` says why, when the server said).
        """
        fresh = False
        while True:
            token = await self._token_now(fresh=fresh)
            try:
                return await self._establish_once(token)
            except HandshakeError as exc:
                if (
                    exc.code == ERROR_TOKEN_EXPIRED.code
                    and self._get_token is not None
                    and not fresh
                ):
                    fresh = True
                    continue
                raise

    async def _establish_once(self, token: str) -> tuple[ClientConnection, asyncio.Task[_Closed]]:
        ws = await self._open_socket()
        self._session.connection_lost()
        reader = asyncio.get_running_loop().create_task(
            self._read(ws), name="eventcast-client-reader"
        )
        self._ws, self._reader = ws, reader
        try:
            try:
                reply = await self._command_on(
                    ws,
                    lambda s: s.connect(token=token, name=self._name, version=self._version),
                )
            except ReplyError as exc:
                raise HandshakeError(f"the hub refused connect: {exc}", exc.code) from exc
            except (DisconnectedError, ReplyTimeoutError) as exc:
                closed = await self._reader_result(reader)
                if closed.error is not None:
                    raise HandshakeError(
                        f"connect failed: {closed.reason}", closed.code
                    ) from closed.error
                if isinstance(exc, ReplyTimeoutError):
                    raise HandshakeError("the hub did not answer connect in time") from exc
                raise HandshakeError(
                    f"the hub closed the connection during the handshake: "
                    f"{closed.code} {closed.reason}".rstrip(),
                    closed.code,
                ) from None
            result = reply.result
            assert isinstance(result, ConnectResult)
            self.client_id = result.client
            await self._resubscribe_all(ws)
        except BaseException:
            await self._abort(ws, reader)
            raise
        self.connects += 1
        self._connected.set()
        if result.expires and self._get_token is not None:
            self._start_refresher(ws, result.ttl)
        return ws, reader

    async def _reader_result(self, reader: asyncio.Task[_Closed]) -> _Closed:
        if not reader.done():
            # The reply timed out: stop reading, then report how the socket ended.
            reader.cancel()
        try:
            return await reader
        except asyncio.CancelledError:
            if not reader.cancelled():
                raise
            return _Closed(None, "no reply")

    async def _abort(self, ws: ClientConnection, reader: asyncio.Task[_Closed]) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(self.timeout, 2.0)):
                await ws.close()
        ws.transport.abort()
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader

    async def _resubscribe_all(self, ws: ClientConnection) -> None:
        subs = list(self._subs.values())
        if not subs:
            return
        results = await asyncio.gather(
            *(self._subscribe_on(ws, sub) for sub in subs), return_exceptions=True
        )
        for sub, outcome in zip(subs, results, strict=True):
            if isinstance(outcome, ReplyError) and not outcome.temporary:
                sub._end(outcome)
                self._forget(sub, unsubscribe=False)
            elif isinstance(outcome, ReplyError | DisconnectedError | ReplyTimeoutError):
                raise HandshakeError(
                    f"resubscribing {sub.channel!r} failed: {outcome}"
                ) from outcome
            elif isinstance(outcome, BaseException):
                raise outcome

    def _start_refresher(self, ws: ClientConnection, ttl: int) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        task = asyncio.get_running_loop().create_task(
            self._refresh_loop(ws, ttl), name="eventcast-client-refresh"
        )
        self._refresher = task

        def done(t: asyncio.Task[None]) -> None:
            error = None if t.cancelled() else t.exception()
            if error is not None:
                self._fail(error)

        task.add_done_callback(done)

    async def _refresh_loop(self, ws: ClientConnection, ttl: int) -> None:
        """Replace the connection token before it expires (at 80% of its ttl)."""
        while True:
            await asyncio.sleep(max(0.0, ttl * 0.8))
            token = await self._token_now(fresh=True)
            try:
                reply = await self._command_on(
                    ws, functools.partial(ClientSession.refresh, token=token)
                )
            except ReplyError as exc:
                logger.warning("token refresh refused (%s): reconnecting", exc)
                await ws.close()
                return
            except (DisconnectedError, ReplyTimeoutError):
                return  # the connection is going away; the next one connects afresh
            self.refreshes += 1
            result = reply.result
            if not isinstance(result, RefreshResult) or not result.expires:
                return
            ttl = result.ttl

    async def _supervise(self, reader: asyncio.Task[_Closed]) -> None:
        try:
            while True:
                closed = await reader
                self._connected.clear()
                if self.closed:
                    return
                if self._refresher is not None:
                    self._refresher.cancel()
                    self._refresher = None
                if closed.error is not None:
                    logger.info("connection to %s lost: %s", self.url, closed.error)
                if closed.terminal:
                    raise ClientClosedError(
                        f"the hub closed the connection for good: {closed.code} {closed.reason}",
                        closed.code,
                        closed.reason,
                    )
                _, reader = await self._reconnect()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.max_reconnect_delay, self.min_reconnect_delay * 2 ** min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling)

    async def _reconnect(self) -> tuple[ClientConnection, asyncio.Task[_Closed]]:
        attempt = 0
        while True:
            await asyncio.sleep(self._backoff(attempt))
            try:
                return await self._establish()
            except HandshakeError as exc:
                if _terminal(exc):
                    raise
                logger.info("reconnecting to %s failed (%s); retrying", self.url, exc)
            attempt += 1

    # -- reading ----------------------------------------------------------------------

    def _idle_limit(self) -> float | None:
        connected = self._session.connect_result
        if connected is None or connected.ping <= 0:
            return None
        return connected.ping + self.ping_margin

    async def _read(self, ws: ClientConnection) -> _Closed:
        closed = _Closed(None, "connection lost")
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_limit()):
                        frame = await ws.recv(decode=False)
                except TimeoutError:
                    closed = _Closed(None, "no ping from the hub")
                    ws.transport.abort()
                    break
                try:
                    events = self._session.receive(frame)
                except ProtocolError as exc:
                    closed = _Closed(None, f"protocol error: {exc}", exc)
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(min(self.timeout, 2.0)):
                            await ws.close(1002, "protocol error")
                    break
                self._dispatch(events)
                out = self._session.data_to_send()
                if out:
                    await ws.send(out, text=True)
        except ConnectionClosed as exc:
            received = exc.rcvd
            if received is not None:
                closed = _Closed(received.code, received.reason)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            closed = _Closed(None, f"reader failed: {exc!r}", exc)
            raise
        finally:
            if self._ws is ws:
                self._connected.clear()
            lost = self._session.connection_lost() if self._ws is ws else []
            error = DisconnectedError(f"connection lost: {closed.code} {closed.reason}")
            for command_id in lost:
                future = self._futures.pop(command_id, None)
                self._subscribing.pop(command_id, None)
                if future is not None and not future.done():
                    future.set_exception(error)
        return closed

    def _dispatch(self, events: list[SessionEvent]) -> None:
        for event in events:
            if isinstance(event, PublicationReceived):
                sub = self._subs.get(event.channel)
                if sub is not None:
                    sub._publication(event.publication)
            elif isinstance(event, ReplyReceived):
                self._on_reply(event)
            elif isinstance(event, UnsubscribedPush):
                self._on_unsubscribed(event)
            elif isinstance(event, MessageReceived):
                self._on_message_push(event)
            elif isinstance(event, DisconnectReceived):
                logger.info("the hub announced a disconnect: %s %s", event.code, event.reason)
            elif isinstance(event, SubscribedPush):
                logger.debug("ignoring server-side subscription to %r", event.channel)
            # Pings are answered by the session; joins and leaves are not surfaced.

    def _on_reply(self, event: ReplyReceived) -> None:
        sub = self._subscribing.pop(event.id, None)
        if sub is not None and event.error is None and isinstance(event.result, SubscribeResult):
            result = event.result
            positioned = result.positioned or result.recoverable or bool(result.epoch)
            sub._subscribed(result, Position(result.offset, result.epoch) if positioned else None)
        future = self._futures.pop(event.id, None)
        if future is not None and not future.done():
            future.set_result(event)

    def _on_unsubscribed(self, event: UnsubscribedPush) -> None:
        sub = self._subs.get(event.channel)
        if sub is None:
            return
        if event.resubscribe and self._ws is not None:
            self._spawn(self._resubscribe(self._ws, sub), "eventcast-client-resubscribe")
            return
        self._forget(sub, unsubscribe=False)
        sub._end(
            SubscriptionClosedError(
                f"the hub unsubscribed {event.channel!r}: {event.code} {event.reason}"
            )
        )

    def _on_message_push(self, event: MessageReceived) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(_decode(event.data) if event.data else None)
        except Exception:
            logger.exception("on_message callback failed")

    # -- commands -----------------------------------------------------------------------

    async def _command_on(
        self,
        ws: ClientConnection,
        build: Callable[[ClientSession], int],
        sub: Subscription | None = None,
    ) -> ReplyReceived:
        """Send one command on ``ws`` and wait for its reply.

        Raises:
            ReplyError: the hub answered with an error.
            ReplyTimeoutError: no reply within the timeout.
            DisconnectedError: the connection was lost first.
            ClientClosedError: the client was closed first.
        """
        self._check_open()
        command_id = build(self._session)
        data = self._session.data_to_send()
        future: asyncio.Future[ReplyReceived] = asyncio.get_running_loop().create_future()
        self._futures[command_id] = future
        if sub is not None:
            self._subscribing[command_id] = sub
        try:
            async with asyncio.timeout(self.timeout):
                await ws.send(data, text=True)
                reply = await future
        except TimeoutError:
            raise ReplyTimeoutError(
                f"no reply from the hub within {self.timeout} s (command {command_id})"
            ) from None
        except ConnectionClosed as exc:
            raise DisconnectedError(f"connection lost: {exc}") from None
        finally:
            self._futures.pop(command_id, None)
            self._subscribing.pop(command_id, None)
            self._session.forget(command_id)
        if reply.error is not None:
            error = reply.error
            raise ReplyError(error.code, error.message, error.temporary)
        return reply

    async def _ready(self) -> ClientConnection:
        """The current connection, once up (waiting at most ``timeout``)."""
        self._check_open()
        if not self._started:
            raise ClientClosedError("the client is not connected: use `async with connect(...)`")
        if not self._connected.is_set():
            try:
                async with asyncio.timeout(self.timeout):
                    await self._connected.wait()
            except TimeoutError:
                raise ReplyTimeoutError(
                    f"not reconnected to the hub within {self.timeout} s"
                ) from None
        self._check_open()
        assert self._ws is not None
        return self._ws

    async def _request(self, build: Callable[[ClientSession], int]) -> ReplyReceived:
        return await self._command_on(await self._ready(), build)

    async def _subscribe_on(self, ws: ClientConnection, sub: Subscription) -> None:
        since = sub._since
        sub._since = None  # only the first subscribe uses it; then the tracked position
        explicit = (since.offset, since.epoch) if isinstance(since, Position) else None
        await self._command_on(
            ws,
            lambda s: s.subscribe(sub.channel, recover=True, since=explicit, token=sub.token),
            sub,
        )

    async def _resubscribe(self, ws: ClientConnection, sub: Subscription) -> None:
        try:
            await self._subscribe_on(ws, sub)
        except ReplyError as exc:
            self._forget(sub, unsubscribe=False)
            sub._end(exc)
        except (DisconnectedError, ReplyTimeoutError, ClientClosedError):
            pass  # the next connection resubscribes it, or the client is over

    async def _subscribe(self, sub: Subscription) -> None:
        if sub.channel in self._subs:
            raise SubscriberExistsError(f"already subscribed to {sub.channel!r} on this client")
        ws = await self._ready()
        if sub._since == EARLIEST:
            head = await self.history(sub.channel)
            sub._since = Position(0, head.position.epoch)
        elif sub._since is not None and not isinstance(sub._since, Position):
            sub._since = Position.coerce(sub._since)
        self._subs[sub.channel] = sub
        try:
            await self._subscribe_on(ws, sub)
        except BaseException as exc:
            if self._subs.get(sub.channel) is sub:
                del self._subs[sub.channel]
            self._session.forget_position(sub.channel)
            sub._end(exc if isinstance(exc, EventcastError) else None)
            raise

    def _forget(self, sub: Subscription, *, unsubscribe: bool) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        self._session.forget_position(sub.channel)
        if unsubscribe and self.connected:
            self._spawn(self._quiet_unsubscribe(sub.channel), "eventcast-client-unsubscribe")

    async def _quiet_unsubscribe(self, channel: str) -> None:
        with contextlib.suppress(EventcastError):
            await self._request(lambda s: s.unsubscribe(channel))

    async def _unsubscribe(self, sub: Subscription) -> None:
        was_active = self._subs.get(sub.channel) is sub
        self._forget(sub, unsubscribe=False)
        if was_active and self.connected:
            with contextlib.suppress(EventcastError):
                await self._request(lambda s: s.unsubscribe(sub.channel))

    # -- public commands -----------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        *,
        since: Position | str | tuple[int, str] | None = None,
        on_lost: OnLost = "continue",
        buffer: int | None = None,
        token: str = "",
    ) -> Subscription:
        """Subscribe to a channel or pattern: ``async with client.subscribe(...) as sub``.

        Args:
            channel: a channel name, or a pattern (``news.>``) where the
                namespace allows patterns; events then carry their concrete topic.
            since: resume after this position (``Position``, an ``(offset,
                epoch)`` pair, or ``eventcast.EARLIEST`` for everything the hub
                still keeps, up to its replay cap).
            on_lost: what the iterator does when a resume is not possible:
                ``"continue"`` (count it in ``sub.lost``) or ``"raise"``
                (:class:`PositionLostError`).
            buffer: events buffered before :class:`SlowConsumerError`
                (default :data:`DEFAULT_BUFFER`).
            token: a subscription token, for channels that need one.

        The subscribe command is sent on ``__aenter__`` (or ``await``);
        it raises :class:`ReplyError` when the hub refuses.
        """
        if since is not None and not isinstance(since, Position | str):
            since = Position.coerce(since)
        return Subscription(
            self,
            channel,
            since=since,
            on_lost=on_lost,
            buffer=self.buffer if buffer is None else buffer,
            token=token,
        )

    async def publish(self, channel: str, data: Any) -> None:
        """Publish ``data`` (any JSON value; ``bytes`` are sent as already-encoded JSON).

        Raises:
            EncodeError: ``data`` is not JSON-serialisable.
            ReplyError: the hub refused (e.g. 103 permission denied).
        """
        payload = encode_data(data)
        await self._request(lambda s: s.publish(channel, payload))

    async def history(
        self,
        channel: str,
        *,
        limit: int = 0,
        since: Position | tuple[int, str] | None = None,
        reverse: bool = False,
    ) -> History:
        """A page of a durable channel's history and its current position.

        ``limit=0`` returns only the position; ``since`` returns the events
        after that position; ``reverse`` starts from the newest.
        """
        start = None if since is None else Position.coerce(since)
        pair = None if start is None else (start.offset, start.epoch)
        reply = await self._request(
            lambda s: s.history(channel, limit=limit, since=pair, reverse=reverse)
        )
        result = reply.result if isinstance(reply.result, HistoryResult) else HistoryResult()
        epoch = result.epoch
        events = [_event(pub, channel, epoch) for pub in result.publications or ()]
        return History(events=events, position=Position(result.offset, epoch))

    async def presence(self, channel: str) -> dict[str, ClientPresence]:
        """Who is in a channel, by client id."""
        reply = await self._request(lambda s: s.presence(channel))
        result = reply.result if isinstance(reply.result, PresenceResult) else PresenceResult()
        return {
            client: ClientPresence(
                client=info.client or client,
                user=info.user,
                conn_info=_raw_value(info.conn_info),
                chan_info=_raw_value(info.chan_info),
            )
            for client, info in (result.presence or {}).items()
        }

    async def presence_stats(self, channel: str) -> PresenceStats:
        """How many clients and unique users are in a channel."""
        reply = await self._request(lambda s: s.presence_stats(channel))
        result = reply.result
        if not isinstance(result, PresenceStatsResult):
            result = PresenceStatsResult()
        return PresenceStats(result.num_clients, result.num_users)

    async def rpc(self, method: str, data: Any = None) -> Any:
        """Call a method registered on the hub; return its (decoded) answer.

        Raises:
            ReplyError: e.g. 104 "method not found".
        """
        payload = encode_data(data)
        reply = await self._request(lambda s: s.rpc(method, payload))
        result = reply.result
        return _raw_value(result.data) if isinstance(result, RPCResult) else None

    async def send(self, data: Any) -> None:
        """Send an asynchronous message to the hub (no reply)."""
        payload = encode_data(data)
        ws = await self._ready()
        self._session.send(payload)
        try:
            await ws.send(self._session.data_to_send(), text=True)
        except ConnectionClosed as exc:
            raise DisconnectedError(f"connection lost: {exc}") from None


def _terminal(exc: HandshakeError) -> bool:
    """Whether a failed connection attempt should not be retried."""
    code = exc.code
    if code is None:
        return False
    if code < 1000:  # a protocol error code in the connect reply
        return code not in (100, 111)  # internal, too many requests: temporary
    return not Disconnect(code, "").reconnect


def connect(
    url: str,
    *,
    token: str = "",
    get_token: TokenGetter | None = None,
    name: str = "python",
    timeout: float = DEFAULT_TIMEOUT,
    min_reconnect_delay: float = 0.2,
    max_reconnect_delay: float = 20.0,
    ping_margin: float = 10.0,
    buffer: int = DEFAULT_BUFFER,
    headers: dict[str, str] | None = None,
    on_message: Callable[[Any], object] | None = None,
    proxy: str | Literal[True] | None = True,
) -> Client:
    """Connect to a hub: ``async with connect(url, token=...) as client`` (or ``await``).

    Args:
        url: the hub's URL: ``ws://host:8000``, ``http://host:8000`` or the full
            ``ws://host:8000/connection/websocket``.
        token: the connection token (a JWT), if the hub needs one.
        get_token: returns a fresh token (plain or coroutine function). Called
            when the hub answers connect with 109 "token expired", and before the
            current token expires (at 80% of the ttl the hub reports), to
            ``refresh`` it without reconnecting. If it raises, the client fails.
        name: the client name sent with connect.
        timeout: seconds for the handshake and for each command's reply
            (:class:`ReplyTimeoutError`), and for waiting for a reconnect.
        min_reconnect_delay, max_reconnect_delay: bounds of the jittered
            exponential backoff between reconnect attempts.
        ping_margin: seconds added to the ping interval the hub announces; a
            connection with no message for that long is presumed dead and
            replaced.
        buffer: events buffered per subscription (default :data:`DEFAULT_BUFFER`).
        headers: extra HTTP headers of the WebSocket handshake.
        on_message: called with each asynchronous message the hub sends.
        proxy: passed to ``websockets`` (``True``: from the environment).
    """
    return Client(
        url,
        token=token,
        get_token=get_token,
        name=name,
        timeout=timeout,
        min_reconnect_delay=min_reconnect_delay,
        max_reconnect_delay=max_reconnect_delay,
        ping_margin=ping_margin,
        buffer=buffer,
        headers=headers,
        on_message=on_message,
        proxy=proxy,
    )
