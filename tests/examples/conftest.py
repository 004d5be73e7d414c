"""Fixtures of the examples' tests: a hub with examples/eventcast.toml's namespaces, app servers."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.server.apptools import serve_app
from tests.server.conftest import StartHub, start_hub
from tests.server.hubtools import API_KEY, HubServer

__all__ = ["serve_app", "start_hub"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIG = tomllib.loads((EXAMPLES / "eventcast.toml").read_text(encoding="utf-8"))


def example_env(hub: HubServer, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EVENTCAST_")}
    env.update(EVENTCAST_URL=hub.base, EVENTCAST_API_KEY=API_KEY, **extra)
    return env


def load_example(relative: str) -> ModuleType:
    """Import an example file as a module (examples/ is not a package)."""
    path = EXAMPLES / relative
    name = "eventcast_example_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def run_example(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python examples/<args>`` without blocking the loop (the hub runs in it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=EXAMPLES.parent,
    )
    async with asyncio.timeout(90):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def examples_hub(start_hub: StartHub) -> Callable[..., Awaitable[HubServer]]:
    """Start an in-process hub with the examples' namespaces (and ``overrides``)."""

    async def start(**overrides: Any) -> HubServer:
        return await start_hub(namespaces=CONFIG["namespaces"], **overrides)

    return start


@pytest.fixture
async def app_socket() -> AsyncIterator[socket.socket]:
    """A listening socket for a web app, bound before the app exists (its origin is known)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()
