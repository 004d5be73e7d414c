"""The history checker of the chaos harness: what each client got, against what was acknowledged.

Pure: no I/O, no clock, no asyncio. The harness (``benchmarks/chaos.py``)
records two things while its scenarios run:

* every **publish call** (:class:`Publish`): the data sent, when, and, if the
  hub acknowledged it, the offset and epoch it was committed at. A call that
  failed or timed out is *indeterminate*: the log may or may not have committed
  it (a hub killed between its commit and its answer), as in Jepsen's ``:info``
  operations;
* per client, **everything it received** on the channel, in arrival order
  (:class:`ClientHistory`): each subscribe reply (:class:`Subscribed`, with
  the position it asked to recover from and the ``recovered`` flag) and each
  publication (:class:`Received`), those replayed inside subscribe replies
  included.

:func:`check` then proves, per client:

* **no loss**: every acknowledged publication after the position of the
  client's first subscribe, up to ``end``, was received, except the gap of a
  ``recovered: false`` resume that was legal;
* **no duplicate**: no offset is received twice;
* **order**: offsets strictly increase, and a live publication is never at or
  below the position the last subscribe reply gave (the handoff rule: after a
  subscriber has been given offset N, it is never given N or anything below it
  again);
* **data**: what arrives at an offset equals what was acknowledged there (or,
  for an indeterminate call, what was sent, the same for every client);
* **recovery**: ``recovered: false`` only where it is legal, that is where the
  gap really exceeded the replay cap, the ``history_size`` retention or the
  ``history_ttl``; a changed epoch is never legal (every log the harness runs
  is durable and keeps its epoch).

Every finding is a :class:`Violation`; :class:`Verdict` adds them up with the
figures of the run (delivered, lost, duplicated, out of order, latency).
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from _common import percentile

__all__ = [
    "ClientHistory",
    "ClientResult",
    "Kind",
    "Publish",
    "Received",
    "Retention",
    "Subscribed",
    "Verdict",
    "Violation",
    "check",
    "summary",
]

#: How many violations of each kind a verdict keeps as examples.
SAMPLES_PER_KIND: Final = 20


class Kind(enum.Enum):
    """The kinds of violation the checker reports."""

    LOST = "lost"
    """An acknowledged publication the client should have received never arrived."""
    DUPLICATE = "duplicate"
    """An offset arrived a second time."""
    OUT_OF_ORDER = "out of order"
    """An offset arrived below the highest one the client already had."""
    STALE = "stale"
    """A live publication arrived at or below the position a subscribe reply gave."""
    WRONG_DATA = "wrong data"
    """The data at an offset differs from what was acknowledged there."""
    UNKNOWN = "unknown"
    """An offset nobody published (neither acknowledged nor an indeterminate call)."""
    UNRECOVERED = "illegal recovered:false"
    """A resume answered ``recovered: false`` although the gap was within every limit."""
    EPOCH_CHANGED = "epoch changed"
    """The stream's epoch changed (a durable log must keep it)."""
    NEVER_SUBSCRIBED = "never subscribed"
    """A client whose subscribe never succeeded."""


@dataclass(frozen=True, slots=True)
class Retention:
    """The limits that make a ``recovered: false`` legal (the hub's settings)."""

    history_size: int
    """The newest events of a topic the log keeps."""
    replay_cap: int
    """The most missed events a resume replays."""
    history_ttl: float = 0.0
    """Seconds an event is kept (0: no limit)."""


@dataclass(frozen=True, slots=True)
class Publish:
    """One publish call of the publisher."""

    data: Any
    """The data sent (a JSON value)."""
    sent_at: float
    """When the call started (the clients' clock)."""
    offset: int | None = None
    """The offset the hub acknowledged, or ``None``: the call failed (indeterminate)."""
    epoch: str | None = None
    """The epoch the hub acknowledged."""
    acked_at: float | None = None
    """When the acknowledgement arrived."""


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A successful subscribe reply."""

    at: float
    """When it arrived."""
    epoch: str
    """The stream's epoch in the reply."""
    offset: int
    """The stream's position in the reply (its head when the hub answered)."""
    since: int | None = None
    """The offset the client asked to recover from; ``None`` for a first subscribe."""
    since_epoch: str | None = None
    """The epoch of that position."""
    recovered: bool = False
    """The reply's ``recovered`` flag."""


