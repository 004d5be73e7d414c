"""``nats://``: publications over NATS core subjects.

Topic names map one to one onto subjects: ``prefix.<namespace>.<segments>``,
with ``~`` standing for "no namespace" (``~`` cannot appear in a topic name,
so no two topics share a subject). ``*`` and ``>`` are NATS's own wildcards
and keep their meaning, and the topic grammar forbids every other character
NATS treats specially, so a topic can never smuggle a wildcard into a subject.

Publishing uses nats-py. Subscribing uses a lean reader of eventcast's own
(``_nats_sub``: the core protocol's ``MSG`` frames split per socket read and
handed to the bus in one batch), which reconnects with a logged backoff,
resubscribes every filter, and reports the outage so the bus catches up from
the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .._urls import pop_option, redact_password
from ..exceptions import BackplaneError, ConfigurationError
from ._nats_sub import LeanNATSSub
from .base import CONTROL_CHANNEL, Backplane, BackplaneState

__all__ = ["NATSBackplane", "subject_of"]

logger = logging.getLogger("eventcast.backplane")


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
            raise ConfigurationError(f"not a NATS URL: {redact_password(url)!r}")
        self.prefix = pop_option(url, "prefix")[1] or "eventcast"
        self.servers = [
            urlunsplit((parts.scheme, netloc, "", "", "")) for netloc in parts.netloc.split(",")
        ]
        self.connect_timeout = connect_timeout
        self._nc: Any = None
        self._sub: LeanNATSSub | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self.state is BackplaneState.CLOSED:
            raise BackplaneError("the backplane is closed")
        if self._nc is not None:
            return
        from nats.aio.client import Client as NATS
        from nats.errors import Error as NATSError, NoServersError

        async def disconnected() -> None:
            if not self.is_closed():
                logger.warning("NATS backplane: the publishing connection dropped")

        async def reconnected() -> None:
            logger.info("NATS backplane: the publishing connection is back")

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
            self._sub = await self._connect_subscriber()
        except (NATSError, NoServersError, OSError, TimeoutError, BackplaneError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            reason = str(exc) or type(exc).__name__
            raise BackplaneError(f"cannot reach NATS at {self.servers}: {reason}") from exc
        self._nc = nc
        self._set_state(BackplaneState.CONNECTED)
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name="eventcast-nats-backplane"
        )

    def _control_subject(self, node: str | None = None) -> str:
        # Two tokens: a topic's subject has three or more, and no namespace is "~…".
        if node is None:
            return f"{self.prefix}.{CONTROL_CHANNEL}"
        return f"{self.prefix}.~node.{node}"

    async def _connect_subscriber(self) -> LeanNATSSub:
        """Open the subscriber connection (first reachable server) and subscribe everything."""
        error: BackplaneError | None = None
        for server in self.servers:
            try:
                sub = await LeanNATSSub.connect(
                    server, timeout=self.connect_timeout, deliver=self._deliver
                )
            except BackplaneError as exc:
                error = exc
                continue
            await sub.subscribe(self._control_subject())
            await sub.subscribe(self._control_subject(self.node_id))
            for topic_filter in sorted(self.filters):
                await sub.subscribe(subject_of(self.prefix, topic_filter))
            try:
                await sub.barrier(self.connect_timeout)  # every SUB in effect
            except BackplaneError as exc:
                await sub.aclose()
                error = exc
                continue
            return sub
        assert error is not None
        raise error

    async def _watch(self) -> None:
        """Watch the subscriber connection; reconnect with backoff and report outages."""
        attempt = 0
        while not self.is_closed():
            sub = self._sub
            try:
                if sub is None:
                    raise BackplaneError("no subscriber connection")
                attempt = 0
                await sub.watch()  # messages flow to the bus meanwhile
            except BackplaneError as exc:
                if self.is_closed():
                    return
                if self.state is BackplaneState.CONNECTED:
                    logger.warning("NATS backplane lost its connection: %s", exc)
                    self._set_state(BackplaneState.DISCONNECTED)
                if sub is not None:
                    await sub.aclose()
                self._sub = None
                attempt += 1
                delay = min(5.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                logger.info("NATS backplane reconnecting in %.2fs (attempt %d)", delay, attempt)
                await asyncio.sleep(delay)
                try:
                    self._sub = await self._connect_subscriber()
                except BackplaneError as failed:
                    logger.info("NATS backplane reconnection failed: %s", failed)
                    continue
                self.reconnects += 1
                logger.info(
                    "NATS backplane reconnected; %d filters resubscribed", len(self.filters)
                )
                self._set_state(BackplaneState.CONNECTED)

    async def close(self) -> None:
        if self.state is BackplaneState.CLOSED:
            return
        self.state = BackplaneState.CLOSED
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.aclose()
        nc, self._nc = self._nc, None
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

    async def publish_control(self, payload: bytes, node: str | None = None) -> None:
        from nats.errors import Error as NATSError

        nc = self._nc
        if nc is None or self.state is not BackplaneState.CONNECTED:
            self.failures += 1
            raise BackplaneError("the NATS backplane is not connected")
        try:
            await nc.publish(self._control_subject(node), payload)
        except (NATSError, OSError) as exc:
            self.failures += 1
            raise BackplaneError(f"NATS publish failed: {exc}") from exc
        self.sent += 1

    async def subscribe(self, topic_filter: str) -> None:
        self.filters.add(topic_filter)
        sub = self._sub
        if sub is None:
            return  # subscribed on (re)connect
        try:
            await sub.subscribe(subject_of(self.prefix, topic_filter))
            # Returns once the SUB is in effect: a publication sent after
            # this, from any node, reaches this one.
            await sub.barrier(self.connect_timeout)
        except BackplaneError as exc:
            logger.warning("NATS subscribe to %r deferred to reconnect: %s", topic_filter, exc)

    async def unsubscribe(self, topic_filter: str) -> None:
        self.filters.discard(topic_filter)
        sub = self._sub
        if sub is not None:
            with contextlib.suppress(BackplaneError):
                await sub.unsubscribe(subject_of(self.prefix, topic_filter))
