"""The hub's HTTP surface against a hostile client (issue 11), over real sockets.

Each defect's input is sent for real to a running hub while a :class:`Neighbour`
keeps receiving publications (none lost, none delayed by more than 100 ms). Most
inputs go to one ``eventcast serve`` process (``served``): the real server with
its real logging; the last test of this module reads that process's whole log
and fails on a traceback, a token, the API key, the admin token, a cookie value
or a message body. Inputs that need other settings or the hub's internals go to
in-process hubs, whose log records every test checks the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from eventcast.exceptions import LogError
from eventcast.server._uvicorn import BODY_GRACE, LINGER
from eventcast.server.config import Settings
from eventcast.server.dashboard import LOGIN_BURST, Sessions

from .conftest import StartHub
from .hubtools import (
    API_KEY,
    SECRET,
    WAIT,
    HubServer,
    RawClient,
    RawSocket,
    free_port,
    token,
    write_config,
)
from .securitytools import (
    Neighbour,
    address,
    exchange,
    log_capture,
    problems_in,
    read_until_closed,
    status_of,
)
from .ssetools import HubProcess

ADMIN = "security-tests-admin-token-0123456789"
#: The served hub's timeouts, short so that the slow-client tests are quick.
HANDSHAKE_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
#: Every secret the tests send; none may appear in any log.
SECRETS: set[str] = {API_KEY, SECRET, ADMIN}
#: The served hub's log must show what the tests sent it (the check is not vacuous).
SENT_TO_SERVED: list[str] = []


def secret_token(user: str = "alice", **claims: Any) -> str:
    """A connection token, remembered as a secret the logs must not show."""
    value = token(user, **claims)
    SECRETS.add(value)
    return value


def body_marker() -> str:
    """A message body, remembered as one the logs must not show."""
    marker = f"body-{uuid.uuid4().hex}"
    SECRETS.add(marker)
    return marker


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubServer, HubProcess]]:
    """``eventcast serve`` with an admin token and short timeouts (one per module)."""
    directory = tmp_path_factory.mktemp("served")
    config = write_config(
        directory / "eventcast.toml",
        directory,
        admin_token=ADMIN,
        handshake_timeout=HANDSHAKE_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
    )
    process = HubProcess(config, free_port())
    process.start()
    assert process.process is not None
    try:
        server = HubServer(
            base=process.base, settings=Settings.load(config), pid=process.process.pid
        )
        yield server, process
    finally:
        process.stop()


@pytest.fixture
def hub(served: tuple[HubServer, HubProcess]) -> HubServer:
    return served[0]


@pytest.fixture(autouse=True)
def clean_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """After each test: no traceback, error or secret in what in-process hubs logged."""
    log_capture(caplog)
    yield
    assert problems_in(caplog.records, SECRETS) == []


@pytest.fixture
def start(start_hub: StartHub, caplog: pytest.LogCaptureFixture) -> StartHub:
    """``start_hub``, with every level of its log captured (uvicorn resets the levels)."""

    async def started(**overrides: Any) -> HubServer:
        server = await start_hub(**overrides)
        log_capture(caplog)
        return server

    return started


def login_from(n: int) -> str:
    """An ``X-Forwarded-For`` header line: each test logs in from an address of its own."""
    return f"X-Forwarded-For: 198.51.100.{n}"


def head(method: str, path: str, *headers: str, host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def vm_hwm(process: HubProcess) -> int:
    """The peak resident memory of the served hub, in bytes."""
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


# -- 1. request bodies: one limit on every endpoint, enforced while streaming ----------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_200_mb_login_body_is_refused_unread(
    served: tuple[HubServer, HubProcess], framing: str
) -> None:
    hub, process = served
    chunk = b"x" * 65_536
    count = 200 * 16  # 200 MiB
    json_type = "Content-Type: application/json"
    if framing == "content-length":
        length = f"Content-Length: {len(chunk) * count}"
        start = head("POST", "/dashboard/api/login", json_type, length, login_from(1))
        parts = [start, *([chunk] * count)]
    else:
        chunked = "Transfer-Encoding: chunked"
        start = head("POST", "/dashboard/api/login", json_type, chunked, login_from(2))
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        parts = [start, *([frame] * count), b"0\r\n\r\n"]
    before = vm_hwm(process)
    async with Neighbour(hub):
        response, _ = await asyncio.to_thread(exchange, hub, parts)
    assert status_of(response) == 413
    assert response.endswith(b'{"error":"request body too large"}')
    grown = vm_hwm(process) - before
    assert grown < 32 << 20, f"the hub's peak memory grew by {grown >> 20} MiB"


async def test_every_endpoint_has_its_body_limit(hub: HubServer) -> None:
    bearer = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    api = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    megabyte = 1 << 20
    cases = [
        ("/api/publish", api, megabyte + 1),
        ("/dashboard/api/publish", bearer, megabyte + 1),
        ("/dashboard/api/dead-letters/redrive", bearer, 65_537),
        (
            "/dashboard/api/login",
            {"Content-Type": "application/json", "X-Forwarded-For": "198.51.100.3"},
            4097,
        ),
    ]
    async with Neighbour(hub), httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client:
        for path, headers, size in cases:
            response = await client.post(path, content=b" " * size, headers=headers)
            assert response.status_code == 413, (path, response.text)
            just_under = await client.post(path, content=b" " * (size - 1), headers=headers)
            assert just_under.status_code != 413, path
        # Without credentials nothing is read: 401 at once.
        refused = await client.post(
            "/dashboard/api/publish", content=b" " * (2 * megabyte), headers=api
        )
        assert refused.status_code == 401


async def trickle_until_closed(hub: HubServer, request_head: bytes) -> tuple[bytes, float]:
    """Send a request head, then its body a byte per 0.1 s until the server closes.

    Returns what the server sent and the seconds from the head to the close.
    """
    host, port = address(hub)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request_head)
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.1)  # the slow client's pace

        trickling = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(WAIT):
                answer = await reader.read()  # until the server closes
        finally:
            trickling.cancel()
        return answer, time.monotonic() - started
    finally:
        writer.close()


@pytest.mark.parametrize("path", ["/api/publish", "/dashboard/api/login"])
async def test_a_slow_body_gets_408_and_the_connection_closes(hub: HubServer, path: str) -> None:
    request_head = head(
        "POST",
        path,
        f"X-API-Key: {API_KEY}",
        "Content-Type: application/json",
        "Content-Length: 1000",
        login_from(4),
    )
    async with Neighbour(hub):
        answer, elapsed = await trickle_until_closed(hub, request_head)
    assert status_of(answer) == 408
    assert b"connection: close" in answer.lower()
    assert BODY_TIMEOUT - 0.2 < elapsed < BODY_TIMEOUT + 1.0


async def test_a_body_nobody_reads_cannot_hold_the_connection(hub: HubServer) -> None:
    """The route answers without reading (405), the client keeps sending the body slowly."""
    async with Neighbour(hub):
        answer, elapsed = await trickle_until_closed(
            hub, head("POST", "/healthz", "Content-Length: 100000")
        )
    assert status_of(answer) == 405
    assert elapsed < BODY_TIMEOUT + BODY_GRACE + 1.0


async def test_the_body_limits_hold_when_the_hub_is_mounted_in_another_app(
    tmp_path: Path,
) -> None:
    """Plain uvicorn (not eventcast's protocol) serves a host app with the hub mounted."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from eventcast.asgi import create_app, hub_lifespan

    from .hubtools import make_settings
    from .test_embedding import run

    realtime = create_app(make_settings(tmp_path, body_timeout=1.0, max_body_size=65_536))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with hub_lifespan(realtime):
            yield

    running = await run(Starlette(routes=[Mount("/realtime", realtime)], lifespan=lifespan))
    hub = HubServer(base=f"{running.base}/realtime", settings=realtime.hub.settings)
    host, port = running.base.removeprefix("http://").rsplit(":", 1)
    try:
        async with Neighbour(hub):

            async def endless() -> AsyncIterator[bytes]:  # chunked: no declared length
                for _ in range(1000):
                    yield b" " * 65_536

            async with httpx.AsyncClient(timeout=WAIT) as client:
                big = await client.post(
                    f"{hub.api_url}/publish", content=endless(), headers={"X-API-Key": API_KEY}
                )
            assert big.status_code == 413
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                head(
                    "POST", "/realtime/api/publish", f"X-API-Key: {API_KEY}", "Content-Length: 100"
                )
            )
            writer.write(b"{")  # and nothing more
            async with asyncio.timeout(WAIT):
                slow = await reader.read()
            writer.close()
            assert status_of(slow) == 408
    finally:
        await running.stop()


