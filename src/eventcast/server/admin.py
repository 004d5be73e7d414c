"""Server-side actions on a user's connections: disconnect, (un)subscribe, message, refresh.

The HTTP API and the Python :class:`~eventcast.server.hub.Hub` methods both
act through :class:`Admin`, so an action means the same from either.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..events import encode_data
from ..protocol import codes
from ..protocol.codes import Disconnect
from ..protocol.frames import SubscribeRequest
from ..topics import validate_topic

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["Admin"]


class Admin:
    """Actions on the connections of a user on this node.

    Args:
        hub: the hub whose connections the actions reach.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def disconnect(self, user: str, disconnect: Disconnect, client: str | None = None) -> int:
        """Close a user's connections with a disconnect code; return how many."""
        conns = self._hub.registry.of(user, client)
        for conn in conns:
            conn.close(disconnect)
        return len(conns)

    def unsubscribe(self, user: str, channel: str, client: str | None = None) -> int:
        """Unsubscribe a user's connections from a channel, with an unsubscribe push."""
        code, reason = codes.UNSUBSCRIBE_SERVER
        count = 0
        for conn in self._hub.registry.of(user, client):
            if channel in conn.channels:
                self._hub.channels.leave(conn, channel)
                conn.push(channel, "unsubscribe", {"code": code, "reason": reason})
                count += 1
        return count

    async def subscribe(self, user: str, channel: str, client: str | None = None) -> int:
        """Subscribe a user's connections to a channel server-side, with a subscribe push.

        Raises:
            InvalidTopicError: the channel name breaks the grammar.
            CommandError: the channel's namespace is unknown.
        """
        validate_topic(channel)
        hub = self._hub
        count = 0
        for conn in hub.registry.of(user, client):
            if channel in conn.channels or conn.closed:
                continue
            result = await hub.commands.join(
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
            conn.push(channel, "subscribe", body)
            membership = conn.channels.get(channel)
            if membership is not None:
                hub.channels.release(conn, membership)
            count += 1
        return count

    def send_message(self, user: str, data: Any, client: str | None = None) -> int:
        """Push an asynchronous ``message`` to a user's WebSocket connections; return how many.

        Raises:
            EncodeError: ``data`` is not JSON-serialisable.
        """
        body = {"data": msgspec.Raw(encode_data(data))}
        conns = [c for c in self._hub.registry.of(user, client) if not c.sse]
        for conn in conns:
            conn.push("", "message", body)
        return len(conns)

    def refresh(self, user: str, expires_at: float | None, client: str | None = None) -> int:
        """Extend (or lift) a user's connection expiry, with a ``refresh`` push; return how many."""
        body: dict[str, Any] = {}
        if expires_at is not None:
            body = {"expires": True, "ttl": max(1, int(expires_at - time.time()))}
        conns = self._hub.registry.of(user, client)
        for conn in conns:
            conn.expires_at = expires_at
            conn.arm_expiry()
            if not conn.sse:
                conn.push("", "refresh", body)
        return len(conns)
