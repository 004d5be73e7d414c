"""A real browser (headless Chromium via playwright) on ``/connection/sse``.

The test page is served from a second origin (another port), so the stream is
cross-origin: the hub lists the page's origin in ``allowed_origins`` and the page
opens ``new EventSource(url, {withCredentials: true})``.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from eventcast.server.config import Settings

from .conftest import StartHub
from .hubtools import WAIT, HubServer, free_port, token, write_config
from .ssetools import HubProcess, publish_offline, sse_url

playwright_api = pytest.importorskip("playwright.async_api")

#: Safety timeout of the page-side waits, in milliseconds.
WAIT_MS = WAIT * 3 * 1000

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>eventcast SSE test page</title></head>
<body><script>
window.events = [];
window.errors = 0;
window.opens = 0;
window.source = null;
window.start = (url) => {
  const source = new EventSource(url, {withCredentials: true});
  window.source = source;
  const record = (kind) => (e) => {
    window.events.push({kind, data: JSON.parse(e.data), id: e.lastEventId});
  };
  source.addEventListener("subscribed", record("subscribed"));
  source.onmessage = record("message");
  source.onopen = () => { window.opens += 1; };
  source.onerror = () => { window.errors += 1; };
};
</script></body></html>
"""


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/page.html":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The test page's origin: a small HTTP server on its own port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def open_page(browser: Any, page_origin: str) -> Any:
    page = await browser.new_page()
    await page.goto(f"{page_origin}/page.html")
    return page


