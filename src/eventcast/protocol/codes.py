"""Error, unsubscribe and disconnect codes of the Centrifuge client protocol (pure).

The numbers and meanings follow the protocol's documentation, so the official
SDKs react to them as they do with Centrifugo:

* **Error codes** (100-199) travel in replies to commands.
* **Unsubscribe codes**: below 2500 the subscription ends; from 2500 the SDK
  resubscribes.
* **Disconnect codes** are sent as the WebSocket close code. 3000-3499 and
  4000-4499 make the SDK reconnect; 3500-3999 and 4500-4999 are terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "ERROR_ALREADY_SUBSCRIBED",
    "ERROR_BAD_REQUEST",
    "ERROR_EXPIRED",
    "ERROR_INTERNAL",
    "ERROR_LIMIT_EXCEEDED",
    "ERROR_METHOD_NOT_FOUND",
    "ERROR_NOT_AVAILABLE",
    "ERROR_PERMISSION_DENIED",
    "ERROR_TOKEN_EXPIRED",
    "ERROR_TOO_MANY_REQUESTS",
    "ERROR_UNAUTHORIZED",
    "ERROR_UNKNOWN_CHANNEL",
    "ERROR_UNRECOVERABLE_POSITION",
    "ClientError",
    "Disconnect",
]


@dataclass(frozen=True, slots=True)
class ClientError:
    """An error returned in a reply: ``{"error": {"code", "message", "temporary"}}``."""

    code: int
    message: str
    temporary: bool = False

    def with_message(self, message: str) -> ClientError:
        """Return the same error code with a more specific message."""
        return ClientError(self.code, message, self.temporary)


ERROR_INTERNAL: Final = ClientError(100, "internal server error", temporary=True)
ERROR_UNAUTHORIZED: Final = ClientError(101, "unauthorized")
ERROR_UNKNOWN_CHANNEL: Final = ClientError(102, "unknown channel")
ERROR_PERMISSION_DENIED: Final = ClientError(103, "permission denied")
ERROR_METHOD_NOT_FOUND: Final = ClientError(104, "method not found")
ERROR_ALREADY_SUBSCRIBED: Final = ClientError(105, "already subscribed")
ERROR_LIMIT_EXCEEDED: Final = ClientError(106, "limit exceeded")
ERROR_BAD_REQUEST: Final = ClientError(107, "bad request")
ERROR_NOT_AVAILABLE: Final = ClientError(108, "not available")
ERROR_TOKEN_EXPIRED: Final = ClientError(109, "token expired")
ERROR_EXPIRED: Final = ClientError(110, "expired")
ERROR_TOO_MANY_REQUESTS: Final = ClientError(111, "too many requests", temporary=True)
ERROR_UNRECOVERABLE_POSITION: Final = ClientError(112, "unrecoverable position")


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A disconnect: the WebSocket close code and a short reason (under 123 bytes)."""

    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        """Whether the protocol tells the client to reconnect."""
        return not (3500 <= self.code < 4000 or 4500 <= self.code < 5000)


# Non-terminal: the client reconnects (and recovers).
DISCONNECT_CONNECTION_CLOSED: Final = Disconnect(3000, "connection closed")
DISCONNECT_SHUTDOWN: Final = Disconnect(3001, "shutdown")
DISCONNECT_SERVER_ERROR: Final = Disconnect(3004, "internal server error")
DISCONNECT_EXPIRED: Final = Disconnect(3005, "connection expired")
DISCONNECT_SUB_EXPIRED: Final = Disconnect(3006, "subscription expired")
DISCONNECT_SLOW: Final = Disconnect(3008, "slow")
DISCONNECT_WRITE_ERROR: Final = Disconnect(3009, "write error")
DISCONNECT_INSUFFICIENT_STATE: Final = Disconnect(3010, "insufficient state")
DISCONNECT_FORCE_RECONNECT: Final = Disconnect(3011, "force reconnect")
DISCONNECT_NO_PONG: Final = Disconnect(3012, "no pong")
DISCONNECT_TOO_MANY_REQUESTS: Final = Disconnect(3013, "too many requests")
# Terminal: the client does not reconnect by itself.
DISCONNECT_INVALID_TOKEN: Final = Disconnect(3500, "invalid token")
DISCONNECT_BAD_REQUEST: Final = Disconnect(3501, "bad request")
DISCONNECT_STALE: Final = Disconnect(3502, "stale")
DISCONNECT_FORCE_NO_RECONNECT: Final = Disconnect(3503, "force disconnect")
DISCONNECT_CONNECTION_LIMIT: Final = Disconnect(3504, "connection limit")
DISCONNECT_CHANNEL_LIMIT: Final = Disconnect(3505, "channel limit")
DISCONNECT_TOO_MANY_ERRORS: Final = Disconnect(3509, "too many errors")
#: The user is blocked (``block_user``): a forced disconnect, with its own reason.
DISCONNECT_BLOCKED: Final = Disconnect(3503, "blocked")
#: The connection token was revoked (``revoke_token``, ``invalidate_user_tokens``).
DISCONNECT_TOKEN_REVOKED: Final = Disconnect(3500, "token revoked")

# Unsubscribe push codes.
UNSUBSCRIBE_SERVER: Final = (2000, "server unsubscribe")
UNSUBSCRIBE_INSUFFICIENT_STATE: Final = (2500, "insufficient state")
#: The subscription token was revoked: the subscription ends (no resubscribe).
UNSUBSCRIBE_TOKEN_REVOKED: Final = (2000, "token revoked")

#: WebSocket close code for a frame over the size limit (RFC 6455).
CLOSE_MESSAGE_TOO_BIG: Final = 1009
