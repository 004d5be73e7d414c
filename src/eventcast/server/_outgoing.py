"""The hub's outgoing HTTP (proxy hooks, webhooks, JWKS): pooled clients and bounded exchanges.

Each part that calls out owns one :func:`pooled_client` (keep-alive
connections, reused across calls) and makes every call through
:func:`exchange`, which bounds it in time and the answer in size, and turns
every failure into the part's own :class:`~eventcast.exceptions.EventcastError`
whose message names what failed, never a body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

import httpx

from ..exceptions import EventcastError

__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "exchange", "pooled_client"]

#: The largest answer read from a proxy backend, a webhook endpoint or a JWKS endpoint.
DEFAULT_MAX_RESPONSE_BYTES: Final = 1_048_576
#: Connections kept per client (and open at once).
_MAX_CONNECTIONS: Final = 100
#: Seconds an idle keep-alive connection is kept.
_KEEPALIVE_EXPIRY: Final = 30.0


def pooled_client(timeout: float) -> httpx.AsyncClient:
    """A client with a pool of keep-alive connections; ``timeout`` bounds each phase."""
    return httpx.AsyncClient(
        timeout=timeout,
        limits=httpx.Limits(
            max_connections=_MAX_CONNECTIONS,
            max_keepalive_connections=_MAX_CONNECTIONS,
            keepalive_expiry=_KEEPALIVE_EXPIRY,
        ),
        follow_redirects=False,
    )


async def exchange(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    error: type[EventcastError],
    what: str,
    timeout: float,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    limit: int = DEFAULT_MAX_RESPONSE_BYTES,
) -> tuple[int, bytes]:
    """Make one request within ``timeout`` seconds; return the status and the body.

    Raises:
        error: (the caller's error type) the endpoint could not be reached,
            did not answer in time, or answered more than ``limit`` bytes.
    """
    try:
        async with asyncio.timeout(timeout):
            async with client.stream(
                method, url, content=content, headers=headers, timeout=timeout
            ) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise error(f"{what} answered more than {limit} bytes")
                return response.status_code, bytes(body)
    except TimeoutError:
        raise error(f"{what} did not answer within {timeout:g} s") from None
    except (httpx.HTTPError, OSError) as exc:
        raise error(f"{what} could not be reached: {type(exc).__name__}") from exc
