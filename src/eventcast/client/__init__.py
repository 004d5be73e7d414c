"""The Python client of an eventcast hub (any server speaking the Centrifuge protocol, JSON).

::

    import eventcast

    async with eventcast.connect("ws://localhost:8000", token=token) as client:
        async with client.subscribe("news.>") as sub:
            async for event in sub:
                print(event.topic, event.data)

It reconnects by itself (jittered exponential backoff), resubscribes every
subscription and recovers what it missed from each one's last position,
refreshes its token through ``get_token``, answers the hub's pings and
replaces a connection that stopped receiving them. See ``docs/client.md``.

For threads and scripts without asyncio, see :mod:`eventcast.sync`. Needs the
``websockets`` package (``pip install 'eventcast[server]'``).
"""

from __future__ import annotations

from ._client import (
    DEFAULT_BUFFER as DEFAULT_BUFFER,
    DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
    Client as Client,
    ClientPresence as ClientPresence,
    PresenceStats as PresenceStats,
    Subscription as Subscription,
    TokenGetter as TokenGetter,
    connect as connect,
    websocket_url as websocket_url,
)

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_TIMEOUT",
    "Client",
    "ClientPresence",
    "PresenceStats",
    "Subscription",
    "TokenGetter",
    "connect",
    "websocket_url",
]
