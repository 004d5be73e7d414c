"""JWT authentication for the hub: connection and subscription tokens.

Tokens follow Centrifugo's conventions:

* a **connection token** carries ``sub`` (the user id, ``""`` for an anonymous
  user), and optionally ``exp``, ``info`` (any JSON value) and ``channels``
  (server-side subscriptions);
* a **subscription token** carries ``sub``, ``channel`` and optionally ``exp``
  and ``info``; it allows one user to subscribe to one channel.

A connection token must not carry a ``channel`` claim, so a subscription token
can never be used to connect.

The accepted algorithms are an explicit allowlist, and the key is picked by the
algorithm family named in the token header: ``HS256``/``HS384``/``HS512`` are
verified only with the HMAC secret, ``RS*`` only with an RSA public key, and
``ES*`` only with an EC public key on the matching curve. ``alg: none``,
unknown algorithms and algorithm confusion (an ``HS256`` token "signed" with the
public key's PEM text as the HMAC secret) are rejected.

With a JWKS endpoint (:class:`~eventcast.server.jwks.JWKS`), ``RS*``/``ES*``
tokens are verified with the key their ``kid`` names, and only with the
algorithms that key accepts; a token naming no known key falls back to the
configured public key, if any. The verifier itself never does I/O: callers
``await verifier.prepare(token)`` first, which loads the key the token names.

Error messages never contain the token.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..exceptions import (
    ConfigurationError,
    InvalidTokenError,
    InvalidTopicError,
    TokenExpiredError,
)
from ..topics import validate_topic

if TYPE_CHECKING:
    from .jwks import JWKS

__all__ = [
    "HMAC_ALGORITHMS",
    "PUBLIC_KEY_ALGORITHMS",
    "ConnectionClaims",
    "SubscriptionClaims",
    "TokenVerifier",
    "mint_token",
]

_logger = logging.getLogger(__name__)

#: The algorithms verified with the HMAC secret.
HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
#: The algorithms verified with the public key (RSA for ``RS*``, EC for ``ES*``).
PUBLIC_KEY_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")

_RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512")
_EC_ALGORITHM_BY_CURVE: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
#: The shortest HMAC secret that does not draw a warning (the SHA-256 digest size).
_MIN_HMAC_SECRET_BYTES: Final = 32
#: PyJWT >= 2.10 warns on short keys on every call; older versions have no such class.
_OTHER_CLAIM_ERRORS: Final = {
    "InvalidSubjectError": "'sub' must be a string",
    "InvalidIssuedAtError": "'iat' must be a number",
    "InvalidJTIError": "'jti' must be a string",
}
_KEY_LENGTH_WARNING: Final[type[Warning]] = getattr(jwt, "InsecureKeyLengthWarning", UserWarning)
#: The longest JWT header segment accepted (base64url); real headers are under 200 bytes.
MAX_HEADER_SEGMENT: Final = 4096


@dataclass(frozen=True, slots=True)
class ConnectionClaims:
    """The verified claims of a connection token.

    Attributes:
        user: the user id (claim ``sub``); ``""`` for an anonymous-like token.
        expires_at: when the token expires, in seconds since the epoch (claim
            ``exp``), or ``None`` when it does not expire.
        info: connection information shared with other clients (claim ``info``,
            any JSON value), or ``None``.
        channels: channels the server subscribes the connection to (claim
            ``channels``), each a valid topic name.
        token_id: the token's id (claim ``jti``), which ``revoke_token`` names.
        issued_at: when the token was issued (claim ``iat``), which
            ``invalidate_user_tokens`` compares.
    """

    user: str
    expires_at: float | None = None
    info: Any = None
    channels: tuple[str, ...] = ()
    token_id: str | None = None
    issued_at: float | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionClaims:
    """The verified claims of a subscription token.

    Attributes:
        expires_at: when the subscription expires, in seconds since the epoch
            (claim ``exp``), or ``None`` when it does not expire.
        info: channel information for this subscriber (claim ``info``), or ``None``.
        token_id: the token's id (claim ``jti``), which ``revoke_token`` names.
        issued_at: when the token was issued (claim ``iat``).
    """

    expires_at: float | None = None
    info: Any = None
    token_id: str | None = None
    issued_at: float | None = None


class TokenVerifier:
    """Verifies connection and subscription JWTs against the configured keys.

    Args:
        hmac_secret: the shared secret for ``HS256``/``HS384``/``HS512`` tokens
            (``None`` or ``""``: HMAC tokens are refused).
        public_key: a PEM public key (RSA for ``RS*`` tokens, EC P-256/P-384/P-521
            for ``ES256``/``ES384``/``ES512``), or ``None``.
        audience: when set, tokens must carry this ``aud``; when ``None`` the
            ``aud`` claim is ignored.
        issuer: when set, tokens must carry this ``iss``.
        leeway: seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        jwks: the keys of a JWKS endpoint, picked by the token's ``kid``.

    With no key configured, every token is refused.

    Raises:
        ConfigurationError: the public key is not a PEM RSA or EC public key, or
            ``leeway`` is negative or not finite.
    """

    __slots__ = (
        "_algorithms",
        "_audience",
        "_hmac_secret",
        "_issuer",
        "_jwks",
        "_leeway",
        "_public_key",
    )

    def __init__(
        self,
        *,
        hmac_secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0,
        jwks: JWKS | None = None,
    ) -> None:
        if not math.isfinite(leeway) or leeway < 0:
            raise ConfigurationError("leeway must be a finite number of seconds >= 0")
        self._hmac_secret = hmac_secret or None
        self._audience = audience
        self._issuer = issuer
        self._leeway = float(leeway)
        self._public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None = None
        algorithms: set[str] = set()
        if self._hmac_secret is not None:
            algorithms.update(HMAC_ALGORITHMS)
            if len(self._hmac_secret.encode()) < _MIN_HMAC_SECRET_BYTES:
                _logger.warning(
                    "the token HMAC secret is shorter than %d bytes; use a longer random secret",
                    _MIN_HMAC_SECRET_BYTES,
                )
        if public_key:
            self._public_key = _load_public_key(public_key)
            algorithms.update(_algorithms_of(self._public_key))
        self._jwks = jwks
        if jwks is not None:
            algorithms.update(PUBLIC_KEY_ALGORITHMS)
        self._algorithms: frozenset[str] = frozenset(algorithms)

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms this verifier accepts, given its keys."""
        return self._algorithms

    async def prepare(self, token: str) -> None:
        """Load the key a token names, if it comes from the JWKS (before verifying it).

        Does nothing without a JWKS, or for a token the JWKS does not verify
        (HMAC, or a malformed header: verifying it then says why).

        Raises:
            KeySetError: the JWKS could not be read yet (a temporary failure).
        """
        if self._jwks is None:
            return
        header = _header(token)
        if header is None or header.get("alg") in HMAC_ALGORITHMS:
            return
        kid = header.get("kid")
        await self._jwks.prepare(kid if isinstance(kid, str) else None)

    async def aclose(self) -> None:
        """Release the JWKS client, if any. Idempotent."""
        if self._jwks is not None:
            await self._jwks.aclose()

    def verify_connection(self, token: str) -> ConnectionClaims:
        """Verify a connection token and return its claims.

        Raises:
            TokenExpiredError: the token's ``exp`` is in the past.
            InvalidTokenError: the token is malformed, badly signed, uses a refused
                algorithm, has a wrong audience or issuer, lacks ``sub``, carries a
                ``channel`` claim (it is a subscription token), or lists an invalid
                channel.
        """
        payload = self._decode(token)
        user = _user(payload)
        if "channel" in payload:
            raise InvalidTokenError(
                "invalid token: a subscription token (with a 'channel' claim) cannot be "
                "used to connect"
            )
        raw_channels = payload.get("channels", [])
        if raw_channels is None:
            raw_channels = []
        if not isinstance(raw_channels, list) or not all(isinstance(c, str) for c in raw_channels):
            raise InvalidTokenError("invalid token: the 'channels' claim must be a list of strings")
        channels: list[str] = []
        for channel in raw_channels:
            try:
                channels.append(validate_topic(channel))
            except InvalidTopicError as exc:
                raise InvalidTokenError(f"invalid token: bad channel in 'channels': {exc}") from exc
        return ConnectionClaims(
            user=user,
            expires_at=_expires_at(payload),
            info=payload.get("info"),
            channels=tuple(channels),
            token_id=_token_id(payload),
            issued_at=_issued_at(payload),
        )

    def verify_subscription(self, token: str, *, user: str, channel: str) -> SubscriptionClaims:
        """Verify a subscription token for ``user`` on ``channel`` and return its claims.

        Raises:
            TokenExpiredError: the token's ``exp`` is in the past.
            InvalidTokenError: the token is malformed, badly signed, uses a refused
                algorithm, has a wrong audience or issuer, or its ``sub`` or
                ``channel`` does not match.
        """
        payload = self._decode(token)
        if _user(payload) != user:
            raise InvalidTokenError("invalid token: the subscription token is for another user")
        token_channel = payload.get("channel")
        if not isinstance(token_channel, str) or not token_channel:
            raise InvalidTokenError("invalid token: missing 'channel' claim")
        if token_channel != channel:
            raise InvalidTokenError("invalid token: the subscription token is for another channel")
        return SubscriptionClaims(
            expires_at=_expires_at(payload),
            info=payload.get("info"),
            token_id=_token_id(payload),
            issued_at=_issued_at(payload),
        )

    def _decode(self, token: str) -> dict[str, Any]:
        if not isinstance(token, str):
            raise InvalidTokenError(f"invalid token: expected a str, not {type(token).__name__}")
        if not self._algorithms:
            raise InvalidTokenError("invalid token: no token key configured")
        if not token:
            raise InvalidTokenError("invalid token: empty token")
        header = _header(token)
        if header is None:
            raise InvalidTokenError("invalid token: malformed header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            raise InvalidTokenError(f"invalid token: algorithm {shown!r} is not accepted")
        key: Any
        if alg in HMAC_ALGORITHMS:
            assert self._hmac_secret is not None  # alg is allowed only with a secret
            key = self._hmac_secret
        else:
            key = self._public_key_for(alg, header.get("kid"))
        try:
            with warnings.catch_warnings():
                # A short secret was logged once at construction.
                warnings.simplefilter("ignore", _KEY_LENGTH_WARNING)
                payload: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options={"verify_aud": self._audience is not None},
                )
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpiredError("token expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidTokenError("invalid token: signature verification failed") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidTokenError("invalid token: wrong audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidTokenError("invalid token: wrong issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidTokenError(f"invalid token: missing {exc.claim!r} claim") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidTokenError("invalid token: not valid yet ('nbf' or 'iat')") from exc
        except jwt.DecodeError as exc:
            raise InvalidTokenError("invalid token: malformed token") from exc
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError) as exc:
            # Other claim errors; PyJWT's messages do not quote the token, but ours
            # stay fixed anyway (and some classes only exist in newer PyJWT).
            problem = _OTHER_CLAIM_ERRORS.get(type(exc).__name__, type(exc).__name__)
            raise InvalidTokenError(f"invalid token: {problem}") from exc
        return payload

    def _public_key_for(self, alg: str, kid: object) -> Any:
        """The key of an ``RS*``/``ES*`` token: the JWKS key its ``kid`` names, or the PEM key."""
        public_key = self._public_key
        if self._jwks is not None:
            found = self._jwks.key(kid if isinstance(kid, str) else None)
            if found is not None:
                if alg not in found.algorithms:
                    raise InvalidTokenError(
                        f"invalid token: algorithm {alg!r} is not accepted for its key"
                    )
                return found.key
            if public_key is None:
                raise InvalidTokenError("invalid token: no key with the token's 'kid'")
        if public_key is None or alg not in _algorithms_of(public_key):
            raise InvalidTokenError(f"invalid token: algorithm {alg!r} is not accepted")
        return public_key


def _header(token: str) -> dict[str, Any] | None:
    """A token's unverified header, or ``None`` when it is malformed.

    Bounded: a header segment longer than :data:`MAX_HEADER_SEGMENT` is
    malformed; a str that is not UTF-8 encodable (``ValueError``) and JSON nested
    deeper than the stack allows (``RecursionError``, which the parser does not
    bound otherwise) are too.
    """
    if len(token.partition(".")[0]) > MAX_HEADER_SEGMENT:
        return None
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _algorithms_of(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> frozenset[str]:
    """The algorithms a PEM public key verifies."""
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset(_RSA_ALGORITHMS)
    return frozenset({_EC_ALGORITHM_BY_CURVE[key.curve.name]})


def mint_token(
    *,
    secret: str,
    user: str,
    ttl: float | None,
    channels: Sequence[str] = (),
    channel: str | None = None,
    info: Any = None,
    token_id: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    algorithm: str = "HS256",
    private_key: str | None = None,
    kid: str | None = None,
) -> str:
    """Create a signed token, for development and tests.

    Without ``channel`` it is a connection token (with ``channels`` as server-side
    subscriptions); with ``channel`` it is a subscription token for that channel.

    Args:
        secret: the HMAC secret (used with the ``HS*`` algorithms).
        user: the user id (claim ``sub``).
        ttl: seconds until the token expires, or ``None`` for no ``exp`` claim.
        channels: server-side channels of a connection token.
        channel: the channel of a subscription token.
        info: any JSON value, put in the ``info`` claim when not ``None``.
        token_id: the ``jti`` claim (what ``revoke_token`` names), when given.
        audience: the ``aud`` claim, when given.
        issuer: the ``iss`` claim, when given.
        algorithm: one of :data:`HMAC_ALGORITHMS` or :data:`PUBLIC_KEY_ALGORITHMS`.
        private_key: a PEM private key, required for the ``RS*``/``ES*`` algorithms.
        kid: the key id put in the header (``kid``), for keys served by a JWKS.

    Raises:
        ConfigurationError: unknown algorithm, missing key, or a bad ``ttl``.
        InvalidTopicError: a channel name is invalid.
    """
    if algorithm not in HMAC_ALGORITHMS and algorithm not in PUBLIC_KEY_ALGORITHMS:
        raise ConfigurationError(
            f"unsupported token algorithm {algorithm!r}; use one of "
            f"{', '.join(HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS)}"
        )
    if channel is not None and channels:
        raise ConfigurationError("a token has either 'channel' (subscription) or 'channels'")
    if ttl is not None and (not math.isfinite(ttl) or ttl <= 0):
        raise ConfigurationError("ttl must be a positive number of seconds or None")
    now = int(time.time())
    payload: dict[str, Any] = {"sub": user, "iat": now}
    if ttl is not None:
        payload["exp"] = now + math.ceil(ttl)
    if channel is not None:
        payload["channel"] = validate_topic(channel)
    elif channels:
        payload["channels"] = [validate_topic(c) for c in channels]
    if info is not None:
        payload["info"] = info
    if token_id is not None:
        payload["jti"] = token_id
    if audience is not None:
        payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    key: str
    if algorithm in HMAC_ALGORITHMS:
        if not secret:
            raise ConfigurationError("an HMAC secret is required to sign the token")
        key = secret
    else:
        if not private_key:
            raise ConfigurationError(f"a PEM private key is required for {algorithm}")
        key = private_key
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _KEY_LENGTH_WARNING)
            return jwt.encode(
                payload, key, algorithm=algorithm, headers=None if kid is None else {"kid": kid}
            )
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"cannot sign the token with {algorithm}: {type(exc).__name__}"
        ) from exc


