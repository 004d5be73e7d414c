"""``nats+jetstream://``: a log shared by several processes, on NATS JetStream.

nats-py (``pip install 'eventcast[nats]'``); NATS server 2.9 or later with
JetStream. The URL is ``nats+jetstream://host:4222`` (several comma-separated
servers allowed; ``nats+jetstream+tls://`` for TLS) with these options:

* ``?prefix=name``: the root of every stream name and subject (default
  ``eventcast``; letters, digits and ``-``), so that several deployments share
  one NATS server without seeing each other;
* ``?replicas=n``: the replicas of every stream this log creates (default 1;
  up to 5 on a JetStream cluster).

Layout, for a prefix ``P``:

* **one stream per namespace**, ``P_ev_<namespace>`` (``P_ev_~`` for topics
  without one), holding subjects ``P.ev.<namespace>.<segments>`` (the subject
  rule of the NATS backplane, :func:`~eventcast.backplane.nats.subject_of`).
  Per namespace because retention is set per namespace, so the server itself
  enforces it (``max_msgs_per_subject``, ``max_age``); because a stream is
  JetStream's unit of ordering and replication, so busy namespaces do not
  queue behind each other; and because it keeps the count of streams as small
  as the configuration (one stream per topic would not scale);
* ``P_meta``: the store id and the generation counters of the empty epochs
  (see :mod:`eventcast.log.base`), one subject each, last value kept;
* ``P_dl``: the dead letters, one subject per letter id, bounded.

**Offsets.** A stream's sequence is per stream, not per subject, so each
message carries its topic's offsets in headers: ``Ec-Top`` (the offset of its
last event), ``Ec-Count`` (its events) and ``Ec-Epoch``. An append reads the
subject's last message (one *direct get*) and publishes with
``Nats-Expected-Last-Subject-Sequence`` set to that message's sequence: the
server refuses the publish if anything was appended to the topic meanwhile, by
any process, and the writer reads again and retries (a bounded number of
times, with jitter). Offsets are therefore 1, 2, 3, … with no gap and no
duplicate, whatever the number of writers. The same precondition makes a
publish retried after a lost reply safe: at most one of the two copies can
follow the same sequence, and the writer recognises its own message (an
``Ec-Token`` header) when it reads the subject again.

**Giving way.** Optimistic appends alone starve a writer: a process that
keeps appending to a topic remembers its head and publishes once per round
trip, while one that lost must read the head and then publish (two round
trips), and loses again. So a writer whose publish conflicted twice asks the
others to give way, on the core subject ``P.yield.<namespace>.<segments>``;
every other process of the log pauses its appends to that topic until the
writer says it is done (or :data:`GIVE_WAY_FOR` seconds at most, should it
die meanwhile). The messages flow only under contention.

**Group commit.** Appends to one topic from one process queue up behind the
one being published; everything waiting is then published as one message (a
*pack*: several events, consecutive offsets), so a burst of appends costs one
round trip. An append of one topic is one message, so it is atomic.

**Limits of JetStream 2.9** (no atomic multi-message publish): an append that
spans several topics, or that mixes events with idempotency keys into a batch,
is several messages. They are published in order under this process's lock of
every topic involved; if one fails, those already published are deleted again
before the error is raised (and, since NATS 2.9 forgets a subject's last
sequence when its last message is deleted, a marker restores the topic's head:
the server keeps one message per topic more than the retention, room for such
a marker). That is exact unless another process appended to one of those
topics in the meantime (the message cannot be taken back without a gap, and
the error says the append stays partly committed), or a reader looked at the
topic in the instant between. An append of one event (what ``bus.publish``
makes, with or without a key), or of one topic's events without keys, is
never affected.

**Idempotency keys.** An event with a key is a message of its own with
``Nats-Msg-Id`` derived from the topic and the key, so the server itself stores
it once however many processes publish it (the stream's duplicate window is
the log's dedup window, or the age retention if shorter: an event older than
that is gone anyway). A repeat returns the originally stored event. When
the server reports a duplicate whose original is gone (retention, truncation)
or older than the dedup window by the log's clock, the event is stored again
under a message id chained to the original's sequence.

**Epochs.** A topic with no message has offset 0 and its empty epoch; its first
append claims the epoch (a compare-and-set on the generation counter in
``P_meta``) before publishing. :meth:`JetStreamLog.truncate` publishes a marker
(no events, the same top, a new epoch) and purges everything before it. Events
older than the age retention expire on the server (``max_age``), and
:meth:`JetStreamLog.prune` purges what retention removed by the events' own
times and forgets topics left without events: a topic's next epoch is always
new. A deleted stream loses its topics' epochs with them, so subscribers learn
plainly that they cannot resume.

**Reads** find the message holding an offset by interpolation search on the
sequences (direct gets, a few round trips whatever the stream's length; a
replay paging forward finds its next page in one, right after where the
previous page ended), then read forward: by direct gets for a few messages,
through an ephemeral pull consumer for more. Readers skip what retention
removed (by count and by the events' own times) even before the server
deletes it.

**Durability.** JetStream acknowledges a message once its stream's leader (and,
with replicas, a majority) stored it; it syncs to disk every two minutes by
default (``sync_interval``; ``always``, where the server supports it, syncs
every write). An acknowledged append survives the death of the publishing
process; on a single server with the default sync interval, a power loss can
lose the last writes.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import re
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import msgspec

from .._urls import redact_password
from ..backplane.nats import subject_of
from ..deadletters import DeadLetter
from ..events import Event, Position
from ..exceptions import ConfigurationError, LogError
from ..topics import validate_topic
from .base import (
    AppendItem,
    EventLog,
    Retention,
    append_items,
    committed,
    empty_epoch,
    epoch_bucket,
    letter_to_row,
    log_error,
    new_epoch,
    new_store_id,
    now,
    row_to_letter,
    stored_event,
    stored_events,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

__all__ = ["JetStreamLog", "split_url"]

logger = logging.getLogger("eventcast.log")

_T = TypeVar("_T")

#: The prefix used when the URL does not name one.
DEFAULT_PREFIX: Final = "eventcast"
#: Most append requests waiting before publishers wait for room.
DEFAULT_MAX_PENDING: Final = 10_000
#: Most events in one message.
DEFAULT_MAX_BATCH: Final = 10_000
#: Most topics whose last message this process remembers.
DEFAULT_MAX_TOPICS: Final = 10_000
#: Messages read by direct gets before a read switches to a pull consumer.
_DIRECT_READS: Final = 8
#: Messages per pull of a consumer, and the bytes it may bring at most.
_PULL_BATCH: Final = 256
_PULL_BYTES: Final = 8 * 1024 * 1024
#: Seconds to wait for each answer while a new stream starts answering direct gets.
_PROBE_WAIT: Final = 0.2
#: Room left in a message for its headers, under the server's max_payload.
_HEADROOM: Final = 4096

_PREFIX = re.compile(r"^[A-Za-z0-9-]{1,32}$")

_EXPECTED_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
_MSG_ID: Final = "Nats-Msg-Id"
_WRONG_LAST_SEQUENCE: Final = 10071

# One event in a message body: (id, time, payload, binary, tags, idempotency key).
_Record = tuple[str, float, bytes, bool, "bytes | None", "str | None"]
_encode_msgpack = msgspec.msgpack.Encoder().encode
_decode_records = msgspec.msgpack.Decoder(
    list[tuple[str, float, bytes, bool, bytes | None, str | None]]
).decode
_decode_row = msgspec.msgpack.Decoder().decode
_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


def split_url(url: str) -> tuple[list[str], str, int]:
    """Split a log URL into the NATS server URLs, the prefix and the replicas.

    Raises:
        ConfigurationError: not a ``nats+jetstream://`` URL, or a bad option.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("nats+jetstream", "nats+jetstream+tls") or not parts.netloc:
        raise ConfigurationError(
            f"not a JetStream URL: {redact_password(url)!r} (expected nats+jetstream://host:4222)"
        )
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = options.pop("prefix", DEFAULT_PREFIX)
    replicas_text = options.pop("replicas", "1")
    if options:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(sorted(options))} in {redact_password(url)!r}: "
            "the JetStream log takes prefix= and replicas="
        )
    if not _PREFIX.match(prefix):
        raise ConfigurationError(
            f"invalid prefix {prefix!r} in {redact_password(url)!r}: use 1-32 letters, digits and -"
        )
    if not replicas_text.isdigit() or not 1 <= int(replicas_text) <= 5:
        raise ConfigurationError(
            f"invalid replicas {replicas_text!r} in {redact_password(url)!r}: use 1 to 5"
        )
    nats_scheme = "tls" if scheme.endswith("+tls") else "nats"
    servers = [urlunsplit((nats_scheme, netloc, "", "", "")) for netloc in parts.netloc.split(",")]
    return servers, prefix, int(replicas_text)


