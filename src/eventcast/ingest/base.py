"""What every consumer shares: the target it feeds, its options, decoding, supervision.

A *consumer* takes messages from a source that already holds them (a
PostgreSQL outbox table, an MQTT or AMQP broker, a Redis stream, a JetStream
stream) and turns each one into a server API command (``publish``,
``broadcast``, …) run against a :class:`CommandTarget`. Consumers never import
the hub: the hub hands them a target (``eventcast.server.ingest``).

Delivery rule, the same for every source: **a message is acknowledged to its
source only after the target has committed what it asked for** (for a durable
channel, after the publication is in the log). A crash in between makes the
source deliver it again; the publication's idempotency key, derived from the
message's identity at the source, makes the log store it once. A message that
can never succeed (it cannot be decoded, is too large, or its command is
refused) is acknowledged, counted and kept as a dead letter: never retried
forever, never dropped silently. Any other failure (the source or the log is
down) acknowledges nothing: the consumer closes its connection, waits with
exponential backoff and jitter, and reconnects, and the source delivers the
unacknowledged messages again.

Two message forms, chosen by the ``channel`` option:

* **command** (no ``channel``): the message is a server API command, as in
  Centrifugo's consumers: ``{"method": "publish", "payload": {"channel": …,
  "data": …}}`` (the outbox table keeps ``method`` and ``payload`` in columns);
* **data** (``channel`` set, a template such as ``"iot:{topic}"``): the message
  body is the publication's data (JSON; anything else is published as a base64
  string with the tag ``encoding=base64``), published to the channel made from
  the template, where ``{topic}`` is the source's topic, subject, routing key
  or stream name with ``/`` turned into ``.``.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, Literal, Protocol

import msgspec
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .._durations import Duration
from .._urls import redact_password
from ..exceptions import (
    CommandRejectedError,
    EventcastError,
    InvalidTopicError,
    SourceError,
)
from ..handlers import backoff_delay
from ..topics import validate_topic
from ._sql import check_identifier, check_table_name

__all__ = [
    "CONSUMER_TYPES",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_OUTBOX_PAYLOAD",
    "AmqpOptions",
    "Command",
    "CommandTarget",
    "Consumer",
    "ConsumerConfig",
    "ConsumerState",
    "Incoming",
    "JetStreamOptions",
    "MqttOptions",
    "PostgresOptions",
    "RedisStreamOptions",
    "render_channel",
]

logger = logging.getLogger("eventcast.ingest")

#: The largest message body a consumer accepts, in bytes, unless told otherwise.
DEFAULT_MAX_MESSAGE_SIZE: Final = 65_536
#: The largest command payload read from the outbox table, in bytes (the
#: application wrote it itself, so the bound is looser than for a network message).
MAX_OUTBOX_PAYLOAD: Final = 1_048_576
#: First delay of the reconnect backoff, in seconds.
DEFAULT_BACKOFF: Final = 0.5
#: Longest delay of the reconnect backoff, in seconds.
DEFAULT_MAX_BACKOFF: Final = 30.0

#: The commands a consumer may run: the ones that change state (as in Centrifugo,
#: reading commands make no sense asynchronously, and ``batch`` is not supported).
CONSUMABLE_METHODS: Final = frozenset(
    ("publish", "broadcast", "subscribe", "unsubscribe", "disconnect", "history_remove")
)

_NAME: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_decode_json = msgspec.json.Decoder().decode


# -- the target -------------------------------------------------------------------------------


class CommandTarget(Protocol):
    """Where consumers send commands: the hub, through ``eventcast.server.ingest``.

    Contract:

    * :meth:`command` runs one server API command exactly as the HTTP API would
      and returns only once its effect is committed (for a durable channel,
      once the publication is in the log).
    * A publication carrying an ``idempotency_key`` already stored for its
      channel within the log's dedup window is not stored or delivered again.
    * Commands *started* in order (``asyncio.gather`` starts its awaitables in
      order) commit in that order for any one channel.
    * It raises :class:`~eventcast.exceptions.CommandRejectedError` for a
      command that can never succeed (the consumer acks it and keeps it as a
      dead letter) and any other :class:`~eventcast.exceptions.EventcastError`
      for a failure worth retrying (the log is down, the bus is closed).
    """

    async def command(
        self, method: str, params: Mapping[str, Any], *, idempotency_key: str | None
    ) -> None:
        """Run one server API command; return once its effect is committed."""
        ...

    def dead_letter(self, consumer: str, message: bytes, *, reason: str, error: str) -> None:
        """Keep a message that can never be processed (the body as received)."""
        ...


# -- options ----------------------------------------------------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _MessageOptions(_Options):
    """Options shared by the message sources (every type but ``postgresql``).

    Attributes:
        channel: a channel template for *data* messages (``"iot:{topic}"``);
            unset, every message is a server API command.
        idempotency_key_field: for data messages whose source gives no stable
            identity (MQTT, AMQP without ``message_id``): a top-level field of
            the JSON data whose value identifies the reading (``"id"``), so a
            redelivered message is stored once.
        binary: what to do with a data message that is not JSON: ``base64``
            publishes it as a base64 string tagged ``encoding=base64``;
            ``reject`` keeps it as a dead letter.
        max_message_size: the largest body accepted, in bytes; a larger one is
            a dead letter.
    """

    channel: str | None = None
    idempotency_key_field: str | None = None
    binary: Literal["base64", "reject"] = "base64"
    max_message_size: int = Field(default=DEFAULT_MAX_MESSAGE_SIZE, gt=0, le=16 * 1_048_576)

    @field_validator("channel")
    @classmethod
    def _check_channel(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                validate_topic(value.replace("{topic}", "x"))
            except InvalidTopicError as exc:
                raise ValueError(f"invalid channel template {value!r}: {exc}") from None
        return value


class PostgresOptions(_Options):
    """The PostgreSQL outbox consumer (Centrifugo's ``postgresql`` consumer options).

    Attributes:
        dsn: the application database (``postgresql://user:password@host/db``).
        outbox_table_name: the outbox table (``name`` or ``schema.name``).
        num_partitions: partitions consumed in parallel (rows carry ``partition``
            ``0 .. num_partitions - 1``; order is kept within one).
        partition_select_limit: the most rows read, published and deleted in one
            transaction per partition.
        partition_poll_interval: how often an idle partition is polled, in
            seconds (NOTIFY wakes it at once).
        partition_notification_channel: the channel LISTENed to for wake-ups
            (the table's trigger from ``eventcast outbox init`` notifies it);
            ``""`` polls only. Default: the table's name.
    """

    dsn: SecretStr
    outbox_table_name: str = "eventcast_outbox"
    num_partitions: int = Field(default=1, ge=1, le=1024)
    partition_select_limit: int = Field(default=1000, ge=1, le=100_000)
    partition_poll_interval: Duration = Field(default=0.3, gt=0)
    partition_notification_channel: str | None = None

    @field_validator("outbox_table_name")
    @classmethod
    def _check_table(cls, value: str) -> str:
        return check_table_name(value)

    @field_validator("partition_notification_channel")
    @classmethod
    def _check_notify(cls, value: str | None) -> str | None:
        return check_identifier(value, "partition_notification_channel") if value else value


class MqttOptions(_MessageOptions):
    """The MQTT consumer.

    Attributes:
        url: the broker: ``mqtt://[user:password@]host[:1883]`` (``mqtts://``
            for TLS).
        topics: topic filters to subscribe to (``+`` and ``#`` allowed).
        qos: the subscription's QoS; 1 (the default) gives at-least-once.
        client_id: the MQTT client id, which names the persistent session
            (default ``eventcast-<consumer name>``).
        clean_session: start without the broker's stored session (the default,
            False, keeps it, so messages sent while the hub is down arrive later).
        keepalive: seconds between MQTT keepalive pings.
        retained: also publish the retained messages the broker sends on every
            (re)subscription (off: they are old state, and would be published
            again on each reconnect).
    """

    url: SecretStr = SecretStr("mqtt://127.0.0.1:1883")
    topics: Annotated[list[str], Field(min_length=1)]
    qos: Literal[0, 1, 2] = 1
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    clean_session: bool = False
    keepalive: int = Field(default=30, ge=5, le=3600)
    retained: bool = False


class AmqpOptions(_MessageOptions):
    """The AMQP 0-9-1 consumer (RabbitMQ).

    Attributes:
        url: ``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS).
        queue: the queue to consume; declared durable if missing.
        exchange: when set, the queue is bound to this exchange…
        routing_keys: …with these routing keys (``#`` by default).
        prefetch: the most unacknowledged messages delivered at once.
    """

    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    queue: str = Field(min_length=1, max_length=255)
    exchange: str | None = Field(default=None, min_length=1, max_length=255)
    routing_keys: list[str] = Field(default_factory=lambda: ["#"])
    prefetch: int = Field(default=256, ge=1, le=65_535)


class RedisStreamOptions(_MessageOptions):
    """The Redis Streams consumer (a consumer group).

    Attributes:
        url: ``redis://[:password@]host:6379/db``.
        streams: the stream keys to read.
        consumer_group: the group (created at the stream's start if missing).
        consumer_name: this reader's name in the group (default: the consumer's
            name); its pending entries are read again after a restart.
        count: the most entries read per call.
        block: how long one read waits for new entries, in seconds.
        method_field: in command messages, the entry field holding the method.
        payload_field: the entry field holding the payload (command mode) or
            the data (data mode).
    """

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    streams: Annotated[list[str], Field(min_length=1)]
    consumer_group: str = Field(default="eventcast", min_length=1)
    consumer_name: str | None = Field(default=None, min_length=1)
    count: int = Field(default=256, ge=1, le=10_000)
    block: Duration = Field(default=5.0, gt=0, le=60)
    method_field: str = "method"
    payload_field: str = "payload"


class JetStreamOptions(_MessageOptions):
    """The NATS JetStream consumer (a durable pull consumer).

    Attributes:
        url: ``nats://[user:password@]host:4222``.
        stream: the JetStream stream (it must exist).
        subject: a filter subject within the stream (default: all of it).
        durable_consumer_name: the durable consumer (default
            ``eventcast-<consumer name>``); created if missing.
        ack_wait: seconds before an unacknowledged message is delivered again.
        batch: the most messages fetched at once.
    """

    url: SecretStr = SecretStr("nats://127.0.0.1:4222")
    stream: str = Field(min_length=1, max_length=255)
    subject: str | None = Field(default=None, min_length=1)
    durable_consumer_name: str | None = Field(default=None, min_length=1)
    ack_wait: Duration = Field(default=30.0, gt=0)
    batch: int = Field(default=256, ge=1, le=10_000)


#: Each consumer type: its options model and ``(module, class)`` of its consumer.
CONSUMER_TYPES: Final[dict[str, tuple[type[_Options], str, str, str]]] = {
    "postgresql": (PostgresOptions, "eventcast.ingest.outbox", "OutboxConsumer", "postgres"),
    "mqtt": (MqttOptions, "eventcast.ingest.mqtt", "MqttConsumer", "mqtt"),
    "amqp": (AmqpOptions, "eventcast.ingest.amqp", "AmqpConsumer", "amqp"),
    "redis_stream": (
        RedisStreamOptions,
        "eventcast.ingest.redis_streams",
        "RedisStreamConsumer",
        "redis",
    ),
    "nats_jetstream": (JetStreamOptions, "eventcast.ingest.jetstream", "JetStreamConsumer", "nats"),
}


class ConsumerConfig(_Options):
    """One entry of the hub's ``consumers`` setting (Centrifugo's shape).

    ``{"name": "orders", "type": "postgresql", "postgresql": {...}}``: the
    options sit under the key named by ``type``.

    Attributes:
        name: letters, digits, ``_`` and ``-``; unique among consumers.
        type: ``postgresql``, ``mqtt``, ``amqp``, ``redis_stream`` or
            ``nats_jetstream``.
        enabled: a disabled consumer is validated but not started.
    """

    name: str
    type: Literal["postgresql", "mqtt", "amqp", "redis_stream", "nats_jetstream"]
    enabled: bool = True
    postgresql: PostgresOptions | None = None
    mqtt: MqttOptions | None = None
    amqp: AmqpOptions | None = None
    redis_stream: RedisStreamOptions | None = None
    nats_jetstream: JetStreamOptions | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"invalid consumer name {value!r}: 1-64 letters, digits, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _check_sections(self) -> ConsumerConfig:
        given = [t for t in CONSUMER_TYPES if getattr(self, t) is not None]
        if self.type not in given:
            raise ValueError(
                f"consumer {self.name!r} of type {self.type!r} needs a {self.type!r} object"
            )
        others = [t for t in given if t != self.type]
        if others:
            raise ValueError(
                f"consumer {self.name!r} is of type {self.type!r} but also has {', '.join(others)}"
            )
        return self

    @property
    def options(self) -> _Options:
        """The options of this consumer's type."""
        options: _Options = getattr(self, self.type)
        return options


# -- messages and commands --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One server API command decoded from a message.

    Attributes:
        method: ``publish``, ``broadcast``, …
        params: the command's parameters (Centrifugo's request body).
        idempotency_key: derived from the message's identity at the source.
    """

    method: str
    params: Mapping[str, Any]
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message as received, before decoding.

    Attributes:
        body: the message body (bytes, or text from a text column).
        key: the message's stable identity at its source (``"<table>:<id>"``,
            ``"<stream>:<entry id>"`` …), or ``None`` when the source has none.
        topic: the source's topic, subject, routing key or stream, for the
            channel template.
        method: set when the source keeps the method apart from the body (the
            outbox's ``method`` column, a stream entry's method field).
    """

    body: bytes | str
    key: str | None = None
    topic: str = ""
    method: str | None = None

    def raw(self) -> bytes:
        """The body as bytes (for dead letters)."""
        body = self.body
        return body.encode() if isinstance(body, str) else body


