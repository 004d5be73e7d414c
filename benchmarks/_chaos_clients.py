"""The chaos harness's clients: lean Centrifuge JSON subscribers, a slow consumer, a publisher.

:class:`Subscriber` speaks the Centrifuge client protocol over a raw asyncio
stream (the WebSocket framing of ``_common``): ``connect`` and ``subscribe``
in one frame, ``{}`` answered to each server ping. It records into a
:class:`~_history.ClientHistory` every subscribe reply and every publication,
those replayed inside subscribe replies included, with its arrival time. It
resubscribes from its position with ``recover`` after every reconnect, and
with *churn* it drops its socket abruptly (``transport.abort()``: a TCP RST,
no close frame) at random intervals. A failed connect moves it to the next
node, as a client of a load balancer would move when a node dies.

Its position is the highest offset it has (or the position a subscribe reply
gave, if higher): a duplicate the hub sends never moves it back, so every
duplicate the checker counts is a new one, not the echo of an earlier one.

:class:`Probe` runs the scenarios' own checks (one command at a time, publications
queued); paused, it is the slow consumer that never reads its socket. (Shrinking
its receive buffer would not help: the hub's send buffer holds most of what the
kernel keeps, and a tiny receive window on loopback stalls even the handshake
in zero-window probes.)

:class:`Publisher` publishes through the HTTP API at a fixed rate (open loop)
and records every call as a :class:`~_history.Publish`: acknowledged with its
offset and epoch, or indeterminate when the call failed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final

import httpx
import msgspec

from _common import split_frames, ws_frame
from _history import ClientHistory, Publish, Subscribed

__all__ = ["DataPool", "Probe", "Publisher", "Subscriber"]

#: Bound of a connect, a handshake or a reply (a safety deadline).
TIMEOUT: Final = 10.0
#: The ``id`` of the connect command and of the subscribe command.
CONNECT_ID: Final = 1
SUBSCRIBE_ID: Final = 2
_PONG: Final = ws_frame(b"{}")
_READ: Final = 1 << 18


class _Pub(msgspec.Struct):
    offset: int = 0
    data: msgspec.Raw = msgspec.Raw(b"null")


class _Push(msgspec.Struct):
    channel: str = ""
    pub: _Pub | None = None
    unsubscribe: dict[str, Any] | None = None
    disconnect: dict[str, Any] | None = None


class _SubscribeResult(msgspec.Struct):
    epoch: str = ""
    offset: int = 0
    recovered: bool = False
    publications: list[_Pub] = []


class _Reply(msgspec.Struct):
    id: int = 0
    error: dict[str, Any] | None = None
    push: _Push | None = None
    subscribe: _SubscribeResult | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode
_encode = msgspec.json.Encoder().encode


class RefusedError(Exception):
    """The hub refused the handshake or answered a command with an error."""


def handshake_request(port: int) -> bytes:
    """The HTTP/1.1 upgrade request of a WebSocket client (RFC 6455 §4.1)."""
    return (
        b"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n" % port
    )


class DataPool:
    """Decodes each distinct payload once and shares the value between clients."""

    def __init__(self) -> None:
        self._values: dict[bytes, Any] = {}

    def value(self, raw: msgspec.Raw) -> Any:
        """The JSON value of ``raw`` (the same object for the same bytes)."""
        key = bytes(raw)
        try:
            return self._values[key]
        except KeyError:
            value = self._values[key] = msgspec.json.decode(key)
            return value


class Subscriber:
    """One client subscribed to one durable channel; records what it receives.

    Args:
        name: the client's name in the history (also its user id).
        channel: the channel.
        token: a connection token for the client.
        ports: the hub nodes' ports (the client starts on ``ports()[node]``).
        node: the index of its first node.
        pool: shared decoded payloads.
        rng: its random source (churn intervals, backoff jitter).
        churn: drop the socket every ``uniform(*churn)`` seconds (``None``: never).
    """

    def __init__(
        self,
        name: str,
        channel: str,
        token: str,
        ports: Callable[[], Sequence[int]],
        node: int,
        pool: DataPool,
        rng: random.Random,
        churn: tuple[float, float] | None = None,
    ) -> None:
        self.name = name
        self.channel = channel
        self.token = token
        self.ports = ports
        self.node = node
        self.pool = pool
        self.rng = rng
        self.churn = churn
        self.history = ClientHistory(name)
        self.epoch: str | None = None
        #: The position to recover from: the highest offset it has (or was given).
        self.offset: int | None = None
        self.sessions = 0
        self.drops = 0
        self.failures: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()
        self.subscribed = asyncio.Event()
        self._target: int | None = None
        self.reached = asyncio.Event()
        self._abort: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    # -- control -----------------------------------------------------------------------

    def expect(self, offset: int) -> None:
        """Set :attr:`reached` once the client has offset ``offset`` (or later)."""
        self._target = offset
        if self.offset is not None and self.offset >= offset:
            self.reached.set()

    def calm(self) -> None:
        """Stop churning (the socket in use stays open)."""
        self.churn = None
        if self._abort is not None:
            self._abort.cancel()
            self._abort = None

    async def run(self) -> None:
        """Connect, subscribe and read; reconnect after every drop, until cancelled."""
        failures = 0
        while True:
            port = self.ports()[self.node % len(self.ports())]
            try:
                await self._session(port)
                failures = 0
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.failures[type(exc).__name__] += 1
                failures += 1
                self.node += 1  # a node that cannot be reached: try the next one
            except RefusedError as exc:
                self.failures[str(exc)[:60]] += 1
                failures += 1
            if failures:
                # Pacing of the retries (exponential with jitter), not synchronisation.
                delay = min(1.0, 0.05 * 2 ** min(failures, 5)) * self.rng.uniform(0.5, 1.0)
                await asyncio.sleep(delay)

    # -- one connection ----------------------------------------------------------------

    def _subscribe_command(self) -> bytes:
        params: dict[str, Any] = {"channel": self.channel}
        if self.offset is not None and self.epoch is not None:
            params.update(recover=True, offset=self.offset, epoch=self.epoch)
        return _encode({"id": SUBSCRIBE_ID, "subscribe": params})

    async def _session(self, port: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=_READ)
        transport: Any = writer.transport  # uvloop's transports are no asyncio subclass
        self._transport = transport
        try:
            writer.write(handshake_request(port))
            async with asyncio.timeout(TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RefusedError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            self.sessions += 1
            connect = _encode({"id": CONNECT_ID, "connect": {"token": self.token}})
            writer.write(ws_frame(connect + b"\n" + self._subscribe_command()))
            if self.churn is not None:
                delay = self.rng.uniform(*self.churn)
                self._abort = asyncio.get_running_loop().call_later(delay, self._drop)
            buffer = b""
            while True:
                chunk = await reader.read(_READ)
                if not chunk:
                    return
                now = time.monotonic()
                buffer = buffer + chunk if buffer else chunk
                frames, end = split_frames(buffer)
                buffer = buffer[end:]
                for opcode, payload in frames:
                    if opcode == 1:
                        self._text(payload, now, writer)
                    elif opcode == 8:
                        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                        self.closes[code] += 1
                        return
                    elif opcode == 9:
                        writer.write(ws_frame(payload, 0xA))
        finally:
            if self._abort is not None:
                self._abort.cancel()
                self._abort = None
            self._transport = None
            transport.abort()

    def _drop(self) -> None:
        """Churn: drop the socket abruptly (RST, no close handshake)."""
        self._abort = None
        transport = self._transport
        if transport is not None:
            self.drops += 1
            transport.abort()

    def _text(self, payload: bytes, now: float, writer: asyncio.StreamWriter) -> None:
        for line in payload.split(b"\n"):
            if line == b"{}":
                writer.write(_PONG)
                continue
            reply = _decode_reply(line)
            push = reply.push
            if push is not None:
                if push.pub is not None:
                    self._publication(push.pub, now, replayed=False)
                elif push.unsubscribe is not None:
                    # The hub dropped the subscription (its backplane came back):
                    # resubscribe from our position, on the same connection.
                    writer.write(ws_frame(self._subscribe_command()))
                continue
            if reply.error is not None:
                raise RefusedError(f"command {reply.id}: {reply.error.get('message', '')}")
            if reply.subscribe is not None:
                self._subscribed(reply.subscribe, now)

    def _subscribed(self, result: _SubscribeResult, now: float) -> None:
        asked = self.offset if self.epoch is not None else None
        self.history.subscribed(
            Subscribed(
                at=now,
                epoch=result.epoch,
                offset=result.offset,
                since=asked,
                since_epoch=self.epoch if asked is not None else None,
                recovered=result.recovered,
            )
        )
        if self.epoch != result.epoch:
            self.offset = result.offset
        self.epoch = result.epoch
        for pub in result.publications:
            self._publication(pub, now, replayed=True)
        self._advance(result.offset)
        self.subscribed.set()

    def _publication(self, pub: _Pub, now: float, *, replayed: bool) -> None:
        self.history.received(now, pub.offset, self.pool.value(pub.data), replayed=replayed)
        self._advance(pub.offset)

    def _advance(self, offset: int) -> None:
        if self.offset is None or offset > self.offset:
            self.offset = offset
        target = self._target
        if target is not None and self.offset >= target:
            self.reached.set()


class Probe:
    """A client for the scenarios' own checks: subscribe, unsubscribe, wait for a publication.

    Replies are matched to commands by ``id``; publications of every channel
    go to one bounded queue (``keep`` of them; later ones are only counted).
    :meth:`pause` makes it a *slow consumer*: its transport stops reading, the
    kernel's buffers fill (a few MiB on loopback, mostly the hub's socket send
    buffer), then the hub's queue for it grows. After :meth:`resume` it reads
    what the hub managed to send, up to the close frame (:attr:`close_code`).
    """

    def __init__(self, port: int, token: str, *, keep: int = 10_000) -> None:
        self.port = port
        self.token = token
        self.keep = keep
        self.publications: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=max(1, keep))
        #: Publications received (queued or not).
        self.received = 0
        #: The code of the hub's close frame, once read.
        self.close_code: int | None = None
        #: Set when the connection has ended.
        self.ended = asyncio.Event()
        self._ids = itertools.count(CONNECT_ID)
        self._waiting: dict[int, asyncio.Future[_Reply]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect and authenticate."""
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=_READ)
            self._writer = writer
            writer.write(handshake_request(self.port))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RefusedError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        self._reader = asyncio.get_running_loop().create_task(self._read(reader))
        await self.command("connect", {"token": self.token})

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "the connection closed"
        try:
            await self._frames(reader)
        except OSError:
            pass
        except msgspec.DecodeError as exc:  # the hub sent something that is not the protocol
            why = f"undecodable reply: {exc}"
        finally:
            self.ended.set()
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(RefusedError(why))

    async def _frames(self, reader: asyncio.StreamReader) -> None:
        """Read frames until the connection ends or the hub's close frame arrives."""
        buffer = b""
        while chunk := await reader.read(_READ):
            frames, end = split_frames(buffer + chunk)
            buffer = (buffer + chunk)[end:]
            for opcode, payload in frames:
                if opcode == 8:
                    self.close_code = (
                        int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    )
                    return
                if opcode == 1:
                    self._text(payload)

    def _text(self, payload: bytes) -> None:
        for line in payload.split(b"\n"):
            if line == b"{}":
                if self._writer is not None:
                    self._writer.write(_PONG)
                continue
            reply = _decode_reply(line)
            push = reply.push
            if push is not None and push.pub is not None:
                self.received += 1
                if self.keep and not self.publications.full():
                    data = msgspec.json.decode(push.pub.data)
                    self.publications.put_nowait((push.channel, data))
                continue
            waiter = self._waiting.pop(reply.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)

    async def command(self, method: str, params: dict[str, Any]) -> _Reply:
        """Send one command and wait for its reply (an error reply raises)."""
        writer = self._writer
        if writer is None:
            raise RefusedError("not connected")
        ident = next(self._ids)
        waiter: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        writer.write(ws_frame(_encode({"id": ident, method: params})))
        async with asyncio.timeout(TIMEOUT):
            reply = await waiter
        if reply.error is not None:
            raise RefusedError(f"{method}: {reply.error.get('message', '')}")
        return reply

    def pause(self) -> None:
        """Stop reading the socket (a slow consumer from now on)."""
        if self._writer is not None:
            transport: Any = self._writer.transport
            transport.pause_reading()

    def resume(self) -> None:
        """Read the socket again."""
        if self._writer is not None:
            transport: Any = self._writer.transport
            transport.resume_reading()

    async def aclose(self) -> None:
        """Drop the connection (idempotent)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            transport: Any = writer.transport
            transport.abort()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


class Publisher:
    """Publishes ``{"n": i}`` (plus ``pad`` bytes) at ``rate`` per second through the HTTP API.

    Args:
        channel: the channel.
        bases: the HTTP base URLs of the nodes that are up (called per publish:
            calls go round-robin over the nodes up at that moment).
        api_key: the hubs' API key.
        rate: publications per second (open loop: a slow hub does not slow the schedule
            until ``in_flight`` calls are pending).
        pad: bytes of padding in each publication.
        in_flight: the most calls pending at once.
    """

    def __init__(
        self,
        channel: str,
        bases: Callable[[], Sequence[str]],
        api_key: str,
        rate: float,
        *,
        pad: int = 0,
        in_flight: int = 64,
    ) -> None:
        self.channel = channel
        self.bases = bases
        self.rate = rate
        self.pad = "x" * pad
        self.publishes: list[Publish] = []
        self.errors: Counter[str] = Counter()
        self._client = httpx.AsyncClient(
            headers={"X-API-Key": api_key},
            timeout=TIMEOUT,
            limits=httpx.Limits(max_connections=in_flight),
        )
        self._slots = asyncio.Semaphore(in_flight)
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._turn = itertools.count()

    @property
    def acknowledged(self) -> int:
        """How many calls were acknowledged so far."""
        return sum(p.offset is not None for p in self.publishes)

    async def run(self, seconds: float) -> None:
        """Publish on schedule for ``seconds``, then wait for the calls still pending."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in itertools.count():
            due = start + i / self.rate
            if due >= start + seconds:
                break
            if due > loop.time():
                await asyncio.sleep(due - loop.time())  # the schedule, not a synchronisation
            await self._slots.acquire()
            task = loop.create_task(self._one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def _one(self) -> None:
        try:
            await self.publish()
        finally:
            self._slots.release()

    async def publish(self) -> int | None:
        """Publish once; return the acknowledged offset (``None``: indeterminate)."""
        bases = self.bases()
        data: dict[str, Any] = {"n": next(self._seq)}
        if self.pad:
            data["pad"] = self.pad
        sent_at = time.monotonic()
        if not bases:
            self.errors["no node up"] += 1
            self.publishes.append(Publish(data, sent_at))
            return None
        base = bases[next(self._turn) % len(bases)]
        try:
            response = await self._client.post(
                f"{base}/api/publish", json={"channel": self.channel, "data": data}
            )
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self.errors[type(exc).__name__] += 1
            self.publishes.append(Publish(data, sent_at))
            return None
        result = body.get("result") if isinstance(body, dict) else None
        if response.status_code != 200 or not isinstance(result, dict) or "offset" not in result:
            self.errors[f"HTTP {response.status_code}: {str(body)[:60]}"] += 1
            self.publishes.append(Publish(data, sent_at))
            return None
        offset = int(result["offset"])
        self.publishes.append(
            Publish(data, sent_at, offset, str(result["epoch"]), time.monotonic())
        )
        return offset

    async def fence(self, attempts: int = 50) -> int:
        """Publish until one call is acknowledged; its offset (the end of the run)."""
        for _ in range(attempts):
            offset = await self.publish()
            if offset is not None:
                return offset
            await asyncio.sleep(0.2)  # a node is coming back: pace the retries
        raise RuntimeError(f"no publication was acknowledged in {attempts} attempts")

    async def aclose(self) -> None:
        """Cancel pending calls and close the HTTP client (idempotent)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