#: Longest pause, in seconds, of a writer asked to give way (if the one asking dies).
GIVE_WAY_FOR: Final = 0.05


class _Way:
    """The writers of other processes this process gives way to, on one topic."""

    __slots__ = ("asking", "done", "until")

    def __init__(self) -> None:
        #: When the pause ends at the latest (loop time).
        self.until = 0.0
        self.asking: set[bytes] = set()
        self.done = asyncio.Event()


class _Conflict(LogError):
    """The server refused a publish: the subject's last sequence was not the expected one."""


class _NoStream(LogError):
    """No stream listens on the subject (the namespace's stream does not exist)."""


class _StreamExists(LogError):
    """A stream of that name exists already."""


class _StreamMissing(LogError):
    """No stream of that name exists."""


class _SubjectsOverlap(LogError):
    """Another stream listens on the subjects (or one of ours, created concurrently)."""


def _api_error(error: dict[str, Any]) -> LogError:
    """The exception for an error reply of the JetStream API (nats-py's error as its cause)."""
    from nats.js.errors import APIError

    code = int(error.get("err_code") or 0)
    text = f"JetStream refused the request: {error.get('description')} (error {code})"
    kind: dict[int, type[LogError]] = {
        10058: _StreamExists,  # stream name already in use
        10059: _StreamMissing,  # stream not found
        10065: _SubjectsOverlap,  # subjects overlap with an existing stream
        _WRONG_LAST_SEQUENCE: _Conflict,
    }
    exc = kind.get(code, LogError)(text)
    exc.__cause__ = APIError(
        code=error.get("code"), description=error.get("description"), err_code=code
    )
    return exc


@dataclass(slots=True)
class _Msg:
    """One stored message of an event subject, as read back."""

    seq: int
    top: int
    count: int
    epoch: str
    at: float
    token: str
    data: bytes

    @property
    def first(self) -> int:
        """The offset of the message's first event (``top + 1`` for a marker)."""
        return self.top - self.count + 1

    def records(self) -> list[_Record]:
        """The message's events: ``(id, time, payload, binary, tags, key)``."""
        return _decode_records(self.data) if self.count else []


@dataclass(slots=True)
class _Head:
    """A topic's last message as this process knows it (``seq`` 0: no message)."""

    seq: int
    top: int
    epoch: str | None
    token: str = ""


@dataclass(slots=True)
class _Written:
    """A message published for an append: where, its first offset and epoch, and
    the sequence of the subject's message before it (0: none; ``None``: unknown)."""

    seq: int
    first: int
    epoch: str
    before: int | None


@dataclass(slots=True)
class _Request:
    """One single-topic append waiting for its topic's writer."""

    events: Sequence[Event]
    items: list[AppendItem]
    size: int
    future: asyncio.Future[list[Event]]


@dataclass(slots=True)
class _Lane:
    """The appends of one topic in this process: a lock, and a queue for group commit."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queue: deque[_Request] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    users: int = 0


def _status(raw: Msg) -> str | None:
    """The status of a direct-get or pull reply (``None``: a message)."""
    headers = raw.headers
    return None if headers is None else headers.get("Status")


def _parse(raw: Msg, seq: int) -> _Msg:
    """Read one stored event message (a clear error for anything else on the subject)."""
    headers = raw.headers or {}
    try:
        return _Msg(
            seq=seq,
            top=int(headers["Ec-Top"]),
            count=int(headers["Ec-Count"]),
            epoch=headers["Ec-Epoch"],
            at=float(headers["Ec-At"]),
            token=headers.get("Ec-Token", ""),
            data=raw.data,
        )
    except (KeyError, ValueError) as exc:
        raise LogError(f"message {seq} on {raw.subject!r} was not written by eventcast") from exc


def _found(raw: Msg) -> Msg | None:
    """A direct-get reply: the message, ``None`` for "no such message", or an error."""
    status = _status(raw)
    if status is None:
        return raw
    if status == "404":
        return None
    description = (raw.headers or {}).get("Description", "")
    raise LogError(f"JetStream answered {status} {description}".strip())


def _record(item: AppendItem) -> _Record:
    _, event_id, at, payload, binary, tags, key = item
    return (event_id, at, payload, binary, tags, key)


def _item_size(item: AppendItem) -> int:
    """A bound on the bytes an event takes in a message body."""
    return len(item[3]) + (len(item[5]) if item[5] else 0) + len(item[1]) + 64


def _msg_id(topic: str, key: str) -> str:
    return sha256(f"{topic}\n{key}".encode()).hexdigest()[:40]


def _duration(seconds: float | None) -> int:
    """Seconds as JetStream's nanoseconds (0: no limit)."""
    return 0 if seconds is None else max(1, round(seconds * 1e9))


def _covers(known: Retention, wanted: Retention) -> bool:
    """Whether a stream configured for ``known`` keeps everything ``wanted`` keeps."""
    if known.size < wanted.size:
        return False
    return known.ttl is None or (wanted.ttl is not None and known.ttl >= wanted.ttl)


def _widest(a: Retention, b: Retention) -> Retention:
    ttl = None if a.ttl is None or b.ttl is None else max(a.ttl, b.ttl)
    return Retention(size=max(a.size, b.size), ttl=ttl)


