"""The cluster: actions and answers that cover every node, whichever node received them.

The parts (each with one job):

* :mod:`~eventcast.server.nodes`: the node table built from heartbeats on the
  backplane's control channel, and requests every node answers within a
  bounded wait (the nodes that do not answer in time are named);
* :mod:`~eventcast.server.admin`: what one node does to its own connections;
* :mod:`~eventcast.server.access`: blocked users and revoked tokens, in a
  shared store, with an in-memory copy on each node;
* :mod:`~eventcast.server.user_limit`: ``connections_per_user`` across nodes.

:class:`Cluster` turns each action into a *call* (a msgspec struct tagged by
``method``), asks every node to run it (:meth:`NodeTable.ask
<eventcast.server.nodes.NodeTable.ask>`) while running it here, and sums the
answers: ``disconnect``, ``unsubscribe``, ``subscribe``, ``refresh``,
``send_message``, the access entries (``block_user``, ``revoke_token``, …) and
``channels``. With no backplane there is one node: actions and answers cover
it alone, at once.

One call goes to a single node: ``emulation``, the commands of an
HTTP-streaming or SSE emulation session that reached a node other than the
one holding its stream (:meth:`Cluster.relay_emulation`, the default
:attr:`Emulation.relay <eventcast.server.emulation.Emulation.relay>`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ..backplane.base import new_node_id
from ..events import encode_data
from ..exceptions import BackplaneError, EventcastError
from ..protocol import codes
from ..protocol.codes import Disconnect
from ..protocol.frames import EmulationRequest
from .access import Access, AccessEntry, Key, access_store_url, open_access_store
from .admin import disconnect_of
from .errors import CommandError
from .nodes import Node, NodeStats, NodeTable
from .user_limit import UserLimit

if TYPE_CHECKING:
    from .connection import Connection
    from .hub import Hub

__all__ = [
    "CHANNELS_ANSWER_BYTES",
    "ChannelsAnswer",
    "Cluster",
    "Outcome",
    "channel_glob",
]

logger = logging.getLogger("eventcast.server")

#: How many bytes of channel names one node answers ``channels`` with at most.
CHANNELS_ANSWER_BYTES: Final = 256 * 1024
#: The longest ``channels`` pattern accepted, in characters.
MAX_PATTERN: Final = 1024


# -- what a node is asked to do ------------------------------------------------------------


class _Call(msgspec.Struct, frozen=True, tag_field="method"):
    """What a request asks every node to do (one subclass per method)."""


class _DisconnectCall(_Call, frozen=True, tag="disconnect"):
    user: str
    code: int
    reason: str
    client: str = ""
    session: str = ""
    whitelist: list[str] = []


class _UnsubscribeCall(_Call, frozen=True, tag="unsubscribe"):
    user: str
    channel: str
    client: str = ""
    session: str = ""


class _SubscribeCall(_Call, frozen=True, tag="subscribe"):
    user: str
    channel: str
    client: str = ""
    session: str = ""


class _RefreshCall(_Call, frozen=True, tag="refresh"):
    user: str
    client: str = ""
    session: str = ""
    expired: bool = False
    expire_at: float | None = None


class _MessageCall(_Call, frozen=True, tag="message"):
    user: str
    data: msgspec.Raw
    client: str = ""


class _AccessCall(_Call, frozen=True, tag="access"):
    """An entry stored (block, revoked token, invalidation), or removed (by key)."""

    entry: AccessEntry | None = None
    removed: tuple[str, str, str] | None = None


class _ChannelsCall(_Call, frozen=True, tag="channels"):
    pattern: str = ""


class _EmulationCall(_Call, frozen=True, tag="emulation"):
    """Commands of an emulation session, for the node holding its stream."""

    session: str
    data: bytes


Call = (
    _DisconnectCall
    | _UnsubscribeCall
    | _SubscribeCall
    | _RefreshCall
    | _MessageCall
    | _AccessCall
    | _ChannelsCall
    | _EmulationCall
)

_encode = msgspec.json.Encoder().encode
_decode_call = msgspec.json.Decoder(Call).decode


# -- answers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an action did across the cluster.

    Attributes:
        count: connections (or subscriptions) acted on, on this node and every
            node that answered.
        missing: the nodes that did not answer in time (``name (uid)``); the
            action may or may not have reached them.
    """

    count: int
    missing: list[str]


@dataclass(frozen=True, slots=True)
class ChannelsAnswer:
    """The channels with subscribers on every node that answered.

    Attributes:
        channels: each channel's number of subscribed clients, summed over the nodes.
        missing: the nodes that did not answer in time (``name (uid)``).
        truncated: some node had more matching channels than it answers with
            (:data:`CHANNELS_ANSWER_BYTES` of names): narrow the pattern.
    """

    channels: dict[str, int]
    missing: list[str]
    truncated: bool


