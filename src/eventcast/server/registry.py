"""The connection registry: who is connected to this node, by client id and by user."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .connection import Connection

logger = logging.getLogger("eventcast.server")

__all__ = ["Registry"]


class Registry:
    """The connections of this node, and counters that outlive them (for metrics)."""

    def __init__(self) -> None:
        #: Connections by client id.
        self.connections: dict[str, Connection] = {}
        #: Connections by user id (anonymous clients share ``""``).
        self.users: dict[str, set[Connection]] = {}
        #: Disconnects by code.
        self.disconnects: dict[int, int] = {}
        #: Counters of closed connections by transport: (messages out, bytes out,
        #: messages in, bytes in), so metrics never go backwards.
        self.closed_totals: dict[str, tuple[int, int, int, int]] = {}
        #: Called with ``(connection, True)`` once it is registered and with
        #: ``(connection, False)`` once a registered connection is forgotten.
        self.listeners: list[Callable[[Connection, bool], None]] = []

    def _tell(self, conn: Connection, connected: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(conn, connected)
            except Exception:
                logger.exception("a connection listener failed")

    def register(self, conn: Connection) -> None:
        """Add a connection that completed its handshake."""
        self.connections[conn.id] = conn
        self.users.setdefault(conn.user, set()).add(conn)
        self._tell(conn, True)

    def forget(self, conn: Connection) -> None:
        """Remove a closed connection, counting its disconnect code and traffic."""
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
            registered = True
        else:
            registered = False
        users = self.users.get(conn.user)
        if users is not None:
            users.discard(conn)
            if not users:
                del self.users[conn.user]
        if registered:
            self._tell(conn, False)

    def user_connections(self, user: str) -> int:
        """How many connections a user has on this node."""
        return len(self.users.get(user, ()))

    def of(self, user: str, client: str | None = None) -> list[Connection]:
        """A user's connections (only the one with this client id, if given)."""
        conns = list(self.users.get(user, ()))
        if client:
            conns = [c for c in conns if c.id == client]
        return conns

    def __len__(self) -> int:
        return len(self.connections)
