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
* a **subscription token refresher** per subscription whose token expires and
  that has a ``get_token`` callback (one per subscribe reply; the next
  reply replaces it);
* short helpers (a resubscribe after an unsubscribe push with code >= 2500, an
  unsubscribe after a buffer overflow).

The connection itself is a :class:`~eventcast.client._transport.Transport`:
a WebSocket by default, or the in-memory one of :mod:`eventcast.testing`.

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

from .. import __version__
from ..events import EARLIEST, Event, History, Position, encode_data
from ..exceptions import (
    ClientClosedError,
    ConfigurationError,
    DisconnectedError,
    EventcastError,
    HandshakeError,
    InvalidDataError,
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
    JoinReceived,
    LeaveReceived,
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
    ClientInfo,
    ConnectResult,
    HistoryResult,
    PresenceResult,
    PresenceStatsResult,
    Publication,
    RefreshResult,
    RPCResult,
    SubRefreshResult,
    SubscribeResult,
)
from ..schema import Decoder, decoder_for
from ._transport import Opener, Transport, TransportClosed, websocket_opener

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_TIMEOUT",
    "Client",
    "ClientPresence",
    "ClientState",
    "PresenceCallback",
    "PresenceStats",
    "Subscription",
    "SubscriptionState",
    "SubscriptionTokenGetter",
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
#: A subscription's ``get_token``: called with the channel, returns a fresh
#: subscription token (may be a coroutine function).
SubscriptionTokenGetter: TypeAlias = Callable[[str], Awaitable[str] | str]
OnLost: TypeAlias = Literal["continue", "raise"]
#: The client's state, as the Centrifuge SDK specification names them.
ClientState: TypeAlias = Literal["disconnected", "connecting", "connected"]
#: A subscription's state, as the Centrifuge SDK specification names them.
SubscriptionState: TypeAlias = Literal["unsubscribed", "subscribing", "subscribed"]

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


#: ``on_join`` / ``on_leave``: called with who joined or left a channel.
PresenceCallback: TypeAlias = Callable[["ClientPresence"], object]


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


def _presence(info: ClientInfo, client: str = "") -> ClientPresence:
    return ClientPresence(
        client=info.client or client,
        user=info.user,
        conn_info=_raw_value(info.conn_info),
        chan_info=_raw_value(info.chan_info),
    )


def _tags(tags: dict[str, str] | None) -> Any:
    return MappingProxyType(dict(tags)) if tags else _EMPTY_TAGS


