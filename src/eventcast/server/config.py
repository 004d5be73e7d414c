"""Hub settings: environment variables (``EVENTCAST_*``), an optional TOML file, defaults.

Every setting can be given as an environment variable named ``EVENTCAST_`` plus
the setting's name in upper case, or in a TOML file under the setting's name::

    # eventcast.toml
    token_hmac_secret = "a-long-random-secret"
    api_key = "another-secret"
    allowed_origins = ["https://example.com"]

    [[namespaces]]
    name = "chat"
    history_size = 100
    history_ttl = "5m"
    allow_subscribe_for_client = true

Precedence, highest first: explicit overrides passed to :meth:`Settings.load`,
environment variables, the TOML file, the defaults.

Namespace options use Centrifugo's names. Durations accept Centrifugo's string
form (``"300s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``) or a number of seconds.

Secrets (:class:`~pydantic.SecretStr`) never appear in ``repr()``; passwords in
URLs are masked too. Use :meth:`Settings.redacted` to log the settings.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .._durations import Duration, parse_duration
from .._urls import redact_password
from ..exceptions import ConfigurationError
from ..ingest.base import ConsumerConfig
from ..namespaces import Namespace
from ..schema import Schema, compile_schema
from ..topics import namespace_of

__all__ = ["NamespaceConfig", "Settings", "parse_duration"]

_NAMESPACE_NAME: Final = re.compile(r"[A-Za-z0-9_\-]*")
_REDACTED: Final = "***"

#: The TOML data of the :meth:`Settings.load` call in progress.
_TOML_DATA: ContextVar[dict[str, Any]] = ContextVar("eventcast_toml_data", default={})  # noqa: B039  # never mutated


class NamespaceConfig(BaseModel):
    """The options of one channel namespace (Centrifugo's option names).

    The namespace named ``""`` applies to channels without a ``namespace:`` prefix.

    Attributes:
        name: letters, digits, ``_`` and ``-`` (or ``""``).
        history_size: how many publications each channel keeps (0: no history).
        history_ttl: how long publications are kept, in seconds (0: no age limit).
        force_recovery: recover missed publications on every subscribe.
        allow_recovery: clients may ask for recovery when history is on.
        allow_subscribe_for_client: authenticated clients may subscribe without a
            subscription token.
        allow_subscribe_for_anonymous: anonymous clients may subscribe.
        allow_publish_for_subscriber: subscribers of a channel may publish to it.
        allow_publish_for_client: any authenticated client may publish.
        allow_publish_for_anonymous: anonymous clients may publish.
        allow_history_for_subscriber: subscribers may read the channel history.
        allow_history_for_client: any authenticated client may read history.
        allow_presence_for_subscriber: subscribers may read presence.
        allow_presence_for_client: any authenticated client may read presence.
        presence: track who is subscribed.
        join_leave: send join/leave messages.
        force_push_join_leave: push join/leave messages to every subscriber.
        allow_user_limited_channels: channels like ``dialog#42,43`` are open to
            the listed users only.
        allow_patterns: (eventcast extension) clients may subscribe to patterns
            with ``*`` and ``>``.
        proxy_subscribe: client subscriptions to this namespace are decided by the
            HTTP subscribe proxy (``proxy_subscribe_endpoint``) instead of the
            ``allow_subscribe_*`` options (not for subscription tokens or ``#``
            channels, as in Centrifugo).
        proxy_publish: client publications are decided (and may be rewritten) by
            the HTTP publish proxy instead of the ``allow_publish_*`` options.
        proxy_sub_refresh: expiring subscriptions are extended by the HTTP
            sub_refresh proxy instead of closing the connection.
        allowed_delta_types: the delta compressions subscribers may negotiate
            (``["fossil"]``, or empty: none); see ``docs/transports.md``.
        allow_tags_filter: subscribers may send a tags filter (``tf``) so they
            are given only the publications whose tags match.
        force_recovery_mode: ``"stream"`` (recover every missed publication)
            or ``"cache"`` (a subscriber recovering, or every subscriber with
            ``force_recovery``, is given the latest publication only: the
            channel is a key-value state). ``"cache"`` needs history.
        conflation_key: (eventcast extension) a publication tag: a connection
            that falls behind is given only the newest publication per value
            of this tag (per channel) instead of being disconnected as slow.
        schema: (eventcast extension) what every publication's data must match:
            a JSON Schema (a TOML table, or JSON in the environment), or in
            Python a msgspec ``Struct`` or pydantic model class. Publishes that
            do not match are refused (error 107). Read it as ``data_schema``
            (a compiled :class:`~eventcast.schema.Schema`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    name: str
    history_size: int = Field(default=0, ge=0)
    history_ttl: Duration = 0.0
    force_recovery: bool = False
    allow_recovery: bool = True
    allow_subscribe_for_client: bool = False
    allow_subscribe_for_anonymous: bool = False
    allow_publish_for_subscriber: bool = False
    allow_publish_for_client: bool = False
    allow_publish_for_anonymous: bool = False
    allow_history_for_subscriber: bool = False
    allow_history_for_client: bool = False
    allow_presence_for_subscriber: bool = False
    allow_presence_for_client: bool = False
    presence: bool = False
    join_leave: bool = False
    force_push_join_leave: bool = False
    allow_user_limited_channels: bool = False
    allow_patterns: bool = False
    proxy_subscribe: bool = False
    proxy_publish: bool = False
    proxy_sub_refresh: bool = False
    allowed_delta_types: list[Literal["fossil"]] = Field(default_factory=list)
    allow_tags_filter: bool = True
    force_recovery_mode: Literal["stream", "cache"] = "stream"
    conflation_key: str | None = Field(default=None, min_length=1)
    # Not named ``schema``: that would shadow a (deprecated) BaseModel attribute.
    data_schema: Any = Field(default=None, alias="schema")

    @field_validator("data_schema")
    @classmethod
    def _compile_schema(cls, value: Any) -> Schema | None:
        if value is None:
            return None
        try:
            return compile_schema(value)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None

    @field_serializer("data_schema")
    def _schema_as_json(self, value: Schema | None) -> dict[str, Any] | None:
        return None if value is None else value.json_schema

    @model_validator(mode="after")
    def _check_cache_mode(self) -> NamespaceConfig:
        if self.force_recovery_mode == "cache" and self.history_size <= 0:
            raise ValueError('force_recovery_mode "cache" needs history (history_size > 0)')
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAMESPACE_NAME.fullmatch(name):
            raise ValueError(
                f"invalid namespace name {name!r}: use letters, digits, '_' and '-' "
                "(or '' for channels without a namespace)"
            )
        return name

    def to_bus(self) -> Namespace:
        """Return the bus options of this namespace (history size and age limit)."""
        return Namespace(
            history_size=self.history_size,
            history_ttl=self.history_ttl if self.history_ttl > 0 else None,
            schema=self.data_schema,
        )


#: The lifecycle events a webhook can receive.
WebhookEvent = Literal["connect", "disconnect", "channel_occupied", "channel_vacated"]
#: Every lifecycle event, the default of :attr:`WebhookConfig.events`.
WEBHOOK_EVENTS: Final[tuple[WebhookEvent, ...]] = (
    "connect",
    "disconnect",
    "channel_occupied",
    "channel_vacated",
)


def _check_http_url(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if scheme.lower() not in ("http", "https") or not sep or not rest.strip("/"):
        raise ValueError("expected an http:// or https:// URL")
    return value


class WebhookConfig(BaseModel):
    """One lifecycle webhook: where to POST which events, and how to sign them.

    Attributes:
        url: the ``http://`` or ``https://`` endpoint.
        events: the events to send (default: all of :data:`WEBHOOK_EVENTS`).
        secret: signs each request (``webhook-signature``, see ``docs/hooks.md``);
            a ``whsec_``-prefixed secret is base64-decoded first, as the
            Standard Webhooks specification says. Without it requests are unsigned.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    events: tuple[WebhookEvent, ...] = WEBHOOK_EVENTS
    secret: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _check_http_url(value)


#: The options of channels without a namespace when no ``""`` namespace is configured.
_DEFAULT_NAMESPACE: Final = NamespaceConfig(name="")


#: List settings also given as a comma- (or space-) separated string in the environment.
_LIST_FIELDS: Final = ("allowed_origins", "forwarded_allow_ips", "proxy_http_headers")


class _EnvSource(EnvSettingsSource):
    """The environment source, leaving the :data:`_LIST_FIELDS` raw (JSON or separated)."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        if field_name in _LIST_FIELDS and isinstance(value, str):
            return value  # parsed by Settings._parse_list
        return super().prepare_field_value(field_name, field, value, value_is_complex)


class Settings(BaseSettings):
    """The hub's settings; build them with :meth:`load`.

    Attributes:
        token_hmac_secret: the HMAC secret of ``HS*`` tokens.
        token_public_key: a PEM public key for ``RS*``/``ES*`` tokens.
        token_audience: when set, tokens must carry this ``aud``.
        token_issuer: when set, tokens must carry this ``iss``.
        api_key: the HTTP server API key (``Authorization: apikey <key>``); without
            it the HTTP API is disabled.
        allow_anonymous: clients may connect without a token.
        log_url: where durable history is kept (``sqlite:///path``, ``memory://``,
            ``postgresql://...``, ``redis://...``, ``nats+jetstream://...``).
        backplane_url: how hub nodes share publications (``memory://`` for one node).
        namespaces: channel namespaces and their options.
        allowed_origins: the origins allowed to open WebSockets (empty: same origin
            only; ``"*"``: any). From the environment, a JSON list or a
            comma-separated string.
        max_message_size: the largest accepted client frame, in bytes.
        ping_interval: seconds between server pings.
        pong_timeout: seconds to wait for a pong before disconnecting.
        client_queue_bytes: bytes of outgoing messages buffered per client before
            it is disconnected as a slow consumer.
        channels_per_connection: the most channels one connection may subscribe to.
        max_bad_commands: a client sending this many bad commands is disconnected.
        replay_cap: the most publications replayed on recovery.
        handshake_timeout: seconds a client has to send its connect command, and an
            HTTP client to send the line and headers of each request (every request
            of a keep-alive connection, timed from its first byte).
        max_header_size: the most bytes of an HTTP request line and headers
            (``eventcast serve``); larger requests get 431 and the connection is
            closed.
        max_body_size: the most bytes of an HTTP request body, on every endpoint
            (endpoints that need less accept less); larger bodies get 413.
        body_timeout: seconds an HTTP request body has to arrive once the request
            started; slower bodies get 408 and the connection is closed.
        forwarded_allow_ips: the proxies trusted to say who the client is:
            requests from these addresses (or networks, or ``"*"``) take their
            client address from ``X-Forwarded-For`` and their scheme from
            ``X-Forwarded-Proto``, as uvicorn's ``forwarded_allow_ips``. From the
            environment, a JSON list or a comma-separated string.
        node_name: this node's name (default: the host name).
        connections_per_user: the most connections one user may have, across every
            node of the cluster (see ``docs/deployment.md`` for the bound under races).
        connection_rate: new connections per second this node accepts (token
            bucket, burst of one second's worth); over it the handshake gets 429.
        command_rate: commands per second per connection (token bucket, burst of
            one second's worth); over it a command gets error 111.
        user_command_rate: commands per second per user across their connections.
        sse_heartbeat: seconds between SSE heartbeat comments.
        sse_retry: the reconnect delay hinted to EventSource, in seconds.
        sse_cookie: the cookie that may carry an SSE connection token.
        presence_ttl: seconds a presence entry lives unless refreshed (a crashed
            node's entries expire after it).
        cluster_heartbeat: seconds between this node's heartbeats on the
            backplane's control channel.
        cluster_node_timeout: seconds without a heartbeat after which a node is
            dropped from the cluster (more than ``cluster_heartbeat``).
        cluster_request_timeout: the longest wait for other nodes' answers to a
            cluster-wide action or request, in seconds; the nodes that did not
            answer in time are named in the answer.
        access_url: where blocked users and revoked tokens are kept
            (``sqlite:///…``, ``postgresql://…``, ``redis://…``, ``nats://…`` or
            ``memory://``); by default the log when the nodes share it (or there
            is one node), else the backplane's engine.
        access_reload: seconds between two loads of every access entry from the
            store (changes also reach every node at once on the control channel).
        admin_token: opens the dashboard at ``/`` to clients that log in with it.
            Without it the dashboard answers loopback clients only.
        admin_session_ttl: seconds a dashboard login lasts (its signed cookie).
        admin_login_rate: dashboard login attempts per second per client address
            (token bucket, burst of five); over it a login gets 429.
        asyncapi: serve the hub's AsyncAPI 3.0 document at ``GET /asyncapi.json``
            (off by default: it lists the namespaces and their permissions).
        token_jwks_url: verify ``RS*``/``ES*`` tokens against the keys of this JWKS
            endpoint (Keycloak, Auth0, Cognito), chosen by the token's ``kid``.
        token_jwks_cache_ttl: seconds the JWKS is used before it is fetched again
            (in the background; tokens keep being verified meanwhile).
        token_jwks_min_refresh: the least seconds between two fetches caused by a
            token naming an unknown ``kid`` (so unknown keys cause no request storm).
        proxy_connect_endpoint: Centrifugo's HTTP connect proxy: a client without a
            token is authenticated by a POST here.
        proxy_refresh_endpoint: extends expiring connections (server-side refresh).
        proxy_subscribe_endpoint: decides subscriptions in namespaces with
            ``proxy_subscribe``.
        proxy_publish_endpoint: decides (and may rewrite) publications in namespaces
            with ``proxy_publish``.
        proxy_sub_refresh_endpoint: extends expiring subscriptions in namespaces with
            ``proxy_sub_refresh``.
        proxy_rpc_endpoint: answers ``rpc`` calls no in-process handler answers.
        proxy_connect_timeout: seconds a connect proxy call may take (the other
            ``proxy_*_timeout`` settings likewise for theirs); past it the client
            gets error 100.
        proxy_http_headers: the client request headers forwarded to every proxy
            call (case-insensitive). From the environment, a JSON list or a comma-
            or space-separated string.
        proxy_binary_encoding: send client data as ``b64data`` (base64) instead of
            ``data`` (Centrifugo's ``binary_encoding``).
        webhooks: lifecycle webhooks (TOML ``[[webhooks]]``, or JSON in
            ``EVENTCAST_WEBHOOKS``), see :class:`WebhookConfig`.
        webhook_timeout: seconds one webhook POST may take.
        webhook_retries: retries of a failed webhook delivery before it becomes a
            dead letter (with exponential backoff and jitter).
        webhook_backoff: base delay of the retry backoff, in seconds.
        webhook_max_backoff: cap of the retry backoff, in seconds.
        webhook_queue_size: events waiting for delivery per webhook; past it the
            oldest becomes a dead letter.
        webhook_vacated_delay: seconds a channel must stay empty on every node
            before ``channel_vacated`` is sent.
        log_format: ``text`` or ``json`` (one object per line) for ``eventcast serve``.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        consumers: sources the hub consumes (PostgreSQL outbox, MQTT, AMQP, Redis
            Streams, NATS JetStream), Centrifugo's shape: a list of ``{"name",
            "type", "<type>": {options}}`` (TOML ``[[consumers]]``, or
            ``EVENTCAST_CONSUMERS`` as JSON). See ``docs/ingest.md``.
    """

    model_config = SettingsConfigDict(
        env_prefix="EVENTCAST_",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    token_hmac_secret: SecretStr | None = None
    token_public_key: SecretStr | None = None
    token_audience: str | None = None
    token_issuer: str | None = None
    api_key: SecretStr | None = None
    allow_anonymous: bool = False
    log_url: str = "sqlite:///./eventcast-data/events.db"
    backplane_url: str = "memory://"
    namespaces: list[NamespaceConfig] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    max_message_size: int = Field(default=65536, gt=0)
    ping_interval: Duration = Field(default=25.0, gt=0)
    pong_timeout: Duration = Field(default=10.0, gt=0)
    client_queue_bytes: int = Field(default=1_048_576, gt=0)
    channels_per_connection: int = Field(default=128, gt=0)
    max_bad_commands: int = Field(default=10, gt=0)
    replay_cap: int = Field(default=300, gt=0)
    handshake_timeout: Duration = Field(default=10.0, gt=0)
    max_header_size: int = Field(default=16_384, ge=1024)
    max_body_size: int = Field(default=1_048_576, gt=0)
    body_timeout: Duration = Field(default=10.0, gt=0)
    forwarded_allow_ips: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    node_name: str = Field(default_factory=socket.gethostname, min_length=1)
    connections_per_user: int = Field(default=100, gt=0)
    connection_rate: float = Field(default=500.0, gt=0)
    command_rate: float = Field(default=100.0, gt=0)
    user_command_rate: float = Field(default=500.0, gt=0)
    sse_heartbeat: Duration = Field(default=25.0, gt=0)
    sse_retry: Duration = Field(default=2.0, gt=0)
    sse_cookie: str = "eventcast_token"
    presence_ttl: Duration = Field(default=60.0, gt=0)
    cluster_heartbeat: Duration = Field(default=3.0, gt=0)
    cluster_node_timeout: Duration = Field(default=10.0, gt=0)
    cluster_request_timeout: Duration = Field(default=1.0, gt=0)
    access_url: str | None = None
    access_reload: Duration = Field(default=10.0, gt=0)
    admin_token: SecretStr | None = None
    admin_session_ttl: Duration = Field(default=43_200.0, gt=0)
    admin_login_rate: float = Field(default=1.0, gt=0)
    asyncapi: bool = False
    token_jwks_url: str | None = None
    token_jwks_cache_ttl: Duration = Field(default=300.0, gt=0)
    token_jwks_min_refresh: Duration = Field(default=10.0, gt=0)
    proxy_connect_endpoint: str | None = None
    proxy_refresh_endpoint: str | None = None
    proxy_subscribe_endpoint: str | None = None
    proxy_publish_endpoint: str | None = None
    proxy_sub_refresh_endpoint: str | None = None
    proxy_rpc_endpoint: str | None = None
    proxy_connect_timeout: Duration = Field(default=1.0, gt=0)
    proxy_refresh_timeout: Duration = Field(default=1.0, gt=0)
    proxy_subscribe_timeout: Duration = Field(default=1.0, gt=0)
    proxy_publish_timeout: Duration = Field(default=1.0, gt=0)
    proxy_sub_refresh_timeout: Duration = Field(default=1.0, gt=0)
    proxy_rpc_timeout: Duration = Field(default=1.0, gt=0)
    proxy_http_headers: list[str] = Field(default_factory=list)
    proxy_binary_encoding: bool = False
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    webhook_timeout: Duration = Field(default=5.0, gt=0)
    webhook_retries: int = Field(default=10, ge=0)
    webhook_backoff: Duration = Field(default=0.5, gt=0)
    webhook_max_backoff: Duration = Field(default=30.0, gt=0)
    webhook_queue_size: int = Field(default=10_000, gt=0)
    webhook_vacated_delay: Duration = Field(default=5.0, ge=0)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    consumers: list[ConsumerConfig] = Field(default_factory=list)

    _namespaces_by_name: dict[str, NamespaceConfig] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides, then the environment, then the TOML file given to :meth:`load`."""
        return (
            init_settings,
            _EnvSource(settings_cls),
            InitSettingsSource(settings_cls, init_kwargs=_TOML_DATA.get()),
        )

    @classmethod
    def load(cls, config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
        """Build the settings from overrides, the environment, a TOML file and defaults.

        Args:
            config_file: a TOML file whose keys are the setting names (``api_key``,
                ``[[namespaces]]`` tables, ...), or ``None``.
            overrides: settings that win over every other source.

        Raises:
            ConfigurationError: the file is missing or malformed, a key is unknown,
                or a value is invalid (the message says which and why, never
                quoting a secret).
        """
        toml_data = {} if config_file is None else _read_toml(config_file)
        unknown = sorted(set(toml_data) - set(cls.model_fields))
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) in {os.fspath(config_file or '')}: {', '.join(unknown)}"
            )
        reset = _TOML_DATA.set(toml_data)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            # not chained: a ValidationError's text quotes input values, secrets included
            raise ConfigurationError(_describe(exc)) from None
        except SettingsError as exc:
            match = re.search(r'field "(\w+)"', str(exc))
            variable = f"EVENTCAST_{match.group(1).upper()}" if match else "an EVENTCAST_* variable"
            raise ConfigurationError(
                f"invalid environment setting: {variable} is not valid JSON"
            ) from exc
        finally:
            _TOML_DATA.reset(reset)

    @field_validator(*_LIST_FIELDS, mode="before")
    @classmethod
    def _parse_list(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                parsed: object = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a valid JSON list: {exc}") from exc
            return parsed
        return [item for item in re.split(r"[,\s]+", text) if item]

    @field_validator(
        "token_jwks_url",
        "proxy_connect_endpoint",
        "proxy_refresh_endpoint",
        "proxy_subscribe_endpoint",
        "proxy_publish_endpoint",
        "proxy_sub_refresh_endpoint",
        "proxy_rpc_endpoint",
    )
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return None if not value else _check_http_url(value)

    @field_validator("log_url", "backplane_url", "access_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("expected a URL such as 'memory://' or 'sqlite:///path/to/events.db'")
        return value

    @model_validator(mode="after")
    def _check_cluster_timeouts(self) -> Settings:
        if self.cluster_node_timeout <= self.cluster_heartbeat:
            raise ValueError(
                "cluster_node_timeout must be longer than cluster_heartbeat "
                "(a node is dropped after missing several heartbeats)"
            )
        return self

    @model_validator(mode="after")
    def _index_namespaces(self) -> Settings:
        by_name: dict[str, NamespaceConfig] = {}
        for namespace in self.namespaces:
            if namespace.name in by_name:
                raise ValueError(f"namespace {namespace.name!r} is configured twice")
            by_name[namespace.name] = namespace
        self._namespaces_by_name = by_name
        names = [consumer.name for consumer in self.consumers]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"consumer name(s) configured twice: {', '.join(twice)}")
        return self

    def namespace(self, channel: str) -> NamespaceConfig | None:
        """Return the options of a channel's namespace (the part before the first ``:``).

        Channels without a namespace get the ``""`` namespace, or the default
        options when it is not configured. A channel whose namespace is not
        configured gets ``None`` (the hub answers "unknown channel").
        """
        return self._namespace_table(channel)

    @functools.cached_property
    def _namespace_table(self) -> Callable[[str], NamespaceConfig | None]:
        # A pydantic private attribute costs ~2 µs to read, and this runs for every
        # publication and subscribe: resolve through a closure over a plain dict.
        by_name = dict(self._namespaces_by_name)
        default = by_name.get("", _DEFAULT_NAMESPACE)

        def resolve(channel: str) -> NamespaceConfig | None:
            name = namespace_of(channel)
            return by_name.get(name) if name else default

        return resolve

    def redacted(self) -> dict[str, Any]:
        """Return the settings as a JSON-compatible dict, for logging.

        Secrets set are replaced by ``"***"`` (unset ones stay ``None``), and
        passwords in URLs are masked.
        """
        data: dict[str, Any] = self.model_dump(mode="json")
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                data[name] = _REDACTED
        for name in ("log_url", "backplane_url", "access_url"):
            if data[name] is not None:
                data[name] = _redact_url(data[name])
        return data

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name in ("log_url", "backplane_url", "access_url") and isinstance(value, str):
                yield name, _redact_url(value)
            else:
                yield name, value


def _read_toml(config_file: str | os.PathLike[str]) -> dict[str, Any]:
    path = os.fspath(config_file)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from exc


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "invalid settings: " + "; ".join(problems)


def _redact_url(url: str) -> str:
    return redact_password(url, _REDACTED)
