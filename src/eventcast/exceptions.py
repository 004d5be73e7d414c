"""The exception hierarchy of eventcast.

Every error eventcast raises derives from :class:`EventcastError`. Errors from
dependencies (sqlite3, psycopg, redis, nats, …) are translated at the boundary
and chained with ``from exc``, so callers only ever catch eventcast's own types.

.. code-block:: text

    EventcastError
    ├── InvalidTopicError (also ValueError)
    ├── EncodeError (also ValueError)
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
    └── AuthError
        ├── InvalidTokenError
        └── TokenExpiredError
"""

from __future__ import annotations

__all__ = [
    "AckTimeoutError",
    "AuthError",
    "BackplaneError",
    "BusClosedError",
    "ConfigurationError",
    "DeliveryError",
    "EncodeError",
    "EventcastError",
    "InvalidTokenError",
    "InvalidTopicError",
    "LogError",
    "PositionError",
    "SlowConsumerError",
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