# -- 2. request heads: capped, answered 431, closed ------------------------------------------------


async def test_a_64_mb_header_gets_431_without_stalling_anyone(hub: HubServer) -> None:
    big = b"a" * (64 << 20)  # built before the neighbour starts measuring
    request = [head("GET", "/healthz")[:-2] + b"X-Big: ", big, b"\r\n\r\n"]
    async with Neighbour(hub):
        response, elapsed = await asyncio.to_thread(exchange, hub, request)
    assert status_of(response) == 431
    assert b"connection: close" in response.lower()
    assert elapsed < LINGER + 2.0


@pytest.mark.parametrize(
    "request_head",
    [
        head("GET", "/healthz?" + "q" * 20_000),  # the request line
        head("GET", "/healthz", *(f"X-Header-{i}: {'v' * 40}" for i in range(400))),  # many
        head("GET", "/connection/websocket", "Upgrade: websocket", f"X-Pad: {'p' * 17_000}"),
    ],
    ids=["request-line", "many-headers", "websocket-upgrade"],
)
async def test_request_heads_over_16_kib_get_431(hub: HubServer, request_head: bytes) -> None:
    async with Neighbour(hub):
        response, _ = await asyncio.to_thread(exchange, hub, request_head)
        fits, _ = await asyncio.to_thread(
            exchange, hub, head("GET", "/healthz", f"X-Pad: {'p' * 15_000}", "Connection: close")
        )
    assert status_of(response) == 431
    assert status_of(fits) == 200


