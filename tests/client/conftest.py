"""Fixtures of the client tests: the hub fixtures of tests/server, and fake servers."""

from __future__ import annotations

from tests.server.conftest import hub, start_hub  # noqa: F401  (fixtures)
