"""Centrifugo's HTTP proxy: the application's hooks answered by a backend over HTTP.

A backend written against Centrifugo's proxy documentation works unchanged.
Each hook is a ``POST`` of a JSON body to its endpoint
(``EVENTCAST_PROXY_CONNECT_ENDPOINT``, ``…_REFRESH_ENDPOINT``,
``…_SUBSCRIBE_ENDPOINT``, ``…_PUBLISH_ENDPOINT``, ``…_SUB_REFRESH_ENDPOINT``,
``…_RPC_ENDPOINT``) with the client request headers listed in
``EVENTCAST_PROXY_HTTP_HEADERS``. The body has the connection's ``client``,
``transport``, ``protocol`` (``json`` or ``protobuf``) and ``encoding``
(``json``), the ``user`` (not for connect), the ``meta`` the connect hook
attached, and the hook's own fields; client data goes as ``data`` (raw JSON)
or, with ``EVENTCAST_PROXY_BINARY_ENCODING``, as ``b64data``.

The backend answers ``200`` with one of::

    {"result": {...}}                                   # the hook's result
    {"error": {"code": 103, "message": "permission denied"}}      # an error reply
    {"disconnect": {"code": 4500, "reason": "go away"}}           # close the client

Results carry ``data``/``info`` as raw JSON or ``b64data``/``b64info`` as
base64 (decoded, it must still be JSON: the client protocol is JSON). As in
Centrifugo, a refresh or sub_refresh answered with an error or a disconnect
ends the session or the subscription. Any other status, a malformed answer or
an unreachable backend is a failure: the client gets error 100 (see
:class:`~eventcast.server.hooks.HookCaller`). The channel hooks apply to
namespaces with ``proxy_subscribe``, ``proxy_publish`` and
``proxy_sub_refresh``.

One pooled ``httpx.AsyncClient`` with keep-alive connections serves every
call; the calls of one connection are made one at a time, in order.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
import msgspec

from ..exceptions import HookError
from ..protocol.codes import ClientError, Disconnect
from ..protocol.frames import NO_DATA
from ._outgoing import exchange, pooled_client
from .errors import CommandError
from .hooks import (
    CHANNEL_HOOKS,
    ChainedHooks,
    ClientRequest,
    ConnectRequest,
    ConnectResult,
    HookKind,
    Hooks,
    PublishRequest,
    PublishResult,
    RefreshRequest,
    RefreshResult,
    RPCRequest,
    RPCResult,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeOptions,
    SubscribeRequest,
    SubscribeResult,
)

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["ProxyHooks", "configured_hooks"]

_encode = msgspec.json.Encoder().encode

#: Centrifugo's reason strings fit a WebSocket close frame (at most 123 bytes).
_MAX_REASON_BYTES = 123


# -- the answers, as Centrifugo's proxy documentation writes them -----------------------------


class _Answer(msgspec.Struct, forbid_unknown_fields=False):
    pass


class _Error(_Answer):
    code: int
    message: str = ""
    temporary: bool = False


class _Disconnect(_Answer):
    code: int
    reason: str = ""


class _SubscribeOptions(_Answer):
    info: msgspec.Raw = NO_DATA
    b64info: str = ""
    data: msgspec.Raw = NO_DATA
    b64data: str = ""


class _ConnectResult(_Answer):
    user: str = ""
    expire_at: float = 0
    info: msgspec.Raw = NO_DATA
    b64info: str = ""
    data: msgspec.Raw = NO_DATA
    b64data: str = ""
    channels: list[str] = msgspec.field(default_factory=list)
    subs: dict[str, _SubscribeOptions] = msgspec.field(default_factory=dict)
    meta: msgspec.Raw = NO_DATA


class _RefreshResult(_Answer):
    expired: bool = False
    expire_at: float = 0
    info: msgspec.Raw = NO_DATA
    b64info: str = ""


class _SubscribeResult(_Answer):
    info: msgspec.Raw = NO_DATA
    b64info: str = ""
    data: msgspec.Raw = NO_DATA
    b64data: str = ""
    expire_at: float = 0


class _PublishResult(_Answer):
    data: msgspec.Raw = NO_DATA
    b64data: str = ""
    tags: dict[str, str] | None = None
    idempotency_key: str = ""


class _RPCResult(_Answer):
    data: msgspec.Raw = NO_DATA
    b64data: str = ""


_T = TypeVar("_T")


class _Response(_Answer, Generic[_T]):
    result: _T | None = None
    error: _Error | None = None
    disconnect: _Disconnect | None = None


_DECODERS: dict[HookKind, msgspec.json.Decoder[Any]] = {
    "connect": msgspec.json.Decoder(_Response[_ConnectResult]),
    "refresh": msgspec.json.Decoder(_Response[_RefreshResult]),
    "subscribe": msgspec.json.Decoder(_Response[_SubscribeResult]),
    "publish": msgspec.json.Decoder(_Response[_PublishResult]),
    "sub_refresh": msgspec.json.Decoder(_Response[_RefreshResult]),
    "rpc": msgspec.json.Decoder(_Response[_RPCResult]),
}


def _payload(raw: msgspec.Raw, b64: str, kind: HookKind, name: str) -> bytes | None:
    """A ``data``/``info`` of an answer as encoded JSON (``b64…`` decoded), or ``None``."""
    if b64:
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise HookError(f"the {kind} proxy answered an invalid b64{name}") from None
    return bytes(raw) if raw else None


def _expiry(value: float) -> float | None:
    return value if value > 0 else None


class ProxyHooks(Hooks):
    """The hooks answered by Centrifugo-compatible HTTP endpoints (see the module documentation).

    Args:
        settings: the ``proxy_*`` settings and the namespaces' ``proxy_*`` options.
        client: the HTTP client to use (default: a pooled one, closed by :meth:`aclose`).
    """

    def __init__(self, settings: Settings, *, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        endpoints: tuple[tuple[HookKind, str | None], ...] = (
            ("connect", settings.proxy_connect_endpoint),
            ("refresh", settings.proxy_refresh_endpoint),
            ("subscribe", settings.proxy_subscribe_endpoint),
            ("publish", settings.proxy_publish_endpoint),
            ("sub_refresh", settings.proxy_sub_refresh_endpoint),
            ("rpc", settings.proxy_rpc_endpoint),
        )
        self._endpoints: dict[HookKind, str] = {kind: url for kind, url in endpoints if url}
        self._timeouts: dict[HookKind, float] = {
            "connect": settings.proxy_connect_timeout,
            "refresh": settings.proxy_refresh_timeout,
            "subscribe": settings.proxy_subscribe_timeout,
            "publish": settings.proxy_publish_timeout,
            "sub_refresh": settings.proxy_sub_refresh_timeout,
            "rpc": settings.proxy_rpc_timeout,
        }
        self._forward = tuple(dict.fromkeys(h.lower() for h in settings.proxy_http_headers))
        self._binary = settings.proxy_binary_encoding
        self._own_client = client is None
        self._client = client or pooled_client(max(self._timeouts.values()))

    @staticmethod
    def configured(settings: Settings) -> bool:
        """Whether any proxy endpoint is set."""
        return any(
            (
                settings.proxy_connect_endpoint,
                settings.proxy_refresh_endpoint,
                settings.proxy_subscribe_endpoint,
                settings.proxy_publish_endpoint,
                settings.proxy_sub_refresh_endpoint,
                settings.proxy_rpc_endpoint,
            )
        )

    def handles(self, kind: HookKind, channel: str | None = None) -> bool:
        if kind not in self._endpoints:
            return False
        if kind not in CHANNEL_HOOKS or channel is None:
            return True
        ns = self._settings.namespace(channel)
        if ns is None:
            return False
        if kind == "subscribe":
            return ns.proxy_subscribe
        if kind == "publish":
            return ns.proxy_publish
        return ns.proxy_sub_refresh

    def timeout(self, kind: HookKind, channel: str | None = None) -> float:
        return self._timeouts[kind]

    # -- the exchange ------------------------------------------------------------------

    def _body(self, request: ClientRequest, *, user: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "client": request.client,
            "transport": request.transport,
            "protocol": request.protocol,
            "encoding": "json",
        }
        if user:
            body["user"] = request.user
        if request.meta is not None:
            body["meta"] = request.meta
        return body

    def _data(self, body: dict[str, Any], data: Any) -> None:
        if data is None:
            return
        if self._binary:
            body["b64data"] = base64.b64encode(_encode(data)).decode()
        else:
            body["data"] = data

    async def _post(self, kind: HookKind, request: ClientRequest, body: dict[str, Any]) -> Any:
        """POST the body; return the answer's ``result``, or raise its error or disconnect."""
        headers = {"content-type": "application/json"}
        for name in self._forward:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        what = f"the {kind} proxy"
        status, raw = await exchange(
            self._client,
            "POST",
            self._endpoints[kind],
            error=HookError,
            what=what,
            timeout=self._timeouts[kind],
            content=_encode(body),
            headers=headers,
        )
        if status != 200:
            raise HookError(f"{what} answered HTTP {status}")
        try:
            answer: _Response[Any] = _DECODERS[kind].decode(raw)
        except msgspec.DecodeError as exc:  # ValidationError included; no values quoted
            raise HookError(f"{what} answered malformed JSON: {exc}") from None
        if answer.disconnect is not None:
            code, reason = answer.disconnect.code, answer.disconnect.reason
            if not (3000 <= code < 5000):
                raise HookError(f"{what} answered disconnect code {code} (use 4000-4999)")
            reason = reason.encode()[:_MAX_REASON_BYTES].decode(errors="ignore")
            raise CommandError(Disconnect(code, reason))
        if answer.error is not None:
            error = answer.error
            if not (100 <= error.code < 2000):
                raise HookError(f"{what} answered error code {error.code} (use 400-1999)")
            raise CommandError(ClientError(error.code, error.message, error.temporary))
        if answer.result is None:
            raise HookError(f"{what} answered neither result, error nor disconnect")
        return answer.result

    async def _expiring(self, kind: HookKind, request: ClientRequest, body: dict[str, Any]) -> Any:
        """A refresh: an error or disconnect answer ends the session (as in Centrifugo)."""
        try:
            return await self._post(kind, request, body)
        except CommandError:
            return _RefreshResult(expired=True)

    # -- the hooks ---------------------------------------------------------------------

    async def connect(self, request: ConnectRequest) -> ConnectResult:
        body = self._body(request, user=False)
        if request.name:
            body["name"] = request.name
        if request.version:
            body["version"] = request.version
        self._data(body, request.data)
        result: _ConnectResult = await self._post("connect", request, body)
        return ConnectResult(
            user=result.user,
            expire_at=_expiry(result.expire_at),
            info=_payload(result.info, result.b64info, "connect", "info"),
            data=_payload(result.data, result.b64data, "connect", "data"),
            channels=tuple(result.channels),
            subs={
                channel: SubscribeOptions(
                    info=_payload(options.info, options.b64info, "connect", "info"),
                    data=_payload(options.data, options.b64data, "connect", "data"),
                )
                for channel, options in result.subs.items()
            },
            meta=msgspec.json.decode(result.meta) if result.meta else None,
        )

    async def refresh(self, request: RefreshRequest) -> RefreshResult:
        result: _RefreshResult = await self._expiring("refresh", request, self._body(request))
        return RefreshResult(
            expired=result.expired,
            expire_at=_expiry(result.expire_at),
            info=_payload(result.info, result.b64info, "refresh", "info"),
        )

    async def subscribe(self, request: SubscribeRequest) -> SubscribeResult:
        body = self._body(request)
        body["channel"] = request.channel
        self._data(body, request.data)
        result: _SubscribeResult = await self._post("subscribe", request, body)
        return SubscribeResult(
            info=_payload(result.info, result.b64info, "subscribe", "info"),
            data=_payload(result.data, result.b64data, "subscribe", "data"),
            expire_at=_expiry(result.expire_at),
        )

    async def publish(self, request: PublishRequest) -> PublishResult:
        body = self._body(request)
        body["channel"] = request.channel
        self._data(body, request.data)
        result: _PublishResult = await self._post("publish", request, body)
        return PublishResult(
            data=_payload(result.data, result.b64data, "publish", "data"),
            tags=result.tags,
            idempotency_key=result.idempotency_key or None,
        )

    async def sub_refresh(self, request: SubRefreshRequest) -> SubRefreshResult:
        body = self._body(request)
        body["channel"] = request.channel
        result: _RefreshResult = await self._expiring("sub_refresh", request, body)
        return SubRefreshResult(
            expired=result.expired,
            expire_at=_expiry(result.expire_at),
            info=_payload(result.info, result.b64info, "sub_refresh", "info"),
        )

    async def rpc(self, request: RPCRequest) -> RPCResult:
        body = self._body(request)
        if request.method:
            body["method"] = request.method
        self._data(body, request.data)
        result: _RPCResult = await self._post("rpc", request, body)
        return RPCResult(data=_payload(result.data, result.b64data, "rpc", "data"))

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"<ProxyHooks {sorted(self._endpoints)}>"


def configured_hooks(settings: Settings, hooks: Hooks | None = None) -> Hooks | None:
    """The hooks a hub asks: the application's, then the HTTP proxy's (if configured)."""
    if not ProxyHooks.configured(settings):
        return hooks
    proxy = ProxyHooks(settings)
    return proxy if hooks is None else ChainedHooks(hooks, proxy)
