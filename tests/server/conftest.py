"""Fixtures that run the real hub on a real socket: in-process under uvicorn, or as a subprocess.

The in-process server is built exactly as ``eventcast serve`` builds it
(:func:`~eventcast.server.app.uvicorn_config`: uvicorn's websockets-sansio
protocol, so the hub's fast path writes pre-framed bytes to the transport), and
runs as a task in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from eventcast.server.app import HubApp, create_app, make_server, uvicorn_config
from eventcast.server.config import Settings
from eventcast.server.hooks import Hooks

from .hubtools import (
    AUDIENCE,
    MAX_BAD,
    MAX_MESSAGE,
    HubServer,
    RawClient,
    Witness,
    free_port,
    make_settings,
    tok,
    write_config,
)

StartHub = Callable[..., Awaitable[HubServer]]


def _server(app: HubApp, options: dict[str, Any]) -> tuple[uvicorn.Server, asyncio.Event]:
    """The uvicorn server ``eventcast serve`` runs, and an event set once it listens.

    (Or gave up starting: check ``server.started``.)
    """
    server: uvicorn.Server = make_server(app, uvicorn.Config(app, **options))
    ready = asyncio.Event()
    startup = server.startup

    async def startup_then_signal(sockets: list[socket.socket] | None = None) -> None:
        try:
            await startup(sockets=sockets)
        finally:
            ready.set()

    server.startup = startup_then_signal  # type: ignore[method-assign]
    return server, ready


@pytest.fixture
async def start_hub(tmp_path: Path) -> AsyncIterator[StartHub]:
    """Start in-process hubs (``await start_hub(hooks=..., **settings)``); stop them after."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(*, hooks: Hooks | None = None, **overrides: Any) -> HubServer:
        directory = tmp_path / f"hub{len(running)}"
        directory.mkdir()
        settings = make_settings(directory, **overrides)
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only
        # when the listening socket says it is TCP (with proto 0, every response
        # written in two parts waits 40 ms for a delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = create_app(settings, hooks=hooks)
        options = uvicorn_config(settings, host="127.0.0.1", port=port)
        options["log_level"] = "warning"
        server, listening = _server(app, options)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        running.append((server, task))
        ready = asyncio.ensure_future(listening.wait())
        try:
            await asyncio.wait({ready, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not server.started:
            if task.done():
                task.result()
            raise RuntimeError("uvicorn did not start")
        return HubServer(base=f"http://127.0.0.1:{port}", settings=settings, app=app)

    try:
        yield start
    finally:
        for server, task in reversed(running):
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(15):
                    await task


@pytest.fixture
async def hub(start_hub: StartHub) -> HubServer:
    """An in-process hub with the default test settings."""
    return await start_hub()


@pytest.fixture
async def strict(start_hub: StartHub) -> HubServer:
    """A hub with a small frame limit, few bad commands allowed, and a token audience."""
    return await start_hub(
        max_message_size=MAX_MESSAGE, max_bad_commands=MAX_BAD, token_audience=AUDIENCE
    )


@pytest.fixture
async def witness(strict: HubServer) -> AsyncIterator[Witness]:
    """A well-behaved subscriber; calling it checks it still gets the next publication."""
    client = await RawClient.open(strict.ws_url)
    await client.connect(tok("witness"))
    await client.subscribe("witness.feed")
    serial = count(1)

    async def check() -> None:
        n = next(serial)
        await strict.publish("witness.feed", {"n": n})
        push = await client.publication()
        assert push == {"channel": "witness.feed", "pub": {"data": {"n": n}, "offset": n}}

    await check()
    yield check
    await check()
    await client.close()


# -- a real browser ------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's headless Chromium, driven by playwright (skipped when either is missing)."""
    playwright_api = pytest.importorskip("playwright.async_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


# -- a real ``eventcast serve`` process ------------------------------------------------------


@pytest.fixture(scope="module")
def hub_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """``eventcast serve --port N --config file.toml`` as a subprocess (one per module)."""
    directory = tmp_path_factory.mktemp("hub-process")
    config = write_config(directory / "eventcast.toml", directory)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "eventcast", "serve", "--port", str(port), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if "Uvicorn running on" in line:
                started.set()
        started.set()  # the process ended: stop waiting

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not started.wait(30) or process.poll() is not None:
            pytest.fail("eventcast serve did not start:\n" + "".join(output))
        settings = Settings.load(config)
        yield HubServer(base=f"http://127.0.0.1:{port}", settings=settings)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        reader.join(5)
        if process.stdout is not None:
            process.stdout.close()
    log = "".join(output)
    assert process.returncode == 0, log  # a clean shutdown on SIGTERM
    assert "Traceback" not in log, log