def render_channel(template: str, topic: str) -> str:
    """Fill ``{topic}`` in a channel template with a source topic (``/`` becomes ``.``).

    Raises:
        CommandRejectedError: the resulting channel name breaks the grammar.
    """
    channel = template.replace("{topic}", topic.replace("/", "."))
    try:
        return validate_topic(channel)
    except InvalidTopicError as exc:
        raise CommandRejectedError(f"no valid channel for this message: {exc}") from None


def _idempotency_key(params: Mapping[str, Any], fallback: str | None) -> str | None:
    own = params.get("idempotency_key")
    return own if isinstance(own, str) and own else fallback


def decode_command(item: Incoming, max_size: int) -> Command:
    """Decode a command message (``{"method", "payload"}``, or a payload with ``item.method``).

    Raises:
        CommandRejectedError: the message is too large, not JSON, or not a command.
    """
    body = item.body
    if len(body) > max_size:
        raise CommandRejectedError(f"message of {len(body)} bytes is over {max_size}", "too_large")
    try:
        decoded = _decode_json(body)
    except msgspec.DecodeError as exc:
        raise CommandRejectedError(f"message is not JSON: {exc}", "undecodable") from None
    method: object
    params: object
    if item.method is not None:
        method, params = item.method, decoded
    elif isinstance(decoded, dict):
        method, params = decoded.get("method"), decoded.get("payload")
    else:
        raise CommandRejectedError("a command message must be a JSON object", "undecodable")
    if not isinstance(method, str) or method not in CONSUMABLE_METHODS:
        raise CommandRejectedError(
            f"method {str(method)[:64]!r} cannot be consumed (one of: "
            f"{', '.join(sorted(CONSUMABLE_METHODS))})",
            "bad_command",
        )
    if not isinstance(params, dict):
        raise CommandRejectedError("a command's payload must be a JSON object", "undecodable")
    return Command(method, params, _idempotency_key(params, item.key))


