"""The hub: connections, channels and the Centrifuge commands, on top of the bus.

The hub turns protocol commands into bus calls. Fan-out works per channel:
each channel any client subscribed to has one bus subscription and one
dispatcher task. The dispatcher takes a batch of events, encodes each
publication push once, joins the batch into one payload, and queues that same
payload object for every member connection; the connections write it in one
frame at the end of the loop turn. There is no task and no encoding per
delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import msgspec

from .. import __version__
from .._urls import pop_option
from ..bus import Bus
from ..events import Event
from ..exceptions import (
    ConfigurationError,
    EncodeError,
    EventcastError,
    InvalidTopicError,
    LogError,
    PositionError,
    SlowConsumerError,
    SubscriptionClosedError,
    UnrecoverablePositionError,
)
from ..protocol import codes
from ..protocol.codec import encode_push, publication_push
from ..protocol.codes import ClientError, Disconnect
from ..protocol.frames import (
    NO_DATA,
    ClientInfo,
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
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeRequest,
    SubscribeResult,
    UnsubscribeRequest,
    raw,
)
from ..protocol.session import Request
from ..protocol.sse import Cursor, sse_body, subscribed_event
from ..subscription import Overflow, Subscription
from ..topics import is_pattern, validate_pattern, validate_topic
from .auth import TokenVerifier
from .connection import Connection
from .limits import TokenBucket, origin_allowed
from .presence import MemoryPresence, Presence, open_presence

if TYPE_CHECKING:
    from .config import NamespaceConfig, Settings

__all__ = ["CommandError", "Hub", "HubChannel", "Membership", "RPCHandler"]

logger = logging.getLogger("eventcast.server")

#: Buffer of each channel's bus subscription, in events. Past it the channel's
#: members get 3010 "insufficient state" and recover on reconnect.
CHANNEL_BUFFER: Final = 65_536

_API_NAMES: Final = frozenset(
    (
        "publish",
        "broadcast",
        "batch",
        "history",
        "history_remove",
        "presence",
        "presence_stats",
        "channels",
        "info",
        "disconnect",
        "unsubscribe",
        "subscribe",
        "dead_letters",
        "dead_letters_redrive",
    )
)

RPCHandler = Callable[[Connection, Any], Awaitable[Any]]
MessageHandler = Callable[[Connection, Any], Awaitable[None] | None]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class CommandError(Exception):
    """Raised inside a command handler to answer with a protocol error or disconnect."""

    def __init__(self, answer: ClientError | Disconnect) -> None:
        super().__init__(str(answer))
        self.answer = answer


@dataclass(slots=True)
class Membership:
    """A connection's subscription to one channel."""

    channel: str
    server_side: bool = False
    #: Events held while the subscribe reply (and its replay) is being prepared.
    held: list[Event] | None = field(default_factory=list)
    expires_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    #: Held events up to this offset were replayed or precede the reply's position.
    release_after: int | None = None
    #: The client receives join and leave pushes for this channel.
    join_leave: bool = False
    #: The client is listed in the channel's presence.
    presence: bool = False


