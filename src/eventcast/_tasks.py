"""Supervised background tasks: a failure is always reported, never lost.

The bus and the hub run their background work (readers, dispatchers, flushes,
catch-ups) through one :class:`Supervisor` each. A task that fails is logged
with its traceback and handed to the owner's failure callback; closing the
supervisor cancels every task and waits a bounded time for them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import CoroutineType
from typing import Any, Final

__all__ = ["Supervisor", "release_unawaited"]

#: How long :meth:`Supervisor.aclose` waits for cancelled tasks, in seconds.
CLOSE_TIMEOUT: Final = 5.0

FailureHandler = Callable[[asyncio.Task[Any], BaseException], None]


def release_unawaited(pending: Awaitable[Any], task: asyncio.Task[Any] | None = None) -> None:
    """Release what a task was made to await, once the task is done (a done callback).

    A task cancelled before its first step (as at shutdown) runs none of its
    coroutine's code. What that coroutine was given to await would be left:
    a coroutine never awaited warns when collected, and a gathered group runs
    on. So a coroutine that never started is closed, with every coroutine and
    future among its arguments (the rest of a message holds the command it
    awaits first, which holds the publication it finishes), and a future is
    cancelled (its outcome taken: no one else awaits it). Once the task ran,
    what it awaited is done, and this changes nothing.
    """
    stack: list[object] = [pending]
    while stack:
        item = stack.pop()
        if isinstance(item, CoroutineType):
            frame = item.cr_frame
            if frame is not None and inspect.getcoroutinestate(item) == inspect.CORO_CREATED:
                stack.extend(frame.f_locals.values())
                item.close()
        elif isinstance(item, asyncio.Future) and item.cancel():
            item.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Take a cancelled future's outcome, so no one logs it as never retrieved."""
    if not future.cancelled():
        future.exception()


class Supervisor:
    """Owns a set of background tasks and reports each one's failure.

    Args:
        logger: where failures are logged (with their traceback).
        on_failure: called after logging with the task and its exception.
    """

    def __init__(self, logger: logging.Logger, on_failure: FailureHandler | None = None) -> None:
        self._logger = logger
        self._on_failure = on_failure
        #: The tasks still running.
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        name: str,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Task[Any]:
        """Run ``coro`` as a supervised task in the running loop and return it."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.watch(task, on_failure=on_failure)
        return task

    def watch(
        self, task: asyncio.Task[Any], *, on_failure: Callable[[BaseException], None] | None = None
    ) -> None:
        """Supervise a task created elsewhere."""
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None:
                return
            self._logger.error("background task %s failed", t.get_name(), exc_info=exc)
            if on_failure is not None:
                on_failure(exc)
            if self._on_failure is not None:
                self._on_failure(t, exc)

        task.add_done_callback(done)

    async def aclose(self, *, keep: asyncio.Task[Any] | None = None) -> None:
        """Cancel every task (but ``keep``) and wait up to :data:`CLOSE_TIMEOUT` for them.

        Bounded on purpose: a driver that swallows a cancellation must not
        hang a close. What is still running then is abandoned and logged.
        """
        tasks = [t for t in self.tasks if t is not keep]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: already reported when it finished
        if stuck:
            self._logger.warning("%d background tasks did not stop in time", len(stuck))