def decode_data(item: Incoming, options: _MessageOptions) -> Command:
    """Decode a data message into a ``publish`` to the channel made from the template.

    Raises:
        CommandRejectedError: the message is too large, its channel is invalid,
            or it is not JSON and ``binary`` is ``reject``.
    """
    template = options.channel
    assert template is not None
    body = item.raw()
    if len(body) > options.max_message_size:
        raise CommandRejectedError(
            f"message of {len(body)} bytes is over {options.max_message_size}", "too_large"
        )
    channel = render_channel(template, item.topic)
    params: dict[str, Any] = {"channel": channel}
    try:
        params["data"] = _decode_json(body)
    except msgspec.DecodeError:
        if options.binary == "reject":
            raise CommandRejectedError("message is not JSON", "undecodable") from None
        params["data"] = base64.b64encode(body).decode("ascii")
        params["tags"] = {"encoding": "base64"}
    key = item.key
    field_name = options.idempotency_key_field
    if field_name is not None and isinstance(params["data"], dict):
        value = params["data"].get(field_name)
        if isinstance(value, str | int) and not isinstance(value, bool):
            key = f"{item.topic}:{value}"
    return Command("publish", params, key)


# -- the consumer -----------------------------------------------------------------------------


class ConsumerState(enum.Enum):
    """Where a consumer stands."""

    #: Connecting to its source (first time).
    STARTING = "starting"
    #: Connected and consuming.
    RUNNING = "running"
    #: The source or the hub failed; waiting to reconnect.
    RETRYING = "retrying"
    #: Closed.
    STOPPED = "stopped"


