"""Test an application that uses eventcast, with no server process: ``eventcast.testing``.

.. code-block:: python

    from eventcast.testing import TestHub, wait_for_publication

    async def test_news_reach_subscribers():
        async with TestHub() as hub:
            async with hub.client(user="alice") as alice, alice.subscribe("news") as sub:
                await hub.publish("news", {"title": "hello"})
                event = await wait_for_publication(sub)
                assert event.data == {"title": "hello"}

* :class:`TestHub` runs the real hub (the ASGI app of ``eventcast serve``) in
  the test's event loop, with a memory log and backplane; its clients are the
  real Python client over an in-memory WebSocket, so permissions, limits,
  recovery and reconnects behave as in production.
  ``await hub.disconnect(client)`` simulates a network failure.
* :func:`wait_for_publication`, :func:`collect` and :func:`assert_received`
  wait with a timeout and fail with a message that says what arrived.
* The pytest plugin (installed with eventcast, see
  :mod:`eventcast.testing.pytest_plugin`) adds the fixtures
  ``eventcast_hub``, ``eventcast_client`` and ``eventcast_bus``.

Needs the server extra (``pip install 'eventcast[server]'``); its names are
imported on first use, so the pytest plugin loads without it. See
``docs/testing.md``.

.. versionadded:: 0.2
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._helpers import (
        DEFAULT_WAIT as DEFAULT_WAIT,
        assert_received as assert_received,
        collect as collect,
        wait_for_publication as wait_for_publication,
    )
    from ._hub import (
        CLIENT_DEFAULTS as CLIENT_DEFAULTS,
        DEFAULT_NAMESPACES as DEFAULT_NAMESPACES,
        TestHub as TestHub,
    )
    from ._memory import DEFAULT_MAX_QUEUE as DEFAULT_MAX_QUEUE

__all__ = [
    "CLIENT_DEFAULTS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_NAMESPACES",
    "DEFAULT_WAIT",
    "TestHub",
    "assert_received",
    "collect",
    "wait_for_publication",
]

_WHERE = {
    "CLIENT_DEFAULTS": "._hub",
    "DEFAULT_MAX_QUEUE": "._memory",
    "DEFAULT_NAMESPACES": "._hub",
    "DEFAULT_WAIT": "._helpers",
    "TestHub": "._hub",
    "assert_received": "._helpers",
    "collect": "._helpers",
    "wait_for_publication": "._helpers",
}


def __getattr__(name: str) -> Any:
    # Lazy: the pytest plugin (a submodule) must load without the server extra.
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
