"""The pytest plugin of eventcast: fixtures for testing applications that use it.

Installed with eventcast (the ``pytest11`` entry point ``eventcast``), it adds:

* ``eventcast_hub``: a started :class:`~eventcast.testing.TestHub` with the
  default test settings (memory log and backplane, permissive ``""``
  namespace: see :data:`~eventcast.testing.DEFAULT_NAMESPACES`);
* ``eventcast_client``: a factory of connected clients of that hub,
  ``alice = await eventcast_client(user="alice")`` (closed after the test);
* ``eventcast_bus``: a started in-process :class:`~eventcast.Bus`.

They are plain async fixtures: pytest-asyncio runs them in ``asyncio_mode =
"auto"``, and anyio's plugin runs them for tests marked ``@pytest.mark.anyio``
(asyncio backend: the hub runs on asyncio). Loading the plugin imports
nothing but pytest, so it costs nothing in test suites that do not use it.

.. versionadded:: 0.2
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..bus import Bus
    from ..client import Client
    from ._hub import TestHub

__all__ = ["ClientFactory", "eventcast_bus", "eventcast_client", "eventcast_hub"]

#: ``eventcast_client``: ``await eventcast_client(user="bob", **options)``.
ClientFactory = Callable[..., Awaitable["Client"]]


@pytest.fixture
async def eventcast_hub() -> AsyncIterator[TestHub]:
    """A started in-memory hub with the default test settings (stopped after the test)."""
    from ._hub import TestHub

    async with TestHub() as hub:
        yield hub


@pytest.fixture
async def eventcast_client(eventcast_hub: TestHub) -> ClientFactory:
    """Make connected clients of ``eventcast_hub``: ``await eventcast_client(user="bob")``.

    Takes the arguments of :meth:`TestHub.client <eventcast.testing.TestHub.client>`.
    Every client is closed after the test.
    """

    async def make(user: str | None = None, **options: Any) -> Client:
        return await eventcast_hub.client(user, **options).start()

    return make


@pytest.fixture
async def eventcast_bus() -> AsyncIterator[Bus]:
    """A started in-process :class:`~eventcast.Bus` with no log (closed after the test)."""
    from ..bus import Bus

    async with Bus() as bus:
        yield bus
