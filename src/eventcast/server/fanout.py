"""What one batch of a channel's publications becomes for each kind of member.

A channel's dispatcher (:class:`~eventcast.server.channels.HubChannel`) takes a
batch of events and gives every member the bytes it needs. Work is done once
per *variant*, never once per connection:

* **plain** members (no filter, no delta, no conflation) share one payload per
  :class:`~eventcast.protocol.encodings.Encoding`: each publication is encoded
  once per encoding (in a batch of several, JSON and the unidirectional JSON
  share the publication bytes; only the wrapper differs; a batch of one is
  encoded in one call) and the pushes are joined once;
* members with a **tags filter** share one payload per distinct filter and
  encoding; each distinct filter is evaluated once per publication
  (:class:`~eventcast.protocol.filters.MatchCache`);
* members with **fossil deltas** get each publication as a delta against the
  previous publication of the channel, when the delta is smaller; the delta is
  computed once per publication and wrapped once per encoding. A member whose
  base is not that previous publication (it just subscribed or recovered, or it
  skipped publications while conflated) gets the publication in full; a batch
  is therefore at most two payloads per encoding (continuing, or not);
* members of a namespace with a **conflation key**, while their connection is
  behind (more than a quarter of its queue limit waiting to be written,
  counting what the socket's transport holds), are not queued the batch:
  :class:`Backlogs` keeps for them only the newest publication per key (the
  bytes already encoded for the batch), and queues those when the connection
  has drained to an eighth of its limit. Offsets show what was skipped; a
  delta member then gets full publications, so its base is always one it has.

Nothing here awaits; the dispatcher calls it in one loop turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .._conflation import LatestByKey, conflation_key
from ..events import Event
from ..exceptions import EncodeError, PositionError
from ..protocol import codes
from ..protocol.codec import publication_fields
from ..protocol.delta import FOSSIL, smaller_delta
from ..protocol.encodings import Encoding
from ..protocol.filters import FilterError, MatchCache, TagFilter, compile_filter
from ..protocol.frames import Publication, StreamPosition, SubscribeRequest, raw
from ..replay import Replay
from .errors import CommandError

if TYPE_CHECKING:
    from ..bus import Bus
    from .channels import Membership
    from .config import NamespaceConfig
    from .connection import Connection

__all__ = [
    "BACKLOG_POLL",
    "MAX_BACKLOG_KEYS",
    "Backlogs",
    "Batch",
    "SubscriptionOptions",
    "delta_mode",
    "latest_publication",
    "subscription_options",
]

logger = logging.getLogger("eventcast.server")

#: Most distinct keys held for one member of a conflating channel; past it the
#: connection is closed with 3008 "slow" (it is not a latest-value stream).
MAX_BACKLOG_KEYS: Final = 4096
#: Seconds between checks of whether behind connections have drained.
BACKLOG_POLL: Final = 0.01

# A batch's failures while it has none (a set is made at the first).
_NONE: Final[frozenset[int]] = frozenset()

# One item of a conflation backlog: the publication and its push, encoded.
_Item = tuple[Event, bytes]


class Batch:
    """One batch of a channel's publications, encoded lazily, once per variant.

    Args:
        channel: the channel (or pattern) the members subscribed to.
        pattern: the channel is a pattern (the publication names its topic).
        events: the batch, in stream order.
        before: the publication the channel delivered just before the batch
            (the delta base of its first publication), or ``None``.
    """

    __slots__ = (
        "_delta_full",
        "_deltas",
        "_filtered",
        "_matches",
        "_payloads",
        "_publications",
        "_pushes",
        "before",
        "channel",
        "events",
        "failed",
        "pattern",
    )

    def __init__(
        self, channel: str, pattern: bool, events: list[Event], before: Event | None
    ) -> None:
        self.channel = channel
        self.pattern = pattern
        self.events = events
        self.before = before
        #: Indexes of the events that could not be encoded (skipped for every member).
        self.failed: set[int] | frozenset[int] = _NONE
        self._pushes: dict[Encoding, list[bytes | None]] = {}
        self._payloads: dict[Encoding, bytes] = {}
        # (The caches most batches never use are made on first use.)
        self._publications: dict[Callable[..., bytes], list[bytes | None]] | None = None
        self._filtered: dict[tuple[Encoding, TagFilter], bytes] | None = None
        self._matches: list[MatchCache] | None = None
        self._deltas: list[bytes | None] | None = None
        self._delta_full: dict[tuple[Encoding, str], list[bytes | None]] | None = None

    # -- plain ---------------------------------------------------------------------------

    def _failed_at(self, i: int, exc: EncodeError) -> None:
        """Event ``i`` cannot be encoded: it is skipped for every member (logged once)."""
        failed = self.failed
        if i not in failed:
            if not isinstance(failed, set):
                failed = self.failed = set()
            failed.add(i)
            logger.warning("skipping an event on %r for network clients: %s", self.channel, exc)

    def _publications_of(self, encoding: Encoding) -> list[bytes | None]:
        encode = encoding.publication_of
        cache = self._publications
        if cache is None:
            cache = self._publications = {}
        found = cache.get(encode)
        if found is None:
            found = cache[encode] = []
            for i, event in enumerate(self.events):
                try:
                    found.append(encode(event, concrete_channel=self.pattern))
                except EncodeError as exc:
                    found.append(None)
                    self._failed_at(i, exc)
        return found

    def pushes(self, encoding: Encoding) -> list[bytes | None]:
        """The publication push of each event in ``encoding`` (``None``: not encodable)."""
        found = self._pushes.get(encoding)
        if found is None:
            channel = self.channel
            events = self.events
            if len(events) == 1:  # (many channels' usual batch: its push in one call)
                try:
                    push: bytes | None = encoding.publication_push(
                        channel, events[0], concrete_channel=self.pattern
                    )
                except EncodeError as exc:
                    push = None
                    self._failed_at(0, exc)
                found = self._pushes[encoding] = [push]
                return found
            wrap = encoding.encode_pub_push
            found = self._pushes[encoding] = [
                None if pub is None else wrap(channel, pub)
                for pub in self._publications_of(encoding)
            ]
        return found

    def payload(self, encoding: Encoding) -> bytes:
        """Every publication push in ``encoding``, joined (empty when none could be encoded)."""
        found = self._payloads.get(encoding)
        if found is None:
            pushes = self.pushes(encoding)
            if len(pushes) == 1:  # one publication (many channels' usual batch): no join
                found = pushes[0] or b""
            else:
                parts = [push for push in pushes if push is not None]
                found = encoding.join(parts) if parts else b""
            self._payloads[encoding] = found
        return found

    # -- tags filters ----------------------------------------------------------------------

    def _match_caches(self) -> list[MatchCache]:
        caches = self._matches
        if caches is None:
            caches = self._matches = [
                MatchCache(publication_fields(event, concrete_channel=self.pattern)[0])
                for event in self.events
            ]
        return caches

    def matching(self, tag_filter: TagFilter) -> list[bool]:
        """Whether each event passes ``tag_filter`` (each distinct filter evaluated once)."""
        return [matches(tag_filter) for matches in self._match_caches()]

    @property
    def filter_evaluations(self) -> int:
        """How many filters were evaluated for this batch (each distinct one once per event)."""
        return sum(matches.evaluations for matches in self._matches or ())

    def filtered(self, encoding: Encoding, tag_filter: TagFilter) -> bytes:
        """The pushes of the events that pass ``tag_filter``, joined."""
        key = (encoding, tag_filter)
        cache = self._filtered
        if cache is None:
            cache = self._filtered = {}
        found = cache.get(key)
        if found is None:
            parts = [
                push
                for push, ok in zip(self.pushes(encoding), self.matching(tag_filter), strict=True)
                if ok and push is not None
            ]
            found = cache[key] = encoding.join(parts) if parts else b""
        return found

    # -- deltas --------------------------------------------------------------------------

    def _delta(self, i: int) -> bytes | None:
        """The fossil delta of event ``i`` against the one before it, if smaller (once each)."""
        deltas = self._deltas
        if deltas is None:
            deltas = self._deltas = []
            previous = self.before
            for event in self.events:
                made: bytes | None = None
                if previous is not None:
                    try:
                        made = smaller_delta(previous.encoded_data(), event.encoded_data())
                    except EncodeError:
                        made = None
                deltas.append(made)
                previous = event
        return deltas[i]

    def delta_pushes(self, encoding: Encoding, mode: str) -> list[bytes | None]:
        """The pushes of a delta subscription: deltas where smaller, the rest in full.

        ``mode``: ``"continuing"`` (the member's base is :attr:`before`: it was
        given the previous publication, so the first event may be a delta too),
        ``"fresh"`` (the first in full), ``"full"`` (every one in full).
        """
        key = (encoding, mode)
        cache = self._delta_full
        if cache is None:
            cache = self._delta_full = {}
        found = cache.get(key)
        if found is not None:
            return found
        found = cache[key] = []
        deltas = mode != "full"
        previous_given = mode == "continuing" and self.before is not None
        channel = self.channel
        for i, event in enumerate(self.events):
            try:
                full = event.encoded_data()
            except EncodeError as exc:
                self._failed_at(i, exc)
                found.append(None)
                previous_given = False
                continue
            data: bytes | None = None
            is_delta = False
            if previous_given and deltas:
                delta = self._delta(i)
                if delta is not None:
                    data = encoding.delta_data(delta)
                    is_delta = data is not None
            if data is None:
                data = encoding.delta_data(full)
            if data is None:  # cannot happen for JSON text; kept safe
                found.append(None)
                previous_given = False
                continue
            pub = encoding.encode_publication(
                data, offset=event.offset, tags=event.tags or None, delta=is_delta
            )
            found.append(encoding.encode_pub_push(channel, pub))
            previous_given = True
        return found

    # -- per member ----------------------------------------------------------------------

    def items(self, membership: Membership, encoding: Encoding) -> list[_Item]:
        """The events a member would be given, each with its push (in full for deltas)."""
        pushes = self.delta_pushes(encoding, "full") if membership.delta else self.pushes(encoding)
        tag_filter = membership.tag_filter
        wanted = self.matching(tag_filter) if tag_filter is not None else None
        return [
            (event, push)
            for i, (event, push) in enumerate(zip(self.events, pushes, strict=True))
            if push is not None and (wanted is None or wanted[i])
        ]

    def for_member(self, membership: Membership, encoding: Encoding, *, fresh: bool) -> bytes:
        """The payload of a member that is not plain (filter or delta), noting its delta base.

        ``fresh``: the batch is given to this member alone (after its
        subscribe): its deltas would be computed for one connection, so it gets
        every publication in full.
        """
        if membership.tag_filter is not None:
            return self.filtered(encoding, membership.tag_filter)
        if not membership.delta:
            return self.payload(encoding)
        if fresh:
            mode = "full"
        elif self.before is not None and membership.delta_base is self.before:
            mode = "continuing"
        else:
            mode = "fresh"
        pushes = self.delta_pushes(encoding, mode)
        parts = [push for push in pushes if push is not None]
        given = [event for event, push in zip(self.events, pushes, strict=True) if push]
        if given:
            membership.delta_base = given[-1]
        return encoding.join(parts) if parts else b""


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """How a member is given publications (from its subscribe request and namespace)."""

    tag_filter: TagFilter | None = None
    delta: bool = False
    conflation_key: str | None = None


def subscription_options(
    ns: NamespaceConfig, req: SubscribeRequest, *, pattern: bool
) -> SubscriptionOptions:
    """Negotiate a subscription's delivery options, as Centrifugo does.

    ``delta: "fossil"`` is accepted where the namespace's
    ``allowed_delta_types`` lists it (not for patterns); a delta type the
    namespace does not allow is simply not negotiated (the result says
    ``delta: false``). A tags filter (``tf``) is compiled and bounded
    (:data:`~eventcast.protocol.filters.DEFAULT_FILTER_LIMITS`).

    Raises:
        CommandError: 107 for an unknown delta type, a malformed filter, a
            filter with deltas, or a filter where ``allow_tags_filter`` is off.
    """
    delta = False
    if req.delta:
        if req.delta != FOSSIL:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message("unknown delta type"))
        delta = FOSSIL in ns.allowed_delta_types and not pattern
    tag_filter: TagFilter | None = None
    if req.tf is not None:
        if not ns.allow_tags_filter:
            raise CommandError(
                codes.ERROR_BAD_REQUEST.with_message("tags filter not allowed in this namespace")
            )
        if req.delta:
            raise CommandError(
                codes.ERROR_BAD_REQUEST.with_message("cannot use delta and tags filter together")
            )
        try:
            tag_filter = compile_filter(req.tf)
        except FilterError as exc:
            raise CommandError(codes.ERROR_BAD_REQUEST.with_message(str(exc))) from None
    return SubscriptionOptions(tag_filter, delta, ns.conflation_key)


def delta_mode(publications: list[Publication], encoding: Encoding) -> None:
    """Put publications of a subscribe reply in delta form (JSON: data as a JSON string).

    A subscription that negotiated deltas reads every publication's data in
    delta form, the recovered ones too; they are sent in full.
    """
    for pub in publications:
        data = encoding.delta_data(bytes(pub.data))
        if data is not None:
            pub.data = raw(data)


async def latest_publication(
    bus: Bus, channel: str, since: StreamPosition | None, *, recover: bool
) -> Replay:
    """Cache recovery mode: the channel's head and, when recovering, its latest publication.

    A subscriber already at the head (same epoch) is given nothing; any other
    recovering subscriber is given the latest publication (if history still
    keeps it) and is ``recovered``: in this mode the latest value is the
    state. The handoff floor is the head, so the live stream continues after it.

    Raises:
        LogError: the log failed.
    """
    head = await bus.replay(channel, None)
    position = head.position
    if not recover:
        return head
    if position.offset == 0 or (
        since is not None and since.epoch == position.epoch and since.offset >= position.offset
    ):
        return Replay([], position, True, position.offset)
    try:
        page = await bus.history(channel, since=(position.offset - 1, position.epoch), limit=1)
    except PositionError:  # the epoch changed meanwhile: the live stream has the new one
        return Replay([], position, True, position.offset)
    events = [event for event in page.events if event.offset == position.offset]
    return Replay(events, position, True, position.offset)


class Backlogs:
    """The conflation backlogs of members whose connection is behind, and their release.

    Args:
        on_conflated: called with the number of publications skipped (a
            newer one of the same key replaced them).
    """

    def __init__(self, on_conflated: Callable[[int], None]) -> None:
        self._on_conflated = on_conflated
        self._behind: dict[Connection, list[Membership]] = {}
        self._timer: asyncio.TimerHandle | None = None

    @staticmethod
    def behind(conn: Connection) -> bool:
        """Whether a connection has fallen behind: a quarter of its queue limit waits."""
        return conn.queued_bytes() > conn.queue_limit // 4

    def hold(self, conn: Connection, membership: Membership, items: list[_Item]) -> None:
        """Keep ``items`` for a member of a conflating channel until its connection drains."""
        backlog = membership.backlog
        if backlog is None:
            tag = membership.conflation_key
            size = [0]

            def key(item: _Item) -> Hashable:
                return conflation_key(item[0], tag)

            def superseded(item: _Item) -> None:
                size[0] -= len(item[1])
                self._on_conflated(1)

            backlog = membership.backlog = LatestByKey(key, superseded)
            membership.backlog_size = size
            self._behind.setdefault(conn, []).append(membership)
            self._arm()
        size = membership.backlog_size
        for item in items:
            size[0] += len(item[1])
            backlog.append(item)
        if len(backlog) > MAX_BACKLOG_KEYS or size[0] > conn.queue_limit:
            conn.close(codes.DISCONNECT_SLOW)

    def _arm(self) -> None:
        if self._timer is None and self._behind:
            self._timer = asyncio.get_running_loop().call_later(BACKLOG_POLL, self._check)

    def _check(self) -> None:
        self._timer = None
        for conn, memberships in list(self._behind.items()):
            if conn.closed:
                del self._behind[conn]
                for membership in memberships:
                    membership.backlog = None
                continue
            if conn.queued_bytes() > conn.queue_limit // 8:
                continue
            del self._behind[conn]
            for membership in memberships:
                self.release(conn, membership)
        self._arm()

    @staticmethod
    def release(conn: Connection, membership: Membership) -> None:
        """Queue a member's backlog (the newest publication per key, in order) and end it."""
        backlog = membership.backlog
        membership.backlog = None
        if backlog is None or conn.channels.get(membership.channel) is not membership:
            return
        items = list(backlog)
        if not items:
            return
        if membership.delta:
            membership.delta_base = items[-1][0]  # given in full: the client's base now
        conn.enqueue(conn.encoding.join([push for _, push in items]))

    def close(self) -> None:
        """Stop checking (the hub is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._behind.clear()
