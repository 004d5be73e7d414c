"""Running the scripts of tests/js (centrifuge-js on node) and reading their JSON result."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from tests.conftest import JS_DIR, node_with

from .hubtools import API_KEY, WAIT, HubServer

__all__ = ["JS_DIR", "node", "run_hooks_js", "run_js"]


def node() -> str:
    """The node executable, with tests/js's packages installed (else skip, or fail in CI)."""
    return node_with("centrifuge")


async def run_js(script: str, **env: str) -> dict[str, Any]:
    """Run ``node tests/js/<script>`` with ``env`` added; return the JSON of its last line.

    Fails the test when the script exits with an error status (its output is shown).
    """
    process = await asyncio.create_subprocess_exec(
        node(),
        script,
        cwd=JS_DIR,
        env={**os.environ, **env},
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
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


async def run_hooks_js(hub: HubServer, session: str) -> dict[str, Any]:
    """``hooks.mjs``: centrifuge-js through a hub whose hooks decide (see the script)."""
    result = await run_js(
        "hooks.mjs",
        HUB_WS_URL=hub.ws_url,
        HUB_API_URL=hub.api_url,
        HUB_API_KEY=API_KEY,
        HUB_SESSION=session,
    )
    assert result["error"] is None, result["error"]
    return result
