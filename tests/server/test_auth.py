"""JWT verification: algorithms allowlist, claims, error mapping, no token in messages."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from eventcast.exceptions import (
    AuthError,
    ConfigurationError,
    EventcastError,
    InvalidTokenError,
    InvalidTopicError,
    TokenExpiredError,
)
from eventcast.server.auth import (
    ConnectionClaims,
    SubscriptionClaims,
    TokenVerifier,
    mint_token,
)

SECRET = "a-test-secret-that-is-at-least-32-bytes-long"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """Build a JWT by hand (for algorithms PyJWT refuses to produce)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(signature)}"


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(hmac_secret=SECRET)


# --- connection tokens ---------------------------------------------------------------------


def test_hs256_connection_token_is_verified(verifier: TokenVerifier) -> None:
    before = time.time()
    token = mint_token(
        secret=SECRET, user="u1", ttl=60, channels=["news", "chat:lobby"], info={"name": "Ann"}
    )
    claims = verifier.verify_connection(token)
    assert claims.user == "u1"
    assert claims.channels == ("news", "chat:lobby")
    assert claims.info == {"name": "Ann"}
    assert claims.expires_at is not None
    assert before + 59 <= claims.expires_at <= time.time() + 61
    assert isinstance(claims, ConnectionClaims)


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_every_hmac_algorithm_is_accepted(verifier: TokenVerifier, algorithm: str) -> None:
    token = mint_token(secret=SECRET, user="u1", ttl=None, algorithm=algorithm)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    issued_at = float(jwt.decode(token, options={"verify_signature": False})["iat"])
    assert verifier.verify_connection(token) == ConnectionClaims(user="u1", issued_at=issued_at)


def test_token_without_exp_never_expires_and_empty_sub_is_allowed(verifier: TokenVerifier) -> None:
    claims = verifier.verify_connection(hs256({"sub": ""}))
    assert claims == ConnectionClaims(user="", expires_at=None, info=None, channels=())


def test_expired_token_raises_token_expired(verifier: TokenVerifier) -> None:
    token = hs256({"sub": "u1", "exp": int(time.time()) - 30})
    with pytest.raises(TokenExpiredError) as excinfo:
        verifier.verify_connection(token)
    assert isinstance(excinfo.value, AuthError)
    assert isinstance(excinfo.value.__cause__, jwt.ExpiredSignatureError)


def test_leeway_tolerates_clock_skew() -> None:
    token = hs256({"sub": "u1", "exp": int(time.time()) - 30})
    claims = TokenVerifier(hmac_secret=SECRET, leeway=120).verify_connection(token)
    assert claims.user == "u1"


def test_wrong_signature_is_rejected(verifier: TokenVerifier) -> None:
    token = hs256({"sub": "u1"}, secret="another-secret-that-is-at-least-32-bytes")
    with pytest.raises(InvalidTokenError, match="signature"):
        verifier.verify_connection(token)


def test_tampered_payload_is_rejected(verifier: TokenVerifier) -> None:
    header, _payload, signature = hs256({"sub": "u1"}).split(".")
    forged = f"{header}.{b64url(json.dumps({'sub': 'admin'}).encode())}.{signature}"
    with pytest.raises(InvalidTokenError, match="signature"):
        verifier.verify_connection(forged)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(verifier: TokenVerifier, alg: str) -> None:
    token = craft({"alg": alg, "typ": "JWT"}, {"sub": "admin"})
    assert token.endswith(".")
    with pytest.raises(InvalidTokenError, match="not accepted"):
        verifier.verify_connection(token)


@pytest.mark.parametrize("header", [{"alg": "HS1024"}, {"alg": "PS256"}, {"typ": "JWT"}])
def test_unknown_or_missing_algorithm_is_rejected(
    verifier: TokenVerifier, header: dict[str, Any]
) -> None:
    token = craft(header, {"sub": "u1"}, b"sig")
    with pytest.raises(InvalidTokenError, match="not accepted"):
        verifier.verify_connection(token)


def test_audience_is_checked_when_configured() -> None:
    verifier = TokenVerifier(hmac_secret=SECRET, audience="eventcast")
    assert verifier.verify_connection(hs256({"sub": "u1", "aud": "eventcast"})).user == "u1"
    with pytest.raises(InvalidTokenError, match="audience"):
        verifier.verify_connection(hs256({"sub": "u1", "aud": "someone-else"}))
    with pytest.raises(InvalidTokenError, match="'aud'"):
        verifier.verify_connection(hs256({"sub": "u1"}))


