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
import collections
import contextlib
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec
import uvloop

from _common import (
    PySpy,
    child_process,
    header,
    loadavg,
    machine,
    merge_threads,
    print_samples,
    process_cpu,
    process_run_time,
    process_times,
    rate,
    save_json,
    split_frames,
    system_busy,
    ws_frame,
)
from _probe import install_probe_from_env

SECRET = "benchmark-hmac-secret-" + "x" * 32
API_KEY = "benchmark-api-key"
CHANNEL = "bench"
DURABLE_CHANNEL = "durable:bench"
SYSTEMS = ("eventcast", "eventcast-protobuf", "socketio", "websockets", "floor")  # over WebSocket
#: The many-rooms workload (``--workload rooms``): systems, publication sources, names.
ROOM_SYSTEMS = ("eventcast", "socketio", "floor")
ROOM_SOURCES = ("batch", "publish", "client")
#: ``websockets-rooms`` speaks the floor's messages (benchmarks/memory.py uses it).
ROOM_CLIENT_KINDS = (*(f"{s}-rooms" for s in ROOM_SYSTEMS), "websockets-rooms")
ROOM_NS, USER_NS, VOID_NS = "rooms", "user", "void"
ROOM_SHARE = 0.9  # of the API's publications go to rooms, the rest to user channels
#: Client kinds that authenticate with a JWT of their own user.
EVENTCAST_CLIENT_KINDS = ("eventcast", "eventcast-sse", "eventcast-protobuf", "eventcast-rooms")
SSE_SYSTEMS = ("eventcast", "sse-starlette")  # over Server-Sent Events
TRANSPORTS = ("websocket", "sse")
#: Client kinds of the load generators that speak SSE (worker_main's ``kind``).
SSE_CLIENT_KINDS = ("eventcast-sse", "sse-starlette")
SSE_PATH = "/connection/sse"
LATENCY_SAMPLE_EVERY = 5  # every 5th client records latencies
VOID_PUBLICATIONS = 200_000  # distinct publications the intake phase sends in turn
#: Requests the intake phase keeps in flight on each API connection (pipelined): with
#: one, the server idles whenever every connection's answer is on its way back.
INTAKE_DEPTH = int(os.environ.get("EVENTCAST_BENCH_INTAKE_DEPTH", "2"))
CONNECT_CONCURRENCY = 50
DEBUG = bool(os.environ.get("BENCH_DEBUG"))


# -- servers (each runs in its own process: hub.py --serve KIND --port N) ---------------


def eventcast_settings(data_dir: str, workload: str = "fanout") -> Any:
    """The settings ``serve_eventcast`` runs the hub with (``instructions.py`` too)."""
    from eventcast.server.config import Settings

    perms = {"allow_subscribe_for_client": True, "allow_publish_for_client": True}
    namespaces: list[dict[str, Any]] = [
        {"name": "", **perms},
        {"name": "durable", "history_size": 1000, **perms},
    ]
    log_url = f"sqlite:///{os.path.abspath(data_dir)}/events.db"
    if workload == "rooms":
        # Chat-like: members publish into their room; a user channel is open to its
        # user only (Centrifugo's `#` rule); `void` takes publications nobody reads.
        namespaces = [
            {
                "name": ROOM_NS,
                "allow_subscribe_for_client": True,
                "allow_publish_for_subscriber": True,
            },
            {"name": USER_NS, "allow_user_limited_channels": True},
            {"name": VOID_NS, "allow_publish_for_client": True},
        ]
        log_url = "memory://"
    # The load is one publisher and many connections from one host: lift the
    # abuse limits (those this version has) out of the way.
    limits = {
        "client_queue_bytes": 8 * 1_048_576,
        "connections_per_user": 1_000_000,
        "connection_rate": 1e9,
        "command_rate": 1e9,
        "user_command_rate": 1e9,
    }
    return Settings.load(
        token_hmac_secret=SECRET,
        api_key=API_KEY,
        log_url=log_url,
        namespaces=namespaces,
        **{k: v for k, v in limits.items() if k in Settings.model_fields},
    )


def serve_eventcast(port: int, data_dir: str, workload: str = "fanout") -> None:
    import uvicorn

    from eventcast.server.app import create_app, tune_collector, uvicorn_config

    settings = eventcast_settings(data_dir, workload)
    config = uvicorn_config(settings, host="127.0.0.1", port=port)
    config["log_level"] = "warning"
    config["timeout_graceful_shutdown"] = 2
    profile_to = os.environ.get("EVENTCAST_BENCH_SERVER_PROFILE")
    app = create_app(settings)
    if not os.environ.get("EVENTCAST_BENCH_GC_THRESHOLD"):
        tune_collector()  # as `eventcast serve` does (an experiment's thresholds win)
    if not profile_to:
        uvicorn.Server(uvicorn.Config(app, **config)).run()
        return
    import cProfile

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutdown: the profile would be lost.
            getattr(self, "_captured_signals", []).clear()

    server = Server(uvicorn.Config(app, **config))

    profile = cProfile.Profile()
    profile.enable()
    try:
        server.run()
    finally:
        profile.disable()
        profile.dump_stats(profile_to)


def run_uvicorn(app: Any, port: int) -> None:
    """Serve a baseline's ASGI app under the uvicorn options eventcast's server uses."""
    import uvicorn

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


def serve_socketio(port: int) -> None:
    import socketio

    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        if "role=pub" not in environ.get("QUERY_STRING", ""):
            await sio.enter_room(sid, CHANNEL)

    @sio.on("pub")
    async def pub(sid: str, data: Any) -> None:
        await sio.emit("msg", data, room=CHANNEL)

    run_uvicorn(socketio.ASGIApp(sio), port)


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


def serve_protocol(factory: Callable[[], asyncio.Protocol], port: int) -> None:
    """Serve a bare asyncio protocol on uvloop until the process is stopped."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


def ws_accept(head: bytes) -> bytes:
    """The ``101 Switching Protocols`` answer to a WebSocket handshake's request head."""
    import base64
    import hashlib

    key = b""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            key = line.split(b":", 1)[1].strip()
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept
    )


