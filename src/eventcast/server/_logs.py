"""Logging for ``eventcast serve``: plain text or one JSON object per line, secrets masked.

Nothing eventcast logs contains a token or a message body: tokens are never
formatted into messages, and errors about data name its type, not its content.
What others log about a request (uvicorn's access log with the request target,
its error log, a proxy's ``Location``) passes through :func:`redact`, the one
place secrets are masked, applied by :class:`RedactingFilter` to every record:

* query parameters whose **decoded** name looks secret (``access_token``,
  ``access%5Ftoken``, ``api_key``, ``session``, ``csrf`` …), in any URL of the
  line, whatever the status or path; ``cf_connect`` too, the connect command of
  the SSE emulation and unidirectional transports (its token and data);
* the values of ``Authorization``, ``Proxy-Authorization``, ``Cookie``,
  ``Set-Cookie``, ``X-API-Key`` and ``X-CSRF-Token`` headers, in the forms a log
  line shows them (``name: value``, a scope's ``(b'name', b'value')``, a dict);
* anything shaped like a JWT, wherever it appears (a path, a ``Location``).

:func:`install_redaction` puts the filter on uvicorn's loggers (so the hub is
redacted even when another program runs uvicorn); :func:`configure_logging` also
puts it on the handler ``eventcast serve`` writes with, which covers every logger.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote_plus

__all__ = ["JSONFormatter", "RedactingFilter", "configure_logging", "install_redaction", "redact"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"color_message", "message", "asctime"}

#: What replaces a secret.
MASK: Final = "***"
#: A query parameter whose decoded, lower-cased name contains one of these holds a secret.
_SECRET_WORDS: Final = (
    "token",
    "key",
    "secret",
    "passw",
    "auth",
    "session",
    "csrf",
    "cookie",
    "jwt",
    "credential",
    "signature",
    # cf_connect: a whole connect command (a token, the client's data).
    "connect",
)
# Possessive quantifiers and a look-behind: every pattern scans its input once (linear
# time whatever the text), which a log line built from a request target needs.
_QUERY_PARAM: Final = re.compile(
    r"(?P<lead>[?&;])(?P<name>[^=&;#?\s\"'<>]++)=(?P<value>[^&;#\s\"'<>]*+)"
)
_HEADER: Final = re.compile(
    r"(?P<name>\b(?i:proxy-authorization|authorization|set-cookie|cookie|x-api-key|x-csrf-token))"
    r"(?P<sep>['\"]?\s*+[:,]\s*+(?:b(?=['\"]))?['\"]?)(?P<value>[^'\"\r\n]++)"
)
_JWT: Final = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]++\.[A-Za-z0-9_-]++\.[A-Za-z0-9_-]*+")


def _secret_name(raw: str) -> bool:
    name = raw
    for _ in range(3):  # decode until stable: access%255Ftoken is access%5Ftoken once decoded
        decoded = unquote_plus(name, errors="replace")
        if decoded == name:
            break
        name = decoded
    folded = name.lower()
    return any(word in folded for word in _SECRET_WORDS)


def _mask_param(match: re.Match[str]) -> str:
    if not match["value"] or not _secret_name(match["name"]):
        return match[0]
    return f"{match['lead']}{match['name']}={MASK}"


def redact(text: str) -> str:
    """Mask the secrets in one piece of log text (see the module's docstring)."""
    if "=" in text:
        text = _QUERY_PARAM.sub(_mask_param, text)
    text = _HEADER.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)
    if "eyJ" in text:
        text = _JWT.sub(MASK, text)
    return text


def _redact_value(value: object) -> object:
    """A log argument with its secrets masked (the same object when it holds none)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else str(value)
    masked = redact(text)
    return value if masked == text else masked


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, arguments, extras and traceback (never drops it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_redact_value(a) for a in args)
        elif isinstance(args, Mapping):
            record.args = {k: _redact_value(v) for k, v in args.items()}
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER: Final = RedactingFilter()
#: The loggers of the server that runs the hub (uvicorn hands its logger to websockets).
_SERVER_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def install_redaction() -> None:
    """Put the redacting filter on uvicorn's loggers (idempotent)."""
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class JSONFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Send eventcast's and uvicorn's logs to stderr, as text or JSON lines, secrets masked."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(_FILTER)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    install_redaction()
