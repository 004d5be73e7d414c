"""A plain Starlette backend answering the hub's HTTP proxy (Centrifugo's proxy protocol).

The hub (``eventcast serve --config examples/proxy.toml``) POSTs each client
event here and does what the answer says. Nothing here is eventcast-specific:
the same backend answers Centrifugo. Users log in at ``POST /login``, which
sets a ``session`` cookie; the browser sends it to the hub too (same host),
and the hub forwards it (``proxy_http_headers = ["Cookie"]``).

* ``/centrifugo/connect``: the session cookie names the user; the answer
  gives the user id, connection info, the personal channel ``user:<id>``
  (joined server-side) and data for the client. No session: disconnect 4501.
* ``/centrifugo/subscribe``: ``board:<name>`` for the board's members only
  (error 103 otherwise).
* ``/centrifugo/publish``: the text is trimmed and the author stamped.
* ``/centrifugo/rpc``: ``boards`` lists the user's boards.

Run both::

    python examples/proxy_backend.py --port 3000
    eventcast serve --config examples/proxy.toml --port 8000
"""

from __future__ import annotations

import argparse
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

USERS = {"alice": "Alice Liddell", "bob": "Bob Dylan"}
BOARDS = {"general": {"alice", "bob"}, "ops": {"alice"}}
SESSIONS: dict[str, str] = {}


def boards_of(user: str) -> list[str]:
    return sorted(name for name, members in BOARDS.items() if user in members)


async def login(request: Request) -> Response:
    body = await request.json()
    user = body.get("user") if isinstance(body, dict) else None
    if user not in USERS:
        return JSONResponse({"error": "unknown user"}, status_code=403)
    session = secrets.token_urlsafe(24)
    SESSIONS[session] = user
    response = JSONResponse({"user": user})
    response.set_cookie("session", session, httponly=True, samesite="lax")
    return response


async def connect(request: Request) -> Response:
    user = SESSIONS.get(request.cookies.get("session", ""))
    if user is None:
        return JSONResponse({"disconnect": {"code": 4501, "reason": "login required"}})
    return JSONResponse(
        {
            "result": {
                "user": user,
                "info": {"name": USERS[user]},
                "channels": [f"user:{user}"],
                "data": {"boards": boards_of(user)},
            }
        }
    )


async def subscribe(request: Request) -> Response:
    body = await request.json()
    namespace, _, board = body["channel"].partition(":")
    if namespace != "board" or body["user"] not in BOARDS.get(board, ()):
        return JSONResponse({"error": {"code": 103, "message": "permission denied"}})
    return JSONResponse({"result": {"data": {"members": sorted(BOARDS[board])}}})


async def publish(request: Request) -> Response:
    body = await request.json()
    data: Any = body.get("data")
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        return JSONResponse({"error": {"code": 107, "message": "send {'text': '...'}"}})
    return JSONResponse({"result": {"data": {"user": body["user"], "text": text.strip()}}})


async def rpc(request: Request) -> Response:
    body = await request.json()
    if body.get("method") == "boards":
        return JSONResponse({"result": {"data": boards_of(body["user"])}})
    return JSONResponse({"error": {"code": 104, "message": "method not found"}})


app = Starlette(
    routes=[
        Route("/login", login, methods=["POST"]),
        Route("/centrifugo/connect", connect, methods=["POST"]),
        Route("/centrifugo/subscribe", subscribe, methods=["POST"]),
        Route("/centrifugo/publish", publish, methods=["POST"]),
        Route("/centrifugo/rpc", rpc, methods=["POST"]),
    ]
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="A backend answering the hub's HTTP proxy (see examples/proxy.toml).",
        epilog="The hub: examples/proxy.toml, or the EVENTCAST_PROXY_* variables.",
    )
    parser.add_argument("--port", type=int, default=3000, help="the port to listen on")
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