def test_audience_claim_is_ignored_when_not_configured(verifier: TokenVerifier) -> None:
    assert verifier.verify_connection(hs256({"sub": "u1", "aud": "anything"})).user == "u1"


def test_issuer_is_checked_when_configured() -> None:
    verifier = TokenVerifier(hmac_secret=SECRET, issuer="https://auth.example")
    token = hs256({"sub": "u1", "iss": "https://auth.example"})
    assert verifier.verify_connection(token).user == "u1"
    with pytest.raises(InvalidTokenError, match="issuer"):
        verifier.verify_connection(hs256({"sub": "u1", "iss": "https://evil.example"}))
    with pytest.raises(InvalidTokenError, match="'iss'"):
        verifier.verify_connection(hs256({"sub": "u1"}))


def test_missing_sub_is_rejected(verifier: TokenVerifier) -> None:
    with pytest.raises(InvalidTokenError, match="'sub'"):
        verifier.verify_connection(hs256({"info": {"a": 1}}))


def test_non_string_sub_is_rejected(verifier: TokenVerifier) -> None:
    token = craft(
        {"alg": "HS256", "typ": "JWT"},
        {"sub": 42},
    )
    header_payload = token.rsplit(".", 1)[0]
    signature = hmac.new(SECRET.encode(), header_payload.encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidTokenError, match="sub"):
        verifier.verify_connection(f"{header_payload}.{b64url(signature)}")


def test_not_yet_valid_token_is_rejected(verifier: TokenVerifier) -> None:
    with pytest.raises(InvalidTokenError, match="not valid yet"):
        verifier.verify_connection(hs256({"sub": "u1", "nbf": int(time.time()) + 3600}))


def test_invalid_server_side_channel_is_rejected(verifier: TokenVerifier) -> None:
    with pytest.raises(InvalidTokenError, match="channels") as excinfo:
        verifier.verify_connection(hs256({"sub": "u1", "channels": ["ok", "news.*"]}))
    assert isinstance(excinfo.value.__cause__, InvalidTopicError)
    with pytest.raises(InvalidTokenError, match="list of strings"):
        verifier.verify_connection(hs256({"sub": "u1", "channels": "news"}))


def test_subscription_token_cannot_be_used_to_connect(verifier: TokenVerifier) -> None:
    token = mint_token(secret=SECRET, user="u1", ttl=60, channel="chat:room")
    with pytest.raises(InvalidTokenError, match="subscription token"):
        verifier.verify_connection(token)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "...."])
def test_malformed_tokens_are_rejected(verifier: TokenVerifier, token: str) -> None:
    with pytest.raises(InvalidTokenError):
        verifier.verify_connection(token)


def test_non_string_token_is_rejected(verifier: TokenVerifier) -> None:
    with pytest.raises(InvalidTokenError, match="str"):
        verifier.verify_connection(b"abc")  # type: ignore[arg-type]


def test_without_any_key_every_token_is_rejected() -> None:
    verifier = TokenVerifier(hmac_secret=None, public_key=None)
    assert verifier.algorithms == frozenset()
    with pytest.raises(InvalidTokenError, match="no token key configured"):
        verifier.verify_connection(hs256({"sub": "u1"}))
    with pytest.raises(InvalidTokenError, match="no token key configured"):
        TokenVerifier(hmac_secret="").verify_connection(hs256({"sub": "u1"}))


# --- public keys ---------------------------------------------------------------------------


def test_rs256_token_is_verified_with_the_rsa_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(public_key=public_pem(rsa_key))
    assert verifier.algorithms == frozenset({"RS256", "RS384", "RS512"})
    token = mint_token(
        secret="",
        user="u1",
        ttl=60,
        channels=["news"],
        algorithm="RS256",
        private_key=private_pem(rsa_key),
    )
    claims = verifier.verify_connection(token)
    assert (claims.user, claims.channels) == ("u1", ("news",))


def test_es256_token_is_verified_with_the_ec_public_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(public_key=public_pem(ec_key))
    assert verifier.algorithms == frozenset({"ES256"})
    token = jwt.encode({"sub": "u2", "info": [1, 2]}, ec_key, algorithm="ES256")
    assert verifier.verify_connection(token) == ConnectionClaims(user="u2", info=[1, 2])


