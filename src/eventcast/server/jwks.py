"""Token keys from a JWKS endpoint (Keycloak, Auth0, Cognito), cached and rotated by ``kid``.

:class:`JWKS` fetches the key set with ``httpx`` (never blocking the event
loop, unlike PyJWT's ``PyJWKClient`` and its ``urllib``) and builds each key
with PyJWT's ``PyJWK``. The :class:`~eventcast.server.auth.TokenVerifier`
looks keys up synchronously by the token's ``kid``; before that, the hub
awaits :meth:`JWKS.prepare`, which fetches the set when:

* no set was loaded yet;
* the token names a ``kid`` the set does not have (a key rotation), at most
  once per ``min_refresh`` seconds: tokens with made-up ``kid`` values cause
  no request storm, they are refused;
* the set is older than ``cache_ttl`` seconds.

Concurrent callers share one fetch. A failed fetch keeps the keys already
loaded; when the set could not be read and the token's key is not among them,
the token cannot be checked and :class:`~eventcast.exceptions.KeySetError`
says so (a temporary failure: the client tries again, the endpoint is asked
again at most once per ``min_refresh``).
Only signing keys (``use`` absent or ``sig``) of type RSA or EC are kept;
each accepts the algorithm its ``alg`` names, or without one, those of its
type (``RS256``/``RS384``/``RS512``, or the ``ES*`` of its curve).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import httpx
import jwt
import msgspec

from ..exceptions import ConfigurationError, KeySetError
from ._outgoing import exchange, pooled_client

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["DEFAULT_CACHE_TTL", "DEFAULT_MIN_REFRESH", "JWKS", "SigningKey", "jwks_for"]

logger = logging.getLogger("eventcast.server")

#: Seconds a fetched key set is used before it is fetched again.
DEFAULT_CACHE_TTL: Final = 300.0
#: The least seconds between two fetches caused by unknown ``kid`` values or failures.
DEFAULT_MIN_REFRESH: Final = 10.0
#: Seconds one fetch may take.
DEFAULT_TIMEOUT: Final = 5.0
#: The most keys kept from one key set.
_MAX_KEYS: Final = 100

_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512"})
_EC_ALGORITHMS: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_ACCEPTED: Final = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS.values())


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key of the set: the key object PyJWT verifies with, and its algorithms."""

    key: Any
    algorithms: frozenset[str]


def _signing_key(jwk: Any) -> tuple[str | None, SigningKey] | None:
    """A JWK as ``(kid, key)``, or ``None`` if it is not a usable signing key."""
    if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if kty == "RSA":
        algorithms = _RSA_ALGORITHMS
    elif kty == "EC" and jwk.get("crv") in _EC_ALGORITHMS:
        algorithms = frozenset({_EC_ALGORITHMS[jwk["crv"]]})
    else:
        return None  # symmetric (oct) or unsupported keys have no place in a public set
    if alg is not None:
        if alg not in algorithms or alg not in _ACCEPTED:
            return None
        algorithms = frozenset({alg})
    try:
        key = jwt.PyJWK(jwk, algorithm=next(iter(sorted(algorithms)))).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    kid = jwk.get("kid")
    return (kid if isinstance(kid, str) else None), SigningKey(key, algorithms)


