"""User blocking and token revocation: who is refused, on every node and across restarts.

Three kinds of entries, as Centrifugo PRO's server API names them:

* ``block_user``: a **block** of a user id. The user's connections are
  closed on every node and new ones are refused until the block expires.
* ``revoke_token``: a **revoked token** id (the JWT's ``jti``). Connections
  made with it are closed and it is refused at connect, refresh and
  subscribe.
* ``invalidate_user_tokens``: the user's **tokens issued before** a time
  (the JWT's ``iat``) are refused: connection tokens, or, with a channel,
  that channel's subscription tokens. A token without ``iat`` cannot prove
  when it was issued and is refused too.

Each entry may expire (``expire_at``, seconds since the epoch); past it the
entry is gone. Entries live in an :class:`AccessStore` shared by the nodes
(the log's SQLite or PostgreSQL database, Redis, or a NATS JetStream KV
bucket: see :func:`open_access_store`), so they survive restarts. Each node
keeps every live entry in memory (:class:`Access`), so a check is a dict
lookup: it loads them all at start (a node whose store cannot be read does
not start), reloads them every few seconds, and learns changes made on other
nodes at once from the control channel (see :mod:`eventcast.server.cluster`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import urlsplit

import msgspec

from .._urls import pop_option
from ..exceptions import ConfigurationError
from ..protocol import codes
from ..protocol.codes import Disconnect
from ._kv import require_driver
from .errors import CommandError

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "DEFAULT_MAX_ACCESS_ENTRIES",
    "Access",
    "AccessEntry",
    "AccessStore",
    "MemoryAccessStore",
    "access_store_url",
    "entry_of",
    "open_access_store",
]

logger = logging.getLogger("eventcast.server")

#: The most entries a node keeps (and a store holds); past it new ones are refused.
DEFAULT_MAX_ACCESS_ENTRIES: Final = 1_000_000

Kind = Literal["block", "token", "user_tokens"]
#: An entry's identity: ``(kind, subject, channel)``.
Key = tuple[str, str, str]


class AccessEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One block, revoked token or invalidation.

    Attributes:
        kind: ``"block"``, ``"token"`` or ``"user_tokens"``.
        subject: the user id (``block``, ``user_tokens``) or the token id (``token``).
        channel: ``user_tokens`` only: ``""`` for connection tokens, or the
            channel whose subscription tokens are invalidated.
        issued_before: ``user_tokens`` only: tokens issued before this time
            (seconds since the epoch) are refused.
        expire_at: when the entry expires (seconds since the epoch), or
            ``None`` for never.
    """

    kind: Kind
    subject: str
    channel: str = ""
    issued_before: float = 0.0
    expire_at: float | None = None

    @property
    def key(self) -> Key:
        """The entry's identity: a later entry with the same key replaces it."""
        return (self.kind, self.subject, self.channel)

    def live(self, now: float) -> bool:
        """Whether the entry has not expired at ``now``."""
        return self.expire_at is None or self.expire_at > now


def entry_of(
    kind: str, subject: str, channel: str, issued_before: float, expire_at: float | None
) -> AccessEntry | None:
    """An entry read back from a store, or ``None`` when its kind is unknown."""
    if kind not in ("block", "token", "user_tokens"):
        return None
    return AccessEntry(
        kind=kind,  # type: ignore[arg-type]  # checked just above
        subject=subject,
        channel=channel,
        issued_before=float(issued_before),
        expire_at=None if expire_at is None else float(expire_at),
    )


