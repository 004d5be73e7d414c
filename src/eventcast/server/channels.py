"""Channels with members on this node: one bus subscription and one dispatcher each.

Fan-out works per channel. Each channel any client subscribed to has one bus
subscription and one dispatcher. A dispatcher is no task: its subscription
calls it back when events arrive, and one callback at the end of the loop turn
dispatches every channel that got events in it (no task switch and no future
per channel and publication). The dispatcher takes a batch of events,
encodes each publication push once per encoding, joins the batch into one
payload per encoding, and queues that same payload object for every member
speaking that encoding; the connections write it in one frame at the end of
the loop turn (at once when this channel is the only one dispatched in it and
nothing else is queued for the connection: no other payload could join it).
Members with a tags filter, fossil deltas or a conflating namespace get what
:mod:`eventcast.server.fanout` prepares, still once per variant rather than per
connection. SSE members get the batch encoded for
their stream position (see :mod:`eventcast.server.sse`). There is no task and
no encoding per delivery.

A member that is subscribing holds the live events aside until its subscribe
reply (and replay) has been queued; after that, a member that was given a
replay or a position keeps a :class:`~eventcast.replay.Handoff` until the
live stream passes it, so no offset is ever given to it twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec

from .._conflation import LatestByKey
from ..events import Event
from ..exceptions import SlowConsumerError, SubscriptionClosedError
from ..protocol import codes
from ..protocol.encodings import Encoding
from ..protocol.filters import TagFilter
from ..protocol.frames import ClientInfo
from ..replay import Handoff
from ..subscription import Overflow, Subscription
from ..topics import is_pattern
from .connection import Connection, Flusher, FrameCache
from .fanout import Backlogs, Batch

if TYPE_CHECKING:
    from ..bus import Bus
    from .auth import SubscriptionClaims

__all__ = ["CHANNEL_BUFFER", "Channels", "HubChannel", "Membership"]

logger = logging.getLogger("eventcast.server")

#: Buffer of each channel's bus subscription, in events. Past it the channel's
#: members get 3010 "insufficient state" and recover on reconnect.
CHANNEL_BUFFER: Final = 65_536

#: Most events one channel dispatches in one loop turn.
DISPATCH_BATCH: Final = 4096

#: Delivers a batch to an SSE member (encoded per stream position); returns
#: how many events could not be encoded.
SSEDeliver = Callable[[Connection, list[Event], dict[object, object]], int]
#: Called when a member left a channel (presence and leave pushes follow it).
LeftHandler = Callable[[Connection, "HubChannel", "Membership"], None]


class _MembershipHot:
    """The fields a dispatch reads for every member, laid out first in a membership
    (CPython lays a base class's slots out before its subclass's): with the
    object's header they fit in one cache line."""

    __slots__ = ("handoff", "held", "plain")


