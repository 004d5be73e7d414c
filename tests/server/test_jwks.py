"""Tokens verified against a JWKS endpoint served by the test, which rotates its keys.

Keys are real RSA and EC keys (``cryptography``), published as JWKs the way
Keycloak, Auth0 and Cognito publish theirs; tokens are signed with their
private halves and carry the key's ``kid``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eventcast.exceptions import InvalidTokenError, KeySetError
from eventcast.server.auth import TokenVerifier, mint_token
from eventcast.server.jwks import JWKS

from .apptools import listening_socket, serve_app
from .conftest import StartHub
from .hubtools import RawClient
from .ssetools import open_sse


@dataclass
class Key:
    """A signing key: its kid, PEM private key and public JWK."""

    kid: str
    private_pem: str
    jwk: dict[str, Any]
    algorithm: str

    @classmethod
    def rsa(cls, kid: str) -> Key:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
        return cls(kid, _pem(private), {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}, "RS256")

    @classmethod
    def ec(cls, kid: str) -> Key:
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
        return cls(kid, _pem(private), {**jwk, "kid": kid, "use": "sig"}, "ES256")

    def token(self, user: str, *, kid: str | None = None, **claims: Any) -> str:
        return mint_token(
            secret="",
            user=user,
            ttl=600,
            algorithm=self.algorithm,
            private_key=self.private_pem,
            kid=kid or self.kid,
            **claims,
        )


def _pem(private: Any) -> str:
    return str(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """A token HMAC-signed by hand (PyJWT refuses to sign with a public key's text)."""
    signing = ".".join(
        _b64(json.dumps(part).encode()) for part in ({"alg": "HS256", **header}, payload)
    )
    signature = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(signature)}"


@dataclass
class KeySet:
    """The JWKS endpoint's state: the keys it publishes, and how often it was asked."""

    keys: list[Key] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    status: int = 200

    @property
    def app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            self.requests += 1
            if self.status != 200:
                return Response("unavailable", status_code=self.status)
            return JSONResponse({"keys": [k.jwk for k in self.keys] + self.extra})

        return Starlette(routes=[Route("/.well-known/jwks.json", jwks)])


@pytest.fixture
async def key_set() -> AsyncIterator[tuple[KeySet, str]]:
    keys = KeySet(keys=[Key.rsa("rsa-1")])
    async with serve_app(keys.app, listening_socket()) as base:
        yield keys, f"{base}/.well-known/jwks.json"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_rotation_unknown_kids_and_the_cache(key_set: tuple[KeySet, str]) -> None:
    keys, url = key_set
    clock = Clock()
    jwks = JWKS(url, cache_ttl=300, min_refresh=10, clock=clock)
    verifier = TokenVerifier(jwks=jwks)
    try:
        first = keys.keys[0]
        token = first.token("alice")
        # Twenty verifications at once share one fetch.
        await asyncio.gather(*(verifier.prepare(token) for _ in range(20)))
        assert keys.requests == 1
        assert verifier.verify_connection(token).user == "alice"

        # The provider rotates: the new kid is fetched once, then accepted.
        clock.now += 11
        second = Key.ec("ec-2")
        keys.keys = [second]
        rotated = second.token("bob")
        await verifier.prepare(rotated)
        assert keys.requests == 2
        assert verifier.verify_connection(rotated).user == "bob"
        with pytest.raises(InvalidTokenError, match="no key with the token's 'kid'"):
            verifier.verify_connection(token)  # the old key is gone

        # Unknown kids within the rate limit cause no request at all.
        stranger = Key.ec("made-up")
        for _ in range(50):
            await verifier.prepare(stranger.token("mallory"))
        assert keys.requests == 2
        with pytest.raises(InvalidTokenError):
            verifier.verify_connection(stranger.token("mallory"))

        # A stale set is fetched again; a failed fetch keeps the keys it had.
        clock.now += 301
        keys.status = 503
        await verifier.prepare(rotated)
        assert keys.requests == 3
        assert verifier.verify_connection(rotated).user == "bob"
    finally:
        await verifier.aclose()


