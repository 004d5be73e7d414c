"""What every transport does with a client's commands and with the connection's liveness.

The WebSocket endpoint and the emulation endpoint (HTTP-streaming and SSE
connections, whose commands arrive in separate ``POST /emulation`` requests)
feed client frames to :func:`run_frame`, so a command means the same whatever
carried it. :func:`keep_alive` arms the timers every connection of the
Centrifuge protocol has: close a connection that does not send ``connect`` in
time (3502 "stale"), ping it every ``ping_interval`` and close it when no pong
comes back within ``pong_timeout`` (3012 "no pong"). Unidirectional
connections only get pings (their clients cannot answer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..protocol import codes
from ..protocol.codes import Disconnect
from .connection import Connection

if TYPE_CHECKING:
    from .config import Settings
    from .hub import Hub

__all__ = ["finish", "keep_alive", "run_frame", "run_frame_now", "take_message"]


def take_message(conn: Connection, data: bytes | str, limit: int) -> bool:
    """Count a client message in; ``False`` if it is over ``limit`` bytes (then closed, 1009)."""
    conn.messages_in += 1
    conn.bytes_in += len(data)
    if len(data) > limit:
        conn.close(Disconnect(codes.CLOSE_MESSAGE_TOO_BIG, "message too big"))
        return False
    return True


async def run_frame(hub: Hub, conn: Connection, data: bytes | str, limit: int) -> None:
    """Execute the commands of one client frame, in order, and queue their replies.

    A frame over ``limit`` bytes closes the connection with 1009 "message too
    big". Consecutive durable publishes of one frame run together, so they
    share a group commit (replies carry their ids). Live publishes never wait,
    so they run in line: the whole frame then reaches the channel's dispatcher
    as one batch.
    """
    pending = run_frame_now(hub, conn, data, limit)
    if pending is not None:
        await pending


def run_frame_now(
    hub: Hub, conn: Connection, data: bytes | str, limit: int
) -> Coroutine[Any, Any, None] | None:
    """:func:`run_frame` without a coroutine while its commands need no await.

    Returns ``None`` when the whole frame ran (a frame of publications into
    live channels, the common case), else the coroutine that runs the rest,
    from the first command that must be awaited (see :meth:`Hub.handle_now`).
    """
    if not take_message(conn, data, limit):
        return None
    requests = conn.session.receive(data)
    after, pending = _advance(hub, conn, requests, 0)
    if pending is None:
        conn.send_session_output()
        return None
    return _run_rest(hub, conn, requests, after, pending)


async def _run_rest(
    hub: Hub, conn: Connection, requests: list[Any], after: int, pending: Awaitable[Any]
) -> None:
    """Await ``pending``, then run a frame's commands from ``after`` on, in order."""
    rest: Awaitable[Any] | None = pending
    while rest is not None:
        await rest
        after, rest = _advance(hub, conn, requests, after)
    conn.send_session_output()


def _advance(
    hub: Hub, conn: Connection, requests: list[Any], i: int
) -> tuple[int, Awaitable[Any] | None]:
    """Run a frame's commands from ``i`` on while each is done at once.

    Stops at the first that must be awaited: returns the index after it (or
    after its group of durable publishes) and what to await; ``(len, None)``
    once every command ran.
    """
    session = conn.session
    while i < len(requests) and conn.is_open():
        request = requests[i]
        if not session.admit(request):
            conn.send_session_output()
            i += 1
            continue
        # (A frame's last command runs alone: handle_now awaits a durable publish too.)
        if i + 1 < len(requests) and _durable_publish(hub, request):
            group = [request]
            while (
                i + len(group) < len(requests)
                and _durable_publish(hub, requests[i + len(group)])
                and session.admit(requests[i + len(group)])
            ):
                group.append(requests[i + len(group)])
            if len(group) > 1:
                return i + len(group), asyncio.gather(*(hub.handle(conn, r) for r in group))
            return i + 1, hub.handle(conn, request)
        pending = hub.handle_now(conn, request)
        i += 1
        if pending is not None:
            return i, pending
    return i, None


def _durable_publish(hub: Hub, request: Any) -> bool:
    """Whether a command publishes into a durable channel (its publish awaits a commit)."""
    if request.method != "publish":
        return False
    channel = getattr(request.body, "channel", "")
    try:
        return bool(channel) and hub.bus.namespace(channel).durable
    except Exception:
        return False


def keep_alive(conn: Connection, settings: Settings, *, pongs: bool = True) -> Callable[[], None]:
    """Arm the stale timer and the pings of a connection; return what cancels them.

    ``pongs=False`` (unidirectional transports): ping without expecting pongs.
    """
    return _KeepAlive(conn, settings, pongs).cancel


class _KeepAlive:
    """A connection's stale timer and the one pending timer of its ping chain.

    One small object per connection (it lives as long as the connection), so
    its state is slots and its callbacks bound methods.
    """

    __slots__ = ("conn", "loop", "pongs", "settings", "stale_timer", "timer")

    def __init__(self, conn: Connection, settings: Settings, pongs: bool) -> None:
        self.conn = conn
        self.settings = settings
        self.pongs = pongs
        self.loop = asyncio.get_running_loop()
        self.stale_timer: asyncio.TimerHandle | None = self.loop.call_later(
            settings.handshake_timeout, self.stale
        )
        self.timer: asyncio.TimerHandle | None = None
        self.later(settings.ping_interval, self.ping)

    def later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        self.timer = self.loop.call_later(delay, callback, *args)

    def stale(self) -> None:
        self.stale_timer = None
        conn = self.conn
        if not conn.session.connected_state and not conn.closed:
            conn.close(codes.DISCONNECT_STALE)

    def ping(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        settings = self.settings
        if not conn.session.connected_state:
            self.later(settings.ping_interval, self.ping)
            return
        conn.session.ping()
        conn.send_session_output()
        if self.pongs:
            self.later(settings.pong_timeout, self.check_pong, conn.session.pongs)
        else:
            self.later(settings.ping_interval, self.ping)

    def check_pong(self, pongs_at_ping: int) -> None:
        conn = self.conn
        if conn.closed:
            return
        if conn.session.pongs == pongs_at_ping:
            conn.close(codes.DISCONNECT_NO_PONG)
            return
        settings = self.settings
        self.later(max(0.0, settings.ping_interval - settings.pong_timeout), self.ping)

    def cancel(self) -> None:
        for timer in (self.stale_timer, self.timer):
            if timer is not None:
                timer.cancel()
        self.stale_timer = self.timer = None


async def finish(conn: Connection, cancel: Callable[[], None]) -> None:
    """End an endpoint's connection: stop its timers, forget it if the peer left.

    Returning from an ASGI endpoint ends the connection: first let the close
    frame (or the end of the body) go out, for up to 5 seconds.
    """
    cancel()
    if not conn.closed:
        conn.lost()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await conn.wait_closed()
