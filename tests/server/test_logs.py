"""Structured logs: JSON lines, no tokens."""

from __future__ import annotations

import json
import logging

from eventcast.server._logs import JSONFormatter, configure_logging


def test_json_formatter_writes_one_object_per_record():
    record = logging.makeLogRecord(
        {
            "name": "eventcast.server",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "client %s is slow",
            "args": ("abc",),
            "node": "n1",
        }
    )
    line = JSONFormatter().format(record)
    data = json.loads(line)
    assert data["level"] == "warning"
    assert data["logger"] == "eventcast.server"
    assert data["message"] == "client abc is slow"
    assert data["node"] == "n1"
    assert "\n" not in line


def test_json_formatter_keeps_exceptions_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.makeLogRecord(
            {"name": "x", "levelname": "ERROR", "msg": "failed", "exc_info": sys.exc_info()}
        )
    data = json.loads(JSONFormatter().format(record))
    assert "ValueError: boom" in data["exception"]


def test_configure_logging_routes_uvicorn_through_the_root_handler():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "warning")
        assert isinstance(root.handlers[0].formatter, JSONFormatter)
        assert root.level == logging.WARNING
        assert logging.getLogger("uvicorn.access").propagate is True
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