def serve_floor(port: int) -> None:
    """The floor: no framework, no protocol, no queue, no checks.

    A bare uvloop protocol: what one publishing connection sends in one read
    is framed once (one text frame per publication, concatenated) and written
    to every subscriber's transport, one ``write`` each. Nothing any hub does
    per delivery can cost less on one event loop, so its latency is the floor
    the machine sets for writing to N sockets.
    """

    subscribers: set[asyncio.Transport] = set()

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
                t.write(ws_accept(data[:end]))
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

    serve_protocol(Conn, port)


def serve_socketio_rooms(port: int) -> None:
    """python-socketio with rooms, and the HTTP API's ``publish`` and ``batch`` beside it.

    A client joins the rooms named in its connection URL (``room=``, ``user=``)
    on connect; ``pub`` from a client emits into its ``channel`` room; the API
    (a Starlette app mounted as socketio's ``other_asgi_app``) takes
    Centrifugo's request bodies and emits each publication into its room.
    """
    from urllib.parse import parse_qs

    import socketio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        for room in query.get("room", []) + query.get("user", []):
            await sio.enter_room(sid, room)

    @sio.on("pub")
    async def pub(sid: str, message: dict[str, Any]) -> None:
        await sio.emit("msg", message["data"], room=message["channel"])

    async def api_publish(request: Request) -> JSONResponse:
        params = json.loads(await request.body())
        await sio.emit("msg", params["data"], room=params["channel"])
        return JSONResponse({"result": {}})

    async def api_batch(request: Request) -> JSONResponse:
        params = json.loads(await request.body())
        replies = []
        for command in params["commands"]:
            body = command["publish"]
            await sio.emit("msg", body["data"], room=body["channel"])
            replies.append({"publish": {}})
        return JSONResponse({"replies": replies})

    api = Starlette(
        routes=[
            Route("/api/publish", api_publish, methods=["POST"]),
            Route("/api/batch", api_batch, methods=["POST"]),
        ]
    )
    run_uvicorn(socketio.ASGIApp(sio, other_asgi_app=api), port)


def content_length(head: bytes) -> int:
    """The ``Content-Length`` of an HTTP message head (without its blank line), or -1."""
    i = head.lower().find(b"\r\ncontent-length:")
    if i < 0:
        return -1
    j = head.find(b"\r\n", i + 2)
    return int(head[i + 17 : j if j >= 0 else len(head)])


class FloorPublish(msgspec.Struct):
    """The floor's view of an API publication: the data stays raw bytes."""

    channel: str
    data: msgspec.Raw


class FloorCommand(msgspec.Struct):
    publish: FloorPublish


class FloorBatch(msgspec.Struct):
    commands: list[FloorCommand]


def serve_floor_rooms(port: int) -> None:
    """The floor of the many-rooms workload, served on ``port`` (:func:`floor_rooms_protocol`)."""
    serve_protocol(floor_rooms_protocol(), port)


