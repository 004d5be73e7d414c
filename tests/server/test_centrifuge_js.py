"""The official JavaScript SDK (centrifuge-js 5, on node with ``ws``) against the hub."""

from __future__ import annotations

import asyncio
import json
import os

from tests.conftest import JS_DIR, node_with

from .hubtools import API_KEY, WAIT, HubServer, token


def _node() -> str:
    return node_with("centrifuge")


async def test_js_sdk_recovers_missed_publications(hub: HubServer) -> None:
    node = _node()
    channel = "js.recovery"
    env = {
        **os.environ,
        "HUB_WS_URL": hub.ws_url,
        "HUB_TOKEN": token("js-user"),
        "HUB_API_URL": hub.api_url,
        "HUB_API_KEY": API_KEY,
        "HUB_CHANNEL": channel,
    }
    process = await asyncio.create_subprocess_exec(
        node,
        "flow.mjs",
        cwd=JS_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 3 * WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, (stdout + stderr).decode()
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["error"] is None

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
    # Every publication exactly once, in order: 3 live, 3 recovered, the sentinel.
    texts = [*(f"live {n}" for n in (1, 2, 3)), *(f"missed {n}" for n in (4, 5, 6)), "sentinel"]
    assert result["received"] == [
        {"offset": n, "data": {"n": n, "text": text}} for n, text in enumerate(texts, start=1)
    ]
    assert result["states"][:3] == ["connecting", "connected", "disconnected"]

    # The hub agrees.
    history = await hub.api("history", channel=channel, limit=100)
    assert [p["offset"] for p in history["publications"]] == list(range(1, 8))
