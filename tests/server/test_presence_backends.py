"""One contract for every Presence backend: memory, Redis and NATS behave alike.

Each Redis or NATS test works under its own key prefix (bucket) and removes it
afterwards. Two instances on the same prefix stand for two nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis

from eventcast.exceptions import BackplaneError, ConfigurationError, EventcastError
from eventcast.server.presence import MemoryPresence, Presence, open_presence
from eventcast.server.presence_nats import NATSPresence, encode_key_token
from eventcast.server.presence_redis import RedisPresence
from tests.conftest import RUN_ID

_prefixes = itertools.count()

#: A bound on waiting for a real server to expire something (a safety net only).
DEADLINE = 15.0


class Kind:
    """Builds presence instances ("nodes") of one kind over one shared store."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.prefix = f"ectest_{RUN_ID}_p{next(_prefixes)}"
        self.clock = [1_000.0]  # the memory backend's injected clock
        self.shared_memory: MemoryPresence | None = None
        self.made: list[Presence] = []

    def node(self) -> Presence:
        """A new instance on the same store (memory: the same in-process store)."""
        presence: Presence
        if self.name == "memory":
            if self.shared_memory is None:
                self.shared_memory = MemoryPresence(clock=lambda: self.clock[0])
            presence = self.shared_memory
        else:
            presence = open_presence(self.url, prefix=self.prefix)
        self.made.append(presence)
        return presence

    async def expire(self, presence: Presence, seconds: float) -> None:
        """Let ``seconds`` pass: the memory clock jumps; real servers need real time."""
        if self.name == "memory":
            self.clock[0] += seconds

    async def aclose(self) -> None:
        for presence in self.made:
            await presence.close()
        if self.name == "redis":
            with redis.Redis.from_url(self.url) as client:
                keys = list(client.scan_iter(f"{self.prefix}:*", count=1000))
                # Channel occupancy beside presence: {prefix:occupancy}…
                keys += list(client.scan_iter(f"{{{self.prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
        elif self.name == "nats":
            import nats

            nc = await nats.connect(self.url)
            try:
                js = nc.jetstream()
                for bucket in ("presence", "occupancy"):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await js.delete_key_value(f"{self.prefix}_{bucket}")
            finally:
                await nc.close()


#: The engines every contract runs on (Redis and NATS: the shared servers).
ENGINES = [
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("nats", marks=pytest.mark.nats),
]


@contextlib.asynccontextmanager
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Kind]:
    """The :class:`Kind` of a test parametrized over :data:`ENGINES`; cleaned up after."""
    url = "memory://"
    if request.param in ("redis", "nats"):
        url = request.getfixturevalue(f"{request.param}_service")
    kind = Kind(request.param, url)
    try:
        yield kind
    finally:
        await kind.aclose()


@pytest.fixture(params=ENGINES)
async def kind(request: pytest.FixtureRequest) -> AsyncIterator[Kind]:
    async with engine(request) as made:
        yield made


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a condition that a real server makes true by itself (expiry), bounded."""
    deadline = time.monotonic() + DEADLINE
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        await asyncio.sleep(0.05)


def info(client: str, user: str, **extra: Any) -> dict[str, Any]:
    return {"client": client, "user": user, **extra}


async def test_add_get_and_stats(kind: Kind) -> None:
    presence = kind.node()
    assert await presence.get("room") == {}
    assert await presence.stats("room") == (0, 0)
    await presence.add("room", "c1", info("c1", "alice", conn_info={"n": 1}), 60)
    await presence.add("room", "c2", info("c2", "alice"), 60)
    await presence.add("room", "c3", info("c3", "bob"), 60)
    await presence.add("other", "c1", info("c1", "alice"), 60)
    entries = await presence.get("room")
    assert entries == {
        "c1": {"client": "c1", "user": "alice", "conn_info": {"n": 1}},
        "c2": {"client": "c2", "user": "alice"},
        "c3": {"client": "c3", "user": "bob"},
    }
    assert await presence.stats("room") == (3, 2)
    assert await presence.stats("other") == (1, 1)
    # Refreshing an entry replaces its info, it does not add a client.
    await presence.add("room", "c3", info("c3", "bob", conn_info="new"), 60)
    assert (await presence.get("room"))["c3"] == {"client": "c3", "user": "bob", "conn_info": "new"}
    assert await presence.stats("room") == (3, 2)


async def test_remove(kind: Kind) -> None:
    presence = kind.node()
    await presence.add("room", "c1", info("c1", "alice"), 60)
    await presence.add("room", "c2", info("c2", "bob"), 60)
    await presence.remove("room", "c1")
    assert list(await presence.get("room")) == ["c2"]
    assert await presence.stats("room") == (1, 1)
    await presence.remove("room", "c1")  # removing twice is harmless
    await presence.remove("nowhere", "c9")
    await presence.remove("room", "c2")
    assert await presence.get("room") == {}
    assert await presence.stats("room") == (0, 0)
    # A removed client can come back.
    await presence.add("room", "c1", info("c1", "alice"), 60)
    assert list(await presence.get("room")) == ["c1"]


async def test_entries_expire_after_their_ttl(kind: Kind) -> None:
    presence = kind.node()
    await presence.add("room", "short", info("short", "u1"), 1.0)
    await presence.add("room", "long", info("long", "u2"), 60)
    assert set(await presence.get("room")) == {"short", "long"}
    await kind.expire(presence, 1.5)

    async def short_gone() -> bool:
        return set(await presence.get("room")) == {"long"}

    await eventually(short_gone, "the 1 s entry expires")
    assert await presence.stats("room") == (1, 1)
    # Refreshing keeps an entry alive past its first TTL: once a marker added
    # with that first TTL is gone, the refreshed entry is still there.
    await presence.add("room", "again", info("again", "u3"), 1.0)
    await presence.add("room", "again", info("again", "u3"), 60)
    await presence.add("room", "marker", info("marker", "u4"), 1.0)
    await kind.expire(presence, 1.5)

    async def marker_gone() -> bool:
        return "marker" not in await presence.get("room")

    await eventually(marker_gone, "the 1 s marker expires")
    assert set(await presence.get("room")) == {"long", "again"}


async def test_a_short_ttl_does_not_shorten_other_entries(kind: Kind) -> None:
    """Redis expires a whole hash: a short-lived entry must not take the others with it."""
    presence = kind.node()
    await presence.add("room", "long", info("long", "u1"), 60)
    await presence.add("room", "short", info("short", "u2"), 1.0)
    await kind.expire(presence, 1.5)

    async def short_gone() -> bool:
        return "short" not in await presence.get("room")

    await eventually(short_gone, "the 1 s entry expires")
    assert set(await presence.get("room")) == {"long"}


async def test_two_nodes_see_each_other(kind: Kind) -> None:
    one, two = kind.node(), kind.node()
    await one.add("room", "a", info("a", "alice"), 60)
    await two.add("room", "b", info("b", "bob"), 60)
    await two.add("room", "c", info("c", "alice"), 60)
    for node in (one, two):
        assert set(await node.get("room")) == {"a", "b", "c"}
        assert await node.stats("room") == (3, 2)
    await one.remove("room", "b")  # any node may remove any entry
    assert set(await two.get("room")) == {"a", "c"}
    await two.close()
    # The other node keeps working when one closes, and sees the entries it left.
    assert set(await one.get("room")) == {"a", "c"}


async def test_channel_and_client_names_are_kept_apart(kind: Kind) -> None:
    presence = kind.node()
    odd = "chat:room.42#a,b=+@-_"
    await presence.add(odd, "c/1:2 é", info("c/1:2 é", "u"), 60)
    await presence.add("chat:room", "x", info("x", "u"), 60)
    await presence.add("chat:room.4", "y", info("y", "u"), 60)
    assert list(await presence.get(odd)) == ["c/1:2 é"]
    assert list(await presence.get("chat:room")) == ["x"]
    assert list(await presence.get("chat:room.4")) == ["y"]


async def test_close_is_idempotent_and_final(kind: Kind) -> None:
    presence = kind.node()
    await presence.add("room", "c1", info("c1", "alice"), 60)
    await presence.close()
    await presence.close()
    if kind.name == "memory":
        assert list(await presence.get("room")) == ["c1"]  # nothing to release
    else:
        with pytest.raises(BackplaneError):
            await presence.get("room")
        with pytest.raises(BackplaneError):
            await presence.add("room", "c2", info("c2", "bob"), 60)


# -- backend specifics ---------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_entries_are_json_in_one_hash_per_channel(redis_service: str) -> None:
    prefix = f"ectest:{RUN_ID}:hash{next(_prefixes)}"
    presence = RedisPresence(redis_service, prefix=prefix)
    try:
        await presence.add("room", "c1", info("c1", "alice"), 30)
        with redis.Redis.from_url(redis_service) as client:
            raw = client.hgetall(f"{prefix}:presence:room")
            assert set(raw) == {b"c1"}
            assert b'"info":{"client":"c1","user":"alice"}' in raw[b"c1"]
            assert b'"expires_at":' in raw[b"c1"]
            assert 0 < client.pttl(f"{prefix}:presence:room") <= 30_000
            # A later, shorter TTL never shortens the hash's expiry.
            await presence.add("room", "c2", info("c2", "bob"), 1)
            assert client.pttl(f"{prefix}:presence:room") > 20_000
            # An expired entry is filtered out of reads and deleted.
            client.hset(f"{prefix}:presence:room", "c3", '{"info":{},"expires_at":1}')
            assert set(await presence.get("room")) == {"c1", "c2"}
            assert not client.hexists(f"{prefix}:presence:room", "c3")
            # But it is deleted only if nobody refreshed it since it was read.
            script = presence._delete_script
            assert script is not None
            fresh = '{"info":{},"expires_at":9999999999}'
            client.hset(f"{prefix}:presence:room", "c4", fresh)
            stale = '{"info":{},"expires_at":1}'
            assert await script(keys=[f"{prefix}:presence:room"], args=["c4", stale]) == 0
            assert client.hget(f"{prefix}:presence:room", "c4") == fresh.encode()
    finally:
        await presence.close()
        with redis.Redis.from_url(redis_service) as client:
            client.delete(f"{prefix}:presence:room")


@pytest.mark.redis
async def test_redis_unreachable_is_a_backplane_error() -> None:
    presence = RedisPresence("redis://127.0.0.1:1/0", connect_timeout=0.5, retries=0)
    with pytest.raises(BackplaneError) as raised:
        await presence.add("room", "c1", info("c1", "u"), 10)
    assert raised.value.__cause__ is not None
    await presence.close()


@pytest.mark.nats
async def test_nats_unreachable_is_a_backplane_error() -> None:
    presence = NATSPresence("nats://127.0.0.1:1", connect_timeout=0.5)
    with pytest.raises(BackplaneError) as raised:
        await presence.get("room")
    assert raised.value.__cause__ is not None
    await presence.close()


def test_nats_keys_fit_the_key_alphabet() -> None:
    import re

    for text in ("", "a", "chat:room.42", "é/ü *>", "x" * 300):
        token = encode_key_token(text)
        assert re.fullmatch(r"[A-Za-z0-9_=\-]+", token)
    assert encode_key_token("a") != encode_key_token("A")


@pytest.mark.parametrize("url", ["", "redis", "http://x", "mysql://u@h/db", "memory", "natss://x"])
def test_open_presence_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_presence(url, prefix="p")


def test_open_presence_by_scheme() -> None:
    assert isinstance(open_presence("memory://", prefix="p"), MemoryPresence)
    assert isinstance(open_presence("redis://127.0.0.1:6379/0", prefix="p"), RedisPresence)
    assert isinstance(open_presence("rediss://example:6380/0", prefix="p"), RedisPresence)
    nats_presence = open_presence("nats://127.0.0.1:4222", prefix="p")
    assert isinstance(nats_presence, NATSPresence)
    assert nats_presence.bucket == "p_presence"
    with pytest.raises(ConfigurationError):
        open_presence("nats://127.0.0.1:4222", prefix="bad.prefix")
    assert issubclass(BackplaneError, EventcastError)
