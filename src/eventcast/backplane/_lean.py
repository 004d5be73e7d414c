"""What the lean subscriber connections (Redis, NATS) share: pings, liveness and closing."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from ..exceptions import BackplaneError

__all__ = ["IDLE_PING", "Pings", "close_transport", "watch_liveness"]

#: Seconds without traffic before a PING checks the connection.
IDLE_PING = 5.0


class Pings:
    """The PINGs in flight on one connection, answered in the order they were sent.

    The server handles a connection's commands in order, so the answer to a
    PING proves every command sent before it (a ``SUBSCRIBE``, a ``SUB``) is
    in effect: :meth:`barrier` is how a subscribe waits for that, and the
    liveness watch pings through it too. Every answer resolves the oldest
    waiter; a lost connection fails them all.
    """

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None]] = deque()

    def answered(self) -> bool:
        """A PONG arrived: it answers the oldest PING. ``False`` if none was in flight.

        A PING whose waiter gave up (timed out) still takes its own answer, so
        a later barrier is never resolved by an earlier PING's.
        """
        if not self._waiting:
            return False
        waiter = self._waiting.popleft()
        if not waiter.done():
            waiter.set_result(None)
        return True

    def lost(self) -> None:
        """The connection is gone: every PING in flight fails."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(BackplaneError("the connection was lost"))
                waiter.exception()  # retrieved: nobody may be waiting any more

    async def barrier(self, ping: Callable[[], None], timeout: float, engine: str) -> None:
        """Send a PING with ``ping()`` and wait for its answer.

        Raises:
            BackplaneError: the connection is lost or did not answer in ``timeout``.
        """
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        ping()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise BackplaneError(f"{engine} did not answer a PING") from None


async def watch_liveness(
    protocol: Any, ping: Callable[[], None], engine: str, *, idle: float = IDLE_PING
) -> None:
    """Return only to raise: when the connection is lost or stops answering.

    ``protocol`` has ``lost`` (a future set on connection loss), ``activity``
    (bumped on every read) and ``pings`` (its :class:`Pings`; ``ping()``
    sends one). Traffic counts as proof of life; an idle connection is pinged.

    Raises:
        BackplaneError: the connection is lost, or a PING went unanswered.
    """
    while True:
        seen = protocol.activity
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(idle):
                await asyncio.shield(protocol.lost)
        if protocol.lost.done():
            raise BackplaneError(f"the {engine} subscriber connection was lost")
        if protocol.activity != seen:
            continue
        await protocol.pings.barrier(ping, idle, engine)


def close_transport(protocol: Any) -> None:
    """Close a lean connection's transport. Idempotent."""
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.close()
