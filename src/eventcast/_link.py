"""The backplane link: this bus's publications out to other nodes, theirs in.

Outgoing publications wait in a bounded outbox and go out in batches from one
supervised task; a durable publication whose send failed is kept for the
reconnect (other nodes also catch up from the log). Incoming batches are
decoded once per publication and handed to the bus; control envelopes of a
topic (join, leave) go to the control listeners. A second task keeps the
backplane subscribed to exactly the filters that have local subscribers.

Messages of the control channel (admin actions, heartbeats, requests and
answers between nodes) wait in a small queue of their own, sent before the
publications, and arrive to the cluster listeners. The wire format belongs to
:mod:`eventcast.backplane.base`; what a control message means belongs to
:mod:`eventcast.server.cluster`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from .backplane.base import (
    KIND_CONTROL,
    Backplane,
    BackplaneState,
    decode_envelope,
    encode_envelope,
    is_control,
    own_prefix,
)
from .events import Event
from .exceptions import BackplaneError, EncodeError

__all__ = ["CONTROL_OUTBOX", "DEFAULT_OUTBOX", "MAX_CONTROL_BYTES", "BackplaneLink"]

logger = logging.getLogger("eventcast.bus")

#: Default bound of the queue of publications waiting for the backplane.
DEFAULT_OUTBOX: Final = 100_000
#: Most publications sent to the backplane in one call.
_BATCH: Final = 1000
#: Bound of the queue of control-channel messages waiting for the backplane
#: (the oldest is dropped and counted when full).
CONTROL_OUTBOX: Final = 10_000
#: The largest control-channel message accepted from or sent to the backplane, in
#: bytes (NATS refuses messages over its ``max_payload``, 1 MiB by default).
MAX_CONTROL_BYTES: Final = 512 * 1024
#: Longest wait, in seconds, for a new filter's subscription to take effect on the
#: backplane (each engine also bounds its own confirmation by its connect timeout).
ROUTE_TIMEOUT: Final = 10.0

Spawn = Callable[[Coroutine[Any, Any, Any], str], object]
ControlListener = Callable[[str, str, bytes], None]
ClusterListener = Callable[[bytes], None]


class BackplaneLink:
    """Connects a bus to a backplane.

    Args:
        backplane: the engine shared with other nodes.
        outbox: bound of the outgoing queue, in publications (the oldest is
            dropped and counted when full).
        spawn: runs a supervised background task.
        wanted: returns the filters with local subscribers.
        on_event: called with each publication from another node.
        on_up: called after the backplane (re)connected and what failed was queued again.
    """

    def __init__(
        self,
        backplane: Backplane,
        *,
        outbox: int,
        spawn: Spawn,
        wanted: Callable[[], set[str]],
        on_event: Callable[[Event], None],
        on_up: Callable[[], None],
    ) -> None:
        self.backplane = backplane
        self._outbox: deque[tuple[str, bytes, bool]] = deque()
        self._outbox_size = outbox
        self._retry: deque[tuple[str, bytes, bool]] = deque(maxlen=outbox)
        self._spawn = spawn
        self._wanted = wanted
        self._on_event = on_event
        self._on_up = on_up
        self._outbox_wake: asyncio.Event | None = None
        self._interest_wake: asyncio.Event | None = None
        self._own = own_prefix(backplane.node_id)
        self.open = False
        #: Called with ``(kind, topic, payload)`` for control messages from other nodes.
        self.control_listeners: list[ControlListener] = []
        #: Called with each message of the control channel (this node's own too,
        #: on engines that echo them: listeners skip those by content).
        self.cluster_listeners: list[ClusterListener] = []
        self._control: deque[tuple[str | None, bytes]] = deque()
        #: The filter whose backplane subscription is being made (not in effect yet).
        self._subscribing: str | None = None
        #: Who waits in :meth:`routed`, by filter.
        self._routing: dict[str, list[asyncio.Future[None]]] = {}
        #: Counters: outgoing publications dropped, incoming ones undecodable,
        #: control-channel messages dropped (queue full, too big, engine down).
        self.stats = {"outbox_dropped": 0, "undecodable": 0, "control_dropped": 0}

    async def start(self) -> None:
        """Connect and start the sender and the interest tasks.

        Raises:
            BackplaneError: the engine cannot be reached.
        """
        backplane = self.backplane
        backplane.on_messages = self._receive
        backplane.on_state = self._state_changed
        await backplane.open()
        self.open = True
        self._outbox_wake = asyncio.Event()
        self._interest_wake = asyncio.Event()
        self._interest_wake.set()
        self._spawn(self._send_outbox(), "eventcast-outbox")
        self._spawn(self._sync_interest(), "eventcast-interest")

    async def aclose(self) -> None:
        """Stop receiving and close the backplane. Idempotent."""
        self.open = False
        self._release_routing(None)
        await self.backplane.close()

    # -- outgoing ------------------------------------------------------------------

    def forward(self, event: Event) -> None:
        """Queue a local publication for the other nodes."""
        try:
            payload = encode_envelope(self.backplane.node_id, event)
        except EncodeError:
            return  # in-process only data: other nodes cannot receive it
        self._queue(event.topic, payload, event.offset is not None)

    def send_control(self, kind: str, topic: str, payload: bytes) -> None:
        """Send a control message (join, leave…) to the other nodes (best effort)."""
        event = Event(topic=topic, data=payload, tags={"kind": kind})
        self._queue(topic, encode_envelope(self.backplane.node_id, event, kind=KIND_CONTROL), False)

    def send_cluster(self, payload: bytes, node: str | None = None) -> None:
        """Queue a control-channel message for every node, or one node by id (best effort).

        Raises:
            ValueError: ``payload`` is not a JSON object.
        """
        if not is_control(payload):
            raise ValueError("a control-channel message is a JSON object")
        if len(payload) > MAX_CONTROL_BYTES:
            self.stats["control_dropped"] += 1
            logger.warning("a control message of %d bytes was not sent (too big)", len(payload))
            return
        if len(self._control) >= CONTROL_OUTBOX:
            self._control.popleft()
            self.stats["control_dropped"] += 1
        self._control.append((node, payload))
        wake = self._outbox_wake
        if wake is not None:
            wake.set()

    async def _send_control(self) -> None:
        while self._control:
            node, payload = self._control.popleft()
            try:
                await self.backplane.publish_control(payload, node)
            except BackplaneError as exc:
                # Lost: heartbeats are sent again, and who waits for an answer
                # names the nodes that did not answer.
                self.stats["control_dropped"] += 1
                logger.debug("control message not sent: %s", exc)

    def _queue(self, topic: str, payload: bytes, durable: bool) -> None:
        if len(self._outbox) >= self._outbox_size:
            self._outbox.popleft()
            self.stats["outbox_dropped"] += 1
        self._outbox.append((topic, payload, durable))
        wake = self._outbox_wake
        if wake is not None:
            wake.set()

    async def _send_outbox(self) -> None:
        wake = self._outbox_wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            await self._send_control()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(_BATCH, len(self._outbox)))]
                try:
                    await self.backplane.publish([(topic, payload) for topic, payload, _ in batch])
                except BackplaneError as exc:
                    # Durable publications are kept and sent again after the
                    # reconnect (other nodes also catch up from the log).
                    kept = [item for item in batch if item[2]]
                    self._retry.extend(kept)
                    self.stats["outbox_dropped"] += len(batch) - len(kept)
                    logger.debug("backplane publish failed: %s", exc)
                await self._send_control()  # queued meanwhile: before the next batch

    # -- interest ------------------------------------------------------------------

    def interest_changed(self) -> None:
        """The filters with local subscribers changed: update the subscriptions."""
        if self._interest_wake is not None:
            self._interest_wake.set()

    async def routed(self, topic_filter: str) -> None:
        """Wait until publications to ``topic_filter`` from other nodes reach this node.

        Called after subscribing locally: the backplane's subscription is
        made by the interest task, and an engine confirms it (a round trip)
        before this returns. Returns at once while the engine is down (its
        reconnect subscribes every wanted filter) or once the filter is no
        longer wanted.

        Raises:
            BackplaneError: the subscription did not take effect in
                :data:`ROUTE_TIMEOUT` seconds.
        """
        if (
            not self.open
            or self._is_routed(topic_filter)
            or self.backplane.state is not BackplaneState.CONNECTED
        ):
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._routing.setdefault(topic_filter, [])
        waiters.append(waiter)
        self.interest_changed()
        try:
            async with asyncio.timeout(ROUTE_TIMEOUT):
                await waiter
        except TimeoutError:
            raise BackplaneError(
                f"the backplane did not confirm the subscription to {topic_filter!r}"
            ) from None
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._routing.get(topic_filter) is waiters:
                del self._routing[topic_filter]

    def _is_routed(self, topic_filter: str) -> bool:
        """Whether the filter's backplane subscription is in effect.

        A backplane's ``subscribe`` adds the filter to its ``filters`` at once
        and returns once the engine confirmed it (or, while the engine is down,
        leaves it to the reconnect): so every filter there is in effect but the
        one being subscribed.
        """
        return topic_filter in self.backplane.filters and topic_filter != self._subscribing

    def _release_routing(self, wanted: set[str] | None) -> None:
        """Wake whoever waits on a routed filter or one not ``wanted`` (``None``: everyone)."""
        for topic_filter in list(self._routing):
            if wanted is None or self._is_routed(topic_filter) or topic_filter not in wanted:
                for waiter in self._routing.pop(topic_filter):
                    if not waiter.done():
                        waiter.set_result(None)

    async def _sync_interest(self) -> None:
        backplane = self.backplane
        wake = self._interest_wake
        assert wake is not None
        while True:
            await wake.wait()
            wake.clear()
            wanted = self._wanted()
            for topic_filter in sorted(wanted - backplane.filters):
                self._subscribing = topic_filter
                try:
                    await backplane.subscribe(topic_filter)  # returns once in effect
                finally:
                    self._subscribing = None
                if topic_filter in self._routing:
                    self._release_routing(wanted)
            for topic_filter in sorted(backplane.filters - wanted):
                await backplane.unsubscribe(topic_filter)
            self._release_routing(self._wanted())

    # -- incoming ------------------------------------------------------------------

    def _receive(self, payloads: Sequence[bytes]) -> None:
        """Hand a batch from the backplane to the bus (each decoded once)."""
        if not self.open:
            return
        own = self._own
        for payload in payloads:
            if payload.startswith(own):
                continue  # this node's own publication, already delivered here
            try:
                envelope, event = decode_envelope(payload)
            except BackplaneError as exc:
                # Told apart only when it is not an envelope: publications pay nothing.
                if is_control(payload):
                    self._cluster_message(payload)
                    continue
                self.stats["undecodable"] += 1
                logger.warning("skipping a backplane message: %s", exc)
                continue
            if envelope.kind == KIND_CONTROL:
                kind = event.tags.get("kind", "")
                data = event.data if isinstance(event.data, bytes) else event.encoded_data()
                for listener in list(self.control_listeners):
                    try:
                        listener(kind, event.topic, data)
                    except Exception:
                        logger.exception("a control listener failed")
                continue
            self._on_event(event)

    def _cluster_message(self, payload: bytes) -> None:
        listeners = self.cluster_listeners
        if not listeners or len(payload) > MAX_CONTROL_BYTES:
            self.stats["undecodable"] += 1
            why = "too big" if listeners else "no cluster layer handles it"
            logger.warning("skipping a backplane message: a control message (%s)", why)
            return
        for listener in list(listeners):
            try:
                listener(payload)
            except Exception:
                logger.exception("a cluster listener failed")

    def _state_changed(self, up: bool) -> None:
        if not up or not self.open:
            self._release_routing(None)  # nothing to wait for: the reconnect subscribes
            return
        if self._retry:
            for topic, payload, durable in self._retry:
                self._queue(topic, payload, durable)
            self._retry.clear()
        self._on_up()