@dataclass(slots=True)
class Membership(_MembershipHot):
    """A connection's subscription to one channel."""

    channel: str
    server_side: bool = False
    #: Events held while the subscribe reply (and its replay) is being prepared.
    held: list[Event] | None = field(default_factory=list)
    #: The handoff rule after a replay or a position was given (see eventcast.replay).
    handoff: Handoff | None = None
    expires_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    #: The client receives join and leave pushes for this channel.
    join_leave: bool = False
    #: The client is listed in the channel's presence.
    presence: bool = False
    #: Channel information of this subscriber from a subscribe hook, encoded once.
    info: bytes | None = None
    #: Called instead of closing with 3006 when the subscription expires (a
    #: sub_refresh hook decides then).
    on_expire: Callable[[Connection, Membership], None] | None = None
    #: The claims of the subscription token it was granted by, if any.
    token: SubscriptionClaims | None = None
    #: Only publications whose tags pass this filter are given (``tf``).
    tag_filter: TagFilter | None = None
    #: Fossil deltas were negotiated (``delta: "fossil"``).
    delta: bool = False
    #: The namespace's conflation tag: the member is conflated when behind.
    conflation_key: str | None = None
    #: Given the batch's shared payload as is (no filter, delta or conflation).
    plain: bool = field(init=False)
    #: The publication last given in delta mode: its data is the client's base.
    delta_base: Event | None = None
    #: While the connection is behind: the newest publication per key, encoded.
    backlog: LatestByKey[tuple[Event, bytes]] | None = None
    #: The bytes held in :attr:`backlog` (a cell its callbacks update).
    backlog_size: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        self.plain = self.tag_filter is None and not self.delta and self.conflation_key is None

    def arm_expiry(self, conn: Connection) -> None:
        """Close ``conn`` with 3006 when this subscription expires (or call :attr:`on_expire`)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        expected = self.expires_at
        if expected is None:
            return

        def check() -> None:
            if self.expires_at == expected and not conn.closed:
                if self.on_expire is not None:
                    self.on_expire(conn, self)
                else:
                    conn.close(codes.DISCONNECT_SUB_EXPIRED)

        delay = max(0.0, expected - time.time()) + 0.05
        self.timer = asyncio.get_running_loop().call_later(delay, check)


_client_info = msgspec.json.Decoder(ClientInfo).decode


class HubChannel:
    """One channel (or pattern) with members on this node: its bus subscription and dispatcher.

    The dispatcher is not a task: the subscription calls :meth:`_ready` when
    events arrive, and :class:`Channels` dispatches every channel that became
    ready in one callback at the end of the loop turn.
    """

    __slots__ = (
        "_channels",
        "_dispatched",
        "_keeps_last",
        "last_event",
        "last_offset",
        "members",
        "name",
        "pattern",
        "publications",
        "queued",
        "stopped",
        "sub",
    )

    def __init__(self, channels: Channels, name: str, sub: Subscription) -> None:
        self._channels = channels
        self.name = name
        self.pattern = is_pattern(name)
        #: The members and their subscriptions (changed only by :meth:`add` and :meth:`remove`).
        self.members: dict[Connection, Membership] = {}
        # The members as dispatched (a snapshot: a member may leave during a
        # dispatch), kept until the members change: the connections and their
        # memberships, in two tuples (no pair object to read per member).
        self._dispatched: tuple[tuple[Connection, ...], tuple[Membership, ...]] | None = None
        self.sub = sub
        self.publications = 0
        self.last_offset = 0
        #: The last publication dispatched: the delta base of the next one (kept
        #: only while a member takes deltas; see :meth:`_dispatch`).
        self.last_event: Event | None = None
        self._keeps_last = False
        #: Queued for this turn's dispatch.
        self.queued = False
        #: Stopped: closed, or its dispatch failed or fell behind.
        self.stopped = False
        sub._on_ready(self._ready)
        sub._listen()

    def add(self, conn: Connection, membership: Membership) -> None:
        """Make ``conn`` a member (or replace its membership)."""
        members = self.members
        if conn not in members:
            self._channels.subscriptions += 1
        members[conn] = membership
        self._dispatched = None

    def remove(self, conn: Connection) -> None:
        """Remove ``conn`` from the members, if it is one."""
        if self.members.pop(conn, None) is not None:
            self._channels.subscriptions -= 1
            self._dispatched = None

    def batch(self, events: list[Event], *, fresh: bool = False) -> Batch:
        """A batch of this channel's publications (``fresh``: given to one member alone)."""
        return Batch(self.name, self.pattern, events, None if fresh else self.last_event)

    def _ready(self) -> None:
        if not self.queued and not self.stopped:
            self.queued = True
            self._channels.schedule(self)

    def dispatch(self, frames: FrameCache | None = None) -> None:
        """Give the buffered events (up to :data:`DISPATCH_BATCH`) to the members; never raises.

        ``frames``: this channel is the only one dispatched in this loop turn
        (see :class:`~.connection.Flusher`), so a plain member's payload is
        written at once (:meth:`Connection.write_now`) rather than queued for
        the turn's flush.
        """
        self.queued = False
        if self.stopped:
            return
        sub = self.sub
        try:
            events = sub._take(DISPATCH_BATCH)
            if events:
                self._dispatch(events, frames)
            # (A dispatch that closed the channel closed its subscription: nothing is
            # buffered then, and _listen raises SubscriptionClosedError.)
            if sub.buffered:
                self._ready()  # more than one batch: the rest in the next turn
            else:
                sub._listen()
        except SlowConsumerError:
            # The dispatcher fell behind: continuity is lost for every member.
            self.stopped = True
            self._channels.overflowed(self)
        except SubscriptionClosedError:
            self.stopped = True
        except Exception:
            self.stopped = True
            logger.exception("dispatcher of %r failed", self.name)
            for conn in list(self.members):
                conn.close(codes.DISCONNECT_SERVER_ERROR)

    def _dispatch(self, events: list[Event], frames: FrameCache | None) -> None:
        channels = self._channels
        self.publications += len(events)
        offset = events[-1].offset
        if offset:
            self.last_offset = offset
        batch = self.batch(events)
        encoding: Encoding | None = None
        payload = b""
        sse_cache: dict[object, object] | None = None
        dispatched = self._dispatched
        if dispatched is None:
            dispatched = self._dispatched = (tuple(self.members), tuple(self.members.values()))
            self._keeps_last = any(membership.delta for membership in dispatched[1])
        for conn, membership in zip(*dispatched, strict=True):
            held = membership.held
            if held is not None:
                held.extend(events)
            elif membership.handoff is not None:
                channels.give(conn, membership, events)
            elif conn.sse:
                if sse_cache is None:
                    sse_cache = {}
                channels.encode_failures += channels.deliver_sse(conn, events, sse_cache)
            elif membership.plain:
                if conn.encoding is not encoding:
                    encoding = conn.encoding
                    payload = batch.payload(encoding)
                if payload:
                    if frames is not None:
                        conn.write_now(payload, frames)
                    else:
                        conn.enqueue(payload)
            else:
                channels.deliver(conn, membership, batch)
        # Kept for a delta member's next batch only: held until the channel's next
        # publication, an event would be cold when freed (and hold its data).
        self.last_event = events[-1] if self._keeps_last else None
        channels.encode_failures += len(batch.failed)

    def close(self) -> None:
        """Stop dispatching and close the bus subscription."""
        self.stopped = True
        self.sub.close()


