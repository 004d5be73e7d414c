"""The sans-I/O core of the Centrifuge client protocol (JSON encoding).

Nothing here imports asyncio, sockets, Redis or NATS: the server, the Python
client and the tests all drive the same code.

* :mod:`.frames`: the protocol's messages as ``msgspec`` structs;
* :mod:`.codec`: decoding and encoding of frames (``\\n``-separated messages);
* :mod:`.codes`: error, unsubscribe and disconnect codes;
* :mod:`.session`: the server-side per-connection state machine.
"""

from __future__ import annotations

from .codec import ProtocolError as ProtocolError
from .codes import ClientError as ClientError, Disconnect as Disconnect
from .session import (
    Request as Request,
    ServerSession as ServerSession,
    SessionState as SessionState,
)

__all__ = ["ClientError", "Disconnect", "ProtocolError", "Request", "ServerSession", "SessionState"]
