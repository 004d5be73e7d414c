"""The Centrifuge client commands, dispatched by an explicit table.

:meth:`Commands.handle` runs one command a client sent (already admitted by
the connection's :class:`~eventcast.protocol.session.ServerSession`): it takes
a token from the rate limits, finds the handler in :attr:`Commands.table`,
and queues the reply or the error on the connection. Handlers raise
:class:`~eventcast.server.errors.CommandError` to answer with a protocol
error or a disconnect; the permission checks come from
:mod:`eventcast.server.permissions`.

Subscribing is the delicate command: the connection joins the channel first,
holding live events aside, then the replay (if asked) and the head position
are read through the bus's one replay path. The caller queues the reply and
then :meth:`~eventcast.server.channels.Channels.release` hands over to live
delivery under the handoff rule of :mod:`eventcast.replay`.

The application's hooks (:mod:`eventcast.server.hooks`) are asked here, and
only here: on connect without a token, on subscribe and publish where a hook
decides (instead of the namespace's ``allow_*`` options), on rpc when no
in-process handler answers, and when a session or a subscription expires
while a refresh hook is configured (the hub extends it, not the client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgspec
from starlette.datastructures import Headers

from .. import __version__
from .._caches import remember
from ..events import Event
from ..exceptions import (
    BackplaneError,
    HookError,
    InvalidTokenError,
    InvalidTopicError,
    KeySetError,
    LogError,
    TokenExpiredError,
)
from ..handlers import backoff_delay
from ..protocol import codes
from ..protocol.codes import Disconnect
from ..protocol.frames import (
    ConnectRequest,
    ConnectResult,
    HistoryRequest,
    HistoryResult,
    PresenceRequest,
    PresenceResult,
    PresenceStatsRequest,
    PresenceStatsResult,
    Publication,
    PublishRequest,
    RefreshRequest,
    RefreshResult,
    RPCRequest,
    RPCResult,
    SendRequest,
    StreamPosition,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeRequest,
    SubscribeResult,
    UnsubscribeRequest,
    raw,
)
from ..protocol.session import Request
from ..topics import is_pattern, validate_topic
from . import hooks
from .channels import Membership
from .connection import Connection
from .errors import CommandError
from .fanout import delta_mode, latest_publication, subscription_options
from .hooks import HookCaller, HookKind, Hooks
from .limits import TokenBucket
from .permissions import Permissions

if TYPE_CHECKING:
    from .auth import SubscriptionClaims
    from .config import NamespaceConfig
    from .hub import Hub

__all__ = ["Admission", "CommandHandler", "Commands", "Grant", "publication"]

logger = logging.getLogger("eventcast.server")

#: A command handler: ``await handler(connection, request body)`` returns the result.
CommandHandler = Callable[[Connection, Any], Awaitable[Any]]

#: Most users whose command rate is tracked (the table is cleared past it).
_USER_BUCKETS_LIMIT: Final = 100_000

#: Retries of a refresh hook that failed (the session stays open meanwhile):
#: exponential backoff from this base, in seconds, up to the cap.
_REFRESH_RETRY_BASE: Final = 1.0
_REFRESH_RETRY_CAP: Final = 30.0

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _json(value: Any, what: str) -> bytes | None:
    """A hook's ``data``/``info`` as encoded JSON (``bytes`` must be JSON already).

    Raises:
        HookError: the value is not JSON.
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        encoded = bytes(value)
        try:
            _decode(encoded)
        except msgspec.DecodeError:
            raise HookError(f"{what} is not JSON") from None
        return encoded
    try:
        return _encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise HookError(f"{what} cannot be encoded as JSON: {type(exc).__name__}") from None


def _client_data(data: msgspec.Raw) -> Any:
    """What a client sent as ``data`` (valid JSON: the frame decoded), as a value."""
    return _decode(bytes(data)) if data else None


def _who(conn: Connection) -> dict[str, Any]:
    """The fields of :class:`~eventcast.server.hooks.ClientRequest` for a connection."""
    return {
        "client": conn.id,
        "user": conn.user,
        "transport": conn.transport_name,
        "protocol": "protobuf" if conn.encoding.binary else "json",
        "headers": Headers(raw=list(conn.headers)),
        "address": conn.address,
        "meta": conn.meta,
    }


