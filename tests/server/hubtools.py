"""Helpers of the hub's integration tests: settings, tokens, API calls, a raw protocol client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from eventcast.server.app import HubApp
from eventcast.server.auth import mint_token
from eventcast.server.config import Settings
from eventcast.server.hub import Hub

SECRET = "eventcast-integration-tests-hmac-secret-0123456789"
API_KEY = "eventcast-integration-tests-api-key"
#: The ``strict`` hub's (conftest): a token audience, a 4 KiB message limit, 3 bad commands.
AUDIENCE = "eventcast-tests"
MAX_MESSAGE = 4096
MAX_BAD = 3
#: The ``witness`` fixture: checks that a well-behaved subscriber still gets publications.
Witness = Callable[[], Awaitable[None]]
#: Safety net of every wait (never a synchronisation device).
WAIT = 10.0

#: The namespaces every test server has.
NAMESPACES: list[dict[str, Any]] = [
    {
        "name": "",
        "history_size": 100,
        "history_ttl": 300,
        "allow_subscribe_for_client": True,
        "allow_publish_for_client": True,
        "allow_history_for_client": True,
        "allow_recovery": True,
        "force_recovery": True,
    },
    # Pattern subscriptions, no history.
    {"name": "live", "allow_patterns": True, "allow_subscribe_for_client": True},
    # Subscription tokens required.
    {"name": "priv", "history_size": 10, "history_ttl": 300},
    # Centrifugo's user-limited channels: dm:chat#alice,bob
    {"name": "dm", "allow_user_limited_channels": True},
]


async def until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    """Wait for a condition of the hub's state, checked every few ms (fail past ``timeout``).

    For state no event announces (a buffer released, a backlog drained); never
    a substitute for awaiting what can be awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def free_port() -> int:
    """A TCP port that was free a moment ago (for the subprocess server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_settings(data_dir: Path) -> dict[str, Any]:
    return {
        "token_hmac_secret": SECRET,
        "api_key": API_KEY,
        "log_url": f"sqlite:///{data_dir}/events.db",
        "node_name": "test-node",
    }


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """The test server's settings, with ``overrides`` on top."""
    values = {**base_settings(data_dir), "namespaces": NAMESPACES, **overrides}
    return Settings.load(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, data_dir: Path, **overrides: Any) -> Path:
    """Write the test settings as a TOML file for ``eventcast serve --config``."""
    values = {**base_settings(data_dir), **overrides}
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    for namespace in NAMESPACES:
        lines += ["", "[[namespaces]]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in namespace.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tok(user: str = "alice", **claims: Any) -> str:
    """A connection token for the ``strict`` hub (its audience)."""
    return mint_token(secret=SECRET, user=user, ttl=600, audience=AUDIENCE, **claims)


def client_frame(
    payload: bytes,
    opcode: int = 0x1,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """A client's WebSocket frame, valid or not: ``length`` overrides the announced length."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 1 << 16:
        header = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass(frozen=True)
class ServerFrame:
    """One frame as the server sent it."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """A close frame's status code (None for an empty close frame)."""
        assert self.opcode == 0x8, self
        return int.from_bytes(self.payload[:2], "big") if len(self.payload) >= 2 else None


async def read_frame(reader: asyncio.StreamReader) -> ServerFrame:
    """Parse the next frame (a server's frames are unmasked; a masked one is unmasked here
    and reported as such)."""
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    masked = bool(second & 0x80)
    key = await reader.readexactly(4) if masked else b""
    payload = await reader.readexactly(n)
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return ServerFrame(
        fin=bool(first & 0x80),
        rsv=first & 0x70,
        opcode=first & 0x0F,
        masked=masked,
        payload=payload,
    )


def token(user: str = "alice", *, ttl: float | None = 600, **claims: Any) -> str:
    """A connection token (or, with ``channel=``, a subscription token)."""
    return mint_token(secret=SECRET, user=user, ttl=ttl, **claims)


@dataclass
class HubServer:
    """A running hub: its URLs, and (in-process) its app and :class:`Hub`."""

    base: str
    settings: Settings
    app: HubApp | None = None
    #: The server's process id, when it runs in a process of its own.
    pid: int | None = None

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://", 1) + "/connection/websocket"

    @property
    def api_url(self) -> str:
        return f"{self.base}/api"

    @property
    def hub(self) -> Hub:
        assert self.app is not None, "the Hub object is only reachable in-process"
        return self.app.hub

    async def call(self, method: str, params: Any = None, **headers: str) -> httpx.Response:
        """POST ``params`` (JSON) to ``/api/<method>`` with the API key; return the response."""
        async with httpx.AsyncClient(timeout=WAIT) as client:
            return await client.post(
                f"{self.api_url}/{method}",
                json=params if params is not None else {},
                headers={"X-API-Key": API_KEY, **headers},
            )

    async def api(self, method: str, **params: Any) -> dict[str, Any]:
        """Call the HTTP API; return the ``result`` (fail on an error answer)."""
        response = await self.call(method, params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert "error" not in body, body
        result: dict[str, Any] = body["result"]
        return result

    async def publish(self, channel: str, data: Any, **params: Any) -> dict[str, Any]:
        return await self.api("publish", channel=channel, data=data, **params)


@dataclass
class RawClient:
    """A Centrifuge JSON client written by hand on ``websockets``: it sees every frame."""

    ws: ClientConnection
    #: Messages received and not consumed yet (replies and pushes), in order.
    inbox: deque[dict[str, Any]] = field(default_factory=deque)
    frames: int = 0
    next_id: int = 0

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> RawClient:
        ws = await connect(url, open_timeout=WAIT, ping_interval=None, **kwargs)
        return cls(ws)

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def command(self, method: str, body: dict[str, Any] | None = None) -> int:
        """Send one command; return its id."""
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, method: body or {}}))
        return self.next_id

    async def _read_frame(self) -> None:
        data = await asyncio.wait_for(self.ws.recv(), WAIT)
        self.frames += 1
        text = data.decode() if isinstance(data, bytes) else data
        for line in text.split("\n"):
            if line.strip():
                self.inbox.append(json.loads(line))

    async def message(self) -> dict[str, Any]:
        """The next message (reply, push or ping)."""
        while not self.inbox:
            await self._read_frame()
        return self.inbox.popleft()

    async def reply(self, command_id: int) -> dict[str, Any]:
        """Wait for the reply to ``command_id``; other messages stay in the inbox."""
        while True:
            for message in self.inbox:
                if message.get("id") == command_id:
                    self.inbox.remove(message)
                    return message
            await self._read_frame()

    async def request(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.reply(await self.command(method, body))

    async def connect(self, connect_token: str | None = None, **body: Any) -> dict[str, Any]:
        """Send connect; return the reply's ``connect`` result (fail on an error)."""
        if connect_token is not None:
            body["token"] = connect_token
        reply = await self.request("connect", body)
        assert "connect" in reply, reply
        result: dict[str, Any] = reply["connect"]
        return result

    async def subscribe(self, channel: str, **body: Any) -> dict[str, Any]:
        reply = await self.request("subscribe", {"channel": channel, **body})
        assert "subscribe" in reply, reply
        result: dict[str, Any] = reply["subscribe"]
        return result

    async def publication(self) -> dict[str, Any]:
        """The next publication push (pings are skipped): ``{"channel", "pub"}``."""
        while True:
            message = await self.message()
            push = message.get("push")
            if push is not None and "pub" in push:
                result: dict[str, Any] = push
                return result

    async def closed(self) -> tuple[int | None, str]:
        """Read until the server closes; return the close code and reason it sent."""
        try:
            while True:
                await self._read_frame()
        except ConnectionClosed as exc:
            received = exc.rcvd
            if received is None:
                return None, ""
            return received.code, received.reason


class RawSocket:
    """A WebSocket client on a bare TCP socket: it sends any frame, even an invalid one.

    With ``small_buffer`` (the default) its receive buffer is tiny, so it can stop
    reading and be a slow consumer.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, hub: HubServer, *, small_buffer: bool = True) -> RawSocket:
        host, port = hub.base.removeprefix("http://").split(":")
        sock = socket.socket()
        if small_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        # The stream stops reading from the socket past 2 * limit buffered bytes.
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /connection/websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    def send(self, text: str) -> None:
        self.send_frame(text.encode())

    def send_frame(self, payload: bytes, opcode: int = 0x1) -> None:
        """Send one masked, final frame; its payload may be anything (even invalid UTF-8)."""
        self.writer.write(client_frame(payload, opcode))

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: ``(opcode, payload)``."""
        received = await read_frame(self.reader)
        return received.opcode, received.payload

    async def close_code(self) -> int | None:
        """Drain everything; the close code the server sent, or None if the socket just ended."""
        try:
            while True:
                opcode, payload = await asyncio.wait_for(self.frame(), WAIT)
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self.writer.close()


def record_paths(monkeypatch: Any, owner: type, name: str) -> list[str]:
    """Patch the ASGI method ``owner.name`` to record the path of each request it handles."""
    paths: list[str] = []
    original = getattr(owner, name)

    async def spy(self: Any, scope: Any, receive: Any, send: Any) -> None:
        paths.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(owner, name, spy)
    return paths
