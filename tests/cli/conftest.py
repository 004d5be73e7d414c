"""The CLI tests use the hub fixtures of the server tests (in-process and ``eventcast serve``)."""

from __future__ import annotations

import os

import pytest

from tests.server.conftest import hub, hub_process, start_hub

__all__ = ["hub", "hub_process", "start_hub"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EVENTCAST_* variable of the caller leaks into the commands under test."""
    for name in list(os.environ):
        if name.upper().startswith("EVENTCAST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")  # rich tables wide enough to hold whole cells
