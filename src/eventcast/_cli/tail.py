"""``eventcast tail``: print live events from the hub's WebSocket, with the Python client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..events import EARLIEST, Event, Position
from ..exceptions import (
    ClientClosedError,
    ConfigurationError,
    EventcastError,
    HandshakeError,
    ReplyError,
    SubscriptionClosedError,
)
from .api import describe_network_error
from .common import EXIT_OK, EXIT_USAGE, fail, http_base
from .output import event_line, json_line

__all__ = ["handshake_message", "run_tail"]

_TOKEN_HINT = " (check --token or EVENTCAST_TOKEN)"


def handshake_message(base: str, exc: HandshakeError) -> str:
    """One line explaining why the first connection failed."""
    cause = exc.__cause__
    if isinstance(cause, ReplyError):
        hint = _TOKEN_HINT if cause.code in (101, 109) else ""
        return f"the hub closed the connection: {cause.message}{hint}"
    if exc.code is not None:
        text = str(exc)
        reason = text.rsplit(f"{exc.code}", 1)[-1].strip() if str(exc.code) in text else text
        hint = _TOKEN_HINT if "token" in reason or exc.code in (3500, 4500) else ""
        return f"the hub closed the connection: {reason or exc.code}{hint}"
    if cause is not None:
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status is not None:
            return f"the hub at {base} refused the WebSocket (HTTP {status})"
        return f"cannot reach the hub at {base}: {describe_network_error(cause)}"
    return f"cannot connect to the hub at {base}: {exc}"


async def run_tail(
    url: str,
    patterns: Sequence[str],
    *,
    token: str,
    since: Position | str | None,
    as_json: bool,
    count: int,
    out: Console,
    err: Console,
    timeout: float = 10.0,
) -> int:
    """Subscribe to every pattern and print events until ``count`` (0: forever) or Ctrl-C."""
    from ..client import connect

    base = http_base(url)
    try:
        client = connect(base, token=token, name="eventcast-cli", timeout=timeout)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        await client.start()
    except HandshakeError as exc:
        fail(handshake_message(base, exc))
    queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()

    async def pump(sub: Any) -> None:
        try:
            async for event in sub:
                queue.put_nowait(event)
        except EventcastError as exc:
            queue.put_nowait(exc)

    tasks: list[asyncio.Task[None]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for pattern in patterns:
                try:
                    sub = await stack.enter_async_context(
                        client.subscribe(pattern, since=since, on_lost="continue")
                    )
                except ReplyError as exc:
                    hint = ""
                    if since == EARLIEST and exc.code == 103:
                        hint = (
                            " (--since earliest reads the history first: it needs that right too)"
                        )
                    fail(f"cannot subscribe to {pattern!r}: the hub answered {exc}{hint}")
                except ClientClosedError as exc:
                    fail(_closed_message(exc))
                if since is not None and not sub.recovered:
                    err.print(
                        f"[yellow]note:[/] could not resume {escape(pattern)} from "
                        f"{escape(_since_text(since))}; showing events from now on"
                    )
                tasks.append(asyncio.ensure_future(pump(sub)))
            names = ", ".join(patterns)
            err.print(f"[dim]tailing {escape(names)} on {escape(base)} (Ctrl-C to stop)[/]")
            seen = 0
            while count <= 0 or seen < count:
                item = await queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, ClientClosedError):
                        fail(_closed_message(item))
                    if isinstance(item, SubscriptionClosedError):
                        fail(f"the subscription ended: {item}")
                    fail(str(item))
                seen += 1
                if as_json:
                    json_line(
                        {
                            "topic": item.topic,
                            "offset": item.offset,
                            "epoch": item.epoch,
                            "data": item.data,
                        }
                    )
                else:
                    out.print(event_line(item.topic, item.offset, item.epoch, item.data, item.time))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    return EXIT_OK


def _closed_message(exc: ClientClosedError) -> str:
    if exc.code is not None:
        reason = exc.reason or str(exc)
        return f"the hub closed the connection: {reason} ({exc.code})"
    return f"the connection to the hub ended: {exc}"


def _since_text(since: Position | str) -> str:
    return f"{since.offset}:{since.epoch}" if isinstance(since, Position) else since
