"""Logging for ``eventcast serve``: plain text or one JSON object per line.

Nothing eventcast logs contains a token or a message body: tokens are never
formatted into messages, the SSE ``access_token`` parameter is redacted from
the request line before uvicorn's access log reads it, and errors about data
name its type, not its content.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["JSONFormatter", "configure_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"color_message", "message", "asctime"}


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
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Send eventcast's and uvicorn's logs to stderr, as text or JSON lines."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