def floor_rooms_protocol() -> type[asyncio.Protocol]:
    """The floor of the many-rooms workload: a bare uvloop protocol, no framework.

    WebSocket members say ``sub <channel> [<channel>]`` once; ``p <channel>
    <json>`` from a member publishes. ``POST /api/publish`` and ``POST
    /api/batch`` take Centrifugo's request bodies (decoded with msgspec, the
    data kept as raw bytes). Each publication is framed once; every member of
    its channel gets the frames of one request (or one read of a publishing
    member) in one coalesced ``write``. No auth, no checks, no queues: nothing
    a hub does per delivery or per publication can cost less on one event loop.
    """

    decode_publish = msgspec.json.Decoder(FloorPublish).decode
    decode_batch = msgspec.json.Decoder(FloorBatch).decode
    channels: dict[str, list[asyncio.Transport]] = {}

    def frame(payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            return bytes((0x81, n)) + payload
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload

    def fan_out(publications: list[tuple[str, bytes]]) -> None:
        """Frame each publication once; one write per member for all of them."""
        if len(publications) == 1:
            channel, payload = publications[0]
            framed = frame(payload)
            for t in channels.get(channel, ()):
                t.write(framed)
            return
        out: dict[asyncio.Transport, list[bytes]] = {}
        for channel, payload in publications:
            members = channels.get(channel)
            if not members:
                continue
            framed = frame(payload)
            for t in members:
                pending = out.get(t)
                if pending is None:
                    out[t] = [framed]
                else:
                    pending.append(framed)
        for t, frames in out.items():
            t.write(frames[0] if len(frames) == 1 else b"".join(frames))

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.buf = b""
            self.mode = ""  # "" until the first request: "ws" or "http"
            self.joined: list[str] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            if self.buf:
                data = self.buf + data
                self.buf = b""
            if self.mode == "ws":
                self.ws_received(data)
            elif self.mode == "http":
                self.http_received(data)
            elif data.startswith(b"GET "):
                self.handshake(data)
            else:
                self.mode = "http"
                self.http_received(data)

        def handshake(self, data: bytes) -> None:
            t = self.transport
            assert t is not None
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            t.write(ws_accept(data[:end]))
            self.mode = "ws"
            self.ws_received(data[end + 4 :])

        def ws_received(self, data: bytes) -> None:
            t = self.transport
            assert t is not None
            frames, pos = split_frames(data)
            self.buf = data[pos:]
            publications: list[tuple[str, bytes]] = []
            for opcode, raw in frames:
                if opcode != 1:
                    continue
                if raw.startswith(b"p "):
                    channel, _, payload = raw[2:].partition(b" ")
                    publications.append((channel.decode(), payload))
                elif raw.startswith(b"sub "):
                    for name in raw[4:].decode().split():
                        channels.setdefault(name, []).append(t)
                        self.joined.append(name)
                    t.write(b"\x81\x02ok")
            if publications:
                fan_out(publications)

        def http_received(self, data: bytes) -> None:
            t = self.transport
            assert t is not None
            while True:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = data[:end]
                length = content_length(head)
                if len(data) < end + 4 + length:
                    break
                body = data[end + 4 : end + 4 + length]
                data = data[end + 4 + length :]
                if head.startswith(b"POST /api/batch "):
                    commands = decode_batch(body).commands
                    fan_out([(c.publish.channel, c.publish.data) for c in commands])
                    answer = b'{"replies":[' + b",".join([b'{"publish":{}}'] * len(commands))
                    answer += b"]}"
                else:
                    one = decode_publish(body)
                    fan_out([(one.channel, one.data)])
                    answer = b'{"result":{}}'
                t.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
            self.buf = data

        def connection_lost(self, exc: Exception | None) -> None:
            for name in self.joined:
                members = channels.get(name)
                if members is not None and self.transport in members:
                    members.remove(self.transport)
                    if not members:
                        del channels[name]

    return Conn


def serve_websockets_rooms(port: int) -> None:
    """A plain ``websockets`` server with channels, speaking the floor's messages.

    ``sub <channel> ...`` joins channels (answered ``ok``); ``p <channel>
    <json>`` sends the JSON to every member with ``websockets.broadcast``. One
    handler coroutine per connection, as a ``websockets`` application has.
    """
    import logging

    from websockets.asyncio.server import ServerConnection, broadcast, serve

    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    channels: dict[str, set[ServerConnection]] = {}

    async def handler(ws: ServerConnection) -> None:
        joined: list[str] = []
        try:
            async for message in ws:
                if not isinstance(message, str):
                    continue
                if message.startswith("p "):
                    _, channel, data = message.split(" ", 2)
                    broadcast(channels.get(channel, ()), data)
                elif message.startswith("sub "):
                    for name in message[4:].split():
                        channels.setdefault(name, set()).add(ws)
                        joined.append(name)
                    await ws.send("ok")
        finally:
            for name in joined:
                members = channels.get(name)
                if members is not None:
                    members.discard(ws)
                    if not members:
                        del channels[name]

    async def run() -> None:
        async with serve(
            handler, "127.0.0.1", port, compression=None, ping_interval=None, backlog=4096
        ) as server:
            await server.serve_forever()

    uvloop.run(run())


def serve_sse_starlette(port: int) -> None:
    """The usual sse-starlette fan-out: one queue and one ``EventSourceResponse`` per client."""
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
    run_uvicorn(app, port)


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
        # The many-rooms workload (RoomWorker, rooms_publish_loop):
        self.rooms = ctx.Value("q", 0, lock=False)  # rooms (clients in room index % rooms)
        self.user_channels = ctx.Value("i", 1, lock=False)  # each client in its user channel too
        self.expected = ctx.Value("q", 0, lock=False)  # deliveries the publications owe
        self.acked = ctx.Value("q", 0, lock=False)  # publications the API answered
        self.void = ctx.Value("i", 0, lock=False)  # 1: publish into channels nobody is in
        self.client_due = ctx.Array("q", workers, lock=False)  # client publishes, per worker


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
            self.opened()
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

    def opened(self) -> None:
        """The handshake is done: subscribe (eventcast speaks first, the others wait)."""
        if self.protobuf:
            self.send(protobuf_subscribe(self.token, self.worker.shared.durable.value), 2)
        elif self.kind == "eventcast":
            commands = b'{"id":1,"connect":{"token":"%s"}}\n{"id":2,"subscribe":{"channel":"%s"}}'
            if self.worker.shared.durable.value:
                commands += b'\n{"id":3,"subscribe":{"channel":"%s"}}' % DURABLE_CHANNEL.encode()
            self.send(commands % (self.token, CHANNEL.encode()))

    def message(self, payload: bytes) -> None:
        if self.protobuf:
            self.protobuf_message(payload)
            return
        if self.ready:
            count = self.pushes(payload)
            if count:
                self.worker.deliver(count, payload, self.sample)
            return
        self.before_ready(payload)

    def pushes(self, payload: bytes) -> int:
        """The publications a frame carries once subscribed (answering pings on the way)."""
        protocol = self.kind.removesuffix("-rooms")
        if protocol == "eventcast":
            if b"{}" in payload:  # a server ping, maybe among pushes
                for line in payload.split(b"\n"):
                    if line == b"{}":
                        self.send(b"{}")
            return payload.count(b'{"push"')
        if protocol == "socketio":
            if payload == b"2":
                self.send(b"3")
                return 0
            return 1 if payload.startswith(b'42["msg"') else 0
        return 1

    def before_ready(self, payload: bytes) -> None:
        """A frame before the subscription is confirmed."""
        self.handshake_reply(payload, 3 if self.worker.shared.durable.value else 2)

    def handshake_reply(self, payload: bytes, last_id: int) -> None:
        """Go on with the handshake; eventcast's is done with the reply to ``last_id``."""
        protocol = self.kind.removesuffix("-rooms")
        if protocol == "eventcast":
            if b'"error"' in payload:
                if DEBUG:
                    print("subscribe failed:", payload[:300], file=sys.stderr)
                self.fail()
            elif b'{"id":%d,"subscribe"' % last_id in payload:
                self.subscribed()
        elif protocol == "socketio":
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


def room_channel(k: int) -> str:
    """The name of room ``k`` (the same name in every system)."""
    return f"{ROOM_NS}:r{k}"


def user_channel(i: int) -> str:
    """Client ``i``'s own channel: Centrifugo's user-limited ``#`` form."""
    return f"{USER_NS}:#user{i}"


def void_channel(channel: str) -> str:
    """A channel of the same shape that nobody is subscribed to (the intake phase)."""
    return VOID_NS + ":" + channel.partition(":")[2].replace("#", "")


def draw_channel(rng: random.Random, rooms: int, clients: int) -> tuple[str, bool]:
    """A publication's channel, drawn as the API sources draw it: a room
    (:data:`ROOM_SHARE`) or a client's user channel; and whether it is a room."""
    if rng.random() < ROOM_SHARE:
        return room_channel(rng.randrange(rooms)), True
    return user_channel(rng.randrange(clients)), False


def room_subscription(kind: str, token: bytes, channels: list[str]) -> bytes:
    """What a member of the many rooms sends once connected, as a client of ``kind``
    (``eventcast-rooms``: ``connect``, then a ``subscribe`` per channel; the floor
    and the plain websockets server: one ``sub``)."""
    if kind == "eventcast-rooms":
        commands = [b'{"id":1,"connect":{"token":"%s"}}' % token]
        for n, channel in enumerate(channels, 2):
            commands.append(b'{"id":%d,"subscribe":{"channel":"%s"}}' % (n, channel.encode()))
        return b"\n".join(commands)
    return b"sub " + " ".join(channels).encode()


def room_publication(kind: str, channel: str, data: bytes, command_id: int = 0) -> bytes:
    """A member's publication of JSON ``data`` into ``channel``, as a client of ``kind``
    sends it (``eventcast-rooms``: a ``publish`` command numbered ``command_id``)."""
    if kind == "eventcast-rooms":
        return b'{"id":%d,"publish":{"channel":"%s","data":%s}}' % (
            command_id,
            channel.encode(),
            data,
        )
    if kind == "socketio-rooms":
        return b'42["pub",{"channel":"%s","data":%s}]' % (channel.encode(), data)
    return b"p %s %s" % (channel.encode(), data)


def api_body(source: str, channels: list[str], ts: int, first: int) -> bytes:
    """The body of a ``batch`` (or, with one channel, a ``publish``) of publications
    into ``channels``, numbered from ``first``."""
    commands = [
        b'{"channel":"%s","data":{"ts":%d,"seq":%d}}' % (channel.encode(), ts, first + i)
        for i, channel in enumerate(channels)
    ]
    if source == "batch":
        return b'{"commands":[{"publish":' + b'},{"publish":'.join(commands) + b"}]}"
    return commands[0]


def api_request(path: bytes, body: bytes) -> bytes:
    """A ``POST`` of ``body`` to the API ``path``, as the API connections send it."""
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path, API_KEY.encode(), len(body), body)
    )