def _load_public_key(pem: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigurationError("the token public key is not a valid PEM public key") from exc
    if isinstance(key, rsa.RSAPublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_ALGORITHM_BY_CURVE:
            raise ConfigurationError(
                f"unsupported EC curve {key.curve.name!r} for the token public key; "
                "use P-256, P-384 or P-521"
            )
        return key
    raise ConfigurationError("the token public key must be an RSA or EC key")


def _user(payload: Mapping[str, Any]) -> str:
    user = payload.get("sub")
    if user is None:
        raise InvalidTokenError("invalid token: missing 'sub' claim")
    if not isinstance(user, str):
        raise InvalidTokenError("invalid token: 'sub' must be a string")
    return user


def _token_id(payload: Mapping[str, Any]) -> str | None:
    jti = payload.get("jti")
    if jti is None:
        return None
    if not isinstance(jti, str):
        raise InvalidTokenError("invalid token: 'jti' must be a string")
    return jti


def _issued_at(payload: Mapping[str, Any]) -> float | None:
    iat = payload.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        return None  # PyJWT already refused an 'iat' that is not a number
    return float(iat)


def _expires_at(payload: Mapping[str, Any]) -> float | None:
    exp = payload.get("exp")
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise InvalidTokenError("invalid token: 'exp' must be a number")
    return float(exp)
