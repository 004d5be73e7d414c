"""The one error every part of the hub raises to answer a client, the API or a stream."""

from __future__ import annotations

from ..exceptions import EventcastError
from ..protocol.codes import ClientError, Disconnect

__all__ = ["CommandError"]


class CommandError(EventcastError):
    """Answer with a protocol error (a reply's ``error``) or a disconnect.

    The WebSocket commands reply with it, the SSE endpoint turns it into an
    HTTP status, and the HTTP API into its ``{"error": …}`` answer, so every
    entry point gives the same answer for the same refusal.

    Attributes:
        answer: the protocol error or the disconnect.
    """

    def __init__(self, answer: ClientError | Disconnect) -> None:
        super().__init__(str(answer))
        self.answer = answer

    @property
    def code(self) -> int:
        """The error or disconnect code."""
        return self.answer.code

    @property
    def message(self) -> str:
        """The error message or disconnect reason."""
        answer = self.answer
        return answer.message if isinstance(answer, ClientError) else answer.reason