@dataclass(frozen=True, slots=True)
class Received:
    """A publication that arrived (live, or replayed in a subscribe reply)."""

    at: float
    offset: int
    data: Any
    replayed: bool = False


class ClientHistory:
    """Everything one client received on one channel, in arrival order.

    Publications are kept in flat arrays, so a five-minute run with millions of
    receptions stays small; :meth:`records` yields them back as
    :class:`Subscribed` and :class:`Received` values. ``data`` objects are kept
    by reference: a harness that decodes each distinct payload once shares them
    between clients.
    """

    __slots__ = ("_at", "_data", "_offsets", "_replayed", "_subscribes", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._offsets = array("q")
        self._at = array("d")
        self._data: list[Any] = []
        self._replayed = bytearray()
        #: (index of the next reception, the reply)
        self._subscribes: list[tuple[int, Subscribed]] = []

    def subscribed(self, reply: Subscribed) -> None:
        """Record a subscribe reply (before the publications it replays)."""
        self._subscribes.append((len(self._offsets), reply))

    def received(self, at: float, offset: int, data: Any, *, replayed: bool = False) -> None:
        """Record a publication."""
        self._offsets.append(offset)
        self._at.append(at)
        self._data.append(data)
        self._replayed.append(replayed)

    @property
    def receptions(self) -> int:
        """How many publications were recorded."""
        return len(self._offsets)

    @property
    def subscribes(self) -> list[Subscribed]:
        """The subscribe replies, in order."""
        return [reply for _, reply in self._subscribes]

    def records(self) -> Iterator[Subscribed | Received]:
        """Every record in arrival order."""
        subscribes = iter(self._subscribes)
        upcoming = next(subscribes, None)
        for index in range(len(self._offsets)):
            while upcoming is not None and upcoming[0] <= index:
                yield upcoming[1]
                upcoming = next(subscribes, None)
            yield Received(
                self._at[index],
                self._offsets[index],
                self._data[index],
                bool(self._replayed[index]),
            )
        while upcoming is not None:
            yield upcoming[1]
            upcoming = next(subscribes, None)

    @classmethod
    def of(cls, name: str, records: Iterable[Subscribed | Received]) -> ClientHistory:
        """Build a history from records (for hand-made histories)."""
        history = cls(name)
        for record in records:
            if isinstance(record, Subscribed):
                history.subscribed(record)
            else:
                history.received(record.at, record.offset, record.data, replayed=record.replayed)
        return history


@dataclass(frozen=True, slots=True)
class Violation:
    """One finding of the checker."""

    kind: Kind
    client: str
    offset: int | None
    detail: str

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.kind.value}{where} ({self.client}): {self.detail}"