async def test_the_next_request_of_a_keep_alive_connection_has_the_same_head_cap(
    hub: HubServer,
) -> None:
    """Its whole oversized head in one read, after an answered request: 431.

    (Before, the cap held only for a head that began within a read still in its
    head: between requests, one read holding a whole 40 KB head went through.)
    """
    oversized = head("GET", "/healthz", f"X-Pad: {'p' * 40_000}")

    def statuses() -> list[int]:
        with socket.create_connection(address(hub), timeout=WAIT) as sock:
            sock.sendall(head("GET", "/healthz"))
            first = sock.recv(65536)
            sock.sendall(oversized)
            rest = read_until_closed(sock)
        return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", first + rest)]

    async with Neighbour(hub):
        found = await asyncio.to_thread(statuses)
    assert found == [200, 431]


async def test_pipelined_requests_are_counted_each_on_its_own(hub: HubServer) -> None:
    """Requests behind one another: each head is held to the limit, not their sum.

    (A head that begins inside a read, behind another request, is counted from
    the next read on: it may exceed the limit by what that one read held.)
    """
    body = b"x" * 15_000
    post = head("POST", "/healthz", f"Content-Length: {len(body)}") + body
    small_second = head("GET", "/healthz", f"X-Pad: {'p' * 2_000}", "Connection: close")
    huge_second = head("GET", "/healthz", f"X-Pad: {'p' * 40_000}", "Connection: close")

    def statuses(*writes: bytes) -> list[int]:
        with socket.create_connection(address(hub), timeout=WAIT) as sock:
            for i, data in enumerate(writes):
                sock.sendall(data)
                if i == 0 and len(writes) > 1:
                    first = sock.recv(65536)  # the first answer: the next write is a new read
                    assert first.startswith(b"HTTP/1.1 200 "), first
            rest = read_until_closed(sock)
        found = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", rest)]
        return [200, *found] if len(writes) > 1 else found

    async with Neighbour(hub):
        fine = await asyncio.to_thread(statuses, post + small_second)
        refused = await asyncio.to_thread(
            statuses, head("GET", "/healthz") + huge_second[:100], huge_second[100:]
        )
    assert fine == [405, 200]  # (405: POST on /healthz; its body read and discarded)
    assert refused == [200, 431]


