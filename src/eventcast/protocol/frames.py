"""The messages of the Centrifuge client protocol, JSON encoding (pure data).

Field names follow the protocol's schema (``client.proto``), so the JSON is
what the official SDKs send and expect. Every struct omits fields left at
their default, as the protocol's JSON encoding does. ``data`` fields are
``msgspec.Raw``: the payload passes through as raw JSON, never re-encoded.
"""

from __future__ import annotations

from typing import Final, TypeGuard

import msgspec
import msgspec.inspect
from msgspec import Raw, Struct

__all__ = [
    "MAX_INT",
    "NO_DATA",
    "ClientInfo",
    "Command",
    "ConnectPush",
    "ConnectRequest",
    "ConnectResult",
    "DisconnectPush",
    "EmulationRequest",
    "ErrorPayload",
    "FilterNode",
    "HistoryRequest",
    "HistoryResult",
    "JoinPush",
    "LeavePush",
    "MessagePush",
    "PingRequest",
    "PresenceRequest",
    "PresenceResult",
    "PresenceStatsRequest",
    "PresenceStatsResult",
    "Publication",
    "PublishRequest",
    "Push",
    "RPCRequest",
    "RPCResult",
    "RefreshPush",
    "RefreshRequest",
    "RefreshResult",
    "Reply",
    "SendRequest",
    "StreamPosition",
    "SubRefreshRequest",
    "SubRefreshResult",
    "SubscribePush",
    "SubscribeRequest",
    "SubscribeResult",
    "UnsubscribePush",
    "UnsubscribeRequest",
    "int_in_range",
    "out_of_range",
]


#: An absent ``data`` field (an empty ``Raw``; JSON ``null`` is ``Raw(b"null")``).
NO_DATA: Final = Raw()

#: The largest number a client may send (offsets, limits, flags): a signed 64-bit
#: integer, which every log backend can store and compare.
MAX_INT: Final = 2**63 - 1


