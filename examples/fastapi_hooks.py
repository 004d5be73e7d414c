"""A FastAPI app that lets its own logged-in users into the hub: no tokens, just its session cookie.

The hub is mounted at ``/realtime`` with in-process hooks (``AppHooks``):

* **connect**: the ``session`` cookie the app set at ``POST /login`` names the
  user; unknown sessions are refused. The user's personal channel
  ``user:<id>`` is joined server-side, and the connect reply lists the user's
  rooms.
* **subscribe**: ``room:<name>`` only for the room's members (the app's data
  decides, error 103 otherwise).
* **publish**: only ``{"text": "..."}`` of at most 500 characters, stored
  as ``{"user", "text"}`` (the author is the session's user, never the client's
  word).
* **rpc**: ``rooms`` answers the user's rooms.

Run it with uvicorn (other settings come from ``EVENTCAST_*`` variables or the
TOML file named by ``EVENTCAST_CONFIG``)::

    EVENTCAST_LOG_URL=sqlite:///./eventcast-data/rooms.db \\
        uvicorn fastapi_hooks:app --app-dir examples

    curl -c jar -X POST localhost:8000/login -H 'content-type: application/json' \\
        -d '{"user": "alice"}'
    # then a browser page of the same origin connects to
    # ws://localhost:8000/realtime/connection/websocket: the cookie goes along.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from eventcast.asgi import (
    AppHooks,
    CommandError,
    ConnectRequest,
    ConnectResult,
    PublishRequest,
    PublishResult,
    RPCRequest,
    RPCResult,
    SubscribeRequest,
    SubscribeResult,
    create_app,
    hub_lifespan,
)
from eventcast.protocol import codes
from eventcast.server.config import Settings

#: The application's data (a database in a real application).
USERS = {"alice": "Alice Liddell", "bob": "Bob Dylan", "carol": "Carol King"}
ROOMS = {"lobby": {"alice", "bob", "carol"}, "staff": {"alice"}}
#: Session id -> user id, filled by POST /login.
SESSIONS: dict[str, str] = {}
COOKIE = "session"

NAMESPACES: list[dict[str, Any]] = [
    # Rooms keep their recent messages; members read them.
    {"name": "room", "history_size": 50, "history_ttl": "1h", "allow_history_for_subscriber": True},
    # Personal channels are joined server-side only (nobody subscribes to them).
    {"name": "user"},
]

hooks = AppHooks(timeout=2.0)


class Login(BaseModel):
    user: str


def rooms_of(user: str) -> list[str]:
    return sorted(name for name, members in ROOMS.items() if user in members)


@hooks.on_connect
async def connect(request: ConnectRequest) -> ConnectResult:
    user = SESSIONS.get(request.cookies.get(COOKIE, ""))
    if user is None:
        raise CommandError(codes.DISCONNECT_INVALID_TOKEN)  # log in first
    return ConnectResult(
        user=user,
        info={"name": USERS[user]},
        channels=[f"user:{user}"],
        data={"rooms": rooms_of(user)},
    )


@hooks.on_subscribe
async def subscribe(request: SubscribeRequest) -> SubscribeResult:
    namespace, _, room = request.channel.partition(":")
    if namespace != "room" or request.user not in ROOMS.get(room, ()):
        raise CommandError(codes.ERROR_PERMISSION_DENIED)
    return SubscribeResult(data={"members": sorted(ROOMS[room])})


@hooks.on_publish
async def publish(request: PublishRequest) -> PublishResult:
    text = request.data.get("text") if isinstance(request.data, dict) else None
    if not isinstance(text, str) or not 0 < len(text) <= 500:
        raise CommandError(codes.ERROR_BAD_REQUEST.with_message("send {'text': '...'}"))
    return PublishResult(data={"user": request.user, "text": text})


@hooks.on_rpc
async def rpc(request: RPCRequest) -> RPCResult:
    if request.method == "rooms":
        return RPCResult(data=rooms_of(request.user))
    raise CommandError(codes.ERROR_METHOD_NOT_FOUND)


def build(settings: Settings) -> FastAPI:
    """The application, with the hub mounted at ``/realtime``."""
    realtime = create_app(settings, hooks=hooks)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with hub_lifespan(realtime):  # a mounted app's lifespan is not run by Starlette
            yield

    app = FastAPI(title="rooms", lifespan=lifespan)
    app.state.hub = realtime.hub
    app.mount("/realtime", realtime)

    @app.post("/login")
    async def login(body: Login, response: Response) -> dict[str, Any]:
        """Log in (no password: an example); the session cookie authorizes the hub too."""
        if body.user not in USERS:
            raise HTTPException(status_code=403, detail="unknown user")
        session = secrets.token_urlsafe(24)
        SESSIONS[session] = body.user
        response.set_cookie(COOKIE, session, httponly=True, samesite="lax")
        return {"user": body.user, "rooms": rooms_of(body.user)}

    @app.post("/logout")
    async def logout(request: Request, response: Response) -> dict[str, Any]:
        SESSIONS.pop(request.cookies.get(COOKIE, ""), None)
        response.delete_cookie(COOKIE)
        return {}

    @app.post("/rooms/{room}/announce")
    async def announce(room: str, body: dict[str, Any]) -> dict[str, Any]:
        """The server speaks in a room (in process: no HTTP hop to the hub)."""
        if room not in ROOMS:
            raise HTTPException(status_code=404, detail="no such room")
        event = await realtime.hub.publish(f"room:{room}", {"user": "server", **body})
        return {"offset": event.offset}

    return app


app = build(Settings.load(os.environ.get("EVENTCAST_CONFIG") or None, namespaces=NAMESPACES))
