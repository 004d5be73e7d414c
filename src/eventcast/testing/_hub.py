"""TestHub: the real hub in the test's event loop, reached in memory."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import MutableMapping, Sequence
from types import TracebackType
from typing import Any, Final

import httpx
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from ..bus import Bus
from ..client import Client
from ..exceptions import ConfigurationError, EventcastError, ReplyError
from ..server.app import HubApp, create_app
from ..server.auth import mint_token
from ..server.config import Settings, _describe
from ..server.hub import Hub
from ._memory import DEFAULT_MAX_QUEUE, MemoryTransport, open_memory_transport

__all__ = ["CLIENT_DEFAULTS", "DEFAULT_NAMESPACES", "TestHub"]

#: The namespaces of a :class:`TestHub` given none: one ``""`` namespace
#: (channels without a ``namespace:`` prefix) where any authenticated client
#: may subscribe, publish, read history and presence, with history (100
#: publications for 5 minutes, so recovery works), presence, join/leave
#: pushes and pattern subscriptions. Channels of any other namespace are
#: refused (102 "unknown channel").
DEFAULT_NAMESPACES: Final[tuple[dict[str, Any], ...]] = (
    {
        "name": "",
        "history_size": 100,
        "history_ttl": 300,
        "allow_subscribe_for_client": True,
        "allow_publish_for_client": True,
        "allow_history_for_client": True,
        "allow_presence_for_client": True,
        "allow_recovery": True,
        "presence": True,
        "join_leave": True,
        "allow_patterns": True,
    },
)

#: Options of the clients :meth:`TestHub.client` makes (each can be overridden):
#: quick reconnects, so a test that drops a connection stays fast.
CLIENT_DEFAULTS: Final[dict[str, Any]] = {
    "min_reconnect_delay": 0.005,
    "max_reconnect_delay": 0.1,
    "timeout": 5.0,
    "name": "eventcast-testing",
}

_URL: Final = "ws://testhub/connection/websocket"


class _Isolated(Settings):
    """Settings from the arguments and defaults only: no ``EVENTCAST_*`` environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _settings(values: dict[str, Any]) -> Settings:
    try:
        return _Isolated(**values)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


