"""The ``eventcast`` command line: token minting, serve wiring, exit codes, error output."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from eventcast import __version__
from eventcast.cli import main
from eventcast.exceptions import InvalidTokenError
from eventcast.server.auth import TokenVerifier
from eventcast.server.config import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EVENTCAST_"):
            monkeypatch.delenv(name)


def assert_one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_token_prints_a_token_that_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--user", "u1", "--secret", "s"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    token = out.strip()
    assert out == token + "\n"
    claims = TokenVerifier(hmac_secret="s").verify_connection(token)
    assert claims.user == "u1"
    assert claims.expires_at is not None


def test_token_with_channels_info_and_no_expiry(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["token", "-u", "u1", "--secret", "s", "--ttl", "0"]
    argv += ["--channel", "news", "--channel", "chat:lobby", "--info", '{"name": "Ann"}']
    assert main(argv) == 0
    claims = TokenVerifier(hmac_secret="s").verify_connection(capsys.readouterr().out.strip())
    assert claims.channels == ("news", "chat:lobby")
    assert claims.info == {"name": "Ann"}
    assert claims.expires_at is None


def test_subscription_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--user", "u1", "--secret", "s", "--sub-channel", "chat:room"]) == 0
    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier(hmac_secret="s")
    assert verifier.verify_subscription(token, user="u1", channel="chat:room").expires_at
    with pytest.raises(InvalidTokenError, match="subscription token"):
        verifier.verify_connection(token)


def test_token_secret_audience_and_issuer_come_from_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "eventcast.toml"
    config.write_text('token_audience = "aud"\ntoken_issuer = "iss"\n', encoding="utf-8")
    monkeypatch.setenv("EVENTCAST_TOKEN_HMAC_SECRET", "env-secret")
    assert main(["token", "--user", "u9", "--config", str(config)]) == 0
    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier(hmac_secret="env-secret", audience="aud", issuer="iss")
    assert verifier.verify_connection(token).user == "u9"


def test_missing_secret_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--user", "u1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = assert_one_error_line(err)
    assert "EVENTCAST_TOKEN_HMAC_SECRET" in line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--info", "{not json"], "--info is not valid JSON"),
        (["--channel", "bad name"], "invalid character"),
        (["--channel", "a", "--sub-channel", "b"], "either --channel"),
    ],
)
def test_bad_token_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    assert main(["token", "--user", "u1", "--secret", "s", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert expected in assert_one_error_line(err)


def test_bad_config_file_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "--user", "u1", "--secret", "s", "--config", str(tmp_path / "x")]) == 2
    assert "config file not found" in assert_one_error_line(capsys.readouterr().err)


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--user", "u1", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "--bogus" in err
    assert "Traceback" not in err


def test_help_exits_0_and_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "token" in out
    assert "serve" in out
    assert "Exit codes" in out
    assert main(["token", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--sub-channel" in out
    assert "eventcast token --user alice" in out


def test_main_without_argv_uses_sys_argv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["eventcast", "--version"])
    assert main() == 0
    assert capsys.readouterr().out.strip() == f"eventcast {__version__}"


def test_serve_loads_settings_and_calls_the_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Settings, dict[str, Any]]] = []
    fake = types.ModuleType("eventcast.server.app")

    def serve(settings: Settings, **kwargs: Any) -> None:
        calls.append((settings, kwargs))

    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "eventcast.server.app", fake)
    monkeypatch.setenv("EVENTCAST_NODE_NAME", "node-a")
    assert main(["serve", "--host", "0.0.0.0", "--port", "9001"]) == 0
    [(settings, kwargs)] = calls
    assert isinstance(settings, Settings)
    assert settings.node_name == "node-a"
    assert kwargs == {"host": "0.0.0.0", "port": 9001}


def test_serve_without_the_server_module_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "eventcast.server.app", None)
    assert main(["serve"]) == 1
    assert "hub server is not available" in assert_one_error_line(capsys.readouterr().err)


def test_serve_with_invalid_settings_is_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EVENTCAST_MAX_MESSAGE_SIZE", "-5")
    assert main(["serve"]) == 2
    assert "max_message_size" in assert_one_error_line(capsys.readouterr().err)


def test_python_dash_m_entry_point_exits_0_on_help() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EVENTCAST_")}
    result = subprocess.run(
        [sys.executable, "-m", "eventcast", "token", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--user" in result.stdout
