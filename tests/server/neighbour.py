"""The neighbour of the security tests, as a process of its own (standard library only).

It subscribes to a channel over a WebSocket, prints ``ready``, and publishes a
numbered publication every ``--period`` seconds through the HTTP API, noting
when each was due and when it came back. On a ``stop`` line on its standard
input it lets a few more through, stops publishing, waits for the last ones and
prints one JSON line: ``{"published": n, "due": {...}, "arrived": {...},
"order": [...]}`` (times from ``time.monotonic()``, the system's monotonic
clock, comparable with the test's).

Its own process, so that the work the test does to attack the hub never delays
the neighbour: only the hub (and the machine) can.

Usage: ``neighbour.py HOST PORT PATH_PREFIX CHANNEL TOKEN API_KEY PERIOD AFTERWARDS``
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time


class WebSocket:
    """The client side of RFC 6455, just enough for text frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, path: str) -> WebSocket:
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            raise RuntimeError(f"handshake refused: {head[:40]!r}")
        return cls(reader, writer)

    def send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = bytes((0x81, 0x80 | n))
        else:
            header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    async def messages(self) -> list[dict[str, object]]:
        """The JSON messages of the next text frame (pings are answered with a pong)."""
        while True:
            first, second = await self.reader.readexactly(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            payload = await self.reader.readexactly(n)
            if first & 0x0F == 0x8:
                raise ConnectionError("closed by the server")
            if first & 0x0F != 0x1:
                continue
            out = []
            for line in payload.split(b"\n"):
                message = json.loads(line)
                if message == {}:
                    self.send("{}")  # the protocol's pong
                else:
                    out.append(message)
            if out:
                return out


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    """One HTTP request on a keep-alive connection; fail unless it is answered 200."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"publish failed: {head[:60]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)


async def main(argv: list[str]) -> None:
    host, port_text, prefix, channel, token, api_key, period_text, afterwards_text = argv
    port, period, afterwards = int(port_text), float(period_text), int(afterwards_text)
    ws = await WebSocket.open(host, port, f"{prefix}/connection/websocket")
    ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
    ws.send(json.dumps({"id": 2, "subscribe": {"channel": channel}}))
    replies: dict[object, dict[str, object]] = {}
    while len(replies) < 2:
        for message in await ws.messages():
            replies[message.get("id")] = message
    if "error" in replies[1] or "error" in replies[2]:
        raise RuntimeError(f"could not subscribe: {replies}")

    due: dict[int, float] = {}
    arrived: dict[int, float] = {}
    order: list[int] = []
    published = 0
    progress = asyncio.Event()
    stopping = asyncio.Event()

    async def read() -> None:
        while True:
            for message in await ws.messages():
                push = message.get("push")
                if isinstance(push, dict) and "pub" in push:
                    n = push["pub"]["data"]["n"]  # type: ignore[index]
                    arrived[n] = time.monotonic()
                    order.append(n)
                    progress.set()

    async def publish() -> None:
        nonlocal published
        reader, writer = await asyncio.open_connection(host, port)
        start = time.monotonic()
        while not stopping.is_set():
            when = start + (published + 1) * period
            delay = when - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule (time is the subject here)
            body = json.dumps({"channel": channel, "data": {"n": published + 1}}).encode()
            published += 1
            due[published] = when
            await post(
                reader,
                writer,
                f"POST {prefix}/api/publish HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {api_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body,
            )
        writer.close()

    async def received(count: int) -> None:
        while len(order) < count:
            await progress.wait()
            progress.clear()

    reading = asyncio.create_task(read())
    publishing = asyncio.create_task(publish())
    await received(1)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop" (or the end of stdin)
    async with asyncio.timeout(30):
        await received(published + afterwards)
        stopping.set()
        await publishing
        await received(published)
    reading.cancel()
    summary = {"published": published, "due": due, "arrived": arrived, "order": order}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
