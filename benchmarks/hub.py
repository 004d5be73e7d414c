"""Hub fan-out over WebSocket and SSE: server CPU per delivery, throughput and latency.

One channel, ``--clients`` WebSocket subscribers (default 1,000) opened by
load-generator worker processes with a minimal raw-socket WebSocket client
(no JSON decoding: it counts pushes and reads one timestamp per frame), and a
publisher process. The server runs in its own process; its CPU time (utime +
stime from ``/proc/<pid>/stat``) over the measuring window, divided by the
deliveries the clients received in that window, is the **CPU per delivery**.

Servers, each measured with the same clients and publisher:

* **eventcast-protobuf**: the same server and channel, clients speaking the
  Protobuf encoding (the subprotocol ``centrifuge-protobuf``, binary frames of
  length-delimited replies; pings answered with an empty ``Command``); the
  publisher still speaks JSON. Its CPU per delivery beside eventcast's is the
  cost of the second encoding (issue 17's goal: within 1.2x);
* **eventcast**: ``create_app`` under uvicorn with ``uvicorn_config`` (what
  ``eventcast serve`` runs); clients speak the Centrifuge JSON protocol
  (``connect`` with a JWT, ``subscribe``, answer pings ``{}`` with ``{}``). The
  live channel ``bench`` has no history (the measure is fan-out); the durable
  channel ``durable:bench`` (history 1,000, SQLite, ``synchronous=FULL``)
  commits every publication before fanning it out. The publisher is a client
  with publish permission sending ``publish`` commands, all those due in one
  tick in one frame (the protocol allows several commands per frame);
* **python-socketio**: an ASGI ``AsyncServer`` under the same uvicorn options;
  clients join a room on connect; the publisher emits ``pub`` and the server
  does ``await sio.emit("msg", data, room="bench")``;
* **websockets**: a ``websockets`` server; for each message from the
  publisher, ``await ws.send(message)`` on every subscriber in turn;
* **floor**: no framework at all, a bare uvloop protocol that frames what the
  publisher sends in one read once and writes it to every subscriber's
  transport (see ``serve_floor``): the latency this machine sets for writing
  to N sockets from one event loop.

Server-Sent Events (``--transport sse``; both transports by default), the
same publisher and the same number of clients, each a raw-socket HTTP/1.1
``GET`` that parses the chunked body minimally and counts ``data:`` lines:

* **eventcast**: the same server, ``GET /connection/sse?topic=bench&topic=
  durable:bench&access_token=<JWT>``; an event on the live channel is
  ``data: {"topic","offset","epoch","data","tags"}``, one on the durable
  channel also carries the stream's composite cursor as ``id:``;
* **sse-starlette**: a Starlette app under the same uvicorn options, the usual
  pattern: per client an ``asyncio.Queue`` and an ``EventSourceResponse``
  over a generator yielding what the queue gets; a WebSocket endpoint
  ``/pub`` takes the publisher's messages (like the ``websockets`` server)
  and puts each one, wrapped in the same JSON envelope as eventcast's, into
  every client's queue.

Every publication carries ``time.time_ns()`` taken when the publisher sends
it; a client computes publish -> receive latency from the first publication of
each frame (the oldest), weighted by the publications in the frame.

Loads: **full** is closed loop: the publisher keeps at most ``--window``
publications not yet received by every client, so it publishes as fast as
the whole system sustains; **half** is open loop at half the rate full load
reached. With 2+ cores the server is pinned to CPU 0 and the load generators
to the other CPUs (``--no-pin`` to turn it off), so they do not starve it.

``--live-publishers 32`` publishes eventcast's live channel from 32
connections, as the durable one is (default 1, as in the WebSocket figures).

Set ``EVENTCAST_BENCH_SERVER_PROFILE=/path/out.prof`` to run the eventcast
server under cProfile (the SSE run writes ``/path/out.prof.sse``); read it
with ``python -m pstats``.

    python benchmarks/hub.py [--clients 1000] [--quick] [--systems eventcast,websockets]
                             [--transport websocket|sse|both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import uvloop

from _common import (
    header,
    machine,
    process_cpu,
    process_times,
    rate,
    split_frames,
    system_busy,
    ws_frame,
)

SECRET = "benchmark-hmac-secret-" + "x" * 32
API_KEY = "benchmark-api-key"
CHANNEL = "bench"
DURABLE_CHANNEL = "durable:bench"
SYSTEMS = ("eventcast", "eventcast-protobuf", "socketio", "websockets", "floor")  # over WebSocket
SSE_SYSTEMS = ("eventcast", "sse-starlette")  # over Server-Sent Events
TRANSPORTS = ("websocket", "sse")
#: Client kinds of the load generators that speak SSE (worker_main's ``kind``).
SSE_CLIENT_KINDS = ("eventcast-sse", "sse-starlette")
SSE_PATH = "/connection/sse"
LATENCY_SAMPLE_EVERY = 5  # every 5th client records latencies
CONNECT_CONCURRENCY = 50
DEBUG = bool(os.environ.get("BENCH_DEBUG"))


# -- servers (each runs in its own process: hub.py --serve KIND --port N) ---------------


def serve_eventcast(port: int, data_dir: str) -> None:
    import uvicorn

    from eventcast.server.app import create_app, uvicorn_config
    from eventcast.server.config import Settings

    perms = {"allow_subscribe_for_client": True, "allow_publish_for_client": True}
    # The load is one publisher and many connections from one host: lift the
    # abuse limits (those this version has) out of the way.
    limits = {
        "client_queue_bytes": 8 * 1_048_576,
        "connections_per_user": 1_000_000,
        "connection_rate": 1e9,
        "command_rate": 1e9,
        "user_command_rate": 1e9,
    }
    settings = Settings.load(
        token_hmac_secret=SECRET,
        api_key=API_KEY,
        log_url=f"sqlite:///{os.path.abspath(data_dir)}/events.db",
        namespaces=[
            {"name": "", **perms},
            {"name": "durable", "history_size": 1000, **perms},
        ],
        **{k: v for k, v in limits.items() if k in Settings.model_fields},
    )
    config = uvicorn_config(settings, host="127.0.0.1", port=port)
    config["log_level"] = "warning"
    config["timeout_graceful_shutdown"] = 2
    profile_to = os.environ.get("EVENTCAST_BENCH_SERVER_PROFILE")
    if not profile_to:
        uvicorn.Server(uvicorn.Config(create_app(settings), **config)).run()
        return
    import cProfile

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutdown: the profile would be lost.
            getattr(self, "_captured_signals", []).clear()

    server = Server(uvicorn.Config(create_app(settings), **config))

    profile = cProfile.Profile()
    profile.enable()
    try:
        server.run()
    finally:
        profile.disable()
        profile.dump_stats(profile_to)


def serve_socketio(port: int) -> None:
    import socketio
    import uvicorn

    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        if "role=pub" not in environ.get("QUERY_STRING", ""):
            await sio.enter_room(sid, CHANNEL)

    @sio.on("pub")
    async def pub(sid: str, data: Any) -> None:
        await sio.emit("msg", data, room=CHANNEL)

    uvicorn.Server(
        uvicorn.Config(
            socketio.ASGIApp(sio),
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_ping_interval=None,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
    ).run()


def serve_websockets(port: int) -> None:
    import logging

    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    # Clients are aborted at the end of a run: do not log each one.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)

    clients: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path.startswith("/pub"):
            async for message in ws:
                for client in list(clients):
                    with contextlib.suppress(ConnectionClosed):
                        await client.send(message)
            return
        clients.add(ws)
        try:
            await ws.send("ok")
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    async def run() -> None:
        async with serve(
            handler,
            "127.0.0.1",
            port,
            compression=None,
            ping_interval=None,
            max_queue=None,
            backlog=2048,
        ) as server:
            await server.serve_forever()

    uvloop.run(run())


def serve_floor(port: int) -> None:
    """The floor: no framework, no protocol, no queue, no checks.

    A bare uvloop protocol: what one publishing connection sends in one read
    is framed once (one text frame per publication, concatenated) and written
    to every subscriber's transport, one ``write`` each. Nothing any hub does
    per delivery can cost less on one event loop, so its latency is the floor
    the machine sets for writing to N sockets.
    """
    import base64
    import hashlib

    subscribers: set[asyncio.Transport] = set()
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.buf = b""
            self.open = False
            self.pub = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            t = self.transport
            assert t is not None
            data = self.buf + data
            self.buf = b""
            if not self.open:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = data
                    return
                key = b""
                for line in data[:end].split(b"\r\n"):
                    if line.lower().startswith(b"sec-websocket-key:"):
                        key = line.split(b":", 1)[1].strip()
                accept = base64.b64encode(hashlib.sha1(key + guid).digest())
                t.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept
                )
                self.open = True
                self.pub = data.startswith(b"GET /pub")
                if not self.pub:
                    subscribers.add(t)
                    t.write(b"\x81\x02ok")
                data = data[end + 4 :]
            if not self.pub:
                return  # subscribers send nothing that matters here
            frames, pos = split_frames(data)
            out = []
            for opcode, raw in frames:
                if opcode == 1:
                    n = len(raw)
                    if n < 126:
                        out.append(bytes((0x81, n)) + raw)
                    else:
                        out.append(bytes((0x81, 126)) + n.to_bytes(2, "big") + raw)
            self.buf = data[pos:]
            if out:
                joined = b"".join(out)
                for sub in subscribers:
                    sub.write(joined)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is not None:
                subscribers.discard(self.transport)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, "127.0.0.1", port, backlog=2048)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


def serve_sse_starlette(port: int) -> None:
    """The usual sse-starlette fan-out: one queue and one ``EventSourceResponse`` per client."""
    import uvicorn
    from sse_starlette import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    subscribers: set[asyncio.Queue[str]] = set()
    # The same envelope as eventcast's SSE events, so both send the same bytes.
    envelope = '{"topic":"' + CHANNEL + '","offset":null,"epoch":null,"data":%s,"tags":{}}'

    async def stream(request: Request) -> EventSourceResponse:
        queue: asyncio.Queue[str] = asyncio.Queue()
        subscribers.add(queue)

        async def events() -> Any:
            try:
                yield {"event": "subscribed", "data": "{}"}
                while True:
                    yield {"data": await queue.get()}
            finally:
                subscribers.discard(queue)

        return EventSourceResponse(events())

    async def publish(ws: WebSocket) -> None:
        await ws.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                data = envelope % await ws.receive_text()
                for queue in subscribers:
                    queue.put_nowait(data)

    app = Starlette(routes=[Route(SSE_PATH, stream), WebSocketRoute("/pub", publish)])
    uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            ws="websockets-sansio",
            ws_per_message_deflate=False,
            ws_ping_interval=None,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )
    ).run()


# -- a minimal WebSocket client ---------------------------------------------------------


def protobuf_subscribe(token: bytes, durable: int) -> bytes:
    """The Protobuf frame of ``connect`` and the subscriptions (ids 1, 2 and 3)."""
    from eventcast.protocol import protobuf
    from eventcast.protocol.frames import Command, ConnectRequest, SubscribeRequest

    commands = [
        Command(id=1, connect=ConnectRequest(token=token.decode())),
        Command(id=2, subscribe=SubscribeRequest(channel=CHANNEL)),
    ]
    if durable:
        commands.append(Command(id=3, subscribe=SubscribeRequest(channel=DURABLE_CHANNEL)))
    return protobuf.encode_commands(commands)


class Shared:
    """Shared memory between the orchestrator, the workers and the publisher."""

    def __init__(self, ctx: Any, workers: int) -> None:
        self.delivered = ctx.Array("q", workers, lock=False)  # publications received
        self.ready = ctx.Array("q", workers, lock=False)  # clients subscribed
        self.failed = ctx.Array("q", workers, lock=False)  # clients that failed or closed
        self.phase = ctx.Value("i", 0, lock=False)  # measuring phase id, 0: none
        self.stop = ctx.Value("i", 0, lock=False)
        self.rate = ctx.Value("d", 0.0, lock=False)  # publications/s; 0: closed loop
        self.published = ctx.Value("q", 0, lock=False)
        self.pub_stop = ctx.Value("i", 0, lock=False)
        self.pub_ready = ctx.Value("i", 0, lock=False)
        self.pub_errors = ctx.Value("q", 0, lock=False)
        self.base = ctx.Value("q", 0, lock=False)  # delivered when the publisher started
        # eventcast clients subscribe to the durable channel too (1), or not (0).
        self.durable = ctx.Value("i", 1, lock=False)


class Client(asyncio.Protocol):
    """One subscriber: WebSocket handshake, then protocol-specific messages."""

    def __init__(self, worker: Worker, sample: bool, token: bytes) -> None:
        self.worker = worker
        self.token = token
        self.kind = worker.kind
        self.sample = sample
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.ready = False
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.protobuf = self.kind == "eventcast-protobuf"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        path = {
            "eventcast": b"/connection/websocket",
            "eventcast-protobuf": b"/connection/websocket",
            "socketio": b"/socket.io/?EIO=4&transport=websocket",
            "websockets": b"/",
        }[self.kind]
        extra = b"Sec-WebSocket-Protocol: centrifuge-protobuf\r\n" if self.protobuf else b""
        transport.write(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"%sSec-WebSocket-Version: 13\r\n\r\n" % (path, extra)
        )

    def send(self, payload: bytes, opcode: int = 1) -> None:
        assert self.transport is not None
        self.transport.write(ws_frame(payload, opcode))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                if DEBUG:
                    print("handshake failed:", data[:300], file=sys.stderr)
                self.fail()
                return
            self.open = True
            data = data[end + 4 :]
            if self.protobuf:
                self.send(protobuf_subscribe(self.token, self.worker.shared.durable.value), 2)
            elif self.kind == "eventcast":
                commands = (
                    b'{"id":1,"connect":{"token":"%s"}}\n{"id":2,"subscribe":{"channel":"%s"}}'
                )
                if self.worker.shared.durable.value:
                    commands += (
                        b'\n{"id":3,"subscribe":{"channel":"%s"}}' % DURABLE_CHANNEL.encode()
                    )
                self.send(commands % (self.token, CHANNEL.encode()))
        frames, pos = split_frames(data)
        for opcode, payload in frames:
            if opcode == 1 or opcode == 2:
                self.message(payload)
            elif opcode == 9:
                self.send(payload, 0xA)
            elif opcode == 8:
                if DEBUG:
                    print("close frame", payload, file=sys.stderr)
                self.fail()
                return
        if pos < len(data):
            self.buf = data[pos:]

    def message(self, payload: bytes) -> None:
        if self.protobuf:
            self.protobuf_message(payload)
            return
        if self.ready:
            if self.kind == "eventcast":
                count = payload.count(b'{"push"')
                if b"{}" in payload:  # a server ping, maybe among pushes
                    for line in payload.split(b"\n"):
                        if line == b"{}":
                            self.send(b"{}")
            elif self.kind == "socketio":
                if payload == b"2":
                    self.send(b"3")
                    return
                count = 1 if payload.startswith(b'42["msg"') else 0
            else:
                count = 1
            if count:
                self.worker.deliver(count, payload, self.sample)
            return
        # Before the subscription is confirmed.
        if self.kind == "eventcast":
            if b'"error"' in payload:
                if DEBUG:
                    print("subscribe failed:", payload[:300], file=sys.stderr)
                self.fail()
            elif (
                b'{"id":3,"subscribe"' in payload
                if self.worker.shared.durable.value
                else b'{"id":2,"subscribe"' in payload
            ):
                self.subscribed()
        elif self.kind == "socketio":
            if payload.startswith(b"0{"):
                self.send(b"40")
            elif payload.startswith(b"40"):
                self.subscribed()
            elif payload == b"2":
                self.send(b"3")
        elif payload == b"ok":
            self.subscribed()

    def protobuf_message(self, payload: bytes) -> None:
        from eventcast.protocol import protobuf

        messages = protobuf.split(payload)
        if b"" in messages:  # a server ping (an empty Reply), maybe among pushes
            self.send(protobuf.PONG, 2)
        if self.ready:
            # A push is a Reply with only field 4 (push): its first byte is that tag.
            count = sum(1 for m in messages if m[:1] == b"\x22")
            if count:
                self.worker.deliver(count, payload, self.sample)
            return
        for reply in protobuf.decode_replies(payload):
            if reply.error is not None:
                if DEBUG:
                    print("subscribe failed:", reply.error, file=sys.stderr)
                self.fail()
            elif reply.id == (3 if self.worker.shared.durable.value else 2):
                self.subscribed()

    def subscribed(self) -> None:
        self.ready = True
        if not self.done.done():
            self.done.set_result(True)

    def fail(self) -> None:
        if not self.done.done():
            self.done.set_result(False)
        elif self.ready:
            self.worker.lost += 1
            self.ready = False
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.worker.stopping:
            self.fail()


class SSEClient(Client):
    """One SSE subscriber: ``GET`` the stream, then count ``data:`` lines per chunk.

    The body is HTTP/1.1 chunked; a chunk is parsed only once it is complete
    (both servers write whole events per chunk). The stream counts as
    subscribed at its ``event: subscribed``; every later ``data:`` line is a
    publication.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self.kind == "eventcast-sse":
            query = b"topic=%s&topic=%s&access_token=%s" % (
                CHANNEL.encode(),
                DURABLE_CHANNEL.replace(":", "%3A").encode(),
                self.token,
            )
        else:
            query = b"topic=%s" % CHANNEL.encode()
        transport.write(
            b"GET %s?%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\n\r\n" % (SSE_PATH.encode(), query)
        )

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            head = data[:end].lower()
            if not head.startswith(b"http/1.1 200") or b"transfer-encoding: chunked" not in head:
                if DEBUG:
                    print("SSE request failed:", data[:300], file=sys.stderr)
                self.fail()
                return
            self.open = True
            data = data[end + 4 :]
        size = len(data)
        pos = 0
        while pos < size:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            length = int(data[pos:eol].partition(b";")[0], 16)
            if not length:  # the last chunk: the server ended the stream
                if DEBUG:
                    print("SSE stream ended", file=sys.stderr)
                self.fail()
                return
            end = eol + 2 + length
            if end + 2 > size:
                break
            self.chunk(data[eol + 2 : end])
            pos = end + 2
        if pos < size:
            self.buf = data[pos:]

    def chunk(self, payload: bytes) -> None:
        if self.ready:
            count = payload.count(b"data: ")
            if count:
                self.worker.deliver(count, payload, self.sample)
            return
        i = payload.find(b"event: subscribed")
        if i < 0:  # a retry hint or a comment before the subscription
            return
        self.subscribed()
        rest = payload[i:]
        count = rest.count(b"data: ") - 1  # the subscribed event's own data line
        if count > 0:
            self.worker.deliver(count, rest, self.sample)