@dataclass(slots=True)
class ConsumerStats:
    """A consumer's counters, read by ``/metrics``, ``/readyz`` and the dashboard.

    Attributes:
        processed: messages acknowledged to the source (published or dead-lettered).
        dead_letters: messages kept as dead letters.
        errors: failures of the source or the hub, each followed by a reconnect.
        lag: messages waiting at the source, when it tells (else ``None``).
        last_error: the text of the last failure (never a message body).
        last_error_time: when it happened (Unix time).
        rejected_by_reason: the dead letters by reason (``undecodable``,
            ``too_large``, ``bad_command``).
    """

    processed: int = 0
    dead_letters: int = 0
    errors: int = 0
    lag: int | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class Consumer(ABC):
    """A supervised task moving messages from one source into a :class:`CommandTarget`.

    Subclasses implement :meth:`_consume`: connect, call :meth:`_connected`,
    then read messages and pass them to :meth:`_dispatch` in source order,
    acknowledging them to the source only after it returns. Any failure
    raised out of :meth:`_consume` is logged and counted, and the consumer
    reconnects after a backoff.

    Args:
        name: the consumer's name (from the settings).
        target: where commands go.
        options: the options of its type.
        backoff: the first reconnect delay, in seconds.
        max_backoff: the longest reconnect delay, in seconds.
    """

    #: The ``type`` of the settings entry.
    type: ClassVar[str]
    #: What the source is called in error messages (``"MQTT broker"``).
    source_name: ClassVar[str] = "source"

    def __init__(
        self,
        name: str,
        target: CommandTarget,
        options: Any,
        *,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
    ) -> None:
        self.name = name
        self.target = target
        self.options = options
        self.backoff = backoff
        self.max_backoff = max_backoff
        #: The consumer's counters.
        self.stats = ConsumerStats()
        self.state = ConsumerState.STARTING
        self._task: asyncio.Task[None] | None = None
        self._attempt = 0
        url = getattr(options, "url", None) or getattr(options, "dsn", None)
        #: The source's URL with any password masked, for messages.
        self.where = redact_password(url.get_secret_value()) if url is not None else ""

    @abstractmethod
    async def _consume(self) -> None:
        """Connect and consume until cancelled; raise when the source or the hub fails."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the consumer's supervised task. Idempotent."""
        if self._task is None and self.state is not ConsumerState.STOPPED:
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"eventcast-consumer-{self.name}"
            )
            self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # _supervise catches every Exception; only a BaseException gets here.
            logger.error("consumer %r stopped", self.name, exc_info=task.exception())
            self.state = ConsumerState.STOPPED

    async def aclose(self) -> None:
        """Stop consuming; unacknowledged messages stay at the source. Idempotent."""
        self.state = ConsumerState.STOPPED
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _supervise(self) -> None:
        while True:
            try:
                await self._consume()
                error: str = "the source closed the connection"
            except asyncio.CancelledError:
                raise
            except EventcastError as exc:
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("consumer %r failed, reconnecting: %s", self.name, error)
            except Exception as exc:  # a driver error not translated: a bug, log it in full
                error = f"{type(exc).__name__}: {exc}"
                logger.error("consumer %r crashed, reconnecting", self.name, exc_info=True)
            self.stats.errors += 1
            self.stats.last_error = error
            self.stats.last_error_time = time.time()
            self.state = ConsumerState.RETRYING
            await asyncio.sleep(backoff_delay(self._attempt, self.backoff, self.max_backoff))
            self._attempt = min(self._attempt + 1, 30)

    def _source_error(self, problem: BaseException | str) -> SourceError:
        """A :class:`SourceError` naming the source (on one line), chained to ``problem``."""
        text = problem if isinstance(problem, str) else f"{type(problem).__name__}: {problem}"
        error = SourceError(f"{self.source_name} {self.where}: {' '.join(text.split())}")
        if isinstance(problem, BaseException):
            error.__cause__ = problem
        return error

    def _connected(self) -> None:
        """Tell the supervisor the source is connected (resets the backoff)."""
        self.state = ConsumerState.RUNNING
        self._attempt = 0

    # -- messages ----------------------------------------------------------------------------

    def _decode(self, item: Incoming) -> Command:
        options = self.options
        if isinstance(options, _MessageOptions) and options.channel is not None:
            return decode_data(item, options)
        max_size = (
            options.max_message_size if isinstance(options, _MessageOptions) else MAX_OUTBOX_PAYLOAD
        )
        return decode_command(item, max_size)

    def _reject(self, item: Incoming, exc: CommandRejectedError) -> None:
        stats = self.stats
        stats.dead_letters += 1
        stats.rejected_by_reason[exc.reason] = stats.rejected_by_reason.get(exc.reason, 0) + 1
        # The reason and the error text only: never the body.
        logger.warning("consumer %r: a message became a dead letter: %s", self.name, exc)
        self.target.dead_letter(self.name, item.raw(), reason=exc.reason, error=str(exc))

    async def _dispatch(self, items: Sequence[Incoming]) -> None:
        """Run the commands of these messages, in order; return once all are committed.

        A message that can never succeed becomes a dead letter. Raises the
        first other failure: then the caller must acknowledge none of the
        messages (the ones already committed are deduplicated on redelivery),
        and no dead letter is recorded yet (the messages come again).
        """
        rejected: list[tuple[Incoming, CommandRejectedError]] = []
        commands: list[tuple[Incoming, Command]] = []
        for item in items:
            try:
                commands.append((item, self._decode(item)))
            except CommandRejectedError as exc:
                rejected.append((item, exc))
        command = self.target.command
        results: list[BaseException | None]
        if len(commands) == 1:
            cmd = commands[0][1]
            try:
                await command(cmd.method, cmd.params, idempotency_key=cmd.idempotency_key)
                results = [None]
            except EventcastError as exc:
                results = [exc]
        else:
            # Started in order, so they commit in order per channel (the target's
            # contract), and share the log's group commit.
            results = await asyncio.gather(
                *(
                    command(c.method, c.params, idempotency_key=c.idempotency_key)
                    for _, c in commands
                ),
                return_exceptions=True,
            )
        for (item, _), result in zip(commands, results, strict=True):
            if isinstance(result, CommandRejectedError):
                rejected.append((item, result))
            elif result is not None:
                raise result
        for item, error in rejected:
            self._reject(item, error)
        self.stats.processed += len(items)

    # -- introspection ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The consumer's state and counters, JSON-ready (for ``/readyz`` and the dashboard)."""
        stats = self.stats
        return {
            "name": self.name,
            "type": self.type,
            "state": self.state.value,
            "processed": stats.processed,
            "dead_letters": stats.dead_letters,
            "errors": stats.errors,
            "lag": stats.lag,
            "last_error": stats.last_error,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.state.value}>"
