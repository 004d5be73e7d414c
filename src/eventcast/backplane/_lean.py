"""What the lean subscriber connections (Redis, NATS) share: liveness and closing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from ..exceptions import BackplaneError

__all__ = ["IDLE_PING", "close_transport", "watch_liveness"]

#: Seconds without traffic before a PING checks the connection.
IDLE_PING = 5.0


async def watch_liveness(
    protocol: Any, ping: Callable[[], None], engine: str, *, idle: float = IDLE_PING
) -> None:
    """Return only to raise: when the connection is lost or stops answering.

    ``protocol`` has ``lost`` (a future set on connection loss), ``activity``
    (bumped on every read) and ``replies`` (a queue the answer to ``ping()``
    lands in). Traffic counts as proof of life; an idle connection is pinged.

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
        while not protocol.replies.empty():
            protocol.replies.get_nowait()
        ping()
        try:
            async with asyncio.timeout(idle):
                await protocol.replies.get()
        except TimeoutError:
            raise BackplaneError(f"{engine} did not answer a PING") from None


def close_transport(protocol: Any) -> None:
    """Close a lean connection's transport. Idempotent."""
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.close()
