"""A chat room in the browser: a static page speaking the Centrifuge protocol to the hub.

This small Starlette app serves the page (``index.html``) and mints connection
tokens (``GET /token?user=NAME``) with the hub's HMAC secret: in a real
application that endpoint would first check who the user is. The page opens a
plain browser ``WebSocket`` to the hub, sends ``connect`` with the token,
``subscribe`` to the room, shows the last messages (``history``) and every
publication pushed, and ``publish``es what you type. No JavaScript SDK needed.

Run a hub that allows this page's origin, then this server::

    eventcast serve --config examples/eventcast.toml          # hub on :8000
    EVENTCAST_TOKEN_HMAC_SECRET=examples-only-hmac-secret-change-me-0123456789 \\
        python examples/chat/server.py --port 8080           # open http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from eventcast.client import websocket_url
from eventcast.server.auth import mint_token
from eventcast.topics import validate_topic

PAGE = Path(__file__).with_name("index.html")


def create_app(hub_url: str, secret: str, *, room: str = "chat:lobby") -> Starlette:
    """The chat page's app: ``/`` (the page) and ``/token?user=NAME``."""
    validate_topic(room)
    settings = json.dumps({"hub": websocket_url(hub_url), "room": room})
    page = PAGE.read_text(encoding="utf-8").replace("/*SETTINGS*/{}", settings)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def token(request: Request) -> Response:
        user = request.query_params.get("user", "").strip()
        if not user or len(user) > 32:
            return JSONResponse({"error": "user must be 1-32 characters"}, status_code=400)
        return JSONResponse({"token": mint_token(secret=secret, user=user, ttl=3600)})

    return Starlette(routes=[Route("/", index), Route("/token", token)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve the chat page of the eventcast examples.",
        epilog="The hub's HMAC secret comes from EVENTCAST_TOKEN_HMAC_SECRET. "
        "The hub must list this page's origin in allowed_origins.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--hub",
        default=os.environ.get("EVENTCAST_URL", "http://127.0.0.1:8000"),
        help="the hub's URL (default: EVENTCAST_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument("--room", default="chat:lobby", help="the channel of the room")
    args = parser.parse_args(argv)
    secret = os.environ.get("EVENTCAST_TOKEN_HMAC_SECRET")
    if not secret:
        print("error: set EVENTCAST_TOKEN_HMAC_SECRET (the hub's secret)", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(create_app(args.hub, secret, room=args.room), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
