"""The ``Backplane`` abstract base class: how hub nodes share publications.

A backplane carries encoded publications between nodes. Each node subscribes
only to the topic filters it has local interest in, so it receives only what
its clients want. A backplane is *lossy*: after a reconnect the bus catches up
durable topics from the log (the source of truth) and tells subscribers of
live-only topics that continuity is lost.

Messages travel as an *envelope*: a compact JSON array carrying the node that
published, the event's fields and its data as raw JSON, so a receiving node
decodes each publication once, whatever its number of local subscribers.

Besides publications, a backplane carries the *control channel*: messages
between nodes (admin actions, heartbeats, requests and their answers) that
every node receives from the moment it opens, whatever its interest, on a
channel of their own that no topic name or pattern can match (``~`` is outside
the topic grammar). A node can also be addressed alone, by its id. A control
payload is a JSON object, never an array, so it reaches the bus mixed with the
envelopes of a batch and is told apart by its first byte (:func:`is_control`).
"""

from __future__ import annotations

import enum
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, Final

import msgspec

from ..events import Event
from ..exceptions import BackplaneError

__all__ = [
    "CONTROL_CHANNEL",
    "CONTROL_MARK",
    "KIND_EVENT",
    "Backplane",
    "BackplaneState",
    "Envelope",
    "decode_envelope",
    "encode_envelope",
    "is_control",
    "new_node_id",
    "own_prefix",
]

#: Envelope kinds.
KIND_EVENT: Final = 0
KIND_CONTROL: Final = 1

#: The name part of the control channel (each backplane puts it behind its prefix).
CONTROL_CHANNEL: Final = "~control"
#: The first byte of every control payload (a JSON object); an envelope is an array.
CONTROL_MARK: Final = b"{"

MessageHandler = Callable[[Sequence[bytes]], None]
StateHandler = Callable[[bool], None]


def new_node_id() -> str:
    """A random id for this node (so it can skip its own messages)."""
    return secrets.token_hex(6)


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """One message on the backplane (encoded as a JSON array)."""

    node: str
    kind: int
    topic: str
    id: str
    time: float
    offset: int | None
    epoch: str | None
    data: msgspec.Raw
    tags: dict[str, str] | None = None
    ikey: str | None = None
    binary: bool = False


_NO_TAGS: Final[MappingProxyType[str, str]] = MappingProxyType({})
_encode = msgspec.json.Encoder().encode
_decode_envelope = msgspec.json.Decoder(Envelope).decode
_decode_any = msgspec.json.Decoder().decode


def encode_envelope(node: str, event: Event, *, kind: int = KIND_EVENT) -> bytes:
    """Encode an event for the backplane (its data encoded once, cached on the event).

    Raises:
        EncodeError: the event's data cannot be encoded as JSON.
    """
    return _encode(
        Envelope(
            node=node,
            kind=kind,
            topic=event.topic,
            id=event.id,
            time=event.time,
            offset=event.offset,
            epoch=event.epoch,
            data=msgspec.Raw(event.encoded_data()),
            tags=dict(event.tags) if event.tags else None,
            ikey=event.idempotency_key,
            binary=isinstance(event.data, bytes),
        )
    )


def own_prefix(node: str) -> bytes:
    """The bytes every envelope encoded by ``node`` starts with.

    A node skips its own messages by this prefix, before decoding anything.
    """
    return _encode([node])[:-1]  # the array's opening and first element: b'["<node>"'


def is_control(payload: bytes) -> bool:
    """Whether a payload from the backplane is a control message (a JSON object)."""
    return payload.startswith(CONTROL_MARK)


def decode_envelope(payload: bytes) -> tuple[Envelope, Event]:
    """Decode an envelope and build its event (the data decoded once).

    Raises:
        BackplaneError: the payload is not a valid envelope.
    """
    try:
        env = _decode_envelope(payload)
        raw = bytes(env.data)
        data: Any = raw if env.binary else _decode_any(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BackplaneError(f"undecodable backplane message: {exc}") from None
    event = Event(
        topic=env.topic,
        data=data,
        id=env.id,
        time=env.time,
        offset=env.offset,
        epoch=env.epoch,
        tags=MappingProxyType(env.tags) if env.tags else _NO_TAGS,
        idempotency_key=env.ikey,
        _cache=raw,
    )
    return env, event


class BackplaneState(enum.Enum):
    """Where a backplane's connection is."""

    NEW = "new"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


class Backplane(ABC):
    """Carries publications between nodes. Subclasses import their driver lazily.

    The bus sets :attr:`on_messages` (called with batches of raw envelopes and
    control messages, in arrival order, from the backplane's reader) and
    :attr:`on_state` (called with ``True`` when the connection comes up,
    ``False`` when it drops). Implementations reconnect by themselves, with a
    logged backoff, and resubscribe every filter, the control channel and
    this node's own address on reconnect.
    """

    def __init__(self) -> None:
        self.node_id = new_node_id()
        self.on_messages: MessageHandler | None = None
        self.on_state: StateHandler | None = None
        self.state = BackplaneState.NEW
        self.filters: set[str] = set()
        #: Messages received and sent, and publish failures (for metrics).
        self.received = 0
        self.sent = 0
        self.failures = 0
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Whether the connection to the engine is up."""
        return self.state is BackplaneState.CONNECTED

    def is_closed(self) -> bool:
        """Whether :meth:`close` was called (a call, so it is re-read after awaits)."""
        return self.state is BackplaneState.CLOSED

    def _set_state(self, state: BackplaneState) -> None:
        previous = self.state
        self.state = state
        if self.on_state is not None and previous is not state:
            if state is BackplaneState.CONNECTED:
                self.on_state(True)
            elif previous is BackplaneState.CONNECTED:
                self.on_state(False)

    def _deliver(self, payloads: Sequence[bytes]) -> None:
        self.received += len(payloads)
        handler = self.on_messages
        if handler is not None and payloads:
            handler(payloads)

    @abstractmethod
    async def open(self) -> None:
        """Connect. Raises :class:`BackplaneError` if the engine cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect and stop every task. Idempotent; safe after cancellation."""

    @abstractmethod
    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish ``(topic, envelope)`` pairs, in order.

        Raises:
            BackplaneError: the engine is unreachable; nothing is retried here.
        """

    @abstractmethod
    async def subscribe(self, topic_filter: str) -> None:
        """Receive the messages of a topic name or pattern (idempotent)."""

    @abstractmethod
    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving a filter's messages (idempotent)."""

    @abstractmethod
    async def publish_control(self, payload: bytes, node: str | None = None) -> None:
        """Send a control message to every node, or to the node whose id is ``node``.

        ``payload`` is a JSON object (see :func:`is_control`). Every node
        receives control messages from :meth:`open` on, with no
        :meth:`subscribe`; whether this node receives its own broadcasts
        depends on the engine, so receivers skip their own by content.

        Raises:
            BackplaneError: the engine is unreachable; nothing is retried here.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.value} node={self.node_id}>"
