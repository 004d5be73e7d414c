"""Waiting for events with a timeout and a clear failure message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, Protocol

from ..events import Event

__all__ = ["DEFAULT_WAIT", "assert_received", "collect", "wait_for_publication"]

#: Seconds the helpers wait by default: a safety net for a test that would
#: otherwise hang, never a synchronisation device.
DEFAULT_WAIT: Final = 5.0


class _EventSource(Protocol):
    """Anything iterated for events: a client or a bus subscription."""

    def __aiter__(self) -> AsyncIterator[Event]: ...


def _name(source: object) -> str:
    for attribute in ("channel", "topics", "id"):
        value = getattr(source, attribute, None)
        if value:
            return repr(value)
    return repr(source)


async def wait_for_publication(
    source: _EventSource,
    *,
    timeout: float = DEFAULT_WAIT,
    where: Callable[[Event], bool] | None = None,
) -> Event:
    """Return the next event of a subscription (the next one for which ``where`` is true).

    Works with the client's subscriptions and the bus's. Events for which
    ``where`` is false are consumed and skipped.

    Raises:
        AssertionError: no (matching) event within ``timeout`` seconds; the
            message names the subscription and what was skipped.
    """
    skipped: list[Event] = []
    iterator = source.__aiter__()
    try:
        async with asyncio.timeout(timeout):
            while True:
                event = await anext(iterator)
                if where is None or where(event):
                    return event
                skipped.append(event)
    except TimeoutError:
        detail = ""
        if skipped:
            shown = ", ".join(repr(e.data) for e in skipped[:5])
            detail = f"; skipped {len(skipped)} not matching: {shown}"
        raise AssertionError(
            f"no publication on {_name(source)} within {timeout} s{detail}"
        ) from None
    except StopAsyncIteration:
        raise AssertionError(f"the subscription {_name(source)} ended") from None


async def collect(
    source: _EventSource, count: int, *, timeout: float = DEFAULT_WAIT
) -> list[Event]:
    """Return the next ``count`` events of a subscription.

    Raises:
        AssertionError: fewer arrived within ``timeout`` seconds (the message
            lists those that did).
    """
    events: list[Event] = []
    iterator = source.__aiter__()
    try:
        async with asyncio.timeout(timeout):
            while len(events) < count:
                events.append(await anext(iterator))
    except TimeoutError:
        raise AssertionError(
            f"{_name(source)} received {len(events)} of {count} events within {timeout} s: "
            f"{[e.data for e in events]!r}"
        ) from None
    except StopAsyncIteration:
        raise AssertionError(
            f"the subscription {_name(source)} ended after {len(events)} of {count} events"
        ) from None
    return events


async def assert_received(
    source: _EventSource,
    expected: Sequence[Any],
    *,
    timeout: float = DEFAULT_WAIT,
    key: Callable[[Event], Any] = lambda event: event.data,
) -> list[Event]:
    """Check that the next events of a subscription are ``expected``, in order; return them.

    Args:
        source: the subscription.
        expected: what ``key(event)`` of each next event must equal (by
            default the event's data).
        timeout: seconds to wait for all of them.
        key: what to compare of each event (``lambda e: e.offset``, ...).

    Raises:
        AssertionError: they differ (the message shows both sequences and the
            first difference), or fewer arrived in time.
    """
    events = await collect(source, len(expected), timeout=timeout)
    got = [key(event) for event in events]
    if got != list(expected):
        first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        raise AssertionError(
            f"{_name(source)} received an unexpected sequence (first difference at index "
            f"{first}: {got[first]!r} != {expected[first]!r}):\n  got:      {got!r}\n"
            f"  expected: {list(expected)!r}"
        )
    return events
