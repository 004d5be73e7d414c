"""The HTTP API answered by the hub's own HTTP protocol (``eventcast serve``'s), for real.

A call whose whole body arrives with its head, on a connection with nothing
else in flight, is answered by the protocol itself: at once for a publication
to a live channel, through a task for one that awaits (a durable channel, a
live channel's first publication). Everything else (a body in parts, a call
behind one still answering, a client that does not read its answers) goes
through uvicorn's cycle and the app as before. Each case is sent over a
socket, with the deliveries checked by a subscriber where they matter.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import socket
import threading
import time
from typing import Any

import pytest

from eventcast.server.api import ApiEndpoint, api_response, api_response_head
from eventcast.server.app import uvicorn_config

from . import conftest
from .conftest import StartHub
from .hubtools import API_KEY, WAIT, HubServer, RawClient, record_paths, tok


def call(method: str, body: Any, *headers: str, key: str = API_KEY) -> bytes:
    """A ``POST /api/<method>`` request (``body``: JSON-encoded unless bytes)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [
        f"POST /api/{method} HTTP/1.1",
        "Host: x",
        f"X-API-Key: {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def publish(channel: str, n: int) -> bytes:
    return call("publish", {"channel": channel, "data": {"n": n}})


async def connect(hub: HubServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = hub.base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def answers(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes, Any]]:
    """``count`` responses: status, head, decoded JSON body."""
    out = []
    async with asyncio.timeout(WAIT):
        for _ in range(count):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
            out.append((status, head, json.loads(await reader.readexactly(length))))
    return out


@pytest.fixture
def endpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calls that went through the ASGI endpoint (not answered by the protocol)."""
    return record_paths(monkeypatch, ApiEndpoint, "__call__")


async def subscribed(hub: HubServer, channel: str) -> RawClient:
    client = await RawClient.open(hub.ws_url)
    await client.connect(tok("sub"))
    await client.subscribe(channel)
    return client


async def numbers(client: RawClient, count: int) -> list[int]:
    """The ``n`` of the next ``count`` publications a client receives (then closed)."""
    out = []
    async with asyncio.timeout(WAIT):
        while len(out) < count:
            out.append((await client.publication())["pub"]["data"]["n"])
    await client.close()
    return out


async def test_pipelined_calls_are_answered_in_order_and_delivered_once(
    hub: HubServer, endpoint_calls: list[str]
) -> None:
    subscriber = await subscribed(hub, "live:pipe")
    reader, writer = await connect(hub)
    try:
        # A durable publication awaits its commit, in a task; everything behind
        # it queues in uvicorn's pipeline and is answered in order, /healthz
        # (the app's) among them.
        writer.write(
            b"".join(
                [
                    publish("pipe", 100),
                    publish("live:pipe", 0),
                    publish("live:pipe", 1),
                    publish("live:pipe", 2),
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                    publish("live:pipe", 3),
                    call(
                        "batch",
                        {
                            "commands": [
                                {"publish": {"channel": "live:pipe", "data": {"n": 4}}},
                                {"publish": {"channel": "pipe", "data": {"n": 101}}},
                                {"publish": {"channel": "live:pipe", "data": {"n": 5}}},
                            ]
                        },
                    ),
                ]
            )
        )
        got = await answers(reader, 7)
    finally:
        writer.close()
    assert [status for status, _, _ in got] == [200] * 7
    bodies = [body for _, _, body in got]
    assert bodies[0]["result"]["offset"] == 1
    assert bodies[1:4] == [{"result": {}}] * 3
    assert bodies[4] == {"status": "ok"}
    assert bodies[5] == {"result": {}}
    replies = bodies[6]["replies"]
    assert replies[0] == replies[2] == {"publish": {}}
    assert replies[1]["publish"]["offset"] == 2
    assert await numbers(subscriber, 6) == [0, 1, 2, 3, 4, 5]
    # The first call awaited: the calls queued behind it went through
    # uvicorn's pipeline and the app.
    assert endpoint_calls == ["/api/publish"] * 4 + ["/api/batch"]


async def test_calls_are_answered_by_the_protocol_when_nothing_is_in_flight(
    hub: HubServer, endpoint_calls: list[str]
) -> None:
    subscriber = await subscribed(hub, "live:own")
    reader, writer = await connect(hub)
    try:
        writer.write(publish("durable-own", 0))  # a durable channel: awaited
        await answers(reader, 1)
        # Answered at once, one after the other, within one read (the first
        # publication of the channel too).
        writer.write(b"".join(publish("live:own", n) for n in range(6)))
        got = await answers(reader, 6)
    finally:
        writer.close()
    assert [(status, body) for status, _, body in got] == [(200, {"result": {}})] * 6
    assert await numbers(subscriber, 6) == list(range(6))
    assert endpoint_calls == []


async def test_a_body_in_parts_goes_through_the_app(
    hub: HubServer, endpoint_calls: list[str]
) -> None:
    request = publish("live:parts", 1)
    reader, writer = await connect(hub)
    try:
        writer.write(request[:-5])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(request[-5:])
        got = await answers(reader, 1)
        writer.write(publish("live:parts", 2))  # whole, on an idle connection
        got += await answers(reader, 1)
    finally:
        writer.close()
    assert [(status, body) for status, _, body in got] == [(200, {"result": {}})] * 2
    assert endpoint_calls == ["/api/publish"]  # the first only


def head_lines(head: bytes) -> list[bytes]:
    """A response head's status line and headers, but for its date."""
    return [line for line in head.split(b"\r\n") if line and not line.startswith(b"date: ")]


async def test_the_protocol_and_the_app_write_the_same_heads(
    hub: HubServer, endpoint_calls: list[str]
) -> None:
    requests = [
        call("publish", {"channel": "live:same", "data": 1}),  # a method's plain target
        call("publish", {"channel": "live:same", "data": 1}, key="wrong"),  # 401
        call("nope", {}),  # an unknown method's target: 404
        call("publish", b"[1]"),  # 400
    ]
    by_protocol: list[tuple[int, bytes, Any]] = []
    by_app: list[tuple[int, bytes, Any]] = []
    reader, writer = await connect(hub)
    try:
        for request in requests:
            writer.write(request)  # whole: answered by the protocol
            by_protocol += await answers(reader, 1)
            writer.write(request[:-2])  # its body in parts: through the app
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(request[-2:])
            by_app += await answers(reader, 1)
    finally:
        writer.close()
    assert [status for status, _, _ in by_protocol] == [200, 401, 404, 400]
    for (status, head, body), (app_status, app_head, app_body) in zip(
        by_protocol, by_app, strict=True
    ):
        assert (status, body) == (app_status, app_body)
        assert head_lines(head) == head_lines(app_head)
    assert endpoint_calls == ["/api/publish", "/api/publish", "/api/nope", "/api/publish"]


def test_the_head_written_by_hand_is_the_asgi_headers() -> None:
    for answer in [
        (200, {"result": {}}, None),
        (400, {"error": {"code": 107, "message": "bad"}}, {}),
        (408, {"error": {"code": 107, "message": "slow"}}, {"connection": "close", "x-n": "1"}),
    ]:
        status, body, headers = api_response(answer)
        head_status, head_body, lines, own = api_response_head(answer)
        assert (head_status, head_body) == (status, body)
        written = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        assert lines + b"".join(b"%s: %s\r\n" % pair for pair in own) == written
        assert own == headers[2:]


async def test_refusals_answer_and_keep_the_connection(hub: HubServer) -> None:
    reader, writer = await connect(hub)
    try:
        writer.write(
            call("publish", {"channel": "live:r", "data": 1}, key="wrong")
            + call("nope", {})
            + call("publish", b'{"channel": ')
            + call("publish", b"[1]")
            + call("publish", {"channel": 7, "data": 1})
            + call("publish", {"channel": "live:r", "data": 1})
        )
        got = await answers(reader, 6)
    finally:
        writer.close()
    assert [(status, body.get("error", {}).get("code")) for status, _, body in got] == [
        (401, 101),
        (404, 104),
        (400, 107),
        (400, 107),
        (200, 107),  # as Centrifugo: a command error in a 200 answer
        (200, None),
    ]
    assert got[4][2]["error"]["message"] == "Expected `str`, got `int` - at `$.channel`"
    assert all(b"date: " in head and b"connection: close" not in head for _, head, _ in got)


@pytest.mark.parametrize("channel", ["live:close", "closing"])  # at once, and awaited
async def test_connection_close_is_honoured(hub: HubServer, channel: str) -> None:
    reader, writer = await connect(hub)
    try:
        writer.write(call("publish", {"channel": channel, "data": 1}, "Connection: close"))
        ((status, head, _),) = await answers(reader, 1)
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""  # closed by the server
    finally:
        writer.close()
    assert status == 200
    assert b"connection: close" in head


async def test_a_client_that_does_not_read_its_answers_is_not_read_either(
    hub: HubServer,
) -> None:
    # Answers given at once would pile up in the server's write buffer without a
    # bound. Once the client stops reading, the server stops answering at once,
    # then stops reading (uvicorn's pipeline), and every request sent is answered.
    request = publish("live:unread", 0)
    host, port = hub.base.removeprefix("http://").split(":")
    outbox = request * 200_000  # 34 MB: past every socket buffer on the way

    def flood() -> tuple[int, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning
            sock.settimeout(WAIT)
            sock.connect((host, int(port)))
            sock.setblocking(False)
            sent, blocked_since = 0, None
            while sent < len(outbox):
                try:
                    sent += sock.send(outbox[sent : sent + 65536])
                    blocked_since = None
                except BlockingIOError:
                    now = time.monotonic()
                    blocked_since = blocked_since or now
                    if now - blocked_since > 1.0:
                        break  # the server stopped reading
                    time.sleep(0.01)
            begun = -(-sent // len(request))
            sock.settimeout(WAIT)
            statuses: list[bytes] = []

            def read_answers() -> None:
                with sock.makefile("rb") as answers_in:
                    for _ in range(begun):
                        statuses.append(answers_in.readline())
                        length = 0
                        while (line := answers_in.readline()) not in (b"\r\n", b""):
                            if line.lower().startswith(b"content-length:"):
                                length = int(line.split(b":")[1])
                        answers_in.read(length)

            reading = threading.Thread(target=read_answers)
            reading.start()
            sock.sendall(outbox[sent : begun * len(request)])  # the last request begun
            reading.join(WAIT)
            assert statuses == [b"HTTP/1.1 200 OK\r\n"] * begun
            return sent, begun

    sent, answered = await asyncio.to_thread(flood)
    assert sent < len(outbox) // 2, "the server kept reading a client that does not read"
    assert answered == -(-sent // len(request))


async def test_an_oversized_head_after_an_awaited_call_gets_431(hub: HubServer) -> None:
    # The awaited call stood as the connection's request cycle; the refusal of
    # the next head reads that cycle (it has no response of uvicorn's to flush).
    reader, writer = await connect(hub)
    try:
        writer.write(publish("after-await", 1))  # durable: answered by a task
        ((status, _, body),) = await answers(reader, 1)
        assert (status, body["result"]["offset"]) == (200, 1)
        oversized = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n" % (
            b"a" * (2 * hub.settings.max_header_size)
        )
        writer.write(oversized)
        async with asyncio.timeout(WAIT):
            refusal = await reader.read()
    finally:
        writer.close()
    assert refusal.startswith(b"HTTP/1.1 431 ")


async def test_an_idle_connection_closes_after_the_keep_alive_timeout(
    start_hub: StartHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One timer checks the idle time of a connection answered by the protocol
    # (none is armed and cancelled per request): a connection in use stays
    # open past the timeout, an idle one closes at it.
    def short_keep_alive(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**uvicorn_config(*args, **kwargs), "timeout_keep_alive": 0.5}

    monkeypatch.setattr(conftest, "uvicorn_config", short_keep_alive)
    hub = await start_hub()
    reader, writer = await connect(hub)
    try:
        for n in range(8):  # 1.2 s of calls, 0.15 s apart
            writer.write(publish("live:idle", n))
            ((status, _, _),) = await answers(reader, 1)
            assert status == 200
            await asyncio.sleep(0.15)
        idle = time.monotonic()
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""  # closed by the server
        assert 0.3 < time.monotonic() - idle < 2.0
    finally:
        writer.close()


async def test_answers_carry_the_date_uvicorn_keeps_current(hub: HubServer) -> None:
    """The default headers are written from a copy made once per list uvicorn
    makes: its once-a-second update of ``date`` still shows, on one connection."""
    reader, writer = await connect(hub)
    dates = []
    try:
        for _ in range(2):
            writer.write(call("publish", {"channel": "live:date", "data": 1}))
            ((status, head, _),) = await answers(reader, 1)
            assert status == 200
            date = re.search(rb"\r\ndate: ([^\r]+)\r\n", head)
            assert date is not None, head
            dates.append(email.utils.parsedate_to_datetime(date[1].decode()))
            assert head.count(b"\r\ndate: ") == 1
            await asyncio.sleep(1.2)
    finally:
        writer.close()
    assert dates[1] > dates[0]