class AccessStore(ABC):
    """Where access entries live. Every method raises only ``EventcastError``."""

    async def open(self) -> None:  # noqa: B027 - optional hook: most stores connect on first use
        """Connect (and create what is missing). Idempotent."""

    @abstractmethod
    async def put(self, entry: AccessEntry) -> None:
        """Store an entry, replacing the one with the same key."""

    @abstractmethod
    async def remove(self, key: Key) -> None:
        """Remove the entry with this key, if any."""

    @abstractmethod
    async def load(self, now: float) -> list[AccessEntry]:
        """Return every entry live at ``now`` (a store may delete the expired ones)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release here
        """Release resources. Idempotent."""


class MemoryAccessStore(AccessStore):
    """Entries in process: one node, lost on restart (with ``memory://`` logs, and tests)."""

    def __init__(self) -> None:
        self._entries: dict[Key, AccessEntry] = {}

    async def put(self, entry: AccessEntry) -> None:
        self._entries[entry.key] = entry

    async def remove(self, key: Key) -> None:
        self._entries.pop(key, None)

    async def load(self, now: float) -> list[AccessEntry]:
        for key in [k for k, e in self._entries.items() if not e.live(now)]:
            del self._entries[key]
        return list(self._entries.values())


def open_access_store(url: str, *, prefix: str) -> AccessStore:
    """Build the :class:`AccessStore` a URL names (it connects on first use).

    * ``memory://``: :class:`MemoryAccessStore` (this process only);
    * ``sqlite:///path``: the table ``eventcast_access`` in that database file
      (the log's own file by default);
    * ``postgresql://…?schema=name``: the table ``access`` in that schema;
    * ``redis://`` / ``rediss://`` / ``redis+cluster://``: the hash ``{prefix}:access``;
    * ``nats://`` / ``tls://`` / ``nats+jetstream://``: the JetStream KV
      bucket ``{prefix}_access``.

    Raises:
        ConfigurationError: the scheme is unknown, the URL is malformed, or
            the driver is not installed.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not an access store URL: {url!r}")
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        return MemoryAccessStore()
    if scheme == "sqlite":
        from .access_sql import SQLiteAccessStore

        return SQLiteAccessStore.from_url(url)
    if scheme in ("postgresql", "postgres"):
        require_driver("psycopg", "a PostgreSQL access store", "postgres")
        from .access_sql import PostgresAccessStore

        return PostgresAccessStore(url)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        require_driver("redis", "a Redis access store", "redis")
        from .access_redis import RedisAccessStore

        return RedisAccessStore(url, prefix=prefix)
    if scheme in ("nats", "tls", "nats+jetstream"):
        require_driver("nats", "a NATS access store", "nats")
        from .access_nats import NATSAccessStore

        return NATSAccessStore(url, prefix=prefix)
    raise ConfigurationError(
        f"unknown access store URL scheme {scheme!r}; expected memory://, sqlite:///, "
        "postgresql://, redis:// or nats://"
    )


class Access:
    """This node's copy of every live entry, and the checks read against it.

    Args:
        store: where the entries are shared and kept.
        max_entries: the most entries kept (new ones past it are refused).
        clock: the wall clock (seconds since the epoch), injectable for tests.

    Only :meth:`open`, :meth:`add`, :meth:`remove` and :meth:`reload` touch
    the store; the checks never wait.
    """

    def __init__(
        self,
        store: AccessStore,
        *,
        max_entries: int = DEFAULT_MAX_ACCESS_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ConfigurationError("max_entries must be positive")
        self.store = store
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[Key, AccessEntry] = {}
        #: Changes learnt while a reload reads the store, replayed over what it read.
        self._during_reload: list[tuple[Key, AccessEntry | None]] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[AccessEntry]:
        """Every entry this node knows (expired ones included until the next reload)."""
        return list(self._entries.values())

    # -- the store --------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store and load every live entry.

        Raises:
            EventcastError: the store cannot be read (refuse to start: a
                blocked user must not get in because a node restarted).
        """
        await self.store.open()
        await self.reload()

    async def reload(self) -> list[AccessEntry]:
        """Read every live entry from the store; return those this node did not know.

        Raises:
            EventcastError: the store failed (what this node knows is kept).
        """
        self._during_reload = []
        try:
            loaded = await self.store.load(self._clock())
        finally:
            changes, self._during_reload = self._during_reload, None
        if len(loaded) > self.max_entries:
            logger.error(
                "the access store holds %d entries; this node keeps only %d",
                len(loaded),
                self.max_entries,
            )
            loaded = loaded[: self.max_entries]
        fresh = {entry.key: entry for entry in loaded}
        for key, entry in changes:  # learnt from the control channel meanwhile
            if entry is None:
                fresh.pop(key, None)
            else:
                fresh[key] = entry
        new = [e for key, e in fresh.items() if self._entries.get(key) != e]
        self._entries = fresh
        return new

    async def add(self, entry: AccessEntry) -> None:
        """Store an entry and know it here (other nodes learn it from the caller).

        Raises:
            CommandError: 106, this node already keeps ``max_entries`` entries.
            EventcastError: the store failed (nothing changed).
        """
        if entry.key not in self._entries and len(self._entries) >= self.max_entries:
            self._sweep()
            if len(self._entries) >= self.max_entries:
                raise CommandError(
                    codes.ERROR_LIMIT_EXCEEDED.with_message(
                        f"at most {self.max_entries} access entries are kept"
                    )
                )
        await self.store.put(entry)
        self.learn(entry)

    async def remove(self, key: Key) -> None:
        """Remove an entry from the store and from here.

        Raises:
            EventcastError: the store failed (nothing changed).
        """
        await self.store.remove(key)
        self.forget(key)

    def learn(self, entry: AccessEntry) -> None:
        """Know an entry another node stored (from the control channel)."""
        self._entries[entry.key] = entry
        if self._during_reload is not None:
            self._during_reload.append((entry.key, entry))

    def forget(self, key: Key) -> None:
        """Forget an entry another node removed (from the control channel)."""
        self._entries.pop(key, None)
        if self._during_reload is not None:
            self._during_reload.append((key, None))

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if not e.live(now)]:
            del self._entries[key]

    # -- checks -----------------------------------------------------------------------------

    def _live(self, key: Key) -> AccessEntry | None:
        entry = self._entries.get(key)
        if entry is None or not entry.live(self._clock()):
            return None
        return entry

    def blocked(self, user: str) -> bool:
        """Whether ``user`` is blocked now."""
        return bool(user) and self._live(("block", user, "")) is not None

    def revoked(self, token_id: str | None) -> bool:
        """Whether the token with this id (``jti``) is revoked now."""
        return bool(token_id) and self._live(("token", token_id or "", "")) is not None

    def invalidated(self, user: str, issued_at: float | None, channel: str = "") -> bool:
        """Whether a token of ``user`` issued at ``issued_at`` is invalidated now.

        ``channel`` is ``""`` for a connection token, else the channel of a
        subscription token. A token without ``iat`` is invalidated whenever
        an invalidation applies (it cannot prove when it was issued).
        """
        if not user:
            return False
        entry = self._live(("user_tokens", user, channel))
        return entry is not None and (issued_at is None or issued_at < entry.issued_before)

    def refuses(
        self, user: str, token_id: str | None, issued_at: float | None, channel: str = ""
    ) -> Disconnect | None:
        """Why a token is refused now (the disconnect to answer with), or ``None``.

        ``channel`` is ``""`` for a connection token (a blocked user is
        refused too: 3503 "blocked"; a revoked token: 3500 "token revoked"),
        else the channel of a subscription token.
        """
        if not channel and self.blocked(user):
            return codes.DISCONNECT_BLOCKED
        if self.revoked(token_id) or self.invalidated(user, issued_at, channel):
            return codes.DISCONNECT_TOKEN_REVOKED
        return None


def access_store_url(settings: Settings) -> tuple[str, str]:
    """Where blocks and revocations are kept: ``(URL, key prefix)``.

    ``access_url`` when set; else the log's database when the nodes share it
    (PostgreSQL, Redis, JetStream) or when there is one node (SQLite,
    memory); else the backplane's engine (Redis, NATS KV), which every node
    shares.
    """
    if settings.access_url:
        url = settings.access_url
    else:
        log_scheme = urlsplit(settings.log_url).scheme.lower()
        shared_log = log_scheme not in ("sqlite", "memory")
        one_node = settings.backplane_url.startswith("memory://")
        url = settings.log_url if shared_log or one_node else settings.backplane_url
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("sqlite", "memory", "postgresql", "postgres"):
        return url, "eventcast"
    rest, prefix = pop_option(url, "prefix")
    return rest, prefix or "eventcast"
