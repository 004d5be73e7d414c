"""Hub settings: environment, TOML file, precedence, namespaces, durations, secrets."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from eventcast import Namespace
from eventcast.exceptions import ConfigurationError
from eventcast.server.config import NamespaceConfig, Settings, parse_duration


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EVENTCAST_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "eventcast.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    settings = Settings.load()
    assert settings.token_hmac_secret is None
    assert settings.token_public_key is None
    assert settings.api_key is None
    assert settings.allow_anonymous is False
    assert settings.log_url == "sqlite:///./eventcast-data/events.db"
    assert settings.backplane_url == "memory://"
    assert settings.namespaces == []
    assert settings.allowed_origins == []
    assert settings.max_message_size == 65536
    assert (settings.ping_interval, settings.pong_timeout) == (25.0, 10.0)
    assert settings.client_queue_bytes == 1_048_576
    assert settings.channels_per_connection == 128
    assert settings.max_bad_commands == 10
    assert settings.replay_cap == 300
    assert settings.handshake_timeout == 10.0
    assert settings.node_name == socket.gethostname()
    # The HTTP surface (docs/security.md).
    assert settings.max_header_size == 16_384
    assert settings.max_body_size == 1_048_576
    assert settings.body_timeout == 10.0
    assert settings.forwarded_allow_ips == ["127.0.0.1", "::1"]
    assert settings.admin_session_ttl == 43_200.0
    assert settings.admin_login_rate == 1.0


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTCAST_TOKEN_HMAC_SECRET", "env-secret")
    monkeypatch.setenv("EVENTCAST_API_KEY", "env-api-key")
    monkeypatch.setenv("EVENTCAST_TOKEN_AUDIENCE", "aud")
    monkeypatch.setenv("EVENTCAST_ALLOW_ANONYMOUS", "true")
    monkeypatch.setenv("EVENTCAST_MAX_MESSAGE_SIZE", "1024")
    monkeypatch.setenv("EVENTCAST_PING_INTERVAL", "30s")
    monkeypatch.setenv("EVENTCAST_NODE_NAME", "node-7")
    settings = Settings.load()
    assert settings.token_hmac_secret == SecretStr("env-secret")
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "env-api-key"
    assert settings.token_audience == "aud"
    assert settings.allow_anonymous is True
    assert settings.max_message_size == 1024
    assert settings.ping_interval == 30.0
    assert settings.node_name == "node-7"


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        api_key = "file-key"
        token_issuer = "https://auth.example"
        backplane_url = "redis://localhost:6379/0"
        allowed_origins = ["https://example.com"]
        handshake_timeout = 3

        [[namespaces]]
        name = "chat"
        history_size = 100
        history_ttl = "1h30m"
        allow_subscribe_for_client = true
        """,
    )
    settings = Settings.load(path)
    assert settings.api_key == SecretStr("file-key")
    assert settings.token_issuer == "https://auth.example"
    assert settings.backplane_url == "redis://localhost:6379/0"
    assert settings.allowed_origins == ["https://example.com"]
    assert settings.handshake_timeout == 3.0
    [chat] = settings.namespaces
    assert chat.name == "chat"
    assert chat.history_size == 100
    assert chat.history_ttl == 5400.0
    assert chat.allow_subscribe_for_client is True
    assert chat.allow_publish_for_client is False


def test_precedence_overrides_then_environment_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        'api_key = "from-file"\ntoken_audience = "file-aud"\ntoken_issuer = "file-iss"\n',
    )
    monkeypatch.setenv("EVENTCAST_API_KEY", "from-env")
    monkeypatch.setenv("EVENTCAST_TOKEN_AUDIENCE", "env-aud")
    settings = Settings.load(path, api_key="from-override")
    assert settings.api_key == SecretStr("from-override")  # override > env
    assert settings.token_audience == "env-aud"  # env > file
    assert settings.token_issuer == "file-iss"  # file > default
    assert settings.replay_cap == 300  # default


