"""Web apps the hub's tests run beside it: any ASGI app under uvicorn, in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

__all__ = ["listening_socket", "serve_app"]


def listening_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound on 127.0.0.1 (``port`` 0: a free one), for :func:`serve_app`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def serve_app(app: Any, sock: socket.socket, *, lifespan: str = "off") -> AsyncIterator[str]:
    """Serve an ASGI app on ``sock`` under uvicorn in this loop; yield its base URL.

    ``lifespan="on"`` runs the app's lifespan (a host app that opens a mounted hub).
    """
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    listening = asyncio.Event()
    startup = server.startup

    async def startup_then_signal(sockets: list[socket.socket] | None = None) -> None:
        try:
            await startup(sockets=sockets)
        finally:
            listening.set()

    server.startup = startup_then_signal  # type: ignore[method-assign]
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    ready = asyncio.ensure_future(listening.wait())
    try:
        await asyncio.wait({ready, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    assert server.started, "the app did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