@dataclass(slots=True)
class Admission:
    """What authentication decided beyond the connection's identity.

    Attributes:
        channels: the server-side channels to join, with the connect hook's options.
        data: for the client, in the connect reply (encoded JSON).
    """

    channels: dict[str, hooks.SubscribeOptions | None] = field(default_factory=dict)
    data: bytes | None = None


@dataclass(slots=True)
class Grant:
    """A subscription that may go ahead.

    Attributes:
        namespace: the channel's namespace options.
        expires_at: when it expires (Unix seconds), or ``None``.
        info: channel information of the subscriber, from the hook (encoded JSON).
        data: for the client, in the subscribe reply (encoded JSON).
        refreshed_by_hook: a sub_refresh hook extends it (not the client).
        token: the claims of the subscription token that granted it, if any.
    """

    namespace: NamespaceConfig
    expires_at: float | None = None
    info: bytes | None = None
    data: bytes | None = None
    refreshed_by_hook: bool = False
    token: SubscriptionClaims | None = None


def publication(event: Event) -> Publication:
    """An event as a publication of a reply (history, recovery)."""
    return Publication(
        data=raw(event.encoded_data()),
        offset=event.offset or 0,
        tags=dict(event.tags) or None,
    )


class Commands:
    """What each client command does, on top of the hub's parts.

    Args:
        hub: the hub whose parts the commands use.
    """

    def __init__(self, hub: Hub, hooks: Hooks | None = None) -> None:
        self._hub = hub
        #: Calls the application's hooks (see :mod:`eventcast.server.hooks`).
        self.hooks = HookCaller(hooks)
        #: Method name -> handler. A method missing here is answered with 104.
        self.table: Final[Mapping[str, CommandHandler]] = {
            "connect": self.connect,
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "publish": self.publish,
            "presence": self.presence,
            "presence_stats": self.presence_stats,
            "history": self.history,
            "ping": self.ping,
            "send": self.send,
            "rpc": self.rpc,
            "refresh": self.refresh,
            "sub_refresh": self.sub_refresh,
        }
        self._user_buckets: dict[str, TokenBucket] = {}

    # -- dispatch ----------------------------------------------------------------------

    def allow(self, conn: Connection) -> bool:
        """Take a token from the connection's and the user's command buckets."""
        settings = self._hub.settings
        bucket = conn.bucket
        if bucket is None:
            bucket = conn.bucket = TokenBucket(settings.command_rate)
        if not bucket.take():
            return False
        if not conn.user:
            return True
        user_bucket = self._user_buckets.get(conn.user)
        if user_bucket is None:
            user_bucket = remember(
                self._user_buckets,
                conn.user,
                TokenBucket(settings.user_command_rate),
                _USER_BUCKETS_LIMIT,
            )
        return user_bucket.take()

    async def handle(self, conn: Connection, request: Request) -> None:
        """Execute one admitted command and queue its reply on the connection."""
        if request.method != "connect" and not self._allowed(conn, request):
            return
        await self._run(conn, request)

    def handle_now(self, conn: Connection, request: Request) -> Coroutine[Any, Any, None] | None:
        """:meth:`handle` without a coroutine when the command needs no await.

        That is a publication into a live channel, with no publish hook (see
        :meth:`publish_now`): done at once, ``None`` returned. Any other
        command returns the coroutine that executes it, and a publication that
        must be awaited the coroutine that finishes it.
        """
        if request.method != "publish":
            return self.handle(conn, request)
        if not self._allowed(conn, request):
            return None
        try:
            pending = self.publish_now(conn, request.body)
        except Exception as exc:
            self._failed(conn, request, exc)
            return None
        if pending is not None:
            return self._run(conn, request, pending)
        self._succeeded(conn, request, None)
        return None

    def _allowed(self, conn: Connection, request: Request) -> bool:
        """Take a command's tokens; over the rate, answer it with 111 and say no."""
        if self.allow(conn):
            return True
        # Temporary: the SDKs retry it, so it must not count towards 3509.
        conn.session.error(request.id, codes.ERROR_TOO_MANY_REQUESTS, client_fault=False)
        conn.send_session_output()
        return False

    async def _run(
        self, conn: Connection, request: Request, begun: Awaitable[object] | None = None
    ) -> None:
        """Execute a command whose tokens were taken, or finish the publication
        :meth:`publish_now` began (``begun``: its reply is empty)."""
        try:
            if begun is not None:
                await begun
                result = None
            else:
                handler = self.table.get(request.method)
                if handler is None:
                    raise CommandError(codes.ERROR_METHOD_NOT_FOUND)
                result = await handler(conn, request.body)
        except Exception as exc:
            self._failed(conn, request, exc)
        else:
            self._succeeded(conn, request, result)

    def _failed(self, conn: Connection, request: Request, exc: Exception) -> None:
        """Answer a command that raised ``exc`` (called while it is handled)."""
        session = conn.session
        if isinstance(exc, CommandError):
            answer = exc.answer
            if isinstance(answer, Disconnect):
                session.close(answer)
            else:
                session.error(request.id, answer)
        elif isinstance(exc, (LogError, KeySetError, BackplaneError)):
            logger.warning("%s on %s failed: %s", request.method, conn.id, exc)
            session.error(request.id, codes.ERROR_INTERNAL)
        else:
            # Every error counts toward the connection's budget, internal ones (100)
            # included: a connection whose commands keep failing ends in 3509.
            logger.exception("%s on %s failed", request.method, conn.id)
            session.error(request.id, codes.ERROR_INTERNAL)
        conn.send_session_output()

    def _succeeded(self, conn: Connection, request: Request, result: Any) -> None:
        """Reply to a command that returned ``result``."""
        session = conn.session
        method = request.method
        if method == "connect":
            session.connected(request, result)
            conn.send_session_output()
            self.after_connect(conn)
            return
        session.reply(request, result)
        # (For subscribe: the reply must precede the live publications held
        # meanwhile: queue it, then release them, with no await in between.)
        conn.send_session_output()
        if method == "subscribe":
            membership = conn.channels.get(request.body.channel)
            if membership is not None and membership.held is not None:
                self._hub.channels.release(conn, membership)

    # -- connecting --------------------------------------------------------------------

    async def authenticate(
        self, conn: Connection, token: str | None, req: ConnectRequest | None = None
    ) -> Admission:
        """Set a connection's identity from its token or the connect hook.

        A token wins; without one the connect hook decides, if there is one;
        else the client is anonymous, if that is allowed. With a refresh hook,
        the hub asks it when the session expires (see :meth:`_refresh`).

        Args:
            conn: the connection (WebSocket or SSE).
            token: the connection token, if the client sent one.
            req: the ``connect`` command (``None`` for SSE).

        Raises:
            TokenExpiredError: the token expired.
            InvalidTokenError: the token is invalid, or missing while anonymous
                connections are not allowed.
            KeySetError: the JWKS needed to check the token could not be read.
            CommandError: the connect hook refused or failed, the user is blocked
                (3503) or the token revoked (3500), or the user has too many
                connections (3504) on this node or in the cluster (see
                :meth:`Cluster.admit <eventcast.server.cluster.Cluster.admit>`).
        """
        hub = self._hub
        admission = Admission()
        if token:
            await hub.verifier.prepare(token)
            claims = hub.verifier.verify_connection(token)
            refusal = hub.cluster.access.refuses(claims.user, claims.token_id, claims.issued_at)
            if refusal is not None:
                raise CommandError(refusal)
            conn.user = claims.user
            conn.anonymous = False
            conn.expires_at = claims.expires_at
            conn.token_id, conn.issued_at = claims.token_id, claims.issued_at
            conn.info = None if claims.info is None else _encode(claims.info)
            admission.channels = dict.fromkeys(claims.channels)
        elif self.hooks.handles("connect"):
            admission = await self._connect_hook(conn, req)
        elif not hub.settings.allow_anonymous:
            raise InvalidTokenError("a token is required")
        if self.hooks.handles("refresh"):
            conn.on_expire = self._session_expired
        # Anonymous clients share the empty user id: they are not one user (as in Centrifugo).
        if conn.user:
            if not token:  # a connect hook's user: a blocked one is refused as well
                refusal = hub.cluster.access.refuses(conn.user, None, None)
                if refusal is not None:
                    raise CommandError(refusal)
            if hub.registry.user_connections(conn.user) >= hub.settings.connections_per_user:
                raise CommandError(codes.DISCONNECT_CONNECTION_LIMIT)
            await hub.cluster.admit(conn)
        return admission

    async def _connect_hook(self, conn: Connection, req: ConnectRequest | None) -> Admission:
        request = hooks.ConnectRequest(
            **_who(conn),
            data=_client_data(req.data) if req is not None else None,
            name=req.name if req is not None else "",
            version=req.version if req is not None else "",
        )

        async def run(h: Hooks) -> Admission:
            result = await h.connect(request)
            if not isinstance(result.user, str):
                raise HookError("the connect hook returned a user that is not a str")
            channels: dict[str, hooks.SubscribeOptions | None] = {}
            try:
                for name in result.channels:
                    channels[validate_topic(name)] = None
                for name, options in result.subs.items():
                    # Encoded here, so a bad value is the hook's failure (100).
                    channels[validate_topic(name)] = hooks.SubscribeOptions(
                        info=_json(options.info, "the connect hook's channel info"),
                        data=_json(options.data, "the connect hook's channel data"),
                    )
            except InvalidTopicError as exc:
                raise HookError(f"the connect hook returned a bad channel: {exc}") from None
            conn.user = result.user
            conn.anonymous = not result.user
            conn.expires_at = result.expire_at
            conn.info = _json(result.info, "the connect hook's info")
            conn.meta = result.meta
            return Admission(channels, _json(result.data, "the connect hook's data"))

        return await self.hooks.call("connect", conn, run)

    def _claims(self, token: str) -> Any:
        try:
            return self._hub.verifier.verify_connection(token)
        except TokenExpiredError:
            raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
        except InvalidTokenError:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN) from None

    async def connect(self, conn: Connection, req: ConnectRequest) -> ConnectResult:
        """``connect``: authenticate, register, and join the server-side channels."""
        hub = self._hub
        settings = hub.settings
        if hub.closing:
            raise CommandError(codes.DISCONNECT_SHUTDOWN)
        try:
            admission = await self.authenticate(conn, req.token, req)
        except TokenExpiredError:
            raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
        except InvalidTokenError:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN) from None
        if hub.closing:  # began while a hook or the JWKS was awaited
            raise CommandError(codes.DISCONNECT_SHUTDOWN)
        if not conn.is_open():
            raise CommandError(codes.DISCONNECT_CONNECTION_CLOSED)
        hub.registry.register(conn)
        result = ConnectResult(
            client=conn.id,
            version=f"eventcast {__version__}",
            ping=int(settings.ping_interval),
            pong=True,
            # The cluster id, as Centrifugo's: emulation requests name it (see emulation.py).
            node=hub.cluster.node_id,
            data=raw(admission.data),
            session=conn.session_id,
        )
        if conn.expires_at is not None and conn.on_expire is None:
            # Without a refresh hook the client refreshes with a new token.
            result.expires = True
            result.ttl = max(1, int(conn.expires_at - time.time()))
        if admission.channels:
            subs: dict[str, SubscribeResult] = {}
            wanted = req.subs or {}
            for name, options in admission.channels.items():
                sub_req = wanted.get(name) or SubscribeRequest(channel=name)
                sub_req.channel = name
                subs[name] = await self.join(conn, sub_req, server_side=True, options=options)
            result.subs = subs
        return result

    def after_connect(self, conn: Connection) -> None:
        """Release held publications of server-side subscriptions after the connect reply."""
        for membership in list(conn.channels.values()):
            if membership.held is not None:
                self._hub.channels.release(conn, membership)
        conn.arm_expiry()

    async def refresh(self, conn: Connection, req: RefreshRequest) -> RefreshResult:
        """``refresh``: extend the connection's expiry with a new token."""
        if not req.token:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("token required"))
        await self._hub.verifier.prepare(req.token)
        claims = self._claims(req.token)
        if claims.user != conn.user:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN)
        refusal = self._hub.cluster.access.refuses(claims.user, claims.token_id, claims.issued_at)
        if refusal is not None:
            raise CommandError(refusal)
        conn.expires_at = claims.expires_at
        conn.token_id, conn.issued_at = claims.token_id, claims.issued_at
        result = RefreshResult(client=conn.id, version=f"eventcast {__version__}")
        if conn.expires_at is not None:
            result.expires = True
            result.ttl = max(1, int(conn.expires_at - time.time()))
            conn.arm_expiry()
        return result

    # -- subscribing -------------------------------------------------------------------

    async def subscribe(self, conn: Connection, req: SubscribeRequest) -> SubscribeResult:
        """``subscribe``: join a channel as the client asked (see :meth:`join`)."""
        return await self.join(conn, req, server_side=False)

    async def authorize(
        self, conn: Connection, req: SubscribeRequest, *, server_side: bool
    ) -> Grant:
        """Check that ``conn`` may subscribe as ``req`` asks: the permissions, then the hook.

        The subscribe hook decides where one is configured, except for a
        subscription token, a ``#`` user-limited channel or a server-side
        subscription (as Centrifugo's subscribe proxy).

        Raises:
            CommandError: the subscription is refused (by a rule or the hook),
                or the hook failed (100).
            KeySetError: the JWKS needed to check the token could not be read.
        """
        hub = self._hub
        name = req.channel
        if req.token:
            await hub.verifier.prepare(req.token)
        hooked = self.hooks.handles("subscribe", name) and Permissions.hook_decides(
            name, token=req.token, server_side=server_side
        )
        ns, claims = hub.permissions.subscribe(
            conn, name, token=req.token, server_side=server_side, hooked=hooked
        )
        grant = Grant(ns, None if claims is None else claims.expires_at, token=claims)
        if hooked:
            request = hooks.SubscribeRequest(
                **_who(conn), channel=name, data=_client_data(req.data)
            )

            async def run(h: Hooks) -> None:
                result = await h.subscribe(request)
                grant.expires_at = result.expire_at
                grant.info = _json(result.info, "the subscribe hook's info")
                grant.data = _json(result.data, "the subscribe hook's data")

            await self.hooks.call("subscribe", conn, run, name)
        grant.refreshed_by_hook = grant.expires_at is not None and self.hooks.handles(
            "sub_refresh", name
        )
        return grant

    async def join(
        self,
        conn: Connection,
        req: SubscribeRequest,
        *,
        server_side: bool,
        options: hooks.SubscribeOptions | None = None,
    ) -> SubscribeResult:
        """Join a channel, holding live events until the caller has queued the reply.

        The caller must queue the reply (or push), then call
        :meth:`Channels.release <eventcast.server.channels.Channels.release>`.

        Args:
            conn: the connection.
            req: the subscribe request (its token, recovery position, data).
            server_side: the server subscribes the connection (already authorized).
            options: the connect hook's options of a server-side subscription,
                with ``info`` and ``data`` encoded.

        Raises:
            CommandError: the subscription is refused.
        """
        hub = self._hub
        name = req.channel
        if name in conn.channels:
            raise CommandError(codes.ERROR_ALREADY_SUBSCRIBED)
        grant = await self.authorize(conn, req, server_side=server_side)
        ns, expires_at = grant.namespace, grant.expires_at
        if options is not None:  # encoded JSON already (see _connect_hook)
            grant.info = options.info
            grant.data = options.data
        if not conn.is_open():  # closed while the hook was awaited
            raise CommandError(codes.ERROR_INTERNAL)
        if name in conn.channels:
            raise CommandError(codes.ERROR_ALREADY_SUBSCRIBED)
        if len(conn.channels) >= hub.settings.channels_per_connection:
            raise CommandError(codes.ERROR_LIMIT_EXCEEDED.with_message("channel limit"))
        delivery = subscription_options(ns, req, pattern=is_pattern(name))
        membership = Membership(
            channel=name,
            server_side=server_side,
            expires_at=expires_at,
            join_leave=ns.join_leave and (req.join_leave or ns.force_push_join_leave),
            presence=ns.presence,
            info=grant.info,
            token=grant.token,
            tag_filter=delivery.tag_filter,
            delta=delivery.delta,
            conflation_key=delivery.conflation_key,
        )
        await hub.channels.join(conn, name, membership)
        result = SubscribeResult(data=raw(grant.data), delta=delivery.delta)
        try:
            if ns.presence:
                await hub.presence_keeper.add(name, conn)
                if ns.join_leave:
                    hub.join_leave(name, "join", conn, membership.info)
            self.arm_subscription(conn, membership, grant)
            if expires_at is not None and not grant.refreshed_by_hook:
                # The client refreshes with a new subscription token.
                result.expires = True
                result.ttl = max(1, int(expires_at - time.time()))
            if ns.history_size > 0 and not is_pattern(name):
                recover = req.recover and ns.allow_recovery
                since = StreamPosition(offset=req.offset, epoch=req.epoch) if recover else None
                if ns.force_recovery_mode == "cache":
                    recover = (req.recover or ns.force_recovery) and ns.allow_recovery
                    replay = await latest_publication(hub.bus, name, since, recover=recover)
                else:
                    replay = await hub.replay(name, since)
                result.epoch = replay.position.epoch
                result.offset = replay.position.offset
                result.recoverable = ns.force_recovery or (ns.allow_recovery and req.recover)
                result.positioned = True
                if recover:
                    result.was_recovering = req.recover
                    result.recovered = bool(replay.recovered)
                    hub.recoveries[result.recovered] += 1
                    if replay.events:
                        result.publications = [publication(e) for e in replay.events]
                        if delivery.delta:
                            delta_mode(result.publications, conn.encoding)
                membership.handoff = replay.handoff()
        except BaseException:
            hub.channels.leave(conn, name)
            raise
        if conn.closed or conn.channels.get(name) is not membership:
            raise CommandError(codes.ERROR_INTERNAL)
        return result

    def arm_subscription(self, conn: Connection, membership: Membership, grant: Grant) -> None:
        """Arm a new subscription's expiry: then the sub_refresh hook extends it, or 3006."""
        if grant.expires_at is None:
            return
        if grant.refreshed_by_hook:
            membership.on_expire = self._subscription_expired
        membership.arm_expiry(conn)

    async def sub_refresh(self, conn: Connection, req: SubRefreshRequest) -> SubRefreshResult:
        """``sub_refresh``: extend a subscription's expiry with a new subscription token."""
        membership = conn.channels.get(req.channel)
        if membership is None:
            raise CommandError(codes.ERROR_PERMISSION_DENIED.with_message("not subscribed"))
        if req.token:
            await self._hub.verifier.prepare(req.token)
        _, claims = self._hub.permissions.subscribe(conn, req.channel, token=req.token)
        expires_at = None if claims is None else claims.expires_at
        membership.expires_at = expires_at
        membership.token = claims
        result = SubRefreshResult()
        if expires_at is not None:
            result.expires = True
            result.ttl = max(1, int(expires_at - time.time()))
            membership.arm_expiry(conn)
        return result

    async def unsubscribe(self, conn: Connection, req: UnsubscribeRequest) -> None:
        """``unsubscribe``: leave a channel (a channel the client is not in is fine)."""
        self._hub.channels.leave(conn, req.channel)

    # -- publishing and reading --------------------------------------------------------

    async def publish(self, conn: Connection, req: PublishRequest) -> None:
        """``publish``: into a channel the client may publish to (a publish hook may rewrite it)."""
        hub = self._hub
        channel = req.channel
        hooked = self.hooks.handles("publish", channel)
        data = self._publishable(conn, req, hooked)
        if not hooked:
            await hub.publish(channel, data)
            return
        request = hooks.PublishRequest(**_who(conn), channel=channel, data=_decode(data))

        async def run(h: Hooks) -> hooks.PublishResult:
            result = await h.publish(request)
            rewritten = _json(result.data, "the publish hook's data")
            if rewritten is None:
                return result
            return hooks.PublishResult(
                data=rewritten, tags=result.tags, idempotency_key=result.idempotency_key
            )

        result = await self.hooks.call("publish", conn, run, channel)
        tags = dict(result.tags) if result.tags else None
        await hub.publish(
            channel,
            data if result.data is None else result.data,
            tags=tags,
            idempotency_key=result.idempotency_key,
        )

    def publish_now(
        self, conn: Connection, req: PublishRequest
    ) -> Coroutine[Any, Any, object] | None:
        """:meth:`publish` done at once (``None``), or the coroutine that finishes
        it when it must be awaited: a publish hook (the whole command), a
        durable channel (the data checked already: see :meth:`Hub.publish_now`)."""
        channel = req.channel
        if self.hooks.handles("publish", channel):
            return self.publish(conn, req)
        pending = self._hub.publish_now(channel, self._publishable(conn, req, False))
        return None if isinstance(pending, Event) else pending

    def _publishable(self, conn: Connection, req: PublishRequest, hooked: bool) -> bytes:
        """A client publication's data, once the client may publish it."""
        self._hub.permissions.publish(conn, req.channel, hooked=hooked)
        if not req.data:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("data required"))
        return bytes(req.data)

    async def history(self, conn: Connection, req: HistoryRequest) -> HistoryResult:
        """``history``: a page of a channel's history the client may read."""
        self._hub.permissions.history(conn, req.channel)
        since = None if req.since is None else (req.since.offset, req.since.epoch)
        return await self._hub.history(
            req.channel, since=since, limit=req.limit, reverse=req.reverse
        )

    async def presence(self, conn: Connection, req: PresenceRequest) -> PresenceResult:
        """``presence``: who is in a channel."""
        self._hub.permissions.presence(conn, req.channel)
        return await self._hub.presence_of(req.channel)

    async def presence_stats(
        self, conn: Connection, req: PresenceStatsRequest
    ) -> PresenceStatsResult:
        """``presence_stats``: how many clients and users are in a channel."""
        self._hub.permissions.presence(conn, req.channel)
        return await self._hub.presence_stats_of(req.channel)

    # -- messages ----------------------------------------------------------------------

    async def ping(self, conn: Connection, req: Any) -> None:
        """``ping``: an empty reply."""
        return None

    async def send(self, conn: Connection, req: SendRequest) -> None:
        """``send``: an asynchronous message to the application's message handler."""
        handler = self._hub.message_handler
        if handler is None or not req.data:
            return
        result = handler(conn, _decode(bytes(req.data)))
        if result is not None:
            await result

    async def rpc(self, conn: Connection, req: RPCRequest) -> RPCResult:
        """``rpc``: the handler registered for the method, else the rpc hook."""
        handler = self._hub.rpc_handlers.get(req.method)
        data = _client_data(req.data)
        if handler is not None:
            value = await handler(conn, data)
            return RPCResult(data=raw(_encode(value)))
        if not self.hooks.handles("rpc"):
            raise CommandError(codes.ERROR_METHOD_NOT_FOUND)
        request = hooks.RPCRequest(**_who(conn), method=req.method, data=data)

        async def run(h: Hooks) -> bytes | None:
            result = await h.rpc(request)
            return _json(result.data, "the rpc hook's data")

        return RPCResult(data=raw(await self.hooks.call("rpc", conn, run)))

    # -- expiring sessions and subscriptions (with a refresh hook) ---------------------

    def _session_expired(self, conn: Connection) -> None:
        """A session expired while a refresh hook is configured: ask it (in the background)."""
        self._hub.tasks.spawn(
            self._refresh(conn, conn, None, conn.arm_expiry), f"eventcast-refresh-{conn.id}"
        )

    def _subscription_expired(self, conn: Connection, membership: Membership) -> None:
        """A subscription expired while a sub_refresh hook is configured: ask it."""
        self._hub.tasks.spawn(
            self._refresh(
                conn, membership, membership.channel, lambda: membership.arm_expiry(conn)
            ),
            f"eventcast-sub-refresh-{conn.id}",
        )

    async def _refresh(
        self,
        conn: Connection,
        target: Connection | Membership,
        channel: str | None,
        rearm: Callable[[], None],
    ) -> None:
        """Ask the refresh (or, for a ``channel``, the sub_refresh) hook until it answers.

        It extends the session (subscription) and re-arms its expiry, or ends
        it: 3005 (3006). A hook that fails (100) is asked again with backoff
        while the session stays open, as Centrifugo does, so a backend's
        downtime does not end established connections.
        """
        kind: HookKind = "refresh" if channel is None else "sub_refresh"
        expired = codes.DISCONNECT_EXPIRED if channel is None else codes.DISCONNECT_SUB_EXPIRED
        attempt = 0
        while conn.is_open() and (channel is None or conn.channels.get(channel) is target):

            async def run(h: Hooks) -> None:
                if channel is None:
                    result: hooks.RefreshResult | hooks.SubRefreshResult = await h.refresh(
                        hooks.RefreshRequest(**_who(conn))
                    )
                else:
                    result = await h.sub_refresh(
                        hooks.SubRefreshRequest(**_who(conn), channel=channel)
                    )
                info = _json(result.info, f"the {kind} hook's info")
                if result.expired:
                    conn.close(expired)
                    return
                target.expires_at = result.expire_at
                if info is not None:
                    target.info = info

            try:
                await self.hooks.call(kind, conn, run, channel)
            except CommandError as exc:
                if self._ended(conn, exc, expired):
                    return
                await asyncio.sleep(backoff_delay(attempt, _REFRESH_RETRY_BASE, _REFRESH_RETRY_CAP))
                attempt += 1
                continue
            if conn.is_open():
                rearm()
            return

    @staticmethod
    def _ended(conn: Connection, exc: CommandError, expired: Disconnect) -> bool:
        """After a refresh hook refused: close the connection unless it merely failed (100)."""
        answer = exc.answer
        if isinstance(answer, Disconnect):
            conn.close(answer)
            return True
        if answer.code != codes.ERROR_INTERNAL.code:
            conn.close(expired)
            return True
        return False