def test_namespaces_from_environment_json_with_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "EVENTCAST_NAMESPACES",
        '[{"name": "chat", "history_size": 10, "history_ttl": "5m", "presence": true},'
        ' {"name": "", "history_ttl": 90}]',
    )
    settings = Settings.load()
    chat, default = settings.namespaces
    assert chat.history_ttl == 300.0
    assert chat.presence is True
    assert default.history_ttl == 90.0
    assert settings.namespace("chat:room") is chat
    assert settings.namespace("plain.topic") is default


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("300s", 300.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("250us", 0.00025),
        ("42", 42.0),
        (7, 7.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5x", "", "m5", "5 m", "-5s", "1h-30m", "inf", True, None])
def test_invalid_duration_is_a_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_invalid_duration_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTCAST_NAMESPACES", '[{"name": "chat", "history_ttl": "5 minutes"}]')
    with pytest.raises(ConfigurationError, match=r"namespaces\.0\.history_ttl: invalid duration"):
        Settings.load()


@pytest.mark.parametrize("name", ["a b", "chat:room", "a.b", "é"])
def test_invalid_namespace_name_is_a_configuration_error(name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid namespace name"):
        Settings.load(namespaces=[{"name": name}])


def test_namespace_validation() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        NamespaceConfig(name="chat", history_size=-1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        NamespaceConfig.model_validate({"name": "chat", "history_lifetime": 3})
    with pytest.raises(ConfigurationError, match="configured twice"):
        Settings.load(namespaces=[{"name": "chat"}, {"name": "chat"}])


def test_namespace_config_is_frozen_and_converts_to_bus_options() -> None:
    config = NamespaceConfig.model_validate(
        {"name": "chat", "history_size": 50, "history_ttl": "5m"}
    )
    assert config.to_bus() == Namespace(history_size=50, history_ttl=300.0)
    assert NamespaceConfig(name="live").to_bus() == Namespace(history_size=0, history_ttl=None)
    assert config.allow_recovery is True
    assert config.allow_patterns is False
    with pytest.raises(ValidationError):
        config.history_size = 1


def test_namespace_lookup() -> None:
    settings = Settings.load(namespaces=[{"name": "chat", "allow_publish_for_client": True}])
    chat = settings.namespace("chat:room.1")
    assert chat is not None
    assert chat.allow_publish_for_client is True
    assert settings.namespace("unknown:room") is None
    default = settings.namespace("news.sport")
    assert default == NamespaceConfig(name="")


@pytest.mark.parametrize(
    ("raw", "origins"),
    [
        ('["https://a.example", "https://b.example"]', ["https://a.example", "https://b.example"]),
        ("https://a.example, https://b.example", ["https://a.example", "https://b.example"]),
        ("https://a.example", ["https://a.example"]),
        ("*", ["*"]),
        ("", []),
    ],
)
def test_allowed_origins_from_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, origins: list[str]
) -> None:
    monkeypatch.setenv("EVENTCAST_ALLOWED_ORIGINS", raw)
    assert Settings.load().allowed_origins == origins


@pytest.mark.parametrize(
    ("raw", "hosts"),
    [
        ("10.0.0.1, 10.0.0.2", ["10.0.0.1", "10.0.0.2"]),
        ('["192.168.0.0/16"]', ["192.168.0.0/16"]),
        ("*", ["*"]),
    ],
)
def test_forwarded_allow_ips_from_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, hosts: list[str]
) -> None:
    monkeypatch.setenv("EVENTCAST_FORWARDED_ALLOW_IPS", raw)
    assert Settings.load().forwarded_allow_ips == hosts


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_header_size", 512),  # too small for any real request
        ("max_body_size", 0),
        ("body_timeout", 0),
        ("admin_session_ttl", 0),
        ("admin_login_rate", 0),
    ],
)
def test_http_limits_must_be_finite_and_positive(name: str, value: int) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings.load(**{name: value})


def test_allowed_origins_bad_json_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENTCAST_ALLOWED_ORIGINS", '["https://a.example",')
    with pytest.raises(ConfigurationError, match="allowed_origins"):
        Settings.load()


def test_malformed_environment_json_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENTCAST_NAMESPACES", '[{"name": ')
    with pytest.raises(ConfigurationError, match="EVENTCAST_NAMESPACES is not valid JSON"):
        Settings.load()


def test_missing_toml_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="config file not found"):
        Settings.load(tmp_path / "nope.toml")


def test_malformed_toml_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        Settings.load(write(tmp_path, "api_key = \n"))


def test_unknown_toml_key_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown setting.*api_keyy"):
        Settings.load(write(tmp_path, 'api_keyy = "x"\n'))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_message_size": 0}, "max_message_size"),
        ({"ping_interval": "0s"}, "ping_interval"),
        ({"max_bad_commands": -1}, "max_bad_commands"),
        ({"log_url": "events.db"}, "log_url"),
        ({"access_url": "events.db"}, "access_url"),
        ({"no_such_setting": 1}, "no_such_setting"),
        ({"cluster_heartbeat": 5, "cluster_node_timeout": 5}, "cluster_node_timeout"),
        ({"cluster_request_timeout": 0}, "cluster_request_timeout"),
    ],
)
def test_invalid_values_are_configuration_errors(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        Settings.load(**overrides)


def test_invalid_secret_is_reported_without_its_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="token_hmac_secret") as excinfo:
        Settings.load(write(tmp_path, "token_hmac_secret = 987654321\n"))
    assert "987654321" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


def test_secrets_are_masked_in_repr_str_and_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTCAST_TOKEN_HMAC_SECRET", "hmac-s3cret")
    monkeypatch.setenv("EVENTCAST_API_KEY", "api-s3cret")
    monkeypatch.setenv("EVENTCAST_LOG_URL", "postgresql://eventcast:db-s3cret@db.local/events")
    monkeypatch.setenv("EVENTCAST_ACCESS_URL", "redis://:acl-s3cret@redis.local:6379/0")
    settings = Settings.load()
    for text in (repr(settings), str(settings), str(settings.redacted())):
        assert "hmac-s3cret" not in text
        assert "api-s3cret" not in text
        assert "db-s3cret" not in text
        assert "acl-s3cret" not in text
    redacted = settings.redacted()
    assert redacted["token_hmac_secret"] == "***"
    assert redacted["api_key"] == "***"
    assert redacted["token_public_key"] is None
    assert redacted["log_url"] == "postgresql://eventcast:***@db.local/events"
    assert redacted["max_message_size"] == 65536
    assert settings.log_url == "postgresql://eventcast:db-s3cret@db.local/events"


