"""The client side of the Centrifuge protocol, JSON encoding (sans-I/O).

:class:`ClientSession` builds commands (assigning their ids) and turns the
frames a server sends into a list of events. It never touches a socket or an
event loop: :mod:`eventcast.client` drives it over ``websockets``, and the
tests drive it byte by byte.

Usage::

    session = ClientSession()
    connect_id = session.connect(token="...")
    socket.send(session.data_to_send())          # b'{"id":1,"connect":{...}}'
    for event in session.receive(socket.recv()):
        ...                                      # ReplyReceived, PublicationReceived, ...
    socket.send(session.data_to_send())          # pongs queued by receive(), if any

What it keeps across a connection (call :meth:`ClientSession.connection_lost`
when the transport closes, then ``connect`` again on the next one):

* the next command id (ids are never reused);
* each subscription's stream position (offset, epoch), updated from
  subscribe results and from every publication carrying an offset, so that a
  resubscribe can ask to recover from exactly where the stream was left;
  publications at or below the known offset (duplicates across a recovery)
  are dropped and counted in :attr:`ClientSession.duplicates`.

Server pings (an empty ``{}``) are answered with ``{}`` automatically when the
connect result asked for pongs (``"pong": true``); a :class:`PingReceived`
event is emitted either way.

Error contract: :meth:`ClientSession.receive` raises only
:class:`~eventcast.protocol.codec.ProtocolError`, when a frame is not valid
Centrifuge JSON or a reply does not fit its command.
"""

from __future__ import annotations

import enum
from typing import Any, Final, TypeAlias

import msgspec

from .codec import ProtocolError, decode_replies, encode_command
from .frames import (
    ClientInfo,
    Command,
    ConnectRequest,
    ConnectResult,
    ErrorPayload,
    HistoryRequest,
    PresenceRequest,
    PresenceStatsRequest,
    Publication,
    PublishRequest,
    RefreshRequest,
    Reply,
    RPCRequest,
    SendRequest,
    StreamPosition,
    SubRefreshRequest,
    SubscribeRequest,
    SubscribeResult,
    UnsubscribeRequest,
    raw,
)

__all__ = [
    "ClientSession",
    "ClientState",
    "DisconnectReceived",
    "JoinReceived",
    "LeaveReceived",
    "MessageReceived",
    "PingReceived",
    "PublicationReceived",
    "ReplyReceived",
    "SessionEvent",
    "SubscribedPush",
    "UnsubscribedPush",
]

#: The pong a client answers a server ping with.
PONG: Final = encode_command(Command())


