"""An AsyncAPI 3.0 document describing a hub: ``eventcast asyncapi`` and ``GET /asyncapi.json``.

The document is built from the hub's settings alone:

* **servers**: the WebSocket endpoint (Centrifuge client protocol, JSON) and
  the SSE endpoint, on the host given (the request's ``Host`` for the route);
* **channels**: one per namespace, addressed ``<namespace>:{channel}``
  (``{channel}`` for the ``""`` namespace), whose one message is a
  publication with the namespace's ``schema`` as payload (any JSON value when
  it declares none);
* **operations**: ``receive`` (subscribe) on every channel, and ``send``
  (publish) where the namespace lets clients publish; each says who may,
  and the namespace's permissions are in the ``x-eventcast-permissions``
  extension (history, presence, recovery, patterns).

Definitions a schema carries in ``$defs`` (msgspec and pydantic put nested
types there) are moved to ``components.schemas`` and their references
rewritten, so every ``$ref`` resolves within the document.
"""

from __future__ import annotations

import copy
import re
from typing import TYPE_CHECKING, Any, Final

from .. import __version__
from ..schema import Schema

if TYPE_CHECKING:
    from .config import NamespaceConfig, Settings

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document"]

#: The AsyncAPI version of the documents.
ASYNCAPI_VERSION: Final = "3.0.0"

_DEFS: Final = "#/$defs/"
_COMPONENTS: Final = "#/components/schemas/"
_ID: Final = re.compile(r"[^\w.\-]")


def asyncapi_document(
    settings: Settings, *, host: str = "localhost:8000", secure: bool = False
) -> dict[str, Any]:
    """Return the AsyncAPI 3.0 document of a hub with these settings.

    Args:
        settings: the hub's settings (its namespaces and permissions).
        host: ``host[:port]`` clients reach the hub at.
        secure: whether clients use ``wss``/``https``.
    """
    components: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    namespaces = {ns.name: ns for ns in settings.namespaces}
    if "" not in namespaces:
        default = settings.namespace("")
        assert default is not None  # the "" namespace always has options
        namespaces[""] = default
    for name in sorted(namespaces):
        ns = namespaces[name]
        key = _channel_id(name)
        channels[key] = _channel(ns, components)
        ref = {"$ref": f"#/channels/{key}"}
        message = {"$ref": f"#/channels/{key}/messages/publication"}
        operations[f"{key}.receive"] = {
            "action": "receive",
            "channel": ref,
            "messages": [message],
            "summary": "Subscribe and receive the channel's publications.",
            "description": _who_subscribes(ns, settings),
        }
        publishers = _who_publishes(ns)
        if publishers:
            operations[f"{key}.send"] = {
                "action": "send",
                "channel": ref,
                "messages": [message],
                "summary": "Publish into the channel.",
                "description": publishers,
            }
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"eventcast hub {settings.node_name}",
            "version": __version__,
            "description": (
                "Channels of an eventcast hub. Clients speak the Centrifuge client protocol "
                "(JSON) over WebSocket, or read Server-Sent Events; a channel's name is its "
                "namespace, ':', and the rest (channels without a namespace belong to the "
                "'default' channel here)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": _servers(host, secure),
        "channels": channels,
        "operations": operations,
        "components": {
            "securitySchemes": {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": (
                        "The connection token: in the connect command (WebSocket), or as "
                        f"?access_token= or the {settings.sse_cookie} cookie (SSE)."
                    ),
                }
            },
        },
    }
    if components:
        document["components"]["schemas"] = components
    return document


def _servers(host: str, secure: bool) -> dict[str, Any]:
    security = [{"$ref": "#/components/securitySchemes/token"}]
    return {
        "websocket": {
            "host": host,
            "protocol": "wss" if secure else "ws",
            "pathname": "/connection/websocket",
            "title": "WebSocket",
            "description": "The Centrifuge client protocol, JSON encoding.",
            "security": security,
        },
        "sse": {
            "host": host,
            "protocol": "https" if secure else "http",
            "pathname": "/connection/sse",
            "title": "Server-Sent Events",
            "description": "Receive only: GET /connection/sse?topic=<channel> (repeatable).",
            "security": security,
        },
    }


def _channel_id(name: str) -> str:
    return "default" if name == "" else _ID.sub("_", name)


def _channel(ns: NamespaceConfig, components: dict[str, Any]) -> dict[str, Any]:
    schema = ns.data_schema
    payload: dict[str, Any] = {}
    title = "any JSON value"
    if isinstance(schema, Schema):
        payload = _hoist(schema.json_schema, components)
        title = schema.name
    address = "{channel}" if ns.name == "" else f"{ns.name}:{{channel}}"
    return {
        "address": address,
        "title": ns.name or "default",
        "description": _describe(ns),
        "parameters": {
            "channel": {
                "description": (
                    "The rest of the channel name: dot-separated segments of "
                    "[A-Za-z0-9_-@#,=+]"
                    + (" (or a pattern with * and >)" if ns.allow_patterns else "")
                )
            }
        },
        "messages": {
            "publication": {
                "name": "publication",
                "title": f"A publication ({title})",
                "contentType": "application/json",
                "payload": payload,
            }
        },
        "x-eventcast-permissions": _permissions(ns),
    }


def _describe(ns: NamespaceConfig) -> str:
    parts = []
    if ns.history_size > 0:
        parts.append(
            f"Durable: each channel keeps its last {ns.history_size} publications"
            + (f" for {ns.history_ttl:g} s" if ns.history_ttl > 0 else "")
            + "; subscribers recover missed publications on reconnect."
        )
    else:
        parts.append("Live only: no history.")
    if ns.presence:
        parts.append("Presence is tracked" + (" with join/leave pushes." if ns.join_leave else "."))
    if ns.data_schema is not None:
        parts.append("Publications must match the message's payload schema (else error 107).")
    return " ".join(parts)


def _permissions(ns: NamespaceConfig) -> dict[str, Any]:
    return {
        key: value
        for key, value in ns.model_dump(exclude={"name", "data_schema"}).items()
        if isinstance(value, bool | int | float)
    }


def _who_subscribes(ns: NamespaceConfig, settings: Settings) -> str:
    who = []
    if ns.allow_subscribe_for_client:
        who.append("any authenticated client")
    if ns.allow_subscribe_for_anonymous and settings.allow_anonymous:
        who.append("anonymous clients")
    if ns.allow_user_limited_channels:
        who.append("the users listed after '#' in the channel name")
    who.append("a client with a subscription token for the channel")
    return "Allowed for: " + "; ".join(who) + "."


def _who_publishes(ns: NamespaceConfig) -> str:
    who = []
    if ns.allow_publish_for_client:
        who.append("any authenticated client")
    elif ns.allow_publish_for_subscriber:
        who.append("the channel's subscribers")
    if ns.allow_publish_for_anonymous:
        who.append("anonymous clients")
    return "Allowed for: " + "; ".join(who) + "." if who else ""


def _hoist(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with its ``$defs`` moved into ``components`` (refs rewritten)."""
    schema = copy.deepcopy(schema)
    definitions = schema.pop("$defs", None) or {}
    for name, definition in definitions.items():
        components[name] = _rewrite(definition)
    hoisted: dict[str, Any] = _rewrite(schema)
    return hoisted


def _rewrite(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                _COMPONENTS + value[len(_DEFS) :]
                if key == "$ref" and isinstance(value, str) and value.startswith(_DEFS)
                else _rewrite(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    return node