class _Link:
    """The in-memory connection a client currently has (it changes on each reconnect)."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: MemoryTransport | None = None


class TestHub:
    """An in-memory hub for tests: the real hub code, no socket, no port.

    .. code-block:: python

        async with TestHub() as hub:
            async with hub.client(user="alice") as alice, alice.subscribe("news") as sub:
                await hub.publish("news", {"title": "hello"})
                event = await wait_for_publication(sub)

    The hub is the ASGI application of ``eventcast serve``
    (:func:`~eventcast.server.app.create_app`), started and stopped through
    the ASGI lifespan protocol in the test's event loop. Clients are the real
    :class:`~eventcast.client.Client`, speaking the Centrifuge protocol over
    an in-memory WebSocket that calls the app as an ASGI server would, so
    permissions, limits, recovery and reconnects behave exactly as in
    production. :meth:`publish` and :meth:`api` go through the HTTP API of
    the same app.

    Args:
        app: a hub application to serve instead (for instance the one a host
            FastAPI app mounts); its settings then apply, and ``settings``
            must be empty.
        max_queue: messages buffered in each direction of an in-memory
            connection (default 64).
        settings: any setting of ``eventcast serve``
            (:class:`~eventcast.server.config.Settings`), e.g.
            ``namespaces=[{"name": "orders", "allow_subscribe_for_client":
            True}]``. The defaults differ for tests: ``log_url`` and
            ``backplane_url`` are ``memory://``; ``token_hmac_secret`` and
            ``api_key`` are random; ``namespaces`` is
            :data:`DEFAULT_NAMESPACES`; ``node_name`` is ``testhub``.
            ``EVENTCAST_*`` environment variables are ignored.

    Raises:
        ConfigurationError: a setting is invalid.

    .. versionadded:: 0.2
    """

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(
        self,
        app: HubApp | None = None,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        **settings: Any,
    ) -> None:
        if app is not None and settings:
            raise ConfigurationError("pass either an app or settings, not both")
        if max_queue < 1:
            raise ConfigurationError("max_queue must be >= 1")
        if app is None:
            values: dict[str, Any] = {
                "log_url": "memory://",
                "backplane_url": "memory://",
                "token_hmac_secret": secrets.token_urlsafe(32),
                "api_key": secrets.token_urlsafe(24),
                "namespaces": [dict(ns) for ns in DEFAULT_NAMESPACES],
                "node_name": "testhub",
                **settings,
            }
            app = create_app(_settings(values))
        self.app: HubApp = app
        """The hub's ASGI application (mount it in a host app, or call it)."""
        self._max_queue = max_queue
        self._links: dict[Client, _Link] = {}
        self._http: httpx.AsyncClient | None = None
        self._lifespan: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue(2)
        self._from_app: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue(2)
        self._started = False
        self._closed = False

    # -- what it serves -------------------------------------------------------------------

    @property
    def hub(self) -> Hub:
        """The :class:`~eventcast.server.hub.Hub` (connections, channels, counters)."""
        return self.app.hub

    @property
    def bus(self) -> Bus:
        """The hub's bus: publish in process, as a host application's code does."""
        return self.app.hub.bus

    @property
    def settings(self) -> Settings:
        """The hub's settings."""
        return self.app.hub.settings

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> TestHub:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the hub (the ASGI lifespan's startup).

        Raises:
            EventcastError: the hub could not start (the message says why).
        """
        if self._started:
            return
        self._started = True
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        self._lifespan = asyncio.get_running_loop().create_task(
            self.app(scope, self._to_app.get, self._from_app.put), name="eventcast-testhub"
        )
        await self._to_app.put({"type": "lifespan.startup"})
        answer = await self._lifespan_answer()
        if answer["type"] != "lifespan.startup.complete":
            self._closed = True
            raise EventcastError(answer.get("message") or "the hub could not start")

    async def _lifespan_answer(self) -> MutableMapping[str, Any]:
        task = self._lifespan
        assert task is not None
        getter = asyncio.ensure_future(self._from_app.get())
        try:
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        error = task.exception()
        if error is not None:
            raise EventcastError(f"the hub's lifespan failed: {error!r}") from error
        return {"type": "lifespan.failed", "message": "the hub's lifespan ended"}

    async def aclose(self) -> None:
        """Close every client made by :meth:`client`, then stop the hub. Idempotent.

        Connected clients get the hub's 3001 "shutdown" first, as in production.
        """
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        try:
            for client in list(self._links):
                await client.close()
            if self._http is not None:
                await self._http.aclose()
        finally:
            await self._to_app.put({"type": "lifespan.shutdown"})
            answer = await self._lifespan_answer()
            if answer["type"] != "lifespan.shutdown.complete":
                raise EventcastError(answer.get("message") or "the hub did not stop cleanly")

    def _check_running(self) -> None:
        if not self._started or self._closed:
            raise EventcastError("the TestHub is not running: use `async with TestHub() as hub`")

    # -- tokens and clients ---------------------------------------------------------------

    def token(
        self,
        user: str = "",
        *,
        ttl: float | None = 3600,
        channels: Sequence[str] = (),
        channel: str | None = None,
        info: Any = None,
    ) -> str:
        """Mint a connection token (or with ``channel``, a subscription token) this hub accepts.

        Args:
            user: the user id.
            ttl: seconds until it expires (``None``: never).
            channels: server-side channels of a connection token.
            channel: make a subscription token for this channel instead.
            info: connection (or channel) info.

        Raises:
            ConfigurationError: the hub has no ``token_hmac_secret``.
        """
        settings = self.settings
        secret = settings.token_hmac_secret
        if secret is None:
            raise ConfigurationError("the hub has no token_hmac_secret: it cannot mint tokens")
        return mint_token(
            secret=secret.get_secret_value(),
            user=user,
            ttl=ttl,
            channels=channels,
            channel=channel,
            info=info,
            audience=settings.token_audience,
            issuer=settings.token_issuer,
        )

    def client(
        self,
        user: str | None = None,
        *,
        token: str | None = None,
        channels: Sequence[str] = (),
        info: Any = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> Client:
        """A client of this hub: ``async with hub.client(user="alice") as alice``.

        It is the client of :func:`eventcast.connect`, connected in memory.

        Args:
            user: connect as this user (a token is minted, with ``channels``
                as server-side subscriptions and ``info`` as connection info).
            token: connect with this token instead. With neither, the client
                is anonymous (the hub needs ``allow_anonymous=True``).
            channels: server-side channels of the minted token.
            info: connection info of the minted token.
            headers: extra headers of the WebSocket handshake.
            options: options of :func:`eventcast.connect` (``get_token``,
                ``on_publication``, ``buffer``, ...), over
                :data:`CLIENT_DEFAULTS` (quick reconnects).
        """
        self._check_running()
        if token is None:
            token = "" if user is None else self.token(user, channels=channels, info=info)
        link = _Link()
        raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

        async def open_link() -> MemoryTransport:
            self._check_running()
            transport = await open_memory_transport(
                self.app, headers=raw_headers, max_queue=self._max_queue
            )
            link.current = transport
            return transport

        client = Client(_URL, token=token, opener=open_link, **{**CLIENT_DEFAULTS, **options})
        self._links[client] = link
        return client

    async def disconnect(self, client: Client) -> None:
        """Drop a client's connection as a network failure would.

        The hub sees the connection lost (1006) and forgets it (presence,
        leaves); the client sees no close frame, reconnects with its backoff
        and recovers its subscriptions by itself. Returns once the hub has
        forgotten the connection.

        Raises:
            ValueError: the client is not one of this hub's, or has no open connection.
        """
        link = self._links.get(client)
        if link is None:
            raise ValueError(f"{client!r} is not a client of this TestHub")
        transport = link.current
        if transport is None or transport.dropped:
            raise ValueError(f"{client!r} has no open connection to drop")
        transport.drop()
        await transport.wait_closed()

    # -- the HTTP API ---------------------------------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        """An HTTP client of the hub app (base URL ``http://testhub``, the API key set)."""
        self._check_running()
        if self._http is None:
            key = self.settings.api_key
            headers = {"X-API-Key": key.get_secret_value()} if key is not None else {}
            self._http = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.app),
                base_url="http://testhub",
                headers=headers,
            )
        return self._http

    async def api(self, method: str, **params: Any) -> Any:
        """Call the HTTP server API (``POST /api/<method>``); return its ``result``.

        Raises:
            ReplyError: the hub answered with an error (``code`` and ``message``).
            ConfigurationError: the hub has no ``api_key`` (its API is off).
        """
        if self.settings.api_key is None:
            raise ConfigurationError("the hub has no api_key: its HTTP API is disabled")
        response = await self.http.post(f"/api/{method}", json=params)
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if error is not None:
            raise ReplyError(int(error.get("code", 0)), str(error.get("message", "")))
        if response.status_code != 200:
            raise ReplyError(100, f"HTTP {response.status_code}")
        return body.get("result") if method != "batch" else body

    async def publish(self, channel: str, data: Any, **params: Any) -> dict[str, Any]:
        """Publish through the HTTP API, as a backend would; return ``{"offset", "epoch"}``.

        Raises:
            ReplyError: the hub refused (e.g. 102 unknown channel, 107 data
                breaking the namespace's schema).
        """
        result: dict[str, Any] = await self.api("publish", channel=channel, data=data, **params)
        return result