def channel_glob(pattern: str) -> Callable[[str], bool]:
    """A matcher of channel names for the ``channels`` pattern, as Centrifugo matches it.

    ``*`` matches any run of characters (``.`` and ``:`` included), ``?`` one
    character, ``[abc]``/``[a-z]``/``[!abc]`` one character of (or not of) a
    class, ``{a,b}`` one of the alternatives, and ``\\`` escapes the next
    character. An empty pattern matches everything.

    Raises:
        CommandError: 107, the pattern is malformed or too long.
    """
    if not pattern:
        return lambda name: True
    if len(pattern) > MAX_PATTERN:
        raise CommandError(codes.ERROR_BAD_REQUEST.with_message("pattern too long"))
    try:
        regex = re.compile(_glob_regex(pattern), re.DOTALL)
    except (re.error, ValueError) as exc:
        raise CommandError(
            codes.ERROR_BAD_REQUEST.with_message(f"malformed pattern: {exc}")
        ) from None
    return lambda name: regex.fullmatch(name) is not None


def _glob_regex(pattern: str) -> str:
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 == len(pattern):
                raise ValueError("a trailing backslash")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if char == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise ValueError("an unclosed [")
            # fnmatch translates one class exactly as a glob means it.
            out.append(fnmatch.translate(pattern[i : end + 1])[4:-3])
            i = end + 1
            continue
        if char == "{":
            depth += 1
            out.append("(?:")
        elif char == "}" and depth:
            depth -= 1
            out.append(")")
        elif char == "," and depth:
            out.append("|")
        elif char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        else:
            out.append(re.escape(char))
        i += 1
    if depth:
        raise ValueError("an unclosed {")
    return "".join(out)