def test_settings_are_immutable() -> None:
    settings = Settings.load()
    with pytest.raises(ValidationError):
        settings.api_key = SecretStr("x")


def test_hook_proxy_and_webhook_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings.load()
    assert defaults.proxy_connect_endpoint is None
    assert (defaults.proxy_connect_timeout, defaults.proxy_rpc_timeout) == (1.0, 1.0)
    assert defaults.proxy_http_headers == []
    assert defaults.webhooks == []
    assert (defaults.webhook_retries, defaults.webhook_queue_size) == (10, 10_000)
    assert defaults.token_jwks_url is None

    monkeypatch.setenv("EVENTCAST_PROXY_CONNECT_ENDPOINT", "http://backend:3000/connect")
    monkeypatch.setenv("EVENTCAST_PROXY_CONNECT_TIMEOUT", "500ms")
    monkeypatch.setenv("EVENTCAST_PROXY_HTTP_HEADERS", "Cookie, Authorization X-Request-Id")
    monkeypatch.setenv(
        "EVENTCAST_WEBHOOKS",
        '[{"url": "https://hooks.example/in", "events": ["connect"], "secret": "whsec_c2VjcmV0"}]',
    )
    monkeypatch.setenv("EVENTCAST_TOKEN_JWKS_URL", "https://idp.example/.well-known/jwks.json")
    settings = Settings.load()
    assert settings.proxy_connect_endpoint == "http://backend:3000/connect"
    assert settings.proxy_connect_timeout == 0.5
    assert settings.proxy_http_headers == ["Cookie", "Authorization", "X-Request-Id"]
    (hook,) = settings.webhooks
    assert (hook.url, hook.events) == ("https://hooks.example/in", ("connect",))
    assert "whsec_c2VjcmV0" not in repr(settings)
    assert settings.redacted()["webhooks"][0]["secret"] == "**********"
    assert settings.token_jwks_url == "https://idp.example/.well-known/jwks.json"

    monkeypatch.delenv("EVENTCAST_WEBHOOKS")
    path = write(
        tmp_path,
        """
        [[webhooks]]
        url = "http://127.0.0.1:9000/events"

        [[namespaces]]
        name = "chat"
        proxy_subscribe = true
        proxy_publish = true
        """,
    )
    from_file = Settings.load(path)
    assert from_file.webhooks[0].events == (
        "connect",
        "disconnect",
        "channel_occupied",
        "channel_vacated",
    )
    chat = from_file.namespace("chat:1")
    assert chat is not None
    assert (chat.proxy_subscribe, chat.proxy_publish, chat.proxy_sub_refresh) == (True, True, False)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"proxy_rpc_endpoint": "ftp://backend/rpc"}, "proxy_rpc_endpoint"),
        ({"token_jwks_url": "backend/jwks"}, "token_jwks_url"),
        ({"webhooks": [{"url": "mailto:ops@example.com"}]}, "webhooks.0.url"),
        ({"webhooks": [{"url": "http://x/", "events": ["joined"]}]}, "webhooks.0.events"),
        ({"proxy_publish_timeout": 0}, "proxy_publish_timeout"),
    ],
)
def test_invalid_hook_settings(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field.replace(".", r"\.")):
        Settings.load(**overrides)


def test_wire_options_of_a_namespace() -> None:
    """Issue 17's options: their defaults, values, and what is refused."""
    settings = Settings.load(
        namespaces=[
            {
                "name": "ticker",
                "history_size": 1,
                "allowed_delta_types": ["fossil"],
                "allow_tags_filter": False,
                "force_recovery_mode": "cache",
                "conflation_key": "symbol",
            },
            {"name": "plain"},
        ]
    )
    ticker = settings.namespace("ticker:x")
    assert ticker is not None
    assert ticker.allowed_delta_types == ["fossil"]
    assert (ticker.allow_tags_filter, ticker.force_recovery_mode) == (False, "cache")
    assert ticker.conflation_key == "symbol"
    plain = settings.namespace("plain:x")
    assert plain is not None
    assert (plain.allowed_delta_types, plain.allow_tags_filter) == ([], True)
    assert (plain.force_recovery_mode, plain.conflation_key) == ("stream", None)
    for bad, why in (
        ({"allowed_delta_types": ["xdelta"]}, "allowed_delta_types"),
        ({"force_recovery_mode": "cache"}, "history"),
        ({"force_recovery_mode": "other"}, "force_recovery_mode"),
        ({"conflation_key": ""}, "conflation_key"),
    ):
        with pytest.raises(ConfigurationError, match=why):
            Settings.load(namespaces=[{"name": "x", **bad}])