class Channels:
    """The channels with members on this node.

    Args:
        bus: where each channel's subscription comes from.
        deliver_sse: delivers a batch to an SSE member.
        on_left: called after a member left a channel, whatever the reason.
        flusher: the end of the loop turn its channels dispatch at (the hub's,
            so its connections are written in the same callback); its own if
            not given.
    """

    def __init__(
        self,
        bus: Bus,
        deliver_sse: SSEDeliver,
        on_left: LeftHandler,
        flusher: Flusher | None = None,
    ) -> None:
        self._bus = bus
        self.deliver_sse = deliver_sse
        self._on_left = on_left
        self.by_name: dict[str, HubChannel] = {}
        #: The members of the channels in :attr:`by_name`, added up: kept as they
        #: join and leave, since a node's heartbeat reads it every few seconds (a
        #: sum over the channels, with a pass over the users, held the loop for
        #: 0.7 ms at 20,000 of each and 51 ms at a million).
        self.subscriptions = 0
        self._ids = itertools.count(1)
        #: Publications that could not be encoded for network clients.
        self.encode_failures = 0
        #: Called with ``(channel, True)`` when a channel (not a pattern) gets its
        #: first member on this node, ``(channel, False)`` when it lost its last.
        self.occupancy_listeners: list[Callable[[str, bool], None]] = []
        #: Publications a conflated member skipped (a newer one of its key replaced them).
        self.conflated = 0
        self.backlogs = Backlogs(self._count_conflated)
        #: Dispatch a channel at the end of this loop turn.
        self.schedule: Callable[[HubChannel], None] = (flusher or Flusher()).dispatch_later

    def _occupancy(self, channel: HubChannel, occupied: bool) -> None:
        if channel.pattern:
            return
        for listener in list(self.occupancy_listeners):
            try:
                listener(channel.name, occupied)
            except Exception:
                logger.exception("an occupancy listener failed")

    def _count_conflated(self, count: int) -> None:
        self.conflated += count

    async def join(self, conn: Connection, name: str, membership: Membership) -> HubChannel:
        """Add ``conn`` to a channel (created on first member); it holds live events for now.

        Returns once publications to the channel from every node reach this
        one (see :meth:`Bus.routed`): what the caller reads of the log's head
        after this misses nothing live.

        Raises:
            BackplaneError: the backplane did not confirm the subscription
                (``conn`` is not in the channel).
        """
        channel = self.by_name.get(name)
        if channel is None:
            sub = self._bus.subscribe(
                name,
                id=f"hub:{name}:{next(self._ids)}",
                maxsize=CHANNEL_BUFFER,
                overflow=Overflow.DISCONNECT,
            )
            channel = self.by_name[name] = HubChannel(self, name, sub)
            self._occupancy(channel, True)
        channel.add(conn, membership)
        conn.channels[name] = membership
        try:
            await self._bus.routed(name)
        except BaseException:
            self.leave(conn, name)
            raise
        return channel

    def leave(self, conn: Connection, name: str) -> None:
        """Remove ``conn`` from a channel (closed with its last member)."""
        membership = conn.channels.pop(name, None)
        if membership is not None and membership.timer is not None:
            membership.timer.cancel()
        channel = self.by_name.get(name)
        if channel is None:
            return
        channel.remove(conn)
        if membership is not None:
            self._on_left(conn, channel, membership)
        if not channel.members:
            del self.by_name[name]
            channel.close()
            self._occupancy(channel, False)

    def release(self, conn: Connection, membership: Membership) -> None:
        """Start live delivery after the subscribe reply: the held events, under the handoff."""
        held = membership.held or []
        membership.held = None
        channel = self.by_name.get(membership.channel)
        if channel is not None and held:
            self.give(conn, membership, held)

    def give(self, conn: Connection, membership: Membership, events: list[Event]) -> None:
        """Deliver a batch to one member alone, under its handoff rule (the rare path)."""
        handoff = membership.handoff
        if handoff is not None:
            events = handoff.filter(events)
            if handoff.passed:
                membership.handoff = None
        if not events:
            return
        if conn.sse:
            self.encode_failures += self.deliver_sse(conn, events, {})
            return
        channel = self.by_name.get(membership.channel)
        if channel is None:
            return
        batch = channel.batch(events, fresh=True)
        self.deliver(conn, membership, batch, fresh=True)
        self.encode_failures += len(batch.failed)

    def deliver(
        self, conn: Connection, membership: Membership, batch: Batch, *, fresh: bool = False
    ) -> None:
        """Give a batch to a member that is not plain: filtered, in deltas, or conflated."""
        encoding = conn.encoding
        if membership.conflation_key is not None and (
            membership.backlog is not None or self.backlogs.behind(conn)
        ):
            self.backlogs.hold(conn, membership, batch.items(membership, encoding))
            return
        payload = batch.for_member(membership, encoding, fresh=fresh)
        if payload:
            conn.enqueue(payload)

    def overflowed(self, channel: HubChannel) -> None:
        """A dispatcher fell behind its bus subscription: its members must recover."""
        if self.by_name.get(channel.name) is channel:
            del self.by_name[channel.name]
            # (Its members leave it no more: leave() finds the name's channel, if any.)
            self.subscriptions -= len(channel.members)
            self._occupancy(channel, False)
        for conn in list(channel.members):
            conn.close(codes.DISCONNECT_INSUFFICIENT_STATE)

    def push_join_leave(self, name: str, kind: str, info: bytes) -> None:
        """Push a join or leave (``info``: the client's encoded info) to members who want it."""
        channel = self.by_name.get(name)
        if channel is None:
            return
        pushes: dict[Encoding, bytes] = {}
        for conn, membership in channel.members.items():
            if membership.join_leave and membership.held is None:
                encoding = conn.encoding
                push = pushes.get(encoding)
                if push is None:
                    # JSON embeds the info as it is; Protobuf needs its fields.
                    body = _client_info(info) if encoding.binary else msgspec.Raw(info)
                    push = pushes[encoding] = encoding.encode_push(name, kind, {"info": body})
                conn.enqueue(push)

    def lost_continuity(self, topic: str, durable: bool) -> None:
        """Continuity of a topic was lost on this node: tell the clients that read it.

        A durable channel's members are disconnected with 3010 "insufficient
        state" and recover on reconnect; a live-only channel's WebSocket members
        get an unsubscribe push with 2500, on which the SDKs resubscribe, and
        SSE streams end so the browser reconnects.
        """
        channel = self.by_name.get(topic)
        if channel is None:
            return
        code, reason = codes.UNSUBSCRIBE_INSUFFICIENT_STATE
        body = {"code": code, "reason": reason}
        for conn in list(channel.members):
            if durable or conn.sse:
                conn.close(codes.DISCONNECT_INSUFFICIENT_STATE)
            else:
                self.leave(conn, topic)
                conn.push(topic, "unsubscribe", body)

    def close(self) -> None:
        """Stop every channel's dispatcher."""
        channels = list(self.by_name.values())
        self.by_name.clear()
        self.subscriptions = 0
        for channel in channels:
            channel.close()
            self._occupancy(channel, False)
        self.backlogs.close()

    def __len__(self) -> int:
        return len(self.by_name)