async def test_only_signing_rsa_and_ec_keys_with_their_algorithms(
    key_set: tuple[KeySet, str],
) -> None:
    keys, url = key_set
    rsa_key = keys.keys[0]
    keys.extra = [
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},  # never from a public set
        {**Key.ec("enc").jwk, "use": "enc"},  # an encryption key
    ]
    verifier = TokenVerifier(jwks=JWKS(url))
    try:
        await verifier.prepare(rsa_key.token("a"))
        # The key says RS256: an RS384 token with its kid is refused.
        rs384 = jwt.encode(
            {"sub": "a"}, rsa_key.private_pem, algorithm="RS384", headers={"kid": "rsa-1"}
        )
        with pytest.raises(InvalidTokenError, match="not accepted for its key"):
            verifier.verify_connection(rs384)
        # Algorithm confusion: an HS256 token "signed" with the public key is refused.
        confused = _hs256({"kid": "rsa-1"}, {"sub": "a"}, json.dumps(rsa_key.jwk).encode())
        with pytest.raises(InvalidTokenError, match="not accepted"):
            verifier.verify_connection(confused)
        for kid in ("hmac", "enc"):
            forged = _hs256({"kid": kid}, {"sub": "a"}, b"secret")
            with pytest.raises(InvalidTokenError):
                verifier.verify_connection(forged)
    finally:
        await verifier.aclose()


async def test_an_unreachable_endpoint_is_a_temporary_failure() -> None:
    sock = listening_socket()  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    clock = Clock()
    jwks = JWKS(url, min_refresh=10, clock=clock)
    try:
        with pytest.raises(KeySetError, match="could not be read"):
            await jwks.prepare("any")
        assert jwks.fetches == 1
        # No retry storm: within min_refresh the failure is answered at once.
        for _ in range(10):
            with pytest.raises(KeySetError):
                await jwks.prepare("any")
        assert jwks.fetches == 1
    finally:
        await jwks.aclose()
        sock.close()


async def test_the_hub_accepts_rotated_keys_and_refuses_strangers(
    start_hub: StartHub, key_set: tuple[KeySet, str]
) -> None:
    keys, url = key_set
    hub = await start_hub(token_jwks_url=url, token_jwks_min_refresh=0.2)
    first = keys.keys[0]
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(first.token("alice"))
        # A subscription token checked against the same set.
        await client.subscribe("priv:room", token=first.token("alice", channel="priv:room"))
    assert keys.requests == 1

    second = Key.ec("ec-2")
    keys.keys = [first, second]
    await asyncio.sleep(0.25)  # the subject is the refresh rate limit: let it pass
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(second.token("bob"))
    assert keys.requests == 2  # within one refresh

    stranger_key = Key.ec("stranger")

    async def stranger() -> tuple[int | None, str]:
        forged = stranger_key.token("x", kid=secrets.token_hex(4))
        async with await RawClient.open(hub.ws_url) as client:
            await client.command("connect", {"token": forged})
            return await client.closed()

    await asyncio.sleep(0.25)
    closed = await asyncio.gather(*(stranger() for _ in range(30)))
    assert set(closed) == {(3500, "invalid token")}
    assert keys.requests <= 3  # at most one refresh for thirty unknown kids

    # The endpoint goes down while the hub has no key for a token: a temporary error.
    keys.status = 503
    await asyncio.sleep(0.25)
    third = Key.ec("ec-3")
    async with await RawClient.open(hub.ws_url) as client:
        reply = await client.request("connect", {"token": third.token("carol")})
        assert reply["error"]["code"] == 100  # not 3500: the client tries again later
        assert reply["error"]["temporary"] is True


async def test_sse_with_jwks_tokens(start_hub: StartHub, key_set: tuple[KeySet, str]) -> None:
    keys, url = key_set
    hub = await start_hub(token_jwks_url=url)
    async with open_sse(hub.base, ["news"], token=keys.keys[0].token("dana")) as stream:
        assert stream.status == 200
    sock = listening_socket()
    down = await start_hub(token_jwks_url=f"http://127.0.0.1:{sock.getsockname()[1]}/jwks")
    async with open_sse(down.base, ["news"], token=keys.keys[0].token("dana")) as stream:
        assert stream.status == 503
    sock.close()
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{hub.base}/healthz")).status_code == 200
