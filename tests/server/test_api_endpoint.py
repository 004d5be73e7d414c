"""``POST /api/<method>`` is taken ahead of the router, behind the same middleware.

Over real sockets to an in-process hub: what the router answers for the other
shapes of ``/api`` paths, and that the API's own answers and limits hold on the
direct path.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.routing import Route

from .conftest import StartHub
from .hubtools import API_KEY, WAIT, HubServer, record_paths
from .securitytools import exchange, status_of


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests Starlette's router handled."""
    return record_paths(monkeypatch, Route, "handle")


async def test_api_calls_skip_the_router_and_keep_their_answers(
    hub: HubServer, routed: list[str]
) -> None:
    async with httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as http:
        ok = await http.post(
            "/api/publish",
            json={"channel": "api.direct", "data": {"n": 1}},
            headers={"X-API-Key": API_KEY},
        )
        assert ok.status_code == 200
        assert ok.headers["content-type"] == "application/json"
        assert ok.json()["result"]["offset"] == 1
        unauthorized = await http.post("/api/publish", json={}, headers={"X-API-Key": "wrong"})
        assert unauthorized.status_code == 401
        assert unauthorized.json() == {"error": {"code": 101, "message": "unauthorized"}}
        unknown = await http.post("/api/nope", json={}, headers={"X-API-Key": API_KEY})
        assert unknown.status_code == 404
        bad = await http.post("/api/publish", content=b"{not json", headers={"X-API-Key": API_KEY})
        assert bad.status_code == 400
        too_big = await http.post(
            "/api/publish",
            content=b"x" * (hub.settings.max_body_size + 1),
            headers={"X-API-Key": API_KEY},
        )
        assert too_big.status_code == 413
    assert routed == []  # none of these went through the router


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/publish", 405),
        ("PUT", "/api/publish", 405),
        ("POST", "/api/", 404),
        ("POST", "/api/publish/more", 404),
    ],
)
async def test_other_api_paths_are_the_routers(
    hub: HubServer, routed: list[str], method: str, path: str, status: int
) -> None:
    async with httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as http:
        response = await http.request(method, path, headers={"X-API-Key": API_KEY})
    assert response.status_code == status
    if status == 405:
        assert response.headers["allow"] == "POST"
        assert routed == [path]


async def test_the_api_key_is_read_from_either_header_as_the_bytes_sent(
    start_hub: StartHub,
) -> None:
    key = "clé-" + API_KEY  # a key that is not ASCII: clients send it in UTF-8
    hub = await start_hub(api_key=key)
    sent = key.encode()
    cases = [
        (b"X-API-Key: %s\r\n" % sent, 200),
        (b"Authorization: apikey %s\r\n" % sent, 200),
        (b"Authorization: ApiKey  %s \r\n" % sent, 200),  # scheme in any case, spaces
        (b"Authorization: Bearer %s\r\n" % sent, 401),
        (b"X-API-Key: wrong\r\nAuthorization: apikey %s\r\n" % sent, 401),  # X-API-Key wins
        (b"X-API-Key: %s\r\nX-API-Key: wrong\r\n" % sent, 200),  # the first of each counts
        (b"X-API-Key: %s\r\n" % key.encode("latin-1", "replace"), 401),
        (b"", 401),
    ]
    body = b'{"channel":"api.key","data":1}'
    for headers, status in cases:
        request = b"POST /api/publish HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (
            headers,
            len(body),
            body,
        )
        response, _ = await asyncio.to_thread(exchange, hub, request)
        assert status_of(response) == status, headers
        if status == 401:
            answer = json.loads(response.partition(b"\r\n\r\n")[2])
            assert answer == {"error": {"code": 101, "message": "unauthorized"}}
