"""A small blocking client of the hub's HTTP API, with one-line errors."""

from __future__ import annotations

import errno
from types import TracebackType
from typing import Any

import httpx

from .common import EXIT_USAGE, fail, http_base

__all__ = ["HubAPI", "describe_network_error", "require_api_key"]


def require_api_key(api_key: str | None) -> str:
    """The API key, or a usage error (exit code 2) when none was given."""
    if not api_key:
        fail("no API key: pass --api-key or set EVENTCAST_API_KEY", EXIT_USAGE)
    return api_key


def describe_network_error(exc: BaseException) -> str:
    """A short reason for a network failure ("connection refused", "timed out", ...)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError) or (
            isinstance(current, OSError) and current.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        if isinstance(current, TimeoutError | httpx.TimeoutException):
            return "timed out"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        current = current.__cause__ or current.__context__
    text = str(exc).strip()
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "unknown host"
    return text.splitlines()[0] if text else type(exc).__name__


class HubAPI:
    """``POST {url}/api/<method>`` with ``X-API-Key``; every failure is a :class:`CliError`."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 10.0) -> None:
        self.base = http_base(url)
        self._client = httpx.Client(
            base_url=f"{self.base}/api",
            headers={"X-API-Key": api_key, "User-Agent": "eventcast-cli"},
            timeout=timeout,
            trust_env=False,
        )

    def __enter__(self) -> HubAPI:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def post(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """POST one call; return the decoded body (a dict), after transport-level checks."""
        try:
            response = self._client.post(f"/{method}", json=params)
        except httpx.TimeoutException:
            fail(f"the hub at {self.base} did not answer in time")
        except httpx.TransportError as exc:
            fail(f"cannot reach the hub at {self.base}: {describe_network_error(exc)}")
        if response.status_code == 401:
            fail(
                f"the hub at {self.base} rejected the API key (HTTP 401 unauthorized): "
                "check --api-key or EVENTCAST_API_KEY"
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 404:
            fail(
                f"the hub at {self.base} has no API method {method!r} (HTTP 404): "
                "is this an eventcast hub?"
            )
        if not isinstance(body, dict):
            fail(
                f"the server at {self.base} did not answer with a JSON object "
                f"(HTTP {response.status_code}): is this an eventcast hub?"
            )
        if response.status_code != 200:
            fail(f"the hub refused {method} (HTTP {response.status_code}): {_error_text(body)}")
        return body

    def call(self, method: str, params: dict[str, Any]) -> Any:
        """Call one method; return its ``result`` (an error answer is a :class:`CliError`)."""
        body = self.post(method, params)
        if "error" in body:
            fail(f"the hub refused {method}: {_error_text(body)}")
        if "result" not in body:
            fail(f"the hub's answer to {method} has no result: is this an eventcast hub?")
        return body["result"]


def _error_text(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        message = str(error.get("message") or "error")
        return f"{code} {message}" if code is not None else message
    return str(error)