class JWKS:
    """The signing keys of a JWKS endpoint (see the module documentation).

    Args:
        url: the endpoint (``https://…/.well-known/jwks.json``).
        cache_ttl: seconds a fetched set is used before it is fetched again.
        min_refresh: the least seconds between fetches caused by an unknown
            ``kid`` or following a failure.
        timeout: seconds one fetch may take.
        clock: a monotonic clock, injectable for tests.
        client: the HTTP client (default: a pooled one, closed by :meth:`aclose`).

    Raises:
        ConfigurationError: a duration is not a positive finite number.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        min_refresh: float = DEFAULT_MIN_REFRESH,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        for value in (cache_ttl, min_refresh, timeout):
            if not math.isfinite(value) or value <= 0:
                raise ConfigurationError("JWKS durations must be positive numbers of seconds")
        self.url = url
        self.cache_ttl = cache_ttl
        self.min_refresh = min_refresh
        self.timeout = timeout
        self._clock = clock
        self._own_client = client is None
        self._client = client or pooled_client(timeout)
        self._keys: dict[str | None, SigningKey] = {}
        self._loaded_at: float | None = None
        self._attempted_at = -math.inf
        self._failed = False
        self._fetch: asyncio.Task[None] | None = None
        #: Fetches made (successful or not), for tests and metrics.
        self.fetches = 0

    @property
    def loaded(self) -> bool:
        """Whether a key set was loaded."""
        return self._loaded_at is not None

    def key(self, kid: str | None) -> SigningKey | None:
        """The key with this ``kid`` (a token without one: the set's only key), or ``None``."""
        found = self._keys.get(kid)
        if found is None and kid is None and len(self._keys) == 1:
            found = next(iter(self._keys.values()))
        return found

    async def prepare(self, kid: str | None) -> None:
        """Fetch the set if it is missing, stale, or lacks ``kid`` (within the rate limit).

        Raises:
            KeySetError: no set could be loaded yet, or ``kid`` is unknown and
                the set could not be read lately: the token cannot be checked
                now (a temporary failure, unlike an unknown key).
        """
        now = self._clock()
        if self._loaded_at is None or self.key(kid) is None:
            if now - self._attempted_at >= self.min_refresh or self._fetch is not None:
                await self._refresh()
            if self._loaded_at is None or (self.key(kid) is None and self._failed):
                raise KeySetError("the JWKS endpoint could not be read; retry later")
            return
        if now - self._loaded_at >= self.cache_ttl or self._fetch is not None:
            await self._refresh()  # a failure keeps the keys already loaded

    async def _refresh(self) -> None:
        """Fetch the set once for every concurrent caller (a failure is logged, not raised)."""
        fetch = self._fetch
        if fetch is None:
            fetch = self._fetch = asyncio.get_running_loop().create_task(
                self._load(), name="eventcast-jwks"
            )
            fetch.add_done_callback(self._fetched)
        await asyncio.shield(fetch)

    def _fetched(self, task: asyncio.Task[None]) -> None:
        if self._fetch is task:
            self._fetch = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("JWKS refresh failed", exc_info=task.exception())

    async def _load(self) -> None:
        self._attempted_at = self._clock()
        self.fetches += 1
        try:
            keys = await self._read()
        except KeySetError as exc:
            self._failed = True
            logger.warning("%s", exc)
            return
        self._failed = False
        self._keys = keys
        self._loaded_at = self._clock()

    async def _read(self) -> dict[str | None, SigningKey]:
        what = "the JWKS endpoint"
        status, body = await exchange(
            self._client,
            "GET",
            self.url,
            error=KeySetError,
            what=what,
            timeout=self.timeout,
            headers={"accept": "application/json"},
        )
        if status != 200:
            raise KeySetError(f"{what} answered HTTP {status}")
        try:
            document = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise KeySetError(f"{what} answered something that is not JSON") from None
        found = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(found, list):
            raise KeySetError(f"{what} answered no 'keys' list")
        keys: dict[str | None, SigningKey] = {}
        for jwk in found[:_MAX_KEYS]:
            entry = _signing_key(jwk)
            if entry is not None:
                keys[entry[0]] = entry[1]
        if not keys:
            raise KeySetError(f"{what} offers no RSA or EC signing key")
        return keys

    async def aclose(self) -> None:
        """Stop a fetch in flight and close the HTTP client. Idempotent."""
        fetch, self._fetch = self._fetch, None
        if fetch is not None:
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch
        if self._own_client:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"<JWKS keys={len(self._keys)}>"


def jwks_for(settings: Settings) -> JWKS | None:
    """The JWKS the settings name (``token_jwks_url``), or ``None``."""
    if not settings.token_jwks_url:
        return None
    return JWKS(
        settings.token_jwks_url,
        cache_ttl=settings.token_jwks_cache_ttl,
        min_refresh=settings.token_jwks_min_refresh,
    )
