"""``memory://``: a backplane inside one process.

With no shared :class:`MemoryBroker` it connects the bus to nothing (one node).
Several buses given the same broker behave like nodes on a real backplane,
which is handy in tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..topics import TopicMatcher
from .base import Backplane, BackplaneState

__all__ = ["MemoryBackplane", "MemoryBroker"]


class MemoryBroker:
    """An in-process broker shared by :class:`MemoryBackplane` instances."""

    def __init__(self) -> None:
        self.matcher = TopicMatcher()
        self.up = True
        #: The open backplanes by node id: who receives control messages.
        self.nodes: dict[str, MemoryBackplane] = {}

    def route(self, topic: str) -> list[MemoryBackplane]:
        return [bp for bp in self.matcher.match(topic) if isinstance(bp, MemoryBackplane)]


class MemoryBackplane(Backplane):
    """A backplane in process (optionally shared through a :class:`MemoryBroker`)."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        super().__init__()
        self.broker = broker

    async def open(self) -> None:
        if self.state is BackplaneState.CLOSED:
            return
        if self.broker is not None:
            self.broker.nodes[self.node_id] = self
        self._set_state(BackplaneState.CONNECTED)

    async def close(self) -> None:
        if self.broker is not None:
            for f in list(self.filters):
                self.broker.matcher.remove(f, self)
            if self.broker.nodes.get(self.node_id) is self:
                del self.broker.nodes[self.node_id]
        self.filters.clear()
        self.state = BackplaneState.CLOSED

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        self.sent += len(messages)
        broker = self.broker
        if broker is None:
            return
        loop = asyncio.get_running_loop()
        for topic, payload in messages:
            for target in broker.route(topic):
                if target is not self and target.connected:
                    loop.call_soon(target._deliver, [payload])

    async def publish_control(self, payload: bytes, node: str | None = None) -> None:
        self.sent += 1
        broker = self.broker
        if broker is None:
            return
        if node is None:
            targets = list(broker.nodes.values())
        else:
            target = broker.nodes.get(node)
            targets = [] if target is None else [target]
        loop = asyncio.get_running_loop()
        for target in targets:
            if target is not self and target.connected:
                loop.call_soon(target._deliver, [payload])

    async def subscribe(self, topic_filter: str) -> None:
        if topic_filter not in self.filters:
            self.filters.add(topic_filter)
            if self.broker is not None:
                self.broker.matcher.add(topic_filter, self)

    async def unsubscribe(self, topic_filter: str) -> None:
        if topic_filter in self.filters:
            self.filters.discard(topic_filter)
            if self.broker is not None:
                self.broker.matcher.remove(topic_filter, self)
