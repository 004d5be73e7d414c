"""The examples of examples/: each one run against a real hub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.staticfiles import StaticFiles

from eventcast.ingest.base import ConsumerState
from tests.conftest import ensure_service
from tests.ingest.conftest import eventually, running_consumers, unique
from tests.server.apptools import listening_socket
from tests.server.conftest import StartHub
from tests.server.hubtools import SECRET, WAIT, HubServer, RawClient, token
from tests.server.ssetools import open_sse

from .conftest import CONFIG, EXAMPLES, example_env, load_example, run_example, serve_app

StartExamplesHub = Callable[..., Awaitable[HubServer]]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("chat/server.py", "--hub"),
        ("price_ticker.py", "--symbols"),
        ("iot_sensors.py", "--sensors"),
        ("proxy_backend.py", "--port"),
    ],
)
def test_example_help(script: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert "EVENTCAST_" in done.stdout


def test_examples_readme_documents_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name in (
        "chat/",
        "price_ticker.py",
        "iot_sensors.py",
        "fastapi_app.py",
        "fastapi_hooks.py",
        "proxy_backend.py",
        "proxy.toml",
        "eventcast.toml",
    ):
        assert name in readme


async def test_chat_room_in_two_browser_pages(
    examples_hub: StartExamplesHub, app_socket: socket.socket
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing")
    origin = f"http://127.0.0.1:{app_socket.getsockname()[1]}"
    hub = await examples_hub(allowed_origins=[origin])
    await hub.publish("chat:lobby", {"user": "carol", "text": "earlier message"})
    chat = load_example("chat/server.py")
    app = chat.create_app(hub.base, SECRET, room="chat:lobby")
    wait_ms = WAIT * 3 * 1000
    async with (
        serve_app(app, app_socket) as base,
        playwright_api.async_playwright() as playwright,
    ):
        assert base == origin
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = []
            for user in ("alice", "bob"):
                page = await browser.new_page()
                await page.goto(f"{base}/")
                await page.fill("#user", user)
                await page.click("#join")
                await page.wait_for_function(
                    "document.getElementById('status').textContent.startsWith('joined')",
                    timeout=wait_ms,
                )
                assert await page.text_content("#status") == f"joined chat:lobby as {user}"
                # The recent history is shown on joining.
                assert "earlier message" in (await page.text_content("#messages") or "")
                pages.append(page)
            alice, bob = pages
            await alice.fill("#text", "hello bob")
            await alice.press("#text", "Enter")
            seen = (
                "[...document.querySelectorAll('#messages li')]"
                ".some(li => li.textContent === 'alicehello bob')"
            )
            await bob.wait_for_function(seen, timeout=wait_ms)
            await alice.wait_for_function(seen, timeout=wait_ms)  # the sender sees it too
            items = await bob.eval_on_selector_all(
                "#messages li",
                "items => items.map(li => [li.querySelector('.user').textContent,"
                " li.querySelector('.text').textContent])",
            )
            assert items == [["carol", "earlier message"], ["alice", "hello bob"]]
            history = await hub.api("history", channel="chat:lobby", limit=10)
            assert history["publications"][-1]["data"] == {"user": "alice", "text": "hello bob"}
        finally:
            await browser.close()


async def test_price_ticker_reaches_an_sse_stream(examples_hub: StartExamplesHub) -> None:
    hub = await examples_hub()
    async with open_sse(hub.base, ["prices.*"], token=token("viewer")) as stream:
        assert stream.status == 200
        assert (await stream.subscribed())["topics"] == ["prices.*"]
        code, out, err = await run_example(
            "examples/price_ticker.py",
            "--symbols",
            "EURUSD,BTCUSD",
            "--ticks",
            "3",
            "--interval",
            "0",
            "--seed",
            "1",
            env=example_env(hub),
        )
        assert code == 0, err
        assert "published 6 prices" in out
        events = [event.json() for event in await stream.events(6)]
    by_topic = Counter(event["topic"] for event in events)
    assert by_topic == {"prices.EURUSD": 3, "prices.BTCUSD": 3}
    for event in events:
        assert event["data"]["symbol"] == event["topic"].removeprefix("prices.")
        assert event["data"]["price"] > 0
    page = (EXAMPLES / "price_ticker.html").read_text(encoding="utf-8")
    assert '"/connection/sse?topic=prices.*"' in page
    assert "new EventSource(" in page


def iot_hub_settings(root: str) -> dict[str, Any]:
    """The examples' settings, consuming ``<root>/#`` (a root and a session of the test's own)."""
    (consumer,) = CONFIG["consumers"]
    mqtt = {**consumer["mqtt"], "topics": [f"{root}/#"], "client_id": f"{root}-hub"}
    return {"consumers": [{**consumer, "mqtt": mqtt}]}


@pytest.fixture
async def mqtt_root() -> AsyncIterator[str]:
    """A topic root of the test's own; the hub's MQTT session is ended after the hub stops."""
    aiomqtt = pytest.importorskip("aiomqtt")
    ensure_service("mosquitto")
    root = unique("iot")
    yield root
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"{root}-hub", clean_session=True):
        pass


async def test_iot_sensors_through_mqtt_fan_out_to_every_subscriber(
    mqtt_root: str, examples_hub: StartExamplesHub
) -> None:
    root = mqtt_root
    hub = await examples_hub(**iot_hub_settings(root))
    await until_consumer_runs(hub)
    sensors, readings = 5, 3
    code, out, err = await run_example(
        "examples/iot_sensors.py",
        *("--root", root, "--sensors", str(sensors), "--readings", str(readings)),
        *("--interval", "0", "--subscribers", "2"),
        env=example_env(hub, EVENTCAST_TOKEN=token("sensors")),
    )
    assert code == 0, out + err
    assert f"{sensors} sensors published {sensors * readings} readings to MQTT" in out
    assert "all 2 subscriber(s) got every reading" in out
    history = await hub.api("history", channel=f"iot:{root}.sensor-003.reading", limit=10)
    assert [p["data"]["seq"] for p in history["publications"]] == [1, 2, 3]


async def test_iot_sensors_page_shows_readings_live_over_sse(
    mqtt_root: str, examples_hub: StartExamplesHub, app_socket: socket.socket
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing")
    root = mqtt_root
    origin = f"http://127.0.0.1:{app_socket.getsockname()[1]}"
    hub = await examples_hub(allowed_origins=[origin], **iot_hub_settings(root))
    await until_consumer_runs(hub)
    iot = load_example("iot_sensors.py")
    page_app = StaticFiles(directory=EXAMPLES)
    wait_ms = WAIT * 3 * 1000
    async with (
        serve_app(page_app, app_socket) as base,
        playwright_api.async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            query = f"hub={hub.base}&token={token('viewer')}&root={root}"
            await page.goto(f"{base}/iot_sensors.html?{query}")
            await page.wait_for_function(
                "document.getElementById('status').textContent === 'live'", timeout=wait_ms
            )
            sensors = iot.sensor_ids(3)
            await iot.run_sensors("mqtt://127.0.0.1:1883", root, sensors, 2, 0)
            for sensor in sensors:
                await page.wait_for_function(
                    f"document.querySelector('#{sensor} .n')?.textContent === '2'",
                    timeout=wait_ms,
                )
            cells = await page.locator(f"#{sensors[0]} .t").text_content()
            assert cells is not None
            assert 18.0 <= float(cells) <= 26.0
        finally:
            await browser.close()


async def until_consumer_runs(hub: HubServer) -> None:
    """The hub's MQTT consumer has subscribed (its session then keeps every reading)."""
    (consumer,) = running_consumers(hub)
    await eventually(lambda: consumer.state is ConsumerState.RUNNING)


