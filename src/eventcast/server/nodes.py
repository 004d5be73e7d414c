"""The other nodes: a table built from heartbeats, and requests every node answers.

Both travel on the backplane's control channel (see
:mod:`eventcast.backplane.base`), as JSON objects tagged by ``type``:

* ``heartbeat``: every ``heartbeat`` seconds each node sends its id and
  figures (:class:`NodeStats`). A node unheard of for ``node_timeout``
  seconds is dropped from the table; a node that stops gracefully says
  goodbye (``leaving``) and is dropped at once; a node that hears a node it
  did not know answers it with its own heartbeat, so a newcomer knows the
  cluster within a round trip.
* ``request``: an id and a call (opaque here: :mod:`eventcast.server.cluster`
  says what calls mean), sent to every node, or to one node by its id.
* ``answer``: sent to the requesting node alone, with the call's result or
  an error.

:meth:`NodeTable.ask` sends a request, runs the call here meanwhile, and waits
for the nodes of the table at most ``request_timeout`` seconds; the nodes that
did not answer in time (or failed) are named, never left out silently.
:meth:`NodeTable.ask_node` asks one node of the table the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from ..exceptions import BackplaneError, EventcastError

if TYPE_CHECKING:
    from ..bus import Bus

__all__ = [
    "MAX_HANDLING",
    "MAX_NODES",
    "MAX_PENDING",
    "Answers",
    "Node",
    "NodeStats",
    "NodeTable",
]

logger = logging.getLogger("eventcast.server")

_T = TypeVar("_T")

#: Most requests this node waits on at once (past it a new one fails at once).
MAX_PENDING: Final = 1000
#: Most requests of other nodes handled at once (past it they are answered "busy").
MAX_HANDLING: Final = 1000
#: Most other nodes in the table (heartbeats of more new nodes are ignored, logged once).
MAX_NODES: Final = 10_000


class NodeStats(msgspec.Struct, frozen=True):
    """One node's figures, as its heartbeat carries them."""

    name: str
    version: str
    uptime: int
    num_clients: int
    num_users: int
    num_channels: int
    num_subs: int


class _Heartbeat(msgspec.Struct, frozen=True, tag_field="type", tag="heartbeat"):
    node: str
    stats: NodeStats
    #: The node is stopping: drop it now.
    leaving: bool = False


class _Request(msgspec.Struct, frozen=True, tag_field="type", tag="request"):
    node: str
    id: int
    call: msgspec.Raw


class _Answer(msgspec.Struct, frozen=True, tag_field="type", tag="answer"):
    node: str
    id: int
    result: Any = None
    error: str | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Heartbeat | _Request | _Answer).decode


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


@dataclass(frozen=True, slots=True)
class Answers:
    """What the other nodes answered to a request.

    Attributes:
        results: the result of each node that answered without error, by uid.
        missing: the nodes that did not answer in time, or failed (``name (uid)``).
    """

    results: dict[str, Any]
    missing: list[str]


@dataclass(slots=True)
class _Pending:
    expected: dict[str, Node]
    answers: dict[str, _Answer] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self) -> None:
        if self.answers.keys() >= self.expected.keys():
            self.done.set()


Handler = Callable[[bytes], Awaitable[Any]]
Spawn = Callable[[Coroutine[Any, Any, Any], str], object]


async def _nothing() -> None:
    """What a request to one node runs here meanwhile: nothing."""


