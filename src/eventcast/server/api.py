"""The HTTP server API: ``POST /api/<method>``, compatible with Centrifugo's (and ``cent``).

Authenticate with ``X-API-Key: <key>`` or ``Authorization: apikey <key>``.
Answers are ``{"result": …}`` or ``{"error": {"code", "message"}}`` with HTTP
200, as Centrifugo does; transport-level problems use HTTP statuses: 401 for a
missing or wrong key, 404 for an unknown method, 400 for a body that is not a
JSON object (or nested too deeply), 413 for a body over ``max_body_size``, 408
for a body slower than ``body_timeout``. With no API key configured the API is
disabled (every call gets 401).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..exceptions import BackplaneError, EncodeError, EventcastError, LogError
from ..protocol import codes
from ..protocol.codes import ClientError
from ..protocol.frames import MAX_INT, HistoryResult, int_in_range
from ._http import BodyError, read_json
from .admin import disconnect_of
from .errors import CommandError
from .httpio import header

if TYPE_CHECKING:
    from ..events import Event
    from .hub import Hub

__all__ = ["API_METHODS", "ApiEndpoint", "answer_api", "api_method", "count_api"]

logger = logging.getLogger("eventcast.api")

_encode = msgspec.json.Encoder().encode

Method = Callable[["Hub", Any], Awaitable[Any]]
_P = TypeVar("_P", bound=msgspec.Struct)


def _bad(message: str) -> CommandError:
    return CommandError(codes.ERROR_BAD_REQUEST.with_message(message))


#: An answer of the API: status, JSON body, extra headers.
Answer = tuple[int, Any, dict[str, str] | None]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Answer:
    return status, body, headers


def _count(value: object, name: str) -> int:
    """A count or offset from a request: an int in ``[0, MAX_INT]``."""
    if not int_in_range(value):
        raise _bad(f"{name} must be an int in 0..{MAX_INT}")
    return value


def _str(params: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _bad(f"{name} required")
        return ""
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    return value


class _Publication(msgspec.Struct, kw_only=True):
    """What a publication carries besides its channels (``publish``, ``broadcast``).

    The one statement of these parameters' types: a body that fits is decoded
    straight into it (``_BODY_SHAPES``), any other is converted to it
    (:func:`_params`), so both are checked by the same rules.
    """

    data: Any
    tags: dict[str, str] | None = None
    idempotency_key: str | None = None


class PublishParams(_Publication, kw_only=True):
    """The parameters of ``publish`` (unknown ones are ignored, as Centrifugo does)."""

    channel: str = ""


class BroadcastParams(_Publication, kw_only=True):
    """The parameters of ``broadcast``; each channel is checked on its own."""

    channels: list[Any] = []


class _PublishCommand(msgspec.Struct, forbid_unknown_fields=True):
    publish: PublishParams


class _PublishBatch(msgspec.Struct):
    """The common body of ``batch``: publications only. Any other body is decoded
    plainly and each command checked on its own (:func:`_batch_command`)."""

    commands: list[_PublishCommand]
    parallel: bool = False


def _params(params: dict[str, Any] | _P, shape: type[_P]) -> _P:
    """A method's parameters as ``shape`` (decoded so already, or converted from a dict);
    107 with msgspec's account of what is wrong."""
    if isinstance(params, shape):
        return params
    try:
        return msgspec.convert(params, shape)
    except msgspec.ValidationError as exc:
        raise _bad(str(exc)) from None


def _published(event: Event) -> dict[str, Any]:
    if event.offset:
        return {"offset": event.offset, "epoch": event.epoch}
    return {}


async def _publish(hub: Hub, channel: str, params: _Publication) -> dict[str, Any]:
    event = await hub.publish(
        channel, params.data, tags=params.tags, idempotency_key=params.idempotency_key or None
    )
    return _published(event)


