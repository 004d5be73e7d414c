"""The official JavaScript SDK (centrifuge-js 5, on node with ``ws``) against the hub."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from .conftest import StartHub
from .hubtools import API_KEY, NAMESPACES, WAIT, HubServer, token
from .jstools import run_js

#: The namespace of the JS flows: history, presence, publishing, deltas.
JS_NAMESPACE: dict[str, Any] = {
    "name": "js",
    "history_size": 100,
    "history_ttl": 300,
    "force_recovery": True,
    "presence": True,
    "allow_subscribe_for_client": True,
    "allow_publish_for_subscriber": True,
    "allow_history_for_subscriber": True,
    "allow_presence_for_subscriber": True,
    "allowed_delta_types": ["fossil"],
    "allow_tags_filter": True,
}


@pytest.fixture
async def js_hub(start_hub: StartHub) -> HubServer:
    return await start_hub(namespaces=[*NAMESPACES, JS_NAMESPACE])


async def run_script(script: str, env: dict[str, str]) -> dict[str, Any]:
    """Run a script of tests/js; return the JSON object it printed last (fail on its error)."""
    result = await run_js(script, **env)
    assert result["error"] is None, result["error"]
    return result


@pytest.mark.parametrize(
    ("protocol", "transport"),
    [
        ("json", "websocket"),
        ("protobuf", "websocket"),
        ("json", "http_stream"),
        ("protobuf", "http_stream"),
        ("json", "sse"),
    ],
)
async def test_js_sdk_flow(js_hub: HubServer, protocol: str, transport: str) -> None:
    """Connect, subscribe, live publications in order, recovery after a reconnect, publish,
    history and presence, with centrifuge-js's JSON or Protobuf build, over WebSocket or,
    WebSocket being blocked, over HTTP-streaming or SSE emulation."""
    hub = js_hub
    channel = f"js:flow.{protocol}.{transport}"
    env = {
        "HUB_WS_URL": hub.ws_url,
        "HUB_TOKEN": token("js-user"),
        "HUB_API_URL": hub.api_url,
        "HUB_API_KEY": API_KEY,
        "HUB_CHANNEL": channel,
        "HUB_PROTOCOL": protocol,
    }
    if transport != "websocket":
        blocked = hub.ws_url.replace("/connection/websocket", "/connection/blocked")
        env["HUB_TRANSPORTS"] = json.dumps(
            [
                {"transport": "websocket", "endpoint": blocked},
                {"transport": transport, "endpoint": f"{hub.base}/connection/{transport}"},
            ]
        )
        env["HUB_EMULATION_URL"] = f"{hub.base}/emulation"
    result = await run_script("flow.mjs", env)
    assert set(result["transports"]) == {transport}
    epoch = result["published"][0]["epoch"]
    assert result["published"] == [{"offset": n, "epoch": epoch} for n in range(1, 8)]
    first, second = result["subscribed"]
    assert first == {
        "wasRecovering": False,
        "recovered": False,
        "recoverable": True,
        "offset": 0,
        "epoch": epoch,
    }
    assert second == {
        "wasRecovering": True,
        "recovered": True,
        "recoverable": True,
        "offset": 6,
        "epoch": epoch,
    }
    # Every publication exactly once, in order: 3 live, 3 recovered, the sentinel, the
    # client's own.
    texts = [
        *(f"live {n}" for n in (1, 2, 3)),
        *(f"missed {n}" for n in (4, 5, 6)),
        "sentinel",
        "from the client",
    ]
    assert result["received"] == [
        {"offset": n, "data": {"n": n, "text": text}} for n, text in enumerate(texts, start=1)
    ]
    assert result["states"][:3] == ["connecting", "connected", "disconnected"]
    assert result["history"] == [{"offset": n, "n": n} for n in range(1, 9)]
    assert result["presence"] == ["js-user"]
    assert result["presenceStats"] == {"numClients": 1, "numUsers": 1}

    # The hub agrees.
    history = await hub.api("history", channel=channel, limit=100)
    assert [p["offset"] for p in history["publications"]] == list(range(1, 9))


async def test_js_sdk_and_python_client_reconnect_alike(hub: HubServer) -> None:
    """The SDK behaviour spec, checked side by side: states, resubscribe, recovery.

    The hub drops each client with 3000 (reconnect) while publications go on;
    centrifuge-js and eventcast's client must go through the same states,
    resubscribe recovering, and receive every publication once, in order.
    """
    outcomes = {}
    for sdk in ("js", "python"):
        channel = f"sdk.alike.{sdk}"
        user = f"{sdk}-user"
        if sdk == "js":
            result = await run_js(
                "reconnect.mjs",
                HUB_WS_URL=hub.ws_url,
                HUB_TOKEN=token(user),
                HUB_API_URL=hub.api_url,
                HUB_API_KEY=API_KEY,
                HUB_CHANNEL=channel,
                HUB_USER=user,
            )
            assert result["error"] is None, result["error"]
            outcomes[sdk] = (result["states"][:4], result["subscribed"], result["received"])
        else:
            outcomes[sdk] = await _python_reconnect(hub, channel, user)
    assert outcomes["js"] == outcomes["python"]
    states, subscribed, received = outcomes["python"]
    assert states == ["connecting", "connected", "connecting", "connected"]
    assert subscribed[1] == {"wasRecovering": True, "recovered": True}
    assert received == [1, 2, 3, 4]


async def _python_reconnect(hub: HubServer, channel: str, user: str) -> tuple[Any, ...]:
    import eventcast
    from eventcast.testing import collect

    states: list[str] = []
    subscribed: list[dict[str, bool]] = []
    connected = asyncio.Event()

    def on_state(state: str) -> None:
        states.append(state)
        if state == "connected":
            connected.set()

    client = eventcast.connect(
        hub.base,
        token=token(user),
        on_state=on_state,
        min_reconnect_delay=0.02,
        max_reconnect_delay=0.2,
    )
    async with client, client.subscribe(channel) as sub:
        subscribed.append({"wasRecovering": sub.was_recovering, "recovered": sub.recovered})
        for n in (1, 2):
            await hub.publish(channel, {"n": n})
        received = [e.offset for e in await collect(sub, 2, timeout=WAIT)]
        connected.clear()
        await hub.api("disconnect", user=user, disconnect={"code": 3000, "reason": "test kick"})
        for n in (3, 4):
            await hub.publish(channel, {"n": n})
        received += [e.offset for e in await collect(sub, 2, timeout=WAIT)]
        await asyncio.wait_for(connected.wait(), WAIT)
        subscribed.append({"wasRecovering": sub.was_recovering, "recovered": sub.recovered})
    return states[:4], subscribed, received


@pytest.mark.parametrize("protocol", ["json", "protobuf"])
async def test_js_sdk_deltas_and_tags_filter(js_hub: HubServer, protocol: str) -> None:
    """centrifuge-js decodes the hub's fossil deltas exactly, and gets only what its filter
    matches."""
    result = await run_script(
        "features.mjs",
        {
            "HUB_WS_URL": js_hub.ws_url,
            "HUB_TOKEN": token("js-features"),
            "HUB_API_URL": js_hub.api_url,
            "HUB_API_KEY": API_KEY,
            "HUB_PREFIX": f"js:features.{protocol}",
            "HUB_PROTOCOL": protocol,
        },
    )
    assert result["exact"] is True
    stats = result["deltaStats"]
    assert (stats["numPublications"], stats["numFullPayloads"], stats["numDeltaPayloads"]) == (
        4,
        1,
        3,
    )
    assert stats["compressionRatio"] > 0.5
    assert result["tagged"] == [0, 2, 3]
