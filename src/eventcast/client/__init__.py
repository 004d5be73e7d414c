"""The Python client of an eventcast hub (any server speaking the Centrifuge protocol, JSON).

::

    import eventcast

    async with eventcast.connect("ws://localhost:8000", token=token) as client:
        async with client.subscribe("news.>") as sub:
            async for event in sub:
                print(event.topic, event.data)

It reconnects by itself (jittered exponential backoff), resubscribes every
subscription and recovers what it missed from each one's last position,
refreshes its connection and subscription tokens through ``get_token``
callbacks, answers the hub's pings and replaces a connection that stopped
receiving them. Subscriptions surface join and leave pushes (``on_join``,
``on_leave``) and can decode into a declared type (``type=``); the channels
the hub subscribes the client to are read with ``client.server_subscription``.
See ``docs/client.md``.

For threads and scripts without asyncio, see :mod:`eventcast.sync`. Needs the
``websockets`` package (``pip install 'eventcast[server]'``).
"""

from __future__ import annotations

from ._client import (
    DEFAULT_BUFFER as DEFAULT_BUFFER,
    DEFAULT_TIMEOUT as DEFAULT_TIMEOUT,
    Client as Client,
    ClientPresence as ClientPresence,
    ClientState as ClientState,
    PresenceCallback as PresenceCallback,
    PresenceStats as PresenceStats,
    Subscription as Subscription,
    SubscriptionState as SubscriptionState,
    SubscriptionTokenGetter as SubscriptionTokenGetter,
    TokenGetter as TokenGetter,
    connect as connect,
    websocket_url as websocket_url,
)

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_TIMEOUT",
    "Client",
    "ClientPresence",
    "ClientState",
    "PresenceCallback",
    "PresenceStats",
    "Subscription",
    "SubscriptionState",
    "SubscriptionTokenGetter",
    "TokenGetter",
    "connect",
    "websocket_url",
]