async def events_of(page: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = await page.evaluate("window.events")
    return events


async def wait_events(page: Any, n: int) -> list[dict[str, Any]]:
    await page.wait_for_function(f"window.events.length >= {n}", timeout=WAIT_MS)
    return await events_of(page)


def pub(topic: str, offset: int, epoch: str, data: Any) -> dict[str, Any]:
    return {"topic": topic, "offset": offset, "epoch": epoch, "data": data, "tags": {}}


async def test_page_receives_two_topics(
    start_hub: StartHub, browser: Any, page_origin: str
) -> None:
    hub = await start_hub(allowed_origins=[page_origin])
    page = await open_page(browser, page_origin)
    url = sse_url(hub.base, ["a", "b"], access_token=token())
    await page.evaluate("(url) => window.start(url)", url)
    [subscribed] = await wait_events(page, 1)
    assert subscribed["kind"] == "subscribed"
    assert subscribed["data"]["topics"] == ["a", "b"]
    assert subscribed["data"]["recovered"] is False

    a1 = await hub.publish("a", {"n": 1, "text": "two\nlines"})
    b1 = await hub.publish("b", {"n": 1})
    a2 = await hub.publish("a", {"n": 2})
    # Raw JSON with literal line breaks: several data: lines, joined again by the browser.
    await hub.hub.bus.publish("b", b'{"a":\n1,\r\n"b":\r2}')
    events = await wait_events(page, 5)
    assert [e["kind"] for e in events] == ["subscribed"] + ["message"] * 4
    assert [e["data"] for e in events[1:]] == [
        pub("a", 1, a1["epoch"], {"n": 1, "text": "two\nlines"}),
        pub("b", 1, b1["epoch"], {"n": 1}),
        pub("a", 2, a2["epoch"], {"n": 2}),
        pub("b", 2, b1["epoch"], {"a": 1, "b": 2}),
    ]
    # The browser's lastEventId is the composite cursor of both topics.
    assert events[-1]["id"] == f"1;a!2!{a2['epoch']};b!2!{b1['epoch']}"
    assert await page.evaluate("window.errors") == 0


async def test_page_authenticates_with_a_cookie(
    start_hub: StartHub, browser: Any, page_origin: str
) -> None:
    """``withCredentials`` sends the hub's cookie on the cross-origin stream."""
    hub = await start_hub(allowed_origins=[page_origin])
    page = await open_page(browser, page_origin)
    cookie = {"name": hub.settings.sse_cookie, "value": token("dora"), "url": hub.base}
    await page.context.add_cookies([cookie])
    await page.evaluate("(url) => window.start(url)", sse_url(hub.base, ["a"]))
    await wait_events(page, 1)
    assert {c.user for c in hub.hub.connections.values()} == {"dora"}
    offset = (await hub.publish("a", {"n": 1}))["offset"]
    events = await wait_events(page, 2)
    assert events[1]["data"]["offset"] == offset


@pytest.fixture
def hub_files(tmp_path: Path, page_origin: str) -> tuple[Path, dict[str, str]]:
    """A config file (SQLite log in tmp_path, a short retry hint) and the environment."""
    config = write_config(tmp_path / "eventcast.toml", tmp_path, sse_retry="0.5s")
    return config, {"EVENTCAST_ALLOWED_ORIGINS": page_origin}


async def test_page_recovers_everything_missed_while_the_server_restarts(
    browser: Any, page_origin: str, hub_files: tuple[Path, dict[str, str]]
) -> None:
    config, env = hub_files
    server = HubProcess(config, free_port(), env)
    await asyncio.to_thread(server.start)
    try:
        hub = HubServer(base=server.base, settings=Settings.load(config))
        page = await open_page(browser, page_origin)
        secret = token(ttl=3600)
        url = sse_url(server.base, ["a", "b"], access_token=secret)
        await page.evaluate("(url) => window.start(url)", url)
        await wait_events(page, 1)
        before = []
        for n in (1, 2):
            for topic in ("a", "b"):
                result = await hub.publish(topic, {"n": n, "topic": topic})
                before.append(
                    pub(topic, result["offset"], result["epoch"], {"n": n, "topic": topic})
                )
        await wait_events(page, 5)

        # The server goes down; events happen on both topics during the outage.
        # (uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.)
        assert await asyncio.to_thread(server.stop) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in "".join(server.output)
        during = await publish_offline(
            config,
            [(t, {"n": n, "topic": t}) for n, t in ((3, "b"), (3, "a"), (4, "a"), (4, "b"))],
        )
        missed = [
            pub(topic, offset, epoch, {"n": 3 if offset == 3 else 4, "topic": topic})
            for topic, offset, epoch in during
        ]
        assert [(m["topic"], m["offset"]) for m in missed] == [
            ("b", 3),
            ("a", 3),
            ("a", 4),
            ("b", 4),
        ]

        # The server comes back on the same port with the same log; EventSource reconnects by
        # itself with Last-Event-ID.
        await asyncio.to_thread(server.start)
        await page.wait_for_function(
            "window.events.filter((e) => e.kind === 'subscribed').length === 2"
            " && window.events.length >= 10",
            timeout=WAIT_MS,
        )
        after = await hub.publish("a", {"n": 5, "topic": "a"})
        events = await wait_events(page, 11)
        assert await page.evaluate("window.source.readyState") == 1  # OPEN
    finally:
        await asyncio.to_thread(server.stop)

    # The server's log (uvicorn's access log included) never shows the token.
    output = "".join(server.output)
    assert "/connection/sse?topic=a&topic=b&access_token=***" in output
    assert secret not in output
    kinds = [e["kind"] for e in events]
    assert kinds == ["subscribed"] + ["message"] * 4 + ["subscribed"] + ["message"] * 5
    assert events[0]["data"]["recovered"] is False
    assert events[5]["data"]["topics"] == ["a", "b"]
    assert events[5]["data"]["recovered"] is True
    received = [e["data"] for e in events if e["kind"] == "message"]
    expected = [*before, *missed, pub("a", 5, after["epoch"], {"n": 5, "topic": "a"})]
    # Every event exactly once, in order within each topic.
    for topic in ("a", "b"):
        assert [r for r in received if r["topic"] == topic] == [
            x for x in expected if x["topic"] == topic
        ]
    assert len(received) == len(expected)
    # The recovery was exact because the epochs survived the restart.
    assert {m["epoch"] for m in received if m["topic"] == "a"} == {after["epoch"]}


async def test_page_on_a_disallowed_origin_is_refused(
    start_hub: StartHub, browser: Any, page_origin: str
) -> None:
    hub = await start_hub(allowed_origins=["https://only.example"])
    page = await open_page(browser, page_origin)
    url = sse_url(hub.base, ["a", "b"], access_token=token())
    # The page is told nothing about a response that fails CORS; DevTools sees its status.
    statuses: dict[str, int] = {}
    status_seen = asyncio.Event()
    failed: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    devtools = await page.context.new_cdp_session(page)

    def record_status(event: dict[str, Any]) -> None:
        statuses[event["requestId"]] = event["statusCode"]
        status_seen.set()

    devtools.on("Network.responseReceivedExtraInfo", record_status)
    devtools.on("Network.loadingFailed", failed.put_nowait)
    await devtools.send("Network.enable")
    await page.evaluate("(url) => window.start(url)", url)
    async with asyncio.timeout(WAIT):
        failure = await failed.get()
    assert failure["type"] == "EventSource"
    assert failure["corsErrorStatus"]["corsError"] == "MissingAllowOriginHeader"
    # DevTools may report the failure before the response's extra info: wait for it.
    async with asyncio.timeout(WAIT):
        while failure["requestId"] not in statuses:
            status_seen.clear()
            await status_seen.wait()
    assert statuses[failure["requestId"]] == 403
    # EventSource fails for good (CLOSED) on a refused stream.
    await page.wait_for_function(
        "window.errors > 0 && window.source.readyState === EventSource.CLOSED", timeout=WAIT_MS
    )
    assert hub.hub.refused["origin"] >= 1
    assert not hub.hub.connections
    assert await events_of(page) == []
    assert await page.evaluate("window.opens") == 0
