"""A lean NATS subscriber: the core protocol's ``MSG`` frames parsed on a protocol of our own.

nats-py builds a message object, queues it and runs a callback per message
(several microseconds each); this reader splits the frames of each socket read
and hands the bus every payload of the read in one batch. It only subscribes
and reads; publishing stays on nats-py.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from ..exceptions import BackplaneError
from ._lean import Pings, close_transport, watch_liveness

__all__ = ["LeanNATSSub"]


class _Protocol(asyncio.Protocol):
    def __init__(self, deliver: Callable[[Sequence[bytes]], None]) -> None:
        self._deliver = deliver
        self._buffer = bytearray()
        self.transport: Any = None  # uvloop's transports do not subclass asyncio's
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.info: asyncio.Future[bytes] = loop.create_future()
        #: Answers outside the PINGs in flight: the handshake's PONG, ``-ERR`` lines.
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.pings = Pings()
        self.activity = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        buffer = self._buffer
        buffer += data
        batch: list[bytes] = []
        start = 0
        end = len(buffer)
        while start < end:
            eol = buffer.find(b"\r\n", start)
            if eol < 0:
                break
            if buffer.startswith(b"MSG ", start):
                # MSG <subject> <sid> [reply-to] <#bytes>
                size = int(buffer[buffer.rfind(b" ", start, eol) + 1 : eol])
                body = eol + 2
                if body + size + 2 > end:
                    break  # the payload has not fully arrived yet
                batch.append(bytes(buffer[body : body + size]))
                start = body + size + 2
                continue
            line = bytes(buffer[start:eol])
            start = eol + 2
            if line == b"PING":
                if self.transport is not None:
                    self.transport.write(b"PONG\r\n")
            elif line == b"PONG":
                if not self.pings.answered():
                    self.replies.put_nowait(line)
            elif line.startswith(b"-ERR"):
                self.replies.put_nowait(line)
            elif line.startswith(b"INFO ") and not self.info.done():
                self.info.set_result(line[5:])
        if start:
            del buffer[:start]
        if batch:
            self._deliver(batch)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pings.lost()
        if not self.lost.done():
            self.lost.set_result(None)


class LeanNATSSub:
    """One subscriber connection to NATS, speaking the core protocol."""

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol
        self._sids: dict[str, int] = {}
        self._next_sid = 1

    @classmethod
    async def connect(
        cls, url: str, *, timeout: float, deliver: Callable[[Sequence[bytes]], None]
    ) -> LeanNATSSub:
        """Connect, send CONNECT and wait for the first PONG.

        Raises:
            BackplaneError: NATS is unreachable or refused the connection.
        """
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 4222
        tls = ssl.create_default_context() if parts.scheme == "tls" else None
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "echo": False,
            "protocol": 1,
            "lang": "python-eventcast",
            "version": "1",
        }
        if parts.username and parts.password:
            options["user"] = unquote(parts.username)
            options["pass"] = unquote(parts.password)
        elif parts.username:
            options["auth_token"] = unquote(parts.username)
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(deliver), host, port, ssl=tls
                )
                await protocol.info
                protocol.transport.write(b"CONNECT " + json.dumps(options).encode() + b"\r\n")
                protocol.transport.write(b"PING\r\n")
                answer = await protocol.replies.get()
        except (OSError, TimeoutError) as exc:
            raise BackplaneError(f"cannot reach NATS at {host}:{port}: {exc}") from exc
        if answer != b"PONG":
            protocol.transport.close()
            raise BackplaneError(f"NATS refused the connection: {answer.decode(errors='replace')}")
        return cls(protocol)

    def _send(self, line: str) -> None:
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            raise BackplaneError("the NATS subscriber connection is closed")
        transport.write(line.encode() + b"\r\n")

    async def subscribe(self, subject: str) -> None:
        """``SUB`` a subject (wildcards allowed); :meth:`barrier` waits until it is in effect."""
        if subject in self._sids:
            return
        sid = self._next_sid
        self._next_sid += 1
        self._sids[subject] = sid
        self._send(f"SUB {subject} {sid}")

    async def unsubscribe(self, subject: str) -> None:
        """``UNSUB`` a subject."""
        sid = self._sids.pop(subject, None)
        if sid is not None:
            self._send(f"UNSUB {sid}")

    async def barrier(self, timeout: float) -> None:
        """Wait until NATS has handled everything sent before (a PING's answer).

        Raises:
            BackplaneError: the connection is lost or did not answer in ``timeout``.
        """
        await self._protocol.pings.barrier(lambda: self._send("PING"), timeout, "NATS")

    async def watch(self) -> None:
        """Return only to raise: when the connection is lost or stops answering.

        Raises:
            BackplaneError: the connection is lost, or a PING went unanswered.
        """
        await watch_liveness(self._protocol, lambda: self._send("PING"), "NATS")

    async def aclose(self) -> None:
        """Close the connection. Idempotent."""
        close_transport(self._protocol)
