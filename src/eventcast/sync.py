"""A synchronous client of an eventcast hub, for threads, scripts and WSGI apps.

::

    import eventcast.sync

    with eventcast.sync.connect("ws://localhost:8000", token=token) as client:
        client.publish("news.eu", {"title": "hello"})
        with client.subscribe("news.>") as sub:
            for event in sub:
                print(event.topic, event.data)

It is the asyncio client (:mod:`eventcast.client`) running on its own event
loop in a background thread: the same reconnects, recovery, token refresh
and timeouts; no protocol logic of its own. Every method may be called from
any thread. Calling one from inside a callback running on the client's own
loop (``get_token``, ``on_message``) raises ``RuntimeError`` instead of
deadlocking.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from .client import Client, ClientPresence, ClientState, PresenceStats, Subscription
from .events import Event, History, Position
from .exceptions import ClientClosedError

__all__ = ["SyncClient", "SyncSubscription", "connect"]

T = TypeVar("T")


class SyncClient:
    """A blocking client; build it with :func:`connect`."""

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="eventcast-sync-client", daemon=True)
        self._thread.start()
        try:
            self._client: Client = self._call(self._open(url, options))
        except BaseException:
            self._stop()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            try:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()

    @staticmethod
    async def _open(url: str, options: dict[str, Any]) -> Client:
        from .client import connect as connect_async

        return await connect_async(url, **options)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop and wait for its result."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync client method was called from its own event loop")
        if self._closed:
            coro.close()
            raise ClientClosedError("the client is closed")
        return self._wait(coro)

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted (KeyboardInterrupt) or failed: do not leave the coroutine running.
            future.cancel()
            raise

    @property
    def client(self) -> Client:
        """The underlying asyncio client (use it only from its loop)."""
        return self._client

    @property
    def closed(self) -> bool:
        """Whether the client is closed (or failed for good)."""
        return self._closed or self._client.closed

    @property
    def state(self) -> ClientState:
        """``"disconnected"``, ``"connecting"`` or ``"connected"`` (see :attr:`Client.state`)."""
        return self._client.state

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client and stop its thread. Idempotent; safe from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if threading.current_thread() is not self._thread and hasattr(self, "_client"):
                self._wait(self._client.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- commands ------------------------------------------------------------------------

    def publish(self, channel: str, data: Any) -> None:
        """Publish ``data`` into a channel (see :meth:`Client.publish`)."""
        self._call(self._client.publish(channel, data))

    def history(
        self,
        channel: str,
        *,
        limit: int = 0,
        since: Position | tuple[int, str] | None = None,
        reverse: bool = False,
    ) -> History:
        """A page of a channel's history (see :meth:`Client.history`)."""
        return self._call(self._client.history(channel, limit=limit, since=since, reverse=reverse))

    def presence(self, channel: str) -> dict[str, ClientPresence]:
        """Who is in a channel (see :meth:`Client.presence`)."""
        return self._call(self._client.presence(channel))

    def presence_stats(self, channel: str) -> PresenceStats:
        """How many clients and users are in a channel."""
        return self._call(self._client.presence_stats(channel))

    def rpc(self, method: str, data: Any = None) -> Any:
        """Call a method registered on the hub."""
        return self._call(self._client.rpc(method, data))

    def send(self, data: Any) -> None:
        """Send an asynchronous message to the hub."""
        self._call(self._client.send(data))

    def subscribe(self, channel: str, **options: Any) -> SyncSubscription:
        """Subscribe now; return an iterator of events (and a context manager).

        Takes the arguments of :meth:`Client.subscribe` (``since``,
        ``on_lost``, ``buffer``, ``token``, ``get_token``, ``join_leave``,
        ``on_join``, ``on_leave``, ``type``). The callbacks run on the
        client's thread; ``get_token`` may be a plain function.
        """

        async def start() -> Subscription:
            return await self._client.subscribe(channel, **options)

        return SyncSubscription(self, self._call(start()))

    def server_subscription(self, channel: str, **options: Any) -> SyncSubscription:
        """The events of a server-side subscription (see :meth:`Client.server_subscription`).

        Takes the same arguments. Pass ``on_publication=`` to :func:`connect`
        to see every server-side publication from the first connect on.
        """

        async def find() -> Subscription:
            return self._client.server_subscription(channel, **options)

        return SyncSubscription(self, self._call(find()))


class SyncSubscription:
    """A subscription of a :class:`SyncClient`: iterate it to receive events."""

    def __init__(self, client: SyncClient, subscription: Subscription) -> None:
        self._client = client
        self.subscription = subscription

    @property
    def channel(self) -> str:
        """The channel or pattern subscribed to."""
        return self.subscription.channel

    @property
    def position(self) -> Position | None:
        """The stream position after the last event yielded."""
        return self.subscription.position

    @property
    def recovered(self) -> bool:
        """Whether the last (re)subscribe recovered every missed event."""
        return self.subscription.recovered

    @property
    def lost(self) -> int:
        """How many times the stream could not be recovered."""
        return self.subscription.lost

    @property
    def state(self) -> str:
        """``"subscribing"``, ``"subscribed"`` or ``"unsubscribed"``."""
        return self.subscription.state

    @property
    def refreshes(self) -> int:
        """Subscription token refreshes done through ``get_token``."""
        return self.subscription.refreshes

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return self.get()

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting at most ``timeout`` seconds (``None``: no limit).

        Raises:
            StopIteration: the subscription or the client was closed.
            TimeoutError: no event within ``timeout``.
        """

        async def step() -> tuple[bool, Event | None]:
            try:
                async with asyncio.timeout(timeout):
                    return True, await self.subscription.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            ok, event = self._client._call(step())
        except ClientClosedError:
            if self._client._closed:
                raise StopIteration from None
            raise
        if not ok or event is None:
            raise StopIteration
        return event

    def unsubscribe(self) -> None:
        """Stop receiving. Idempotent."""
        if self._client._closed:
            return
        self._client._call(self.subscription.unsubscribe())

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unsubscribe()


def connect(url: str, **options: Any) -> SyncClient:
    """Connect to a hub synchronously; return a :class:`SyncClient` (a context manager).

    Takes the same arguments as :func:`eventcast.client.connect`.

    Raises:
        HandshakeError: the hub cannot be reached or refused the connection.
    """
    return SyncClient(url, **options)
