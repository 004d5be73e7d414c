"""Application hooks: who connects, subscribes and publishes, and what an RPC does.

The commands layer (:mod:`eventcast.server.commands`) asks one interface,
:class:`Hooks`, before it connects a client without a token, refreshes an
expiring session, subscribes, publishes, refreshes an expiring subscription or
answers an RPC no in-process handler answers. There are two implementations:

* :class:`AppHooks`: async callables of the application, in process, registered
  with decorators and passed to ``create_app(settings, hooks=hooks)``::

      hooks = AppHooks()

      @hooks.on_connect
      async def connect(request: ConnectRequest) -> ConnectResult:
          user = await sessions.user(request.cookies.get("session"))
          if user is None:
              raise CommandError(codes.DISCONNECT_INVALID_TOKEN)
          return ConnectResult(user=user.id, channels=[f"user:{user.id}"])

* :class:`~eventcast.server.proxy.ProxyHooks`: Centrifugo's HTTP proxy, for a
  backend written against Centrifugo's proxy documentation
  (``EVENTCAST_PROXY_CONNECT_ENDPOINT`` and the other ``proxy_*`` settings).

A hook answers with its result, or refuses by raising
:class:`~eventcast.server.errors.CommandError` with a
:class:`~eventcast.protocol.codes.ClientError` (the command's error reply, such
as 103 "permission denied") or a :class:`~eventcast.protocol.codes.Disconnect`
(the connection is closed with it).

:class:`HookCaller` makes every call the same way, whatever the
implementation:

* bounded in time: past the hook's timeout the client gets error 100;
* one connection's calls run one at a time, in the order of its commands
  (a frame's durable publishes run concurrently, see ``app.py``; a FIFO lock
  per connection keeps their hook calls in order);
* a hook that raises anything but ``CommandError``, or times out, answers the
  client with error 100 "internal server error" (temporary: the SDKs retry).
  One line is logged with the hook's name and the error's type, never a
  traceback or a message body, and the outcome is counted in ``/metrics``
  (``eventcast_hook_calls_total{hook, result}``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from ..exceptions import ConfigurationError, HookError
from ..protocol import codes
from .errors import CommandError

if TYPE_CHECKING:
    from .connection import Connection

__all__ = [
    "CHANNEL_HOOKS",
    "DEFAULT_HOOK_TIMEOUT",
    "HOOK_KINDS",
    "AppHooks",
    "ChainedHooks",
    "ClientRequest",
    "ConnectRequest",
    "ConnectResult",
    "HookCaller",
    "HookKind",
    "Hooks",
    "PublishRequest",
    "PublishResult",
    "RPCRequest",
    "RPCResult",
    "RefreshRequest",
    "RefreshResult",
    "SubRefreshRequest",
    "SubRefreshResult",
    "SubscribeOptions",
    "SubscribeRequest",
    "SubscribeResult",
]

logger = logging.getLogger("eventcast.server")

#: The hooks an application can answer.
HookKind = Literal["connect", "refresh", "subscribe", "publish", "sub_refresh", "rpc"]
#: Every :data:`HookKind`, in the order a client meets them.
HOOK_KINDS: Final[tuple[HookKind, ...]] = (
    "connect",
    "refresh",
    "subscribe",
    "publish",
    "sub_refresh",
    "rpc",
)
#: The hooks asked about one channel (the others are about the connection).
CHANNEL_HOOKS: Final = frozenset({"subscribe", "publish", "sub_refresh"})

#: Default time an in-process hook may take, in seconds (the HTTP proxy's is 1 s).
DEFAULT_HOOK_TIMEOUT: Final = 5.0


# -- what a hook is asked ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRequest:
    """Who is asking: what every hook request carries.

    Attributes:
        client: the connection's client id.
        user: the user id (``""`` before connect, and for anonymous clients).
        transport: the transport: ``websocket``, ``sse`` (eventcast's SSE stream),
            ``http_stream``, ``sse_emulation``, ``uni_websocket``,
            ``uni_http_stream`` or ``uni_sse``.
        protocol: the client protocol's encoding: ``json`` or ``protobuf``.
        headers: the headers of the connection's HTTP request (the WebSocket
            upgrade or the SSE request), case-insensitive.
        address: the client's IP address, as the server saw it, or ``None``.
        meta: what the connect hook attached to the connection (never sent to
            the client), or ``None``.
    """

    client: str
    user: str = ""
    transport: str = "websocket"
    protocol: str = "json"
    headers: Headers = field(default_factory=Headers)
    address: str | None = None
    meta: Any = None

    @property
    def cookies(self) -> dict[str, str]:
        """The cookies of the connection's HTTP request."""
        return cookie_parser(self.headers.get("cookie", ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest(ClientRequest):
    """A client without a token connects.

    Attributes:
        data: what the client sent with ``connect`` (a JSON value), or ``None``.
        name: the client's name (SDKs send it), or ``""``.
        version: the client's version, or ``""``.
    """

    data: Any = None
    name: str = ""
    version: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshRequest(ClientRequest):
    """A connection's session reached its expiry: extend it or let it end."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeRequest(ClientRequest):
    """A client subscribes to a channel.

    Attributes:
        channel: the channel.
        data: what the client sent with ``subscribe`` (a JSON value), or ``None``.
    """

    channel: str
    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishRequest(ClientRequest):
    """A client publishes into a channel.

    Attributes:
        channel: the channel.
        data: the publication's data (a JSON value).
    """

    channel: str
    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubRefreshRequest(ClientRequest):
    """A subscription reached its expiry: extend it or let it end.

    Attributes:
        channel: the channel.
    """

    channel: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RPCRequest(ClientRequest):
    """A client calls a method.

    Attributes:
        method: the method's name (``""`` when the client named none).
        data: the call's data (a JSON value), or ``None``.
    """

    method: str = ""
    data: Any = None


# -- what a hook answers -------------------------------------------------------------------
#
# ``data`` and ``info`` fields take a JSON value, or ``bytes`` holding encoded JSON
# (passed through as is, as the HTTP proxy's answers are).


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeOptions:
    """A server-side subscription the connect hook asks for, with its options.

    Attributes:
        info: channel information of this subscriber (kept for the subscription).
        data: sent to the client in the subscription's part of the connect reply.
    """

    info: Any = None
    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectResult:
    """The connect hook let the client in.

    Attributes:
        user: the user id (``""``: an anonymous client).
        expire_at: when the session expires (Unix seconds), or ``None`` for
            never. With a refresh hook the hub asks it then; without one the
            client refreshes with a token.
        info: connection information shared with other clients (presence,
            join/leave).
        data: sent to the client in the connect reply.
        channels: server-side channels the connection joins.
        subs: server-side channels with options (joined too).
        meta: attached to the connection and given to every later hook, never
            sent to the client.
    """

    user: str = ""
    expire_at: float | None = None
    info: Any = None
    data: Any = None
    channels: Sequence[str] = ()
    subs: Mapping[str, SubscribeOptions] = field(default_factory=dict)
    meta: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshResult:
    """The refresh hook's answer.

    Attributes:
        expired: end the session now (the client is closed with 3005).
        expire_at: the session's new expiry (Unix seconds), or ``None`` for never.
        info: new connection information, or ``None`` to keep it.
    """

    expired: bool = False
    expire_at: float | None = None
    info: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeResult:
    """The subscribe hook let the client subscribe.

    Attributes:
        info: channel information of this subscriber.
        data: sent to the client in the subscribe reply.
        expire_at: when the subscription expires (Unix seconds), or ``None``
            for never. With a sub_refresh hook the hub asks it then; without
            one the client refreshes with a subscription token.
    """

    info: Any = None
    data: Any = None
    expire_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishResult:
    """The publish hook let the client publish.

    Attributes:
        data: publish this instead of what the client sent (``None``: as sent).
        tags: tags of the publication.
        idempotency_key: on a durable channel, a repeat within the dedup window
            is stored once.
    """

    data: Any = None
    tags: Mapping[str, str] | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubRefreshResult:
    """The sub_refresh hook's answer.

    Attributes:
        expired: end the subscription now (the client is closed with 3006).
        expire_at: the subscription's new expiry (Unix seconds), or ``None`` for never.
        info: new channel information, or ``None`` to keep it.
    """

    expired: bool = False
    expire_at: float | None = None
    info: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RPCResult:
    """The rpc hook's answer.

    Attributes:
        data: returned to the client (a JSON value, or bytes of encoded JSON).
    """

    data: Any = None


# -- the interface ---------------------------------------------------------------------------


class Hooks(ABC):
    """What the application decides; the commands layer asks it.

    Each method is called only when :meth:`handles` says so for that hook
    (and channel). A method returns its result or raises
    :class:`~eventcast.server.errors.CommandError` to refuse; see the module
    documentation for everything else.
    """

    @abstractmethod
    def handles(self, kind: HookKind, channel: str | None = None) -> bool:
        """Whether this hook is answered here (for ``channel``, for the channel hooks)."""

    @abstractmethod
    def timeout(self, kind: HookKind, channel: str | None = None) -> float:
        """The most seconds a call of this hook (for ``channel``) may take."""

    @abstractmethod
    async def connect(self, request: ConnectRequest) -> ConnectResult:
        """Let a client without a token in, or refuse it."""

    @abstractmethod
    async def refresh(self, request: RefreshRequest) -> RefreshResult:
        """Extend an expiring session, or end it."""

    @abstractmethod
    async def subscribe(self, request: SubscribeRequest) -> SubscribeResult:
        """Let a client subscribe, or refuse it."""

    @abstractmethod
    async def publish(self, request: PublishRequest) -> PublishResult:
        """Let a client publish (maybe other data), or refuse it."""

    @abstractmethod
    async def sub_refresh(self, request: SubRefreshRequest) -> SubRefreshResult:
        """Extend an expiring subscription, or end it."""

    @abstractmethod
    async def rpc(self, request: RPCRequest) -> RPCResult:
        """Answer a client's RPC."""

    async def aclose(self) -> None:  # noqa: B027 - optional: nothing to release by default
        """Release what the hooks hold (connections to a backend). Idempotent."""


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


class AppHooks(Hooks):
    """In-process hooks: async functions of the application, registered with decorators.

    .. code-block:: python

        hooks = AppHooks(timeout=2.0)

        @hooks.on_subscribe
        async def subscribe(request: SubscribeRequest) -> SubscribeResult:
            if not await may_read(request.user, request.channel):
                raise CommandError(codes.ERROR_PERMISSION_DENIED)
            return SubscribeResult()

        app = create_app(settings, hooks=hooks)

    The ``subscribe`` and ``publish`` hooks decide for every channel, instead
    of the namespace's ``allow_*`` options (a subscription token and the
    ``#`` user-limited channels still decide on their own, as in Centrifugo).

    Args:
        timeout: the most seconds one call may take (then the client gets 100).

    Raises:
        ConfigurationError: ``timeout`` is not a positive finite number.
    """

    def __init__(self, *, timeout: float = DEFAULT_HOOK_TIMEOUT) -> None:
        if not math.isfinite(timeout) or timeout <= 0:
            raise ConfigurationError("a hook timeout must be a positive number of seconds")
        self._timeout = timeout
        self._functions: dict[HookKind, Callable[[Any], Awaitable[Any]]] = {}

    def _register(self, kind: HookKind, func: _F) -> _F:
        if not callable(func):
            raise ConfigurationError(f"the {kind} hook must be an async function")
        if kind in self._functions:
            raise ConfigurationError(f"a {kind} hook is registered already")
        self._functions[kind] = func
        return func

    def on_connect(self, func: _F) -> _F:
        """Register ``async def f(request: ConnectRequest) -> ConnectResult``."""
        return self._register("connect", func)

    def on_refresh(self, func: _F) -> _F:
        """Register ``async def f(request: RefreshRequest) -> RefreshResult``."""
        return self._register("refresh", func)

    def on_subscribe(self, func: _F) -> _F:
        """Register ``async def f(request: SubscribeRequest) -> SubscribeResult``."""
        return self._register("subscribe", func)

    def on_publish(self, func: _F) -> _F:
        """Register ``async def f(request: PublishRequest) -> PublishResult``."""
        return self._register("publish", func)

    def on_sub_refresh(self, func: _F) -> _F:
        """Register ``async def f(request: SubRefreshRequest) -> SubRefreshResult``."""
        return self._register("sub_refresh", func)

    def on_rpc(self, func: _F) -> _F:
        """Register ``async def f(request: RPCRequest) -> RPCResult`` (any method)."""
        return self._register("rpc", func)

    def handles(self, kind: HookKind, channel: str | None = None) -> bool:
        return kind in self._functions

    def timeout(self, kind: HookKind, channel: str | None = None) -> float:
        return self._timeout

    async def _call(self, kind: HookKind, request: Any, expected: type[Any]) -> Any:
        result = await self._functions[kind](request)
        if not isinstance(result, expected):
            raise HookError(
                f"the {kind} hook returned {type(result).__name__}, not {expected.__name__}"
            )
        return result

    async def connect(self, request: ConnectRequest) -> ConnectResult:
        result: ConnectResult = await self._call("connect", request, ConnectResult)
        return result

    async def refresh(self, request: RefreshRequest) -> RefreshResult:
        result: RefreshResult = await self._call("refresh", request, RefreshResult)
        return result

    async def subscribe(self, request: SubscribeRequest) -> SubscribeResult:
        result: SubscribeResult = await self._call("subscribe", request, SubscribeResult)
        return result

    async def publish(self, request: PublishRequest) -> PublishResult:
        result: PublishResult = await self._call("publish", request, PublishResult)
        return result

    async def sub_refresh(self, request: SubRefreshRequest) -> SubRefreshResult:
        result: SubRefreshResult = await self._call("sub_refresh", request, SubRefreshResult)
        return result

    async def rpc(self, request: RPCRequest) -> RPCResult:
        result: RPCResult = await self._call("rpc", request, RPCResult)
        return result

    def __repr__(self) -> str:
        return f"<AppHooks {sorted(self._functions)}>"


class ChainedHooks(Hooks):
    """Several :class:`Hooks`: each hook is answered by the first that handles it.

    ``create_app(settings, hooks=app_hooks)`` with ``proxy_*`` endpoints set
    chains the in-process hooks before the HTTP proxy.
    """

    def __init__(self, *members: Hooks) -> None:
        self.members = members

    def _first(self, kind: HookKind, channel: str | None) -> Hooks:
        for member in self.members:
            if member.handles(kind, channel):
                return member
        raise HookError(f"no {kind} hook is configured")

    def handles(self, kind: HookKind, channel: str | None = None) -> bool:
        return any(member.handles(kind, channel) for member in self.members)

    def timeout(self, kind: HookKind, channel: str | None = None) -> float:
        return self._first(kind, channel).timeout(kind, channel)

    async def connect(self, request: ConnectRequest) -> ConnectResult:
        return await self._first("connect", None).connect(request)

    async def refresh(self, request: RefreshRequest) -> RefreshResult:
        return await self._first("refresh", None).refresh(request)

    async def subscribe(self, request: SubscribeRequest) -> SubscribeResult:
        return await self._first("subscribe", request.channel).subscribe(request)

    async def publish(self, request: PublishRequest) -> PublishResult:
        return await self._first("publish", request.channel).publish(request)

    async def sub_refresh(self, request: SubRefreshRequest) -> SubRefreshResult:
        return await self._first("sub_refresh", request.channel).sub_refresh(request)

    async def rpc(self, request: RPCRequest) -> RPCResult:
        return await self._first("rpc", None).rpc(request)

    async def aclose(self) -> None:
        for member in self.members:
            await member.aclose()


# -- calling them ----------------------------------------------------------------------------

_R = TypeVar("_R")

#: How a call ended, as counted in ``eventcast_hook_calls_total``.
HookOutcome = Literal["ok", "rejected", "error", "timeout"]


class HookCaller:
    """Calls :class:`Hooks` for the commands layer: ordered, bounded in time, failures counted.

    Args:
        hooks: the application's hooks, or ``None`` when it has none.
    """

    def __init__(self, hooks: Hooks | None) -> None:
        #: The hooks asked (``None``: none configured).
        self.hooks = hooks
        #: Calls by ``(hook, outcome)``, for ``/metrics``.
        self.calls: dict[tuple[str, str], int] = {}

    def handles(self, kind: HookKind, channel: str | None = None) -> bool:
        """Whether a hook of this kind (for ``channel``) is configured."""
        return self.hooks is not None and self.hooks.handles(kind, channel)

    def _count(self, kind: HookKind, outcome: HookOutcome) -> None:
        key = (kind, outcome)
        self.calls[key] = self.calls.get(key, 0) + 1

    async def call(
        self,
        kind: HookKind,
        conn: Connection,
        run: Callable[[Hooks], Awaitable[_R]],
        channel: str | None = None,
    ) -> _R:
        """Run one hook call for ``conn``: ``await run(hooks)``, in order, within its timeout.

        Raises:
            CommandError: the hook refused (its own answer), or failed or timed
                out (error 100 "internal server error").
        """
        hooks = self.hooks
        if hooks is None:
            raise CommandError(codes.ERROR_INTERNAL)
        lock = conn.hooks_lock
        if lock is None:
            lock = conn.hooks_lock = asyncio.Lock()
        async with lock:
            try:
                async with asyncio.timeout(hooks.timeout(kind, channel)):
                    result = await run(hooks)
            except CommandError:
                self._count(kind, "rejected")
                raise
            except TimeoutError:
                self._count(kind, "timeout")
                logger.warning("the %s hook for %s timed out", kind, conn.id)
                raise CommandError(codes.ERROR_INTERNAL) from None
            except Exception as exc:
                self._count(kind, "error")
                # Our own errors say what failed without quoting bodies; an
                # application's exception is named by its type only.
                detail = f": {exc}" if isinstance(exc, HookError) else ""
                logger.warning(
                    "the %s hook for %s failed: %s%s", kind, conn.id, type(exc).__name__, detail
                )
                raise CommandError(codes.ERROR_INTERNAL) from None
        self._count(kind, "ok")
        return result

    async def aclose(self) -> None:
        """Release the hooks' resources. Idempotent."""
        if self.hooks is not None:
            await self.hooks.aclose()
