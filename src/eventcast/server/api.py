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
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..events import Event
from ..exceptions import BackplaneError, EncodeError, EventcastError, LogError
from ..protocol import codes
from ..protocol.codec import BOUNDED_DEPTH, Shape, bounded_json
from ..protocol.codes import ClientError
from ..protocol.frames import MAX_INT, HistoryResult, int_in_range
from ._http import BodyError, json_body, read_json
from .admin import disconnect_of
from .errors import CommandError

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "API_METHODS",
    "API_TARGETS",
    "ApiEndpoint",
    "answer_api",
    "answer_api_body",
    "api_method",
    "api_response",
    "api_response_head",
    "count_api",
    "run_api",
]

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


class _Publication(msgspec.Struct, kw_only=True, gc=False):
    """What a publication carries besides its channels (``publish``, ``broadcast``).

    The one statement of these parameters' types: a body that fits is decoded
    straight into it (``_BODY_SHAPES``), any other is converted to it
    (:func:`_params`), so both are checked by the same rules.

    The parameter structs are not tracked by the garbage collector (``gc=False``:
    one allocation cheaper each, and no collections triggered by a large batch):
    they hold only values decoded from a body, which cannot refer back to them.
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


class _PublishCommand(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    publish: PublishParams


class _PublishBatch(msgspec.Struct, gc=False):
    """The common body of ``batch``: publications only. Any other body is decoded
    plainly and each command checked on its own (:func:`_batch_command`)."""

    commands: Sequence[_PublishCommand]
    parallel: bool = False


# The bounded forms of these bodies (see Shape): the same structs, with every JSON
# value nested at most BOUNDED_DEPTH levels and no field they do not name.
if TYPE_CHECKING:
    _Bounded = Any
else:
    _Bounded = bounded_json(BOUNDED_DEPTH)


class _BoundedPublish(PublishParams, kw_only=True, forbid_unknown_fields=True):
    data: _Bounded


class _BoundedBroadcast(BroadcastParams, kw_only=True, forbid_unknown_fields=True):
    data: _Bounded
    channels: list[_Bounded] = []


class _BoundedPublishCommand(_PublishCommand, forbid_unknown_fields=True):
    publish: _BoundedPublish


class _BoundedPublishBatch(_PublishBatch, forbid_unknown_fields=True):
    commands: Sequence[_BoundedPublishCommand]


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


def _published_now(
    hub: Hub, channel: str, params: _Publication
) -> dict[str, Any] | Coroutine[Any, Any, dict[str, Any]]:
    """A publication's result when it is done at once (a live channel, no tags or
    key), else the coroutine of it (see :meth:`Hub.publish_now`).

    Raises:
        CommandError: as :meth:`Hub.publish`, for what is checked at once.
    """
    if params.tags is not None or params.idempotency_key:
        pending = hub.publish(
            channel, params.data, tags=params.tags, idempotency_key=params.idempotency_key or None
        )
        return _published_later(pending)
    event = hub.publish_now(channel, params.data)
    return _published(event) if isinstance(event, Event) else _published_later(event)


async def _published_later(pending: Awaitable[Event]) -> dict[str, Any]:
    return _published(await pending)


async def _settled(result: Any) -> Any:
    """The result of a method's ``_now`` form, awaited when it is a coroutine."""
    return await result if isinstance(result, CoroutineType) else result


async def api_publish(hub: Hub, params: dict[str, Any] | PublishParams) -> Any:
    return await _settled(api_publish_now(hub, params))


def api_publish_now(hub: Hub, params: dict[str, Any] | PublishParams) -> Any:
    """``publish``: its result at once when it needs no await, else a coroutine of it."""
    publish = _params(params, PublishParams)
    return _published_now(hub, publish.channel, publish)