def _event(
    pub: Publication,
    channel: str,
    epoch: str | None,
    default_topic: str | None = None,
    decode: Decoder | None = None,
) -> Event:
    """The :class:`Event` of a publication (``decode`` turns its JSON into the declared type).

    Raises:
        InvalidDataError: ``decode`` refused the data.
    """
    tags = pub.tags or {}
    offset = pub.offset or None
    topic = pub.channel or tags.get("topic") or default_topic or channel
    if decode is None:
        data = _raw_value(pub.data)
    else:
        data = decode(bytes(pub.data) if pub.data else b"null", topic)
    return Event(
        topic=topic,
        data=data,
        time=pub.time / 1000 if pub.time else time.time(),
        offset=offset,
        epoch=epoch if offset is not None else None,
        tags=_tags(pub.tags),
        _cache=bytes(pub.data) if pub.data else None,
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

    With a declared ``type`` (a msgspec ``Struct``, a pydantic model, or any
    type msgspec decodes), each event's ``data`` is decoded into it; a
    publication that does not fit makes the iterator raise
    :class:`InvalidDataError` at that point of the stream (iterate again to
    go on).

    A server-side subscription (:meth:`Client.server_subscription`) is the
    same object; the server decides when it starts and stops, and it lasts
    until the client closes (or it is unsubscribed locally).

    Attributes:
        channel: the channel or pattern subscribed to.
        recovered: whether the last (re)subscribe recovered every missed event.
        was_recovering: whether the last (re)subscribe asked to recover from a position.
        lost: how many times the stream could not be recovered.
        server_side: whether the server subscribed the client (not the application).
        refreshes: subscription token refreshes done through ``get_token``.
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
        get_token: SubscriptionTokenGetter | None = None,
        join_leave: bool = False,
        on_join: PresenceCallback | None = None,
        on_leave: PresenceCallback | None = None,
        type: Any = None,
        server_side: bool = False,
    ) -> None:
        if on_lost not in ("continue", "raise"):
            raise ConfigurationError(f"on_lost must be 'continue' or 'raise', not {on_lost!r}")
        if buffer < 1:
            raise ConfigurationError("buffer must be >= 1")
        self._client = client
        self.channel = channel
        self.on_lost: OnLost = on_lost
        self.recovered = False
        self.was_recovering = False
        self.lost = 0
        self.token = token
        self.server_side = server_side
        self.refreshes = 0
        self.join_leave = join_leave or on_join is not None or on_leave is not None
        self._get_token = get_token
        self._on_join = on_join
        self._on_leave = on_leave
        self._decode: Decoder | None = None if type is None else decoder_for(type)
        self._since = since
        self._buffer = buffer
        self._items: deque[Event | _Reset | EventcastError] = deque()
        self._wake = asyncio.Event()
        self._epoch: str | None = None
        self._delivered: Position | None = since if isinstance(since, Position) else None
        self._error: BaseException | None = None
        self._ended = False
        self._entered = False
        self._subscribed_once = False
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} {self.state} position={self.position!r}>"

    @property
    def position(self) -> Position | None:
        """The stream position after the last event yielded (``None``: not a durable stream)."""
        return self._delivered

    @property
    def active(self) -> bool:
        """Whether the subscription still receives events."""
        return not self._ended

    @property
    def state(self) -> SubscriptionState:
        """``"subscribing"``, ``"subscribed"`` or ``"unsubscribed"`` (the SDK spec's states)."""
        if self._ended:
            return "unsubscribed"
        if self._client._is_subscribed(self):
            return "subscribed"
        return "subscribing"

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
        """Stop receiving; the iterator ends after the buffered events. Idempotent.

        A server-side subscription stops being delivered locally (the hub
        keeps the client subscribed).
        """
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
                if isinstance(item, EventcastError):
                    raise item
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

    # -- tokens ----------------------------------------------------------------------------

    async def _fresh_token(self) -> bool:
        """Ask ``get_token`` for a new subscription token; return whether there is one.

        Raises:
            SubscriptionClosedError: ``get_token`` failed (chained as ``__cause__``)
                or returned something else than a str.
        """
        if self._get_token is None:
            return False
        try:
            value = self._get_token(self.channel)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise SubscriptionClosedError(f"get_token of {self.channel!r} failed: {exc!r}") from exc
        if not isinstance(value, str):
            raise SubscriptionClosedError(f"get_token returned {type(value).__name__}, not str")
        self.token = value
        return True

    # -- fed by the client's reader (synchronous, in stream order) -------------------------

    def _subscribed(self, result: SubscribeResult, epoch_position: Position | None) -> None:
        self.recovered = result.recovered
        self.was_recovering = result.was_recovering
        self._epoch = result.epoch or None
        self._subscribed_once = True
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
            self._client._forget(self, unsubscribe=not self.server_side)
            return
        try:
            self._put(_event(pub, self.channel, self._epoch, decode=self._decode))
        except InvalidDataError as exc:
            self._put(exc)

    def _presence_event(self, joined: bool, info: ClientInfo) -> None:
        callback = self._on_join if joined else self._on_leave
        if callback is None or self._ended:
            return
        try:
            callback(_presence(info))
        except Exception:
            logger.exception("%s callback of %r failed", "on_join" if joined else "on_leave", self)

    def _put(self, item: Event | _Reset | EventcastError) -> None:
        self._items.append(item)
        self._wake.set()

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._wake.set()
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None


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
        on_publication: Callable[[Event], object] | None = None,
        on_state: Callable[[ClientState], object] | None = None,
        proxy: str | Literal[True] | None = True,
        max_size: int = 16 * 1024 * 1024,
        opener: Opener | None = None,
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
        self._on_publication = on_publication
        self._on_state = on_state
        self._opener: Opener = opener or websocket_opener(
            self.url, timeout=timeout, max_size=max_size, headers=headers, proxy=proxy
        )
        self._state: ClientState = "disconnected"
        self._session = ClientSession()
        self._ws: Transport | None = None
        self._reader: asyncio.Task[_Closed] | None = None
        self._connected = asyncio.Event()
        self._futures: dict[int, asyncio.Future[ReplyReceived]] = {}
        self._subscribing: dict[int, Subscription] = {}
        self._subs: dict[str, Subscription] = {}
        #: Server-side channels the application asked for (or was delivered) by name.
        self._server_subs: dict[str, Subscription] = {}
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
        return f"<Client {self.url} {self.state}>"

    @property
    def state(self) -> ClientState:
        """``"disconnected"``, ``"connecting"`` or ``"connected"`` (the SDK spec's states).

        A new client is disconnected; ``start()`` makes it connecting, then
        connected; a lost connection makes it connecting again until it is
        back; ``close()`` (or a failure for good) makes it disconnected.
        """
        return self._state

    def _set_state(self, state: ClientState) -> None:
        if state == self._state:
            return
        self._state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                logger.exception("on_state callback failed")

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
        self._set_state("connecting")
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
            for sub in [*self._subs.values(), *self._server_subs.values()]:
                sub._end(None)
            self._subs.clear()
            self._server_subs.clear()
            self._set_state("disconnected")
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
            ws.abort()
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
        for sub in [*self._subs.values(), *self._server_subs.values()]:
            sub._end(failure)
        self._subs.clear()
        self._server_subs.clear()
        self._set_state("disconnected")
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

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
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
        return task

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

    async def _establish(self) -> tuple[Transport, asyncio.Task[_Closed]]:
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

    async def _establish_once(self, token: str) -> tuple[Transport, asyncio.Task[_Closed]]:
        ws = await self._opener()
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
        self._set_state("connected")
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

    async def _abort(self, ws: Transport, reader: asyncio.Task[_Closed]) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(min(self.timeout, 2.0)):
                await ws.close()
        ws.abort()
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader

    async def _resubscribe_all(self, ws: Transport) -> None:
        subs = list(self._subs.values())
        if not subs:
            return
        results = await asyncio.gather(
            *(self._subscribe_on(ws, sub) for sub in subs), return_exceptions=True
        )
        for sub, outcome in zip(subs, results, strict=True):
            if isinstance(outcome, SubscriptionClosedError) or (
                isinstance(outcome, ReplyError) and not outcome.temporary
            ):
                sub._end(outcome)
                self._forget(sub, unsubscribe=False)
            elif isinstance(outcome, ReplyError | DisconnectedError | ReplyTimeoutError):
                raise HandshakeError(
                    f"resubscribing {sub.channel!r} failed: {outcome}"
                ) from outcome
            elif isinstance(outcome, BaseException):
                raise outcome

    def _start_refresher(self, ws: Transport, ttl: int) -> None:
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

    async def _refresh_loop(self, ws: Transport, ttl: int) -> None:
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
                self._set_state("connecting")
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

    async def _reconnect(self) -> tuple[Transport, asyncio.Task[_Closed]]:
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

    async def _read(self, ws: Transport) -> _Closed:
        closed = _Closed(None, "connection lost")
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_limit()):
                        frame = await ws.recv()
                except TimeoutError:
                    closed = _Closed(None, "no ping from the hub")
                    ws.abort()
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
                    await ws.send(out)
        except TransportClosed as exc:
            if exc.code is not None:
                closed = _Closed(exc.code, exc.reason)
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
                self._on_publication_push(event)
            elif isinstance(event, ReplyReceived):
                self._on_reply(event)
            elif isinstance(event, JoinReceived | LeaveReceived):
                sub = self._subs.get(event.channel) or self._server_subs.get(event.channel)
                if sub is not None:
                    sub._presence_event(isinstance(event, JoinReceived), event.info)
            elif isinstance(event, UnsubscribedPush):
                self._on_unsubscribed(event)
            elif isinstance(event, MessageReceived):
                self._on_message_push(event)
            elif isinstance(event, DisconnectReceived):
                logger.info("the hub announced a disconnect: %s %s", event.code, event.reason)
            elif isinstance(event, SubscribedPush):
                self._on_server_subscribed(event)
            # Pings are answered by the session.

    def _on_publication_push(self, event: PublicationReceived) -> None:
        channel = event.channel
        sub = self._subs.get(channel)
        if sub is not None:
            sub._publication(event.publication)
            return
        if channel not in self._session.server_side:
            return  # unsubscribed meanwhile: a late publication
        server_sub = self._server_subs.get(channel)
        if server_sub is not None:
            server_sub._publication(event.publication)
        callback = self._on_publication
        if callback is not None:
            epoch = self._session.position(channel)
            try:
                callback(_event(event.publication, channel, epoch[1] if epoch else None))
            except Exception:
                logger.exception("on_publication callback failed")

    def _on_server_subscribed(self, event: SubscribedPush) -> None:
        sub = self._server_subs.get(event.channel)
        if sub is not None:
            sub._subscribed(event.result, _result_position(event.result))

    def _on_reply(self, event: ReplyReceived) -> None:
        sub = self._subscribing.pop(event.id, None)
        if sub is not None and event.error is None and isinstance(event.result, SubscribeResult):
            result = event.result
            sub._subscribed(result, _result_position(result))
            if result.expires and sub._get_token is not None and self._ws is not None:
                self._start_sub_refresher(self._ws, sub, result.ttl)
        future = self._futures.pop(event.id, None)
        if future is not None and not future.done():
            future.set_result(event)

    def _start_sub_refresher(self, ws: Transport, sub: Subscription, ttl: int) -> None:
        if sub._refresher is not None:
            sub._refresher.cancel()
        sub._refresher = self._spawn(
            self._sub_refresh_loop(ws, sub, ttl), "eventcast-client-sub-refresh"
        )

    async def _sub_refresh_loop(self, ws: Transport, sub: Subscription, ttl: int) -> None:
        """Replace a subscription token before it expires (at 80% of its ttl).

        A refused refresh ends the subscription with the :class:`ReplyError`;
        a lost connection ends the loop (the resubscribe starts a new one).
        """
        while not sub._ended:
            await asyncio.sleep(max(0.0, ttl * 0.8))
            try:
                await sub._fresh_token()
            except SubscriptionClosedError as exc:
                logger.warning("%s", exc)
                self._forget(sub, unsubscribe=True)
                sub._end(exc)
                return
            try:
                reply = await self._command_on(ws, lambda s: s.sub_refresh(sub.channel, sub.token))
            except ReplyError as exc:
                logger.warning("subscription token refresh of %r refused: %s", sub.channel, exc)
                self._forget(sub, unsubscribe=True)
                sub._end(exc)
                return
            except (DisconnectedError, ReplyTimeoutError, ClientClosedError):
                return
            sub.refreshes += 1
            result = reply.result
            if not isinstance(result, SubRefreshResult) or not result.expires:
                return
            ttl = result.ttl

    def _on_unsubscribed(self, event: UnsubscribedPush) -> None:
        sub = self._subs.get(event.channel)
        if sub is None:
            return  # a server-side subscription's object lasts: the server may subscribe again
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
        ws: Transport,
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
                await ws.send(data)
                reply = await future
        except TimeoutError:
            raise ReplyTimeoutError(
                f"no reply from the hub within {self.timeout} s (command {command_id})"
            ) from None
        except TransportClosed as exc:
            raise DisconnectedError(f"connection lost: {exc}") from None
        finally:
            self._futures.pop(command_id, None)
            self._subscribing.pop(command_id, None)
            self._session.forget(command_id)
        if reply.error is not None:
            error = reply.error
            raise ReplyError(error.code, error.message, error.temporary)
        return reply

    async def _ready(self) -> Transport:
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

    async def _subscribe_on(self, ws: Transport, sub: Subscription) -> None:
        """Send subscribe for ``sub``; with ``get_token``, fetch a token first or on a 109.

        Raises:
            ReplyError: the hub refused (after one retry with a fresh token on 109).
        """
        since = sub._since
        sub._since = None  # only the first subscribe uses it; then the tracked position
        explicit = (since.offset, since.epoch) if isinstance(since, Position) else None
        if not sub.token:
            await sub._fresh_token()
        retried = False
        while True:
            try:
                await self._command_on(
                    ws,
                    lambda s: s.subscribe(
                        sub.channel,
                        recover=True,
                        since=explicit,
                        token=sub.token,
                        join_leave=sub.join_leave,
                    ),
                    sub,
                )
                return
            except ReplyError as exc:
                if exc.code != ERROR_TOKEN_EXPIRED.code or retried or not await sub._fresh_token():
                    raise
                retried = True

    async def _resubscribe(self, ws: Transport, sub: Subscription) -> None:
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

    def _is_subscribed(self, sub: Subscription) -> bool:
        if sub.server_side:
            return sub.channel in self._session.server_side and self.connected
        return self._subs.get(sub.channel) is sub and sub._subscribed_once and self.connected

    def _forget(self, sub: Subscription, *, unsubscribe: bool) -> None:
        if sub.server_side:
            if self._server_subs.get(sub.channel) is sub:
                del self._server_subs[sub.channel]
            return
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
        get_token: SubscriptionTokenGetter | None = None,
        join_leave: bool = False,
        on_join: PresenceCallback | None = None,
        on_leave: PresenceCallback | None = None,
        type: Any = None,
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
            get_token: called with the channel to get a fresh subscription
                token (plain or coroutine function): for the first subscribe
                when ``token`` is empty, when the hub answers 109 "token
                expired", and before an expiring token runs out (at 80% of its
                ttl, with ``sub_refresh``, without resubscribing). If it raises
                or the refresh is refused, the subscription ends with that error.
            join_leave: ask for join and leave pushes (the namespace must
                enable ``join_leave``); implied by ``on_join`` / ``on_leave``.
            on_join: called with a :class:`ClientPresence` when a client joins.
            on_leave: called with a :class:`ClientPresence` when a client leaves.
            type: decode each event's data into this type (a msgspec
                ``Struct``, a pydantic model, or any type msgspec decodes).

        The subscribe command is sent on ``__aenter__`` (or ``await``);
        it raises :class:`ReplyError` when the hub refuses.

        .. versionchanged:: 0.2
            ``get_token``, ``join_leave``, ``on_join``, ``on_leave`` and ``type``.
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
            get_token=get_token,
            join_leave=join_leave,
            on_join=on_join,
            on_leave=on_leave,
            type=type,
        )

    def server_subscription(
        self,
        channel: str,
        *,
        buffer: int | None = None,
        on_join: PresenceCallback | None = None,
        on_leave: PresenceCallback | None = None,
        type: Any = None,
    ) -> Subscription:
        """The events of a server-side subscription (one the hub made, not the application).

        Channels listed in the connection token's ``channels`` claim, or
        subscribed through the HTTP API's ``subscribe``, deliver their
        publications here: iterate the returned :class:`Subscription`
        (``async for event in client.server_subscription("news")``). Ask for
        it before connecting to miss nothing; publications of server-side
        channels nobody asked for go to ``on_publication`` only. Calling it
        again with the same channel returns the same object. The hub resumes
        it from its position on reconnect (``recovered`` tells how it went).

        Args:
            channel: the server-side channel.
            buffer: events buffered before :class:`SlowConsumerError`.
            on_join, on_leave: join and leave callbacks (the namespace must
                push them: ``force_push_join_leave``).
            type: decode each event's data into this type.

        .. versionadded:: 0.2
        """
        sub = self._server_subs.get(channel)
        if sub is None or not sub.active:
            self._check_open()
            sub = Subscription(
                self,
                channel,
                since=None,
                on_lost="continue",
                buffer=self.buffer if buffer is None else buffer,
                token="",
                on_join=on_join,
                on_leave=on_leave,
                type=type,
                server_side=True,
            )
            sub._entered = True
            self._server_subs[channel] = sub
            position = self._session.position(channel)
            if position is not None:
                sub._epoch = position[1]
        return sub

    @property
    def server_channels(self) -> frozenset[str]:
        """The channels the hub subscribed this client to (server-side subscriptions)."""
        return self._session.server_side

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
        type: Any = None,
    ) -> History:
        """A page of a durable channel's history and its current position.

        ``limit=0`` returns only the position; ``since`` returns the events
        after that position; ``reverse`` starts from the newest; ``type``
        decodes each event's data into that type.

        Raises:
            InvalidDataError: with ``type``, an event's data does not fit it.
        """
        start = None if since is None else Position.coerce(since)
        pair = None if start is None else (start.offset, start.epoch)
        reply = await self._request(
            lambda s: s.history(channel, limit=limit, since=pair, reverse=reverse)
        )
        result = reply.result if isinstance(reply.result, HistoryResult) else HistoryResult()
        epoch = result.epoch
        decode = None if type is None else decoder_for(type)
        events = [_event(pub, channel, epoch, decode=decode) for pub in result.publications or ()]
        return History(events=events, position=Position(result.offset, epoch))

    async def presence(self, channel: str) -> dict[str, ClientPresence]:
        """Who is in a channel, by client id."""
        reply = await self._request(lambda s: s.presence(channel))
        result = reply.result if isinstance(reply.result, PresenceResult) else PresenceResult()
        return {client: _presence(info, client) for client, info in (result.presence or {}).items()}

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
            await ws.send(self._session.data_to_send())
        except TransportClosed as exc:
            raise DisconnectedError(f"connection lost: {exc}") from None


def _result_position(result: SubscribeResult) -> Position | None:
    positioned = result.positioned or result.recoverable or bool(result.epoch)
    return Position(result.offset, result.epoch) if positioned else None


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
    on_publication: Callable[[Event], object] | None = None,
    on_state: Callable[[ClientState], object] | None = None,
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
        on_publication: called with each event of every server-side
            subscription (see :meth:`Client.server_subscription`).
        on_state: called with each new client state (``"connecting"``,
            ``"connected"``, ``"disconnected"``).
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
        on_publication=on_publication,
        on_state=on_state,
        proxy=proxy,
    )
