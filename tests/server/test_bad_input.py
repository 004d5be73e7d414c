"""Bad input over real sockets: each gets the protocol's documented answer, and a well-behaved
client on the same server keeps receiving publications, unaffected."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest

from eventcast.server.auth import mint_token
from eventcast.server.connection import Connection

from .conftest import StartHub
from .hubtools import (
    API_KEY,
    AUDIENCE,
    MAX_BAD,
    MAX_MESSAGE,
    SECRET,
    WAIT,
    HubServer,
    RawClient,
    RawSocket,
    Witness,
    tok,
    token,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def open_client(hub: HubServer) -> RawClient:
    return await RawClient.open(hub.ws_url, max_size=None)


async def test_frame_over_max_message_size_closes_1009(strict: HubServer, witness: Witness) -> None:
    async with await open_client(strict) as client:
        await client.connect(tok())
        big = {"id": 2, "publish": {"channel": "news", "data": {"pad": "x" * MAX_MESSAGE}}}
        await client.send_raw(json.dumps(big))
        assert (await client.closed())[0] == 1009
    await witness()
    history = await strict.api("history", channel="news", limit=10)
    assert history["publications"] == []


async def test_invalid_json_closes_3501(strict: HubServer, witness: Witness) -> None:
    async with await open_client(strict) as client:
        await client.connect(tok())
        await client.send_raw('{"id": 2, "subscribe": {"channel": "news"')
        assert await client.closed() == (3501, "bad request")
    await witness()


async def test_unknown_command_gets_error_104(strict: HubServer, witness: Witness) -> None:
    async with await open_client(strict) as client:
        await client.connect(tok())
        await client.send_raw('{"id":1,"foo":{}}')
        reply = await client.reply(1)
        assert reply == {"id": 1, "error": {"code": 104, "message": "method not found"}}
        # The connection is still usable.
        assert "subscribe" in await client.request("subscribe", {"channel": "news"})
    await witness()


async def test_command_before_connect_closes_3501(strict: HubServer, witness: Witness) -> None:
    async with await open_client(strict) as client:
        await client.command("subscribe", {"channel": "news"})
        assert await client.closed() == (3501, "bad request")
    await witness()


def _expired() -> str:
    now = int(time.time())
    payload = {"sub": "alice", "iat": now - 120, "exp": now - 60, "aud": AUDIENCE}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def _wrongly_signed() -> str:
    payload = {"sub": "alice", "aud": AUDIENCE}
    return jwt.encode(payload, "another-secret-that-is-also-32-bytes-long!", algorithm="HS256")


def _alg_none() -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": "alice", "aud": AUDIENCE}).encode())
    return f"{header}.{payload}."


def _wrong_audience() -> str:
    return mint_token(secret=SECRET, user="alice", ttl=600, audience="someone-else")


def _no_audience() -> str:
    return mint_token(secret=SECRET, user="alice", ttl=600)


@pytest.mark.parametrize(
    "make_token",
    [_wrongly_signed, _alg_none, _wrong_audience, _no_audience, lambda: "", lambda: "garbage"],
    ids=["wrong-signature", "alg-none", "wrong-audience", "no-audience", "no-token", "garbage"],
)
async def test_connect_with_a_bad_token_closes_3500(
    strict: HubServer, witness: Witness, make_token: Callable[[], str]
) -> None:
    connect_token = make_token()
    async with await open_client(strict) as client:
        await client.command("connect", {"token": connect_token} if connect_token else {})
        assert await client.closed() == (3500, "invalid token")
    await witness()


async def test_connect_with_an_expired_token_gets_error_109(
    strict: HubServer, witness: Witness
) -> None:
    async with await open_client(strict) as client:
        reply = await client.request("connect", {"token": _expired()})
        assert reply == {"id": 1, "error": {"code": 109, "message": "token expired"}}
        # The client may try again with a fresh token on the same connection.
        assert "client" in await client.connect(tok())
    await witness()


@pytest.mark.parametrize(
    ("channel", "code"),
    [
        ("priv:secret", 103),  # needs a subscription token
        ("dm:chat#bob,carol", 103),  # a user-limited channel of other users
        ("a..b", 107),
        ("news.*", 103),  # a pattern where patterns are not allowed
        ("live:a.>.b", 107),  # '>' must be last
        ("nowhere:chan", 102),
    ],
)
async def test_subscribe_errors(
    strict: HubServer, witness: Witness, channel: str, code: int
) -> None:
    async with await open_client(strict) as client:
        await client.connect(tok())
        reply = await client.request("subscribe", {"channel": channel})
        assert reply["error"]["code"] == code, reply
        assert "subscribe" in await client.request("subscribe", {"channel": "news"})
    await witness()


async def test_permitted_special_channels(strict: HubServer, witness: Witness) -> None:
    async with await open_client(strict) as client:
        await client.connect(tok("alice"))
        sub_token = tok("alice", channel="priv:secret")
        assert "subscribe" in await client.request(
            "subscribe", {"channel": "priv:secret", "token": sub_token}
        )
        assert "subscribe" in await client.request("subscribe", {"channel": "dm:chat#alice,bob"})
        # A subscription token of another user or channel is refused.
        for channel, user in (("priv:other", "alice"), ("priv:secret2", "bob")):
            other = tok(user, channel=channel)
            reply = await client.request("subscribe", {"channel": "priv:secret2", "token": other})
            assert reply["error"]["code"] == 103
        await strict.publish("dm:chat#alice,bob", {"hi": "alice"})
        assert (await client.publication())["pub"]["data"] == {"hi": "alice"}
    await witness()


async def test_too_many_bad_commands_close_3509(strict: HubServer, witness: Witness) -> None:
    async with await open_client(strict) as client:
        await client.connect(tok())
        errors = []
        for _ in range(MAX_BAD - 1):
            errors.append(await client.request("subscribe", {"channel": "nowhere:x"}))
        assert [e["error"]["code"] for e in errors] == [102] * (MAX_BAD - 1)
        await client.command("history", {"channel": "live:x"})  # the last straw
        assert await client.closed() == (3509, "too many errors")
    await witness()


async def test_bad_client_publications_get_their_errors_without_a_task(
    strict: HubServer, witness: Witness, caplog: pytest.LogCaptureFixture
) -> None:
    # A publication that is not durable runs in the read's callback: a malformed
    # name (107), an unknown namespace (102) and a namespace that refuses client
    # publications (103) get the same errors as before, and they count toward 3509.
    async with await open_client(strict) as client:
        await client.connect(tok())
        bad = [
            {"id": 2, "publish": {"channel": "a b", "data": 1}},
            {"id": 3, "publish": {"channel": "nowhere:x", "data": 1}},
        ]
        await client.send_raw("\n".join(json.dumps(c) for c in bad))
        replies = [await client.reply(2), await client.reply(3)]
        assert [r["error"]["code"] for r in replies] == [107, 102]
        await client.command("publish", {"channel": "live:x", "data": 1})  # the last straw
        assert await client.closed() == (3509, "too many errors")
    assert not [r for r in caplog.records if r.exc_info]
    await witness()


# -- the HTTP API ------------------------------------------------------------------------------


async def test_http_api_rejects_bad_requests(strict: HubServer, witness: Witness) -> None:
    url = strict.api_url
    key = {"X-API-Key": API_KEY}
    bodies: list[str] = []
    async with httpx.AsyncClient(timeout=WAIT) as http:

        async def post(path: str, status: int, **kwargs: Any) -> dict[str, Any]:
            response = await http.post(f"{url}/{path}", **kwargs)
            bodies.append(response.text)
            assert response.status_code == status, response.text
            body: dict[str, Any] = response.json()
            return body

        big = b'{"channel": "news", "data": "' + b"x" * (1 << 20) + b'"}'
        await post("publish", 413, content=big, headers=key)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length
            for _ in range(17):
                yield b" " * 65536

        await post("publish", 413, content=chunks(), headers=key)
        await post("publish", 400, content=b'{"channel": "news",', headers=key)
        await post("publish", 400, content=b"[1, 2, 3]", headers=key)
        await post("publish", 400, content=b'"news"', headers=key)
        await post("publish", 400, content=b"\xff\xfe", headers=key)
        assert (await post("publish", 401, json={"channel": "news", "data": 1}))["error"][
            "code"
        ] == 101
        await post("publish", 401, json={"channel": "news", "data": 1}, headers={"X-API-Key": "no"})
        await post(
            "publish",
            401,
            json={"channel": "news", "data": 1},
            headers={"Authorization": "apikey wrong"},
        )
        assert (await post("nope", 404, json={}, headers=key))["error"]["code"] == 104
        # Errors of a known method are 200 with an error object, as in Centrifugo.
        reply = await post("publish", 200, json={"channel": "a..b", "data": 1}, headers=key)
        assert reply["error"]["code"] == 107
        reply = await post("publish", 200, json={"channel": "news"}, headers=key)
        assert reply["error"]["code"] == 107
        reply = await post("history", 200, json={"channel": "news", "limit": "x"}, headers=key)
        assert reply["error"]["code"] == 107
        # What was rejected was not published.
        history = await post("history", 200, json={"channel": "news", "limit": 10}, headers=key)
        assert history["result"]["publications"] == []
    for body in bodies:
        assert "Traceback" not in body
        assert 'File "' not in body
    await witness()


# -- slow consumers ----------------------------------------------------------------------------


async def test_slow_client_is_dropped_and_others_get_everything(start_hub: StartHub) -> None:
    hub = await start_hub(client_queue_bytes=256 * 1024)
    channel = "live:firehose"  # no history: no fsync per publication
    slow = await RawSocket.open(hub)
    # Connect and subscribe in one frame; read the replies, then never read again.
    slow.send(
        json.dumps({"id": 1, "connect": {"token": token("slow")}})
        + "\n"
        + json.dumps({"id": 2, "subscribe": {"channel": channel}})
    )
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < 2:
        opcode, payload = await asyncio.wait_for(slow.frame(), WAIT)
        assert opcode == 0x1
        for line in payload.split(b"\n"):
            message = json.loads(line)
            replies[message["id"]] = message
    assert "subscribe" in replies[2]
    slow_conn: Connection = hub.hub.connections[replies[1]["connect"]["client"]]

    normal = await RawClient.open(hub.ws_url, max_size=None)
    await normal.connect(token("normal"))
    await normal.subscribe(channel)
    normal_conn = hub.hub.connections[next(iter(hub.hub.users["normal"])).id]
    received: list[int] = []
    last = 0
    caught_up = asyncio.Event()

    async def read() -> None:
        while True:
            push = await normal.publication()
            pub = push["pub"]
            assert pub["data"]["pad"] == pad
            received.append(pub["data"]["i"])
            if received[-1] == last:
                caught_up.set()

    reader = asyncio.create_task(read())
    pad = "x" * 16_000
    try:
        async with httpx.AsyncClient(timeout=WAIT, headers={"X-API-Key": API_KEY}) as http:

            async def publish() -> None:
                nonlocal last
                last += 1
                response = await http.post(
                    f"{hub.api_url}/publish",
                    json={"channel": channel, "data": {"i": last, "pad": pad}},
                )
                assert response.json() == {"result": {}}

            # Publish until the hub gives up on the slow client (a cap as the safety net).
            while not slow_conn.closed and last < 4000:
                await publish()
            # And some more: the normal client is unaffected.
            for _ in range(20):
                await publish()
        await asyncio.wait_for(caught_up.wait(), WAIT)
    finally:
        reader.cancel()
    assert slow_conn.closed
    assert slow_conn.disconnect is not None
    assert slow_conn.disconnect.code == 3008
    assert hub.hub.disconnects == {3008: 1}
    assert not normal_conn.closed
    assert received == list(range(1, last + 1))
    # The slow client finds the close frame at the end of what it was sent (or just the end).
    assert await slow.close_code() in (3008, None)
    slow.close()
    await normal.close()


async def test_a_publication_over_the_queue_limit_drops_its_subscribers(
    start_hub: StartHub,
) -> None:
    hub = await start_hub(client_queue_bytes=64 * 1024)
    clients = []
    for user in ("u1", "u2"):
        client = await RawClient.open(hub.ws_url, max_size=None)
        await client.connect(token(user))
        await client.subscribe("huge")
        clients.append(client)
    bystander = await RawClient.open(hub.ws_url)
    await bystander.connect(token("bystander"))
    await bystander.subscribe("small")

    await hub.publish("huge", {"pad": "x" * 70_000})
    for client in clients:
        assert await client.closed() == (3008, "slow")
    # Each disconnect is counted once.
    assert hub.hub.disconnects == {3008: 2}
    await hub.publish("small", {"ok": True})
    assert (await bystander.publication())["pub"]["data"] == {"ok": True}
    await bystander.close()