async def test_fastapi_hooks_authorize_from_the_session_cookie(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EVENTCAST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EVENTCAST_LOG_URL", f"sqlite:///{tmp_path}/rooms.db")
    example = load_example("fastapi_hooks.py")
    async with serve_app(example.app, listening_socket(), lifespan="on") as base:
        ws_url = base.replace("http://", "ws://", 1) + "/realtime/connection/websocket"
        cookies = {}
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
            for user in ("alice", "bob"):
                response = await http.post("/login", json={"user": user})
                assert response.status_code == 200, response.text
                cookies[user] = f"session={response.cookies['session']}"
            assert (await http.post("/login", json={"user": "mallory"})).status_code == 403

        async with (
            await RawClient.open(ws_url, additional_headers={"Cookie": cookies["alice"]}) as alice,
            await RawClient.open(ws_url, additional_headers={"Cookie": cookies["bob"]}) as bob,
        ):
            connected = await alice.connect()
            assert connected["data"] == {"rooms": ["lobby", "staff"]}
            assert list(connected["subs"]) == ["user:alice"]
            await bob.connect()
            staff = await alice.subscribe("room:staff")
            assert staff["data"] == {"members": ["alice"]}
            refused = await bob.request("subscribe", {"channel": "room:staff"})
            assert refused["error"]["code"] == 103
            await bob.subscribe("room:lobby")

            await bob.request("publish", {"channel": "room:lobby", "data": {"text": "hi all"}})
            push = await bob.publication()
            assert push["pub"]["data"] == {"user": "bob", "text": "hi all"}
            bad = await bob.request("publish", {"channel": "room:lobby", "data": {"html": "<b>"}})
            assert bad["error"]["code"] == 107
            assert (await alice.request("rpc", {"method": "rooms"}))["rpc"]["data"] == [
                "lobby",
                "staff",
            ]
            async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
                response = await http.post("/rooms/lobby/announce", json={"text": "closing"})
                assert response.status_code == 200, response.text
            push = await bob.publication()
            assert push["pub"]["data"] == {"user": "server", "text": "closing"}

        async with await RawClient.open(ws_url) as stranger:
            await stranger.command("connect", {})
            assert await stranger.closed() == (3500, "invalid token")


async def test_proxy_backend_answers_the_hubs_proxy(start_hub: StartHub) -> None:
    backend = load_example("proxy_backend.py")
    config = tomllib.loads((EXAMPLES / "proxy.toml").read_text(encoding="utf-8"))
    async with serve_app(backend.app, listening_socket()) as base:
        settings = {
            key: value.replace("http://127.0.0.1:3000", base)
            if key.endswith("_endpoint")
            else value
            for key, value in config.items()
            if key not in ("log_url", "api_key")
        }
        hub = await start_hub(**settings)
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
            cookies = {}
            for user in ("alice", "bob"):
                response = await http.post("/login", json={"user": user})
                cookies[user] = f"session={response.cookies['session']}"
        async with (
            await RawClient.open(
                hub.ws_url, additional_headers={"Cookie": cookies["alice"]}
            ) as alice,
            await RawClient.open(hub.ws_url, additional_headers={"Cookie": cookies["bob"]}) as bob,
        ):
            connected = await alice.connect()
            assert connected["data"] == {"boards": ["general", "ops"]}
            assert list(connected["subs"]) == ["user:alice"]
            await bob.connect()
            assert (await alice.subscribe("board:ops"))["data"] == {"members": ["alice"]}
            assert (await bob.request("subscribe", {"channel": "board:ops"}))["error"][
                "code"
            ] == 103
            await alice.request("publish", {"channel": "board:ops", "data": {"text": "  ship it "}})
            push = await alice.publication()
            assert push["pub"]["data"] == {"user": "alice", "text": "ship it"}
            boards = await bob.request("rpc", {"method": "boards"})
            assert boards["rpc"]["data"] == ["general"]
            await hub.publish("user:bob", {"note": "for bob"})
            assert (await bob.publication())["pub"]["data"] == {"note": "for bob"}
        async with await RawClient.open(hub.ws_url) as anonymous:
            await anonymous.command("connect", {})
            assert await anonymous.closed() == (4501, "login required")