def _publish_now(hub: Hub, params: PublishParams) -> dict[str, Any] | None:
    """A batch's ``publish`` done without awaiting (a live channel the bus knows, no
    tags or key): its reply, or ``None`` to run it the awaited way."""
    if params.tags is not None or params.idempotency_key:
        return None
    try:
        event = hub.publish_now(params.channel, params.data)
    except CommandError as exc:
        return {"error": _error(exc)}
    return None if event is None else {"publish": _published(event)}


async def api_publish(hub: Hub, params: dict[str, Any] | PublishParams) -> Any:
    publish = _params(params, PublishParams)
    return await _publish(hub, publish.channel, publish)


async def api_broadcast(hub: Hub, params: dict[str, Any] | BroadcastParams) -> Any:
    broadcast = _params(params, BroadcastParams)
    if not broadcast.channels:
        raise _bad("channels required")
    responses: list[dict[str, Any]] = []
    for channel in broadcast.channels:
        try:
            if not isinstance(channel, str):
                raise _bad("channel must be a string")
            responses.append({"result": await _publish(hub, channel, broadcast)})
        except CommandError as exc:
            responses.append({"error": _error(exc)})
        except LogError as exc:
            logger.warning("broadcast to %r failed: %s", channel, exc)
            responses.append({"error": _error(codes.ERROR_INTERNAL)})
    return {"responses": responses}


def history_params(params: dict[str, Any]) -> tuple[int, tuple[int, str] | None, bool]:
    """The ``limit``, ``since`` and ``reverse`` of a history call.

    Raises:
        CommandError: 107 when one is malformed or out of range.
    """
    limit = _count(params.get("limit") or 0, "limit")
    since_raw = params.get("since")
    since = None
    if since_raw is not None:
        if not isinstance(since_raw, dict):
            raise _bad("since must be an object")
        offset, epoch = since_raw.get("offset", 0), since_raw.get("epoch", "")
        if not isinstance(epoch, str):
            raise _bad("malformed since")
        since = (_count(offset, "since.offset"), epoch)
    return limit, since, bool(params.get("reverse"))


async def api_history(hub: Hub, params: dict[str, Any]) -> Any:
    channel = _str(params, "channel")
    hub.permissions.channel(channel)
    limit, since, reverse = history_params(params)
    result: HistoryResult = await hub.history(channel, since=since, limit=limit, reverse=reverse)
    if result.publications is None:
        result.publications = []
    return result


async def api_history_remove(hub: Hub, params: dict[str, Any]) -> Any:
    channel = _str(params, "channel")
    hub.permissions.channel(channel)
    log = hub.bus.log
    if log is None or hub.bus.namespace(channel).history_size <= 0:
        raise CommandError(codes.ERROR_NOT_AVAILABLE)
    await log.truncate(channel)
    return {}


def _presence_channel(hub: Hub, params: dict[str, Any]) -> str:
    channel = _str(params, "channel")
    if not hub.permissions.channel(channel).presence:
        raise CommandError(codes.ERROR_NOT_AVAILABLE)
    return channel


async def api_presence(hub: Hub, params: dict[str, Any]) -> Any:
    result = await hub.presence_of(_presence_channel(hub, params))
    if result.presence is None:
        result.presence = {}
    return result


async def api_presence_stats(hub: Hub, params: dict[str, Any]) -> Any:
    result = await hub.presence_stats_of(_presence_channel(hub, params))
    return {"num_clients": result.num_clients, "num_users": result.num_users}


def _time(params: dict[str, Any], name: str, *, future: bool = False) -> float | None:
    """A Unix time in seconds (``0`` or absent: ``None``)."""
    value = params.get(name)
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _bad(f"{name} must be a Unix time in seconds")
    if future and value <= time.time():
        raise _bad(f"{name} must be in the future")
    return float(value)


