"""Supervised background tasks: a failure is always reported, never lost.

The bus and the hub run their background work (readers, dispatchers, flushes,
catch-ups) through one :class:`Supervisor` each. A task that fails is logged
with its traceback and handed to the owner's failure callback; closing the
supervisor cancels every task and waits a bounded time for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

__all__ = ["Supervisor"]

#: How long :meth:`Supervisor.aclose` waits for cancelled tasks, in seconds.
CLOSE_TIMEOUT: Final = 5.0

FailureHandler = Callable[[asyncio.Task[Any], BaseException], None]


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
