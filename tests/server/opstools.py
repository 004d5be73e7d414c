"""More helpers of the hub's integration tests: fake clocks, SDK event recorders, metrics,
a real ``eventcast serve`` process that can be stopped and restarted, and a TCP gate.

(``hubtools`` and ``conftest`` belong to another change; the extra helpers live here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    ErrorContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscribedContext,
    SubscribingContext,
    SubscriptionErrorContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)
from prometheus_client.parser import text_string_to_metric_families

from .hubtools import WAIT


class FakeClock:
    """A clock that moves only when told to (inject it as ``clock=``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- centrifuge-python ---------------------------------------------------------------------


class Recorder:
    """Events of one client or subscription, by kind, awaited in order."""

    def __init__(self) -> None:
        self.queues: defaultdict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        self.counts: defaultdict[str, int] = defaultdict(int)

    def put(self, kind: str, ctx: Any) -> None:
        self.counts[kind] += 1
        self.queues[kind].put_nowait(ctx)

    async def next(self, kind: str, timeout: float = WAIT) -> Any:
        return await asyncio.wait_for(self.queues[kind].get(), timeout)

    async def take(self, kind: str, n: int) -> list[Any]:
        return [await self.next(kind) for _ in range(n)]

    def pending(self, kind: str) -> int:
        return self.queues[kind].qsize()


class ClientEvents(ClientEventHandler):
    def __init__(self, recorder: Recorder) -> None:
        self.r = recorder

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.r.put("connecting", ctx)

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.r.put("connected", ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.r.put("disconnected", ctx)

    async def on_error(self, ctx: ErrorContext) -> None:
        self.r.put("error", ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self.r.put("subscribed", ctx)  # a server-side subscription

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self.r.put("publication", ctx)  # on a server-side subscription


class SubEvents(SubscriptionEventHandler):
    def __init__(self, recorder: Recorder) -> None:
        self.r = recorder

    async def on_subscribing(self, ctx: SubscribingContext) -> None:
        self.r.put("subscribing", ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.r.put("subscribed", ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.r.put("unsubscribed", ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.r.put("publication", ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        self.r.put("join", ctx)

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.r.put("leave", ctx)

    async def on_error(self, ctx: SubscriptionErrorContext) -> None:
        self.r.put("error", ctx)


class Clients:
    """Builds centrifuge-python clients and disconnects them all at the end."""

    def __init__(self) -> None:
        self.clients: list[Client] = []

    def new(self, url: str, connect_token: str = "", **kwargs: Any) -> tuple[Client, Recorder]:
        recorder = Recorder()
        options: dict[str, Any] = {
            "proxy": None,
            "min_reconnect_delay": 0.05,
            "max_reconnect_delay": 0.3,
            **kwargs,
        }
        client = Client(url, events=ClientEvents(recorder), token=connect_token, **options)
        self.clients.append(client)
        return client, recorder

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


def subscription(client: Client, channel: str, **options: Any) -> tuple[Any, Recorder]:
    recorder = Recorder()
    return client.new_subscription(channel, events=SubEvents(recorder), **options), recorder


# -- metrics ----------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(base: str) -> Samples:
    """GET ``/metrics`` and parse it: ``{(sample name, labels): value}``."""
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.get(f"{base}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- a real ``eventcast serve`` process --------------------------------------------------------


@dataclass
class ServeProcess:
    """``eventcast serve`` as a subprocess, with its stdout and stderr captured."""

    port: int
    config: Path
    process: subprocess.Popen[str] | None = None
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _readers: list[threading.Thread] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process and return once uvicorn listens (fail if it does not)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
        self.stdout, self.stderr = [], []
        process = self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "eventcast",
                "serve",
                "--port",
                str(self.port),
                "--config",
                str(self.config),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        started = threading.Event()

        def read(stream: Any, lines: list[str]) -> None:
            for line in stream:
                lines.append(line)
                if "Uvicorn running on" in line:
                    started.set()
            started.set()  # the stream ended: stop waiting

        self._readers = [
            threading.Thread(target=read, args=(process.stdout, self.stdout), daemon=True),
            threading.Thread(target=read, args=(process.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        if not started.wait(30) or process.poll() is not None:
            self.kill()
            raise AssertionError(f"eventcast serve did not start:\n{self.output()}")

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, timeout: float = WAIT) -> int:
        """Wait for the process to exit (without blocking the loop); return its code."""
        process = self.process
        assert process is not None
        code = await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)
        for reader in self._readers:
            await asyncio.to_thread(reader.join, 5)
        self._close_pipes()
        return code

    def kill(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for reader in self._readers:
            reader.join(5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        process = self.process
        if process is not None:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


# -- a gate in front of a server ------------------------------------------------------------


class Gate:
    """A TCP proxy to ``127.0.0.1:upstream`` that can refuse new connections.

    While closed it accepts and drops new connections at once (the clients see a
    failed handshake and retry); connections already piped keep flowing.
    Clients reconnecting by themselves can so be held back deterministically.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.open = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        sockets: Sequence[Any] = self._server.sockets
        self.port = sockets[0].getsockname()[1]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