def _bool(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise _bad(f"{name} must be a boolean")
    return value


def _answered(missing: list[str], result: dict[str, Any] | None = None) -> dict[str, Any]:
    """An answer, naming the nodes that did not answer in time (an eventcast extension)."""
    result = {} if result is None else result
    if missing:
        result["missing_nodes"] = missing
    return result


async def api_channels(hub: Hub, params: dict[str, Any]) -> Any:
    pattern = params.get("pattern") or ""
    if not isinstance(pattern, str):
        raise _bad("pattern must be a string")
    answer = await hub.cluster.channels(pattern)
    result: dict[str, Any] = {
        "channels": {name: {"num_clients": n} for name, n in sorted(answer.channels.items())}
    }
    if answer.truncated:
        result["truncated"] = True
    return _answered(answer.missing, result)


async def api_info(hub: Hub, params: dict[str, Any]) -> Any:
    return {"nodes": hub.cluster.info()}


async def api_disconnect(hub: Hub, params: dict[str, Any]) -> Any:
    user = _str(params, "user", required=False)
    client = _str(params, "client", required=False) or None
    if not user and not client:
        raise _bad("user required")
    spec = params.get("disconnect") or {}
    if not isinstance(spec, dict):
        raise _bad("disconnect must be an object")
    try:
        disconnect = disconnect_of(
            spec.get("code") or codes.DISCONNECT_FORCE_NO_RECONNECT.code,
            spec.get("reason") or codes.DISCONNECT_FORCE_NO_RECONNECT.reason,
        )
    except ValueError as exc:
        raise _bad(str(exc)) from None
    whitelist = params.get("whitelist") or []
    if not isinstance(whitelist, list) or not all(isinstance(c, str) for c in whitelist):
        raise _bad("whitelist must be a list of client ids")
    outcome = await hub.cluster.disconnect(
        user,
        disconnect,
        client,
        session=_str(params, "session", required=False) or None,
        whitelist=whitelist,
    )
    return _answered(outcome.missing)


async def api_unsubscribe(hub: Hub, params: dict[str, Any]) -> Any:
    outcome = await hub.cluster.unsubscribe(
        _str(params, "user"),
        _str(params, "channel"),
        _str(params, "client", required=False) or None,
        session=_str(params, "session", required=False) or None,
    )
    return _answered(outcome.missing)


async def api_subscribe(hub: Hub, params: dict[str, Any]) -> Any:
    user = _str(params, "user")
    channel = _str(params, "channel")
    outcome = await hub.cluster.subscribe(
        user,
        channel,
        _str(params, "client", required=False) or None,
        session=_str(params, "session", required=False) or None,
    )
    return _answered(outcome.missing)


async def api_refresh(hub: Hub, params: dict[str, Any]) -> Any:
    outcome = await hub.cluster.refresh(
        _str(params, "user"),
        _time(params, "expire_at"),
        _str(params, "client", required=False) or None,
        session=_str(params, "session", required=False) or None,
        expired=_bool(params, "expired"),
    )
    return _answered(outcome.missing)


async def api_block_user(hub: Hub, params: dict[str, Any]) -> Any:
    outcome = await hub.cluster.block_user(
        _str(params, "user"), _time(params, "expire_at", future=True)
    )
    return _answered(outcome.missing)


async def api_unblock_user(hub: Hub, params: dict[str, Any]) -> Any:
    outcome = await hub.cluster.unblock_user(_str(params, "user"))
    return _answered(outcome.missing)


async def api_revoke_token(hub: Hub, params: dict[str, Any]) -> Any:
    outcome = await hub.cluster.revoke_token(
        _str(params, "uid"), _time(params, "expire_at", future=True)
    )
    return _answered(outcome.missing)


async def api_invalidate_user_tokens(hub: Hub, params: dict[str, Any]) -> Any:
    channel = _str(params, "channel", required=False)
    if channel:
        hub.permissions.channel(channel)
    outcome = await hub.cluster.invalidate_user_tokens(
        _str(params, "user"),
        _time(params, "issued_before"),
        _time(params, "expire_at", future=True),
        channel,
    )
    return _answered(outcome.missing)


#: A batch's command, parsed: method, handler, parameters (:class:`PublishParams`
#: for ``publish``), or the error reply it gets.
_Parsed = tuple[str, Method, Any] | dict[str, Any]


def _batch_command(command: Any) -> _Parsed:
    """A batch's command as ``(method, handler, params)``, or the error reply it gets."""
    if not isinstance(command, dict) or len(command) != 1:
        return {"error": _error(codes.ERROR_BAD_REQUEST)}
    ((method, body),) = command.items()
    handler = API_METHODS.get(method)
    if handler is None or method == "batch" or not isinstance(body, dict):
        return {"error": _error(codes.ERROR_METHOD_NOT_FOUND)}
    if method == "publish":
        try:
            return method, handler, _params(body, PublishParams)
        except CommandError as exc:
            return {"error": _error(exc)}
    return method, handler, body


async def _run_command(hub: Hub, parsed: _Parsed) -> dict[str, Any]:
    """Run one of a batch's commands; its reply."""
    if isinstance(parsed, dict):
        return parsed
    method, handler, params = parsed
    try:
        return {method: await handler(hub, params)}
    except CommandError as exc:
        return {"error": _error(exc)}
    except LogError:
        return {"error": _error(codes.ERROR_INTERNAL)}


async def api_batch(hub: Hub, params: dict[str, Any] | _PublishBatch) -> Any:
    parsed: list[_Parsed]
    if isinstance(params, _PublishBatch):  # publications only, decoded straight into structs
        parsed = [("publish", api_publish, c.publish) for c in params.commands]
        parallel = params.parallel
    else:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _bad("commands required")
        parsed = [_batch_command(c) for c in commands]
        parallel = bool(params.get("parallel"))
    if parallel:
        return {"replies": list(await asyncio.gather(*(_run_command(hub, p) for p in parsed)))}
    # In order; a publication to a live channel the bus knows needs no
    # coroutine of its own (see _publish_now).
    replies = []
    for command in parsed:
        reply = None
        if not isinstance(command, dict) and command[0] == "publish":
            reply = _publish_now(hub, command[2])
        replies.append(reply or await _run_command(hub, command))
    return {"replies": replies}


async def api_dead_letters(hub: Hub, params: dict[str, Any]) -> Any:
    """eventcast extension: list dead letters (filters: subscriber, reason, topic, limit)."""
    limit = _count(params.get("limit", 100), "limit")
    found = hub.bus.dead_letters.list(
        subscriber=_str(params, "subscriber", required=False) or None,
        reason=_str(params, "reason", required=False) or None,
        topic=_str(params, "topic", required=False) or None,
    )
    letters = found[-limit:] if limit else []
    return {
        "dead_letters": [letter.to_json() for letter in letters],
        "total": len(hub.bus.dead_letters),
    }


async def api_dead_letters_redrive(hub: Hub, params: dict[str, Any]) -> Any:
    """eventcast extension: redrive dead letters (by ``ids``, ``subscriber`` or ``reason``)."""
    ids = params.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(int_in_range(i) for i in ids)):
        raise _bad("ids must be a list of ints")
    count = await hub.bus.dead_letters.redrive(
        ids=ids,
        subscriber=_str(params, "subscriber", required=False) or None,
        reason=_str(params, "reason", required=False) or None,
    )
    return {"redriven": count}


