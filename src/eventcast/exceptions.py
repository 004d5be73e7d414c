"""The exception hierarchy of eventcast.

Every error eventcast raises derives from :class:`EventcastError`. Errors from
dependencies (sqlite3, psycopg, redis, nats, …) are translated at the boundary
and chained with ``from exc``, so callers only ever catch eventcast's own types.

.. code-block:: text

    EventcastError
    ├── InvalidTopicError (also ValueError)
    ├── EncodeError (also ValueError)
    ├── InvalidDataError (also ValueError)
    ├── BusClosedError
    ├── SubscriberExistsError
    ├── SubscriberNotFoundError
    ├── SubscriptionClosedError
    │   └── SlowConsumerError
    ├── DeliveryError
    │   └── AckTimeoutError
    ├── LogError
    │   ├── PositionError (also ValueError)
    │   └── UnrecoverablePositionError
    ├── ConfigurationError (also ValueError)
    ├── BackplaneError
    ├── AuthError
    │   ├── InvalidTokenError
    │   ├── TokenExpiredError
    │   └── KeySetError
    ├── HookError
    ├── IngestError
    │   ├── SourceError
    │   └── CommandRejectedError
    ├── HubClientError
    │   ├── HandshakeError
    │   ├── ReplyError
    │   ├── ReplyTimeoutError
    │   ├── DisconnectedError
    │   └── ClientClosedError
    └── PositionLostError
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import Position

__all__ = [
    "AckTimeoutError",
    "AuthError",
    "BackplaneError",
    "BusClosedError",
    "ClientClosedError",
    "CommandRejectedError",
    "ConfigurationError",
    "DeliveryError",
    "DisconnectedError",
    "EncodeError",
    "EventcastError",
    "HandshakeError",
    "HookError",
    "HubClientError",
    "IngestError",
    "InvalidDataError",
    "InvalidTokenError",
    "InvalidTopicError",
    "KeySetError",
    "LogError",
    "PositionError",
    "PositionLostError",
    "ReplyError",
    "ReplyTimeoutError",
    "SlowConsumerError",
    "SourceError",
    "SubscriberExistsError",
    "SubscriberNotFoundError",
    "SubscriptionClosedError",
    "TokenExpiredError",
    "UnrecoverablePositionError",
]


class EventcastError(Exception):
    """Base class of every error raised by eventcast."""


class InvalidTopicError(EventcastError, ValueError):
    """A topic name or pattern does not follow the grammar; the message says why."""


class EncodeError(EventcastError, ValueError):
    """An event's data cannot be encoded to bytes (for the log or the network)."""


class InvalidDataError(EventcastError, ValueError):
    """Data does not match the schema its namespace declares (or the type a client asked for).

    Raised by a publish into a typed namespace (nothing is published), and by
    a typed subscription's iterator for an event that does not fit. The
    message says where the data broke which rule; it never quotes the data.

    Attributes:
        topic: the topic the data was published to.

    .. versionadded:: 0.2
    """

    def __init__(self, message: str, topic: str = "") -> None:
        super().__init__(message)
        self.topic = topic


class BusClosedError(EventcastError):
    """The bus is closed; it cannot publish or accept subscribers any more."""


class SubscriberExistsError(EventcastError):
    """A subscriber with this id is already registered on the bus."""


class SubscriberNotFoundError(EventcastError):
    """No subscriber with this id is registered on the bus."""


class SubscriptionClosedError(EventcastError):
    """The subscription is closed: it was unsubscribed, or the bus closed.

    When it was closed because of another error (a malformed resume position,
    say), that error is chained as ``__cause__``.
    """


class SlowConsumerError(SubscriptionClosedError):
    """The subscription was closed because its buffer overflowed (``Overflow.DISCONNECT``)."""