class ClientState(enum.Enum):
    """Where the client session is in the life of one connection."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


# -- events -----------------------------------------------------------------------------------


class ReplyReceived(msgspec.Struct, frozen=True):
    """The reply to command ``id``: its ``method``, and a ``result`` or an ``error``.

    ``result`` is the method's result struct (``ConnectResult``,
    ``SubscribeResult``, …; ``None`` for methods whose result is empty).
    """

    id: int
    method: str
    result: Any = None
    error: ErrorPayload | None = None


class PublicationReceived(msgspec.Struct, frozen=True):
    """A publication in ``channel`` (the subscription's channel, a pattern or a name).

    ``recovered`` is true for publications replayed inside a subscribe result.
    """

    channel: str
    publication: Publication
    recovered: bool = False


class JoinReceived(msgspec.Struct, frozen=True):
    """A client joined ``channel``."""

    channel: str
    info: ClientInfo


class LeaveReceived(msgspec.Struct, frozen=True):
    """A client left ``channel``."""

    channel: str
    info: ClientInfo


class UnsubscribedPush(msgspec.Struct, frozen=True):
    """The server unsubscribed the client from ``channel``.

    Below 2500 the subscription is over; from 2500 the client should resubscribe.
    """

    channel: str
    code: int
    reason: str

    @property
    def resubscribe(self) -> bool:
        """Whether the protocol tells the client to subscribe again."""
        return self.code >= 2500


class SubscribedPush(msgspec.Struct, frozen=True):
    """The server subscribed the client to ``channel`` (a server-side subscription).

    Emitted for a ``subscribe`` push, and for each server-side subscription
    in a connect result. ``result`` has the stream's position either way;
    from a connect result it also tells how the resume from the position this
    session tracked went (``recovered``, ``was_recovering``), and the recovered
    publications follow as :class:`PublicationReceived` events.
    """

    channel: str
    result: SubscribeResult


class DisconnectReceived(msgspec.Struct, frozen=True):
    """The server announced it is closing the connection with ``code``."""

    code: int
    reason: str


class MessageReceived(msgspec.Struct, frozen=True):
    """An asynchronous message from the server; ``data`` is raw JSON (``b""`` when absent)."""

    data: bytes


class PingReceived(msgspec.Struct, frozen=True):
    """A server ping (an empty ``{}``)."""


SessionEvent: TypeAlias = (
    ReplyReceived
    | PublicationReceived
    | JoinReceived
    | LeaveReceived
    | UnsubscribedPush
    | SubscribedPush
    | DisconnectReceived
    | MessageReceived
    | PingReceived
)


# -- the session ------------------------------------------------------------------------------


class ClientSession:
    """The protocol state of a client, with no I/O.

    Build commands with the command methods (each returns the command id to
    match its :class:`ReplyReceived`), collect the bytes to write with
    :meth:`data_to_send`, and feed every frame received to :meth:`receive`.
    """

    def __init__(self) -> None:
        self.state = ClientState.DISCONNECTED
        #: The connect result of the current connection, once accepted.
        self.connect_result: ConnectResult | None = None
        #: Publications dropped because their offset was already seen.
        self.duplicates = 0
        self._next_id = 0
        self._out: list[bytes] = []
        #: id -> (method, channel) of commands waiting for a reply.
        self._pending: dict[int, tuple[str, str]] = {}
        #: channel -> (offset, epoch) for positioned subscriptions.
        self._positions: dict[str, tuple[int, str]] = {}
        #: Channels the server subscribed this client to (resumed on the next connect).
        self._server_side: set[str] = set()

    # -- commands -------------------------------------------------------------------------

    def _command(self, method: str, request: Any, channel: str = "") -> int:
        self._next_id += 1
        command_id = self._next_id
        self._out.append(encode_command(Command(id=command_id, **{method: request})))
        self._pending[command_id] = (method, channel)
        return command_id

    def connect(
        self,
        *,
        token: str = "",
        name: str = "",
        version: str = "",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Queue ``connect`` (the first command of every connection); return its id.

        The request asks to resume every server-side subscription of the
        previous connection whose stream position this session tracked.
        """
        self.state = ClientState.CONNECTING
        self.connect_result = None
        request = ConnectRequest(
            token=token, name=name, version=version, data=raw(data), headers=headers or None
        )
        subs: dict[str, SubscribeRequest] = {}
        for channel in sorted(self._server_side):
            position = self._positions.get(channel)
            if position is not None:
                offset, epoch = position
                subs[channel] = SubscribeRequest(recover=True, offset=offset, epoch=epoch)
        if subs:
            request.subs = subs
        return self._command("connect", request)

    def subscribe(
        self,
        channel: str,
        *,
        recover: bool = False,
        since: tuple[int, str] | None = None,
        token: str = "",
        data: bytes | None = None,
        join_leave: bool = False,
    ) -> int:
        """Queue ``subscribe``; return its id.

        With ``recover``, the request asks to recover from ``since`` (an
        ``(offset, epoch)`` pair), or else from the position this session
        tracked for the channel; without any position it is a plain subscribe.
        """
        request = SubscribeRequest(channel=channel, token=token, data=raw(data))
        if join_leave:
            request.join_leave = True
        if recover:
            position = since if since is not None else self._positions.get(channel)
            if position is not None:
                request.recover = True
                request.offset, request.epoch = position
                self._positions[channel] = position
        return self._command("subscribe", request, channel)

    def unsubscribe(self, channel: str) -> int:
        """Queue ``unsubscribe`` and forget the channel's position; return its id."""
        self._positions.pop(channel, None)
        return self._command("unsubscribe", UnsubscribeRequest(channel=channel), channel)

    def publish(self, channel: str, data: bytes) -> int:
        """Queue ``publish`` of already-encoded JSON ``data``; return its id."""
        return self._command("publish", PublishRequest(channel=channel, data=raw(data)), channel)

    def history(
        self,
        channel: str,
        *,
        limit: int = 0,
        since: tuple[int, str] | None = None,
        reverse: bool = False,
    ) -> int:
        """Queue ``history`` (``limit=0``: only the stream's position); return its id."""
        request = HistoryRequest(channel=channel, limit=limit, reverse=reverse)
        if since is not None:
            request.since = StreamPosition(offset=since[0], epoch=since[1])
        return self._command("history", request, channel)

    def presence(self, channel: str) -> int:
        """Queue ``presence``; return its id."""
        return self._command("presence", PresenceRequest(channel=channel), channel)

    def presence_stats(self, channel: str) -> int:
        """Queue ``presence_stats``; return its id."""
        return self._command("presence_stats", PresenceStatsRequest(channel=channel), channel)

    def rpc(self, method: str, data: bytes | None) -> int:
        """Queue ``rpc`` with already-encoded JSON ``data``; return its id."""
        return self._command("rpc", RPCRequest(method=method, data=raw(data)))

    def refresh(self, token: str) -> int:
        """Queue ``refresh`` with a new connection token; return its id."""
        return self._command("refresh", RefreshRequest(token=token))

    def sub_refresh(self, channel: str, token: str) -> int:
        """Queue ``sub_refresh`` with a new subscription token; return its id."""
        return self._command("sub_refresh", SubRefreshRequest(channel=channel, token=token))

    def send(self, data: bytes) -> None:
        """Queue ``send`` of already-encoded JSON ``data`` (no id, no reply)."""
        self._out.append(encode_command(Command(send=SendRequest(data=raw(data)))))

    def pong(self) -> None:
        """Queue a pong (``{}``)."""
        self._out.append(PONG)

    def forget(self, command_id: int) -> None:
        """Stop expecting a reply to ``command_id`` (it timed out); a late reply is ignored."""
        self._pending.pop(command_id, None)

    # -- state ----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Return and forget the queued commands as one frame (``b""`` when none)."""
        out = self._out
        self._out = []
        return b"\n".join(out)

    def position(self, channel: str) -> tuple[int, str] | None:
        """The tracked ``(offset, epoch)`` of a subscription, or ``None``."""
        return self._positions.get(channel)

    def forget_position(self, channel: str) -> None:
        """Stop tracking a channel's position (the subscription is over)."""
        self._positions.pop(channel, None)

    @property
    def server_side(self) -> frozenset[str]:
        """The channels the server subscribed this client to."""
        return frozenset(self._server_side)

    @property
    def pending(self) -> frozenset[int]:
        """The ids of commands still waiting for a reply."""
        return frozenset(self._pending)

    def connection_lost(self) -> list[int]:
        """The transport closed: return the ids of unanswered commands and forget them.

        Positions are kept, so the next connection can resubscribe with recovery.
        """
        lost = list(self._pending)
        self._pending.clear()
        self._out.clear()
        self.state = ClientState.DISCONNECTED
        self.connect_result = None
        return lost

    # -- input ----------------------------------------------------------------------------

    def receive(self, data: bytes | str) -> list[SessionEvent]:
        """Parse one frame (one or more ``\\n``-separated messages) into events, in order.

        Raises:
            ProtocolError: the frame is not valid Centrifuge JSON, or a reply
                does not fit its command.
        """
        events: list[SessionEvent] = []
        for reply in decode_replies(data):
            if reply.id:
                self._reply(reply, events)
            elif reply.push is not None:
                self._push(reply, events)
            elif reply.error is not None:
                raise ProtocolError(f"an error without a command id: {reply.error.message!r}")
            else:
                events.append(PingReceived())
                connected = self.connect_result
                if connected is not None and connected.pong:
                    self.pong()
        return events

    def _reply(self, reply: Reply, events: list[SessionEvent]) -> None:
        entry = self._pending.pop(reply.id, None)
        if entry is None:
            return  # forgotten (timed out) or never sent: nothing waits for it
        method, channel = entry
        if reply.error is not None:
            if method == "connect":
                self.state = ClientState.DISCONNECTED
            events.append(ReplyReceived(reply.id, method, error=reply.error))
            return
        result = getattr(reply, method, None)
        if method == "connect":
            if not isinstance(result, ConnectResult):
                raise ProtocolError("the reply to connect has no connect result")
            self.state = ClientState.CONNECTED
            self.connect_result = result
        events.append(ReplyReceived(reply.id, method, result))
        if method == "subscribe" and isinstance(result, SubscribeResult):
            self._subscribed(channel, result, events)
        elif method == "connect" and isinstance(result, ConnectResult):
            self._server_subscribed(result, events)

    def _server_subscribed(self, result: ConnectResult, events: list[SessionEvent]) -> None:
        """The server-side subscriptions of a connect result, with their recovered publications."""
        subs = result.subs or {}
        for gone in self._server_side - set(subs):
            self._positions.pop(gone, None)
        self._server_side = set(subs)
        for channel, sub in subs.items():
            events.append(SubscribedPush(channel, sub))
            self._subscribed(channel, sub, events)

    def _subscribed(
        self, channel: str, result: SubscribeResult, events: list[SessionEvent]
    ) -> None:
        positioned = result.positioned or result.recoverable or bool(result.epoch)
        if not positioned:
            self._positions.pop(channel, None)
            return
        known = self._positions.get(channel)
        if result.recovered and known is not None and known[1] == result.epoch:
            for pub in result.publications or ():
                if self._fresh(channel, pub):
                    events.append(PublicationReceived(channel, pub, recovered=True))
        self._positions[channel] = (result.offset, result.epoch)

    def _fresh(self, channel: str, pub: Publication) -> bool:
        """Whether a publication is new; advances the channel's position if so."""
        if not pub.offset:
            return True
        known = self._positions.get(channel)
        if known is None:
            return True
        if pub.offset <= known[0]:
            self.duplicates += 1
            return False
        self._positions[channel] = (pub.offset, known[1])
        return True

    def _push(self, reply: Reply, events: list[SessionEvent]) -> None:
        push = reply.push
        assert push is not None
        channel = push.channel
        if push.pub is not None:
            if self._fresh(channel, push.pub):
                events.append(PublicationReceived(channel, push.pub))
        elif push.join is not None:
            events.append(JoinReceived(channel, push.join.info or ClientInfo()))
        elif push.leave is not None:
            events.append(LeaveReceived(channel, push.leave.info or ClientInfo()))
        elif push.unsubscribe is not None:
            event = UnsubscribedPush(channel, push.unsubscribe.code, push.unsubscribe.reason)
            if not event.resubscribe:
                self._positions.pop(channel, None)
                self._server_side.discard(channel)
            events.append(event)
        elif push.subscribe is not None:
            sub = push.subscribe
            if sub.positioned or sub.recoverable or sub.epoch:
                self._positions[channel] = (sub.offset, sub.epoch)
            self._server_side.add(channel)
            result = SubscribeResult(
                recoverable=sub.recoverable,
                epoch=sub.epoch,
                offset=sub.offset,
                positioned=sub.positioned,
                data=sub.data,
            )
            events.append(SubscribedPush(channel, result))
        elif push.disconnect is not None:
            events.append(DisconnectReceived(push.disconnect.code, push.disconnect.reason))
        elif push.message is not None:
            events.append(MessageReceived(bytes(push.message.data)))
        # connect and refresh pushes concern unidirectional transports: nothing to do.