async def api_broadcast(hub: Hub, params: dict[str, Any] | BroadcastParams) -> Any:
    broadcast = _params(params, BroadcastParams)
    if not broadcast.channels:
        raise _bad("channels required")
    responses: list[dict[str, Any]] = []
    for channel in broadcast.channels:
        try:
            if not isinstance(channel, str):
                raise _bad("channel must be a string")
            responses.append({"result": await _settled(_published_now(hub, channel, broadcast))})
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
    return await _reply_of(method, handler(hub, params))


async def _reply_of(method: str, pending: Awaitable[Any]) -> dict[str, Any]:
    """A batch command's reply, once its result is awaited."""
    try:
        return {method: await pending}
    except CommandError as exc:
        return {"error": _error(exc)}
    except LogError:
        return {"error": _error(codes.ERROR_INTERNAL)}


async def api_batch(hub: Hub, params: dict[str, Any] | _PublishBatch) -> Any:
    return await _settled(api_batch_now(hub, params))


def api_batch_now(hub: Hub, params: dict[str, Any] | _PublishBatch) -> Any:
    """``batch``: its replies at once when no command needs an await, else a coroutine.

    In order, unless ``parallel``; a publication to a live channel needs no
    coroutine of its own (see :func:`_published_now`), so a batch of those is
    answered without one.
    """
    if isinstance(params, _PublishBatch):  # publications only, decoded straight into structs
        if params.parallel:
            return _batch_gathered(hub, _parsed_publications(params))
        # (no parsed command per publication, unless one must be awaited)
        publications = [command.publish for command in params.commands]
        return _replies_now(
            hub, publications, _publication_now, lambda: _parsed_publications(params)
        )
    commands = params.get("commands")
    if not isinstance(commands, list):
        raise _bad("commands required")
    parsed = [_batch_command(c) for c in commands]
    if params.get("parallel"):
        return _batch_gathered(hub, parsed)
    return _replies_now(hub, parsed, _reply_now, lambda: parsed)


_C = TypeVar("_C")
#: A batch command's reply, or the coroutine of it when it must be awaited.
_Reply = dict[str, Any] | Coroutine[Any, Any, dict[str, Any]]


def _replies_now(
    hub: Hub,
    commands: list[_C],
    reply_now: Callable[[Hub, _C], _Reply],
    parsed: Callable[[], list[_Parsed]],
) -> Any:
    """A batch's replies in order: at once while each command's ``reply_now`` answers,
    else a coroutine for the rest (from the first that must be awaited, run ``parsed``)."""
    replies: list[dict[str, Any]] = []
    for index, command in enumerate(commands):
        reply = reply_now(hub, command)
        if not isinstance(reply, dict):
            return _batch_rest(hub, parsed(), index, replies, reply)
        replies.append(reply)
    return {"replies": replies}


def _parsed_publications(params: _PublishBatch) -> list[_Parsed]:
    return [("publish", api_publish, c.publish) for c in params.commands]


def _reply_now(hub: Hub, parsed: _Parsed) -> _Reply:
    """A batch command's reply, at once when it needs no await (an error, a live
    publication)."""
    if isinstance(parsed, dict):
        return parsed
    if parsed[0] != "publish":
        return _run_command(hub, parsed)
    return _publication_now(hub, parsed[2])


def _publication_now(hub: Hub, params: PublishParams) -> _Reply:
    """A batch publication's reply, at once when it needs no await (done, or refused)."""
    try:
        result = _published_now(hub, params.channel, params)
    except CommandError as exc:
        return {"error": _error(exc)}
    return {"publish": result} if isinstance(result, dict) else _reply_of("publish", result)


async def _batch_rest(
    hub: Hub,
    parsed: list[_Parsed],
    start: int,
    replies: list[dict[str, Any]],
    pending: Awaitable[dict[str, Any]],
) -> dict[str, Any]:
    """A batch's replies from command ``start`` on (``pending``: its reply, the
    first that must be awaited), in order, after ``replies``."""
    replies.append(await pending)
    for command in itertools.islice(parsed, start + 1, None):
        reply = _reply_now(hub, command)
        replies.append(reply if isinstance(reply, dict) else await reply)
    return {"replies": replies}


