"""The cluster: the nodes sharing a backplane, and every action and answer that spans them.

Publications reach every node through the backplane's topics; everything
else crosses the backplane's *control channel* (see
:mod:`eventcast.backplane.base`), which every node receives from start:

* **Heartbeats.** Every ``cluster_heartbeat`` seconds each node sends its
  name, uptime, version and its numbers of clients, users, channels and
  subscriptions. The node table is built from them: a node unheard of for
  ``cluster_node_timeout`` seconds is dropped, and a node that stops
  gracefully says goodbye, so the others drop it at once. A node that hears
  a node it did not know answers with its own heartbeat, so a new node
  knows the cluster within a round trip. ``info`` lists every live node.
* **Requests.** A request goes to every node with an id; each node answers
  the requesting node alone. The requester waits for the nodes of its table,
  at most ``cluster_request_timeout`` seconds, and names the nodes that did
  not answer in time rather than leaving them out silently.
* **Actions.** ``disconnect``, ``unsubscribe``, ``subscribe``, ``refresh``,
  ``send_message`` and the access entries (``block_user``, ``revoke_token``,
  …) are requests: every node applies the action to its own connections
  (:class:`~eventcast.server.admin.Admin`) and answers how many it reached,
  so an action answers for the whole cluster, whichever node received it.
* **Channels.** ``channels`` is a request too; the answers are summed per
  channel.
* **Connections per user.** Each connection of a user is an entry of the
  presence store under ``~user:<user>`` (a name outside the topic grammar),
  refreshed like presence and removed on close. Before admitting a
  connection, a node counts the user's live entries. A node checks and
  claims one connection of a user at a time, so the limit can be exceeded
  only by connections of the same user admitted at the same moment on
  different nodes: by at most the number of nodes minus one.

With the ``memory://`` backplane there is one node: actions and answers
cover it alone, at once.

The wire messages are JSON objects (msgspec structs tagged by ``type``), at
most :data:`~eventcast._link.MAX_CONTROL_BYTES` each; a message that does not
decode is counted and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import msgspec

from .._urls import pop_option
from ..backplane.base import new_node_id
from ..events import encode_data
from ..exceptions import BackplaneError, EventcastError
from ..protocol import codes
from ..protocol.codes import Disconnect
from .access import Access, AccessEntry, Key, open_access_store
from .errors import CommandError

if TYPE_CHECKING:
    from .config import Settings
    from .connection import Connection
    from .hub import Hub

__all__ = [
    "MAX_HANDLING",
    "MAX_NODES",
    "MAX_PENDING",
    "USER_CONNECTIONS",
    "ChannelsAnswer",
    "Cluster",
    "Outcome",
    "access_store_url",
    "channel_glob",
]

logger = logging.getLogger("eventcast.server")

#: Most requests this node waits on at once (past it a new one fails at once).
MAX_PENDING: Final = 1000
#: Most requests of other nodes handled at once (past it they are answered "busy").
MAX_HANDLING: Final = 1000
#: Most other nodes in the table (heartbeats of more new nodes are ignored, logged once).
MAX_NODES: Final = 10_000
#: The presence "channel" listing a user's connections on every node (``~`` is
#: outside the topic grammar: no channel can collide with it).
USER_CONNECTIONS: Final = "~user:"
#: How many bytes of channel names one node answers ``channels`` with at most.
CHANNELS_ANSWER_BYTES: Final = 256 * 1024
#: The longest ``channels`` pattern accepted, in characters.
MAX_PATTERN: Final = 1024


# -- what travels on the control channel ---------------------------------------------------


class NodeStats(msgspec.Struct, frozen=True):
    """One node's figures, as its heartbeat carries them."""

    name: str
    version: str
    uptime: int
    num_clients: int
    num_users: int
    num_channels: int
    num_subs: int


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


Call = (
    _DisconnectCall
    | _UnsubscribeCall
    | _SubscribeCall
    | _RefreshCall
    | _MessageCall
    | _AccessCall
    | _ChannelsCall
)