def int_in_range(value: object, low: int = 0, high: int = MAX_INT) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` (not a ``bool``) in ``[low, high]``."""
    return type(value) is int and low <= value <= high


def out_of_range(message: Struct) -> str | None:
    """Name the first number of a decoded request outside ``[0, MAX_INT]``, or ``None``.

    Every integer field of every request (and of the requests nested in it, such
    as ``connect.subs`` and ``history.since``) is checked: numbers come from
    outside and reach the log backends, whose integers are signed 64-bit. Only
    the fields whose type can hold a number or a request are read
    (:func:`_fields_to_check`): none of a ``publish``.
    """
    cls = type(message)
    names = _TO_CHECK.get(cls)
    if names is None:
        names = _TO_CHECK[cls] = _fields_to_check(cls)
    for name in names:
        value = getattr(message, name)
        if type(value) is int:
            if not 0 <= value <= MAX_INT:
                return f"{name} out of range"
        elif isinstance(value, Struct):
            problem = out_of_range(value)
            if problem is not None:
                return f"{name}.{problem}"
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, Struct):
                    problem = out_of_range(item)
                    if problem is not None:
                        return f"{name}.{problem}"
    return None


#: The fields :func:`out_of_range` reads, per struct class (the classes are few and fixed).
_TO_CHECK: Final[dict[type, tuple[str, ...]]] = {}
#: Field types whose values :func:`out_of_range` never looks into.
_UNCHECKED_TYPES: Final = (
    msgspec.inspect.StrType,
    msgspec.inspect.BoolType,
    msgspec.inspect.FloatType,
    msgspec.inspect.BytesType,
    msgspec.inspect.RawType,
    msgspec.inspect.NoneType,
    msgspec.inspect.ListType,
)


def _fields_to_check(cls: type) -> tuple[str, ...]:
    """The fields of ``cls`` whose values :func:`out_of_range` looks into: those whose
    type may hold an ``int``, a struct or a dict of structs (a field of an unknown
    type too)."""

    def unchecked(kind: msgspec.inspect.Type) -> bool:
        if isinstance(kind, msgspec.inspect.UnionType):
            return all(unchecked(member) for member in kind.types)
        if isinstance(kind, msgspec.inspect.DictType):
            return unchecked(kind.value_type)
        return isinstance(kind, _UNCHECKED_TYPES)

    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple(field.name for field in info.fields if not unchecked(field.type))


class _Message(Struct, omit_defaults=True, forbid_unknown_fields=False):
    pass


# -- requests (client -> server) -----------------------------------------------------------


class FilterNode(_Message):
    """A filter over publication tags (``tf`` of a subscribe request), as a tree.

    A leaf (``op`` empty) compares the tag ``key`` with ``cmp`` (``eq``, ``neq``,
    ``in``, ``nin``, ``ex``, ``nex``, ``sw``, ``ew``, ``ct``, ``lt``, ``lte``,
    ``gt``, ``gte``) against ``val`` or ``vals``; a branch (``op`` ``and``,
    ``or`` or ``not``) combines its ``nodes``. Validate and compile it with
    :func:`eventcast.protocol.filters.compile_filter` before use.
    """

    op: str = ""
    key: str = ""
    cmp: str = ""
    val: str = ""
    vals: list[str] | None = None
    nodes: list[FilterNode] | None = None


class SubscribeRequest(_Message):
    """Subscribe to a channel, optionally recovering from a stream position.

    ``delta`` asks for delta-compressed publications (``"fossil"``); ``tf``
    asks the server to deliver only publications whose tags match a filter.
    """

    channel: str = ""
    token: str = ""
    recover: bool = False
    epoch: str = ""
    offset: int = 0
    data: Raw = NO_DATA
    positioned: bool = False
    recoverable: bool = False
    join_leave: bool = False
    delta: str = ""
    tf: FilterNode | None = None
    flag: int = 0


class ConnectRequest(_Message):
    """Authenticate; ``subs`` asks to recover server-side subscriptions."""

    token: str = ""
    data: Raw = NO_DATA
    subs: dict[str, SubscribeRequest] | None = None
    name: str = ""
    version: str = ""
    headers: dict[str, str] | None = None
    flag: int = 0


class UnsubscribeRequest(_Message):
    """Unsubscribe from a channel."""

    channel: str = ""


class PublishRequest(_Message):
    """Publish into a channel."""

    channel: str = ""
    data: Raw = NO_DATA


class PresenceRequest(_Message):
    """Ask who is in a channel."""

    channel: str = ""


class PresenceStatsRequest(_Message):
    """Ask how many clients and users are in a channel."""

    channel: str = ""


class StreamPosition(_Message):
    """A position in a channel's stream."""

    offset: int = 0
    epoch: str = ""


class HistoryRequest(_Message):
    """Page through a channel's history."""

    channel: str = ""
    limit: int = 0
    since: StreamPosition | None = None
    reverse: bool = False


class PingRequest(_Message):
    """An explicit ping command (the client normally answers server pings with ``{}``)."""


class SendRequest(_Message):
    """An asynchronous message to the server (no reply)."""

    data: Raw = NO_DATA


class RPCRequest(_Message):
    """Call a method registered on the server."""

    data: Raw = NO_DATA
    method: str = ""


class RefreshRequest(_Message):
    """Replace the connection token before it expires."""

    token: str = ""


class SubRefreshRequest(_Message):
    """Replace a subscription token before it expires."""

    channel: str = ""
    token: str = ""


class Command(_Message):
    """One command: an id and exactly one request. ``{}`` alone is a pong."""

    id: int = 0
    connect: ConnectRequest | None = None
    subscribe: SubscribeRequest | None = None
    unsubscribe: UnsubscribeRequest | None = None
    publish: PublishRequest | None = None
    presence: PresenceRequest | None = None
    presence_stats: PresenceStatsRequest | None = None
    history: HistoryRequest | None = None
    ping: PingRequest | None = None
    send: SendRequest | None = None
    rpc: RPCRequest | None = None
    refresh: RefreshRequest | None = None
    sub_refresh: SubRefreshRequest | None = None


#: The request fields of :class:`Command`, in the protocol's order.
METHODS: Final = (
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "ping",
    "send",
    "rpc",
    "refresh",
    "sub_refresh",
)


# -- results and pushes (server -> client) ---------------------------------------------------


class ClientInfo(_Message):
    """Who a client is: its user, client id and connection and channel info."""

    user: str = ""
    client: str = ""
    conn_info: Raw = NO_DATA
    chan_info: Raw = NO_DATA


class Publication(_Message):
    """A publication in a channel.

    With ``delta`` set, ``data`` is a fossil delta against the data of the
    previous publication of the same subscription, not the data itself.
    """

    data: Raw = NO_DATA
    info: ClientInfo | None = None
    offset: int = 0
    tags: dict[str, str] | None = None
    delta: bool = False
    time: int = 0
    channel: str = ""


class SubscribeResult(_Message):
    """The answer to a subscribe, with the replayed publications when recovering.

    ``delta`` tells whether the delta compression asked for was accepted.
    """

    expires: bool = False
    ttl: int = 0
    recoverable: bool = False
    epoch: str = ""
    publications: list[Publication] | None = None
    recovered: bool = False
    offset: int = 0
    positioned: bool = False
    data: Raw = NO_DATA
    was_recovering: bool = False
    delta: bool = False


class ConnectResult(_Message):
    """The answer to connect."""

    client: str = ""
    version: str = ""
    expires: bool = False
    ttl: int = 0
    data: Raw = NO_DATA
    subs: dict[str, SubscribeResult] | None = None
    ping: int = 0
    pong: bool = False
    session: str = ""
    node: str = ""
    time: int = 0


class RefreshResult(_Message):
    """The answer to refresh."""

    client: str = ""
    version: str = ""
    expires: bool = False
    ttl: int = 0


class SubRefreshResult(_Message):
    """The answer to sub_refresh."""

    expires: bool = False
    ttl: int = 0


class PresenceResult(_Message):
    """The clients in a channel, by client id."""

    presence: dict[str, ClientInfo] | None = None


class PresenceStatsResult(_Message):
    """How many clients and unique users are in a channel."""

    num_clients: int = 0
    num_users: int = 0


class HistoryResult(_Message):
    """A page of history and the stream's current top position."""

    publications: list[Publication] | None = None
    epoch: str = ""
    offset: int = 0


class RPCResult(_Message):
    """The answer to rpc."""

    data: Raw = NO_DATA


class JoinPush(_Message):
    """Someone joined a channel."""

    info: ClientInfo | None = None


class LeavePush(_Message):
    """Someone left a channel."""

    info: ClientInfo | None = None


class UnsubscribePush(_Message):
    """The server unsubscribed the client from a channel."""

    code: int = 0
    reason: str = ""


class MessagePush(_Message):
    """An asynchronous message from the server."""

    data: Raw = NO_DATA


class SubscribePush(_Message):
    """The server subscribed the client to a channel."""

    recoverable: bool = False
    epoch: str = ""
    offset: int = 0
    positioned: bool = False
    data: Raw = NO_DATA


class ConnectPush(_Message):
    """Connect information for unidirectional transports."""

    client: str = ""
    version: str = ""
    data: Raw = NO_DATA
    subs: dict[str, SubscribeResult] | None = None
    expires: bool = False
    ttl: int = 0
    ping: int = 0
    pong: bool = False


class DisconnectPush(_Message):
    """The server is about to close the connection."""

    code: int = 0
    reason: str = ""


class RefreshPush(_Message):
    """The server refreshed the connection's expiry."""

    expires: bool = False
    ttl: int = 0


class Push(_Message):
    """An asynchronous server-to-client message about a channel or the connection."""

    channel: str = ""
    pub: Publication | None = None
    join: JoinPush | None = None
    leave: LeavePush | None = None
    unsubscribe: UnsubscribePush | None = None
    message: MessagePush | None = None
    subscribe: SubscribePush | None = None
    connect: ConnectPush | None = None
    disconnect: DisconnectPush | None = None
    refresh: RefreshPush | None = None


class ErrorPayload(_Message):
    """An error in a reply."""

    code: int = 0
    message: str = ""
    temporary: bool = False


class Reply(_Message):
    """A reply to a command (``id > 0``), a push (``push`` set) or a ping (empty)."""

    id: int = 0
    error: ErrorPayload | None = None
    push: Push | None = None
    connect: ConnectResult | None = None
    subscribe: SubscribeResult | None = None
    unsubscribe: dict[str, object] | None = None
    publish: dict[str, object] | None = None
    presence: PresenceResult | None = None
    presence_stats: PresenceStatsResult | None = None
    history: HistoryResult | None = None
    ping: dict[str, object] | None = None
    rpc: RPCResult | None = None
    refresh: RefreshResult | None = None
    sub_refresh: SubRefreshResult | None = None


class EmulationRequest(_Message):
    """A command batch POSTed to the emulation endpoint by an HTTP-streaming or SSE client.

    ``session`` and ``node`` name the stream the replies go to; ``data`` holds
    the encoded commands (JSON lines, or delimited Protobuf commands).
    """

    node: str = ""
    session: str = ""
    data: bytes = b""


def raw(data: bytes | None) -> Raw:
    """Wrap encoded JSON bytes so they are embedded as is (``None``: absent)."""
    return NO_DATA if data is None else msgspec.Raw(data)