async def _batch_gathered(hub: Hub, parsed: list[_Parsed]) -> dict[str, Any]:
    """A ``parallel`` batch's replies (each command run at once, replies in order)."""
    return {"replies": list(await asyncio.gather(*(_run_command(hub, p) for p in parsed)))}


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

#: The request target of each method of the API: its path and the method
#: (what :func:`api_method` makes of it, looked up at once).
API_TARGETS: Final[dict[bytes, tuple[str, str]]] = {
    b"/api/" + name.encode(): ("/api/" + name, name) for name in API_METHODS
}


#: The bodies with a common form, decoded straight into structs (before plain JSON).
_BODY_SHAPES: dict[str, Shape] = {
    "publish": Shape(msgspec.json.Decoder(_BoundedPublish), msgspec.json.Decoder(PublishParams)),
    "broadcast": Shape(
        msgspec.json.Decoder(_BoundedBroadcast), msgspec.json.Decoder(BroadcastParams)
    ),
    "batch": Shape(msgspec.json.Decoder(_BoundedPublishBatch), msgspec.json.Decoder(_PublishBatch)),
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


def _authorized(scope: Scope, key: bytes | None) -> bool:
    """``X-API-Key: <key>``, else ``Authorization: apikey <key>`` (the first of each
    counts; the key, UTF-8, is compared with the bytes the client sent)."""
    if not key:
        return False
    given: bytes | None = None
    authorization: bytes | None = None
    for name, value in scope.get("headers", ()):  # one pass over the headers
        if name == b"x-api-key":
            given = value
            break
        if name == b"authorization" and authorization is None:
            authorization = value
    if given is None:
        scheme, _, rest = (authorization or b"").partition(b" ")
        if scheme.lower() != b"apikey":
            return False
        given = rest.strip()
    return hmac.compare_digest(bytes(given), key)


class ApiEndpoint:
    """``POST /api/<method>``: a bare ASGI endpoint (no response object per call).

    The hub's app also calls it ahead of its router (see
    :meth:`~eventcast.server.app.HubApp.__call__`), behind the same
    middleware; ``scope["path_params"]["method"]`` names the method. Under
    ``eventcast serve``, the hub's HTTP protocol answers most calls itself
    (:func:`answer_api_body`), with the same rules.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["path_params"].get("method", "")
        answer = await answer_api(self._hub, method, Request(scope, receive))
        status, body, headers = api_response(answer)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


#: The type of every answer's body.
_JSON_TYPE: Final = b"application/json"
#: The two headers every answer has, as written in a head (``%`` the body's length).
_HEAD_LINES: Final = b"content-length: %d\r\ncontent-type: " + _JSON_TYPE + b"\r\n"


def _own_headers(extra: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    """The headers an answer adds to the two every answer has (most add none)."""
    if not extra:
        return []
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]


def api_response(answer: Answer) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """An answer as a response: status, encoded JSON body, headers (with its length)."""
    status, body, extra = answer
    encoded = _encode(body)
    headers = [(b"content-length", b"%d" % len(encoded)), (b"content-type", _JSON_TYPE)]
    if extra:
        headers += _own_headers(extra)
    return status, encoded, headers


def api_response_head(answer: Answer) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    """An answer as a response written by hand (a protocol's own): status, encoded JSON
    body, the lines of the two headers every answer has as written in a head (those of
    :func:`api_response`), and the answer's own headers, to write after them."""
    status, body, extra = answer
    encoded = _encode(body)
    return status, encoded, _HEAD_LINES % len(encoded), _own_headers(extra)


async def answer_api(hub: Hub, method: str, request: Request) -> Answer:
    """Answer one call of the API: authenticate, read the body, run the method."""
    refused = _refused(hub, method, request.scope)
    if refused is not None:
        return refused
    try:
        params = await read_json(request, empty={}, shape=_BODY_SHAPES.get(method))
    except BodyError as exc:
        return _refused_body(hub, method, exc)
    answer = run_api(hub, method, params)
    return answer if isinstance(answer, tuple) else await answer


def answer_api_body(
    hub: Hub, method: str, scope: Scope, body: bytes
) -> Answer | Coroutine[Any, Any, Answer]:
    """Answer a call whose whole body is read already: at once when the method needs
    no await (a publication to a live channel), else a coroutine of the answer.

    The caller bounded the body (``max_body_size``). The rules are those of
    :func:`answer_api`, which the ASGI endpoint uses.
    """
    refused = _refused(hub, method, scope)
    if refused is not None:
        return refused
    try:
        params = json_body(body, empty={}, shape=_BODY_SHAPES.get(method))
    except BodyError as exc:
        return _refused_body(hub, method, exc)
    return run_api(hub, method, params)


def _refused(hub: Hub, method: str, scope: Scope) -> Answer | None:
    """401 without the right API key, 404 for an unknown method, else ``None``."""
    if not _authorized(scope, hub.api_key):
        return _failed(hub, method, _json(401, {"error": {"code": 101, "message": "unauthorized"}}))
    if method not in API_METHODS:
        return _failed(hub, method, _json(404, {"error": _error(codes.ERROR_METHOD_NOT_FOUND)}))
    return None


def _refused_body(hub: Hub, method: str, exc: BodyError) -> Answer:
    error = {"code": codes.ERROR_BAD_REQUEST.code, "message": exc.message}
    return _failed(hub, method, _json(exc.status, {"error": error}, exc.headers))


#: What a decoded body may be: a JSON object, or the struct of a typed body.
_PARAMS: Final = (dict, msgspec.Struct)

#: Methods with a form that runs without a coroutine when it can (see :func:`run_api`).
_NOW: dict[str, Callable[[Hub, Any], Any]] = {
    "publish": api_publish_now,
    "batch": api_batch_now,
}


def run_api(hub: Hub, method: str, params: Any) -> Answer | Coroutine[Any, Any, Answer]:
    """Run a known method on its decoded body: the answer at once when the method
    needs no await, else a coroutine of it. Errors become answers."""
    if not isinstance(params, _PARAMS):
        return _failed(
            hub,
            method,
            _json(400, {"error": {"code": 107, "message": "body must be a JSON object"}}),
        )
    now = _NOW.get(method)
    try:
        result = API_METHODS[method](hub, params) if now is None else now(hub, params)
    except Exception as exc:
        return _failed(hub, method, _error_answer(method, exc))
    if isinstance(result, CoroutineType):
        return _awaited(hub, method, result)
    return _succeeded(hub, method, result)


async def _awaited(hub: Hub, method: str, pending: Coroutine[Any, Any, Any]) -> Answer:
    try:
        result = await pending
    except Exception as exc:
        return _failed(hub, method, _error_answer(method, exc))
    return _succeeded(hub, method, result)


def _succeeded(hub: Hub, method: str, result: Any) -> Answer:
    count_api(hub, method, "ok")
    return _json(200, result if method == "batch" else {"result": result})


def _failed(hub: Hub, method: str, answer: Answer) -> Answer:
    count_api(hub, method, "error")
    return answer


def _error_answer(method: str, exc: Exception) -> Answer:
    """The answer to a method that raised (an unexpected error is logged with its traceback)."""
    if isinstance(exc, CommandError):
        return _json(200, {"error": _error(exc)})
    if isinstance(exc, EncodeError):
        return _json(200, {"error": _error(codes.ERROR_BAD_REQUEST.with_message(str(exc)))})
    if isinstance(exc, LogError | BackplaneError):
        logger.warning("API %s failed: %s", method, exc)
        return _json(200, {"error": _error(codes.ERROR_INTERNAL)})
    if isinstance(exc, EventcastError):
        logger.warning("API %s failed: %s", method, exc)
        return _json(200, {"error": _error(codes.ERROR_BAD_REQUEST.with_message(str(exc)))})
    logger.error("API %s failed", method, exc_info=exc)
    return _json(500, {"error": _error(codes.ERROR_INTERNAL)})