class Worker:
    """One load-generator process: a share of the clients."""

    def __init__(self, index: int, kind: str, shared: Shared, token: bytes) -> None:
        self.index = index
        self.kind = kind
        self.shared = shared
        self.token = token
        self.delivered = 0
        self.lost = 0
        self.stopping = False
        # phase -> (latencies in ns, weights); phase -> deliveries
        self.latency: dict[int, tuple[list[int], list[int]]] = {}
        self.frames: dict[int, list[int]] = {}  # phase -> [frames, publications]

    def deliver(self, count: int, payload: bytes, sample: bool) -> None:
        self.delivered += count
        self.shared.delivered[self.index] = self.delivered
        phase = self.shared.phase.value
        if phase:
            frames = self.frames.get(phase)
            if frames is None:
                frames = self.frames[phase] = [0, 0]
            frames[0] += 1
            frames[1] += count
        if phase and sample:
            i = payload.find(b'"ts":')
            if i >= 0:
                j = payload.find(b",", i)
                lat = time.time_ns() - int(payload[i + 5 : j])
                entry = self.latency.get(phase)
                if entry is None:
                    entry = self.latency[phase] = ([], [])
                entry[0].append(lat)
                entry[1].append(count)

    async def run(self, port: int, clients: int, first: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        tokens = [self.token] * clients
        # One user per client (connections per user are limited).
        if self.kind in ("eventcast", "eventcast-sse", "eventcast-protobuf"):
            from eventcast.server.auth import mint_token

            tokens = [
                mint_token(secret=SECRET, user=f"user{first + k}", ttl=None).encode()
                for k in range(clients)
            ]
        conns: list[Client] = []
        client_class = SSEClient if self.kind in SSE_CLIENT_KINDS else Client

        async def open_one(k: int) -> bool:
            for attempt in range(5):
                async with gate:
                    client = client_class(
                        self, sample=(first + k) % LATENCY_SAMPLE_EVERY == 0, token=tokens[k]
                    )
                    try:
                        await loop.create_connection(lambda c=client: c, "127.0.0.1", port)
                        async with asyncio.timeout(30):
                            ok = await client.done
                    except (OSError, TimeoutError) as exc:
                        if DEBUG:
                            print("connect failed:", repr(exc), file=sys.stderr)
                        ok = False
                if ok:
                    conns.append(client)
                    self.shared.ready[self.index] += 1
                    return True
                if client.transport is not None:
                    client.transport.close()
                await asyncio.sleep(0.2 * (attempt + 1))
            self.shared.failed[self.index] += 1
            return False

        await asyncio.gather(*(open_one(k) for k in range(clients)))
        while not self.shared.stop.value:
            self.shared.failed[self.index] = self.lost + clients - len(conns)
            await asyncio.sleep(0.05)
        self.stopping = True
        for client in conns:
            if client.transport is not None:
                client.transport.abort()
        return {
            "latency": self.latency,
            "frames": self.frames,
            "lost": self.lost,
            "connected": len(conns),
        }


def worker_main(
    index: int,
    kind: str,
    port: int,
    clients: int,
    first: int,
    shared: Shared,
    token: bytes,
    queue: Any,
    cpus: set[int] | None,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us
    if cpus:
        os.sched_setaffinity(0, cpus)
    worker = Worker(index, kind, shared, token)
    result = uvloop.run(worker.run(port, clients, first))
    queue.put((index, result))


# -- the publisher ----------------------------------------------------------------------


class Publisher(asyncio.Protocol):
    """A publishing connection: sends frames, answers pings, counts errors."""

    def __init__(self, kind: str, shared: Shared, token: bytes) -> None:
        self.kind = kind
        self.shared = shared
        self.token = token
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        path = {
            "eventcast": b"/connection/websocket",
            "socketio": b"/socket.io/?EIO=4&transport=websocket&role=pub",
            "websockets": b"/pub",
        }[self.kind]
        transport.write(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % path
        )

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        data = self.buf + data
        self.buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            self.open = True
            data = data[end + 4 :]
            if self.kind == "eventcast":
                self.write(ws_frame(b'{"id":1,"connect":{"token":"%s"}}' % self.token))
            elif self.kind == "websockets" and not self.ready.done():
                self.ready.set_result(None)
        frames, pos = split_frames(data)
        for opcode, payload in frames:
            if opcode == 9:
                self.write(ws_frame(payload, 0xA))
            elif opcode in (1, 2):
                self.message(payload)
        self.buf = data[pos:]

    def message(self, payload: bytes) -> None:
        if self.kind == "eventcast":
            if b'"error"' in payload:
                self.shared.pub_errors.value += payload.count(b'"error"')
            if b'{"id":1,"connect"' in payload and not self.ready.done():
                self.ready.set_result(None)
            if b"{}" in payload:
                for line in payload.split(b"\n"):
                    if line == b"{}":
                        self.write(ws_frame(b"{}"))
        elif self.kind == "socketio":
            if payload.startswith(b"0{"):
                self.write(ws_frame(b"40"))
            elif payload.startswith(b"40") and not self.ready.done():
                self.ready.set_result(None)
            elif payload == b"2":
                self.write(ws_frame(b"3"))


async def publish_loop(
    kind: str,
    port: int,
    channel: str,
    connections: int,
    clients: int,
    window: int,
    tick: float,
    shared: Shared,
    token: bytes,
) -> None:
    loop = asyncio.get_running_loop()
    pubs: list[Publisher] = []
    for _ in range(connections):
        p = Publisher(kind, shared, token)
        await loop.create_connection(lambda p=p: p, "127.0.0.1", port)
        async with asyncio.timeout(30):
            await p.ready
        pubs.append(p)
    shared.pub_ready.value = 1
    seq = 0
    next_id = 10
    chan = channel.encode()
    rate_now = -1.0
    rate_origin = 0.0
    rate_sent = 0
    turn = 0
    while not shared.pub_stop.value:
        await asyncio.sleep(tick)
        target = shared.rate.value
        if target < 0:  # paused (the orchestrator lets the clients catch up)
            continue
        if target > 0:
            now = loop.time()
            if target != rate_now:
                rate_now, rate_origin, rate_sent = target, now, 0
            due = int((now - rate_origin) * target) - rate_sent
            if due > window:  # cannot keep up: do not burst to catch up
                rate_origin, rate_sent, due = now, 0, window
            n = max(0, due)
            rate_sent += n
        else:
            rate_now = -1.0
            delivered = (sum(shared.delivered) - shared.base.value) / clients
            n = max(0, min(window, int(window - (seq - delivered))))
        if not n:
            continue
        ts = time.time_ns()
        # Spread the tick's publications over the connections, one write each.
        per = [n // connections + (1 if i < n % connections else 0) for i in range(connections)]
        for share in per:
            if not share:
                continue
            p = pubs[turn % connections]
            turn += 1
            if kind == "eventcast":
                cmds = []
                for _ in range(share):
                    cmds.append(
                        b'{"id":%d,"publish":{"channel":"%s","data":{"ts":%d,"seq":%d}}}'
                        % (next_id, chan, ts, seq)
                    )
                    next_id += 1
                    seq += 1
                p.write(ws_frame(b"\n".join(cmds)))
            elif kind == "socketio":
                frames = []
                for _ in range(share):
                    frames.append(ws_frame(b'42["pub",{"ts":%d,"seq":%d}]' % (ts, seq)))
                    seq += 1
                p.write(b"".join(frames))
            else:
                frames = []
                for _ in range(share):
                    frames.append(ws_frame(b'{"ts":%d,"seq":%d}' % (ts, seq)))
                    seq += 1
                p.write(b"".join(frames))
        shared.published.value = seq
    for p in pubs:
        if p.transport is not None:
            p.transport.abort()


def publisher_main(
    kind: str,
    port: int,
    channel: str,
    connections: int,
    clients: int,
    window: int,
    tick: float,
    shared: Shared,
    token: bytes,
    cpus: set[int] | None,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)
    uvloop.run(publish_loop(kind, port, channel, connections, clients, window, tick, shared, token))


# -- the orchestrator -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not listen on {port} within {timeout}s")


def weighted_percentile(lat: list[int], weights: list[int], q: float) -> float:
    if not lat:
        return float("nan")
    pairs = sorted(zip(lat, weights, strict=True))
    total = sum(weights)
    target = q / 100 * total
    acc = 0
    for value, weight in pairs:
        acc += weight
        if acc >= target:
            return value / 1e6
    return pairs[-1][0] / 1e6


class Run:
    """One server with its clients; measures phases against it."""

    def __init__(
        self,
        kind: str,
        args: argparse.Namespace,
        cpus: tuple[set[int], set[int]] | None,
        transport: str = "websocket",
    ):
        self.kind = kind
        self.transport = transport
        # What the load generators speak, and what the publisher speaks.
        self.client_kind = kind
        self.pub_kind = kind
        if kind == "floor":  # speaks what the `websockets` system's clients speak
            self.client_kind = self.pub_kind = "websockets"
        if kind == "eventcast-protobuf":  # the clients speak Protobuf, the publisher JSON
            self.pub_kind = "eventcast"
        if transport == "sse":
            self.client_kind = "eventcast-sse" if kind == "eventcast" else kind
            self.pub_kind = "eventcast" if kind == "eventcast" else "websockets"
        self.args = args
        self.cpus = cpus
        self.ctx = multiprocessing.get_context("fork")
        self.workers = args.workers
        self.shared = Shared(self.ctx, self.workers)
        # Without the durable channel, each client is in one channel only.
        self.shared.durable.value = 0 if getattr(args, "no_durable", False) else 1
        self.server: subprocess.Popen[bytes] | None = None
        self.procs: list[Any] = []
        self.publisher: Any = None
        self.queue = self.ctx.Queue()
        self.tmp = tempfile.mkdtemp(prefix="eventcast-hub-bench-")
        self.phase_id = 0
        from eventcast.server.auth import mint_token

        self.token = mint_token(secret=SECRET, user="bench", ttl=None).encode()

    def start(self) -> None:
        args = self.args
        self.port = free_port()
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", self.kind]
        cmd += ["--port", str(self.port), "--data-dir", self.tmp]
        env = dict(os.environ)
        if self.transport != "websocket" and env.get("EVENTCAST_BENCH_SERVER_PROFILE"):
            env["EVENTCAST_BENCH_SERVER_PROFILE"] += f".{self.transport}"
        self.server = subprocess.Popen(cmd, start_new_session=True, env=env)
        if self.cpus:
            os.sched_setaffinity(self.server.pid, self.cpus[0])
        wait_for_port(self.port, self.server)
        per = [args.clients // self.workers] * self.workers
        for i in range(args.clients % self.workers):
            per[i] += 1
        first = 0
        for i, n in enumerate(per):
            proc = self.ctx.Process(
                target=worker_main,
                args=(
                    i,
                    self.client_kind,
                    self.port,
                    n,
                    first,
                    self.shared,
                    self.token,
                    self.queue,
                    self.cpus[1] if self.cpus else None,
                ),
                daemon=True,
            )
            proc.start()
            self.procs.append(proc)
            first += n
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, failed = sum(self.shared.ready), sum(self.shared.failed)
            if ready + failed >= args.clients:
                break
            if self.server.poll() is not None:
                raise RuntimeError("the server exited")
            time.sleep(0.1)
        ready = sum(self.shared.ready)
        if ready < args.clients:
            raise RuntimeError(
                f"only {ready} of {args.clients} clients subscribed "
                f"(ready {list(self.shared.ready)}, failed {list(self.shared.failed)})"
            )

    def start_publisher(self, channel: str, connections: int) -> None:
        self.stop_publisher()
        self.shared.pub_stop.value = 0
        self.shared.pub_ready.value = 0
        self.shared.rate.value = 0.0
        self.publisher = self.ctx.Process(
            target=publisher_main,
            args=(
                self.pub_kind,
                self.port,
                channel,
                connections,
                self.args.clients,
                self.args.window,
                self.args.tick,
                self.shared,
                self.token,
                self.cpus[1] if self.cpus else None,
            ),
            daemon=True,
        )
        # The closed loop compares published with delivered since it started.
        self.shared.published.value = 0
        self.shared.base.value = sum(self.shared.delivered)
        self.publisher.start()
        deadline = time.monotonic() + 30
        while not self.shared.pub_ready.value:
            if time.monotonic() > deadline or not self.publisher.is_alive():
                raise RuntimeError("the publisher could not connect")
            time.sleep(0.05)

    def stop_publisher(self) -> None:
        if self.publisher is not None:
            self.shared.pub_stop.value = 1
            self.publisher.join(5)
            if self.publisher.is_alive():
                self.publisher.kill()
                self.publisher.join()
            self.publisher = None

    def lag(self) -> int:
        """Deliveries not yet received since the publisher started."""
        delivered = sum(self.shared.delivered) - self.shared.base.value
        return int(self.shared.published.value * self.args.clients - delivered)

    def measure(self, label: str, target_rate: float) -> dict[str, Any]:
        """Run the load, warm up, then measure one window; return the figures."""
        args = self.args
        if target_rate > 0:
            # Pause and let the clients catch up with the previous load first.
            self.shared.rate.value = -1.0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.lag() > 0:
                time.sleep(0.05)
        self.shared.rate.value = target_rate
        time.sleep(args.warmup)
        assert self.server is not None
        pid = self.server.pid
        workers = [p.pid for p in self.procs]
        if self.publisher is not None:
            workers.append(self.publisher.pid)
        self.phase_id += 1
        user0, sys0 = process_times(pid)
        cpu0 = user0 + sys0
        gen0 = sum(process_cpu(w) for w in workers)
        busy0 = system_busy()
        d0, p0 = sum(self.shared.delivered), self.shared.published.value
        e0 = self.shared.pub_errors.value
        t0 = time.perf_counter()
        self.shared.phase.value = self.phase_id
        time.sleep(args.seconds)
        self.shared.phase.value = 0
        elapsed = time.perf_counter() - t0
        user1, sys1 = process_times(pid)
        cpu1 = user1 + sys1
        gen1 = sum(process_cpu(w) for w in workers)
        busy1 = system_busy()
        d1, p1 = sum(self.shared.delivered), self.shared.published.value
        deliveries = d1 - d0
        published = p1 - p0
        lag = self.lag()
        return {
            "system": self.kind,
            "transport": self.transport,
            "load": label,
            "phase": self.phase_id,
            "clients": args.clients,
            "seconds": elapsed,
            "publications_per_s": published / elapsed,
            "deliveries_per_s": deliveries / elapsed,
            "server_cpu_s": cpu1 - cpu0,
            "server_cpu_pct": (cpu1 - cpu0) / elapsed * 100,
            "server_system_share": (sys1 - sys0) / max(cpu1 - cpu0, 1e-9),
            "loadgen_cpu_pct": (gen1 - gen0) / elapsed * 100,
            # Everything else on the machine (other users' work) in the window.
            "other_cpu_pct": max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (gen1 - gen0))
            / elapsed
            * 100,
            "cpu_us_per_delivery": (cpu1 - cpu0) / max(deliveries, 1) * 1e6,
            "lag_at_end": lag,
            "publish_errors": self.shared.pub_errors.value - e0,
            "lost_clients": sum(self.shared.failed),
        }

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """Stop the clients and attach their latencies to the rows."""
        self.stop_publisher()
        self.shared.stop.value = 1
        results: dict[int, dict[str, Any]] = {}
        for _ in self.procs:
            try:
                index, result = self.queue.get(timeout=30)
            except Exception:
                break
            results[index] = result
        for row in rows:
            lat: list[int] = []
            weights: list[int] = []
            for result in results.values():
                entry = result["latency"].get(row["phase"])
                if entry:
                    lat.extend(entry[0])
                    weights.extend(entry[1])
            frames = sum(r["frames"].get(row["phase"], [0, 0])[0] for r in results.values())
            pubs = sum(r["frames"].get(row["phase"], [0, 0])[1] for r in results.values())
            row["publications_per_frame"] = pubs / frames if frames else float("nan")
            row["latency_samples"] = len(lat)
            row["p50_ms"] = weighted_percentile(lat, weights, 50)
            row["p99_ms"] = weighted_percentile(lat, weights, 99)
            row["max_ms"] = max(lat) / 1e6 if lat else float("nan")

    def close(self) -> None:
        self.shared.stop.value = 1
        with contextlib.suppress(Exception):
            self.stop_publisher()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.server is not None and self.server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def run_system(
    kind: str,
    args: argparse.Namespace,
    cpus: tuple[set[int], set[int]] | None,
    transport: str = "websocket",
) -> list[dict[str, Any]]:
    live_publishers = args.live_publishers if kind == "eventcast" else 1
    variants: list[tuple[str, str, int]] = [("live", CHANNEL, live_publishers)]
    if kind == "eventcast" and not args.no_durable:
        variants.append(("durable", DURABLE_CHANNEL, args.durable_publishers))
    run = Run(kind, args, cpus, transport)
    rows: list[dict[str, Any]] = []
    try:
        start = time.perf_counter()
        run.start()
        print(
            f"  {kind} ({transport}): {args.clients} clients subscribed in "
            f"{time.perf_counter() - start:.1f}s",
            flush=True,
        )
        for variant, channel, connections in variants:
            run.start_publisher(channel, connections)
            full = run.measure("full", 0.0)
            full["variant"] = variant
            rows.append(full)
            half = run.measure("half", max(1.0, full["publications_per_s"] / 2))
            half["variant"] = variant
            rows.append(half)
            for fixed in args.rate:
                row = run.measure(f"{fixed:g}/s", fixed)
                row["variant"] = variant
                rows.append(row)
            run.stop_publisher()
            time.sleep(1.0)  # let the last publications drain
        run.finish(rows)
    finally:
        run.close()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """One table per transport; "vs eventcast" compares with eventcast's live channel."""
    transports = list(dict.fromkeys(r.get("transport", "websocket") for r in rows))
    for transport in transports:
        group = [r for r in rows if r.get("transport", "websocket") == transport]
        print_transport_table(group, transport)


def print_transport_table(rows: list[dict[str, Any]], transport: str = "websocket") -> None:
    ref = {
        (r["variant"], r["load"]): r["cpu_us_per_delivery"]
        for r in rows
        if r["system"] == "eventcast"
    }
    unit = "pubs/chunk" if transport == "sse" else "pubs/frame"
    print(f"\n{'WebSocket' if transport == 'websocket' else 'SSE'}:")
    print(
        f"{'system':<13} | {'channel':<7} | {'load':<6} | {'pubs/s':>8} | {'deliveries/s':>12} "
        f"| {'CPU µs/deliv':>12} | {'vs eventcast':>12} | {'server CPU (kernel)':>19} "
        f"| {'loadgen CPU':>11} "
        f"| {'other CPU':>9} | {unit:>10} | {'p50 ms':>7} | {'p99 ms':>7}"
    )
    for r in rows:
        base = ref.get(("live", r["load"]))
        ratio = f"{r['cpu_us_per_delivery'] / base:11.1f}x" if base else f"{'-':>12}"
        sys_pct = r["server_system_share"] * 100
        print(
            f"{r['system']:<13} | {r['variant']:<7} | {r['load']:<6} | "
            f"{r['publications_per_s']:8.0f} | {rate(r['deliveries_per_s']):>12} | "
            f"{r['cpu_us_per_delivery']:12.3f} | {ratio} | "
            f"{r['server_cpu_pct']:4.0f}% ({sys_pct:2.0f}% sys) | "
            f"{r['loadgen_cpu_pct']:10.0f}% | {r['other_cpu_pct']:8.0f}% | "
            f"{r['publications_per_frame']:10.1f} | "
            f"{r['p50_ms']:7.2f} | {r['p99_ms']:7.2f}"
        )
        problems = []
        if r["publish_errors"]:
            problems.append(f"{r['publish_errors']} publish errors")
        if r["lost_clients"]:
            problems.append(f"{r['lost_clients']} clients lost")
        if problems:
            print(f"{'':<13}   ({', '.join(problems)})")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, help="subscribers (default 1000; quick: 200)")
    parser.add_argument("--quick", action="store_true", help="fewer clients, short windows")
    parser.add_argument("--seconds", type=float, help="measuring window per load (default 5)")
    parser.add_argument("--warmup", type=float, help="seconds before each window (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--window", type=int, default=200, help="full load: publications in flight at most"
    )
    parser.add_argument("--tick", type=float, default=0.002, help="publisher tick, seconds")
    parser.add_argument(
        "--durable-publishers",
        type=int,
        default=32,
        help="publishing connections for the durable channel (commands of one "
        "connection run in order, so concurrency comes from connections)",
    )
    parser.add_argument(
        "--live-publishers",
        type=int,
        default=1,
        help="publishing connections for eventcast's live channel (default 1)",
    )
    parser.add_argument("--no-durable", action="store_true", help="skip the durable channel")
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        default=[],
        help="also measure at this many publications/s (repeatable)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    all_systems = tuple(dict.fromkeys(SYSTEMS + SSE_SYSTEMS))
    parser.add_argument(
        "--systems",
        default=",".join(all_systems),
        help=f"comma-separated subset of {all_systems} (each where its transport is run)",
    )
    parser.add_argument(
        "--transport",
        choices=(*TRANSPORTS, "both"),
        default="both",
        help="WebSocket (eventcast, socketio, websockets, floor), SSE (eventcast, "
        "sse-starlette) or both (default)",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--serve", choices=all_systems, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:  # inside the server process
        servers: dict[str, Callable[[], None]] = {
            "eventcast": lambda: serve_eventcast(args.port, args.data_dir),
            "eventcast-protobuf": lambda: serve_eventcast(args.port, args.data_dir),
            "socketio": lambda: serve_socketio(args.port),
            "websockets": lambda: serve_websockets(args.port),
            "floor": lambda: serve_floor(args.port),
            "sse-starlette": lambda: serve_sse_starlette(args.port),
        }
        servers[args.serve]()
        return {}

    if args.clients is None:
        args.clients = 200 if args.quick else 1000
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in all_systems:
            parser.error(f"unknown system {s!r}")
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    plan = [
        (kind, transport)
        for transport in transports
        for kind in systems
        if kind in (SYSTEMS if transport == "websocket" else SSE_SYSTEMS)
    ]
    if not plan:
        parser.error(f"none of {systems} runs over {args.transport}")
    cores = sorted(os.sched_getaffinity(0))
    cpus = None
    if not args.no_pin and len(cores) >= 2:
        cpus = ({cores[0]}, set(cores[1:]))
    names = {"websocket": "WebSocket", "sse": "SSE"}
    print(header("hub fan-out over " + " and ".join(names[t] for t in transports)))
    print(
        f"({args.clients} clients in {args.workers} processes, window {args.seconds:g}s after "
        f"{args.warmup:g}s warm-up, full load: <= {args.window} publications in flight, "
        f"publisher tick {args.tick * 1000:g} ms, "
        + (
            f"server on CPU {sorted(cpus[0])}, load generators on {sorted(cpus[1])})"
            if cpus
            else "no CPU pinning)"
        )
    )
    rows: list[dict[str, Any]] = []
    for kind, transport in plan:
        rows.extend(run_system(kind, args, cpus, transport))
    print_table(rows)
    out = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "serve"},
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
