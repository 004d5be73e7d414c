"""Rendering helpers: JSON lines and rich text for events."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

__all__ = ["compact_json", "event_line", "json_line", "stderr_console", "stdout_console"]


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_line(value: Any) -> None:
    """Write one JSON object and a newline to stdout, flushed (pipes see it at once)."""
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def event_line(
    topic: str, offset: int | None, epoch: str | None, data: Any, when: float | None = None
) -> str:
    """One event as rich markup: time, topic, position, data."""
    stamp = time.strftime("%H:%M:%S", time.localtime(when if when is not None else time.time()))
    where = f" [magenta]#{offset}[/]" if offset else ""
    body = escape(compact_json(data))
    return f"[dim]{stamp}[/] [bold cyan]{escape(topic)}[/]{where} {body}"