def test_hmac_token_is_rejected_by_a_public_key_verifier(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(public_key=public_pem(rsa_key))
    with pytest.raises(InvalidTokenError, match="'HS256' is not accepted"):
        verifier.verify_connection(hs256({"sub": "u1"}))


def test_rsa_token_is_rejected_by_an_hmac_verifier(
    verifier: TokenVerifier, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode({"sub": "u1"}, rsa_key, algorithm="RS256")
    with pytest.raises(InvalidTokenError, match="'RS256' is not accepted"):
        verifier.verify_connection(token)


def test_es_token_is_rejected_by_an_rsa_verifier(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode({"sub": "u1"}, ec_key, algorithm="ES256")
    with pytest.raises(InvalidTokenError, match="'ES256' is not accepted"):
        TokenVerifier(public_key=public_pem(rsa_key)).verify_connection(token)


def test_rs256_token_signed_by_another_key_is_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"sub": "u1"}, other, algorithm="RS256")
    with pytest.raises(InvalidTokenError, match="signature"):
        TokenVerifier(public_key=public_pem(rsa_key)).verify_connection(token)


@pytest.mark.parametrize("with_hmac_secret", [False, True])
def test_hs_rs_algorithm_confusion_is_rejected(
    rsa_key: rsa.RSAPrivateKey, with_hmac_secret: bool
) -> None:
    pem = public_pem(rsa_key)
    # The classic attack: HS256 "signed" with the (public) PEM text as the HMAC secret.
    header_payload = craft({"alg": "HS256", "typ": "JWT"}, {"sub": "admin"}).rsplit(".", 1)[0]
    signature = hmac.new(pem.encode(), header_payload.encode(), hashlib.sha256).digest()
    forged = f"{header_payload}.{b64url(signature)}"
    verifier = TokenVerifier(hmac_secret=SECRET if with_hmac_secret else None, public_key=pem)
    with pytest.raises(InvalidTokenError):
        verifier.verify_connection(forged)


@pytest.mark.parametrize(
    "pem", ["not a pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"]
)
def test_a_bad_public_key_is_a_configuration_error(pem: str) -> None:
    with pytest.raises(ConfigurationError, match="PEM"):
        TokenVerifier(public_key=pem)


def test_negative_leeway_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="leeway"):
        TokenVerifier(hmac_secret=SECRET, leeway=-1)


# --- subscription tokens -------------------------------------------------------------------


def test_subscription_token_is_verified(verifier: TokenVerifier) -> None:
    token = mint_token(secret=SECRET, user="u1", ttl=60, channel="chat:room", info={"r": "mod"})
    claims = verifier.verify_subscription(token, user="u1", channel="chat:room")
    assert isinstance(claims, SubscriptionClaims)
    assert claims.info == {"r": "mod"}
    assert claims.expires_at is not None
    assert claims.expires_at > time.time()


def test_subscription_token_for_another_user_is_rejected(verifier: TokenVerifier) -> None:
    token = mint_token(secret=SECRET, user="u1", ttl=60, channel="chat:room")
    with pytest.raises(InvalidTokenError, match="another user"):
        verifier.verify_subscription(token, user="u2", channel="chat:room")


def test_subscription_token_for_another_channel_is_rejected(verifier: TokenVerifier) -> None:
    token = mint_token(secret=SECRET, user="u1", ttl=60, channel="chat:room")
    with pytest.raises(InvalidTokenError, match="another channel"):
        verifier.verify_subscription(token, user="u1", channel="chat:other")


def test_connection_token_is_not_a_subscription_token(verifier: TokenVerifier) -> None:
    token = mint_token(secret=SECRET, user="u1", ttl=60)
    with pytest.raises(InvalidTokenError, match="'channel'"):
        verifier.verify_subscription(token, user="u1", channel="chat:room")


def test_expired_subscription_token_raises_token_expired(verifier: TokenVerifier) -> None:
    token = hs256({"sub": "u1", "channel": "news", "exp": int(time.time()) - 5})
    with pytest.raises(TokenExpiredError):
        verifier.verify_subscription(token, user="u1", channel="news")


# --- messages never contain the token ------------------------------------------------------