# -- 3. every request's head within handshake_timeout, keep-alive or not ---------------------------


async def test_every_request_of_a_keep_alive_connection_sends_its_head_in_time(
    hub: HubServer,
) -> None:
    host, port = address(hub)

    async def slowloris() -> float:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(head("GET", "/healthz"))
            first = await reader.readuntil(b'{"status":"ok"}')
            assert first.startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            second = head("GET", "/healthz", *(f"X-Slow-{i}: {i}" for i in range(50)))
            # One byte per 0.2 s for 3 s at most; the server must close well before.
            # (A byte of ours that reached the server after its last read turns its
            # close into a reset: closed too.)
            with contextlib.suppress(ConnectionError):
                for byte in second[:15]:
                    writer.write(bytes((byte,)))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await reader.read()  # returns at once when the server closes
                    if reader.at_eof():
                        break
            reset = isinstance(reader.exception(), ConnectionResetError)
            assert reader.at_eof() or reset, "the connection is still open"
            return time.monotonic() - started
        finally:
            writer.close()

    async with Neighbour(hub):
        durations = await asyncio.gather(*(slowloris() for _ in range(20)))
    assert max(durations) < HANDSHAKE_TIMEOUT + 1.0, durations


# -- 4. the dashboard ------------------------------------------------------------------------------


def _dashboard_requests() -> list[tuple[str, str]]:
    return [
        ("GET", "/"),
        ("GET", "/dashboard/static/app.js"),
        ("GET", "/dashboard/api/stats"),
        ("GET", "/dashboard/api/session"),
        ("GET", "/dashboard/api/stream?tail=dm:>"),
        ("GET", "/dashboard/api/dead-letters"),
        ("POST", "/dashboard/api/publish"),
        ("POST", "/dashboard/api/dead-letters/redrive"),
        ("POST", "/dashboard/api/login"),
    ]