class HubChannel:
    """One channel (or pattern) with members on this node: its bus subscription and dispatcher."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.name = name
        self.pattern = is_pattern(name)
        self.members: dict[Connection, Membership] = {}
        self.sub: Subscription = hub.bus.subscribe(
            name,
            id=f"hub:{name}:{next(hub._ids)}",
            maxsize=CHANNEL_BUFFER,
            overflow=Overflow.DISCONNECT,
        )
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"eventcast-channel-{name}"
        )
        self.task.add_done_callback(self._done)
        self.publications = 0
        self.last_offset = 0

    def _encode_batch(self, events: list[Event]) -> bytes | None:
        frames: list[bytes] = []
        for event in events:
            try:
                frames.append(publication_push(self.name, event, concrete_channel=self.pattern))
            except EncodeError as exc:
                self.hub.encode_failures += 1
                logger.warning("skipping an event on %r for network clients: %s", self.name, exc)
        if not frames:
            return None
        return frames[0] if len(frames) == 1 else b"\n".join(frames)

    async def _run(self) -> None:
        sub = self.sub
        while True:
            try:
                events = await sub.get_batch(4096)
            except SlowConsumerError:
                # The dispatcher fell behind: continuity is lost for every member.
                self.hub._channel_overflow(self)
                return
            except SubscriptionClosedError:
                return
            self.publications += len(events)
            offset = events[-1].offset
            if offset:
                self.last_offset = offset
            payload = self._encode_batch(events)
            sse_cache: dict[Any, Any] | None = None
            for conn, membership in list(self.members.items()):
                held = membership.held
                if held is not None:
                    held.extend(events)
                elif conn.sse:
                    if sse_cache is None:
                        sse_cache = {}
                    self.hub._deliver_sse(conn, events, sse_cache)
                elif payload is not None:
                    conn.enqueue(payload)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("dispatcher of %r failed", self.name, exc_info=exc)
            for conn in list(self.members):
                conn.close(codes.DISCONNECT_SERVER_ERROR)

    def close(self) -> None:
        self.sub.close()
        self.task.cancel()


class Hub:
    """The hub's state and command semantics, independent of the web framework.

    Args:
        settings: the hub's :class:`~eventcast.server.config.Settings`.
        bus: an existing bus to serve (it must have the log and namespaces);
            by default one is built from the settings.
    """

    def __init__(self, settings: Settings, *, bus: Bus | None = None) -> None:
        self.settings = settings
        if bus is None:
            namespaces = {ns.name: ns.to_bus() for ns in settings.namespaces}
            shared = not settings.backplane_url.startswith("memory://")
            bus = Bus(
                log=settings.log_url if any(n.durable for n in namespaces.values()) else None,
                namespaces=namespaces,
                replay_cap=settings.replay_cap,
                backplane=settings.backplane_url if shared else None,
            )
        self.bus = bus
        bus.gap_listeners.append(self._on_gap)
        bus.control_listeners.append(self._on_control)
        self.verifier = TokenVerifier(
            hmac_secret=_secret(settings.token_hmac_secret),
            public_key=_secret(settings.token_public_key),
            audience=settings.token_audience,
            issuer=settings.token_issuer,
        )
        self.connections: dict[str, Connection] = {}
        self.users: dict[str, set[Connection]] = {}
        self.channels: dict[str, HubChannel] = {}
        self.rpc_handlers: dict[str, RPCHandler] = {}
        self.message_handler: MessageHandler | None = None
        self._ids = itertools.count(1)
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.time()
        self.encode_failures = 0
        self.closing = False
        #: Recoveries by outcome: ``{True: ok, False: failed}``.
        self.recoveries: dict[bool, int] = {True: 0, False: 0}
        #: Handshakes refused, by reason.
        self.refused: dict[str, int] = {"origin": 0, "rate": 0}
        #: Disconnects by code.
        self.disconnects: dict[int, int] = {}
        #: Counters of closed connections by transport: (messages out, bytes out,
        #: messages in, bytes in), so metrics never go backwards.
        self.closed_totals: dict[str, tuple[int, int, int, int]] = {}
        #: HTTP API calls by (method, result).
        self.api_calls: dict[tuple[str, str], int] = {}
        self._registry: Any = None
        self._connection_bucket = TokenBucket(settings.connection_rate)
        #: Who is in which channel (in process here; Redis or NATS across nodes).
        self.presence: Presence = _presence_for(settings.backplane_url)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._user_buckets: dict[str, TokenBucket] = {}
        self._cursors: dict[str, Cursor] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the bus, its log and backplane; start refreshing this node's presence.

        Raises:
            LogError: the log cannot be opened.
            BackplaneError: the backplane cannot be reached.
        """
        self._loop = asyncio.get_running_loop()
        opener = getattr(self.presence, "open", None)
        if opener is not None:
            await opener()
        await self.bus.start()
        self._spawn(self._refresh_presence(), "eventcast-presence")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run a supervised background task: its failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.error("background task %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def _refresh_presence(self) -> None:
        ttl = self.settings.presence_ttl
        while True:
            await asyncio.sleep(ttl / 3)
            for channel in list(self.channels.values()):
                for conn, membership in list(channel.members.items()):
                    if membership.presence and not conn.closed:
                        try:
                            await self.presence.add(
                                channel.name, conn.id, self._client_info(conn), ttl
                            )
                        except EventcastError as exc:
                            logger.warning("presence refresh failed: %s", exc)

    async def begin_shutdown(self, grace: float = 2.0) -> None:
        """Stop accepting clients and tell every connected one to reconnect (3001).

        Waits up to ``grace`` seconds for the close frames and final SSE
        chunks to be written. Idempotent.
        """
        self.closing = True
        conns = list(self.connections.values())
        for conn in conns:
            conn.close(codes.DISCONNECT_SHUTDOWN)
        if conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(c.wait_closed() for c in conns))

    async def close(self) -> None:
        """Tell every client to reconnect (3001 shutdown), then close the bus. Idempotent."""
        if self.closing and self.bus.closed:
            return
        self.closing = True
        for conn in list(self.connections.values()):
            conn.close(codes.DISCONNECT_SHUTDOWN)
        for channel in list(self.channels.values()):
            channel.close()
        self.channels.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.presence.close()
        await self.bus.close()

    # -- writing ---------------------------------------------------------------------------

    def _schedule_flush(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        frames: dict[int, tuple[bytes, bytes]] = {}
        for conn in dirty:
            conn.flush(frames)

    # -- registry ---------------------------------------------------------------------------

    def _register(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        self.users.setdefault(conn.user, set()).add(conn)

    def _forget(self, conn: Connection) -> None:
        if conn.disconnect is not None:
            code = conn.disconnect.code
            self.disconnects[code] = self.disconnects.get(code, 0) + 1
        if self.connections.get(conn.id) is conn:
            a, b, c, d = self.closed_totals.get(conn.transport_name, (0, 0, 0, 0))
            self.closed_totals[conn.transport_name] = (
                a + conn.messages_out,
                b + conn.bytes_out,
                c + conn.messages_in,
                d + conn.bytes_in,
            )
            del self.connections[conn.id]
        users = self.users.get(conn.user)
        if users is not None:
            users.discard(conn)
            if not users:
                del self.users[conn.user]
        for name in list(conn.channels):
            self._leave(conn, name)

    def _join(self, conn: Connection, name: str, membership: Membership) -> HubChannel:
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = HubChannel(self, name)
        channel.members[conn] = membership
        conn.channels[name] = membership
        return channel

    def _leave(self, conn: Connection, name: str) -> None:
        membership = conn.channels.pop(name, None)
        if membership is not None and membership.timer is not None:
            membership.timer.cancel()
        channel = self.channels.get(name)
        if channel is None:
            return
        channel.members.pop(conn, None)
        if membership is not None and membership.presence:
            self._spawn(self.presence.remove(name, conn.id), "eventcast-presence-remove")
            ns = self.settings.namespace(name)
            if ns is not None and ns.join_leave:
                self._push_join_leave(channel, "leave", conn)
        if not channel.members:
            del self.channels[name]
            channel.close()

    def _channel_overflow(self, channel: HubChannel) -> None:
        if self.channels.get(channel.name) is channel:
            del self.channels[channel.name]
        for conn in list(channel.members):
            conn.close(codes.DISCONNECT_INSUFFICIENT_STATE)

    # -- permissions ---------------------------------------------------------------------------

    def _namespace(self, channel: str) -> NamespaceConfig:
        ns = self.settings.namespace(channel)
        if ns is None:
            raise CommandError(codes.ERROR_UNKNOWN_CHANNEL)
        return ns

    def _check_channel(self, channel: str, *, allow_pattern: bool = False) -> NamespaceConfig:
        if not channel:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("channel required"))
        try:
            if allow_pattern:
                validate_pattern(channel)
            else:
                validate_topic(channel)
        except InvalidTopicError as exc:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message(str(exc))) from None
        return self._namespace(channel)

    @staticmethod
    def _user_limited(channel: str, user: str) -> bool:
        """Centrifugo's ``#`` channels: ``dialog#42,43`` admits users 42 and 43."""
        _, sep, users = channel.rpartition("#")
        return bool(sep) and bool(user) and user in users.split(",")

    # -- commands --------------------------------------------------------------------------------

    def allow_command(self, conn: Connection) -> bool:
        """Take a token from the connection's and the user's command buckets."""
        bucket = conn.bucket
        if bucket is None:
            bucket = conn.bucket = TokenBucket(self.settings.command_rate)
        if not bucket.take():
            return False
        if not conn.user:
            return True
        user_bucket = self._user_buckets.get(conn.user)
        if user_bucket is None:
            if len(self._user_buckets) > 100_000:
                self._user_buckets.clear()
            user_bucket = self._user_buckets[conn.user] = TokenBucket(
                self.settings.user_command_rate
            )
        return user_bucket.take()

    async def handle(self, conn: Connection, request: Request) -> None:
        """Execute one admitted command and queue its reply on the connection."""
        session = conn.session
        if request.method != "connect" and not self.allow_command(conn):
            # Temporary: the SDKs retry it, so it must not count towards 3509.
            session.error(request.id, codes.ERROR_TOO_MANY_REQUESTS, client_fault=False)
            conn.send_session_output()
            return
        try:
            handler = getattr(self, f"_cmd_{request.method}")
            result = await handler(conn, request.body)
        except CommandError as exc:
            answer = exc.answer
            if isinstance(answer, Disconnect):
                session.close(answer)
            else:
                session.error(request.id, answer)
        except LogError as exc:
            logger.warning("%s on %s failed: %s", request.method, conn.id, exc)
            session.error(request.id, codes.ERROR_INTERNAL)
        except Exception:
            # Counted like a client's error: a command that keeps failing ends in 3509.
            logger.exception("%s on %s failed", request.method, conn.id)
            session.error(request.id, codes.ERROR_INTERNAL)
        else:
            if request.method == "connect":
                session.connected(request, result)
                conn.send_session_output()
                self._after_connect(conn)
                return
            session.reply(request, result)
            if request.method == "subscribe":
                # The reply must precede the live publications held meanwhile:
                # queue it, then release them, with no await in between.
                conn.send_session_output()
                membership = conn.channels.get(request.body.channel)
                if membership is not None and membership.held is not None:
                    self._release(conn, membership)
                return
        conn.send_session_output()

    def _token_claims(self, token: str) -> Any:
        from ..exceptions import InvalidTokenError, TokenExpiredError

        try:
            return self.verifier.verify_connection(token)
        except TokenExpiredError:
            raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
        except InvalidTokenError:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN) from None

    def authenticate(self, conn: Connection, token: str | None) -> tuple[str, ...]:
        """Set a connection's identity from its token; return its server-side channels.

        Raises:
            TokenExpiredError: the token expired.
            InvalidTokenError: the token is invalid, or missing while anonymous
                connections are not allowed.
            CommandError: the user has too many connections on this node (3504).
        """
        from ..exceptions import InvalidTokenError

        channels: tuple[str, ...] = ()
        if token:
            claims = self.verifier.verify_connection(token)
            conn.user = claims.user
            conn.anonymous = False
            conn.expires_at = claims.expires_at
            conn.info = None if claims.info is None else _encode(claims.info)
            channels = claims.channels
        elif not self.settings.allow_anonymous:
            raise InvalidTokenError("a token is required")
        # Anonymous clients share the empty user id: they are not one user (as in Centrifugo).
        if conn.user and len(self.users.get(conn.user, ())) >= self.settings.connections_per_user:
            raise CommandError(codes.DISCONNECT_CONNECTION_LIMIT)
        return channels

    def check_handshake(self, scope: Any, transport: str) -> tuple[int, str] | None:
        """Refuse a handshake: ``(status, message)``, or ``None`` to let it through.

        403 for a disallowed origin, 429 over the new-connection rate, 503
        while shutting down.
        """
        headers = dict(scope.get("headers", ()))
        origin = headers.get(b"origin")
        host = headers.get(b"host")
        if not origin_allowed(
            None if origin is None else origin.decode("latin-1"),
            None if host is None else host.decode("latin-1"),
            self.settings.allowed_origins,
        ):
            self.refused["origin"] += 1
            return 403, "origin not allowed"
        if self.closing:
            return 503, "shutting down"
        if not self._connection_bucket.take():
            self.refused["rate"] += 1
            return 429, "too many new connections"
        return None

    async def _cmd_connect(self, conn: Connection, req: ConnectRequest) -> ConnectResult:
        from ..exceptions import InvalidTokenError, TokenExpiredError

        if self.closing:
            raise CommandError(codes.DISCONNECT_SHUTDOWN)
        try:
            channels = self.authenticate(conn, req.token)
        except TokenExpiredError:
            raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
        except InvalidTokenError:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN) from None
        self._register(conn)
        result = ConnectResult(
            client=conn.id,
            version=f"eventcast {__version__}",
            ping=int(self.settings.ping_interval),
            pong=True,
            node=self.settings.node_name,
        )
        if conn.expires_at is not None:
            ttl = conn.expires_at - time.time()
            result.expires = True
            result.ttl = max(1, int(ttl))
        if channels:
            subs: dict[str, SubscribeResult] = {}
            wanted = req.subs or {}
            for name in channels:
                sub_req = wanted.get(name) or SubscribeRequest(channel=name)
                sub_req.channel = name
                subs[name] = await self._subscribe(conn, sub_req, server_side=True)
            result.subs = subs
        return result

    def _after_connect(self, conn: Connection) -> None:
        """Release held publications of server-side subscriptions after the connect reply."""
        for membership in list(conn.channels.values()):
            if membership.held is not None:
                self._release(conn, membership)
        self._arm_expiry(conn)

    def _arm_expiry(self, conn: Connection) -> None:
        if conn.expires_at is None or self._loop is None:
            return
        delay = max(0.0, conn.expires_at - time.time())
        expected = conn.expires_at

        def check() -> None:
            if conn.expires_at == expected and not conn.closed:
                conn.close(codes.DISCONNECT_EXPIRED)

        self._loop.call_later(delay + 0.05, check)

    async def _cmd_refresh(self, conn: Connection, req: RefreshRequest) -> RefreshResult:
        if not req.token:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("token required"))
        claims = self._token_claims(req.token)
        if claims.user != conn.user:
            raise CommandError(codes.DISCONNECT_INVALID_TOKEN)
        conn.expires_at = claims.expires_at
        result = RefreshResult(client=conn.id, version=f"eventcast {__version__}")
        if conn.expires_at is not None:
            result.expires = True
            result.ttl = max(1, int(conn.expires_at - time.time()))
            self._arm_expiry(conn)
        return result

    def _subscription_allowed(
        self, conn: Connection, channel: str, ns: NamespaceConfig, token: str
    ) -> float | None:
        """Raise unless ``conn`` may subscribe; return the subscription's expiry, if any."""
        from ..exceptions import AuthError, TokenExpiredError

        if token:
            try:
                claims = self.verifier.verify_subscription(token, user=conn.user, channel=channel)
            except TokenExpiredError:
                raise CommandError(codes.ERROR_TOKEN_EXPIRED) from None
            except AuthError:
                raise CommandError(codes.ERROR_PERMISSION_DENIED) from None
            expires: float | None = claims.expires_at
            return expires
        if "#" in channel:
            if ns.allow_user_limited_channels and self._user_limited(channel, conn.user):
                return None
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if conn.anonymous and not ns.allow_subscribe_for_anonymous:
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if not ns.allow_subscribe_for_client:
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        return None

    async def _cmd_subscribe(self, conn: Connection, req: SubscribeRequest) -> SubscribeResult:
        return await self._subscribe(conn, req, server_side=False)

    async def _subscribe(
        self, conn: Connection, req: SubscribeRequest, *, server_side: bool
    ) -> SubscribeResult:
        """Join a channel, holding live events until the caller has queued the reply.

        The caller must queue the reply (or push) and then call :meth:`_release`.
        """
        name = req.channel
        ns = self._check_channel(name, allow_pattern=True)
        pattern = is_pattern(name)
        if pattern and not ns.allow_patterns:
            raise CommandError(
                codes.ERROR_PERMISSION_DENIED.with_message("pattern subscriptions not allowed")
            )
        if name in conn.channels:
            raise CommandError(codes.ERROR_ALREADY_SUBSCRIBED)
        if len(conn.channels) >= self.settings.channels_per_connection:
            raise CommandError(codes.ERROR_LIMIT_EXCEEDED.with_message("channel limit"))
        expires_at = None
        if not server_side:
            expires_at = self._subscription_allowed(conn, name, ns, req.token)
        membership = Membership(
            channel=name,
            server_side=server_side,
            expires_at=expires_at,
            join_leave=ns.join_leave and (req.join_leave or ns.force_push_join_leave),
            presence=ns.presence,
        )
        channel = self._join(conn, name, membership)
        if ns.presence:
            try:
                await self.presence.add(
                    name, conn.id, self._client_info(conn), self.settings.presence_ttl
                )
            except BaseException:
                self._leave(conn, name)
                raise
            if ns.join_leave:
                self._push_join_leave(channel, "join", conn)
        result = SubscribeResult()
        if expires_at is not None:
            result.expires = True
            result.ttl = max(1, int(expires_at - time.time()))
            self._arm_sub_expiry(conn, membership)
        durable = ns.history_size > 0 and not pattern
        last_offset: int | None = None
        try:
            if durable:
                head = await self.bus.position(name)
                result.epoch = head.epoch
                result.offset = head.offset
                result.recoverable = ns.force_recovery or (ns.allow_recovery and req.recover)
                result.positioned = True
                last_offset = head.offset
                if req.recover and ns.allow_recovery:
                    result.was_recovering = True
                    pubs, recovered = await self._recover(name, req, head.offset, head.epoch)
                    result.recovered = recovered
                    self.recoveries[recovered] += 1
                    if recovered:
                        result.publications = pubs
        except BaseException:
            self._leave(conn, name)
            raise
        if conn.closed or conn.channels.get(name) is not membership:
            raise CommandError(codes.ERROR_INTERNAL)
        membership.release_after = last_offset
        return result

    async def _recover(
        self, name: str, req: SubscribeRequest, top: int, epoch: str
    ) -> tuple[list[Publication], bool]:
        if req.epoch != epoch or req.offset > top:
            return [], False
        gap = top - req.offset
        if gap > self.bus.replay_cap:
            return [], False
        if gap == 0:
            return [], True
        log = self.bus.log
        assert log is not None
        events = await log.read(name, after=req.offset, limit=gap)
        if len(events) != gap or events[0].offset != req.offset + 1:
            return [], False
        pubs = [
            Publication(data=raw(e.encoded_data()), offset=e.offset or 0, tags=dict(e.tags) or None)
            for e in events
        ]
        return pubs, True

    def _release(self, conn: Connection, membership: Membership) -> None:
        """Deliver the live events held during subscribe, minus those already replayed."""
        held = membership.held or []
        membership.held = None
        last_offset = membership.release_after
        channel = self.channels.get(membership.channel)
        if channel is None or not held:
            return
        fresh = [e for e in held if last_offset is None or (e.offset or 0) > last_offset]
        if conn.sse:
            if fresh:
                self._deliver_sse(conn, fresh, {})
            return
        payload = channel._encode_batch(fresh) if fresh else None
        if payload is not None:
            conn.enqueue(payload)

    def _arm_sub_expiry(self, conn: Connection, membership: Membership) -> None:
        if membership.expires_at is None or self._loop is None:
            return
        if membership.timer is not None:
            membership.timer.cancel()
        expected = membership.expires_at

        def check() -> None:
            if membership.expires_at == expected and not conn.closed:
                conn.close(codes.DISCONNECT_SUB_EXPIRED)

        membership.timer = self._loop.call_later(max(0.0, expected - time.time()) + 0.05, check)

    async def _cmd_sub_refresh(self, conn: Connection, req: SubRefreshRequest) -> SubRefreshResult:
        membership = conn.channels.get(req.channel)
        if membership is None:
            raise CommandError(codes.ERROR_PERMISSION_DENIED.with_message("not subscribed"))
        ns = self._check_channel(req.channel, allow_pattern=True)
        expires_at = self._subscription_allowed(conn, req.channel, ns, req.token)
        membership.expires_at = expires_at
        result = SubRefreshResult()
        if expires_at is not None:
            result.expires = True
            result.ttl = max(1, int(expires_at - time.time()))
            self._arm_sub_expiry(conn, membership)
        return result

    async def _cmd_unsubscribe(self, conn: Connection, req: UnsubscribeRequest) -> None:
        self._leave(conn, req.channel)

    def _may(self, conn: Connection, channel: str, for_client: bool, for_subscriber: bool) -> bool:
        return for_client or (for_subscriber and channel in conn.channels)

    async def _cmd_publish(self, conn: Connection, req: PublishRequest) -> None:
        ns = self._check_channel(req.channel)
        if not req.data:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("data required"))
        if conn.anonymous and not ns.allow_publish_for_anonymous:
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if not self._may(
            conn, req.channel, ns.allow_publish_for_client, ns.allow_publish_for_subscriber
        ):
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        await self.publish(req.channel, bytes(req.data))

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        tags: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Event:
        """Publish encoded JSON ``data`` into a channel (from a client or the API).

        Raises:
            LogError: the channel is durable and the log failed.
        """
        try:
            value = _decode(data)
        except msgspec.DecodeError:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("data is not JSON")) from None
        return await self.bus.publish(channel, value, tags=tags, idempotency_key=idempotency_key)

    async def _cmd_history(self, conn: Connection, req: HistoryRequest) -> HistoryResult:
        ns = self._check_channel(req.channel)
        if not self._may(
            conn, req.channel, ns.allow_history_for_client, ns.allow_history_for_subscriber
        ):
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        if ns.history_size <= 0:
            raise CommandError(codes.ERROR_NOT_AVAILABLE)
        since = None if req.since is None else (req.since.offset, req.since.epoch)
        return await self.history(req.channel, since=since, limit=req.limit, reverse=req.reverse)

    async def history(
        self,
        channel: str,
        *,
        since: tuple[int, str] | None,
        limit: int,
        reverse: bool,
    ) -> HistoryResult:
        """A page of history as the protocol returns it (limit 0: only the position)."""
        if limit < 0:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("limit must be >= 0"))
        try:
            page = await self.bus.history(channel, since=since, limit=limit, reverse=reverse)
        except UnrecoverablePositionError:
            raise CommandError(codes.ERROR_UNRECOVERABLE_POSITION) from None
        except PositionError as exc:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message(str(exc))) from None
        except ConfigurationError:
            raise CommandError(codes.ERROR_NOT_AVAILABLE) from None
        return HistoryResult(
            publications=[_publication(e) for e in page.events] or None,
            epoch=page.position.epoch,
            offset=page.position.offset,
        )

    def _client_info(self, conn: Connection) -> dict[str, Any]:
        info: dict[str, Any] = {"client": conn.id, "user": conn.user}
        if conn.info is not None:
            info["conn_info"] = _decode(conn.info)
        return info

    def _push_join_leave(self, channel: HubChannel, kind: str, who: Connection) -> None:
        """Tell the channel's members who want it that ``who`` joined or left (all nodes)."""
        self.bus.send_control(kind, channel.name, _encode(self._client_info(who)))
        push: bytes | None = None
        for conn, membership in channel.members.items():
            if membership.join_leave and membership.held is None:
                if push is None:
                    push = encode_push(channel.name, kind, {"info": self._client_info(who)})
                conn.enqueue(push)

    def _presence_allowed(self, conn: Connection, channel: str) -> NamespaceConfig:
        ns = self._check_channel(channel)
        if not ns.presence:
            raise CommandError(codes.ERROR_NOT_AVAILABLE)
        if not self._may(
            conn, channel, ns.allow_presence_for_client, ns.allow_presence_for_subscriber
        ):
            raise CommandError(codes.ERROR_PERMISSION_DENIED)
        return ns

    async def _cmd_presence(self, conn: Connection, req: PresenceRequest) -> PresenceResult:
        self._presence_allowed(conn, req.channel)
        return await self.presence_of(req.channel)

    async def _cmd_presence_stats(
        self, conn: Connection, req: PresenceStatsRequest
    ) -> PresenceStatsResult:
        self._presence_allowed(conn, req.channel)
        return await self.presence_stats_of(req.channel)

    async def presence_of(self, channel: str) -> PresenceResult:
        """The clients in a channel, as the protocol and the API return them."""
        entries = await self.presence.get(channel)
        return PresenceResult(
            presence={
                client: ClientInfo(
                    user=str(info.get("user", "")),
                    client=str(info.get("client", client)),
                    conn_info=raw(_encode(info["conn_info"])) if "conn_info" in info else NO_DATA,
                )
                for client, info in entries.items()
            }
        )

    async def presence_stats_of(self, channel: str) -> PresenceStatsResult:
        """How many clients and unique users are in a channel."""
        clients, users = await self.presence.stats(channel)
        return PresenceStatsResult(num_clients=clients, num_users=users)

    async def _cmd_ping(self, conn: Connection, req: Any) -> None:
        return None

    async def _cmd_send(self, conn: Connection, req: SendRequest) -> None:
        handler = self.message_handler
        if handler is None or not req.data:
            return
        result = handler(conn, _decode(bytes(req.data)))
        if result is not None:
            await result

    async def _cmd_rpc(self, conn: Connection, req: RPCRequest) -> RPCResult:
        handler = self.rpc_handlers.get(req.method)
        if handler is None:
            raise CommandError(codes.ERROR_METHOD_NOT_FOUND)
        data = _decode(bytes(req.data)) if req.data else None
        try:
            value = await handler(conn, data)
        except EventcastError:
            raise
        return RPCResult(data=raw(_encode(value)))

    # -- server-initiated actions (HTTP API and Python) ------------------------------------------

    def register_rpc(self, method: str, handler: RPCHandler) -> None:
        """Answer the ``rpc`` command ``method`` with ``await handler(connection, data)``."""
        self.rpc_handlers[method] = handler

    def connections_of(self, user: str, client: str | None = None) -> list[Connection]:
        """Return a user's connections (or the one with this client id)."""
        conns = list(self.users.get(user, ()))
        if client:
            conns = [c for c in conns if c.id == client]
        return conns

    def disconnect_user(self, user: str, disconnect: Disconnect, client: str | None = None) -> int:
        """Close a user's connections with a disconnect code; return how many."""
        conns = self.connections_of(user, client)
        for conn in conns:
            conn.close(disconnect)
        return len(conns)

    def unsubscribe_user(self, user: str, channel: str, client: str | None = None) -> int:
        """Unsubscribe a user's connections from a channel, with an unsubscribe push."""
        code, reason = codes.UNSUBSCRIBE_SERVER
        push = encode_push(channel, "unsubscribe", {"code": code, "reason": reason})
        count = 0
        for conn in self.connections_of(user, client):
            if channel in conn.channels:
                self._leave(conn, channel)
                conn.enqueue(push)
                count += 1
        return count

    def send_message(self, user: str, data: Any, client: str | None = None) -> int:
        """Push an asynchronous ``message`` to a user's connections; return how many.

        Raises:
            EncodeError: ``data`` is not JSON-serialisable.
        """
        from ..events import encode_data

        push = b'{"push":{"message":{"data":%s}}}' % encode_data(data)
        conns = [c for c in self.connections_of(user, client) if not c.sse]
        for conn in conns:
            conn.enqueue(push)
        return len(conns)

    def refresh_user(self, user: str, expires_at: float | None, client: str | None = None) -> int:
        """Extend (or lift) a user's connection expiry, with a ``refresh`` push; return how many."""
        body: dict[str, Any] = {}
        if expires_at is not None:
            body = {"expires": True, "ttl": max(1, int(expires_at - time.time()))}
        push = encode_push("", "refresh", body)
        conns = self.connections_of(user, client)
        for conn in conns:
            conn.expires_at = expires_at
            self._arm_expiry(conn)
            if not conn.sse:
                conn.enqueue(push)
        return len(conns)

    async def subscribe_user(self, user: str, channel: str, client: str | None = None) -> int:
        """Subscribe a user's connections to a channel server-side, with a subscribe push."""
        validate_topic(channel)
        count = 0
        for conn in self.connections_of(user, client):
            if channel in conn.channels or conn.closed:
                continue
            result = await self._subscribe(
                conn, SubscribeRequest(channel=channel), server_side=True
            )
            body = {
                k: v
                for k, v in (
                    ("recoverable", result.recoverable),
                    ("epoch", result.epoch),
                    ("offset", result.offset),
                    ("positioned", result.positioned),
                )
                if v
            }
            conn.enqueue(encode_push(channel, "subscribe", body))
            membership = conn.channels.get(channel)
            if membership is not None:
                self._release(conn, membership)
            count += 1
        return count

    # -- Server-Sent Events ----------------------------------------------------------------------

    def _deliver_sse(self, conn: Connection, events: list[Event], cache: dict[Any, Any]) -> None:
        """Queue SSE messages: bodies encoded once per event, ids once per cursor.

        Streams at the same position (the same interned cursor) get the very
        same payload object for a batch, which the writer frames once for all.
        """
        start: Cursor = conn.cursor
        shared = cache.get(id(start))
        if shared is not None and shared[0] is start:
            conn.cursor = shared[1]
            if shared[2]:
                conn.enqueue(shared[2])
            return
        out: list[bytes] = []
        cursor = start
        for event in events:
            body = cache.get(event.id)
            if body is None:
                try:
                    body = cache[event.id] = sse_body(event)
                except EncodeError as exc:
                    self.encode_failures += 1
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

    def _intern_cursor(self, cursor: Cursor) -> Cursor:
        """One object per cursor text, so streams at the same position share their work."""
        known = self._cursors.get(cursor.text)
        if known is not None:
            return known
        if len(self._cursors) >= 10_000:
            self._cursors.clear()
        self._cursors[cursor.text] = cursor
        return cursor

    async def sse_open(
        self, conn: Connection, topics: list[str], cursor: Cursor | None, *, malformed: bool = False
    ) -> tuple[bool, bool]:
        """Subscribe an SSE connection to ``topics``, replaying what ``cursor`` missed.

        Queues the ``subscribed`` event, the replayed events and the live
        events held meanwhile, in that order. Returns ``(recovered,
        was_recovering)``.

        Raises:
            CommandError: a topic is invalid or not permitted.
        """
        namespaces = {}
        for topic in topics:
            ns = self._check_channel(topic, allow_pattern=True)
            if is_pattern(topic) and not ns.allow_patterns:
                raise CommandError(codes.ERROR_PERMISSION_DENIED)
            if topic not in conn.channels:
                self._subscription_allowed(conn, topic, ns, "")
            namespaces[topic] = ns
        for topic in topics:
            self._join(conn, topic, Membership(channel=topic))
        was_recovering = cursor is not None or malformed
        recovered = not malformed
        known = cursor.as_dict() if cursor is not None else {}
        start: dict[str, tuple[int, str]] = {}
        replays: list[Event] = []
        try:
            for topic in topics:
                ns = namespaces[topic]
                if ns.history_size <= 0 or is_pattern(topic):
                    continue
                head = await self.bus.position(topic)
                membership = conn.channels[topic]
                membership.release_after = head.offset
                since = known.get(topic)
                if since is None:
                    recovered = recovered and not was_recovering
                    start[topic] = (head.offset, head.epoch)
                    continue
                events = await self._replay(topic, since[0], since[1], head.offset, head.epoch)
                if events is None:
                    recovered = False
                    start[topic] = (head.offset, head.epoch)
                else:
                    start[topic] = since
                    replays.extend(events)
        except BaseException:
            for topic in topics:
                self._leave(conn, topic)
            raise
        recovered = recovered and was_recovering
        conn.cursor = self._intern_cursor(Cursor.of(start))
        self.recoveries[recovered] += was_recovering
        conn.enqueue(subscribed_event(topics, recovered, {"was_recovering": was_recovering}))
        if replays:
            self._deliver_sse(conn, replays, {})
        for membership in list(conn.channels.values()):
            if membership.held is not None:
                self._release(conn, membership)
        return recovered, was_recovering

    def arm_sse(self, conn: Connection) -> None:
        """Start an SSE stream's heartbeat and close it when its token expires."""
        loop = self._loop or asyncio.get_running_loop()
        interval = self.settings.sse_heartbeat

        def beat() -> None:
            if conn.closed:
                return
            conn.enqueue(b": ping\n\n")
            loop.call_later(interval, beat)

        loop.call_later(interval, beat)
        self._arm_expiry(conn)

    async def _replay(
        self, topic: str, offset: int, epoch: str, top: int, head_epoch: str
    ) -> list[Event] | None:
        """The events after ``offset`` up to ``top``, or ``None`` if not all can be replayed."""
        if epoch != head_epoch or offset > top:
            return None
        gap = top - offset
        if gap > self.bus.replay_cap:
            return None
        if gap == 0:
            return []
        log = self.bus.log
        assert log is not None
        events = await log.read(topic, after=offset, limit=gap)
        if len(events) != gap or events[0].offset != offset + 1:
            return None
        return events

    def count_api(self, method: str, result: str) -> None:
        """Count one HTTP API call for the metrics."""
        key = (method if method in _API_NAMES else "unknown", result)
        self.api_calls[key] = self.api_calls.get(key, 0) + 1

    def backplane_up(self) -> bool:
        """Whether the backplane is connected (the memory backplane always is)."""
        backplane = self.bus.backplane
        return backplane is None or backplane.connected

    def _on_gap(self, topic: str, durable: bool) -> None:
        """Continuity of a topic was lost on this node: tell the clients that read it.

        A durable channel's members are disconnected with 3010 "insufficient
        state" and recover on reconnect; a live-only channel's WebSocket members
        get an unsubscribe push with 2500, on which the SDKs resubscribe, and
        SSE streams end so the browser reconnects.
        """
        channel = self.channels.get(topic)
        if channel is None:
            return
        code, reason = codes.UNSUBSCRIBE_INSUFFICIENT_STATE
        push = encode_push(topic, "unsubscribe", {"code": code, "reason": reason})
        for conn in list(channel.members):
            if durable or conn.sse:
                conn.close(codes.DISCONNECT_INSUFFICIENT_STATE)
            else:
                self._leave(conn, topic)
                conn.enqueue(push)

    def _on_control(self, kind: str, topic: str, payload: bytes) -> None:
        """A join or leave on another node: push it to this node's members who want it."""
        if kind not in ("join", "leave"):
            return
        channel = self.channels.get(topic)
        if channel is None:
            return
        push = b'{"push":{"channel":%s,"%s":{"info":%s}}}' % (
            _encode(topic),
            kind.encode(),
            payload,
        )
        for conn, membership in channel.members.items():
            if membership.join_leave and membership.held is None:
                conn.enqueue(push)

    def stats(self) -> dict[str, Any]:
        """Node counters for the API's ``info`` and the dashboard."""
        return {
            "name": self.settings.node_name,
            "version": __version__,
            "num_clients": len(self.connections),
            "num_users": len([u for u in self.users if u]),
            "num_channels": len(self.channels),
            "num_subs": sum(len(c.members) for c in self.channels.values()),
            "uptime": int(time.time() - self.started_at),
        }


def _publication(event: Event) -> Publication:
    return Publication(
        data=raw(event.encoded_data()),
        offset=event.offset or 0,
        tags=dict(event.tags) or None,
    )


def _presence_for(url: str) -> Presence:
    """The presence store matching the backplane: shared across nodes, or in process.

    The backplane URL's ``?prefix=`` (a backplane option, not a client one) is
    taken off the URL and becomes the presence prefix, so deployments kept
    apart on one engine keep their presence apart too.
    """
    if url.startswith("memory://"):
        return MemoryPresence()
    store_url, option = pop_option(url, "prefix")
    prefix = option or "eventcast"
    if urlsplit(url).scheme.lower() in ("nats", "tls"):
        # A NATS prefix is a subject token; the presence bucket allows fewer characters.
        prefix = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)
    return open_presence(store_url, prefix=prefix)


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter is not None else value)
