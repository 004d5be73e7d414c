"""eventcast: real-time event broadcasting for Python.

Only the names exported here (and documented) are public.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bus import Bus as Bus
from .deadletters import DeadLetter as DeadLetter, DeadLetters as DeadLetters
from .events import (
    EARLIEST as EARLIEST,
    Event as Event,
    History as History,
    Position as Position,
)
from .exceptions import (
    AckTimeoutError as AckTimeoutError,
    BusClosedError as BusClosedError,
    CommandRejectedError as CommandRejectedError,
    ConfigurationError as ConfigurationError,
    DeliveryError as DeliveryError,
    EncodeError as EncodeError,
    EventcastError as EventcastError,
    IngestError as IngestError,
    InvalidDataError as InvalidDataError,
    InvalidTopicError as InvalidTopicError,
    LogError as LogError,
    PositionError as PositionError,
    SlowConsumerError as SlowConsumerError,
    SourceError as SourceError,
    SubscriberExistsError as SubscriberExistsError,
    SubscriberNotFoundError as SubscriberNotFoundError,
    SubscriptionClosedError as SubscriptionClosedError,
)
from .handlers import Handler as Handler
from .namespaces import Namespace as Namespace
from .subscription import (
    Overflow as Overflow,
    Subscription as Subscription,
    SubscriptionStatistics as SubscriptionStatistics,
)

if TYPE_CHECKING:
    from .client import connect as connect

__version__ = "0.1.0"

__all__ = [
    "EARLIEST",
    "AckTimeoutError",
    "Bus",
    "BusClosedError",
    "CommandRejectedError",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetters",
    "DeliveryError",
    "EncodeError",
    "Event",
    "EventcastError",
    "Handler",
    "History",
    "IngestError",
    "InvalidDataError",
    "InvalidTopicError",
    "LogError",
    "Namespace",
    "Overflow",
    "Position",
    "PositionError",
    "SlowConsumerError",
    "SourceError",
    "SubscriberExistsError",
    "SubscriberNotFoundError",
    "Subscription",
    "SubscriptionClosedError",
    "SubscriptionStatistics",
    "connect",
]


def __getattr__(name: str) -> Any:
    # ``eventcast.connect`` is imported lazily: the client needs ``websockets``,
    # which the core (bus, log, protocol) does not.
    if name == "connect":
        from .client import connect

        return connect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
