"""Lifecycle webhooks: ``connect``, ``disconnect``, ``channel_occupied``, ``channel_vacated``.

Each event is POSTed as JSON to every webhook (``webhooks`` setting) that
asked for it::

    {"id": "0190…", "type": "channel_occupied", "timestamp": "2024-05-01T12:00:00.123Z",
     "node": "node-1", "data": {"channel": "chat:lobby"}}

with the headers of the `Standard Webhooks <https://www.standardwebhooks.com>`_
specification: ``webhook-id`` (the event's id, the same on every attempt: the
receiver's idempotency key), ``webhook-timestamp`` (the attempt's Unix time)
and, when the webhook has a ``secret``, ``webhook-signature: v1,<base64
HMAC-SHA256 of "{id}.{timestamp}.{body}">``.

Delivery is at least once. Each webhook has its own bounded queue
(``webhook_queue_size``) and one supervised sender task, which sends the
events in order; a failed attempt (not 2xx, unreachable, past
``webhook_timeout``) is retried with exponential backoff and jitter
(``webhook_backoff``, ``webhook_max_backoff``) up to ``webhook_retries``
times. An event that still fails becomes a dead letter of the bus (reason
``webhook_failed``, subscriber ``webhook:<n>:<host>``), as does the oldest
queued event when the queue is full (``webhook_overflow``) and what is still
queued when the hub stops (``webhook_shutdown``): list them with the
``dead_letters`` API or ``eventcast dead-letters list``, and send them again
with ``dead_letters_redrive`` or ``eventcast dead-letters redrive``.

``connect`` and ``disconnect`` come from this node's connections;
``channel_occupied`` and ``channel_vacated`` are decided for the whole cluster
by :mod:`eventcast.server.occupancy` (one of each per occupancy period, sent
by one node), ``channel_vacated`` once a channel stayed empty
``webhook_vacated_delay`` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import httpx
import msgspec

from ..deadletters import DeadLetter
from ..events import Event, new_event_id
from ..exceptions import DeliveryError
from ..handlers import backoff_delay
from ._outgoing import exchange, pooled_client
from .config import WebhookConfig
from .occupancy import OccupancyKeeper, occupancy_for

if TYPE_CHECKING:
    from .connection import Connection
    from .hub import Hub

__all__ = ["CLOSE_TIMEOUT", "Webhook", "Webhooks", "sign"]

logger = logging.getLogger("eventcast.server")

#: The most seconds a stopping hub gives the queued events (and at most
#: ``webhook_timeout``) before they become dead letters.
CLOSE_TIMEOUT: Final = 5.0
#: Longest webhook answer read (it is discarded).
_MAX_ANSWER: Final = 65_536

_encode = msgspec.json.Encoder().encode


def _secret_bytes(secret: str) -> bytes:
    """A signing secret's key: ``whsec_<base64>`` decoded (Standard Webhooks), else its UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[6:], validate=True)
        except ValueError:
            pass  # not base64 after all: the whole string is the key
    return secret.encode()


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of one attempt: ``v1,<base64 HMAC-SHA256>``."""
    content = b"%s.%d.%s" % (event_id.encode(), timestamp, body)
    digest = hmac.new(_secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Webhook:
    """One webhook endpoint: its queue, and the task that delivers it in order.

    Args:
        config: where to, which events, the secret.
        subscriber: its id in the dead letter store (``webhook:<n>:<host>``).
        owner: the :class:`Webhooks` it belongs to (settings, client, dead letters).
    """

    def __init__(self, config: WebhookConfig, subscriber: str, owner: Webhooks) -> None:
        self.config = config
        self.subscriber = subscriber
        self._owner = owner
        self._secret = None if config.secret is None else config.secret.get_secret_value()
        self._queue: deque[Event] = deque()
        self._wake = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        self._sending: Event | None = None
        #: Events delivered, and events that became dead letters.
        self.delivered = 0
        self.failed = 0

    def put(self, event: Event) -> None:
        """Queue an event; past the bound, the oldest queued becomes a dead letter."""
        queue = self._queue
        if len(queue) >= self._owner.queue_size:
            self._owner.dead_letter(self, queue.popleft(), "webhook_overflow", 0, "queue full")
        queue.append(event)
        self._wake.set()

    @property
    def queued(self) -> int:
        """Events waiting (not counting the one being sent)."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued or being sent."""
        return not self._queue and self._sending is None

    async def run(self) -> None:
        """Deliver the queued events, one at a time, in order, forever."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                event = self._sending = self._queue.popleft()
                await self._deliver(event)
                self._sending = None
            self._owner.drained.set()

    async def _deliver(self, event: Event) -> None:
        owner = self._owner
        body = event.encoded_data()
        error = ""
        for attempt in range(owner.retries + 1):
            error = await self._attempt(event.id, body)
            if not error:
                self.delivered += 1
                return
            if attempt < owner.retries:
                await asyncio.sleep(backoff_delay(attempt, owner.backoff, owner.max_backoff))
        self.failed += 1
        logger.warning(
            "webhook %s: %s event %s failed %d times (%s); kept as a dead letter",
            self.subscriber,
            event.topic,
            event.id,
            owner.retries + 1,
            error,
        )
        owner.dead_letter(self, event, "webhook_failed", owner.retries + 1, error)

    async def _attempt(self, event_id: str, body: bytes) -> str:
        """One POST; return ``""`` on a 2xx answer, else what went wrong (no body quoted)."""
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._secret is not None:
            headers["webhook-signature"] = sign(self._secret, event_id, timestamp, body)
        try:
            status, _ = await exchange(
                self._owner.client,
                "POST",
                self.config.url,
                error=DeliveryError,
                what="the endpoint",
                timeout=self._owner.timeout,
                content=body,
                headers=headers,
                limit=_MAX_ANSWER,
            )
        except DeliveryError as exc:
            return str(exc)
        return "" if 200 <= status < 300 else f"HTTP {status}"

    def take_all(self) -> list[Event]:
        """Remove and return what is queued or being sent (the hub is stopping)."""
        events = ([self._sending] if self._sending is not None else []) + list(self._queue)
        self._queue.clear()
        self._sending = None
        return events


class Webhooks:
    """The hub's lifecycle webhooks (see the module documentation).

    Args:
        hub: the hub whose connections and channels are reported.
        client: the HTTP client (default: a pooled one, closed by :meth:`aclose`).
    """

    def __init__(self, hub: Hub, *, client: httpx.AsyncClient | None = None) -> None:
        settings = hub.settings
        self._hub = hub
        self.node = settings.node_name
        self.timeout = settings.webhook_timeout
        self.retries = settings.webhook_retries
        self.backoff = settings.webhook_backoff
        self.max_backoff = settings.webhook_max_backoff
        self.queue_size = settings.webhook_queue_size
        self._own_client = client is None
        self.client = client or pooled_client(self.timeout)
        self._letters = hub.bus.dead_letters
        #: Set whenever a sender emptied its queue (what :meth:`aclose` waits on).
        self.drained = asyncio.Event()
        self.endpoints: list[Webhook] = []
        for n, config in enumerate(settings.webhooks):
            subscriber = f"webhook:{n}:{urlsplit(config.url).hostname or ''}"
            endpoint = Webhook(config, subscriber, self)
            self.endpoints.append(endpoint)
            self._letters.targets[subscriber] = self._redeliver
        self._wanted = {kind for e in self.endpoints for kind in e.config.events}
        self.occupancy: OccupancyKeeper | None = None
        if self._wanted & {"channel_occupied", "channel_vacated"}:
            self.occupancy = OccupancyKeeper(
                occupancy_for(hub.presence),
                node=settings.node_name,
                ttl=settings.presence_ttl,
                vacated_delay=settings.webhook_vacated_delay,
                emit=lambda kind, channel: self.emit(kind, {"channel": channel}),
                spawn=hub.tasks.spawn,
            )
            hub.channels.occupancy_listeners.append(self.occupancy.local)
        if self._wanted & {"connect", "disconnect"}:
            hub.registry.listeners.append(self._connection)
        self._closing = False
        self._closed = False

    def start(self) -> None:
        """Start the senders and the occupancy keeper (in the running loop). Idempotent."""
        for endpoint in self.endpoints:
            if endpoint.task is None:
                endpoint.task = self._hub.tasks.spawn(
                    endpoint.run(), f"eventcast-webhook-{endpoint.subscriber}"
                )
        if self.occupancy is not None:
            self.occupancy.start()

    def _connection(self, conn: Connection, connected: bool) -> None:
        data: dict[str, Any] = {
            "client": conn.id,
            "user": conn.user,
            "transport": conn.transport_name,
        }
        if connected:
            self.emit("connect", data)
            return
        if conn.disconnect is not None:
            data["code"] = conn.disconnect.code
            data["reason"] = conn.disconnect.reason
        self.emit("disconnect", data)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Queue one event for every webhook that wants it."""
        if self._closed or kind not in self._wanted:
            return
        event_id, now = new_event_id(), time.time()
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        body = _encode(
            {
                "id": event_id,
                "type": kind,
                "timestamp": stamp.replace("+00:00", "Z"),
                "node": self.node,
                "data": data,
            }
        )
        event = Event(topic=kind, data=body, id=event_id, time=now)
        for endpoint in self.endpoints:
            if kind in endpoint.config.events:
                endpoint.put(event)

    def dead_letter(
        self, endpoint: Webhook, event: Event, reason: str, attempts: int, error: str
    ) -> None:
        """Keep an event that could not be delivered in the bus's dead letters."""
        self._letters.add(event, endpoint.subscriber, reason, attempts=attempts, error=error)

    def _redeliver(self, letter: DeadLetter) -> bool:
        """Redrive: queue a dead letter's event again for its webhook (while it is configured)."""
        if self._closed:
            return False
        for endpoint in self.endpoints:
            if endpoint.subscriber == letter.subscriber:
                endpoint.put(letter.event)
                return True
        return False

    async def aclose(self) -> None:
        """Give up this node's channels, send what is queued (bounded), keep the rest. Idempotent.

        Events still undelivered after ``webhook_timeout`` seconds (at most
        :data:`CLOSE_TIMEOUT`), or when the close is cancelled, become dead
        letters (``webhook_shutdown``), which the log keeps when it stores dead
        letters, for a redrive after the restart.
        """
        if self._closing:
            return
        self._closing = True
        try:
            if self.occupancy is not None:
                await self.occupancy.aclose()  # its last channel_vacated events go out too
            self._closed = True
            await self._drain()
        finally:
            self._closed = True
            for endpoint in self.endpoints:
                task, endpoint.task = endpoint.task, None
                if task is not None:
                    task.cancel()
                for event in endpoint.take_all():
                    self.dead_letter(endpoint, event, "webhook_shutdown", 0, "the hub stopped")
            if self._own_client:
                await self.client.aclose()

    async def _drain(self) -> None:
        """Wait (bounded) until every sender emptied its queue."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(CLOSE_TIMEOUT, self.timeout)
        while True:
            self.drained.clear()
            if all(e.idle for e in self.endpoints):
                return
            try:
                async with asyncio.timeout_at(deadline):
                    await self.drained.wait()
            except TimeoutError:
                return
