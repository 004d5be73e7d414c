"""Shared pieces of the hub-facing commands: errors, URLs, argument parsing."""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

from ..events import EARLIEST, Position
from ..exceptions import InvalidTopicError
from ..topics import validate_pattern, validate_topic

__all__ = [
    "DEFAULT_URL",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "fail",
    "http_base",
    "parse_json",
    "parse_position",
    "parse_since",
    "pattern_arg",
    "topic_arg",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

#: The hub a command talks to without ``--url`` or ``EVENTCAST_URL``.
DEFAULT_URL: Final = "http://127.0.0.1:8000"


class CliError(Exception):
    """An expected failure: one line on stderr and an exit code, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int = EXIT_ERROR) -> NoReturn:
    raise CliError(message, exit_code)


def http_base(url: str) -> str:
    """The hub's HTTP base URL (``ws://`` -> ``http://``, no trailing ``/``).

    Raises:
        CliError: (exit code 2) the URL is not ``http``, ``https``, ``ws`` or ``wss``.
    """
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018  # validates the port
    except ValueError as exc:
        fail(f"invalid --url {url!r}: {exc}", EXIT_USAGE)
    scheme = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(
        parts.scheme.lower()
    )
    if scheme is None or not parts.netloc:
        fail(
            f"invalid --url {url!r}: use http://HOST:PORT (or https://, ws://, wss://)",
            EXIT_USAGE,
        )
    path = parts.path.rstrip("/").removesuffix("/connection/websocket")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def topic_arg(topic: str) -> str:
    """Validate a concrete topic name locally (exit code 2 when invalid)."""
    try:
        return validate_topic(topic)
    except InvalidTopicError as exc:
        fail(f"invalid topic {topic!r}: {exc}", EXIT_USAGE)


def pattern_arg(pattern: str) -> str:
    """Validate a topic or pattern locally (exit code 2 when invalid)."""
    try:
        return validate_pattern(pattern)
    except InvalidTopicError as exc:
        fail(f"invalid topic pattern {pattern!r}: {exc}", EXIT_USAGE)


def parse_json(text: str, what: str) -> Any:
    """Decode one JSON value (exit code 2 when invalid)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{what} is not valid JSON: {exc}", EXIT_USAGE)


def parse_position(text: str, option: str = "--since") -> Position:
    """Parse ``OFFSET:EPOCH`` (exit code 2 when malformed)."""
    offset_text, sep, epoch = text.partition(":")
    if not sep or not offset_text.isdigit():
        fail(
            f"{option} must be OFFSET:EPOCH (e.g. 41:Xq3d, as printed by publish or history), "
            f"not {text!r}",
            EXIT_USAGE,
        )
    return Position(int(offset_text), epoch)


def parse_since(text: str) -> Position | str:
    """Parse ``earliest`` or ``OFFSET:EPOCH`` (exit code 2 when malformed)."""
    if text.strip().lower() == EARLIEST:
        return EARLIEST
    return parse_position(text)
