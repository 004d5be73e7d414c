"""Server-side actions on a user's connections on this node.

Disconnect, (un)subscribe, message, refresh, and closing what a block or a
revoked token forbids. :mod:`eventcast.server.cluster` asks every node to run
the same action on its own connections, so the HTTP API and the Python
:class:`~eventcast.server.hub.Hub` methods mean the same from either, on
whichever node they are called.

Connections are chosen as Centrifugo's server API chooses them: a user's
connections, or only the one with a client id (``client``) or a session id
(``session``: in eventcast each connection is one session, whose id is its
client id), minus a ``whitelist`` of client ids for ``disconnect``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from ..events import encode_data
from ..protocol import codes
from ..protocol.codes import Disconnect
from ..protocol.frames import SubscribeRequest
from ..topics import validate_topic
from .errors import CommandError

if TYPE_CHECKING:
    from .access import Access, AccessEntry
    from .connection import Connection
    from .hub import Hub

__all__ = ["Admin", "disconnect_of"]

logger = logging.getLogger("eventcast.server")


def disconnect_of(code: object, reason: object) -> Disconnect:
    """A disconnect an action may send: code 3000-4999, reason at most 123 bytes of UTF-8.

    Raises:
        ValueError: the code or the reason is not one (the message says which).
    """
    if isinstance(code, bool) or not isinstance(code, int) or not 3000 <= code < 5000:
        raise ValueError("disconnect code must be 3000-4999")
    if not isinstance(reason, str) or len(reason.encode()) > 123:
        raise ValueError("disconnect reason must be a string of at most 123 bytes")
    return Disconnect(code, reason)


class Admin:
    """Actions on the connections of a user on this node.

    Args:
        hub: the hub whose connections the actions reach.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def select(
        self,
        user: str,
        client: str | None = None,
        session: str | None = None,
        whitelist: Collection[str] = (),
    ) -> list[Connection]:
        """The connections an action reaches: a user's, narrowed by client or session id.

        With no user, ``client`` alone names the connection (whoever its user is).
        """
        registry = self._hub.registry
        if user:
            conns = registry.of(user, client)
        else:
            conn = registry.connections.get(client) if client else None
            conns = [] if conn is None else [conn]
        if session:
            conns = [c for c in conns if c.id == session]
        if whitelist:
            conns = [c for c in conns if c.id not in whitelist]
        return conns

    def disconnect(
        self,
        user: str,
        disconnect: Disconnect,
        client: str | None = None,
        *,
        session: str | None = None,
        whitelist: Collection[str] = (),
    ) -> int:
        """Close a user's connections with a disconnect code; return how many."""
        conns = self.select(user, client, session, whitelist)
        for conn in conns:
            conn.close(disconnect)
        return len(conns)

    def unsubscribe(
        self, user: str, channel: str, client: str | None = None, *, session: str | None = None
    ) -> int:
        """Unsubscribe a user's connections from a channel, with an unsubscribe push."""
        return self._unsubscribe(
            self.select(user, client, session), channel, codes.UNSUBSCRIBE_SERVER
        )

    def _unsubscribe(self, conns: Iterable[Connection], channel: str, why: tuple[int, str]) -> int:
        code, reason = why
        count = 0
        for conn in conns:
            if channel in conn.channels:
                self._hub.channels.leave(conn, channel)
                conn.push(channel, "unsubscribe", {"code": code, "reason": reason})
                count += 1
        return count

    async def subscribe(
        self, user: str, channel: str, client: str | None = None, *, session: str | None = None
    ) -> int:
        """Subscribe a user's connections to a channel server-side, with a subscribe push.

        Returns how many were subscribed: a connection already subscribed, or
        one that cannot take another channel (its limit), is skipped.

        Raises:
            InvalidTopicError: the channel name breaks the grammar.
            CommandError: the channel's namespace is unknown.
        """
        validate_topic(channel)
        hub = self._hub
        hub.permissions.namespace(channel)
        count = 0
        for conn in self.select(user, client, session):
            if channel in conn.channels or conn.closed:
                continue
            try:
                result = await hub.commands.join(
                    conn, SubscribeRequest(channel=channel), server_side=True
                )
            except CommandError as exc:
                logger.info("server-side subscribe of %s to %r refused: %s", conn.id, channel, exc)
                continue
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
            conn.push(channel, "subscribe", body)
            membership = conn.channels.get(channel)
            if membership is not None:
                hub.channels.release(conn, membership)
            count += 1
        return count

    def send_message(self, user: str, data: Any, client: str | None = None) -> int:
        """Push an asynchronous ``message`` to a user's WebSocket connections; return how many.

        ``data`` is a JSON value, or ``bytes`` holding encoded JSON.

        Raises:
            EncodeError: ``data`` is not JSON-serialisable.
        """
        body = {"data": msgspec.Raw(encode_data(data))}
        conns = [c for c in self.select(user, client) if not c.sse]
        for conn in conns:
            conn.push("", "message", body)
        return len(conns)

    def refresh(
        self,
        user: str,
        expires_at: float | None,
        client: str | None = None,
        *,
        session: str | None = None,
        expired: bool = False,
    ) -> int:
        """Extend (or lift) a user's connection expiry, with a ``refresh`` push; return how many.

        With ``expired``, the connections are closed as expired (3005) instead.
        """
        conns = self.select(user, client, session)
        if expired:
            for conn in conns:
                conn.close(codes.DISCONNECT_EXPIRED)
            return len(conns)
        body: dict[str, Any] = {}
        if expires_at is not None:
            body = {"expires": True, "ttl": max(1, int(expires_at - time.time()))}
        for conn in conns:
            conn.expires_at = expires_at
            conn.arm_expiry()
            if not conn.sse:
                conn.push("", "refresh", body)
        return len(conns)

    def enforce(self, access: Access, entries: Iterable[AccessEntry]) -> int:
        """Close what new access entries forbid here; return how many connections and subscriptions.

        A blocked user's connections and those made with a revoked or
        invalidated token are closed (3503 "blocked", 3500 "token
        revoked"); a subscription granted by a revoked or invalidated
        subscription token ends with an unsubscribe push (2000 "token revoked").
        """
        registry = self._hub.registry
        conns: Iterable[Connection]
        entries = list(entries)
        if any(entry.kind == "token" for entry in entries):
            conns = list(registry.connections.values())  # a token id is not indexed: scan
        else:
            conns = [c for user in {e.subject for e in entries} for c in registry.of(user)]
        count = 0
        for conn in conns:
            if conn.closed:
                continue
            refusal = access.refuses(conn.user, conn.token_id, conn.issued_at)
            if refusal is not None and not conn.anonymous:
                conn.close(refusal)
                count += 1
                continue
            for name, membership in list(conn.channels.items()):
                token = membership.token
                if token is not None and access.refuses(
                    conn.user, token.token_id, token.issued_at, name
                ):
                    count += self._unsubscribe([conn], name, codes.UNSUBSCRIBE_TOKEN_REVOKED)
        return count