class DeliveryError(EventcastError):
    """A publish with acknowledgement failed for at least one handler subscriber.

    Attributes:
        failed: the ids of the subscribers that did not acknowledge the event.
    """

    def __init__(self, message: str, failed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.failed = failed


class AckTimeoutError(DeliveryError):
    """A publish with acknowledgement timed out waiting for a handler subscriber."""


class LogError(EventcastError):
    """The event log failed: it could not open, append, read or prune.

    A publish that raises ``LogError`` was not committed and was not fanned out.
    """


class PositionError(LogError, ValueError):
    """A stream position is malformed (for example a non-integer offset)."""


class UnrecoverablePositionError(LogError):
    """A stream position cannot be served: its epoch changed or it is beyond retention."""


class BackplaneError(EventcastError):
    """The backplane (Redis, NATS) failed: unreachable, dropped, or sent garbage."""


class ConfigurationError(EventcastError, ValueError):
    """A setting, URL or option is invalid."""


class AuthError(EventcastError):
    """A client could not be authenticated or authorised.

    Messages never contain the token itself.
    """


class InvalidTokenError(AuthError):
    """A token is malformed, badly signed, uses a refused algorithm, or has wrong claims."""


class TokenExpiredError(AuthError):
    """A token was valid but its ``exp`` claim is in the past."""


class KeySetError(AuthError):
    """The JWKS endpoint could not be read, so a token could not be checked (a temporary failure).

    Unlike :class:`InvalidTokenError`, it says nothing of the token: the client
    should try again later.
    """


class HookError(EventcastError):
    """An application hook failed: its backend could not be reached, timed out or answered badly.

    The client whose command asked the hook gets error 100 "internal server
    error"; the message never contains request or response bodies.
    """


class IngestError(EventcastError):
    """A consumer of :mod:`eventcast.ingest` failed to take a message from its source."""


class SourceError(IngestError):
    """A source (PostgreSQL, an MQTT or AMQP broker, Redis, NATS) failed.

    It was unreachable, dropped the connection, or refused a request. The
    consumer reconnects with backoff; nothing unacknowledged is lost.
    """


class CommandRejectedError(IngestError):
    """A consumed message can never be processed: it is acked and kept as a dead letter.

    Raised for a message that cannot be decoded, is too large, names an unknown
    method, or whose command the hub refuses (a bad channel, missing data).
    Retrying it would fail again, so it is never retried.

    Attributes:
        reason: a short machine-readable reason (``undecodable``, ``too_large``,
            ``bad_command``).
    """

    def __init__(self, message: str, reason: str = "bad_command") -> None:
        super().__init__(message)
        self.reason = reason


class HubClientError(EventcastError):
    """The client of a hub (:mod:`eventcast.client`) failed to talk to the hub."""


class HandshakeError(HubClientError):
    """A connection to the hub could not be established.

    The host refused or was unreachable, the WebSocket handshake failed, the
    server closed the connection or sent something that is not the protocol
    before answering ``connect``, or it rejected ``connect``.

    Attributes:
        code: the protocol error code or the WebSocket close code the server
            gave, or ``None`` (network failure, garbage, timeout).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ReplyError(HubClientError):
    """The hub answered a command with an error (``{"error": {"code", "message"}}``).

    Attributes:
        code: the protocol error code (100-199, e.g. 104 "method not found").
        message: the server's message.
        temporary: whether the server marked the error as temporary.
    """

    def __init__(self, code: int, message: str, temporary: bool = False) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.temporary = temporary


class ReplyTimeoutError(HubClientError):
    """The hub did not answer a command in time (the client's ``timeout``)."""


class DisconnectedError(HubClientError):
    """The connection was lost while a command waited for its reply.

    The command may or may not have been executed by the hub.
    """


class ClientClosedError(HubClientError):
    """The client is closed: by ``close()``, or for good after a failure.

    When a failure closed it (a terminal disconnect code, a rejected token, a
    failing token callback), that error is chained as ``__cause__``.

    Attributes:
        code: the terminal disconnect code the server sent, or ``None``.
        reason: the server's reason for that disconnect (``""`` when none).
    """

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class PositionLostError(EventcastError):
    """A subscription could not be resumed from its stream position.

    The hub answered ``recovered=false``: the epoch changed, or the events
    missed are beyond history or the replay cap. The subscription goes on from
    the stream's current position (:attr:`position`) if iterated again.

    Attributes:
        topic: the subscription's channel.
        position: where the stream resumes now (its current top), if known.
    """

    def __init__(self, message: str, topic: str = "", position: Position | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.position = position
