"""``nats://``: publications over NATS core subjects.

Topic names map one to one onto subjects: ``prefix.<namespace>.<segments>``,
with ``~`` standing for "no namespace" (``~`` cannot appear in a topic name,
so no two topics share a subject). ``*`` and ``>`` are NATS's own wildcards
and keep their meaning, and the topic grammar forbids every other character
NATS treats specially, so a topic can never smuggle a wildcard into a subject.

nats-py reconnects and resubscribes by itself; the backplane reports the
transitions so the bus can catch up from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from ..exceptions import BackplaneError, ConfigurationError
from .base import Backplane, BackplaneState

__all__ = ["NATSBackplane", "subject_of"]

logger = logging.getLogger("eventcast.backplane")

#: Messages a NATS subscription may hold before nats-py reports a slow consumer.
PENDING_LIMIT = 1_000_000


def subject_of(prefix: str, topic_filter: str) -> str:
    """The NATS subject of a topic name or pattern."""
    namespace, sep, rest = topic_filter.partition(":")
    if not sep:
        namespace, rest = "~", topic_filter
    return f"{prefix}.{namespace}.{rest}"


class NATSBackplane(Backplane):
    """A :class:`Backplane` on NATS core publish/subscribe.

    Args:
        url: ``nats://host:4222`` (several comma-separated servers allowed) with
            an optional ``?prefix=`` (default ``eventcast``).
        connect_timeout: seconds to reach NATS when opening.
    """

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        super().__init__()
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("nats", "tls"):
            raise ConfigurationError(f"not a NATS URL: {url!r}")
        query = parse_qs(parts.query)
        self.prefix = (query.pop("prefix", ["eventcast"]) or ["eventcast"])[-1]
        self.servers = [
            urlunsplit((parts.scheme, netloc, "", "", "")) for netloc in parts.netloc.split(",")
        ]
        self.connect_timeout = connect_timeout
        self._nc: Any = None
        self._subs: dict[str, Any] = {}
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    async def open(self) -> None:
        if self.state is BackplaneState.CLOSED:
            raise BackplaneError("the backplane is closed")
        if self._nc is not None:
            return
        from nats.aio.client import Client as NATS
        from nats.errors import Error as NATSError, NoServersError

        async def disconnected() -> None:
            if self.state is not BackplaneState.CLOSED:
                logger.warning("NATS backplane lost its connection")
                self._set_state(BackplaneState.DISCONNECTED)

        async def reconnected() -> None:
            self.reconnects += 1
            logger.info("NATS backplane reconnected")
            self._set_state(BackplaneState.CONNECTED)

        async def error(exc: Exception) -> None:
            logger.warning("NATS backplane error: %s", exc)

        # nats-py retries the first connection forever when reconnects are
        # unlimited: bound it, so an unreachable server is an error at start.
        nc: Any = NATS()
        try:
            async with asyncio.timeout(self.connect_timeout * 2):
                await nc.connect(
                    servers=self.servers,
                    connect_timeout=self.connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                    pending_size=64 * 1024 * 1024,
                    no_echo=True,  # this node's own publications are delivered here already
                )
        except (NATSError, NoServersError, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            reason = str(exc) or type(exc).__name__
            raise BackplaneError(f"cannot reach NATS at {self.servers}: {reason}") from exc
        self._nc = nc
        self._set_state(BackplaneState.CONNECTED)
        for topic_filter in sorted(self.filters):
            await self._subscribe(topic_filter)

    async def close(self) -> None:
        if self.state is BackplaneState.CLOSED:
            return
        self.state = BackplaneState.CLOSED
        nc, self._nc = self._nc, None
        self._subs.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        from nats.errors import Error as NATSError

        nc = self._nc
        if nc is None or self.state is not BackplaneState.CONNECTED:
            self.failures += len(messages)
            raise BackplaneError("the NATS backplane is not connected")
        try:
            for topic, payload in messages:
                await nc.publish(subject_of(self.prefix, topic), payload)
        except (NATSError, OSError) as exc:
            self.failures += len(messages)
            raise BackplaneError(f"NATS publish failed: {exc}") from exc
        self.sent += len(messages)

    async def _subscribe(self, topic_filter: str) -> None:
        nc = self._nc
        if nc is None or topic_filter in self._subs:
            return

        async def on_message(msg: Any) -> None:
            self._buffer(msg.data)

        self._subs[topic_filter] = await nc.subscribe(
            subject_of(self.prefix, topic_filter),
            cb=on_message,
            pending_msgs_limit=PENDING_LIMIT,
            pending_bytes_limit=256 * 1024 * 1024,
        )

    def _buffer(self, payload: bytes) -> None:
        # nats-py calls back once per message; hand the bus batches instead,
        # flushed once per loop turn.
        self._pending.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        self._deliver(batch)

    async def subscribe(self, topic_filter: str) -> None:
        from nats.errors import Error as NATSError

        self.filters.add(topic_filter)
        try:
            await self._subscribe(topic_filter)
        except (NATSError, OSError) as exc:
            logger.warning("NATS subscribe to %r failed: %s", topic_filter, exc)

    async def unsubscribe(self, topic_filter: str) -> None:
        self.filters.discard(topic_filter)
        sub = self._subs.pop(topic_filter, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