async def test_without_admin_token_the_dashboard_answers_loopback_clients_only(
    start: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start()
    assert "dashboard answers loopback clients only" in caplog.text
    json_type = {"content-type": "application/json"}
    async with Neighbour(hub), httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client:
        assert (await client.get("/dashboard/api/stats")).status_code == 200
        # A proxy on this host forwarding a remote client (127.0.0.1 is a trusted proxy).
        remote = {"X-Forwarded-For": "203.0.113.7", **json_type}
        for method, path in _dashboard_requests():
            response = await client.request(method, path, headers=remote, content=b"{}")
            assert response.status_code == 403, (method, path)
            assert "loopback" in response.json()["error"]
        # ... and one forwarding a client of this host.
        local = {"X-Forwarded-For": "127.0.0.1"}
        assert (await client.get("/dashboard/api/stats", headers=local)).status_code == 200
        # A name that resolves here (DNS rebinding) is not a loopback host name.
        rebound = await client.get("/dashboard/api/stats", headers={"Host": "evil.example"})
        assert rebound.status_code == 403
    # A client reaching the port directly from another address (the ASGI scope says so).
    assert hub.app is not None
    transport = httpx.ASGITransport(app=hub.app, client=("203.0.113.8", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as direct:
        for method, path in _dashboard_requests():
            if "stream" in path:
                continue  # (ASGITransport cannot end an endless stream; refused above)
            response = await direct.request(method, path, headers=json_type, content=b"{}")
            assert response.status_code == 403, (method, path)


async def test_without_admin_token_cross_site_requests_change_nothing(start: StartHub) -> None:
    hub = await start()
    body = json.dumps({"topic": "dash.csrf", "data": 1})
    async with Neighbour(hub), httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client:
        plain = await client.post(
            "/dashboard/api/publish", content=body, headers={"content-type": "text/plain"}
        )
        assert plain.status_code == 415
        other_port = {"Origin": "http://127.0.0.1:1", "content-type": "application/json"}
        cross = await client.post("/dashboard/api/publish", content=body, headers=other_port)
        assert cross.status_code == 403
        same = {"Origin": hub.base, "content-type": "application/json"}
        assert (
            await client.post("/dashboard/api/publish", content=body, headers=same)
        ).status_code == 200
    assert hub.hub.bus.topic_stats["dash.csrf"][0] == 1  # the same-origin one only


async def test_with_admin_token_the_cookie_is_a_signed_session_and_changes_need_csrf(
    hub: HubServer,
) -> None:
    origin = {"Origin": hub.base}
    channel = f"dash.session-{uuid.uuid4().hex[:6]}"
    body = {"topic": channel, "data": body_marker()}
    forwarded = {"X-Forwarded-For": "198.51.100.20"}  # its own login bucket
    async with Neighbour(hub), httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client:
        login = await client.post(
            "/dashboard/api/login", json={"token": ADMIN}, headers={**origin, **forwarded}
        )
        assert login.status_code == 200
        csrf = login.json()["csrf"]
        cookie = client.cookies["eventcast_admin"]
        SECRETS.update((csrf, cookie))
        assert ADMIN not in cookie
        publish = "/dashboard/api/publish"
        with_csrf = {**origin, "X-CSRF-Token": csrf}
        assert (await client.post(publish, json=body, headers=origin)).status_code == 403
        assert (
            await client.post(publish, json=body, headers={"X-CSRF-Token": csrf})
        ).status_code == 403
        other_origin = {"Origin": "http://127.0.0.1:1", "X-CSRF-Token": csrf}
        assert (await client.post(publish, json=body, headers=other_origin)).status_code == 403
        as_text = await client.post(
            publish,
            content=json.dumps(body),
            headers={**with_csrf, "Content-Type": "text/plain"},
        )
        assert as_text.status_code == 415
        assert (await client.post(publish, json=body, headers=with_csrf)).status_code == 200
    # A tampered session value is no session, and neither is the token itself.
    tampered = cookie[:-2] + ("A" if cookie[-2] != "A" else "B")
    async with httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as bare:
        for value in (tampered, ADMIN, ""):
            stats = await bare.get(
                "/dashboard/api/stats", headers={"Cookie": f"eventcast_admin={value}"}
            )
            assert stats.status_code == 401


async def test_logins_are_rate_limited_per_client_address(hub: HubServer) -> None:
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    async with Neighbour(hub), httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client:
        started = time.monotonic()
        statuses = [
            (
                await client.post(
                    "/dashboard/api/login", json={"token": f"guess-{i}"}, headers=attacker
                )
            ).status_code
            for i in range(300)
        ]
        elapsed = time.monotonic() - started
        # The right token is refused too while the address is over its rate.
        right = await client.post("/dashboard/api/login", json={"token": ADMIN}, headers=attacker)
        assert right.status_code == 429
        # Another address is not affected.
        other = await client.post(
            "/dashboard/api/login",
            json={"token": "wrong"},
            headers={"X-Forwarded-For": "198.51.100.67"},
        )
        assert other.status_code == 401
    guesses = statuses.count(401)
    assert set(statuses) == {401, 429}
    assert guesses <= LOGIN_BURST + int(elapsed * hub.settings.admin_login_rate) + 1, guesses


def test_sessions_expire_and_are_bound_to_the_admin_token() -> None:
    now = [1_000_000.0]
    sessions = Sessions("the-admin-token", 60, clock=lambda: now[0])
    value = sessions.issue()
    session_id = sessions.verify(value)
    assert session_id is not None
    assert "the-admin-token" not in value
    assert sessions.csrf(session_id) != sessions.csrf(session_id + "x")
    # Another admin token (rotated) does not accept it.
    assert Sessions("another-admin-token", 60, clock=lambda: now[0]).verify(value) is None
    for forged in ("", "v1", "v1.9999999999.id.sig", value + "x", "v2" + value[2:]):
        assert sessions.verify(forged) is None
    now[0] += 61
    assert sessions.verify(value) is None


CSRF_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>another site on this host</title></head><body>
<iframe name="sink"></iframe>
<form id="form" method="post" enctype="text/plain" target="sink"
      action="{hub}/dashboard/api/publish">
  <input name='{{"topic":"dash.csrf","data":1,"pad":"' value='"}}'>
</form>
<script>
window.formDone = false;
window.fetchDone = false;
document.querySelector("iframe").onload = () => {{ window.formDone = true; }};
document.getElementById("form").submit();
fetch("{hub}/dashboard/api/publish", {{
  method: "POST", mode: "no-cors", credentials: "include",
  headers: {{"content-type": "text/plain"}},
  body: JSON.stringify({{topic: "dash.csrf", data: 2}}),
}}).finally(() => {{ window.fetchDone = true; }});
</script></body></html>
"""


async def test_a_page_on_another_port_cannot_make_a_logged_in_browser_publish(
    hub: HubServer, browser: Any
) -> None:
    from .test_dashboard import Dashboard

    evil = CSRF_PAGE.format(hub=hub.base).encode()
    context = await browser.new_context()
    async with Neighbour(hub), page_server(evil) as evil_origin:
        dashboard = Dashboard(await context.new_page())
        page = dashboard.page
        await page.goto(f"{hub.base}/")
        await page.locator("#login-token").fill(ADMIN)
        await page.get_by_role("button", name="Open").click()
        await dashboard.wait_ready()
        [cookie] = await page.context.cookies()
        SECRETS.add(cookie["value"])
        # The same browser visits a page served from another port of this host.
        attack = await context.new_page()
        await attack.goto(f"{evil_origin}/")
        await attack.wait_for_function("window.formDone && window.fetchDone", timeout=WAIT * 1000)
        await attack.close()
        await dashboard.close()
    await context.close()
    assert (await hub.api("history", channel="dash.csrf", limit=10))["publications"] == []


@contextlib.asynccontextmanager
async def page_server(page: bytes) -> AsyncIterator[str]:
    """Serve one page on its own port (another origin of this host); yield its origin."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(page), page)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


# -- 5. tokens never reach the log -----------------------------------------------------------------


def _token_requests(access_token: str) -> list[tuple[str, str, int]]:
    """Requests carrying a token in their URL: (method, target, expected status)."""
    return [
        ("GET", f"/connection/sse?topic=a&access%5Ftoken={access_token}", 200),
        ("GET", f"/connection/sse?topic=a&access%255Ftoken={access_token}", 401),
        ("POST", f"/connection/sse?topic=a&access_token={access_token}", 405),
        ("GET", f"/connection/sse/?topic=a&access_token={access_token}", 307),
        ("GET", f"/connection/sse?topic=a..b&access_token={access_token}", 400),
        ("GET", f"/nowhere/{access_token}?api_key={API_KEY}", 404),
    ]


async def _send_token_requests(hub: HubServer, access_token: str) -> None:
    async with httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as client:
        for method, target, expected in _token_requests(access_token):
            async with client.stream(method, target) as response:
                assert response.status_code == expected, target
                if expected == 307:
                    assert access_token in response.headers["location"]


async def test_tokens_in_urls_never_reach_the_access_log(
    start: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start()
    access_token = secret_token("carol")
    async with Neighbour(hub):
        await _send_token_requests(hub, access_token)
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    for method, target, status in _token_requests(access_token):
        path = target.partition("?")[0].replace(access_token, "***")
        assert any(f'"{method} {path}' in line and f" {status}" in line for line in access), (
            target,
            access,
        )
    assert any("access%5Ftoken=***" in line for line in access)
    assert not [line for line in access if access_token in line]


async def test_tokens_in_urls_sent_to_the_served_hub(hub: HubServer) -> None:
    """The same requests against ``eventcast serve`` (its log is read by the last test)."""
    access_token = secret_token("dave")
    async with Neighbour(hub):
        await _send_token_requests(hub, access_token)
    SENT_TO_SERVED.append("access%5Ftoken=***")


# -- 6. tracebacks and 500s ------------------------------------------------------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_deeply_nested_json_is_a_bad_request_everywhere(hub: HubServer) -> None:
    nested = _nested(1100)  # 2.2 KB
    async with Neighbour(hub):
        # WebSocket, before connect and after.
        async with await RawClient.open(hub.ws_url) as client:
            await client.send_raw(f'{{"id":1,"connect":{{"data":{nested}}}}}')
            assert await client.closed() == (3501, "bad request")
        async with await RawClient.open(hub.ws_url) as client:
            await client.connect(secret_token())
            await client.send_raw(f'{{"id":2,"publish":{{"channel":"a","data":{nested}}}}}')
            assert await client.closed() == (3501, "bad request")
        async with httpx.AsyncClient(base_url=hub.base, timeout=WAIT) as http:
            publication = f'{{"channel":"a","data":{nested}}}'
            # publish, and a batch of publications alone (both decoded straight into
            # structs when they fit, after the depth check).
            for path, body in [
                ("/api/publish", publication),
                ("/api/batch", f'{{"commands":[{{"publish":{publication}}}]}}'),
            ]:
                api = await http.post(path, content=body, headers={"X-API-Key": API_KEY})
                assert api.status_code == 400
                assert api.json()["error"]["code"] == 107
            dashboard = await http.post(
                "/dashboard/api/publish",
                content=f'{{"topic":"a","data":{nested}}}',
                headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
            )
            assert dashboard.status_code == 400
            # The limit is the whole body's (64 levels), whichever value reaches it: the
            # data, or a field the API does not name. (A body of the common form is
            # decoded into structs whose types bound the depth when its data nests at
            # most BOUNDED_DEPTH levels, else after the depth check: both at the limit.)
            publish = '{{"channel":"nested","data":{},"x":{}}}'
            one_past = [
                ("/api/publish", publish.format(_nested(64), 1)),
                ("/api/publish", publish.format(1, _nested(64))),
                ("/api/broadcast", f'{{"channels":["nested"],"data":{_nested(64)}}}'),
                ("/api/batch", f'{{"commands":[{{"publish":{publish.format(_nested(61), 1)}}}]}}'),
                ("/api/batch", f'{{"commands":[{{"publish":{publish.format(1, _nested(61))}}}]}}'),
            ]
            for path, body in one_past:
                api = await http.post(path, content=body, headers={"X-API-Key": API_KEY})
                assert api.status_code == 400, (path, body[:60])
                assert api.json()["error"]["code"] == 107
            # Nesting up to the limit is fine.
            fine = await http.post(
                "/api/publish",
                content=publish.format(_nested(63), _nested(63)),
                headers={"X-API-Key": API_KEY},
            )
            assert "offset" in fine.json()["result"]
            fine_batch = await http.post(
                "/api/batch",
                content=f'{{"commands":[{{"publish":{publish.format(_nested(60), 1)}}}]}}',
                headers={"X-API-Key": API_KEY},
            )
            assert "offset" in fine_batch.json()["replies"][0]["publish"]
            fine_broadcast = await http.post(
                "/api/broadcast",
                content=f'{{"channels":["nested"],"data":{_nested(63)}}}',
                headers={"X-API-Key": API_KEY},
            )
            assert "offset" in fine_broadcast.json()["result"]["responses"][0]["result"]


async def test_invalid_utf8_text_frames_close_1007_without_a_log_line(
    start: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start()
    # Connected first: the clients' handshakes run in this process, the hub's event loop.
    sockets = [await RawSocket.open(hub, small_buffer=False) for _ in range(50)]
    async with Neighbour(hub):
        for raw in sockets:
            raw.send_frame(b'{"id":1,"connect":{"name":"\xff\xfe"}}')
        codes = [await raw.close_code() for raw in sockets]
    for raw in sockets:
        raw.close()
    assert codes == [1007] * 50
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == []


async def test_invalid_utf8_sent_to_the_served_hub(hub: HubServer) -> None:
    async with Neighbour(hub):
        raw = await RawSocket.open(hub, small_buffer=False)
        raw.send_frame(b"\xc3\x28")
        assert await raw.close_code() == 1007
        raw.close()


@pytest.fixture(
    params=[
        "sqlite",
        "memory",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def log_url(request: pytest.FixtureRequest, tmp_path: Path, run_id: str) -> Iterator[str]:
    """The log of a hub, on every backend (on shared servers, a schema or prefix of its own)."""
    name = f"ecsec_{run_id}_{uuid.uuid4().hex[:6]}"
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/events.db"
    elif request.param == "memory":
        yield "memory://"
    elif request.param == "postgres":
        url = request.getfixturevalue("postgres_service")
        yield f"{url}?schema={name}"
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    else:
        url = request.getfixturevalue("redis_service")
        yield f"{url}?prefix={name}"
        import redis

        with redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(f"{name}:*"))
            if keys:
                client.delete(*keys)


BIG = 2**63


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("history", {"channel": "news", "limit": BIG}),
        ("history", {"channel": "news", "limit": -1}),
        ("history", {"channel": "news", "limit": 1, "since": {"offset": BIG, "epoch": "x"}}),
        ("history", {"channel": "news", "limit": 1, "since": {"offset": -5, "epoch": "x"}}),
        ("subscribe", {"channel": "news", "recover": True, "offset": 2**64, "epoch": "x"}),
    ],
)
async def test_out_of_range_numbers_are_bad_requests_on_every_log(
    start: StartHub, log_url: str, method: str, body: dict[str, Any]
) -> None:
    hub = await start(log_url=log_url)
    await hub.publish("news", {"n": 1})
    async with Neighbour(hub), await RawClient.open(hub.ws_url) as client:
        await client.connect(secret_token())
        reply = await client.request(method, body)
        assert reply["error"]["code"] == 107, reply
        # The connection is still usable.
        assert "history" in await client.request("history", {"channel": "news", "limit": 1})
        if method == "history":
            api = await hub.call("history", body)
            assert api.status_code == 200
            assert api.json()["error"]["code"] == 107


async def test_internal_errors_count_toward_the_error_budget(start: StartHub) -> None:
    hub = await start(max_bad_commands=5)

    async def failing(conn: Any, data: Any) -> Any:
        raise LogError("the disk is full")

    hub.hub.register_rpc("fails", failing)
    async with Neighbour(hub), await RawClient.open(hub.ws_url) as client:
        await client.connect(secret_token())
        for _ in range(4):
            reply = await client.request("rpc", {"method": "fails"})
            assert reply["error"]["code"] == 100
        await client.command("rpc", {"method": "fails"})
        assert await client.closed() == (3509, "too many errors")


async def test_a_last_event_id_with_a_non_ascii_digit_starts_unrecovered(hub: HubServer) -> None:
    channel = f"sse{uuid.uuid4().hex[:6]}"
    await hub.publish(channel, {"n": 1})
    headers = {  # bytes on the wire: Latin-1, as the hub reads them
        b"Authorization": f"Bearer {secret_token()}".encode(),
        b"Last-Event-ID": f"1;{channel}!\xb2!abc".encode("latin-1"),
    }
    async with (
        Neighbour(hub),
        httpx.AsyncClient(timeout=WAIT) as client,
        client.stream(
            "GET", f"{hub.base}/connection/sse", params={"topic": channel}, headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        async with asyncio.timeout(WAIT):
            while await anext(lines) != "event: subscribed":
                pass
            subscribed = json.loads((await anext(lines)).removeprefix("data: "))
    assert subscribed["recovered"] is False
    assert subscribed["was_recovering"] is True


# -- the log of the whole suite --------------------------------------------------------------------


JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")


def test_the_served_log_holds_no_secret_and_no_traceback(
    served: tuple[HubServer, HubProcess],
) -> None:
    """Runs last: everything above sent its hostile input to this one process."""
    _, process = served
    log = "".join(process.output)
    assert '"GET /healthz HTTP/1.1" 200' in log  # the access log was on
    for expected in SENT_TO_SERVED:
        assert expected in log
    assert "Traceback" not in log
    assert " ERROR " not in log, [line for line in process.output if " ERROR " in line]
    leaked = sorted(s[:12] + "…" for s in SECRETS if s in log)
    assert leaked == []
    assert JWT.search(log) is None
    assert "dashboard: open to clients that log in" in log
