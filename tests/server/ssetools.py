"""Helpers of the SSE tests: a spec-following event-stream parser and a streaming client.

The parser follows the WHATWG "event stream interpretation" rules: lines end
with CRLF, CR or LF; ``field: value`` (one leading space removed); a line
starting with ``:`` is a comment; several ``data`` lines are joined with
``\\n``; a blank line dispatches the event (none when there is no data); the
``id`` is remembered across events (the browser's ``lastEventId``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .hubtools import WAIT

__all__ = [
    "PUBLISHER",
    "Comment",
    "HubProcess",
    "Retry",
    "SSEEvent",
    "SSEParser",
    "SSEStream",
    "open_sse",
    "publish_offline",
    "sse_url",
]


@dataclass(frozen=True)
class SSEEvent:
    """A dispatched event: its type, data (lines joined with ``\\n``) and last event id."""

    type: str
    data: str
    id: str

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class Comment:
    """A comment line (``: text``), e.g. the heartbeat."""

    text: str


@dataclass(frozen=True)
class Retry:
    """A valid ``retry:`` field (milliseconds)."""

    ms: int


Item = SSEEvent | Comment | Retry


@dataclass
class SSEParser:
    """An incremental ``text/event-stream`` parser: feed bytes, get items."""

    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _type: str = ""
    _started: bool = False
    #: The last event id buffer (kept across events, as a browser does).
    last_id: str = ""

    def feed(self, chunk: bytes) -> list[Item]:
        self._buffer += chunk
        if not self._started and len(self._buffer) >= 3:
            self._started = True
            if self._buffer.startswith(b"\xef\xbb\xbf"):
                self._buffer = self._buffer[3:]
        items: list[Item] = []
        while True:
            line, ending = self._next_line()
            if ending is None:
                return items
            self._line(line.decode("utf-8", errors="replace"), items)

    def _next_line(self) -> tuple[bytes, bytes | None]:
        buffer = self._buffer
        cr = buffer.find(b"\r")
        lf = buffer.find(b"\n")
        if cr < 0 and lf < 0:
            return b"", None
        if cr >= 0 and (lf < 0 or cr < lf):
            if cr == len(buffer) - 1:
                return b"", None  # a CR at the end: wait to see whether LF follows
            size = 2 if buffer[cr + 1 : cr + 2] == b"\n" else 1
            self._buffer = buffer[cr + size :]
            return buffer[:cr], buffer[cr : cr + size]
        self._buffer = buffer[lf + 1 :]
        return buffer[:lf], b"\n"

    def _line(self, line: str, items: list[Item]) -> None:
        if not line:
            if self._data:
                items.append(SSEEvent(self._type or "message", "\n".join(self._data), self.last_id))
            self._data = []
            self._type = ""
            return
        if line.startswith(":"):
            items.append(Comment(line[1:].removeprefix(" ")))
            return
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            items.append(Retry(int(value)))


def sse_url(base: str, topics: Sequence[str] = (), **params: str) -> str:
    """The URL of ``/connection/sse`` with repeated ``topic`` parameters and ``params``."""
    query = [("topic", t) for t in topics] + list(params.items())
    return str(httpx.URL(f"{base}/connection/sse", params=query))


@dataclass
class SSEStream:
    """One streamed response of ``/connection/sse``, read item by item."""

    response: httpx.Response
    _chunks: AsyncIterator[bytes]
    parser: SSEParser = field(default_factory=SSEParser)
    pending: list[Item] = field(default_factory=list)
    #: Every item read so far, in order.
    seen: list[Item] = field(default_factory=list)
    ended: bool = False

    @property
    def status(self) -> int:
        return self.response.status_code

    async def item(self) -> Item:
        """The next item (event, comment or retry hint). Raises EOFError when the stream ends."""
        async with asyncio.timeout(WAIT):
            while not self.pending:
                if self.ended:
                    raise EOFError("the event stream ended")
                try:
                    chunk = await anext(self._chunks)
                except StopAsyncIteration:
                    self.ended = True
                    continue
                self.pending.extend(self.parser.feed(chunk))
        item = self.pending.pop(0)
        self.seen.append(item)
        return item

    async def event(self) -> SSEEvent:
        """The next event (comments and retry hints are skipped)."""
        while True:
            item = await self.item()
            if isinstance(item, SSEEvent):
                return item

    async def events(self, n: int) -> list[SSEEvent]:
        return [await self.event() for _ in range(n)]

    async def subscribed(self) -> dict[str, Any]:
        """The ``subscribed`` event (which must be the first event); its data."""
        event = await self.event()
        assert event.type == "subscribed", event
        body: dict[str, Any] = event.json()
        return body

    async def comment(self) -> Comment:
        """The next comment (events in between are kept in ``seen``)."""
        while True:
            item = await self.item()
            if isinstance(item, Comment):
                return item

    async def rest(self) -> list[Item]:
        """Read until the server ends the stream; return the items read meanwhile."""
        items: list[Item] = []
        while True:
            try:
                items.append(await self.item())
            except EOFError:
                return items


@asynccontextmanager
async def open_sse(
    base: str,
    topics: Sequence[str] = (),
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
    **params: str,
) -> AsyncIterator[SSEStream]:
    """Open ``/connection/sse`` (``token`` as a Bearer header); yield the stream.

    Non-200 answers are yielded too, with the body read (``stream.response.json()``).
    """
    all_headers = {"Accept": "text/event-stream", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None), cookies=cookies)
        )
        async with asyncio.timeout(WAIT):
            response = await stack.enter_async_context(
                client.stream("GET", sse_url(base, topics, **params), headers=all_headers)
            )
            if response.status_code != 200:
                await response.aread()
        yield SSEStream(response, response.aiter_raw())


# -- a real ``eventcast serve`` process that can be stopped and started again ----------------


class HubProcess:
    """``eventcast serve --port N --config file.toml`` as a subprocess, restartable on one port."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
        self.env.update(env or {})
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        #: Every line the process (or its predecessors) printed.
        self.output: list[str] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server; return once it listens (fail with its output if it does not)."""
        assert self.process is None, "already running"
        command = [sys.executable, "-m", "eventcast", "serve", "--port", str(self.port)]
        process = subprocess.Popen(
            [*command, "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        self.process = process
        listening = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                self.output.append(line)
                if "Uvicorn running on" in line:
                    listening.set()
            listening.set()  # the process ended: stop waiting

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not listening.wait(30) or process.poll() is not None:
            self.stop()
            raise AssertionError("eventcast serve did not start:\n" + "".join(self.output))

    def kill(self) -> None:
        """SIGKILL: the process dies at once, in the middle of whatever it was doing."""
        process, self.process = self.process, None
        assert process is not None, "not running"
        process.kill()
        process.wait(15)
        if self._reader is not None:
            self._reader.join(5)
        if process.stdout is not None:
            process.stdout.close()

    def stop(self) -> int | None:
        """SIGTERM (a graceful shutdown); return the exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        process.terminate()
        try:
            code = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if process.stdout is not None:
            process.stdout.close()
        return code


#: Publishes into a hub's log with the hub's own bus (built from the config file) while no
#: server runs: ``python -c PUBLISHER config.toml '[["topic", data], ...]'``; prints the
#: ``[topic, offset, epoch]`` of each publication as JSON.
PUBLISHER = """
import asyncio, json, sys
from eventcast.server.config import Settings
from eventcast.server.hub import Hub

async def main():
    hub = Hub(Settings.load(sys.argv[1]))
    await hub.bus.start()
    try:
        out = []
        for topic, data in json.loads(sys.argv[2]):
            event = await hub.bus.publish(topic, data)
            out.append([event.topic, event.offset, event.epoch])
    finally:
        await hub.bus.close()
    print(json.dumps(out))

asyncio.run(main())
"""


async def publish_offline(config: Path, items: list[tuple[str, Any]]) -> list[tuple[str, int, str]]:
    """Run :data:`PUBLISHER` as a short-lived process; return what it published."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER,
        str(config),
        json.dumps(items),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return [(t, o, e) for t, o, e in json.loads(out)]
