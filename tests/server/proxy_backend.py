"""A backend for Centrifugo's HTTP proxy, written only from Centrifugo's proxy documentation.

Nothing here knows eventcast: every request is a ``POST`` of the JSON body
the documentation describes (``client``, ``transport``, ``protocol``,
``encoding``, ``user`` and the event's own fields), and every answer is one
of the documented ``{"result": …}``, ``{"error": {"code", "message"}}`` or
``{"disconnect": {"code", "reason"}}`` objects. The tests point the hub's
``proxy_*_endpoint`` settings here and check what it was sent.

Its rules (an application's, made up for the tests):

* connect: the session comes from the ``Cookie`` header, or from the
  connect ``data`` (``{"session": …}``); unknown sessions get disconnect
  4501; ``data.binary`` answers with ``b64data``; ``data.expire_in`` sets
  ``expire_at``;
* subscribe: ``secret:`` channels are refused with error 103;
* publish: the text is upper-cased and signed by the user;
* rpc: ``whoami``, ``fail`` (HTTP 500), ``custom-error`` (error 1000), the
  :data:`MALFORMED` answers,
  ``hang`` (no answer until the hub hangs up), anything else echoes;
* refresh and sub_refresh: extend once by ``extend`` seconds, then expire.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["ProxyBackend", "Received"]

SESSIONS = {"s-alice": "alice", "s-bob": "bob"}
#: Answers that break the documentation, by rpc method.
MALFORMED = {
    "not-json": b"<html>oops</html>",
    "neither": b"{}",
    "bad-error-code": b'{"error": {"code": 5000, "message": "out of range"}}',
    "bad-disconnect-code": b'{"disconnect": {"code": 1000, "reason": "not a disconnect code"}}',
    "bad-b64": b'{"result": {"b64data": "***"}}',
    "b64-not-json": b'{"result": {"b64data": "bm90IGpzb24="}}',
}


@dataclass
class Received:
    """One proxy request: which endpoint, its headers and JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    peer: tuple[str, int] | None


@dataclass
class ProxyBackend:
    """The backend's state: what it received, and how long it extends sessions."""

    extend: float = 0.3
    received: list[Received] = field(default_factory=list)
    refreshed: dict[str, int] = field(default_factory=dict)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [r.body for r in self.received if r.path == path]

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/centrifugo/connect", self.connect, methods=["POST"]),
                Route("/centrifugo/refresh", self.refresh, methods=["POST"]),
                Route("/centrifugo/subscribe", self.subscribe, methods=["POST"]),
                Route("/centrifugo/publish", self.publish, methods=["POST"]),
                Route("/centrifugo/sub_refresh", self.sub_refresh, methods=["POST"]),
                Route("/centrifugo/rpc", self.rpc, methods=["POST"]),
            ]
        )

    async def _read(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = await request.json()
        client = request.client
        self.received.append(
            Received(
                request.url.path,
                dict(request.headers),
                body,
                None if client is None else (client.host, client.port),
            )
        )
        return body

    async def connect(self, request: Request) -> Response:
        body = await self._read(request)
        data = body.get("data") or {}
        session = request.cookies.get("session") or data.get("session")
        user = SESSIONS.get(session or "")
        if user is None:
            return JSONResponse({"disconnect": {"code": 4501, "reason": "unauthorized"}})
        result: dict[str, Any] = {
            "user": user,
            "info": {"name": user.title()},
            "channels": [f"personal:{user}"],
            "subs": {"live:news": {"data": {"welcome": "news"}}},
            "meta": {"tenant": "acme"},
        }
        if data.get("binary"):
            result["b64data"] = base64.b64encode(b'{"hello":"' + user.encode() + b'"}').decode()
        else:
            result["data"] = {"hello": user}
        if "expire_in" in data:
            result["expire_at"] = int(time.time()) + int(data["expire_in"])
        return JSONResponse({"result": result})

    def _extend_once(self, key: str) -> Response:
        count = self.refreshed[key] = self.refreshed.get(key, 0) + 1
        if count == 1:
            return JSONResponse({"result": {"expire_at": int(time.time() + self.extend) + 1}})
        return JSONResponse({"result": {"expired": True}})

    async def refresh(self, request: Request) -> Response:
        body = await self._read(request)
        return self._extend_once(body["client"])

    async def sub_refresh(self, request: Request) -> Response:
        body = await self._read(request)
        return self._extend_once(f"{body['client']} {body['channel']}")

    async def subscribe(self, request: Request) -> Response:
        body = await self._read(request)
        if body["channel"].startswith("secret:"):
            return JSONResponse({"error": {"code": 103, "message": "permission denied"}})
        result: dict[str, Any] = {"data": {"joined": body["channel"]}}
        expire_in = (body.get("data") or {}).get("expire_in")
        if expire_in is not None:
            result["expire_at"] = int(time.time() + expire_in) + 1
        return JSONResponse({"result": result})

    async def publish(self, request: Request) -> Response:
        body = await self._read(request)
        data = body.get("data")
        if data is None:  # binary mode: the data is base64
            data = json.loads(base64.b64decode(body["b64data"]))
        text = data.get("text", "") if isinstance(data, dict) else str(data)
        return JSONResponse({"result": {"data": {"text": text.upper(), "by": body["user"]}}})

    async def rpc(self, request: Request) -> Response:
        body = await self._read(request)
        method = body.get("method", "")
        if method == "fail":
            return JSONResponse({"detail": "boom"}, status_code=500)
        if method == "custom-error":
            return JSONResponse({"error": {"code": 1000, "message": "custom error"}})
        if method in MALFORMED:
            return Response(MALFORMED[method], media_type="application/json")
        if method == "hang":
            # Never answer: wait until the hub gives up and drops the connection.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            return Response(status_code=204)
        if method == "whoami":
            answer = {"user": body["user"], "meta": body.get("meta")}
            return JSONResponse({"result": {"data": answer}})
        return JSONResponse({"result": {"data": {"method": method, "echo": body.get("data")}}})
