"""``connections_per_user`` across nodes: a user's connections counted on every node.

Each connection of a user is an entry of the presence store under
``~user:<user>`` (``~`` is outside the topic grammar: no channel can collide
with it), refreshed like presence entries and removed when the connection
closes; the entries of a node that died expire after ``presence_ttl``.
Before admitting a connection a node counts the user's live entries. A node
checks and claims one connection of a user at a time, so the limit can be
exceeded only by connections of the same user admitted at the same moment on
different nodes: by at most the number of nodes minus one.

On one node (no backplane) the registry's own count is the whole count, and
nothing is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Final

from ..exceptions import EventcastError
from ..protocol import codes
from .errors import CommandError

if TYPE_CHECKING:
    from .connection import Connection
    from .hub import Hub

__all__ = ["USER_CONNECTIONS", "UserLimit"]

logger = logging.getLogger("eventcast.server")

#: The presence "channel" listing a user's connections on every node.
USER_CONNECTIONS: Final = "~user:"


class _UserLocks:
    """One lock per user being admitted on this node (dropped when nobody holds it)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, user: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(user) or (asyncio.Lock(), 0)
        self._locks[user] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[user]
            if users == 1:
                del self._locks[user]
            else:
                self._locks[user] = (lock, users - 1)


class UserLimit:
    """Counts each user's connections on every node, and refuses those over the limit.

    Args:
        hub: the hub of this node (its settings, presence and connections).
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._counted: dict[str, str] = {}  # client id -> user
        self._locks = _UserLocks()
        self._failing = False

    @property
    def shared(self) -> bool:
        """Whether other nodes may exist (the hub's bus has a backplane)."""
        return self._hub.bus.backplane is not None

    def start(self) -> None:
        """Keep this node's entries alive (refreshed every ``presence_ttl / 3``)."""
        hub = self._hub
        if self.shared:
            hub.tasks.spawn(
                hub.presence_keeper.refresh(self._entries), "eventcast-user-connections"
            )

    async def admit(self, conn: Connection) -> None:
        """Count ``conn`` among its user's connections on every node, or refuse it.

        A store that fails lets the connection in (logged once per outage):
        the limit is a quota, not a lock.

        Raises:
            CommandError: 3504, the user has ``connections_per_user``
                connections in the cluster already; 3000, the connection
                closed meanwhile.
        """
        if not self.shared or not conn.user:
            return
        hub = self._hub
        key = USER_CONNECTIONS + conn.user
        async with self._locks.hold(conn.user):
            try:
                count = len(await hub.presence.get(key))
                if count >= hub.settings.connections_per_user:
                    raise CommandError(codes.DISCONNECT_CONNECTION_LIMIT)
                await hub.presence_keeper.add(key, conn)
            except CommandError:
                raise
            except EventcastError as exc:
                if not self._failing:
                    logger.warning("connections_per_user not checked across nodes: %s", exc)
                self._failing = True
                return
            if self._failing:
                logger.info("connections_per_user checked across nodes again")
                self._failing = False
            self._counted[conn.id] = conn.user
        if conn.closed:  # gone while waiting: nothing to admit
            self.forget(conn)
            raise CommandError(codes.DISCONNECT_CONNECTION_CLOSED)

    def forget(self, conn: Connection) -> None:
        """A connection closed: stop counting it."""
        user = self._counted.pop(conn.id, None)
        if user is not None:
            self._hub.tasks.spawn(
                self._hub.presence_keeper.remove(USER_CONNECTIONS + user, conn.id),
                "eventcast-user-connection-remove",
            )

    def _entries(self) -> Iterator[tuple[str, Connection]]:
        connections = self._hub.registry.connections
        for client, user in list(self._counted.items()):
            conn = connections.get(client)
            if conn is not None and not conn.closed:
                yield USER_CONNECTIONS + user, conn