class NodeTable:
    """This node's table of the others, and its requests to them.

    Args:
        bus: the bus whose backplane carries the control channel.
        node_id: this node's id.
        stats: this node's figures now (sent in each heartbeat).
        handle: runs a call another node asked for; returns its JSON result
            (raises ``EventcastError`` to answer with an error).
        spawn: runs a supervised background task.
        heartbeat: seconds between heartbeats.
        node_timeout: seconds without a heartbeat after which a node is dropped.
        request_timeout: the longest wait for answers, in seconds.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        node_id: str,
        stats: Callable[[], NodeStats],
        handle: Handler,
        spawn: Spawn,
        heartbeat: float,
        node_timeout: float,
        request_timeout: float,
    ) -> None:
        self._bus = bus
        self.node_id = node_id
        self._stats = stats
        self._handle = handle
        self._spawn = spawn
        self.heartbeat = heartbeat
        self.node_timeout = node_timeout
        self.request_timeout = request_timeout
        #: The other live nodes, by id.
        self.nodes: dict[str, Node] = {}
        #: Control messages that did not decode (skipped), and requests refused (busy).
        self.undecodable = 0
        self.refused = 0
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._handling = 0
        self._full = False
        self._started = False

    def start(self) -> None:
        """Listen to the control channel and start the heartbeats."""
        self._bus.cluster_listeners.append(self._receive)
        self._started = True
        self._spawn(self._beat(), "eventcast-heartbeat")

    async def close(self) -> None:
        """Say goodbye to the other nodes; stop waiting for answers. Idempotent."""
        if self._started:
            self._started = False
            backplane = self._bus.backplane
            if backplane is not None and backplane.connected:
                goodbye = _Heartbeat(node=self.node_id, stats=self._stats(), leaving=True)
                # Sent straight, not queued: the bus closes its outbox next.
                with contextlib.suppress(BackplaneError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await backplane.publish_control(_encode(goodbye))
        for pending in self._pending.values():
            pending.done.set()

    def info(self) -> list[dict[str, Any]]:
        """Every live node, this one first: uid, name, version, uptime and counts."""
        rows = [(self.node_id, self._stats())]
        rows += sorted(((n.uid, n.stats) for n in self.nodes.values()), key=lambda r: r[1].name)
        return [{"uid": uid, **msgspec.structs.asdict(stats)} for uid, stats in rows]

    # -- heartbeats ------------------------------------------------------------------------

    async def _beat(self) -> None:
        while True:
            self._send(_Heartbeat(node=self.node_id, stats=self._stats()))
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
            self._send(_Heartbeat(node=self.node_id, stats=self._stats()), to=beat.node)

    # -- the control channel -----------------------------------------------------------------

    def _send(self, message: _Heartbeat | _Request | _Answer, to: str | None = None) -> None:
        self._bus.send_cluster(_encode(message), to)

    def _receive(self, payload: bytes) -> None:
        try:
            message = _decode(payload)
        except msgspec.DecodeError as exc:
            self.undecodable += 1
            logger.warning("skipping a control message: %s", exc)
            return
        if message.node == self.node_id or not self._started:
            return  # this node's own broadcast (engines echo them), or closed
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
        self._spawn(self._answer(request), "eventcast-cluster-request")

    async def _answer(self, request: _Request) -> None:
        answer: _Answer
        try:
            result = await self._handle(bytes(request.call))
            answer = _Answer(self.node_id, request.id, result=result)
        except EventcastError as exc:
            answer = _Answer(self.node_id, request.id, error=str(exc))
        except Exception:
            logger.exception("a cluster request failed")
            answer = _Answer(self.node_id, request.id, error="internal error")
        finally:
            self._handling -= 1
        self._send(answer, to=request.node)

    async def ask(
        self, call: bytes, local: Callable[[], Awaitable[_T]], what: str
    ) -> tuple[_T, Answers]:
        """Send ``call`` to every other node, run ``local`` here, and wait for their answers.

        Returns ``local``'s result and the other nodes' answers. The wait ends
        when every node of the table answered (or left it), or after
        ``request_timeout`` seconds; ``what`` names the request in the log.

        Raises:
            BackplaneError: :data:`MAX_PENDING` requests are already waiting.
        """
        expected = dict(self.nodes)
        if not expected:
            return await local(), Answers({}, [])
        result, pending = await self._request(expected, call, local, self.request_timeout)
        return result, self._answers(pending, what)

    async def ask_node(
        self, uid: str, call: bytes, what: str, *, timeout: float | None = None
    ) -> Answers:
        """Send ``call`` to the node ``uid`` alone and wait for its answer.

        Its result is ``results[uid]``. A node not in the table, or that did not
        answer within ``timeout`` seconds (default: ``request_timeout``), or
        failed, is in ``missing`` (the unknown one by its uid).

        Raises:
            BackplaneError: :data:`MAX_PENDING` requests are already waiting.
        """
        node = self.nodes.get(uid)
        if node is None:
            return Answers({}, [uid])
        wait = self.request_timeout if timeout is None else timeout
        _, pending = await self._request({uid: node}, call, _nothing, wait, to=uid)
        return self._answers(pending, what)

    async def _request(
        self,
        expected: dict[str, Node],
        call: bytes,
        local: Callable[[], Awaitable[_T]],
        timeout: float,
        *,
        to: str | None = None,
    ) -> tuple[_T, _Pending]:
        """Send a request (to every node, or one), run ``local`` meanwhile, await the answers."""
        if len(self._pending) >= MAX_PENDING:
            raise BackplaneError(f"{MAX_PENDING} cluster requests are already waiting")
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending(expected)
        try:
            self._send(_Request(self.node_id, request_id, msgspec.Raw(call)), to)
            result = await local()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await pending.done.wait()
        finally:
            del self._pending[request_id]
        return result, pending

    def _answers(self, pending: _Pending, what: str) -> Answers:
        results: dict[str, Any] = {}
        missing = [n.label for uid, n in pending.expected.items() if uid not in pending.answers]
        if missing:
            logger.warning("%s: no answer in time from %s", what, ", ".join(missing))
        for uid, answer in pending.answers.items():
            if answer.error is None:
                results[uid] = answer.result
                continue
            node = pending.expected.get(uid)
            label = node.label if node is not None else uid
            logger.warning("%s failed on node %s: %s", what, label, answer.error)
            missing.append(label)
        return Answers(results, missing)