def _failing_tokens(rsa_key: rsa.RSAPrivateKey) -> list[tuple[str, TokenVerifier]]:
    hmac_verifier = TokenVerifier(hmac_secret=SECRET, audience="aud", issuer="iss")
    now = int(time.time())
    return [
        (hs256({"sub": "u1", "aud": "aud", "iss": "iss", "exp": now - 10}), hmac_verifier),
        (hs256({"sub": "u1", "aud": "aud", "iss": "iss"}, secret="x" * 40), hmac_verifier),
        (hs256({"sub": "u1", "aud": "nope", "iss": "iss"}), hmac_verifier),
        (hs256({"sub": "u1", "aud": "aud", "iss": "nope"}), hmac_verifier),
        (hs256({"aud": "aud", "iss": "iss"}), hmac_verifier),
        (craft({"alg": "none"}, {"sub": "u1"}), hmac_verifier),
        (hs256({"sub": "u1", "aud": "aud", "iss": "iss"})[:-3] + "!!!", hmac_verifier),
        (jwt.encode({"sub": "u1"}, rsa_key, algorithm="RS256"), hmac_verifier),
        (hs256({"sub": "u1"}), TokenVerifier()),
    ]


def test_error_messages_never_contain_the_token(rsa_key: rsa.RSAPrivateKey) -> None:
    for token, verifier in _failing_tokens(rsa_key):
        for check in (
            verifier.verify_connection,
            lambda t, v=verifier: v.verify_subscription(t, user="u1", channel="news"),
        ):
            with pytest.raises(AuthError) as excinfo:
                check(token)
            message = str(excinfo.value)
            assert message
            for part in token.split("."):
                if len(part) > 8:
                    assert part not in message


# --- minting -------------------------------------------------------------------------------


def test_mint_token_sets_audience_issuer_and_no_exp_without_ttl() -> None:
    token = mint_token(secret=SECRET, user="u1", ttl=None, audience="a", issuer="i")
    payload = jwt.decode(token, SECRET, algorithms=["HS256"], audience="a", issuer="i")
    assert payload["sub"] == "u1"
    assert "exp" not in payload
    verifier = TokenVerifier(hmac_secret=SECRET, audience="a", issuer="i")
    assert verifier.verify_connection(token).expires_at is None


def test_mint_token_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match="algorithm"):
        mint_token(secret=SECRET, user="u1", ttl=60, algorithm="none")
    with pytest.raises(ConfigurationError, match="private key"):
        mint_token(secret=SECRET, user="u1", ttl=60, algorithm="RS256")
    with pytest.raises(ConfigurationError, match="secret"):
        mint_token(secret="", user="u1", ttl=60)
    with pytest.raises(ConfigurationError, match="ttl"):
        mint_token(secret=SECRET, user="u1", ttl=0)
    with pytest.raises(ConfigurationError, match="either"):
        mint_token(secret=SECRET, user="u1", ttl=60, channels=["a"], channel="b")
    with pytest.raises(InvalidTopicError):
        mint_token(secret=SECRET, user="u1", ttl=60, channels=["bad name"])


def test_auth_errors_are_eventcast_errors() -> None:
    assert issubclass(InvalidTokenError, AuthError)
    assert issubclass(TokenExpiredError, AuthError)
    assert issubclass(AuthError, EventcastError)


def test_token_id_and_issue_time_are_in_the_claims(verifier: TokenVerifier) -> None:
    """``jti`` and ``iat``: what ``revoke_token`` and ``invalidate_user_tokens`` look at."""
    token = mint_token(secret=SECRET, user="u1", ttl=60, token_id="t-1")
    claims = verifier.verify_connection(token)
    assert claims.token_id == "t-1"
    assert claims.issued_at is not None
    assert abs(claims.issued_at - time.time()) < 5
    sub = mint_token(secret=SECRET, user="u1", ttl=60, channel="news", token_id="s-1")
    sub_claims = verifier.verify_subscription(sub, user="u1", channel="news")
    assert (sub_claims.token_id, sub_claims.issued_at) == ("s-1", claims.issued_at)
    bare = verifier.verify_connection(hs256({"sub": "u1"}))
    assert (bare.token_id, bare.issued_at) == (None, None)
    with pytest.raises(InvalidTokenError, match="jti"):
        verifier.verify_connection(hs256({"sub": "u1", "jti": 42}))