class Cluster:
    """This node's view of the cluster, and actions that reach every node.

    Args:
        hub: the hub of this node (its settings, bus, connections and tasks).
    """

    def __init__(self, hub: Hub) -> None:
        settings = hub.settings
        self._hub = hub
        backplane = hub.bus.backplane
        url, prefix = access_store_url(settings)
        #: Blocked users and revoked tokens, as every node knows them.
        self.access = Access(open_access_store(url, prefix=prefix))
        #: The other nodes, and requests to them.
        self.table = NodeTable(
            hub.bus,
            # The backplane's id, so every node sees the same one.
            node_id=backplane.node_id if backplane is not None else new_node_id(),
            stats=self.stats,
            handle=self._handle,
            spawn=hub.tasks.spawn,
            heartbeat=settings.cluster_heartbeat,
            node_timeout=settings.cluster_node_timeout,
            request_timeout=settings.cluster_request_timeout,
        )
        #: ``connections_per_user`` across nodes.
        self.user_limit = UserLimit(hub)
        self._handlers: dict[type[_Call], Callable[[Any], Awaitable[Any]]] = {
            _DisconnectCall: self._disconnect,
            _UnsubscribeCall: self._unsubscribe,
            _SubscribeCall: self._subscribe,
            _RefreshCall: self._refresh,
            _MessageCall: self._message,
            _AccessCall: self._access,
            _ChannelsCall: self._channels,
            _EmulationCall: self._emulation,
        }

    @property
    def node_id(self) -> str:
        """This node's id (``uid`` in ``info``)."""
        return self.table.node_id

    @property
    def nodes(self) -> dict[str, Node]:
        """The other live nodes, by id."""
        return self.table.nodes

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the access entries, then start heartbeats and reloads.

        Raises:
            EventcastError: the access store cannot be read (a node that
                cannot tell who is blocked does not start).
        """
        await self.access.open()
        self.table.start()
        self.user_limit.start()
        self._hub.tasks.spawn(self._reload_access(), "eventcast-access-reload")

    async def close(self) -> None:
        """Say goodbye to the other nodes and close the access store. Idempotent."""
        await self.table.close()
        await self.access.store.close()

    def stats(self) -> NodeStats:
        """This node's figures, as its heartbeat sends them."""
        stats = self._hub.stats()
        return NodeStats(
            name=stats["name"],
            version=stats["version"],
            uptime=stats["uptime"],
            num_clients=stats["num_clients"],
            num_users=stats["num_users"],
            num_channels=stats["num_channels"],
            num_subs=stats["num_subs"],
        )

    def info(self) -> list[dict[str, Any]]:
        """Every live node, this one first: uid, name, version, uptime and counts."""
        return self.table.info()

    async def admit(self, conn: Connection) -> None:
        """Count a new connection among its user's on every node, or refuse it (3504).

        See :meth:`UserLimit.admit <eventcast.server.user_limit.UserLimit.admit>`.
        """
        await self.user_limit.admit(conn)

    def forget(self, conn: Connection) -> None:
        """A connection closed: stop counting it among its user's."""
        self.user_limit.forget(conn)

    # -- calls -----------------------------------------------------------------------------

    async def _handle(self, payload: bytes) -> Any:
        """Run a call another node asked for."""
        try:
            call = _decode_call(payload)
        except msgspec.DecodeError as exc:
            raise BackplaneError(f"undecodable call: {exc}") from None
        return await self._handlers[type(call)](call)

    async def _act(self, call: Call) -> Outcome:
        handler = self._handlers[type(call)]
        what = str(call.__struct_config__.tag)
        count, answers = await self.table.ask(_encode(call), lambda: handler(call), what)
        count += sum(n for n in answers.results.values() if isinstance(n, int))
        return Outcome(count, answers.missing)

    # -- actions ---------------------------------------------------------------------------

    async def disconnect(
        self,
        user: str,
        disconnect: Disconnect = codes.DISCONNECT_FORCE_NO_RECONNECT,
        client: str | None = None,
        *,
        session: str | None = None,
        whitelist: Collection[str] = (),
    ) -> Outcome:
        """Close a user's connections on every node (see :meth:`Admin.select`).

        Raises:
            ValueError: the code is not 3000-4999 or the reason is over 123 bytes.
        """
        disconnect_of(disconnect.code, disconnect.reason)
        return await self._act(
            _DisconnectCall(
                user=user,
                code=disconnect.code,
                reason=disconnect.reason,
                client=client or "",
                session=session or "",
                whitelist=list(whitelist),
            )
        )

    async def unsubscribe(
        self, user: str, channel: str, client: str | None = None, *, session: str | None = None
    ) -> Outcome:
        """Unsubscribe a user's connections on every node from a channel (unsubscribe push)."""
        return await self._act(
            _UnsubscribeCall(user=user, channel=channel, client=client or "", session=session or "")
        )

    async def subscribe(
        self, user: str, channel: str, client: str | None = None, *, session: str | None = None
    ) -> Outcome:
        """Subscribe a user's connections on every node to a channel (subscribe push).

        Raises:
            CommandError: the channel is malformed or its namespace unknown.
        """
        self._hub.permissions.channel(channel)
        return await self._act(
            _SubscribeCall(user=user, channel=channel, client=client or "", session=session or "")
        )

    async def refresh(
        self,
        user: str,
        expire_at: float | None,
        client: str | None = None,
        *,
        session: str | None = None,
        expired: bool = False,
    ) -> Outcome:
        """Set (or lift) the expiry of a user's connections on every node, or expire them now."""
        return await self._act(
            _RefreshCall(
                user=user,
                client=client or "",
                session=session or "",
                expired=expired,
                expire_at=expire_at,
            )
        )

    async def send_message(self, user: str, data: Any, client: str | None = None) -> Outcome:
        """Push a ``message`` to a user's WebSocket connections on every node.

        Raises:
            EncodeError: ``data`` is not JSON-serialisable.
        """
        raw = msgspec.Raw(encode_data(data))
        return await self._act(_MessageCall(user=user, data=raw, client=client or ""))

    async def block_user(self, user: str, expire_at: float | None = None) -> Outcome:
        """Block a user until ``expire_at`` (or for good): close their connections, refuse new ones.

        Raises:
            CommandError: 106, too many access entries are kept.
            EventcastError: the access store failed (nothing changed).
        """
        return await self._store(AccessEntry(kind="block", subject=user, expire_at=expire_at))

    async def unblock_user(self, user: str) -> Outcome:
        """Lift a user's block on every node.

        Raises:
            EventcastError: the access store failed (nothing changed).
        """
        return await self._unstore(("block", user, ""))

    async def revoke_token(self, token_id: str, expire_at: float | None = None) -> Outcome:
        """Revoke the token whose ``jti`` is ``token_id`` until ``expire_at`` (or for good).

        Raises:
            CommandError: 106, too many access entries are kept.
            EventcastError: the access store failed (nothing changed).
        """
        return await self._store(AccessEntry(kind="token", subject=token_id, expire_at=expire_at))

    async def invalidate_user_tokens(
        self,
        user: str,
        issued_before: float | None = None,
        expire_at: float | None = None,
        channel: str = "",
    ) -> Outcome:
        """Refuse a user's tokens issued before ``issued_before`` (default: now).

        Connection tokens, or with ``channel`` that channel's subscription tokens.

        Raises:
            CommandError: 106, too many access entries are kept.
            EventcastError: the access store failed (nothing changed).
        """
        entry = AccessEntry(
            kind="user_tokens",
            subject=user,
            channel=channel,
            issued_before=time.time() if issued_before is None else issued_before,
            expire_at=expire_at,
        )
        return await self._store(entry)

    async def _store(self, entry: AccessEntry) -> Outcome:
        await self.access.add(entry)
        return await self._act(_AccessCall(entry=entry))

    async def _unstore(self, key: Key) -> Outcome:
        await self.access.remove(key)
        return await self._act(_AccessCall(removed=key))

    async def channels(self, pattern: str = "") -> ChannelsAnswer:
        """The channels with subscribers on every node, with their numbers of clients.

        Raises:
            CommandError: 107, the pattern is malformed (see :func:`channel_glob`).
        """
        channel_glob(pattern)  # a bad pattern fails here, not on every node
        call = _ChannelsCall(pattern=pattern)
        local, answers = await self.table.ask(
            _encode(call), lambda: self._channels(call), "channels"
        )
        channels: dict[str, int] = dict(local["channels"])
        truncated: bool = local["truncated"]
        for result in answers.results.values():
            if not isinstance(result, dict):
                continue
            truncated = truncated or bool(result.get("truncated"))
            for name, count in (result.get("channels") or {}).items():
                if isinstance(name, str) and isinstance(count, int):
                    channels[name] = channels.get(name, 0) + count
        return ChannelsAnswer(channels, answers.missing, truncated)

    async def relay_emulation(self, node: str, request: EmulationRequest, *, timeout: float) -> int:
        """Run an emulation request on the node ``node`` (its id); return the HTTP status.

        The status is the holder's: 200 (delivered) or 204 (its session has
        ended). 404 when no live node has that id (a single node knows no
        other), or it did not answer within ``timeout`` seconds, or failed.

        Raises:
            BackplaneError: too many cluster requests are already waiting.
        """
        call = _EmulationCall(session=request.session, data=request.data)
        answers = await self.table.ask_node(node, _encode(call), "emulation", timeout=timeout)
        status = answers.results.get(node)
        return status if isinstance(status, int) and not isinstance(status, bool) else 404

    # -- what each node does -------------------------------------------------------------------

    async def _disconnect(self, call: _DisconnectCall) -> int:
        try:
            disconnect = disconnect_of(call.code, call.reason)
        except ValueError as exc:
            raise BackplaneError(f"bad disconnect call: {exc}") from None
        return self._hub.admin.disconnect(
            call.user,
            disconnect,
            call.client or None,
            session=call.session or None,
            whitelist=call.whitelist,
        )

    async def _unsubscribe(self, call: _UnsubscribeCall) -> int:
        return self._hub.admin.unsubscribe(
            call.user, call.channel, call.client or None, session=call.session or None
        )

    async def _subscribe(self, call: _SubscribeCall) -> int:
        return await self._hub.admin.subscribe(
            call.user, call.channel, call.client or None, session=call.session or None
        )

    async def _refresh(self, call: _RefreshCall) -> int:
        return self._hub.admin.refresh(
            call.user,
            call.expire_at,
            call.client or None,
            session=call.session or None,
            expired=call.expired,
        )

    async def _message(self, call: _MessageCall) -> int:
        return self._hub.admin.send_message(call.user, bytes(call.data), call.client or None)

    async def _access(self, call: _AccessCall) -> int:
        if call.removed is not None:
            self.access.forget(call.removed)
            return 0
        if call.entry is None:
            return 0
        self.access.learn(call.entry)
        return self._hub.admin.enforce(self.access, [call.entry])

    async def _channels(self, call: _ChannelsCall) -> dict[str, Any]:
        matches = channel_glob(call.pattern)
        channels: dict[str, int] = {}
        budget = CHANNELS_ANSWER_BYTES
        truncated = False
        for name, channel in list(self._hub.channels.by_name.items()):
            if not channel.members or not matches(name):
                continue
            budget -= len(name) + 16
            if budget < 0:
                truncated = True
                break
            channels[name] = len(channel.members)
        return {"channels": channels, "truncated": truncated}

    async def _emulation(self, call: _EmulationCall) -> int:
        request = EmulationRequest(node=self.node_id, session=call.session, data=call.data)
        return await self._hub.emulation.run_local(request)

    async def _reload_access(self) -> None:
        while True:
            await asyncio.sleep(self._hub.settings.access_reload)
            try:
                new = await self.access.reload()
            except EventcastError as exc:
                logger.warning("access entries not reloaded (the known ones stay): %s", exc)
                continue
            if new:
                self._hub.admin.enforce(self.access, new)
