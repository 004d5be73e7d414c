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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec

from .. import __version__
from ..exceptions import InvalidTokenError, LogError, TokenExpiredError
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
from ..topics import is_pattern
from .channels import Membership
from .connection import Connection
from .errors import CommandError
from .fanout import delta_mode, latest_publication, subscription_options
from .limits import TokenBucket

if TYPE_CHECKING:
    from ..events import Event
    from .hub import Hub

__all__ = ["CommandHandler", "Commands", "publication"]

logger = logging.getLogger("eventcast.server")

#: A command handler: ``await handler(connection, request body)`` returns the result.
CommandHandler = Callable[[Connection, Any], Awaitable[Any]]

#: Most users whose command rate is tracked (the table is cleared past it).
_USER_BUCKETS_LIMIT: Final = 100_000

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


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

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
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
            if len(self._user_buckets) > _USER_BUCKETS_LIMIT:
                self._user_buckets.clear()
            user_bucket = self._user_buckets[conn.user] = TokenBucket(settings.user_command_rate)
        return user_bucket.take()

    async def handle(self, conn: Connection, request: Request) -> None:
        """Execute one admitted command and queue its reply on the connection."""
        session = conn.session
        method = request.method
        if method != "connect" and not self.allow(conn):
            # Temporary: the SDKs retry it, so it must not count towards 3509.
            session.error(request.id, codes.ERROR_TOO_MANY_REQUESTS, client_fault=False)
            conn.send_session_output()
            return
        handler = self.table.get(method)
        try:
            if handler is None:
                raise CommandError(codes.ERROR_METHOD_NOT_FOUND)
            result = await handler(conn, request.body)
        except CommandError as exc:
            answer = exc.answer
            if isinstance(answer, Disconnect):
                session.close(answer)
            else:
                session.error(request.id, answer, client_fault=answer.code != 100)
        except LogError as exc:
            logger.warning("%s on %s failed: %s", method, conn.id, exc)
            session.error(request.id, codes.ERROR_INTERNAL, client_fault=False)
        except Exception:
            logger.exception("%s on %s failed", method, conn.id)
            session.error(request.id, codes.ERROR_INTERNAL, client_fault=False)
        else:
            if method == "connect":
                session.connected(request, result)
                conn.send_session_output()
                self.after_connect(conn)
                return
            session.reply(request, result)
            if method == "subscribe":
                # The reply must precede the live publications held meanwhile:
                # queue it, then release them, with no await in between.
                conn.send_session_output()
                membership = conn.channels.get(request.body.channel)
                if membership is not None and membership.held is not None:
                    self._hub.channels.release(conn, membership)
                return
        conn.send_session_output()

    # -- connecting --------------------------------------------------------------------

    def authenticate(self, conn: Connection, token: str | None) -> tuple[str, ...]:
        """Set a connection's identity from its token; return its server-side channels.

        Raises:
            TokenExpiredError: the token expired.
            InvalidTokenError: the token is invalid, or missing while anonymous
                connections are not allowed.
            CommandError: the user has too many connections on this node (3504).
        """
        hub = self._hub
        channels: tuple[str, ...] = ()
        if token:
            claims = hub.verifier.verify_connection(token)
            conn.user = claims.user
            conn.anonymous = False
            conn.expires_at = claims.expires_at
            conn.info = None if claims.info is None else _encode(claims.info)
            channels = claims.channels
        elif not hub.settings.allow_anonymous:
            raise InvalidTokenError("a token is required")
        # Anonymous clients share the empty user id: they are not one user (as in Centrifugo).
        if conn.user and hub.registry.user_connections(conn.user) >= (
            hub.settings.connections_per_user
        ):
            raise CommandError(codes.DISCONNECT_CONNECTION_LIMIT)
        return channels

    def _claims(self, token: str) -> Any:
        try:
            return self._hub.verifier.verify_connection(token)
        except TokenExpiredError:
            raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
        except InvalidTokenError:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN) from None

    async def connect(self, conn: Connection, req: ConnectRequest) -> ConnectResult:
        """``connect``: authenticate, register, and join the token's server-side channels."""
        hub = self._hub
        settings = hub.settings
        if hub.closing:
            raise CommandError(codes.DISCONNECT_SHUTDOWN)
        try:
            channels = self.authenticate(conn, req.token)
        except TokenExpiredError:
            raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
        except InvalidTokenError:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN) from None
        hub.registry.register(conn)
        result = ConnectResult(
            client=conn.id,
            version=f"eventcast {__version__}",
            ping=int(settings.ping_interval),
            pong=True,
            node=settings.node_name,
            session=conn.session_id,
        )
        if conn.expires_at is not None:
            result.expires = True
            result.ttl = max(1, int(conn.expires_at - time.time()))
        if channels:
            subs: dict[str, SubscribeResult] = {}
            wanted = req.subs or {}
            for name in channels:
                sub_req = wanted.get(name) or SubscribeRequest(channel=name)
                sub_req.channel = name
                subs[name] = await self.join(conn, sub_req, server_side=True)
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
        claims = self._claims(req.token)
        if claims.user != conn.user:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN)
        conn.expires_at = claims.expires_at
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

    async def join(
        self, conn: Connection, req: SubscribeRequest, *, server_side: bool
    ) -> SubscribeResult:
        """Join a channel, holding live events until the caller has queued the reply.

        The caller must queue the reply (or push), then call
        :meth:`Channels.release <eventcast.server.channels.Channels.release>`.

        Raises:
            CommandError: the subscription is refused.
        """
        hub = self._hub
        name = req.channel
        ns, expires_at = hub.permissions.subscribe(
            conn, name, token=req.token, server_side=server_side
        )
        if name in conn.channels:
            raise CommandError(codes.ERROR_ALREADY_SUBSCRIBED)
        if len(conn.channels) >= hub.settings.channels_per_connection:
            raise CommandError(codes.ERROR_LIMIT_EXCEEDED.with_message("channel limit"))
        options = subscription_options(ns, req, pattern=is_pattern(name))
        membership = Membership(
            channel=name,
            server_side=server_side,
            expires_at=expires_at,
            join_leave=ns.join_leave and (req.join_leave or ns.force_push_join_leave),
            presence=ns.presence,
            tag_filter=options.tag_filter,
            delta=options.delta,
            conflation_key=options.conflation_key,
        )
        hub.channels.join(conn, name, membership)
        result = SubscribeResult(delta=options.delta)
        try:
            if ns.presence:
                await hub.presence_keeper.add(name, conn)
                if ns.join_leave:
                    hub.join_leave(name, "join", conn)
            if expires_at is not None:
                result.expires = True
                result.ttl = max(1, int(expires_at - time.time()))
                membership.arm_expiry(conn)
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
                        if options.delta:
                            delta_mode(result.publications, conn.encoding)
                membership.handoff = replay.handoff()
        except BaseException:
            hub.channels.leave(conn, name)
            raise
        if conn.closed or conn.channels.get(name) is not membership:
            raise CommandError(codes.ERROR_INTERNAL)
        return result

    async def sub_refresh(self, conn: Connection, req: SubRefreshRequest) -> SubRefreshResult:
        """``sub_refresh``: extend a subscription's expiry with a new subscription token."""
        membership = conn.channels.get(req.channel)
        if membership is None:
            raise CommandError(codes.ERROR_PERMISSION_DENIED.with_message("not subscribed"))
        _, expires_at = self._hub.permissions.subscribe(conn, req.channel, token=req.token)
        membership.expires_at = expires_at
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
        """``publish``: into a channel the client may publish to."""
        hub = self._hub
        hub.permissions.publish(conn, req.channel)
        if not req.data:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("data required"))
        await hub.publish(req.channel, bytes(req.data))

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
        """``rpc``: call the application's handler registered for the method."""
        handler = self._hub.rpc_handlers.get(req.method)
        if handler is None:
            raise CommandError(codes.ERROR_METHOD_NOT_FOUND)
        data = _decode(bytes(req.data)) if req.data else None
        value = await handler(conn, data)
        return RPCResult(data=raw(_encode(value)))
