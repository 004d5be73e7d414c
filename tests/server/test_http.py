"""``eventcast.server._http``: the request-body middleware driven directly, and client addresses.

(The same limits over real sockets, under ``eventcast serve`` and mounted under
plain uvicorn, are in ``test_security.py``.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from eventcast.server._http import (
    BodyError,
    RequestLimits,
    is_loopback,
    read_body,
    read_json,
    refuse_body,
)

Message = dict[str, Any]


async def _call(
    app: Any,
    messages: list[Message],
    headers: tuple[tuple[bytes, bytes], ...] = (),
    max_body: int = 10,
) -> list[Message]:
    """Run ``RequestLimits(app)`` on one HTTP request; return what it sent."""
    sent: list[Message] = []
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # a client that sends nothing more
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": list(headers)}
    await RequestLimits(app, max_body=max_body, timeout=0.2)(scope, receive, send)
    return sent


async def _reader(scope: Any, receive: Any, send: Any) -> None:
    """An endpoint that reads the whole body, then answers 200 with its size."""
    body = await read_body(Request(scope, receive))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"%d" % len(body)})


def _chunk(body: bytes, more: bool = True) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_within_the_limit_is_read() -> None:
    sent = await _call(_reader, [_chunk(b"12345"), _chunk(b"67890", more=False)])
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"10"


async def test_a_streamed_body_past_the_limit_gets_413_before_the_rest() -> None:
    sent = await _call(_reader, [_chunk(b"123456"), _chunk(b"789012")])  # never ends
    assert sent[0]["status"] == 413
    assert sent[1]["body"] == b'{"error":"request body too large"}'


async def test_a_declared_length_past_the_limit_gets_413_unread() -> None:
    sent = await _call(_reader, [], headers=((b"content-length", b"11"),))
    assert sent[0]["status"] == 413


async def test_a_slow_body_gets_408_and_closes() -> None:
    sent = await _call(_reader, [_chunk(b"1")])  # then nothing
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]


async def test_an_endpoint_lowers_the_limit_for_its_request() -> None:
    async def small(scope: Any, receive: Any, send: Any) -> None:
        try:
            await read_json(Request(scope, receive), limit=3)
        except BodyError as exc:
            await send({"type": "http.response.start", "status": exc.status, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    sent = await _call(small, [_chunk(b"[1,2]", more=False)])
    assert sent[0]["status"] == 413


async def test_the_wait_for_a_disconnect_after_the_body_is_not_timed() -> None:
    """A streaming response (SSE) keeps receiving after the body: no 408 for that."""

    async def streamer(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["more_body"] is False
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            async with asyncio.timeout(0.5):  # longer than the body timeout (0.2 s)
                await receive()
        except TimeoutError:
            await send({"type": "http.response.body", "body": b"still streaming"})

    sent = await _call(streamer, [_chunk(b"", more=False)])
    assert [m.get("status") or m.get("body") for m in sent] == [200, b"still streaming"]


async def test_a_refusal_after_the_response_started_ends_the_response() -> None:
    async def early(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await read_body(Request(scope, receive))

    sent = await _call(early, [_chunk(b"x" * 11)])
    assert sent == [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]


async def test_a_client_gone_mid_body_is_a_499_not_a_traceback() -> None:
    async def answering(scope: Any, receive: Any, send: Any) -> None:
        with pytest.raises(BodyError) as raised:
            await read_body(Request(scope, receive))
        await refuse_body(send, raised.value, [(b"x-cors", b"kept")])

    sent = await _call(answering, [_chunk(b"12"), {"type": "http.disconnect"}])
    assert sent[0]["status"] == 499
    assert (b"x-cors", b"kept") in sent[0]["headers"]
    assert sent[1]["body"] == b'{"error":"client disconnected"}'


async def test_bad_json_is_a_400() -> None:
    async def decoder(scope: Any, receive: Any, send: Any) -> None:
        with pytest.raises(BodyError) as raised:
            await read_json(Request(scope, receive))
        await send({"type": "http.response.start", "status": raised.value.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    for body in (b"{", b"\xff", b"[" * 70 + b"]" * 70):
        sent = await _call(decoder, [_chunk(body, more=False)], max_body=1000)
        assert sent[0]["status"] == 400, body


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("203.0.113.7", False),
        ("localhost", False),  # a name, not an address: the ASGI scope holds addresses
        ("testclient", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback
