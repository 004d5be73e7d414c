"""The hub as the target of :mod:`eventcast.ingest`'s consumers: the one adapter between them.

:class:`HubTarget` runs a consumed command through the HTTP API's method table
(:data:`eventcast.server.api.API_METHODS`), so a consumed ``publish`` behaves
exactly as ``POST /api/publish``, and keeps undecodable messages as dead
letters. The hub builds its consumers with it when it starts
(:attr:`Hub.consumers <eventcast.server.hub.Hub.consumers>`) and closes them
before its bus.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ..events import Event
from ..exceptions import (
    CommandRejectedError,
    EncodeError,
    InvalidTopicError,
    LogError,
)
from ..protocol import codes
from .api import API_METHODS
from .errors import CommandError

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["HubTarget"]

#: Dead letters of a consumer are recorded for the subscriber ``ingest:<name>``
#: on the topic ``ingest.<name>``. No bus subscriber has that id, so a redrive
#: leaves them in the store (it refuses them): fix the source, then publish again.
DEAD_LETTER_SUBSCRIBER: Final = "ingest:{}"
DEAD_LETTER_TOPIC: Final = "ingest.{}"


class HubTarget:
    """Runs consumed commands on a hub (see :class:`eventcast.ingest.base.CommandTarget`)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def command(
        self, method: str, params: Mapping[str, Any], *, idempotency_key: str | None
    ) -> None:
        """Run ``method`` as the HTTP API would; return once it is committed.

        Raises:
            CommandRejectedError: the command is invalid (it would fail again).
            LogError: the log failed (worth retrying).
            BusClosedError: the hub is closing (worth retrying elsewhere).
        """
        handler = API_METHODS.get(method)
        if handler is None:
            raise CommandRejectedError(f"unknown method {method[:64]!r}")
        body = dict(params)
        if idempotency_key is not None and not body.get("idempotency_key"):
            body["idempotency_key"] = idempotency_key
        try:
            result = await handler(self.hub, body)
        except CommandError as exc:
            raise CommandRejectedError(f"{method}: {exc.message}") from None
        except (EncodeError, InvalidTopicError) as exc:
            raise CommandRejectedError(f"{method}: {exc}") from None
        if method == "broadcast":
            _check_broadcast(result)

    def dead_letter(self, consumer: str, message: bytes, *, reason: str, error: str) -> None:
        """Record an unprocessable message in the bus's dead letters.

        The data is the body as text when it is UTF-8, else base64 (with the
        tag ``encoding=base64``).
        """
        try:
            data: str = message.decode("utf-8")
            tags: dict[str, str] = {}
        except UnicodeDecodeError:
            data = base64.b64encode(message).decode("ascii")
            tags = {"encoding": "base64"}
        event = Event(topic=DEAD_LETTER_TOPIC.format(consumer), data=data, tags=tags)
        self.hub.bus.dead_letters.add(
            event, DEAD_LETTER_SUBSCRIBER.format(consumer), reason, attempts=1, error=error
        )


def _check_broadcast(result: Any) -> None:
    """A broadcast answers per channel: an internal error is retried, a bad channel rejected.

    A retried broadcast stores nothing twice: the channels that succeeded
    dedupe on the idempotency key.
    """
    errors = [r["error"] for r in result.get("responses", ()) if "error" in r]
    if not errors:
        return
    if any(e.get("code") == codes.ERROR_INTERNAL.code for e in errors):
        raise LogError("broadcast: the log failed on some channels")
    raise CommandRejectedError(
        "broadcast: " + "; ".join(str(e.get("message", "")) for e in errors[:5])
    )
