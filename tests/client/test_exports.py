"""The client's public names, and the lazy import that keeps the core free of websockets."""

from __future__ import annotations

import subprocess
import sys

import eventcast
import eventcast.client
import eventcast.exceptions
import eventcast.sync


def test_connect_is_exported() -> None:
    assert "connect" in eventcast.__all__
    assert eventcast.connect is eventcast.client.connect
    assert eventcast.sync.connect.__module__ == "eventcast.sync"


def test_new_errors_are_eventcast_errors() -> None:
    for name in (
        "HubClientError",
        "HandshakeError",
        "ReplyError",
        "ReplyTimeoutError",
        "DisconnectedError",
        "ClientClosedError",
        "PositionLostError",
    ):
        assert name in eventcast.exceptions.__all__
        assert issubclass(getattr(eventcast.exceptions, name), eventcast.EventcastError)
    assert eventcast.exceptions.__all__ == sorted(eventcast.exceptions.__all__)


def test_import_eventcast_does_not_import_websockets() -> None:
    code = (
        "import sys, eventcast\n"
        "assert 'websockets' not in sys.modules, 'imported eagerly'\n"
        "eventcast.connect\n"
        "assert 'websockets' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