API_METHODS: dict[str, Method] = {
    "publish": api_publish,
    "broadcast": api_broadcast,
    "batch": api_batch,
    "history": api_history,
    "history_remove": api_history_remove,
    "presence": api_presence,
    "presence_stats": api_presence_stats,
    "channels": api_channels,
    "info": api_info,
    "disconnect": api_disconnect,
    "unsubscribe": api_unsubscribe,
    "subscribe": api_subscribe,
    "refresh": api_refresh,
    "block_user": api_block_user,
    "unblock_user": api_unblock_user,
    "revoke_token": api_revoke_token,
    "invalidate_user_tokens": api_invalidate_user_tokens,
    "dead_letters": api_dead_letters,
    "dead_letters_redrive": api_dead_letters_redrive,
}


#: Typed decoders of the bodies with a common form (tried before plain JSON).
_BODY_SHAPES: dict[str, msgspec.json.Decoder[Any]] = {
    "publish": msgspec.json.Decoder(PublishParams),
    "broadcast": msgspec.json.Decoder(BroadcastParams),
    "batch": msgspec.json.Decoder(_PublishBatch),
}


def _error(error: ClientError | CommandError) -> dict[str, Any]:
    """The ``{"code", "message"}`` of an answer (a disconnect answers as a bad request)."""
    if isinstance(error, CommandError):
        answer = error.answer
        error = answer if isinstance(answer, ClientError) else codes.ERROR_BAD_REQUEST
    return {"code": error.code, "message": error.message}


