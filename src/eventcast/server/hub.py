"""The hub: a small facade that wires its parts together, independent of the web framework.

The parts, each with one job (``docs/architecture.md`` draws them):

* :mod:`~eventcast.server.registry`: the connections of this node, by id and by user;
* :mod:`~eventcast.server.channels`: channels with members here, and their dispatchers;
* :mod:`~eventcast.server.commands`: the client commands, by an explicit dispatch table;
* :mod:`~eventcast.server.permissions`: who may do what, the same for every entry point;
* :mod:`~eventcast.server.presence`: presence entries and their refresh;
* :mod:`~eventcast.server.admin`: server-side actions on a user's connections;
* :mod:`~eventcast.server.cluster`: the other nodes, and actions that reach them all;
* :mod:`~eventcast.server.sse`: the SSE streams;
* :mod:`~eventcast.server.connection`: one connection's queue and coalescing writer.

Every publication from outside the process, whether a client command, the
HTTP API, the dashboard or Python code, goes through :meth:`Hub.publish`, so
validation and permissions do not depend on the entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import msgspec

from .. import __version__
from .._tasks import Supervisor
from .._urls import pop_option
from ..bus import Bus
from ..events import Event, Position
from ..exceptions import (
    ConfigurationError,
    InvalidDataError,
    PositionError,
    UnrecoverablePositionError,
)
from ..ingest import Consumers
from ..protocol import codes
from ..protocol.codes import Disconnect
from ..protocol.encodings import JSON, Encoding
from ..protocol.frames import (
    HistoryResult,
    PresenceResult,
    PresenceStatsResult,
    StreamPosition,
)
from ..replay import Replay
from .admin import Admin
from .auth import TokenVerifier
from .channels import Channels, HubChannel, Membership
from .cluster import Cluster
from .commands import Commands, publication
from .connection import Connection, Flusher, Send
from .emulation import Emulation
from .errors import CommandError
from .hooks import Hooks
from .ingest import HubTarget
from .jwks import jwks_for
from .limits import TokenBucket, origin_allowed
from .permissions import Permissions
from .presence import MemoryPresence, Presence, PresenceKeeper, client_info, open_presence
from .proxy import configured_hooks
from .registry import Registry
from .sse import SSEStreams
from .webhooks import Webhooks

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["CommandError", "Hub", "HubChannel", "Membership", "RPCHandler"]

#: Data given as JSON bytes (a tuple: ``isinstance`` with a union costs a new object per call).
_BYTES: Final = (bytes, bytearray, memoryview)


def _refused_data(exc: InvalidDataError) -> CommandError:
    """A publication's data that its channel's schema refuses: error 107 with the reason."""
    return CommandError(codes.ERROR_BAD_REQUEST.with_message(str(exc)))


logger = logging.getLogger("eventcast.server")

RPCHandler = Callable[[Connection, Any], Awaitable[Any]]
MessageHandler = Callable[[Connection, Any], Awaitable[None] | None]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


class Hub:
    """The hub's state and parts, independent of the web framework.

    Args:
        settings: the hub's :class:`~eventcast.server.config.Settings`.
        bus: an existing bus to serve (it must have the log and namespaces);
            by default one is built from the settings.
        hooks: the application's in-process hooks (see
            :mod:`eventcast.server.hooks`); the ``proxy_*`` settings add
            Centrifugo's HTTP proxy for the hooks these do not answer.
    """

    def __init__(
        self, settings: Settings, *, bus: Bus | None = None, hooks: Hooks | None = None
    ) -> None:
        self.settings = settings
        if bus is None:
            namespaces = {ns.name: ns.to_bus() for ns in settings.namespaces}
            shared = not settings.backplane_url.startswith("memory://")
            bus = Bus(
                log=settings.log_url if any(n.durable for n in namespaces.values()) else None,
                namespaces=namespaces,
                replay_cap=settings.replay_cap,
                backplane=settings.backplane_url if shared else None,
                count_topics=True,  # the dashboard shows each topic's traffic
            )
        self.bus = bus
        self.verifier = TokenVerifier(
            hmac_secret=_secret(settings.token_hmac_secret),
            public_key=_secret(settings.token_public_key),
            audience=settings.token_audience,
            issuer=settings.token_issuer,
            jwks=jwks_for(settings),
        )
        api_key = _secret(settings.api_key)
        #: The HTTP API's key as the bytes a call must carry (``None``: the API is off).
        self.api_key: bytes | None = api_key.encode() if api_key else None
        self.tasks = Supervisor(logger)
        self.flusher = Flusher()
        self.registry = Registry()
        #: The other nodes, and actions and answers that cover them all.
        self.cluster = Cluster(self)
        self.permissions = Permissions(
            settings, self.verifier, self.cluster.access, lambda: len(self.channels.by_name)
        )
        self.sse = SSEStreams(self)
        self.channels = Channels(bus, self.sse.deliver, self._left, self.flusher)
        self.commands = Commands(self, configured_hooks(settings, hooks))
        self.admin = Admin(self)
        #: HTTP-streaming and SSE emulation sessions, and the relay between nodes.
        self.emulation = Emulation(self)
        #: Who is in which channel (in process here; Redis or NATS across nodes).
        self.presence: Presence = _presence_for(settings.backplane_url)
        self.presence_keeper = PresenceKeeper(lambda: self.presence, settings.presence_ttl)
        #: Lifecycle webhooks (``None`` when none is configured).
        self.webhooks = Webhooks(self) if settings.webhooks else None
        bus.gap_listeners.append(self.channels.lost_continuity)
        bus.control_listeners.append(self._on_control)
        #: The sources the hub consumes (the ``consumers`` setting), built at start.
        self.consumers: Consumers | None = None
        self.rpc_handlers: dict[str, RPCHandler] = {}
        self.message_handler: MessageHandler | None = None
        self.started_at = time.time()
        self.closing = False
        #: Recoveries by outcome: ``{True: ok, False: failed}``.
        self.recoveries: dict[bool, int] = {True: 0, False: 0}
        #: Handshakes refused, by reason.
        self.refused: dict[str, int] = {"origin": 0, "rate": 0}
        #: HTTP API calls by (method, result).
        self.api_calls: dict[tuple[str, str], int] = {}
        self._connection_bucket = TokenBucket(settings.connection_rate)

    # -- what metrics, the dashboard and the API read ---------------------------------

    @property
    def connections(self) -> dict[str, Connection]:
        """The connections of this node, by client id."""
        return self.registry.connections

    @property
    def users(self) -> dict[str, set[Connection]]:
        """The connections of this node, by user id."""
        return self.registry.users

    @property
    def disconnects(self) -> dict[int, int]:
        """Disconnects by code."""
        return self.registry.disconnects

    @property
    def closed_totals(self) -> dict[str, tuple[int, int, int, int]]:
        """Traffic of closed connections by transport (messages/bytes out, messages/bytes in)."""
        return self.registry.closed_totals

    @property
    def encode_failures(self) -> int:
        """Publications that could not be encoded for network clients."""
        return self.channels.encode_failures

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the bus, its log and backplane; start refreshing this node's presence.

        Raises:
            LogError: the log cannot be opened.
            BackplaneError: the backplane cannot be reached.
        """
        opener = getattr(self.presence, "open", None)
        if opener is not None:
            await opener()
        await self.bus.start()
        await self.cluster.start()
        self.tasks.spawn(self.presence_keeper.refresh(self._present), "eventcast-presence")
        if self.webhooks is not None:
            self.webhooks.start()
        # Built here, so a consumer whose driver is missing is a clear error at start.
        self.consumers = Consumers(self.settings.consumers, HubTarget(self))
        self.consumers.start()

    def _present(self) -> Iterator[tuple[str, Connection]]:
        for channel in list(self.channels.by_name.values()):
            for conn, membership in list(channel.members.items()):
                if membership.presence and not conn.closed:
                    yield channel.name, conn

    async def begin_shutdown(self, grace: float = 2.0) -> None:
        """Stop accepting clients and tell every connected one to reconnect (3001).

        Waits up to ``grace`` seconds for the close frames and final SSE
        chunks to be written. Idempotent.
        """
        self.closing = True
        conns = list(self.registry.connections.values())
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
        for conn in list(self.registry.connections.values()):
            conn.close(codes.DISCONNECT_SHUTDOWN)
        self.channels.close()
        if self.consumers is not None:
            await self.consumers.aclose()  # before the bus: they publish into it
        if self.webhooks is not None:
            await self.webhooks.aclose()
        await self.tasks.aclose()
        await self.commands.hooks.aclose()
        await self.verifier.aclose()
        await self.cluster.close()
        await self.presence.close()
        await self.bus.close()

    # -- connections --------------------------------------------------------------------

    def new_connection(
        self,
        *,
        send: Send,
        transport: asyncio.WriteTransport | None,
        transport_name: str = "websocket",
        scope: Any = None,
        encoding: Encoding = JSON,
    ) -> Connection:
        """A connection of this hub, with its limits (an HTTP stream starts writing on attach).

        ``scope`` (the ASGI scope) gives the request's headers and client address to hooks.
        """
        settings = self.settings
        client = scope.get("client") if scope else None
        return Connection(
            flusher=self.flusher,
            on_closed=self.connection_closed,
            send=send,
            transport=transport,
            queue_limit=settings.client_queue_bytes,
            max_bad_commands=settings.max_bad_commands,
            transport_name=transport_name,
            encoding=encoding,
            start_writer=transport_name in ("websocket", "uni_websocket"),
            headers=scope.get("headers", ()) if scope else (),
            address=client[0] if client else None,
        )

    def connection_closed(self, conn: Connection) -> None:
        """A connection ended: forget it and leave its channels."""
        self.registry.forget(conn)
        self.cluster.forget(conn)
        for name in list(conn.channels):
            self.channels.leave(conn, name)

    def _left(self, conn: Connection, channel: HubChannel, membership: Membership) -> None:
        """A member left a channel: remove its presence entry, tell who wants to know."""
        if not membership.presence:
            return
        self.tasks.spawn(
            self.presence_keeper.remove(channel.name, conn.id), "eventcast-presence-remove"
        )
        ns = self.settings.namespace(channel.name)
        if ns is not None and ns.join_leave:
            self.join_leave(channel.name, "leave", conn, membership.info)

    def join_leave(
        self, channel: str, kind: str, conn: Connection, chan_info: bytes | None = None
    ) -> None:
        """Tell the members of ``channel`` on every node that ``conn`` joined or left."""
        info = _encode(client_info(conn, chan_info))
        self.bus.send_control(kind, channel, info)
        self.channels.push_join_leave(channel, kind, info)

    def _on_control(self, kind: str, topic: str, payload: bytes) -> None:
        """A join or leave on another node: push it to this node's members who want it."""
        if kind in ("join", "leave"):
            self.channels.push_join_leave(topic, kind, payload)

    async def handle(self, conn: Connection, request: Any) -> None:
        """Execute one admitted client command (see :class:`~.commands.Commands`)."""
        await self.commands.handle(conn, request)

    def handle_now(self, conn: Connection, request: Any) -> Coroutine[Any, Any, None] | None:
        """:meth:`handle`, done at once (``None``) when the command needs no await, else
        the coroutine that executes it (see :meth:`Commands.handle_now`)."""
        return self.commands.handle_now(conn, request)

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

    # -- publishing and reading ---------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        tags: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Event:
        """Publish into a channel: the one path of clients, the API, the dashboard and Python.

        Args:
            channel: a channel in a configured namespace.
            data: a JSON value, or ``bytes`` holding encoded JSON (as clients send it).
            tags: string metadata.
            idempotency_key: on a durable channel, a repeat within the dedup
                window stores once.

        Raises:
            CommandError: 107 for a malformed channel or data that is not
                JSON, 102 for an unknown namespace.
            LogError: the channel is durable and the log failed.
            EncodeError: ``data`` cannot be encoded as JSON.
        """
        return await self._publish(channel, self._checked(channel, data), tags, idempotency_key)

    def publish_now(self, channel: str, data: Any) -> Event | Coroutine[Any, Any, Event]:
        """:meth:`publish` (no tags or key), done at once when the channel is
        live-only (see :meth:`Bus.publish_known`).

        Returns the event published, or else the coroutine that publishes the
        data, checked already: nothing is published until it is awaited, and it
        must be (or closed).

        Raises:
            CommandError: as :meth:`publish`.
        """
        data = self._checked(channel, data)
        try:
            event = self.bus.publish_known(channel, data)
        except InvalidDataError as exc:
            raise _refused_data(exc) from None
        return self._publish(channel, data) if event is None else event

    async def _publish(
        self, channel: str, data: Any, tags: _Tags = None, key: str | None = None
    ) -> Event:
        """Publish data :meth:`_checked` already (with its tags and idempotency key)."""
        try:
            return await self.bus.publish(channel, data, tags=tags, idempotency_key=key)
        except InvalidDataError as exc:
            raise _refused_data(exc) from None

    def _checked(self, channel: str, data: Any) -> Any:
        """Check the channel of a publication; return its data (decoded if it is JSON bytes)."""
        self.permissions.channel(channel)
        if isinstance(data, _BYTES):
            try:
                return _decode(data)
            except msgspec.DecodeError:
                raise CommandError(
                    codes.ERROR_BAD_REQUEST.with_message("data is not JSON")
                ) from None
        return data

    async def replay(self, channel: str, since: StreamPosition | tuple[int, str] | None) -> Replay:
        """What a client resuming ``channel`` after ``since`` missed (the bus's one replay path).

        A position the stream never gave out (beyond its head, malformed) is
        not recovered, as Centrifugo answers it.

        Raises:
            LogError: the log failed.
        """
        position: Position | None = None
        try:
            if isinstance(since, StreamPosition):
                position = Position(since.offset, since.epoch)
            elif since is not None:
                position = Position(*since)
            return await self.bus.replay(channel, position)
        except PositionError:
            head = await self.bus.replay(channel, None)
            return Replay([], head.position, False, head.floor)

    async def history(
        self,
        channel: str,
        *,
        since: tuple[int, str] | None,
        limit: int,
        reverse: bool,
    ) -> HistoryResult:
        """A page of history as the protocol returns it (limit 0: only the position).

        Raises:
            CommandError: 112 for another epoch, 107 for a bad position or
                limit, 108 when the channel keeps no history.
            LogError: the log failed.
        """
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
            publications=[publication(e) for e in page.events] or None,
            epoch=page.position.epoch,
            offset=page.position.offset,
        )

    async def presence_of(self, channel: str) -> PresenceResult:
        """The clients in a channel, as the protocol and the API return them."""
        return await self.presence_keeper.entries(channel)

    async def presence_stats_of(self, channel: str) -> PresenceStatsResult:
        """How many clients and unique users are in a channel."""
        return await self.presence_keeper.stats(channel)

    # -- the application's handlers and server-side actions ----------------------------

    def register_rpc(self, method: str, handler: RPCHandler) -> None:
        """Answer the ``rpc`` command ``method`` with ``await handler(connection, data)``."""
        self.rpc_handlers[method] = handler

    def connections_of(self, user: str, client: str | None = None) -> list[Connection]:
        """Return a user's connections (or the one with this client id)."""
        return self.registry.of(user, client)

    async def disconnect_user(
        self,
        user: str,
        disconnect: Disconnect = codes.DISCONNECT_FORCE_NO_RECONNECT,
        client: str | None = None,
    ) -> int:
        """Close a user's connections on every node with a disconnect code; return how many.

        Every node answers how many it closed; one that does not answer within
        ``cluster_request_timeout`` is logged (:meth:`Cluster.disconnect
        <eventcast.server.cluster.Cluster.disconnect>` names it, and takes
        ``session`` and ``whitelist``).

        .. versionchanged:: 0.2 Cluster-wide, and a coroutine.
        """
        return (await self.cluster.disconnect(user, disconnect, client)).count

    async def unsubscribe_user(self, user: str, channel: str, client: str | None = None) -> int:
        """Unsubscribe a user's connections on every node from a channel (unsubscribe push).

        .. versionchanged:: 0.2 Cluster-wide, and a coroutine.
        """
        return (await self.cluster.unsubscribe(user, channel, client)).count

    async def subscribe_user(self, user: str, channel: str, client: str | None = None) -> int:
        """Subscribe a user's connections on every node to a channel server-side (subscribe push).

        Raises:
            CommandError: the channel is malformed or its namespace unknown.

        .. versionchanged:: 0.2 Cluster-wide.
        """
        return (await self.cluster.subscribe(user, channel, client)).count

    async def send_message(self, user: str, data: Any, client: str | None = None) -> int:
        """Push an asynchronous ``message`` to a user's connections on every node; return how many.

        Raises:
            EncodeError: ``data`` is not JSON-serialisable.

        .. versionchanged:: 0.2 Cluster-wide, and a coroutine.
        """
        return (await self.cluster.send_message(user, data, client)).count

    async def refresh_user(
        self, user: str, expires_at: float | None, client: str | None = None
    ) -> int:
        """Extend (or lift) a user's connection expiry on every node (``refresh`` push).

        .. versionchanged:: 0.2 Cluster-wide, and a coroutine.
        """
        return (await self.cluster.refresh(user, expires_at, client)).count

    async def block_user(self, user: str, expire_at: float | None = None) -> int:
        """Block a user on every node until ``expire_at``; return how many connections closed.

        The block is kept in the access store, so it outlives restarts.

        Raises:
            EventcastError: the access store failed (nothing changed).

        .. versionadded:: 0.2
        """
        return (await self.cluster.block_user(user, expire_at)).count

    async def unblock_user(self, user: str) -> None:
        """Lift a user's block on every node.

        .. versionadded:: 0.2
        """
        await self.cluster.unblock_user(user)

    async def revoke_token(self, token_id: str, expire_at: float | None = None) -> int:
        """Revoke a token by its ``jti`` on every node; return how many connections closed.

        .. versionadded:: 0.2
        """
        return (await self.cluster.revoke_token(token_id, expire_at)).count

    async def invalidate_user_tokens(
        self,
        user: str,
        issued_before: float | None = None,
        expire_at: float | None = None,
        channel: str = "",
    ) -> int:
        """Refuse a user's tokens issued before a time (default: now) on every node.

        .. versionadded:: 0.2
        """
        outcome = await self.cluster.invalidate_user_tokens(user, issued_before, expire_at, channel)
        return outcome.count

    # -- health -------------------------------------------------------------------------

    def backplane_up(self) -> bool:
        """Whether the backplane is connected (the memory backplane always is)."""
        backplane = self.bus.backplane
        return backplane is None or backplane.connected

    def stats(self) -> dict[str, Any]:
        """Node counters for the API's ``info`` and the dashboard."""
        users = self.registry.users
        return {
            "name": self.settings.node_name,
            "version": __version__,
            "num_clients": len(self.registry.connections),
            "num_users": len(users) - ("" in users),  # (anonymous clients share "")
            "num_channels": len(self.channels.by_name),
            "num_subs": self.channels.subscriptions,
            "uptime": int(time.time() - self.started_at),
        }


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


#: A publication's tags (``None``: none).
_Tags = dict[str, str] | None


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter is not None else value)
