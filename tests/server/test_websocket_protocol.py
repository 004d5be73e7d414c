"""RFC 6455 at ``/connection/websocket``, frame by frame over real sockets.

Whatever implements the WebSocket protocol under the hub (under ``eventcast
serve``, its own: :class:`~eventcast.server.websocket.HubWebSocket`), these pin
down what a client sees: fragmentation, pipelining,
control frames, the protocol errors and their close codes (1002, 1007, 1009),
the closing handshake, the opening handshake's answers, and the bounds on a
client that stops answering or never reads. After each hostile case a
well-behaved neighbour (the ``witness``) still receives publications.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from .conftest import StartHub
from .hubtools import (
    AUDIENCE,
    MAX_MESSAGE,
    WAIT,
    HubServer,
    RawClient,
    RawSocket,
    ServerFrame,
    Witness,
    client_frame,
    read_frame,
    tok,
    token,
    until,
)

OP_CONT = 0x0
OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
RSV1 = 0x40

#: RFC 6455, section 1.3: the GUID the Sec-WebSocket-Accept digest appends to the key.
ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: How long a server waits for the client's answer to its close frame before it closes
#: TCP itself (uvicorn's ``close_timeout``); the test allows a second of scheduling on top.
CLOSE_TIMEOUT = 10.0
#: The ping flood: at most this many pings of 125 bytes (26 MB) from a client that never
#: reads, until the server drops it. The kernel holds a few MB of pongs before the server's
#: own buffer sees any (about 33,000 pings pass with a 1 MiB bound on a Linux loopback), so
#: the cap leaves a wide margin.
FLOOD_PINGS = 200_000
FLOOD_DEADLINE = 15.0


# -- frames --------------------------------------------------------------------------------------


frame = client_frame


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


class WsSocket(RawSocket):
    """:class:`RawSocket` that writes prepared frames and reads the server's frames whole."""

    @classmethod
    async def start(cls, hub: HubServer, *, small_buffer: bool = False) -> WsSocket:
        sock = await cls.open(hub, small_buffer=small_buffer)
        assert isinstance(sock, WsSocket)
        return sock

    async def __aenter__(self) -> WsSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)

    def write(self, *frames: bytes) -> None:
        """Write frames, all in one TCP write."""
        self.writer.write(b"".join(frames))

    async def write_apart(self, *frames: bytes) -> None:
        """Write frames one at a time, letting each reach the server before the next."""
        for data in frames:
            self.writer.write(data)
            await self.writer.drain()
            await asyncio.sleep(0.02)

    async def next_frame(self, timeout: float = WAIT) -> ServerFrame:
        return await asyncio.wait_for(read_frame(self.reader), timeout)

    async def replies(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` replies (messages with an id), in the order they arrived."""
        replies: list[dict[str, Any]] = []
        while len(replies) < n:
            received = await self.next_frame()
            assert received.opcode == OP_TEXT, received
            assert received.fin, received
            assert not received.masked, received
            for line in received.payload.split(b"\n"):
                message = json.loads(line)
                if "id" in message:
                    replies.append(message)
        assert len(replies) == n, replies
        return replies

    async def reply(self) -> dict[str, Any]:
        return (await self.replies(1))[0]

    async def connect(self, user: str = "alice") -> str:
        """Send connect (id 1) in one frame; return the client id of its reply."""
        self.write(frame(json.dumps({"id": 1, "connect": {"token": tok(user)}}).encode()))
        reply = await self.reply()
        assert reply["id"] == 1, reply
        assert "connect" in reply, reply
        client: str = reply["connect"]["client"]
        return client

    async def close_frame(self, timeout: float = WAIT) -> ServerFrame:
        """Read until the server's close frame (failing on the end of the stream first)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    received = await read_frame(self.reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    raise AssertionError(
                        f"the stream ended without a close frame: {exc!r}"
                    ) from exc
                if received.opcode == OP_CLOSE:
                    assert received.fin, received
                    assert not received.masked, received
                    return received

    def answer_close(self, received: ServerFrame) -> None:
        """Answer the server's close frame as a client does, and end our side of TCP."""
        code = received.close_code
        self.write(frame(close_payload(code) if code is not None else b"", OP_CLOSE))
        with contextlib.suppress(OSError):
            self.writer.write_eof()

    async def closed_with(self, timeout: float = WAIT) -> int | None:
        """The code of the server's close frame (due within ``timeout``), once the frame is
        answered and the server has ended TCP."""
        received = await self.close_frame(timeout)
        self.answer_close(received)
        await self.eof()
        return received.close_code

    async def eof(self, timeout: float = WAIT) -> None:
        """Assert that the server closes TCP within ``timeout``, sending nothing more."""
        async with asyncio.timeout(timeout):
            try:
                rest = await self.reader.read()
            except ConnectionResetError:
                return
        assert rest == b"", f"bytes after the close frame: {rest[:64]!r}"


async def connected(hub: HubServer, *, small_buffer: bool = False) -> tuple[WsSocket, str]:
    sock = await WsSocket.start(hub, small_buffer=small_buffer)
    return sock, await sock.connect()


async def forgotten(hub: HubServer, client: str) -> None:
    """Wait until the hub no longer holds the connection ``client``."""
    await until(lambda: client not in hub.hub.connections, f"the hub to forget {client}")


def connect_command(command_id: int = 1) -> bytes:
    return json.dumps({"id": command_id, "connect": {"token": tok()}}).encode()


# -- 1. fragmentation ----------------------------------------------------------------------------


async def test_a_text_message_in_three_fragments_is_answered(
    strict: HubServer, witness: Witness
) -> None:
    command = connect_command()
    third = len(command) // 3
    parts = command[:third], command[third : 2 * third], command[2 * third :]
    async with await WsSocket.start(strict) as sock:
        await sock.write_apart(
            frame(parts[0], OP_TEXT, fin=False),
            frame(parts[1], OP_CONT, fin=False),
            frame(parts[2], OP_CONT, fin=True),
        )
        reply = await sock.reply()
        assert reply["id"] == 1, reply
        assert "client" in reply["connect"], reply
    await witness()


async def test_a_character_split_across_fragments_is_reassembled(
    strict: HubServer, witness: Witness
) -> None:
    text = "h€llo wörld"
    command = json.dumps(
        {"id": 2, "publish": {"channel": "news", "data": {"text": text}}}, ensure_ascii=False
    ).encode()
    cut = command.index("€".encode()) + 1  # inside the euro sign's three bytes
    async with (await connected(strict))[0] as sock:
        await sock.write_apart(
            frame(command[:cut], OP_TEXT, fin=False), frame(command[cut:], OP_CONT)
        )
        reply = await sock.reply()
        assert reply == {"id": 2, "publish": {}}
    history = await strict.api("history", channel="news", limit=10)
    assert [p["data"] for p in history["publications"]] == [{"text": text}]
    await witness()


# -- 2. pipelining -------------------------------------------------------------------------------


async def test_commands_pipelined_in_one_write_are_all_answered_in_order(
    strict: HubServer, witness: Witness
) -> None:
    frames = [frame(connect_command(1))]
    frames += [
        frame(json.dumps({"id": n, "subscribe": {"channel": f"pipe.{n}"}}).encode())
        for n in range(2, 52)
    ]
    async with await WsSocket.start(strict) as sock:
        sock.write(*frames)
        replies = await sock.replies(51)
    assert [r["id"] for r in replies] == list(range(1, 52))
    assert "connect" in replies[0], replies[0]
    assert all("subscribe" in r for r in replies[1:]), [r for r in replies if "error" in r]
    await witness()


# -- 3. control frames ---------------------------------------------------------------------------


async def test_a_ping_gets_an_unmasked_pong_with_its_payload(
    strict: HubServer, witness: Witness
) -> None:
    payloads = [b"", b"\x00\xffping" + os.urandom(16), os.urandom(125)]
    async with (await connected(strict))[0] as sock:
        for payload in payloads:
            sock.write(frame(payload, OP_PING))
            pong = await sock.next_frame()
            assert pong == ServerFrame(
                fin=True, rsv=0, opcode=OP_PONG, masked=False, payload=payload
            )
    await witness()


async def test_a_ping_between_fragments_is_answered_and_the_message_still_works(
    strict: HubServer, witness: Witness
) -> None:
    command = connect_command()
    half = len(command) // 2
    async with await WsSocket.start(strict) as sock:
        # In one write, then in separate writes with the pong read while the message is open.
        sock.write(
            frame(command[:half], OP_TEXT, fin=False),
            frame(b"between", OP_PING),
            frame(command[half:], OP_CONT),
        )
        pong = await sock.next_frame()
        assert (pong.opcode, pong.payload, pong.masked) == (OP_PONG, b"between", False)
        reply = await sock.reply()
        assert reply["id"] == 1, reply
        assert "connect" in reply, reply
        subscribe = json.dumps({"id": 2, "subscribe": {"channel": "news"}}).encode()
        cut = len(subscribe) // 2
        await sock.write_apart(frame(subscribe[:cut], OP_TEXT, fin=False), frame(b"open", OP_PING))
        pong = await sock.next_frame()
        assert (pong.opcode, pong.payload, pong.masked) == (OP_PONG, b"open", False)
        sock.write(frame(subscribe[cut:], OP_CONT))
        reply = await sock.reply()
        assert reply["id"] == 2, reply
        assert "subscribe" in reply, reply
    await witness()


# -- 4. protocol errors: 1002 --------------------------------------------------------------------

TEXT = b'{"id":2,"subscribe":{"channel":"news"}}'

PROTOCOL_ERRORS: dict[str, list[bytes]] = {
    "unmasked-frame": [frame(TEXT, masked=False)],
    "rsv1-set": [frame(TEXT, rsv=RSV1)],
    "reserved-opcode-3": [frame(b"x", 0x3)],
    "reserved-opcode-0xB": [frame(b"x", 0xB)],
    "ping-with-126-bytes": [frame(b"p" * 126, OP_PING)],
    "fragmented-ping": [frame(b"p", OP_PING, fin=False)],
    "continuation-without-a-message": [frame(TEXT, OP_CONT)],
    "text-inside-a-fragmented-message": [frame(TEXT[:10], fin=False), frame(TEXT[10:])],
    "64-bit-length-with-msb-set": [frame(b"abcde", length=(1 << 63) | 5)],
    "close-with-1-byte-payload": [frame(b"\x03", OP_CLOSE)],
    "close-code-1005": [frame(close_payload(1005), OP_CLOSE)],
    "close-code-999": [frame(close_payload(999), OP_CLOSE)],
    "close-code-5000": [frame(close_payload(5000), OP_CLOSE)],
}


def _protocol_error_params() -> list[Any]:
    return [pytest.param(frames, id=name) for name, frames in PROTOCOL_ERRORS.items()]


@pytest.mark.parametrize("frames", _protocol_error_params())
async def test_a_protocol_error_closes_1002(
    strict: HubServer, witness: Witness, frames: list[bytes]
) -> None:
    sock, client = await connected(strict)
    async with sock:
        sock.write(*frames)
        assert await sock.closed_with() == 1002
    await forgotten(strict, client)
    await witness()


# -- 5. sizes: 1009 ------------------------------------------------------------------------------


async def test_fragments_together_over_the_limit_close_1009(
    strict: HubServer, witness: Witness
) -> None:
    start = b'{"id":2,"publish":{"channel":"news","data":"'
    body = start + b"x" * (3 * 1500 - len(start) - 3) + b'"}}'
    parts = [body[:1500], body[1500:3000], body[3000:]]
    assert all(len(p) < MAX_MESSAGE for p in parts)
    assert len(body) > MAX_MESSAGE
    sock, client = await connected(strict)
    async with sock:
        await sock.write_apart(
            frame(parts[0], OP_TEXT, fin=False),
            frame(parts[1], OP_CONT, fin=False),
            frame(parts[2], OP_CONT),
        )
        assert await sock.closed_with() == 1009
    await forgotten(strict, client)
    assert (await strict.api("history", channel="news", limit=10))["publications"] == []
    await witness()


async def test_a_header_announcing_a_terabyte_closes_1009_without_the_payload(
    strict: HubServer, witness: Witness
) -> None:
    sock, client = await connected(strict)
    async with sock:
        # The header and the masking key only: the server must not wait for 2**40 bytes.
        sock.write(frame(b"", length=1 << 40))
        assert await sock.closed_with(timeout=2.0) == 1009
    await forgotten(strict, client)
    await witness()


# -- 6. UTF-8: 1007 ------------------------------------------------------------------------------


async def test_invalid_utf8_split_across_fragments_closes_1007(
    strict: HubServer, witness: Witness
) -> None:
    # E2 82 starts a three-byte sequence (valid so far); 28 cannot continue it.
    first = b'{"id":2,"publish":{"channel":"news","data":"\xe2\x82'
    second = b'\x28"}}'
    sock, client = await connected(strict)
    async with sock:
        await sock.write_apart(frame(first, OP_TEXT, fin=False), frame(second, OP_CONT))
        assert await sock.closed_with() == 1007
    await forgotten(strict, client)
    assert (await strict.api("history", channel="news", limit=10))["publications"] == []
    await witness()


async def test_a_close_reason_that_is_not_utf8_closes_1007(
    strict: HubServer, witness: Witness
) -> None:
    sock, client = await connected(strict)
    async with sock:
        sock.write(frame(close_payload(1000, b"bye \xff\xfe"), OP_CLOSE))
        assert await sock.closed_with() == 1007
    await forgotten(strict, client)
    await witness()


# -- 7. the closing handshake --------------------------------------------------------------------


async def test_a_client_close_is_answered_then_tcp_is_closed(
    strict: HubServer, witness: Witness
) -> None:
    sock, client = await connected(strict)
    async with sock:
        sock.write(frame(close_payload(1000, "bye, à bientôt".encode()), OP_CLOSE))
        assert (await sock.close_frame()).close_code == 1000
        await sock.eof()
    await forgotten(strict, client)
    await witness()


# -- 8. the opening handshake --------------------------------------------------------------------


@dataclass
class Answer:
    """The server's answer to an upgrade request: status, headers (lowercase names)."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def random_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


@contextlib.asynccontextmanager
async def upgrade(
    hub: HubServer, *, key: str | None, version: str = "13", **headers: str
) -> AsyncIterator[Answer]:
    """Send an upgrade request by hand; yield the answer's head (the socket stays open)."""
    host_port = hub.base.removeprefix("http://")
    host, port = host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [
        "GET /connection/websocket HTTP/1.1",
        f"Host: {host_port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Version: {version}",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parsed: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip()
                parsed[name] = f"{parsed[name]}, {value}" if name in parsed else value
        assert status_line.startswith("HTTP/1.1 "), status_line
        yield Answer(int(status_line.split()[1]), parsed, reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), WAIT)


async def test_an_upgrade_without_a_key_is_400(strict: HubServer, witness: Witness) -> None:
    async with upgrade(strict, key=None) as answer:
        assert answer.status == 400, answer.headers
    await witness()


@pytest.mark.parametrize(
    "key",
    [
        "not base64 at all!",
        base64.b64encode(os.urandom(15)).decode(),
        base64.b64encode(os.urandom(17)).decode(),
        base64.b64encode(os.urandom(16)).decode().rstrip("="),
    ],
    ids=["not-base64", "15-bytes", "17-bytes", "unpadded"],
)
async def test_an_upgrade_with_a_key_that_is_not_16_bytes_of_base64_is_400(
    strict: HubServer, witness: Witness, key: str
) -> None:
    async with upgrade(strict, key=key) as answer:
        assert answer.status == 400, answer.headers
    await witness()


async def test_an_upgrade_with_version_8_is_426_naming_version_13(
    strict: HubServer, witness: Witness
) -> None:
    async with upgrade(strict, key=random_key(), version="8") as answer:
        assert answer.status == 426, answer.headers
        assert answer.headers.get("sec-websocket-version") == "13", answer.headers
    await witness()


async def test_an_upgrade_is_accepted_with_the_key_digest(
    strict: HubServer, witness: Witness
) -> None:
    key = random_key()
    expected = base64.b64encode(hashlib.sha1((key + ACCEPT_GUID).encode()).digest()).decode()
    async with upgrade(strict, key=key) as answer:
        assert answer.status == 101, answer.headers
        assert answer.headers["sec-websocket-accept"] == expected
        assert answer.headers["upgrade"].lower() == "websocket"
        assert "upgrade" in answer.headers["connection"].lower()
        assert "sec-websocket-protocol" not in answer.headers
        # And the connection speaks the protocol.
        answer.writer.write(frame(connect_command()))
        received = await asyncio.wait_for(read_frame(answer.reader), WAIT)
        assert received.opcode == OP_TEXT, received
        assert not received.masked, received
        assert json.loads(received.payload)["id"] == 1
    await witness()


async def test_the_protobuf_subprotocol_is_echoed(strict: HubServer, witness: Witness) -> None:
    requested = {"Sec-WebSocket-Protocol": "centrifuge-protobuf"}
    async with upgrade(strict, key=random_key(), **requested) as answer:
        assert answer.status == 101, answer.headers
        assert answer.headers.get("sec-websocket-protocol") == "centrifuge-protobuf"
        answer.writer.write(frame(close_payload(1000), OP_CLOSE))
        received = await asyncio.wait_for(read_frame(answer.reader), WAIT)
        assert received.opcode == OP_CLOSE, received
        assert received.close_code == 1000, received
    await witness()


# -- 9. a client that never answers the close frame ----------------------------------------------


@pytest.mark.slow
async def test_an_unanswered_close_still_ends_tcp(strict: HubServer, witness: Witness) -> None:
    sock, client = await connected(strict)
    async with sock:
        sock.write(frame(b'{"id": 2, "subscribe": {"channel": "news"'))
        closing = await sock.close_frame()
        assert closing.close_code == 3501
        assert closing.payload[2:] == b"bad request"
        started = time.monotonic()
        # No close frame back: the server must still end the connection.
        await sock.eof(timeout=CLOSE_TIMEOUT + 1.0)
        assert time.monotonic() - started <= CLOSE_TIMEOUT + 1.0
    await forgotten(strict, client)
    await witness()


# -- 10. a ping flood from a client that never reads ---------------------------------------------


async def _dropped(sock: WsSocket, sent: int, deadline: float) -> bool:
    """Read what the server sent: whether it ended the connection (a close frame, EOF or a
    reset) rather than answering all ``sent`` pings, before ``deadline``."""
    pongs = 0
    try:
        async with asyncio.timeout_at(deadline):
            while pongs < sent:
                received = await read_frame(sock.reader)
                if received.opcode == OP_CLOSE:
                    return True
                if received.opcode == OP_PONG:
                    pongs += 1
    except (asyncio.IncompleteReadError, ConnectionError):
        return True
    except TimeoutError:
        return False
    return False  # every ping was answered: the server held every pong for the client


async def test_a_ping_flood_from_a_client_that_never_reads_is_dropped(
    strict: HubServer, witness: Witness
) -> None:
    loop = asyncio.get_running_loop()
    sock, client = await connected(strict, small_buffer=True)
    ping = frame(b"p" * 125, OP_PING)
    deadline = loop.time() + FLOOD_DEADLINE
    sent = 0
    async with sock:
        try:
            while sent < FLOOD_PINGS and not sock.writer.transport.is_closing():
                sock.writer.write(ping)
                sent += 1
                if sent % 250 == 0:
                    async with asyncio.timeout_at(deadline):
                        await sock.writer.drain()  # the server reading, or not
                if sent % 25_000 == 0:
                    await witness()  # the neighbour is served throughout
        except (ConnectionError, TimeoutError):
            pass  # writes failed (or stalled): the reading below says which
        await witness()
        assert await _dropped(sock, sent, deadline), (
            f"the server answered all {sent} pings of a client that never read "
            "and kept its connection"
        )
    await forgotten(strict, client)
    await witness()


# -- what the hub's own protocol adds: its bounds and the request it takes over ------------------


async def test_messages_wait_in_order_and_reading_pauses_past_the_read_ahead(
    start_hub: StartHub,
) -> None:
    """While one command runs, later messages wait; past READ_AHEAD the socket is not read."""
    from eventcast.server.hooks import AppHooks, RPCRequest, RPCResult
    from eventcast.server.websocket import READ_AHEAD, HubWebSocket

    gate = asyncio.Event()
    hooks = AppHooks(timeout=30)

    @hooks.on_rpc
    async def rpc(request: RPCRequest) -> RPCResult:
        if request.method == "wait":
            await gate.wait()
        return RPCResult(data={"method": request.method})

    hub = await start_hub(hooks=hooks)
    async with await RawClient.open(hub.ws_url, max_size=None) as client:
        connected = await client.connect(token("reader"))
        proto = hub.hub.connections[connected["client"]]._send.__self__  # type: ignore[attr-defined]
        assert isinstance(proto, HubWebSocket)
        first = await client.command("rpc", {"method": "wait"})
        pad = "x" * 60_000
        n = READ_AHEAD // len(pad) + 4
        ids = [
            await client.command("rpc", {"method": f"m{i}", "data": {"pad": pad}}) for i in range(n)
        ]
        await until(lambda: proto._paused, "the socket paused past the read-ahead")
        assert proto._inbox_bytes <= READ_AHEAD + 65_536
        gate.set()
        replies = [await client.message() for _ in range(n + 1)]
        assert [r["id"] for r in replies] == [first, *ids]
        assert [r["rpc"]["data"]["method"] for r in replies] == [
            "wait",
            *(f"m{i}" for i in range(n)),
        ]
        assert not proto._paused


async def test_a_forwarded_client_address_reaches_the_connection(hub: HubServer) -> None:
    """127.0.0.1 is a trusted proxy by default: its X-Forwarded-For names the client."""
    async with (
        await RawClient.open(
            hub.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.9"}
        ) as forwarded,
        await RawClient.open(hub.ws_url) as direct,
    ):
        a = await forwarded.connect(token("far"))
        b = await direct.connect(token("near"))
        assert hub.hub.connections[a["client"]].address == "203.0.113.9"
        assert hub.hub.connections[b["client"]].address == "127.0.0.1"
        headers = dict(hub.hub.connections[a["client"]].headers)
        assert headers[b"x-forwarded-for"] == b"203.0.113.9"


async def test_a_disallowed_origin_gets_403_with_a_json_reason(start_hub: StartHub) -> None:
    hub = await start_hub(allowed_origins=["https://only.example"])
    async with upgrade(hub, key=random_key(), Origin="https://evil.example") as answer:
        assert answer.status == 403, answer.headers
        body = await answer.reader.readexactly(int(answer.headers["content-length"]))
        assert json.loads(body) == {"error": "origin not allowed"}
        assert answer.headers["content-type"] == "application/json"
    assert hub.hub.refused["origin"] == 1
    async with await RawClient.open(hub.ws_url, origin="https://only.example") as client:
        await client.connect(token("allowed"))


async def test_a_client_gone_mid_command_is_forgotten_without_an_error(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    """The TCP drops while a command runs and more wait: no error, the connection is gone."""
    from eventcast.server.hooks import AppHooks, RPCRequest, RPCResult

    gate = asyncio.Event()
    started = asyncio.Event()
    hooks = AppHooks(timeout=30)

    @hooks.on_rpc
    async def rpc(request: RPCRequest) -> RPCResult:
        started.set()
        await gate.wait()
        return RPCResult(data={"method": request.method})

    hub = await start_hub(hooks=hooks, token_audience=AUDIENCE)
    sock = await WsSocket.start(hub)
    client = await sock.connect()
    for n in range(3):
        sock.send(json.dumps({"id": 10 + n, "rpc": {"method": f"m{n}"}}))
    await asyncio.wait_for(started.wait(), WAIT)
    sock.writer.transport.abort()  # gone, without a close frame
    await forgotten(hub, client)
    gate.set()
    async with await RawClient.open(hub.ws_url) as other:  # the hub still serves
        await other.connect(tok("next"))
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_each_handshake_is_logged_as_uvicorn_logs_it_with_tokens_masked(
    hub: HubServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = token("logged")
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    async with await RawClient.open(f"{hub.ws_url}?token={secret}") as client:
        await client.connect(secret)
    async with upgrade(hub, key=None) as answer:
        assert answer.status == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert any(
        '"WebSocket /connection/websocket?token=***" [accepted]' in line for line in lines
    ), lines
    assert any('"WebSocket /connection/websocket" 400' in line for line in lines), lines
    assert not [line for line in lines if secret in line]


async def test_a_bug_running_a_message_closes_with_3004_and_one_log_line(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Whether the message ran in the read's callback or in a task: the client
    # gets 3004 (it reconnects), the log one line without a traceback.
    from eventcast.server import driver

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(token("unlucky"))
        monkeypatch.setattr(driver, "_advance", broken)
        with caplog.at_level(logging.INFO, logger="eventcast.server"):
            await client.send_raw(json.dumps({"id": 9, "publish": {"channel": "a", "data": 1}}))
            code, _ = await client.closed()
    assert code == 3004
    lines = [r for r in caplog.records if "internal error running commands" in r.getMessage()]
    assert len(lines) == 1
    assert not lines[0].exc_info
    assert "a bug" not in caplog.text


async def test_a_message_task_cancelled_before_it_ran_leaves_nothing_behind() -> None:
    # What a message's task was to await is closed (a coroutine) or cancelled (a
    # gathered group of durable publishes) when the task ends without running,
    # as at shutdown, and so is what that coroutine was given to await in turn;
    # once awaited, all of it is done and untouched.
    import inspect
    from functools import partial

    from eventcast._tasks import release_unawaited

    async def rest() -> None:
        await asyncio.sleep(0)

    async def then(pending: Any, label: str = "") -> None:
        await pending

    async def run(pending: Any) -> None:
        await pending

    loop = asyncio.get_running_loop()
    coroutine = rest()
    group = asyncio.gather(asyncio.sleep(5))
    inner = rest()
    nested_group = asyncio.gather(asyncio.sleep(5))
    pendings: tuple[Any, ...] = (coroutine, group, then(then(inner)), then(nested_group))
    for pending in pendings:
        task = loop.create_task(run(pending))
        task.add_done_callback(partial(release_unawaited, pending))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for closed in (coroutine, inner):
        assert inspect.getcoroutinestate(closed) == inspect.CORO_CLOSED
    for cancelled in (group, nested_group):
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    finished = rest()
    task = loop.create_task(run(finished))
    task.add_done_callback(partial(release_unawaited, finished))
    await task
    assert inspect.getcoroutinestate(finished) == inspect.CORO_CLOSED


async def test_a_message_cancelled_before_it_ran_leaves_no_warning_and_no_error(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    """The real chains a message's task awaits: the rest of a frame holding a
    durable publish, a gathered group of them, and a live publication that
    must wait for an ``Overflow.BLOCK`` subscriber (the command's coroutine
    holding the hub's publication of the data it checked)."""
    import gc
    import warnings
    from functools import partial

    from eventcast import Overflow
    from eventcast._tasks import release_unawaited
    from eventcast.server.driver import run_frame_now

    from .hubtools import NAMESPACES

    server = await start_hub(
        namespaces=[*NAMESPACES, {"name": "open", "allow_publish_for_client": True}]
    )
    hub = server.hub
    blocker = hub.bus.subscribe("open:>", overflow=Overflow.BLOCK)

    def publish(command_id: int, channel: str) -> str:
        return json.dumps({"id": command_id, "publish": {"channel": channel, "data": {}}})

    frames = [
        publish(100, "cancelled.one"),
        # (A gathered group's publications are tasks from the start: they may commit.)
        publish(101, "cancelled.group") + "\n" + publish(102, "cancelled.group"),
        publish(103, "open:blocked"),
    ]

    async def run(pending: Any) -> None:
        await pending

    loop = asyncio.get_running_loop()
    async with await RawClient.open(server.ws_url) as client:
        await client.connect(token("canceller"))
        (conn,) = hub.connections.values()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for frame in frames:
                pending = run_frame_now(hub, conn, frame, hub.settings.max_message_size)
                assert pending is not None
                task = loop.create_task(run(pending))
                task.add_done_callback(partial(release_unawaited, pending))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                del pending, task
            for _ in range(5):
                await asyncio.sleep(0.01)
            gc.collect()
        assert [str(w.message) for w in caught] == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        history = await server.api("history", channel="cancelled.one", limit=10)
        assert history.get("publications", []) == []
        assert blocker.buffered == 0
        # The connection is unharmed: its next publications go through, once each
        # (the awaited way while the BLOCK subscriber is there).
        reply = await client.request("publish", {"channel": "open:blocked", "data": {"n": 0}})
        assert reply.get("publish") == {}, reply
        assert blocker.buffered == 1
        blocker.close()
        for channel in ("cancelled.one", "open:blocked"):
            reply = await client.request("publish", {"channel": channel, "data": {"n": 1}})
            assert reply.get("publish") == {}, reply