def api_method(path: str) -> str | None:
    """The method a path of the API names (``/api/<method>``), or ``None``."""
    if path.startswith("/api/"):
        method = path[5:]
        if method and "/" not in method:
            return method
    return None


def count_api(hub: Hub, method: str, result: str) -> None:
    """Count one HTTP API call for the metrics (unknown methods under ``unknown``)."""
    key = (method if method in API_METHODS else "unknown", result)
    hub.api_calls[key] = hub.api_calls.get(key, 0) + 1


def _authorized(scope: Scope, key: str | None) -> bool:
    """``X-API-Key: <key>``, else ``Authorization: apikey <key>`` (the first of each counts)."""
    if not key:
        return False
    given = header(scope, b"x-api-key")
    if given is None:
        scheme, _, value = (header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "apikey":
            return False
        given = value.strip()
    return hmac.compare_digest(given.encode(), key.encode())


class ApiEndpoint:
    """``POST /api/<method>``: a bare ASGI endpoint (no response object per call).

    The hub's app also calls it ahead of its router (see
    :meth:`~eventcast.server.app.HubApp.__call__`), behind the same
    middleware; ``scope["path_params"]["method"]`` names the method.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["path_params"].get("method", "")
        status, body, headers = await answer_api(self._hub, method, Request(scope, receive))
        encoded = _encode(body)
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(encoded)).encode()),
                    (b"content-type", b"application/json"),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": encoded})


async def answer_api(hub: Hub, method: str, request: Request) -> Answer:
    """Answer one call of the API: authenticate, read the body, run the method."""
    key = hub.settings.api_key
    secret = key.get_secret_value() if key is not None else None
    result_status = "error"
    try:
        if not _authorized(request.scope, secret):
            return _json(401, {"error": {"code": 101, "message": "unauthorized"}})
        handler = API_METHODS.get(method)
        if handler is None:
            return _json(404, {"error": _error(codes.ERROR_METHOD_NOT_FOUND)})
        try:
            params = await read_json(request, empty={}, shape=_BODY_SHAPES.get(method))
        except BodyError as exc:
            error = {"code": codes.ERROR_BAD_REQUEST.code, "message": exc.message}
            return _json(exc.status, {"error": error}, exc.headers)
        if not isinstance(params, dict | msgspec.Struct):
            return _json(400, {"error": {"code": 107, "message": "body must be a JSON object"}})
        try:
            result = await handler(hub, params)
        except CommandError as exc:
            return _json(200, {"error": _error(exc)})
        except EncodeError as exc:
            return _json(200, {"error": _error(codes.ERROR_BAD_REQUEST.with_message(str(exc)))})
        except (LogError, BackplaneError) as exc:
            logger.warning("API %s failed: %s", method, exc)
            return _json(200, {"error": _error(codes.ERROR_INTERNAL)})
        except EventcastError as exc:
            logger.warning("API %s failed: %s", method, exc)
            return _json(200, {"error": _error(codes.ERROR_BAD_REQUEST.with_message(str(exc)))})
        except Exception:
            logger.exception("API %s failed", method)
            return _json(500, {"error": _error(codes.ERROR_INTERNAL)})
        result_status = "ok"
        if method == "batch":
            return _json(200, result)
        return _json(200, {"result": result})
    finally:
        count_api(hub, method, result_status)