class RoomClient(Client):
    """A member of one room and of its own user channel (the many-rooms workload).

    Client ``i`` is in room ``i % rooms``, so every room has members in every
    worker process. It subscribes like a chat client of each system would:
    eventcast with ``connect`` and two ``subscribe`` commands, python-socketio
    with its rooms in the connection URL (the server joins them on connect),
    the floor with one ``sub`` message.
    """

    def __init__(self, worker: Worker, index: int, token: bytes) -> None:
        super().__init__(worker, sample=index % LATENCY_SAMPLE_EVERY == 0, token=token)
        shared = worker.shared
        self.room = room_channel(index % shared.rooms.value)
        self.channels = [self.room]
        if shared.user_channels.value:
            self.channels.append(user_channel(index))
        self.next_id = 10

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self.kind == "socketio-rooms":
            from urllib.parse import quote

            path = b"/socket.io/?EIO=4&transport=websocket&room=" + quote(self.room).encode()
            if len(self.channels) > 1:
                path += b"&user=" + quote(self.channels[1]).encode()
        elif self.kind == "eventcast-rooms":
            path = b"/connection/websocket"
        else:
            path = b"/"
        transport.write(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % path
        )

    def opened(self) -> None:
        if self.kind != "socketio-rooms":  # (its rooms are in the connection URL)
            self.send(room_subscription(self.kind, self.token, self.channels))

    def publish(self, items: list[tuple[str, bytes]]) -> None:
        """Publish ``(channel, JSON data)`` pairs, all in one write."""
        if self.kind == "eventcast-rooms":
            commands = []
            for channel, data in items:
                commands.append(room_publication(self.kind, channel, data, self.next_id))
                self.next_id += 1
            self.send(b"\n".join(commands))
            return
        frames = [ws_frame(room_publication(self.kind, channel, data)) for channel, data in items]
        assert self.transport is not None
        self.transport.write(b"".join(frames))

    def pushes(self, payload: bytes) -> int:
        if self.kind == "eventcast-rooms" and b'"error"' in payload:  # a publish refused
            self.worker.shared.pub_errors.value += payload.count(b'"error"')
        return super().pushes(payload)

    def before_ready(self, payload: bytes) -> None:
        self.handshake_reply(payload, len(self.channels) + 1)


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
        self.conns: list[Client] = []

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

    def make_client(self, index: int, token: bytes) -> Client:
        """The client number ``index`` (of all workers' clients)."""
        client_class = SSEClient if self.kind in SSE_CLIENT_KINDS else Client
        return client_class(self, sample=index % LATENCY_SAMPLE_EVERY == 0, token=token)

    async def serve(self, clients: int) -> None:
        """Keep the clients connected (and report losses) until told to stop."""
        while not self.shared.stop.value:
            self.shared.failed[self.index] = self.lost + clients - len(self.conns)
            await asyncio.sleep(0.05)

    async def run(self, port: int, clients: int, first: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        tokens = [self.token] * clients
        # One user per client (connections per user are limited).
        if self.kind in EVENTCAST_CLIENT_KINDS:
            from eventcast.server.auth import mint_token

            tokens = [
                mint_token(secret=SECRET, user=f"user{first + k}", ttl=None).encode()
                for k in range(clients)
            ]
        conns = self.conns

        async def open_one(k: int) -> bool:
            for attempt in range(5):
                async with gate:
                    client = self.make_client(first + k, tokens[k])
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
        await self.serve(clients)
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


class RoomWorker(Worker):
    """A load-generator process of the many-rooms workload.

    Besides holding its members, it publishes for them when the source is
    ``client``: the publisher process raises ``shared.client_due[index]`` and
    this worker sends that many publications into its members' rooms, taking
    the members in turn (each member's publications of one tick in one write).
    """

    def make_client(self, index: int, token: bytes) -> Client:
        return RoomClient(self, index, token)

    async def serve(self, clients: int) -> None:
        shared = self.shared
        done = shared.client_due[self.index]
        turn = 0
        seq = self.index * 10**12
        while not shared.stop.value:
            shared.failed[self.index] = self.lost + clients - len(self.conns)
            await asyncio.sleep(0.002)
            due = shared.client_due[self.index] - done
            if due <= 0 or not self.conns:
                continue
            done += due
            void = shared.void.value
            ts = time.time_ns()
            batch: dict[RoomClient, list[tuple[str, bytes]]] = {}
            for _ in range(due):
                client = self.conns[turn % len(self.conns)]
                turn += 1
                assert isinstance(client, RoomClient)
                channel = void_channel(client.room) if void else client.room
                data = b'{"ts":%d,"seq":%d}' % (ts, seq)
                seq += 1
                batch.setdefault(client, []).append((channel, data))
            for client, items in batch.items():
                if client.transport is not None and not client.transport.is_closing():
                    client.publish(items)


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
    child_process(cpus)
    worker_class = RoomWorker if kind in ROOM_CLIENT_KINDS else Worker
    worker = worker_class(index, kind, shared, token)
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
    child_process(cpus)
    uvloop.run(publish_loop(kind, port, channel, connections, clients, window, tick, shared, token))


class ApiConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection to the server API: one request at a time,
    or up to :data:`INTAKE_DEPTH` pipelined in the intake phase.

    Counts the publications each answer acknowledged, and the errors in
    answers (an ``"error"`` in the body, or a status other than 200).
    """

    def __init__(
        self, shared: Shared, on_idle: Callable[[ApiConnection], None] | None = None
    ) -> None:
        self.shared = shared
        self.on_idle = on_idle
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        #: The publications of each request sent and not yet answered, in order.
        self.in_flight: collections.deque[int] = collections.deque()
        self.closed = False

    @property
    def busy(self) -> bool:
        """Whether a request is in flight (or the connection is gone)."""
        return self.closed or bool(self.in_flight)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def post(self, path: bytes, body: bytes, publications: int) -> None:
        assert self.transport is not None
        self.in_flight.append(publications)
        self.transport.write(api_request(path, body))

    def data_received(self, data: bytes) -> None:
        data = self.buf + data
        answered = False
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                break
            head = data[:end]
            length = content_length(head)
            if length < 0 or not self.in_flight:  # every server here answers with a length
                # (an answer with no request in flight is an error too)
                self.shared.pub_errors.value += sum(self.in_flight) or 1
                assert self.transport is not None
                self.transport.close()
                return
            if len(data) < end + 4 + length:
                break
            body = data[end + 4 : end + 4 + length]
            data = data[end + 4 + length :]
            publications = self.in_flight.popleft()
            if not head.startswith(b"HTTP/1.1 200"):
                self.shared.pub_errors.value += publications
            elif b'"error"' in body:
                self.shared.pub_errors.value += body.count(b'"error"')
            self.shared.acked.value += publications
            answered = True
        self.buf = data
        if answered and self.on_idle is not None:
            self.on_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # never used again


async def rooms_publish_loop(
    port: int,
    source: str,
    shared: Shared,
    clients: int,
    workers: int,
    window: int,
    tick: float,
    batch_size: int,
    connections: int,
) -> None:
    """Publish into rooms (90%) and user channels (10%) at the orchestrator's rate.

    ``source`` is ``batch`` (``POST /api/batch`` with ``batch_size``
    publications per request), ``publish`` (``POST /api/publish``, one each)
    or ``client`` (the members publish into their own room: this loop only
    tells each worker how many). Closed loop (rate 0): at most ``window``
    publications not yet received by their channels' members; open loop:
    ``shared.rate`` publications per second, never bursting more than
    ``window`` to catch up. Into void channels (``shared.void``) at rate 0,
    the API sources run closed on the answers: each connection keeps
    :data:`INTAKE_DEPTH` requests in flight, sending the next as soon as one is
    answered (the server's intake at saturation).
    """
    loop = asyncio.get_running_loop()
    path = b"/api/batch" if source == "batch" else b"/api/publish"
    per_request = batch_size if source == "batch" else 1
    rooms = shared.rooms.value
    room_size = clients // rooms
    # Deliveries one publication owes on average (the closed loop counts in them).
    fanout = room_size if source == "client" else ROOM_SHARE * room_size + (1 - ROOM_SHARE)
    rng = random.Random(19)
    seq = 0

    def request(void: bool, first: int) -> tuple[bytes, int]:
        """The body of one request of ``per_request`` publications numbered from
        ``first``, and the deliveries it owes."""
        ts = time.time_ns()
        commands = []
        expected = 0
        for _ in range(per_request):
            channel, in_room = draw_channel(rng, rooms, clients)
            expected += room_size if in_room else 1
            commands.append(void_channel(channel) if void else channel)
        return api_body(source, commands, ts, first), expected

    # The intake phase's bodies, built once and sent in turn: building each costs this
    # process about as much as the server spends taking it in, and a publisher that
    # keeps up only in bursts leaves the server idle between them (its figure then
    # counts the idle loop's wake-ups), the more so the faster the server.
    void_bodies: list[bytes] = []

    def post(conn: ApiConnection) -> None:
        """Send one request of ``per_request`` publications on an idle connection."""
        nonlocal seq
        if shared.void.value:
            if not void_bodies:
                starts = range(0, VOID_PUBLICATIONS, per_request)
                void_bodies.extend(request(True, first)[0] for first in starts)
            conn.post(path, void_bodies[seq // per_request % len(void_bodies)], per_request)
        else:
            body, expected = request(False, seq)
            conn.post(path, body, per_request)
            shared.expected.value += expected
        seq += per_request
        shared.published.value = seq

    def saturating() -> bool:
        return bool(shared.void.value) and shared.rate.value == 0 and not shared.pub_stop.value

    def fill(conn: ApiConnection) -> None:
        """Keep INTAKE_DEPTH requests in flight on ``conn`` (the intake phase)."""
        while saturating() and not conn.closed and len(conn.in_flight) < INTAKE_DEPTH:
            post(conn)

    api: list[ApiConnection] = []
    if source != "client":
        for _ in range(connections):
            conn = ApiConnection(shared, fill)
            await loop.create_connection(lambda c=conn: c, "127.0.0.1", port)
            api.append(conn)
    shared.pub_ready.value = 1
    owed = 0.0
    rate_now = -1.0
    rate_origin = 0.0
    rate_sent = 0
    turn = 0
    while not shared.pub_stop.value:
        await asyncio.sleep(tick)
        target = shared.rate.value
        if target < 0:  # paused: the orchestrator lets the clients catch up
            owed = 0.0
            continue
        if saturating():
            for conn in api:  # start (or restart) the closed loop on answers
                fill(conn)
            continue
        if target > 0:
            now = loop.time()
            if target != rate_now:
                rate_now, rate_origin, rate_sent = target, now, 0
            due = int((now - rate_origin) * target) - rate_sent
            rate_sent += due
            owed = min(owed + due, window)  # cannot keep up: do not burst to catch up
        else:
            rate_now = -1.0
            lag = shared.expected.value - (sum(shared.delivered) - shared.base.value)
            owed = max(0.0, window - lag / fanout)
        if source == "client":
            n = int(owed)
            if not n:
                continue
            owed -= n
            for w in range(workers):
                share = n // workers + (1 if (turn + w) % workers < n % workers else 0)
                shared.client_due[w] += share
            turn += 1
            seq += n
            shared.expected.value += 0 if shared.void.value else n * room_size
            shared.published.value = seq
            continue
        for conn in api:
            if owed < per_request:
                break
            if not conn.busy:
                post(conn)
                owed -= per_request
    for conn in api:
        if conn.transport is not None:
            conn.transport.abort()


def rooms_publisher_main(
    port: int,
    source: str,
    shared: Shared,
    clients: int,
    workers: int,
    window: int,
    tick: float,
    batch_size: int,
    connections: int,
    cpus: set[int] | None,
) -> None:
    child_process(cpus)
    uvloop.run(
        rooms_publish_loop(
            port, source, shared, clients, workers, window, tick, batch_size, connections
        )
    )


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
        #: Extra arguments of the server process (``hub.py --serve KIND ...``).
        self.serve_options: list[str] = []
        from eventcast.server.auth import mint_token

        self.token = mint_token(secret=SECRET, user="bench", ttl=None).encode()

    def start(self) -> None:
        args = self.args
        self.port = free_port()
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", self.kind]
        cmd += ["--port", str(self.port), "--data-dir", self.tmp, *self.serve_options]
        env = dict(os.environ)
        if self.transport != "websocket" and env.get("EVENTCAST_BENCH_SERVER_PROFILE"):
            env["EVENTCAST_BENCH_SERVER_PROFILE"] += f".{self.transport}"
        self.server = subprocess.Popen(cmd, start_new_session=True, env=env)
        if self.cpus:
            os.sched_setaffinity(self.server.pid, self.cpus[0])
        wait_for_port(self.port, self.server)
        self.before_clients()
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
        deadline = time.monotonic() + max(120, args.clients / 40)
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

    def before_clients(self) -> None:
        """Called once the server listens, before any client connects."""

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
        run0 = process_run_time(pid)
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
        run1 = process_run_time(pid)
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
            "publications": published,
            "deliveries": deliveries,
            "loadavg": loadavg(),
            "publications_per_s": published / elapsed,
            "deliveries_per_s": deliveries / elapsed,
            "server_cpu_s": cpu1 - cpu0,
            # The same to the nanosecond (schedstat), for the small figures.
            "server_run_s": run1 - run0,
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
            # eventcast's server stops gracefully (a traceback at its shutdown would
            # show here); a baseline's shutdown is not measured, and python-socketio
            # logs a traceback for every connection uvicorn cancels at shutdown.
            stop = signal.SIGTERM if self.kind.startswith("eventcast") else signal.SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, stop)
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


class RoomsRun(Run):
    """One server of the many-rooms workload, its members and one publisher at a time."""

    def __init__(
        self, kind: str, args: argparse.Namespace, cpus: tuple[set[int], set[int]] | None
    ) -> None:
        super().__init__(kind, args, cpus)
        self.client_kind = self.pub_kind = f"{kind}-rooms"
        self.serve_options = ["--workload", "rooms"]
        self.shared.rooms.value = max(1, args.clients // args.room_size)
        self.shared.user_channels.value = 0 if getattr(args, "no_user_channels", False) else 1

    def start_publisher(self, source: str, connections: int = 0) -> None:  # type: ignore[override]
        """Start publishing from ``source`` (``batch``, ``publish`` or ``client``)."""
        self.stop_publisher()
        args = self.args
        shared = self.shared
        shared.pub_stop.value = 0
        shared.pub_ready.value = 0
        shared.rate.value = 0.0
        shared.void.value = 0
        shared.published.value = 0
        shared.expected.value = 0
        shared.base.value = sum(shared.delivered)
        if not connections:
            connections = args.api_connections if source == "publish" else args.batch_connections
        self.publisher = self.ctx.Process(
            target=rooms_publisher_main,
            args=(
                self.port,
                source,
                shared,
                args.clients,
                self.workers,
                args.room_window,
                args.tick,
                args.batch_size,
                connections,
                self.cpus[1] if self.cpus else None,
            ),
            daemon=True,
        )
        self.publisher.start()
        deadline = time.monotonic() + 30
        while not shared.pub_ready.value:
            if time.monotonic() > deadline or not self.publisher.is_alive():
                raise RuntimeError("the publisher could not connect")
            time.sleep(0.05)

    def lag(self) -> int:
        """Deliveries owed and not yet received since the publisher started."""
        delivered = sum(self.shared.delivered) - self.shared.base.value
        return int(self.shared.expected.value - delivered)

    def spy(self) -> PySpy:
        """Sample the server with py-spy through the next phase (warm-up and window)."""
        assert self.server is not None
        sampler = PySpy(self.server.pid, self.args.warmup + self.args.seconds)
        sampler.start()
        return sampler

    def pause(self, timeout: float = 60.0) -> int:
        """Stop publishing and wait until the members received what they are owed."""
        self.shared.rate.value = -1.0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.lag() > 0:
            time.sleep(0.05)
        return self.lag()


def run_rooms_system(
    kind: str, args: argparse.Namespace, cpus: tuple[set[int], set[int]] | None, run_no: int
) -> list[dict[str, Any]]:
    """Measure one system of the many-rooms workload: every source at full, half and intake."""
    run = RoomsRun(kind, args, cpus)
    rows: list[dict[str, Any]] = []
    try:
        start = time.perf_counter()
        run.start()
        print(
            f"  run {run_no}, {kind}: {args.clients} clients in {run.shared.rooms.value} rooms "
            f"subscribed in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
        spy = getattr(args, "py_spy", False) and kind == "eventcast"

        def sampled(row: dict[str, Any], rate: float) -> None:
            """Sample the phase of ``row`` in a window of its own (py-spy pauses the
            server for each sample: the phases reported are never observed)."""
            if spy:
                sampler = run.spy()
                window = _per_unit(run.measure(row["load"], rate))
                row["py_spy"], row["py_spy_window"] = sampler.wait(), window

        for source in args.sources:
            run.start_publisher(source)
            phases = []
            full = run.measure("full", 0.0)
            sampled(full, 0.0)
            phases.append(full)
            phases.append(run.measure("half", max(1.0, full["publications_per_s"] / 2)))
            run.pause()
            run.shared.void.value = 1
            # The API sources at saturation (closed on the answers); client publishes
            # (no answers from every system) at the full-load rate.
            intake_rate = max(1.0, full["publications_per_s"]) if source == "client" else 0.0
            phases.append(run.measure("intake", intake_rate))
            sampled(phases[-1], intake_rate)
            run.pause()
            run.shared.void.value = 0
            missing = run.lag()
            run.stop_publisher()
            for row in phases:
                row.update(workload="rooms", source=source, run=run_no, missing_at_end=missing)
                rows.append(row)
            print(
                f"    {source}: full {full['publications_per_s']:.0f} pubs/s, "
                f"{full['cpu_us_per_delivery']:.2f} µs/delivery, intake "
                f"{phases[2]['server_run_s'] / max(phases[2]['publications'], 1) * 1e6:.2f}"
                " µs/publication",
                flush=True,
            )
        run.finish(rows)
    finally:
        run.close()
    return [_per_unit(row) for row in rows]


def _per_unit(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its server CPU per delivery and per publication, to the nanosecond,
    split into user and kernel time as /proc/<pid>/stat does."""
    cpu = row["server_run_s"]
    pubs = max(row["publications"], 1)
    deliveries = max(row["deliveries"], 1)
    share = row["server_system_share"]
    row["cpu_us_per_delivery"] = cpu / deliveries * 1e6
    row["cpu_us_per_publication"] = cpu / pubs * 1e6
    row["user_us_per_delivery"] = cpu * (1 - share) / deliveries * 1e6
    row["sys_us_per_delivery"] = cpu * share / deliveries * 1e6
    return row


def print_rooms_profiles(rows: list[dict[str, Any]]) -> None:
    """Where eventcast's server CPU goes (py-spy), per delivery at full load and per intake."""
    for r in rows:
        threads = r.get("py_spy")
        if not threads:
            continue
        entry = merge_threads(threads, "MainThread")
        window = r["py_spy_window"]  # the sampled window's own CPU
        if r["load"] == "intake":
            per, unit = window["cpu_us_per_publication"], "publication taken in"
        else:
            per, unit = window["cpu_us_per_delivery"], "delivery"
        print(
            f"\n## py-spy of the eventcast server, {r['clients']} clients, run {r['run']}, "
            f"{r['source']}, {r['load']} load (sampled in a window of its own, after the "
            f"one reported: {window['publications_per_s']:.0f} publications/s)"
        )
        print_samples(
            "server",
            entry,
            per,
            unit,
            top=int(os.environ.get("EVENTCAST_BENCH_SPY_TOP", "15")),
            inclusive_filter=("eventcast", "uvicorn", "starlette", "websockets", "asyncio"),
        )


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)  # NaN-free
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and a == a else float("nan")


def print_rooms_table(rows: list[dict[str, Any]]) -> None:
    """Every phase of every run, then the summary across runs beside the floor."""
    for clients in sorted({r["clients"] for r in rows}):
        group = [r for r in rows if r["clients"] == clients]
        print(f"\nMany rooms, {clients} clients (rooms of {group[0]['room_size']}):")
        print(
            f"{'run':>3} | {'system':<9} | {'source':<7} | {'load':<6} | {'pubs/s':>7} "
            f"| {'deliveries/s':>12} | {'µs/deliv':>8} | {'user':>6} | {'kernel':>6} "
            f"| {'µs/pub':>7} | {'server CPU':>10} | {'loadgen':>7} | {'other CPU':>9} "
            f"| {'load avg':>14} | {'p50 ms':>7} | {'p99 ms':>7}"
        )
        for r in group:
            intake = r["load"] == "intake"
            deliv = "-" if intake else f"{r['cpu_us_per_delivery']:.2f}"
            user = "-" if intake else f"{r['user_us_per_delivery']:.2f}"
            kern = "-" if intake else f"{r['sys_us_per_delivery']:.2f}"
            p50 = "-" if intake else f"{r['p50_ms']:.2f}"
            p99 = "-" if intake else f"{r['p99_ms']:.2f}"
            print(
                f"{r['run']:>3} | {r['system']:<9} | {r['source']:<7} | {r['load']:<6} | "
                f"{r['publications_per_s']:7.0f} | {rate(r['deliveries_per_s']):>12} | "
                f"{deliv:>8} | {user:>6} | {kern:>6} | {r['cpu_us_per_publication']:7.2f} | "
                f"{r['server_cpu_pct']:9.0f}% | {r['loadgen_cpu_pct']:6.0f}% | "
                f"{r['other_cpu_pct']:8.0f}% | {r['loadavg']:>14} | {p50:>7} | {p99:>7}"
            )
            print_problems(r)
        print_rooms_summary(group)
    sys.stdout.flush()


def print_rooms_summary(rows: list[dict[str, Any]]) -> None:
    """Median (min-max) across runs per system and source, with the ratios the goals use."""
    runs = sorted({r["run"] for r in rows})
    print(
        f"\nSummary across {len(runs)} run(s), median (min..max); 'x floor' = CPU per delivery "
        "over the floor's, 'x socketio' = python-socketio's over this system's:"
    )
    print(
        f"{'system':<9} | {'source':<7} | {'full µs/deliv':>20} | {'x floor':>7} "
        f"| {'x socketio':>10} | {'intake µs/pub':>20} | {'full deliveries/s':>22} "
        f"| {'half-load p99 ms':>20} | {'p99 x floor':>11}"
    )

    def pick(system: str, source: str, load: str, key: str) -> list[float]:
        return [
            r[key]
            for r in rows
            if r["system"] == system and r["source"] == source and r["load"] == load
        ]

    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        return f"{_median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"

    systems = list(dict.fromkeys(r["system"] for r in rows))
    sources = list(dict.fromkeys(r["source"] for r in rows))
    for source in sources:
        floor_cpu = _median(pick("floor", source, "full", "cpu_us_per_delivery"))
        floor_p99 = _median(pick("floor", source, "half", "p99_ms"))
        sio_cpu = _median(pick("socketio", source, "full", "cpu_us_per_delivery"))
        for system in systems:
            cpu = pick(system, source, "full", "cpu_us_per_delivery")
            if not cpu:
                continue
            p99 = pick(system, source, "half", "p99_ms")
            x_floor = _ratio(_median(cpu), floor_cpu)
            x_sio = _ratio(sio_cpu, _median(cpu))
            p99_x = _ratio(_median(p99), floor_p99)
            deliveries = [v / 1e3 for v in pick(system, source, "full", "deliveries_per_s")]
            print(
                f"{system:<9} | {source:<7} | {cell(cpu, '.2f'):>20} | {x_floor:6.2f}x "
                f"| {x_sio:9.1f}x | "
                f"{cell(pick(system, source, 'intake', 'cpu_us_per_publication'), '.2f'):>20} | "
                f"{cell(deliveries, '.0f') + 'k':>22} | {cell(p99, '.1f'):>20} | {p99_x:10.2f}x"
            )


def rooms_main(args: argparse.Namespace, cpus: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    """The many-rooms workload: every size, every run, each system side by side."""
    sizes = [int(n) for n in str(args.room_clients).split(",") if n.strip()]
    print(header("hub: many small rooms over WebSocket"))
    print(
        f"({', '.join(map(str, sizes))} clients in rooms of {args.room_size}, each also in its "
        f"own user channel; publications {ROOM_SHARE:.0%} to rooms, the rest to user channels "
        f"(client publishes: into the member's room); sources {', '.join(args.sources)} "
        f"(batch: {args.batch_size} per request over {args.batch_connections} connections; "
        f"publish: {args.api_connections} connections); {args.runs} run(s); window "
        f"{args.seconds:g}s after {args.warmup:g}s warm-up; full load: <= {args.room_window} "
        "publications in flight; "
        + (
            f"server on CPU {sorted(cpus[0])}, load generators on {sorted(cpus[1])})"
            if cpus
            else "no CPU pinning)"
        ),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for clients in sizes:
        for run_no in range(1, args.runs + 1):
            for kind in args.room_systems:
                sized = argparse.Namespace(**{**vars(args), "clients": clients})
                for row in run_rooms_system(kind, sized, cpus, run_no):
                    row["room_size"] = args.room_size
                    rows.append(row)
    print_rooms_table(rows)
    print_rooms_profiles(rows)
    return {"machine": machine(), "settings": {**vars(args)}, "results": rows}


def print_problems(r: dict[str, Any]) -> None:
    """A line under a row that had publish errors, lost clients or missing deliveries."""
    problems = []
    if r["publish_errors"]:
        problems.append(f"{r['publish_errors']} publish errors")
    if r["lost_clients"]:
        problems.append(f"{r['lost_clients']} clients lost")
    if r.get("missing_at_end", 0) > 0:
        problems.append(f"{r['missing_at_end']} deliveries missing at the end")
    if problems:
        print(f"{'':<13}   ({', '.join(problems)})")


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
        print_problems(r)
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
    rooms = parser.add_argument_group("the many-rooms workload (--workload rooms)")
    rooms.add_argument(
        "--workload",
        choices=("fanout", "rooms"),
        default="fanout",
        help="fanout: one channel, every client in it (default); rooms: many small rooms",
    )
    rooms.add_argument(
        "--room-clients",
        help="comma-separated client counts (default 4000,10000; quick: 400)",
    )
    rooms.add_argument("--room-size", type=int, default=10, help="members per room")
    rooms.add_argument(
        "--room-systems",
        default=",".join(ROOM_SYSTEMS),
        help=f"comma-separated subset of {ROOM_SYSTEMS}",
    )
    rooms.add_argument(
        "--sources",
        default=",".join(ROOM_SOURCES),
        help="comma-separated publication sources: batch (POST /api/batch), publish "
        "(POST /api/publish), client (members publish into their room)",
    )
    rooms.add_argument("--runs", type=int, help="repeat every system (default 3; quick: 1)")
    rooms.add_argument("--batch-size", type=int, default=50, help="publications per batch")
    rooms.add_argument("--batch-connections", type=int, default=4, help="API connections for batch")
    rooms.add_argument(
        "--api-connections", type=int, default=32, help="API connections for publish"
    )
    rooms.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the eventcast server with py-spy at full load and intake (in windows "
        "of their own, after the ones reported)",
    )
    rooms.add_argument(
        "--room-window",
        type=int,
        default=1000,
        help="full load: publications in flight at most",
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--serve", choices=all_systems, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:  # inside the server process
        install_probe_from_env()
        servers: dict[str, Callable[[], None]] = {
            "eventcast": lambda: serve_eventcast(args.port, args.data_dir, args.workload),
            "eventcast-protobuf": lambda: serve_eventcast(args.port, args.data_dir, args.workload),
            "socketio": lambda: serve_socketio(args.port),
            "websockets": lambda: serve_websockets(args.port),
            "floor": lambda: serve_floor(args.port),
            "sse-starlette": lambda: serve_sse_starlette(args.port),
        }
        if args.workload == "rooms":
            servers["socketio"] = lambda: serve_socketio_rooms(args.port)
            servers["floor"] = lambda: serve_floor_rooms(args.port)
            servers["websockets"] = lambda: serve_websockets_rooms(args.port)
        servers[args.serve]()
        return {}

    cores = sorted(os.sched_getaffinity(0))
    cpus = None
    if not args.no_pin and len(cores) >= 2:
        cpus = ({cores[0]}, set(cores[1:]))
    if args.workload == "rooms":
        if args.room_clients is None:
            args.room_clients = "400" if args.quick else "4000,10000"
        if args.runs is None:
            args.runs = 1 if args.quick else 3
        if args.seconds is None:
            args.seconds = 2.0 if args.quick else 4.0
        if args.warmup is None:
            args.warmup = 1.0 if args.quick else 1.5
        args.room_systems = [s.strip() for s in args.room_systems.split(",") if s.strip()]
        args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
        for s in args.room_systems:
            if s not in ROOM_SYSTEMS:
                parser.error(f"unknown system {s!r} for the rooms workload")
        for s in args.sources:
            if s not in ROOM_SOURCES:
                parser.error(f"unknown source {s!r}")
        out = rooms_main(args, cpus)
        save_json(args.json, out)
        return out

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
    save_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
