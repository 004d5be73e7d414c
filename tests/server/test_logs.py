"""Structured logs: JSON lines, and no secret in any of them."""

from __future__ import annotations

import json
import logging

import pytest

from eventcast.server._logs import (
    JSONFormatter,
    RedactingFilter,
    configure_logging,
    install_redaction,
    redact,
)


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


# -- redaction ---------------------------------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Query parameters whose decoded name looks secret, in any URL, any position.
        (
            "GET /connection/sse?topic=a&access_token=abc HTTP/1.1",
            "GET /connection/sse?topic=a&access_token=*** HTTP/1.1",
        ),
        ("/sse?access%5Ftoken=abc&topic=a", "/sse?access%5Ftoken=***&topic=a"),
        ("/sse?access%255Ftoken=abc", "/sse?access%255Ftoken=***"),
        ("/x?API-KEY=k1;session=s2&csrf=c3", "/x?API-KEY=***;session=***&csrf=***"),
        ("/x?topic=a&limit=10", "/x?topic=a&limit=10"),
        # The connect command of SSE emulation and the unidirectional transports.
        (
            "GET /connection/sse?cf_connect=%7B%22token%22%3A%22eyJh.eyJz.c2ln%22%7D HTTP/1.1",
            "GET /connection/sse?cf_connect=*** HTTP/1.1",
        ),
        ("location: http://h/sse/?token=abc", "location: http://h/sse/?token=***"),
        # Header values, in the forms a log line shows them.
        ("Authorization: Bearer abc.def", "Authorization: ***"),
        ("cookie: eventcast_admin=v1.2.3.4", "cookie: ***"),
        (
            "[(b'authorization', b'apikey k'), (b'host', b'h')]",
            "[(b'authorization', b'***'), (b'host', b'h')]",
        ),
        ("{'x-api-key': 'k', 'set-cookie': 'a=b'}", "{'x-api-key': '***', 'set-cookie': '***'}"),
        # A JWT anywhere.
        (f"GET /nowhere/{JWT} HTTP/1.1", "GET /nowhere/*** HTTP/1.1"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_the_filter_masks_arguments_extras_and_tracebacks() -> None:
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        import sys

        record = logging.makeLogRecord(
            {
                "name": "uvicorn.access",
                "levelname": "INFO",
                "msg": '%s - "%s %s HTTP/%s" %d',
                "args": ("127.0.0.1:1", "GET", "/sse?access_token=abc", "1.1", 200),
                "exc_info": sys.exc_info(),
                "peer": "/x?password=hunter2",
            }
        )
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == '127.0.0.1:1 - "GET /sse?access_token=*** HTTP/1.1" 200'
    assert record.peer == "/x?password=***"
    assert JWT not in (record.exc_text or "")
    assert "ValueError: bad token ***" in (record.exc_text or "")
    assert JWT not in JSONFormatter().format(record)


def test_uvicorns_loggers_redact_whoever_runs_the_hub(caplog: pytest.LogCaptureFixture) -> None:
    install_redaction()
    install_redaction()  # idempotent
    access = logging.getLogger("uvicorn.access")
    assert access.filters.count(access.filters[0]) == 1
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access.info('%s "%s"', "client", f"/sse?access_token={JWT}")
    assert JWT not in caplog.text
    assert "access_token=***" in caplog.text