class _Heartbeat(msgspec.Struct, frozen=True, tag_field="type", tag="heartbeat"):
    node: str
    stats: NodeStats
    #: The node is stopping: drop it now.
    leaving: bool = False


class _Request(msgspec.Struct, frozen=True, tag_field="type", tag="request"):
    node: str
    id: int
    call: Call


class _Answer(msgspec.Struct, frozen=True, tag_field="type", tag="answer"):
    node: str
    id: int
    result: Any = None
    error: str | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Heartbeat | _Request | _Answer).decode


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


@dataclass(slots=True)
class Node:
    """Another node, as its last heartbeat described it."""

    uid: str
    stats: NodeStats
    #: When its last heartbeat arrived (the event loop's clock).
    seen: float

    @property
    def label(self) -> str:
        """``name (uid)``: how answers name the node."""
        return f"{self.stats.name} ({self.uid})"


@dataclass(slots=True)
class _Pending:
    expected: dict[str, Node]
    answers: dict[str, _Answer] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        if self.answers.keys() >= self.expected.keys():
            self.done.set()


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


class _UserLocks:
    """One lock per user being admitted on this node (dropped when nobody holds it)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, user: str) -> Any:
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


class Cluster:
    """This node's view of the cluster, and actions that reach every node.

    Args:
        hub: the hub of this node (its settings, bus, connections and tasks).
    """

    def __init__(self, hub: Hub) -> None:
        settings = hub.settings
        self._hub = hub
        backplane = hub.bus.backplane
        #: This node's id (the backplane's, so every node sees the same one).
        self.node_id = backplane.node_id if backplane is not None else new_node_id()
        #: Seconds between heartbeats; a node unheard of for ``node_timeout`` is dropped.
        self.heartbeat = settings.cluster_heartbeat
        self.node_timeout = settings.cluster_node_timeout
        #: The longest wait for other nodes' answers, in seconds.
        self.request_timeout = settings.cluster_request_timeout
        url, prefix = access_store_url(settings)
        #: Blocked users and revoked tokens, as every node knows them.
        self.access = Access(open_access_store(url, prefix=prefix))
        #: The other live nodes, by id.
        self.nodes: dict[str, Node] = {}
        #: Control messages that did not decode (skipped), and requests refused (busy).
        self.undecodable = 0
        self.refused = 0
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._handling = 0
        self._counted: dict[str, str] = {}  # client id -> user, for connections_per_user
        self._user_locks = _UserLocks()
        self._admit_failing = False
        self._full = False
        self._started = False
        self._handlers: dict[type[_Call], Callable[[Any], Awaitable[Any]]] = {
            _DisconnectCall: self._disconnect,
            _UnsubscribeCall: self._unsubscribe,
            _SubscribeCall: self._subscribe,
            _RefreshCall: self._refresh,
            _MessageCall: self._message,
            _AccessCall: self._access,
            _ChannelsCall: self._channels,
        }

    @property
    def shared(self) -> bool:
        """Whether other nodes may exist (the hub's bus has a backplane)."""
        return self._hub.bus.backplane is not None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the access entries, then start heartbeats and reloads.

        Raises:
            EventcastError: the access store cannot be read (a node that
                cannot tell who is blocked does not start).
        """
        hub = self._hub
        await self.access.open()
        hub.bus.cluster_listeners.append(self._receive)
        self._started = True
        hub.tasks.spawn(self._beat(), "eventcast-heartbeat")
        hub.tasks.spawn(self._reload_access(), "eventcast-access-reload")
        if self.shared:
            hub.tasks.spawn(
                hub.presence_keeper.refresh(self._user_entries), "eventcast-user-connections"
            )

    async def close(self) -> None:
        """Say goodbye to the other nodes and close the access store. Idempotent."""
        if self._started:
            self._started = False
            backplane = self._hub.bus.backplane
            if backplane is not None and backplane.connected:
                goodbye = _Heartbeat(node=self.node_id, stats=self.stats(), leaving=True)
                # Sent straight, not queued: the bus closes its outbox next.
                with contextlib.suppress(BackplaneError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await backplane.publish_control(_encode(goodbye))
        for pending in self._pending.values():
            pending.done.set()
        await self.access.store.close()

    # -- the node table --------------------------------------------------------------------

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
        rows = [(self.node_id, self.stats())]
        rows += sorted(((n.uid, n.stats) for n in self.nodes.values()), key=lambda r: r[1].name)
        return [{"uid": uid, **msgspec.structs.asdict(stats)} for uid, stats in rows]

    async def _beat(self) -> None:
        while True:
            self._send(_Heartbeat(node=self.node_id, stats=self.stats()))
            self._sweep()
            await asyncio.sleep(self.heartbeat)

    def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        for node in [n for n in self.nodes.values() if now - n.seen > self.node_timeout]:
            logger.warning("node %s dropped: no heartbeat for %.1fs", node.label, self.node_timeout)
            self._drop(node.uid)

    def _drop(self, uid: str) -> None:
        self.nodes.pop(uid, None)
        for pending in self._pending.values():
            if pending.expected.pop(uid, None) is not None:
                pending.settle()

    def _heard(self, beat: _Heartbeat) -> None:
        if beat.leaving:
            node = self.nodes.get(beat.node)
            if node is not None:
                logger.info("node %s left", node.label)
                self._drop(beat.node)
            return
        known = beat.node in self.nodes
        if not known and len(self.nodes) >= MAX_NODES:
            if not self._full:
                logger.error("%d nodes are known: heartbeats of new ones are ignored", MAX_NODES)
            self._full = True
            return
        self._full = False
        self.nodes[beat.node] = Node(beat.node, beat.stats, asyncio.get_running_loop().time())
        if not known:
            logger.info("node %s (%s) joined", beat.stats.name, beat.node)
            # Tell the newcomer about this node now, not at the next heartbeat.
            self._send(_Heartbeat(node=self.node_id, stats=self.stats()), to=beat.node)

    # -- the control channel -----------------------------------------------------------------

    def _send(self, message: _Heartbeat | _Request | _Answer, to: str | None = None) -> None:
        self._hub.bus.send_cluster(_encode(message), to)

    def _receive(self, payload: bytes) -> None:
        try:
            message = _decode(payload)
        except msgspec.DecodeError as exc:
            self.undecodable += 1
            logger.warning("skipping a control message: %s", exc)
            return
        if message.node == self.node_id or not self._started:
            return  # this node's own broadcast (engines echo them)
        if isinstance(message, _Heartbeat):
            self._heard(message)
        elif isinstance(message, _Request):
            self._requested(message)
        else:
            pending = self._pending.get(message.id)
            if pending is not None:
                pending.answers[message.node] = message
                pending.settle()

    def _requested(self, request: _Request) -> None:
        if self._handling >= MAX_HANDLING:
            self.refused += 1
            self._send(_Answer(self.node_id, request.id, error="busy"), to=request.node)
            return
        self._handling += 1
        self._hub.tasks.spawn(self._answer(request), "eventcast-cluster-request")

    async def _answer(self, request: _Request) -> None:
        answer: _Answer
        try:
            result = await self._handlers[type(request.call)](request.call)
            answer = _Answer(self.node_id, request.id, result=result)
        except EventcastError as exc:
            answer = _Answer(self.node_id, request.id, error=str(exc))
        except Exception:
            logger.exception("a cluster request (%s) failed", type(request.call).__name__)
            answer = _Answer(self.node_id, request.id, error="internal error")
        finally:
            self._handling -= 1
        self._send(answer, to=request.node)

    async def _ask(self, call: Call, local: Callable[[], Awaitable[Any]]) -> tuple[Any, _Pending]:
        """Send ``call`` to every other node, run ``local`` here, wait for the answers."""
        expected = dict(self.nodes)
        if not expected:
            return await local(), _Pending(expected)
        if len(self._pending) >= MAX_PENDING:
            raise BackplaneError(f"{MAX_PENDING} cluster requests are already waiting")
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending(expected)
        try:
            self._send(_Request(self.node_id, request_id, call))
            result = await local()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.request_timeout):
                    await pending.done.wait()
        finally:
            del self._pending[request_id]
        return result, pending

    def _missing(self, pending: _Pending, what: str) -> list[str]:
        missing = [n.label for uid, n in pending.expected.items() if uid not in pending.answers]
        for uid, answer in pending.answers.items():
            if answer.error is not None:
                node = pending.expected.get(uid)
                label = node.label if node is not None else uid
                logger.warning("%s failed on node %s: %s", what, label, answer.error)
                missing.append(label)
        if missing:
            logger.warning("%s: no answer in time from %s", what, ", ".join(missing))
        return missing

    async def _act(self, call: Call) -> Outcome:
        handler = self._handlers[type(call)]
        count, pending = await self._ask(call, lambda: handler(call))
        for answer in pending.answers.values():
            if answer.error is None and isinstance(answer.result, int):
                count += answer.result
        return Outcome(count, self._missing(pending, str(call.__struct_config__.tag)))

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
        """Close a user's connections on every node (see :meth:`Admin.select`)."""
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
        local, pending = await self._ask(call, lambda: self._channels(call))
        channels: dict[str, int] = dict(local["channels"])
        truncated: bool = local["truncated"]
        for answer in pending.answers.values():
            result = answer.result
            if answer.error is not None or not isinstance(result, dict):
                continue
            truncated = truncated or bool(result.get("truncated"))
            for name, count in (result.get("channels") or {}).items():
                if isinstance(name, str) and isinstance(count, int):
                    channels[name] = channels.get(name, 0) + count
        return ChannelsAnswer(channels, self._missing(pending, "channels"), truncated)

    # -- what each node does -------------------------------------------------------------------

    async def _disconnect(self, call: _DisconnectCall) -> int:
        disconnect = Disconnect(call.code, call.reason)
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

    # -- connections per user ------------------------------------------------------------------

    async def admit(self, conn: Connection) -> None:
        """Count ``conn`` among its user's connections on every node, or refuse it.

        On one node the registry's count is the whole count. Across nodes,
        the user's entries in the presence store are counted; a store that
        fails lets the connection in (logged): the limit is a quota, not a
        lock.

        Raises:
            CommandError: 3504, the user has ``connections_per_user``
                connections in the cluster already.
        """
        if not self.shared or not conn.user:
            return
        hub = self._hub
        key = USER_CONNECTIONS + conn.user
        async with self._user_locks.hold(conn.user):
            try:
                count = len(await hub.presence.get(key))
                if count >= hub.settings.connections_per_user:
                    raise CommandError(codes.DISCONNECT_CONNECTION_LIMIT)
                await hub.presence_keeper.add(key, conn)
            except CommandError:
                raise
            except EventcastError as exc:
                if not self._admit_failing:  # once per outage, not once per connection
                    logger.warning("connections_per_user not checked across nodes: %s", exc)
                self._admit_failing = True
                return
            if self._admit_failing:
                logger.info("connections_per_user checked across nodes again")
                self._admit_failing = False
            self._counted[conn.id] = conn.user
        if conn.closed:  # gone while waiting: nothing to admit
            self.forget(conn)
            raise CommandError(codes.DISCONNECT_CONNECTION_CLOSED)

    def forget(self, conn: Connection) -> None:
        """A connection closed: stop counting it among its user's connections."""
        user = self._counted.pop(conn.id, None)
        if user is not None:
            self._hub.tasks.spawn(
                self._hub.presence_keeper.remove(USER_CONNECTIONS + user, conn.id),
                "eventcast-user-connection-remove",
            )

    def _user_entries(self) -> Iterator[tuple[str, Connection]]:
        connections = self._hub.registry.connections
        for client, user in list(self._counted.items()):
            conn = connections.get(client)
            if conn is not None and not conn.closed:
                yield USER_CONNECTIONS + user, conn
