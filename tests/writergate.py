"""Hold an SQLite log's writer thread inside a commit, for tests of what happens meanwhile."""

from __future__ import annotations

import asyncio
import threading

from eventcast.log import Retention
from eventcast.log.base import EventLog

#: Longest a held writer waits (a guard: every test releases it sooner).
HOLD = 30.0


class WriterGate:
    """Holds ``log``'s writer in its next commit until :meth:`release`.

    The writer asks the retention policy for each topic it commits to, on its
    own thread, inside the transaction: that is where it waits. The log keeps
    its policy (the bus's namespaces' limits, say) otherwise.
    """

    def __init__(self, log: EventLog) -> None:
        self._gate = threading.Event()
        self._entered = threading.Event()
        policy = log._retention

        def held(topic: str) -> Retention:
            self._entered.set()
            self._gate.wait(HOLD)
            return policy(topic)

        log.set_retention(held)

    async def entered(self) -> bool:
        """Wait until the writer is held; whether it was, in time."""
        return await asyncio.to_thread(self._entered.wait, HOLD)

    def release(self) -> None:
        """Let the writer go on (and every later commit pass)."""
        self._gate.set()
