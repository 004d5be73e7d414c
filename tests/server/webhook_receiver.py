"""A webhook receiver written from the Standard Webhooks specification, in-process or as a process.

It checks each request's ``webhook-signature`` (none without a secret) (HMAC-SHA256 of
``{webhook-id}.{webhook-timestamp}.{body}``, the secret base64-decoded after
``whsec_``), then records ``{"id", "header_id", "valid", "type", "data"}``:
in memory (:class:`Receiver`), or appended as one JSON line to a file and
flushed before answering (``python -m tests.server.webhook_receiver PORT FILE
SECRET``), so a receiver killed with SIGKILL has kept everything it answered.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["Receiver", "verify"]


def verify(secret: str, headers: Any, body: bytes) -> bool:
    """Whether the request's ``webhook-signature`` is valid for ``secret``."""
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [part.partition(",") for part in headers.get("webhook-signature", "").split()]
    return any(v == "v1" and hmac.compare_digest(sig, expected) for v, _, sig in given)


def _record(secret: str, request: Request, body: bytes) -> dict[str, Any]:
    event = json.loads(body)
    return {
        "id": event["id"],
        "header_id": request.headers.get("webhook-id"),
        # Without a secret, requests must come unsigned.
        "valid": (
            verify(secret, request.headers, body)
            if secret
            else "webhook-signature" not in request.headers
        ),
        "type": event["type"],
        "node": event["node"],
        "data": event["data"],
    }


def app(secret: str, keep: Callable[[dict[str, Any]], None]) -> Starlette:
    """The receiver's app: ``POST /hooks`` (401 for a bad signature), ``GET /health``."""

    async def hooks(request: Request) -> Response:
        record = _record(secret, request, await request.body())
        keep(record)
        return Response(status_code=204 if record["valid"] else 401)

    async def health(request: Request) -> Response:
        return Response("ok")

    return Starlette(routes=[Route("/hooks", hooks, methods=["POST"]), Route("/health", health)])


class Receiver:
    """An in-process receiver: the records, and waiting for them."""

    def __init__(self, secret: str) -> None:
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.app = app(secret, self._keep)

    def _keep(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]

    async def wait(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds after some record arrived (bounded)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def main(argv: list[str]) -> None:
    import uvicorn

    port, path, secret = int(argv[0]), Path(argv[1]), argv[2]
    out = path.open("a", encoding="utf-8")

    def keep(record: dict[str, Any]) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    uvicorn.run(app(secret, keep), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1:])