class JetStreamLog(EventLog):
    """The :class:`EventLog` on NATS JetStream, safe to share between processes.

    Args:
        url: ``nats+jetstream://host:4222`` (comma-separated servers allowed,
            ``nats+jetstream+tls://`` for TLS); ``?prefix=`` and
            ``?replicas=`` as in the module docstring.
        dedup_window: how long idempotency keys are remembered, in seconds.
        max_pending: bound on appends queued or in flight (callers wait for room).
        max_batch: bound on the events of one message.
        max_topics: bound on the topics whose last message is remembered.
        dead_letters: the most dead letters kept (the oldest are dropped).
        connect_timeout: seconds to reach a server when opening.
        timeout: seconds to wait for each reply of the server.
        retries: attempts of a publish that conflicts with other writers.
    """

    def __init__(
        self,
        url: str,
        *,
        dedup_window: float = 120.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_topics: int = DEFAULT_MAX_TOPICS,
        dead_letters: int = 10_000,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        retries: int = 16,
    ) -> None:
        super().__init__(dedup_window=dedup_window)
        if min(max_pending, max_batch, max_topics, dead_letters, retries) < 1:
            raise ValueError(
                "max_pending, max_batch, max_topics, dead_letters and retries must be positive"
            )
        if connect_timeout <= 0 or timeout <= 0:
            raise ValueError("connect_timeout and timeout must be positive")
        self.servers, self.prefix, self.replicas = split_url(url)
        self.url = redact_password(url)
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.max_topics = max_topics
        self.max_dead_letters = dead_letters
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retries = retries
        self._nc: NATS | None = None
        self._store = ""
        self._max_bytes = 1024 * 1024 - _HEADROOM
        #: Event streams known to exist, with the retention they keep at least.
        self._streams: dict[str, Retention] = {}
        self._heads: OrderedDict[str, _Head] = OrderedDict()
        #: Where the last read of a subject ended (without its data), by subject.
        self._hints: OrderedDict[str, _Msg] = OrderedDict()
        self._lanes: dict[str, _Lane] = {}
        self._room: asyncio.Semaphore | None = None
        self._opened = False
        self._closed = False
        #: Messages published for appends (for the group-commit benchmark and tests).
        self.commits = 0
        #: Who asked this process to give way, by yield subject (see the module docs).
        self._ways: dict[str, _Way] = {}
        #: This instance, in the give-way messages (its own are ignored).
        self._me = secrets.token_hex(8).encode()
        #: Times this process asked the others to give way (for tests).
        self.asked_way = 0

    # -- names -----------------------------------------------------------------------

    @property
    def _meta_stream(self) -> str:
        return f"{self.prefix}_meta"

    @property
    def _letters_stream(self) -> str:
        return f"{self.prefix}_dl"

    def _names(self, topic: str) -> tuple[str, str]:
        """The stream and the subject of a topic."""
        validate_topic(topic)
        namespace = topic.partition(":")[0] if ":" in topic else "~"
        return f"{self.prefix}_ev_{namespace}", subject_of(f"{self.prefix}.ev", topic)

    def _topic_of(self, subject: str) -> str:
        """The topic of an event subject (the inverse of :meth:`_names`)."""
        namespace, _, rest = subject[len(self.prefix) + 4 :].partition(".")
        return rest if namespace == "~" else f"{namespace}:{rest}"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the meta and dead-letter streams if missing, read the store id."""
        if self._opened:
            return
        if self._closed:
            raise LogError("the log is closed")
        import nats
        from nats.errors import Error as NATSError

        async def error(exc: Exception) -> None:
            logger.warning("JetStream log connection error: %s", exc)

        nc: NATS | None = None
        try:
            async with asyncio.timeout(self.connect_timeout * 2):
                # nats-py retries a first connection forever when reconnects
                # are unlimited: bound it, so an unreachable server fails open().
                nc = await nats.connect(
                    servers=self.servers,
                    connect_timeout=max(1, round(self.connect_timeout)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=error,
                    name="eventcast-log",
                )
                self._nc = nc
                self._max_bytes = nc.max_payload - _HEADROOM
                await self._create_stream(self._meta_stream, f"{self.prefix}.meta.>")
                await self._create_stream(
                    self._letters_stream, f"{self.prefix}.dl.*", max_msgs=self.max_dead_letters
                )
                self._store = await self._store_id()
                await nc.subscribe(f"{self.prefix}.yield.>", cb=self._way_asked)
        except BaseException as exc:
            self._nc = None
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(nc.close())
            if isinstance(exc, NATSError | OSError | TimeoutError):
                raise log_error(f"open {self.url!r}", exc) from exc
            raise
        self._room = asyncio.Semaphore(self.max_pending)
        self._opened = True

    async def close(self) -> None:
        """Finish the appends under way, then close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
            if tasks:
                await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        finally:  # even when cancelled: a second close() returns at once
            nc, self._nc = self._nc, None
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(nc.close())

    def _ready(self) -> NATS:
        """The connection, for the public methods: only once open() returned."""
        if not self._opened:
            raise LogError("the log is not open")
        return self._connection()

    def _connection(self) -> NATS:
        nc = self._nc
        if self._closed or nc is None:
            raise LogError("the log is not open")
        return nc

    async def _run(self, action: str, call: Awaitable[_T]) -> _T:
        """Await ``call``, translating every NATS error into :class:`LogError`."""
        from nats.errors import Error as NATSError

        try:
            return await call
        except (NATSError, OSError, TimeoutError) as exc:
            raise log_error(action, exc) from exc

    # -- the JetStream API -------------------------------------------------------------

    async def _api(self, subject: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API request; an error reply raises :class:`LogError`."""
        nc = self._connection()
        body = b"" if request is None else _encode_json(request)
        reply = await nc.request(f"$JS.API.{subject}", body, timeout=self.timeout)
        response: dict[str, Any] = _decode_json(reply.data)
        error = response.get("error")
        if error is not None:
            raise _api_error(error)
        return response

    async def _create_stream(
        self,
        name: str,
        subject: str,
        *,
        retention: Retention | None = None,
        max_msgs: int = -1,
    ) -> None:
        """Create a stream; an event stream of ours that keeps less is widened."""
        config: dict[str, Any] = {
            "name": name,
            "subjects": [subject],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "num_replicas": self.replicas,
            "allow_direct": True,
            "max_msgs": max_msgs,
            "max_msgs_per_subject": 1,
        }
        if retention is not None:
            _set_retention(config, retention, self.dedup_window)
        try:
            await self._create(name, config)
        except _StreamExists:
            if retention is not None:
                current = (await self._api(f"STREAM.INFO.{name}"))["config"]
                kept = _retention_of(current)
                if not _covers(kept, retention):
                    kept = _widest(kept, retention)
                    _set_retention(current, kept, self.dedup_window)
                    await self._api(f"STREAM.UPDATE.{name}", current)
                retention = kept
        await self._until_served(name)
        if retention is not None:
            self._streams[name] = retention

    async def _until_served(self, name: str) -> None:
        """Wait until a stream answers direct gets (within ``timeout``).

        A stream that another process is creating at the same moment can be
        known by name a moment before it answers direct gets, and a direct
        get sent then gets no answer at all: it would time out, failing the
        append. A direct get for a subject that holds nothing is answered
        (404) once the stream serves them.
        """
        nc = self._connection()
        probe = f"$JS.API.DIRECT.GET.{name}.{self.prefix}.ready"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                _found(await nc.request(probe, b"", timeout=_PROBE_WAIT))
            except TimeoutError:
                if loop.time() >= deadline:
                    raise
                continue
            return

    async def _create(self, name: str, config: dict[str, Any]) -> None:
        """``STREAM.CREATE``; a stream of that name made meanwhile raises :class:`_StreamExists`.

        Two processes creating one stream at once can have the later request
        refused for overlapping subjects rather than for the name (seen with
        nats-server 2.9). If a stream of that name exists now, it is the one
        the other process made; an overlap with a stream of another name is a
        real conflict and is raised.
        """
        try:
            await self._api(f"STREAM.CREATE.{name}", config)
        except _SubjectsOverlap as exc:
            try:
                await self._api(f"STREAM.INFO.{name}")
            except _StreamMissing:
                raise exc from exc.__cause__
            raise _StreamExists(str(exc)) from exc

    async def _ensure_stream(self, topic: str, stream: str) -> None:
        """Make sure the namespace's stream exists and keeps at least the topic's retention."""
        retention = self.retention(topic)
        known = self._streams.get(stream)
        if known is not None and _covers(known, retention):
            return
        namespace = stream[len(self.prefix) + 4 :]
        await self._create_stream(stream, f"{self.prefix}.ev.{namespace}.>", retention=retention)

    async def _stream_exists(self, stream: str) -> bool:
        """Whether a stream exists (a direct get on a missing one would only time out)."""
        if stream in self._streams:
            return True
        try:
            info = await self._api(f"STREAM.INFO.{stream}")
        except _StreamMissing:
            return False
        self._streams[stream] = _retention_of(info["config"])
        return True

    async def _direct(self, stream: str, subject: str, body: bytes) -> Msg | None:
        """One direct get (``None``: no such message, or no such stream)."""
        nc = self._connection()
        if not await self._stream_exists(stream):
            return None
        try:
            raw = await nc.request(subject, body, timeout=self.timeout)
        except TimeoutError:
            self._streams.pop(stream, None)  # deleted meanwhile? ask again
            if await self._stream_exists(stream):
                raise
            return None
        return _found(raw)

    async def _last(self, stream: str, subject: str) -> Msg | None:
        """The last message of a subject."""
        return await self._direct(stream, f"$JS.API.DIRECT.GET.{stream}.{subject}", b"")

    async def _at(self, stream: str, seq: int, subject: str | None = None) -> Msg | None:
        """The message at sequence ``seq``, or the subject's first one at or after it."""
        request: dict[str, Any] = {"seq": max(seq, 1)}
        if subject is not None:
            request["next_by_subj"] = subject
        return await self._direct(stream, f"$JS.API.DIRECT.GET.{stream}", _encode_json(request))

    async def _last_msg(self, stream: str, subject: str) -> _Msg | None:
        raw = await self._last(stream, subject)
        return None if raw is None else _parse(raw, _seq_of(raw))

    async def _next_msg(self, stream: str, subject: str, seq: int) -> _Msg | None:
        """The subject's first message at or after sequence ``seq``."""
        raw = await self._at(stream, seq, subject)
        return None if raw is None else _parse(raw, _seq_of(raw))

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """Publish to JetStream and return the acknowledgement."""
        from nats.errors import NoRespondersError

        nc = self._connection()
        try:
            reply = await nc.request(subject, body, timeout=self.timeout, headers=headers)
        except NoRespondersError:
            raise _NoStream(f"no stream stores {subject!r}") from None
        ack: dict[str, Any] = _decode_json(reply.data)
        error = ack.get("error")
        if error is not None:
            raise _api_error(error)
        return ack

    async def _scan(
        self, stream: str, subject: str, start: int
    ) -> AsyncGenerator[tuple[int, Msg], None]:
        """Every message of ``subject`` from sequence ``start`` on, through a pull consumer.

        The consumer is ephemeral (in memory, no acks, removed by the server
        after 30 s of inactivity if this process cannot remove it itself); each
        pull brings at most :data:`_PULL_BATCH` messages and :data:`_PULL_BYTES`.
        """
        nc = self._connection()
        created = await self._api(
            f"CONSUMER.CREATE.{stream}",
            {
                "stream_name": stream,
                "config": {
                    "deliver_policy": "by_start_sequence",
                    "opt_start_seq": max(start, 1),
                    "ack_policy": "none",
                    "filter_subject": subject,
                    "inactive_threshold": _duration(30.0),
                    "mem_storage": True,
                    "num_replicas": 1,
                },
            },
        )
        name = created["name"]
        inbox = nc.new_inbox()
        sub = await nc.subscribe(
            inbox, pending_msgs_limit=2 * _PULL_BATCH, pending_bytes_limit=2 * _PULL_BYTES
        )
        try:
            pull = _encode_json({"batch": _PULL_BATCH, "max_bytes": _PULL_BYTES, "no_wait": True})
            while True:
                await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", pull, reply=inbox)
                received = 0
                while received < _PULL_BATCH:
                    raw = await sub.next_msg(timeout=self.timeout)
                    if _status(raw) is not None:
                        if received == 0:
                            return  # nothing left (404 / 408)
                        break
                    received += 1
                    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
                    # seq>.<time>.<pending>
                    tokens = raw.reply.split(".")
                    yield int(tokens[-4]), raw
                    if tokens[-1] == "0":
                        return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"")

    async def _following(self, stream: str, subject: str, msg: _Msg) -> AsyncGenerator[_Msg, None]:
        """``msg``, then the subject's messages after it, in order."""
        yield msg
        seq = msg.seq
        for _ in range(_DIRECT_READS):
            nxt = await self._next_msg(stream, subject, seq + 1)
            if nxt is None:
                return
            yield nxt
            seq = nxt.seq
        async with contextlib.aclosing(self._scan(stream, subject, seq + 1)) as scan:
            async for seq, raw in scan:
                yield _parse(raw, seq)

    async def _seek(
        self,
        stream: str,
        subject: str,
        lo: _Msg,
        hi: _Msg,
        target: float,
        key: Callable[[_Msg], float],
    ) -> _Msg:
        """The subject's first message whose ``key`` is at least ``target``.

        ``key`` grows with the sequence, ``key(lo) < target <= key(hi)``.
        Interpolation on the sequences, every other probe a bisection, so a
        few direct gets find it in a long stream and never more than
        ``2 * log2(hi.seq - lo.seq)``.
        """
        gap = hi.seq  # no message of the subject in [gap, hi.seq)
        probe = 0
        while lo.seq + 1 < gap:
            low, high = lo.seq + 1, gap - 1
            if probe % 2 == 0 and key(hi) > key(lo):
                share = (target - key(lo)) / (key(hi) - key(lo))
                guess = lo.seq + round(share * (hi.seq - lo.seq))
            else:
                guess = (low + high) // 2
            guess = min(max(guess, low), high)
            probe += 1
            found = await self._next_msg(stream, subject, guess)
            if found is None or found.seq >= gap:
                gap = guess
            elif key(found) >= target:
                hi, gap = found, found.seq
            else:
                lo = found
        return hi

    async def _locate(
        self, stream: str, subject: str, head: _Msg, offset: int, hint: _Msg | None = None
    ) -> _Msg:
        """The subject's first message holding ``offset`` or a later one.

        ``hint``, a message read before (where the previous page ended), is
        tried first: a replay paging forward finds its next page in one probe.
        """
        if offset >= head.first:
            return head
        if hint is not None and hint.epoch == head.epoch and hint.top < offset < head.first:
            found = await self._next_msg(stream, subject, hint.seq + 1)
            if found is not None and found.top >= offset:
                if found.first <= offset or found.seq == hint.seq + 1:
                    return found  # the very next message: nothing in between
                return await self._seek(stream, subject, hint, found, offset, _top)
        first = await self._next_msg(stream, subject, 1)
        if first is None or first.top >= offset:
            return head if first is None else first
        return await self._seek(stream, subject, first, head, offset, _top)

    # -- the store id and the generation counters -----------------------------------------

    async def _meta(self, name: str) -> tuple[int, bytes]:
        """A value of the meta stream and its sequence (``(0, b"")`` if absent)."""
        raw = await self._last(self._meta_stream, f"{self.prefix}.meta.{name}")
        return (0, b"") if raw is None else (_seq_of(raw), raw.data)

    async def _store_id(self) -> str:
        for attempt in range(self.retries):
            seq, value = await self._meta("store")
            if seq:
                return value.decode()
            try:
                await self._publish(
                    f"{self.prefix}.meta.store", new_store_id().encode(), {_EXPECTED_SEQ: "0"}
                )
            except _Conflict:
                await _backoff(attempt)
        raise LogError("could not read or create the store id")

    async def _generation(self, topic: str) -> int:
        seq, value = await self._meta(f"gen.{epoch_bucket(topic)}")
        return int(value) if seq else 0

    async def _claim(self, topic: str) -> str:
        """Claim the topic's empty epoch for a stream about to be born (see log.base)."""
        name = f"gen.{epoch_bucket(topic)}"
        for attempt in range(self.retries):
            seq, value = await self._meta(name)
            generation = int(value) if seq else 0
            try:
                await self._publish(
                    f"{self.prefix}.meta.{name}",
                    str(generation + 1).encode(),
                    {_EXPECTED_SEQ: str(seq)},
                )
            except _Conflict:
                await _backoff(attempt)
                continue
            return empty_epoch(self._store, topic, generation)
        raise LogError(f"could not claim an epoch for {topic!r}: too many concurrent claims")

    # -- heads -------------------------------------------------------------------------

    async def _read_head(self, stream: str, subject: str) -> _Head:
        msg = await self._last_msg(stream, subject)
        if msg is None:
            return _Head(0, 0, None)
        return _Head(msg.seq, msg.top, msg.epoch, msg.token)

    def _remember(self, topic: str, head: _Head) -> None:
        self._heads[topic] = head
        self._heads.move_to_end(topic)
        while len(self._heads) > self.max_topics:
            self._heads.popitem(last=False)

    async def _head(self, topic: str, stream: str, subject: str) -> _Head:
        """The topic's last message, as remembered (refreshed on a conflict)."""
        head = self._heads.get(topic)
        if head is None:
            head = await self._read_head(stream, subject)
            self._remember(topic, head)
        else:
            self._heads.move_to_end(topic)
        return head

    async def _find_token(self, stream: str, subject: str, after: int, token: str) -> _Msg | None:
        """Our message (by its token) among the subject's messages after ``after``."""
        msg = await self._next_msg(stream, subject, after + 1)
        if msg is None:
            return None
        async with contextlib.aclosing(self._following(stream, subject, msg)) as following:
            async for found in following:
                if found.token == token:
                    return found
        return None

    # -- writing -----------------------------------------------------------------------

    async def _way_asked(self, msg: Msg) -> None:
        """Another process asks (``Y``) or no longer asks (``D``) to give way on a topic."""
        data = msg.data
        who = data[1:]
        if who == self._me or not data:
            return
        way = self._ways.get(msg.subject)
        if data[:1] == b"Y":
            now_ = asyncio.get_running_loop().time()
            if way is None:
                if len(self._ways) >= self.max_topics:
                    # Pauses over: of topics nobody here appended to since (or whose
                    # asker died before saying it was done).
                    self._ways = {k: w for k, w in self._ways.items() if w.until > now_}
                    if len(self._ways) >= self.max_topics:
                        return  # a hint only: the asker retries as before
                way = self._ways[msg.subject] = _Way()
            way.until = now_ + GIVE_WAY_FOR
            way.asking.add(who)
        elif way is not None:
            way.asking.discard(who)
            if not way.asking:
                way.done.set()
                del self._ways[msg.subject]

    async def _give_way(self, way_subject: str) -> None:
        """Pause while another process asked to give way on this topic (bounded)."""
        way = self._ways.get(way_subject)
        if way is None:
            return
        left = way.until - asyncio.get_running_loop().time()
        if left > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await way.done.wait()
        if self._ways.get(way_subject) is way:
            del self._ways[way_subject]

    async def _ask_way(self, way_subject: str, ask: bool) -> None:
        """Ask the other processes to give way on a topic (``ask``), or say it is done."""
        nc = self._nc
        if nc is None:
            return
        with contextlib.suppress(Exception):  # a hint: losing it costs a pause at most
            await nc.publish(way_subject, (b"Y" if ask else b"D") + self._me)
        if ask:
            self.asked_way += 1

    async def _write(self, topic: str, records: list[_Record], key: str | None) -> _Written | Event:
        """Publish one message of a topic's events under the topic's lock.

        Returns where it was written; for an event whose key is stored already
        (within the dedup window, in this epoch), the original event instead.
        """
        stream, subject = self._names(topic)
        await self._ensure_stream(topic, stream)
        body = _encode_msgpack(records)
        token = secrets.token_hex(8)
        msg_id = None if key is None else _msg_id(topic, key)
        count = len(records)
        at = now()
        claimed: str | None = None
        uncertain: int | None = None  # a publish timed out after this sequence
        way = subject_of(f"{self.prefix}.yield", topic)
        asked = False  # whether the other processes were asked to give way
        try:
            for attempt in range(self.retries):
                if not asked:
                    await self._give_way(way)
                head = await self._head(topic, stream, subject)
                if head.epoch is None:
                    claimed = claimed or await self._claim(topic)
                epoch = head.epoch or claimed
                assert epoch is not None
                top = head.top + count
                headers = {
                    _EXPECTED_SEQ: str(head.seq),
                    "Ec-Epoch": epoch,
                    "Ec-Top": str(top),
                    "Ec-Count": str(count),
                    "Ec-At": repr(at),
                    "Ec-Token": token,
                }
                if msg_id is not None:
                    headers[_MSG_ID] = msg_id
                try:
                    ack = await self._publish(subject, body, headers)
                except _NoStream:
                    self._streams.pop(stream, None)
                    self._heads.pop(topic, None)
                    await self._ensure_stream(topic, stream)
                    continue
                except (_Conflict, TimeoutError) as exc:
                    self._heads.pop(topic, None)
                    if isinstance(exc, TimeoutError) and uncertain is None:
                        uncertain = head.seq
                    if uncertain is not None:
                        # The reply of an earlier try was lost: it may have landed.
                        mine = await self._find_token(stream, subject, uncertain, token)
                        if mine is not None:
                            self.commits += 1
                            return _Written(mine.seq, mine.first, mine.epoch, None)
                    if attempt >= 1 and not asked:
                        asked = True
                        await self._ask_way(way, True)
                    await _backoff(attempt)
                    continue
                seq = int(ack["seq"])
                if ack.get("duplicate"):
                    assert key is not None
                    original = await self._original(topic, stream, subject, seq, key)
                    if original is not None:
                        return original
                    msg_id = f"{_msg_id(topic, key)}:{seq}"  # gone or expired: store again
                    continue
                self._remember(topic, _Head(seq, top, epoch, token))
                self.commits += 1
                return _Written(seq, top - count + 1, epoch, head.seq)
        finally:
            if asked:
                await self._ask_way(way, False)
        raise LogError(
            f"could not append to {topic!r}: {self.retries} attempts conflicted with other writers"
        )

    async def _original(
        self, topic: str, stream: str, subject: str, seq: int, key: str
    ) -> Event | None:
        """The event the server kept for a duplicate message id, if it still counts."""
        raw = await self._at(stream, seq)
        if raw is None or (raw.headers or {}).get("Nats-Subject") != subject:
            return None
        msg = _parse(raw, seq)
        head = await self._read_head(stream, subject)
        self._remember(topic, head)
        if msg.epoch != head.epoch or msg.at + self.dedup_window <= now():
            return None
        for i, (event_id, at, payload, binary, tags, ikey) in enumerate(msg.records()):
            if ikey == key:
                return stored_event(
                    topic, msg.first + i, msg.epoch, event_id, at, payload, binary, tags, ikey
                )
        return None

    def _lane(self, topic: str) -> _Lane:
        lane = self._lanes.get(topic)
        if lane is None:
            lane = self._lanes[topic] = _Lane()
        return lane

    def _release(self, topic: str, lane: _Lane) -> None:
        """Forget an idle lane (lanes exist only while a topic is being written)."""
        idle = not lane.users and lane.task is None and not lane.queue and not lane.lock.locked()
        if idle and self._lanes.get(topic) is lane:
            del self._lanes[topic]

    async def append(self, events: Sequence[Event]) -> builtins.list[Event]:
        """Commit events (group commit per topic); see :meth:`EventLog.append`.

        An append of one topic is one message: atomic. Several topics, or
        events with idempotency keys among others, make several messages; see
        the module docstring for what that means when one of them fails.
        """
        if not events:
            return []
        items = append_items(events)
        self._ready()
        room = self._room
        assert room is not None
        async with room:
            if self._closed:  # closed while waiting for room
                raise LogError("the log is not open")
            topic = items[0][0]
            size = sum(map(_item_size, items))
            single = all(item[0] == topic and item[6] is None for item in items)
            if single and size <= self._max_bytes and len(items) <= self.max_batch:
                return await self._enqueue(topic, events, items, size)
            return await self._append_apart(events, items)

    async def _enqueue(
        self, topic: str, events: Sequence[Event], items: list[AppendItem], size: int
    ) -> list[Event]:
        """Queue a single-topic append for its topic's writer task, which packs the queue."""
        self._names(topic)  # an invalid name fails here, not in the writer
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Event]] = loop.create_future()
        lane = self._lane(topic)
        lane.queue.append(_Request(events, items, size, future))
        if lane.task is None:
            lane.task = loop.create_task(
                self._drain(topic, lane), name="eventcast-jetstream-writer"
            )
            lane.task.add_done_callback(_writer_done)
        return await future

    async def _drain(self, topic: str, lane: _Lane) -> None:
        """Publish the queued appends of a topic, as few messages as the limits allow."""
        try:
            while lane.queue:
                async with lane.lock:
                    batch: list[_Request] = []
                    records: list[_Record] = []
                    size = 0
                    while lane.queue:
                        request = lane.queue[0]
                        if request.future.done():  # its caller was cancelled meanwhile
                            lane.queue.popleft()
                            continue
                        if batch and (
                            len(records) + len(request.items) > self.max_batch
                            or size + request.size > self._max_bytes
                        ):
                            break
                        lane.queue.popleft()
                        batch.append(request)
                        records += map(_record, request.items)
                        size += request.size
                    if batch:
                        await self._commit_batch(topic, batch, records)
        finally:
            # Normally the queue is empty here; if this task was cancelled (the
            # loop is going away), nobody will publish what is left.
            while lane.queue:
                _fail(lane.queue.popleft().future, _CLOSED)
            lane.task = None
            self._release(topic, lane)

    async def _commit_batch(
        self, topic: str, batch: list[_Request], records: list[_Record]
    ) -> None:
        """Publish a writer's batch as one message and resolve its requests."""
        try:
            result = await self._run("append", self._write(topic, records, None))
        except asyncio.CancelledError:
            for request in batch:
                _fail(request.future, _CLOSED)
            raise
        except Exception as exc:
            if not isinstance(exc, LogError):
                logger.exception("unexpected error while appending to %s", self.url)
                exc = log_error("append", exc)
            for request in batch:
                _fail(request.future, exc)
            return
        assert isinstance(result, _Written)  # no idempotency key: never a repeat
        offset, epoch = result.first, result.epoch
        for request in batch:
            out = [
                committed(event, offset + i, epoch, item[3])
                for i, (event, item) in enumerate(zip(request.events, request.items, strict=True))
            ]
            offset += len(out)
            if not request.future.done():
                request.future.set_result(out)

    async def _append_apart(self, events: Sequence[Event], items: list[AppendItem]) -> list[Event]:
        """An append of several messages, under the lock of every topic it touches."""
        topics = sorted({item[0] for item in items})
        for topic in topics:
            self._names(topic)
        lanes = [(topic, self._lane(topic)) for topic in topics]
        for _, lane in lanes:
            lane.users += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                for _, lane in lanes:
                    await stack.enter_async_context(lane.lock)
                return await self._run("append", self._write_apart(topics, events, items))
        finally:
            for topic, lane in lanes:
                lane.users -= 1
                self._release(topic, lane)

    async def _write_apart(
        self, topics: list[str], events: Sequence[Event], items: list[AppendItem]
    ) -> list[Event]:
        out: list[Event | None] = [None] * len(events)
        repeats: list[tuple[int, int]] = []
        written: list[tuple[str, _Written]] = []

        async def publish(topic: str, indices: list[int], key: str | None) -> None:
            result = await self._write(topic, [_record(items[i]) for i in indices], key)
            if isinstance(result, Event):
                out[indices[0]] = result
                return
            written.append((topic, result))
            for n, i in enumerate(indices):
                out[i] = committed(events[i], result.first + n, result.epoch, items[i][3])

        try:
            for topic in topics:
                pack: list[int] = []
                size = 0
                keyed: dict[str, int] = {}
                for i, item in enumerate(items):
                    if item[0] != topic:
                        continue
                    key = item[6]
                    if key is None:
                        grow = _item_size(item)
                        if pack and (len(pack) >= self.max_batch or size + grow > self._max_bytes):
                            await publish(topic, pack, None)
                            pack, size = [], 0
                        pack.append(i)
                        size += grow
                        continue
                    if pack:
                        await publish(topic, pack, None)
                        pack, size = [], 0
                    if key in keyed:  # a repeat within this very append
                        repeats.append((i, keyed[key]))
                        continue
                    keyed[key] = i
                    await publish(topic, [i], key)
                if pack:
                    await publish(topic, pack, None)
        except BaseException as exc:
            if written:
                kept = await asyncio.shield(self._take_back(written))
                if kept and not isinstance(exc, asyncio.CancelledError):
                    raise LogError(
                        f"an append failed ({exc}) after committing to {sorted(kept)}, "
                        "which another writer has appended to since: it stays there"
                    ) from exc
            raise
        for i, j in repeats:
            out[i] = out[j]
        assert all(event is not None for event in out)
        return out  # type: ignore[return-value]

    async def _take_back(self, written: list[tuple[str, _Written]]) -> set[str]:
        """Delete the messages of a failed append; return the topics where that was unsafe."""
        kept: set[str] = set()
        for topic, message in reversed(written):
            stream, subject = self._names(topic)
            self._heads.pop(topic, None)
            try:
                head = await self._read_head(stream, subject)
                if head.seq != message.seq:  # another writer appended after it: a gap otherwise
                    kept.add(topic)
                    continue
                await self._api(
                    f"STREAM.MSG.DELETE.{stream}", {"seq": message.seq, "no_erase": True}
                )
                if message.before != 0 and not await self._restore_head(subject, message):
                    kept.add(topic)
            except Exception:
                logger.exception("could not take back message %d of %r", message.seq, topic)
                kept.add(topic)
        if kept:
            logger.error("an append failed half-way: it stays committed to %s", sorted(kept))
        return kept

    async def _restore_head(self, subject: str, deleted: _Written) -> bool:
        """Publish a marker carrying the top and epoch from before a deleted message.

        NATS 2.9 forgets a subject's last sequence when its last message is
        deleted (a publish must then expect 0, and a direct get of the last
        message finds none); the marker (no events) is the subject's last
        message again, so offsets go on from where they were.
        """
        headers = {
            "Ec-Epoch": deleted.epoch,
            "Ec-Top": str(deleted.first - 1),
            "Ec-Count": "0",
            "Ec-At": repr(now()),
            "Ec-Token": secrets.token_hex(8),
        }
        expected = ["0"] if deleted.before is None else ["0", str(deleted.before)]
        for seq in expected:  # the second: a server that remembers the last sequence
            try:
                await self._publish(subject, b"", {**headers, _EXPECTED_SEQ: seq})
            except _Conflict:
                continue
            return True
        return False

    async def truncate(self, topic: str) -> Position:
        """Remove a topic's history and start a new epoch; return the new position."""
        stream, subject = self._names(topic)
        self._ready()
        lane = self._lane(topic)
        lane.users += 1
        try:
            async with lane.lock:
                return await self._run("truncate", self._truncate(topic, stream, subject))
        finally:
            lane.users -= 1
            self._release(topic, lane)

    async def _truncate(self, topic: str, stream: str, subject: str) -> Position:
        """Publish a marker (no events, the same top, a new epoch), purge what precedes it."""
        await self._ensure_stream(topic, stream)
        epoch = new_epoch()
        token = secrets.token_hex(8)
        claimed = False
        self._heads.pop(topic, None)
        for attempt in range(self.retries):
            head = await self._read_head(stream, subject)
            if head.epoch is None and not claimed:
                await self._claim(topic)  # a stream is born here too (see log.base)
                claimed = True
            headers = {
                _EXPECTED_SEQ: str(head.seq),
                "Ec-Epoch": epoch,
                "Ec-Top": str(head.top),
                "Ec-Count": "0",
                "Ec-At": repr(now()),
                "Ec-Token": token,
            }
            try:
                ack = await self._publish(subject, b"", headers)
            except _Conflict:
                await _backoff(attempt)
                continue
            except _NoStream:
                self._streams.pop(stream, None)
                await self._ensure_stream(topic, stream)
                continue
            seq = int(ack["seq"])
            await self._api(f"STREAM.PURGE.{stream}", {"filter": subject, "seq": seq})
            self._remember(topic, _Head(seq, head.top, epoch, token))
            return Position(head.top, epoch)
        raise LogError(f"could not truncate {topic!r}: too many conflicts with other writers")

    # -- reading -------------------------------------------------------------------------

    async def read(
        self,
        topic: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int = 100,
        reverse: bool = False,
    ) -> builtins.list[Event]:
        """Return retained events of ``topic``; see :meth:`EventLog.read`."""
        stream, subject = self._names(topic)
        self._ready()
        if limit <= 0 or (before is not None and before <= 1):
            return []
        return await self._run(
            "read", self._read(topic, stream, subject, after, before, limit, reverse)
        )

    async def _read(
        self,
        topic: str,
        stream: str,
        subject: str,
        after: int,
        before: int | None,
        limit: int,
        reverse: bool,
    ) -> list[Event]:
        head = await self._last_msg(stream, subject)
        if head is None:
            return []
        retention = self.retention(topic)
        cutoff = -1.0 if retention.ttl is None else now() - retention.ttl
        low = max(after, head.top - retention.size) + 1
        high = head.top if before is None else min(head.top, before - 1)
        if not reverse:
            rows = await self._rows(stream, subject, head, low, high, limit, cutoff)
            return stored_events(topic, head.epoch, rows)
        found: list[tuple[Any, ...]] = []
        end = high
        while end >= low and len(found) < limit:
            start = max(low, end - (limit - len(found)) + 1)
            found = await self._rows(stream, subject, head, start, end, limit, cutoff) + found
            end = start - 1
        return stored_events(topic, head.epoch, found[-limit:][::-1])

    async def _rows(
        self,
        stream: str,
        subject: str,
        head: _Msg,
        low: int,
        high: int,
        limit: int,
        cutoff: float,
    ) -> list[tuple[Any, ...]]:
        """Rows ``(offset, id, time, payload, binary, tags, key)`` of the head's epoch,
        offsets ``low..high``, events no older than ``cutoff``, at most ``limit``."""
        rows: list[tuple[Any, ...]] = []
        if low > high:
            return rows
        start = await self._locate(stream, subject, head, low, self._hints.get(subject))
        async with contextlib.aclosing(self._following(stream, subject, start)) as messages:
            async for msg in messages:
                first = msg.first
                if first > high:
                    break
                if msg.epoch == head.epoch and msg.count:
                    records = msg.records()[max(0, low - first) : high - first + 1]
                    begin = max(low, first)
                    rows += (
                        (begin + i, event_id, at, payload, binary, tags, key)
                        for i, (event_id, at, payload, binary, tags, key) in enumerate(records)
                        if at >= cutoff
                    )
                    if len(rows) >= limit:
                        del rows[limit:]
                        self._hint(subject, msg)
                        return rows
                if msg.top >= high or msg.seq >= head.seq:
                    self._hint(subject, msg)
                    break
        return rows

    def _hint(self, subject: str, msg: _Msg) -> None:
        """Remember where a read ended: the next page of a replay starts right after it."""
        self._hints[subject] = _Msg(msg.seq, msg.top, msg.count, msg.epoch, msg.at, "", b"")
        self._hints.move_to_end(subject)
        while len(self._hints) > self.max_topics:
            self._hints.popitem(last=False)

    async def position(self, topic: str) -> Position:
        """Return the latest position of a topic (writes nothing; see :mod:`.base`)."""
        stream, subject = self._names(topic)
        self._ready()

        async def run() -> Position:
            head = await self._read_head(stream, subject)
            if head.epoch is not None:
                return Position(head.top, head.epoch)
            # Read after the head: a birth meanwhile makes this epoch stale, never wrong.
            generation = await self._generation(topic)
            return Position(0, empty_epoch(self._store, topic, generation))

        return await self._run("read a position", run())

    async def earliest(self, topic: str) -> int | None:
        """Return the smallest retained offset of a topic, or ``None``."""
        first = await self.read(topic, limit=1)
        return first[0].offset if first else None

    async def lookup(self, topic: str, idempotency_key: str) -> Event | None:
        """Return the event stored under this idempotency key within the dedup window."""
        stream, subject = self._names(topic)
        self._ready()
        return await self._run(
            "look up an idempotency key", self._lookup(topic, stream, subject, idempotency_key)
        )

    async def _lookup(self, topic: str, stream: str, subject: str, key: str) -> Event | None:
        head = await self._last_msg(stream, subject)
        t = now()
        since = t - self.dedup_window
        if head is None or head.at <= since:
            return None
        # Keyed events are messages of their own; scan those of the window
        # (found by their append time, with a margin for clocks between writers).
        first = await self._next_msg(stream, subject, 1)
        assert first is not None  # the head is there
        start = first
        if first.at < since - _CLOCK_MARGIN:
            start = await self._seek(
                stream, subject, first, head, since - _CLOCK_MARGIN, lambda m: m.at
            )
        found: Event | None = None
        async with contextlib.aclosing(self._following(stream, subject, start)) as messages:
            async for msg in messages:
                if msg.epoch == head.epoch and msg.count == 1 and msg.at > since:
                    [(event_id, at, payload, binary, tags, ikey)] = msg.records()
                    if ikey == key:
                        found = stored_event(
                            topic, msg.top, msg.epoch, event_id, at, payload, binary, tags, ikey
                        )
                if msg.seq >= head.seq:
                    break
        return found

    # -- retention -------------------------------------------------------------------------

    async def prune(self, now_: float | None = None) -> int:
        """Purge what retention removed (by count and by the events' own times);
        forget topics left without events. Return how many events were removed."""
        self._ready()
        t = now() if now_ is None else now_
        return await self._run("prune", self._prune(t))

    async def _event_streams(self) -> list[str]:
        names: list[str] = []
        while True:
            page = await self._api(
                "STREAM.NAMES", {"subject": f"{self.prefix}.ev.>", "offset": len(names)}
            )
            names += page.get("streams") or []
            if not page.get("streams") or len(names) >= page.get("total", 0):
                return [n for n in names if n.startswith(f"{self.prefix}_ev_")]

    async def _subjects(self, stream: str) -> list[str]:
        subjects: list[str] = []
        while True:
            try:
                info = await self._api(
                    f"STREAM.INFO.{stream}", {"subjects_filter": ">", "offset": len(subjects)}
                )
            except _StreamMissing:
                return subjects
            page = list((info["state"].get("subjects") or {}).keys())
            subjects += page
            if not page or len(subjects) >= info.get("total", 0):
                return subjects

    async def _prune(self, t: float) -> int:
        removed = 0
        for stream in await self._event_streams():
            for subject in await self._subjects(stream):
                topic = self._topic_of(subject)
                lane = self._lane(topic)
                lane.users += 1
                try:
                    async with lane.lock:
                        removed += await self._prune_topic(topic, stream, subject, t)
                finally:
                    lane.users -= 1
                    self._release(topic, lane)
        return removed

    async def _prune_topic(self, topic: str, stream: str, subject: str, t: float) -> int:
        head = await self._last_msg(stream, subject)
        first = await self._next_msg(stream, subject, 1)
        if head is None or first is None:
            return 0
        retention = self.retention(topic)
        floor = head.top - retention.size
        cutoff = None if retention.ttl is None else t - retention.ttl
        # The first message that still holds an event to keep, if any.
        keep: _Msg | None = None
        start = await self._locate(stream, subject, head, floor + 1) if head.count else head
        async with contextlib.aclosing(self._following(stream, subject, start)) as messages:
            async for msg in messages:
                if msg.epoch == head.epoch and any(
                    msg.first + i > floor and (cutoff is None or record[1] >= cutoff)
                    for i, record in enumerate(msg.records())
                ):
                    keep = msg
                    break
                if msg.seq >= head.seq:
                    break
        self._heads.pop(topic, None)
        if keep is None:
            # Nothing left: forget the topic (its epoch was claimed at birth).
            # Purge up to the head read, not beyond: another process may append.
            await self._api(f"STREAM.PURGE.{stream}", {"filter": subject, "seq": head.seq + 1})
            return max(0, head.top + 1 - first.first)
        if keep.seq > first.seq:
            await self._api(f"STREAM.PURGE.{stream}", {"filter": subject, "seq": keep.seq})
        return max(0, keep.first - first.first)

    # -- dead letters and health ----------------------------------------------------------

    async def save_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Store dead letters (those whose data cannot be encoded are skipped)."""
        rows = [row for row in map(letter_to_row, letters) if row is not None]
        if not rows:
            return
        self._ready()

        async def run() -> None:
            for row in rows:  # one subject per letter: a new save of an id replaces it
                await self._publish(f"{self.prefix}.dl.{row[0]}", _encode_msgpack(row), {})

        await self._run("save dead letters", run())

    async def load_dead_letters(self, limit: int) -> builtins.list[DeadLetter]:
        """Return up to ``limit`` stored dead letters (the newest), oldest first."""
        self._ready()
        if limit <= 0:
            return []

        async def run() -> list[DeadLetter]:
            letters: list[DeadLetter] = []
            scan = self._scan(self._letters_stream, f"{self.prefix}.dl.*", 1)
            async with contextlib.aclosing(scan) as messages:
                async for _, raw in messages:
                    letters.append(row_to_letter(_decode_row(raw.data)))
            letters.sort(key=lambda letter: letter.id)
            return letters[-limit:]

        return await self._run("load dead letters", run())

    async def delete_dead_letters(self, ids: Sequence[int]) -> None:
        """Remove stored dead letters by id."""
        if not ids:
            return
        self._ready()

        async def run() -> None:
            for lid in ids:
                await self._api(
                    f"STREAM.PURGE.{self._letters_stream}", {"filter": f"{self.prefix}.dl.{lid}"}
                )

        await self._run("delete dead letters", run())

    async def check(self) -> None:
        """Raise :class:`LogError` unless the log can accept writes now (a tiny write)."""
        self._ready()
        await self._run(
            "check", self._publish(f"{self.prefix}.meta.checked", repr(now()).encode(), {})
        )

    def __repr__(self) -> str:
        return f"<JetStreamLog {self.url!r} prefix={self.prefix!r}>"


#: Margin for the clocks of several writers when a lookup seeks by append time.
_CLOCK_MARGIN: Final = 5.0


def _top(msg: _Msg) -> float:
    return msg.top


def _seq_of(raw: Msg) -> int:
    return int((raw.headers or {})["Nats-Sequence"])


def _retention_of(config: dict[str, Any]) -> Retention:
    """The retention a stream's configuration keeps at least."""
    size = config.get("max_msgs_per_subject", -1) - 1  # one message is room for a marker
    max_age = config.get("max_age", 0)
    return Retention(size=size if size > 0 else 2**62, ttl=max_age / 1e9 if max_age else None)


def _set_retention(config: dict[str, Any], retention: Retention, dedup_window: float) -> None:
    """Set a stream's limits from a retention (the server's dedup window within its max age)."""
    config["max_msgs_per_subject"] = retention.size + 1  # room for one marker
    config["max_age"] = _duration(retention.ttl)
    window = dedup_window if retention.ttl is None else min(dedup_window, retention.ttl)
    config["duplicate_window"] = _duration(window)


def _writer_done(task: asyncio.Task[None]) -> None:
    """Log a writer task that died of something else than its appends' own errors."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("a JetStream log writer task failed", exc_info=task.exception())


#: The error of appends whose writer was cancelled before publishing them.
_CLOSED: Final = "the log was closed before the append was committed"


def _fail(future: asyncio.Future[Any], error: BaseException | str) -> None:
    if not future.done():
        future.set_exception(LogError(error) if isinstance(error, str) else error)


async def _backoff(attempt: int) -> None:
    """Wait a little before retrying after a conflict (jittered, growing, capped)."""
    await asyncio.sleep(random.uniform(0, min(0.002 * 2**attempt, 0.25)))