@dataclass(slots=True)
class ClientResult:
    """The figures of one client."""

    client: str
    delivered: int = 0
    """Distinct publications received (replayed ones included)."""
    replayed: int = 0
    """Of those, how many came in subscribe replies."""
    resumes: int = 0
    """Subscribes that asked to recover from a position."""
    recovered: int = 0
    """Of those, how many answered ``recovered: true``."""
    unrecovered_legal: int = 0
    """Of those, how many answered a legal ``recovered: false``."""
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Why each legal ``recovered: false`` was legal."""
    latencies: array[float] = field(default_factory=lambda: array("d"))
    """Publish call to live arrival, in seconds, for acknowledged publications."""


@dataclass(slots=True)
class Verdict:
    """The figures and findings of a whole run."""

    clients: int = 0
    published: int = 0
    """Publish calls."""
    acknowledged: int = 0
    """Of those, acknowledged ones."""
    delivered: int = 0
    replayed: int = 0
    resumes: int = 0
    recovered: int = 0
    unrecovered_legal: int = 0
    counts: dict[Kind, int] = field(default_factory=dict)
    """Violations by kind."""
    samples: dict[Kind, list[Violation]] = field(default_factory=dict)
    """The first :data:`SAMPLES_PER_KIND` violations of each kind."""
    notes: list[str] = field(default_factory=list)
    """Why the first legal ``recovered: false`` answers were legal."""
    latencies: array[float] = field(default_factory=lambda: array("d"))

    def add(self, violation: Violation) -> None:
        """Count a violation (and keep it as an example if there are few so far)."""
        self.counts[violation.kind] = self.counts.get(violation.kind, 0) + 1
        samples = self.samples.setdefault(violation.kind, [])
        if len(samples) < SAMPLES_PER_KIND:
            samples.append(violation)

    def count(self, *kinds: Kind) -> int:
        """How many violations of these kinds were found."""
        return sum(self.counts.get(kind, 0) for kind in kinds)

    @property
    def lost(self) -> int:
        """Acknowledged publications a client should have received and did not."""
        return self.count(Kind.LOST)

    @property
    def duplicated(self) -> int:
        """Publications received again."""
        return self.count(Kind.DUPLICATE)

    @property
    def out_of_order(self) -> int:
        """Publications below what the client already had (below its offset or position)."""
        return self.count(Kind.OUT_OF_ORDER, Kind.STALE)

    @property
    def ok(self) -> bool:
        """Whether no violation of any kind was found."""
        return not any(self.counts.values())

    def percentile_ms(self, q: float) -> float:
        """A percentile of the live latency, in milliseconds (NaN without samples)."""
        return percentile(self.latencies, q) * 1000.0

    def violations(self) -> Iterator[Violation]:
        """The kept examples, kind by kind."""
        for samples in self.samples.values():
            yield from samples


class _Truth:
    """What was published, indexed for the checks."""

    def __init__(self, publishes: Sequence[Publish]) -> None:
        self.acked: dict[int, Publish] = {}
        self.epochs: list[str] = []
        #: data of indeterminate calls, by their ``repr`` (JSON values need not be hashable)
        self.indeterminate: set[str] = set()
        #: what the first client saw at an unacknowledged offset
        self.observed: dict[int, Any] = {}
        for publish in publishes:
            if publish.offset is None:
                self.indeterminate.add(repr(publish.data))
                continue
            self.acked[publish.offset] = publish
            if publish.epoch is not None and publish.epoch not in self.epochs:
                self.epochs.append(publish.epoch)
        self.offsets = sorted(self.acked)

    def unrecovered_reason(self, reply: Subscribed, retention: Retention) -> str | None:
        """Why this ``recovered: false`` was legal, or ``None`` if it was not."""
        since = reply.since
        if since is None or since > reply.offset:
            return None
        gap = reply.offset - since
        if gap > retention.replay_cap:
            return f"gap {gap} > replay cap {retention.replay_cap}"
        if since < reply.offset - retention.history_size:
            return f"gap {gap} > history_size {retention.history_size}"
        if retention.history_ttl > 0:
            first = self.acked.get(since + 1)
            if first is not None and reply.at - first.sent_at > retention.history_ttl:
                return f"offset {since + 1} older than history_ttl {retention.history_ttl}s"
        return None


def check(
    publishes: Sequence[Publish],
    histories: Iterable[ClientHistory],
    retention: Retention,
    *,
    end: int | None = None,
) -> Verdict:
    """Check every client's history against the publish calls.

    Args:
        publishes: every publish call of the run.
        histories: one per client (and channel).
        retention: the hub's limits, which make a ``recovered: false`` legal.
        end: the last offset every client was expected to reach (default: the
            highest acknowledged offset).

    Returns:
        The verdict: figures and every violation found.
    """
    truth = _Truth(publishes)
    verdict = Verdict(published=len(publishes), acknowledged=len(truth.acked))
    if len(truth.epochs) > 1:
        verdict.add(
            Violation(Kind.EPOCH_CHANGED, "publisher", None, f"acknowledged in {truth.epochs}")
        )
    last = end if end is not None else (truth.offsets[-1] if truth.offsets else 0)
    for history in histories:
        result = _check_client(truth, history, retention, last)
        verdict.clients += 1
        verdict.delivered += result.delivered
        verdict.replayed += result.replayed
        verdict.resumes += result.resumes
        verdict.recovered += result.recovered
        verdict.unrecovered_legal += result.unrecovered_legal
        verdict.latencies.extend(result.latencies)
        room = SAMPLES_PER_KIND - len(verdict.notes)
        verdict.notes.extend(result.notes[: max(0, room)])
        for violation in result.violations:
            verdict.add(violation)
    return verdict


def _check_client(
    truth: _Truth, history: ClientHistory, retention: Retention, end: int
) -> ClientResult:
    name = history.name
    result = ClientResult(name)
    add = result.violations.append
    seen: set[int] = set()
    highest = 0
    start: int | None = None  # the position of the first subscribe
    position = 0  # the position the last subscribe reply gave
    epoch: str | None = None
    excused: list[tuple[int, int]] = []  # (after, up to]: gaps of legal recovered:false
    for record in history.records():
        if isinstance(record, Subscribed):
            if epoch is not None and record.epoch != epoch:
                add(Violation(Kind.EPOCH_CHANGED, name, None, f"{epoch} -> {record.epoch}"))
            epoch = record.epoch
            if start is None:
                start = record.offset
            if record.since is not None:
                result.resumes += 1
                if record.recovered:
                    result.recovered += 1
                else:
                    reason = truth.unrecovered_reason(record, retention)
                    if reason is None:
                        add(
                            Violation(
                                Kind.UNRECOVERED,
                                name,
                                record.since,
                                f"resume from {record.since} at head {record.offset}",
                            )
                        )
                    else:
                        result.unrecovered_legal += 1
                        result.notes.append(f"{name}: resume from {record.since}: {reason}")
                        excused.append((record.since, record.offset))
            position = record.offset
            continue
        offset = record.offset
        how = "replayed" if record.replayed else "live"
        if offset in seen:
            add(Violation(Kind.DUPLICATE, name, offset, f"{how}, position {position}"))
            continue
        if offset < highest:
            add(Violation(Kind.OUT_OF_ORDER, name, offset, f"{how} after {highest}"))
        elif not record.replayed and offset <= position:
            add(Violation(Kind.STALE, name, offset, f"live at position {position}"))
        seen.add(offset)
        highest = max(highest, offset)
        result.delivered += 1
        result.replayed += record.replayed
        acked = truth.acked.get(offset)
        if acked is not None:
            if record.data != acked.data:
                add(Violation(Kind.WRONG_DATA, name, offset, f"{record.data!r} != {acked.data!r}"))
            elif not record.replayed:
                result.latencies.append(record.at - acked.sent_at)
        elif repr(record.data) in truth.indeterminate:
            first = truth.observed.setdefault(offset, record.data)
            if first != record.data:
                add(Violation(Kind.WRONG_DATA, name, offset, f"{record.data!r} != {first!r}"))
        else:
            add(Violation(Kind.UNKNOWN, name, offset, f"{record.data!r} was never published"))
    if start is None:
        add(Violation(Kind.NEVER_SUBSCRIBED, name, None, "no subscribe reply"))
        return result
    for offset in _expected(truth.offsets, start, end, excused):
        if offset not in seen:
            add(Violation(Kind.LOST, name, offset, f"expected after {start}"))
    return result


def _expected(
    offsets: Sequence[int], start: int, end: int, excused: Sequence[tuple[int, int]]
) -> Iterator[int]:
    """Acknowledged offsets in ``(start, end]`` outside every excused gap."""
    for offset in offsets:
        if start < offset <= end and not any(lo < offset <= hi for lo, hi in excused):
            yield offset


def summary(verdict: Verdict) -> Mapping[str, Any]:
    """The verdict's figures as a JSON-ready mapping."""
    return {
        "clients": verdict.clients,
        "published": verdict.published,
        "acknowledged": verdict.acknowledged,
        "delivered": verdict.delivered,
        "replayed": verdict.replayed,
        "lost": verdict.lost,
        "duplicated": verdict.duplicated,
        "out_of_order": verdict.out_of_order,
        "resumes": verdict.resumes,
        "recovered": verdict.recovered,
        "unrecovered_legal": verdict.unrecovered_legal,
        "violations": {kind.value: count for kind, count in verdict.counts.items()},
        "examples": [str(v) for v in verdict.violations()],
        "legal_unrecovered": verdict.notes,
        "latency_ms": {
            "p50": verdict.percentile_ms(50),
            "p99": verdict.percentile_ms(99),
            "samples": len(verdict.latencies),
        },
    }
