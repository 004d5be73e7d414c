"""The per-connection state machine of the server side (sans-I/O).

Feed it the frames a client sent with :meth:`ServerSession.receive`; it
returns the commands to execute. Tell it the outcome with :meth:`reply` or
:meth:`error`, and collect the bytes to write with :meth:`data_to_send`. It
never touches a socket or an event loop, so the server, the tests and any other
transport drive the same logic. It speaks the :class:`~.encodings.Encoding`
it is given (JSON unless told otherwise) and never looks inside it.

Rules it enforces, as the protocol documents them:

* The first command must be ``connect``; anything else closes the connection
  with 3501 "bad request". A frame that cannot be decoded does too.
* A command with an id but no known method gets error 104 "method not found".
* A command with a number outside ``[0, 2**63 - 1]`` gets error 107 "bad
  request" (see :func:`~eventcast.protocol.frames.out_of_range`).
* Commands (except ``send``) need an id > 0.
* After ``max_bad_commands`` error replies caused by the client, the
  connection is closed with 3509 "too many errors".
* An empty command from the client (``{}`` in JSON) is a pong.

State table (event -> next state)::

    CONNECTING --connect accepted--> CONNECTED
    CONNECTING --other command / bad frame--> CLOSED
    CONNECTED  --close()--> CLOSED
"""

from __future__ import annotations

import enum
from typing import Any, Final

import msgspec

from .codec import ProtocolError, method_of
from .codes import (
    DISCONNECT_BAD_REQUEST,
    DISCONNECT_TOO_MANY_ERRORS,
    ERROR_BAD_REQUEST,
    ERROR_METHOD_NOT_FOUND,
    ClientError,
    Disconnect,
)
from .encodings import JSON, Encoding
from .frames import out_of_range

__all__ = ["DEFAULT_MAX_BAD_COMMANDS", "Request", "ServerSession", "SessionState"]

#: Error replies caused by the client before it is disconnected.
DEFAULT_MAX_BAD_COMMANDS: Final = 10


class SessionState(enum.Enum):
    """Where a connection is in its life."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


# The states as module globals, for the per-command checks: an enum member read
# from its class costs ~65 ns on CPython 3.11 (a descriptor call), a global ~5.
_CONNECTING: Final = SessionState.CONNECTING
_CONNECTED: Final = SessionState.CONNECTED
_CLOSED: Final = SessionState.CLOSED


class Request(msgspec.Struct, frozen=True, gc=False):
    """One command to execute: its id, method name and request body.

    (A frozen ``msgspec.Struct``: built once per command, in a seventh of a
    frozen dataclass's time. Its body is decoded data, which never refers back
    to it, so the collector need not track it.)
    """

    id: int
    method: str
    body: Any


class ServerSession:
    """The protocol state of one client connection, with no I/O.

    Args:
        max_bad_commands: error replies the client may cause before it is
            disconnected with 3509.
        encoding: the wire encoding of the connection (see
            :func:`~.encodings.websocket_encoding` for how a client picks one).
    """

    def __init__(
        self, *, max_bad_commands: int = DEFAULT_MAX_BAD_COMMANDS, encoding: Encoding = JSON
    ) -> None:
        if max_bad_commands < 1:
            raise ValueError("max_bad_commands must be >= 1")
        self.max_bad_commands = max_bad_commands
        #: The wire encoding: decodes what :meth:`receive` gets, encodes what
        #: :meth:`data_to_send` returns.
        self.encoding = encoding
        self.state = _CONNECTING
        #: Error replies caused by the client so far.
        self.bad_commands = 0
        #: Why the session closed, once it has.
        self.disconnect: Disconnect | None = None
        #: Pongs received (bare ``{}`` commands).
        self.pongs = 0
        #: The last error answered (what a transport without error replies reports).
        self.last_error: ClientError | None = None
        self._out: list[bytes] = []

    # -- input ---------------------------------------------------------------------

    def receive(self, data: bytes | str) -> list[Request]:
        """Parse one frame and return the commands to execute, in order.

        Malformed frames close the session (see :attr:`disconnect`); unknown
        methods are answered here. Never raises.
        """
        if self.state is _CLOSED:
            return []
        try:
            commands = self.encoding.decode_commands(data)
        except ProtocolError:
            self.close(DISCONNECT_BAD_REQUEST)
            return []
        requests: list[Request] = []
        for command in commands:
            method = method_of(command)
            if method is None:
                if command.id == 0:
                    self.pongs += 1
                    continue
                self.error(command.id, ERROR_METHOD_NOT_FOUND)
                if self.disconnect is not None:
                    return []
                continue
            if command.id <= 0 and method != "send":
                self.close(DISCONNECT_BAD_REQUEST)
                return []
            body = getattr(command, method)
            problem = out_of_range(body)
            if problem is not None:
                self.error(command.id, ERROR_BAD_REQUEST.with_message(problem))
                if self.disconnect is not None:
                    return []
                continue
            requests.append(Request(command.id, method, body))
        return requests

    def admit(self, request: Request) -> bool:
        """Check that a command may run now (call right before executing it).

        Returns False, having closed the session or queued the error reply,
        when it may not.
        """
        if self.state is _CLOSED:
            return False
        if self.state is _CONNECTING:
            if request.method != "connect":
                self.close(DISCONNECT_BAD_REQUEST)
                return False
            return True
        if request.method == "connect":
            self.error(request.id, ERROR_BAD_REQUEST.with_message("already connected"))
            return False
        return True

    # -- output -------------------------------------------------------------------

    def connected(self, request: Request, result: Any) -> None:
        """Accept the connect command with its result."""
        if self.state is not _CONNECTING:
            return
        self.state = _CONNECTED
        self._out.append(self.encoding.encode_reply(request.id, "connect", result))

    def reply(self, request: Request, result: Any) -> None:
        """Queue the successful reply to a command (``send`` has none)."""
        if self.state is _CLOSED or request.method == "send":
            return
        self._out.append(self.encoding.encode_reply(request.id, request.method, result))

    def error(self, command_id: int, error: ClientError, *, client_fault: bool = True) -> None:
        """Queue an error reply; count it when the client caused it."""
        if self.state is _CLOSED:
            return
        self.last_error = error
        if command_id > 0:
            self._out.append(self.encoding.encode_error(command_id, error))
        if client_fault:
            self.bad_commands += 1
            if self.bad_commands >= self.max_bad_commands:
                self.close(DISCONNECT_TOO_MANY_ERRORS)

    def push(self, data: bytes) -> None:
        """Queue an encoded push."""
        if self.state is not _CLOSED:
            self._out.append(data)

    def ping(self) -> None:
        """Queue a server ping (an empty reply)."""
        self.push(self.encoding.ping)

    def close(self, disconnect: Disconnect) -> None:
        """Close the session; the transport should close with ``disconnect.code``."""
        if self.state is _CLOSED:
            return
        self.state = _CLOSED
        self.disconnect = disconnect

    def data_to_send(self) -> list[bytes]:
        """Return and forget the messages queued so far (join them with ``encoding.join``)."""
        out = self._out
        self._out = []
        return out

    @property
    def connected_state(self) -> bool:
        """Whether connect was accepted and the session is not closed."""
        return self.state is _CONNECTED
