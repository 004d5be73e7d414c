"""The eventcast hub: a WebSocket server on the Centrifuge client protocol.

Also an HTTP server API, JWT authentication and settings. Install with the
``server`` extra (``pip install eventcast[server]``).
"""

from __future__ import annotations

__all__: list[str] = []
