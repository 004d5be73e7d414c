"""Blocked users and revoked tokens: one store contract for every backend, and the checks.

The contract runs on memory, SQLite, PostgreSQL, Redis and NATS KV (each under
a schema, prefix or bucket of its own, removed afterwards); two store
instances on the same place stand for two nodes. Then :class:`Access`, the
in-memory copy every check reads, and a single node that keeps a block across
a restart in its SQLite log.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest

from eventcast.exceptions import ConfigurationError, EventcastError, LogError
from eventcast.protocol import codes
from eventcast.server.access import (
    Access,
    AccessEntry,
    AccessStore,
    MemoryAccessStore,
    access_store_url,
    open_access_store,
)
from eventcast.server.access_nats import NATSAccessStore
from eventcast.server.access_redis import RedisAccessStore
from eventcast.server.access_sql import PostgresAccessStore, SQLiteAccessStore
from eventcast.server.config import Settings
from eventcast.server.errors import CommandError
from tests.conftest import RUN_ID

from .conftest import StartHub
from .hubtools import RawClient, token

_names = itertools.count()

Nodes = Callable[[], AccessStore]


def block(user: str, expire_at: float | None = None) -> AccessEntry:
    return AccessEntry(kind="block", subject=user, expire_at=expire_at)


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("nats", marks=pytest.mark.nats),
    ]
)
async def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Nodes]:
    """Build stores ("nodes") sharing one place; remove it afterwards."""
    name = f"ectest_{RUN_ID}_a{next(_names)}"
    shared = MemoryAccessStore()
    made: list[AccessStore] = []
    url = ""
    if request.param == "postgres":
        url = f"{request.getfixturevalue('postgres_service')}?schema={name}"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_service")
    elif request.param == "nats":
        url = request.getfixturevalue("nats_service")

    def node() -> AccessStore:
        store: AccessStore
        if request.param == "memory":
            store = shared
        elif request.param == "sqlite":
            store = SQLiteAccessStore(tmp_path / "events.db")
        elif request.param == "postgres":
            store = PostgresAccessStore(url)
        elif request.param == "redis":
            store = RedisAccessStore(url, prefix=name)
        else:
            store = NATSAccessStore(url, prefix=name)
        made.append(store)
        return store

    try:
        yield node
    finally:
        for store in made:
            await store.close()
        if request.param == "postgres":
            with psycopg.connect(request.getfixturevalue("postgres_service")) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
                conn.commit()
        elif request.param == "redis":
            import redis

            with redis.Redis.from_url(url) as client:
                client.delete(f"{name}:access")
        elif request.param == "nats":
            import nats

            nc = await nats.connect(url)
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_key_value(f"{name}_access")
            await nc.close()


async def test_entries_are_shared_replaced_and_removed(nodes: Nodes) -> None:
    one, two = nodes(), nodes()
    await one.open()
    assert await one.load(time.time()) == []
    later = time.time() + 600
    entries = [
        block("alice"),
        AccessEntry(kind="token", subject="jti-1", expire_at=later),
        AccessEntry(kind="user_tokens", subject="bob", issued_before=1000.5),
        AccessEntry(kind="user_tokens", subject="bob", channel="chat:x", issued_before=2000.0),
    ]
    for entry in entries:
        await one.put(entry)
    loaded = await two.load(time.time())
    assert sorted(loaded, key=lambda e: e.key) == sorted(entries, key=lambda e: e.key)
    # The same key replaces; another channel is another entry.
    await two.put(AccessEntry(kind="user_tokens", subject="bob", issued_before=3000.0))
    by_key = {e.key: e for e in await one.load(time.time())}
    assert by_key[("user_tokens", "bob", "")].issued_before == 3000.0
    assert by_key[("user_tokens", "bob", "chat:x")].issued_before == 2000.0
    await one.remove(("block", "alice", ""))
    await one.remove(("block", "nobody", ""))  # absent: fine
    assert ("block", "alice", "") not in {e.key for e in await two.load(time.time())}


async def test_expired_entries_are_not_loaded_and_are_deleted(nodes: Nodes) -> None:
    one, two = nodes(), nodes()
    now = time.time()
    await one.put(block("short", expire_at=now + 5))
    await one.put(block("long", expire_at=now + 600))
    assert {e.subject for e in await two.load(now)} == {"short", "long"}
    # Loading "later" drops the expired entry from the store itself.
    assert {e.subject for e in await two.load(now + 10)} == {"long"}
    assert {e.subject for e in await one.load(now)} == {"long"}


async def test_any_string_fits_a_subject_and_a_channel(nodes: Nodes) -> None:
    store = nodes()
    odd = "é/ü *> a.b:c\n\"'"
    await store.put(AccessEntry(kind="user_tokens", subject=odd, channel="a:b.c#1,2"))
    await store.put(block(""))  # an empty subject is stored as given
    keys = {e.key for e in await store.load(time.time())}
    assert keys == {("user_tokens", odd, "a:b.c#1,2"), ("block", "", "")}


async def test_a_read_right_after_a_write_sees_it(nodes: Nodes) -> None:
    """Again and again (NATS: a watch may say "nothing more" before what is on its way)."""
    one, two = nodes(), nodes()
    for n in range(30):
        await one.put(block(f"user{n}"))
        assert len(await two.load(time.time())) == n + 1


async def test_close_is_idempotent(nodes: Nodes) -> None:
    store = nodes()
    await store.put(block("alice"))
    await store.close()
    await store.close()


def test_sqlite_creates_no_file_until_an_entry_is_stored(tmp_path: Path) -> None:
    import asyncio

    async def run() -> None:
        path = tmp_path / "sub" / "events.db"
        store = SQLiteAccessStore(path)
        assert await store.load(time.time()) == []
        await store.remove(("block", "x", ""))
        assert not path.exists()
        await store.put(block("x"))
        assert path.exists()

    asyncio.run(run())


async def test_unreachable_stores_raise_eventcast_errors(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(LogError):
        await SQLiteAccessStore(directory).put(block("x"))  # a directory is no database
    store = RedisAccessStore("redis://127.0.0.1:1/0", connect_timeout=0.5)
    with pytest.raises(EventcastError):
        await store.load(time.time())
    await store.close()
    nats_store = NATSAccessStore("nats://127.0.0.1:1", connect_timeout=0.5)
    with pytest.raises(EventcastError):
        await nats_store.load(time.time())
    await nats_store.close()


def test_open_access_store_by_scheme(tmp_path: Path) -> None:
    assert isinstance(open_access_store("memory://", prefix="p"), MemoryAccessStore)
    sqlite = open_access_store(f"sqlite:///{tmp_path}/events.db", prefix="p")
    assert isinstance(sqlite, SQLiteAccessStore)
    assert sqlite.path == f"{tmp_path}/events.db"
    postgres = open_access_store("postgresql://u@h/db?schema=s1", prefix="p")
    assert isinstance(postgres, PostgresAccessStore)
    assert postgres.schema == "s1"
    redis_store = open_access_store("redis://127.0.0.1:6379/0", prefix="p")
    assert isinstance(redis_store, RedisAccessStore)
    assert redis_store.key == "p:access"
    nats_store = open_access_store("nats://127.0.0.1:4222", prefix="my.app")
    assert isinstance(nats_store, NATSAccessStore)
    assert nats_store.bucket == "my_app_access"
    for bad in ("", "memory", "mysql://u@h/db", "sqlite://relative", "sqlite:///"):
        with pytest.raises(ConfigurationError):
            open_access_store(bad, prefix="p")


def test_the_store_follows_the_deployment() -> None:
    def where(**values: str) -> tuple[str, str]:
        return access_store_url(Settings.load(**values))

    # One node: the log, even SQLite.
    assert where(log_url="sqlite:///data/events.db") == ("sqlite:///data/events.db", "eventcast")
    # Nodes sharing a durable log: the log.
    pg = "postgresql://u@db/app?schema=s"
    assert where(log_url=pg, backplane_url="redis://r:6379/0?prefix=bp") == (pg, "eventcast")
    assert where(log_url="redis://r:6379/1?prefix=lg", backplane_url="nats://n:4222") == (
        "redis://r:6379/1",
        "lg",
    )
    # Nodes each with their own SQLite: the backplane's engine, which they share.
    assert where(log_url="sqlite:///e.db", backplane_url="nats://n:4222?prefix=bp") == (
        "nats://n:4222",
        "bp",
    )
    # Or where access_url says.
    assert where(access_url="redis://r:6379/2?prefix=acl") == ("redis://r:6379/2", "acl")


# -- the checks -----------------------------------------------------------------------------


async def test_access_checks_blocks_tokens_and_invalidations() -> None:
    clock = [1000.0]
    access = Access(MemoryAccessStore(), clock=lambda: clock[0])
    await access.open()
    await access.add(block("alice", expire_at=1100.0))
    await access.add(AccessEntry(kind="token", subject="jti-1"))
    await access.add(AccessEntry(kind="user_tokens", subject="bob", issued_before=900.0))
    await access.add(
        AccessEntry(kind="user_tokens", subject="carol", channel="chat:x", issued_before=950.0)
    )
    assert access.refuses("alice", None, 999.0) == codes.DISCONNECT_BLOCKED
    assert access.refuses("eve", "jti-1", 999.0) == codes.DISCONNECT_TOKEN_REVOKED
    assert access.refuses("eve", "jti-2", 999.0) is None
    assert access.refuses("bob", None, 899.0) == codes.DISCONNECT_TOKEN_REVOKED
    assert access.refuses("bob", None, None) == codes.DISCONNECT_TOKEN_REVOKED  # no iat: refused
    assert access.refuses("bob", None, 900.0) is None
    # A channel's invalidation touches that channel's subscription tokens only.
    assert access.refuses("carol", None, 900.0) is None
    assert access.refuses("carol", None, 900.0, "chat:x") == codes.DISCONNECT_TOKEN_REVOKED
    assert access.refuses("carol", None, 960.0, "chat:x") is None
    # A block is about connecting, not about a channel's token.
    assert access.refuses("alice", None, 999.0, "chat:x") is None
    # Anonymous connections are nobody's: never blocked or invalidated.
    assert not access.blocked("")
    assert not access.invalidated("", None)
    clock[0] = 1100.0  # the block expired
    assert access.refuses("alice", None, 999.0) is None
    await access.remove(("token", "jti-1", ""))
    assert access.refuses("eve", "jti-1", 999.0) is None


async def test_a_reload_keeps_what_the_control_channel_said_meanwhile() -> None:
    store = MemoryAccessStore()
    access = Access(store)
    await access.open()
    await store.put(block("from-store"))

    class Slow(MemoryAccessStore):
        async def load(self, now: float) -> list[AccessEntry]:
            loaded = await store.load(now)
            # While the store is read, another node changes it and says so.
            await store.put(block("learnt"))
            access.learn(block("learnt"))
            await store.remove(("block", "from-store", ""))
            access.forget(("block", "from-store", ""))
            return loaded

    access.store = Slow()
    # "learnt" was enforced when learnt, "from-store" was removed meanwhile: nothing new.
    assert await access.reload() == []
    assert {e.subject for e in access.entries()} == {"learnt"}
    # What another node stored and the control channel did not say is new to a reload.
    access.store = store
    await store.put(block("other"))
    assert [e.subject for e in await access.reload()] == ["other"]
    assert await access.reload() == []


async def test_access_keeps_a_bounded_number_of_entries() -> None:
    clock = [1000.0]
    access = Access(MemoryAccessStore(), max_entries=2, clock=lambda: clock[0])
    await access.add(block("a", expire_at=1010.0))
    await access.add(block("b"))
    await access.add(block("b", expire_at=2000.0))  # a replacement takes no room
    with pytest.raises(CommandError) as refused:
        await access.add(block("c"))
    assert refused.value.code == codes.ERROR_LIMIT_EXCEEDED.code
    clock[0] = 1020.0  # "a" expired: its room is free again
    await access.add(block("c"))
    assert {e.subject for e in access.entries()} == {"b", "c"}
    with pytest.raises(ConfigurationError):
        Access(MemoryAccessStore(), max_entries=0)


async def test_a_store_that_fails_keeps_what_the_node_knows() -> None:
    class Broken(MemoryAccessStore):
        async def load(self, now: float) -> list[AccessEntry]:
            raise LogError("the database is gone")

    access = Access(MemoryAccessStore())
    await access.add(block("alice"))
    access.store = Broken()
    with pytest.raises(LogError):
        await access.reload()
    assert access.blocked("alice")


# -- one node ---------------------------------------------------------------------------------


async def test_a_block_outlives_a_restart_in_the_sqlite_log(
    start_hub: StartHub, tmp_path: Path
) -> None:
    log_url = f"sqlite:///{tmp_path}/kept/events.db"
    first = await start_hub(log_url=log_url)
    assert await first.api("block_user", user="mallory") == {}
    assert await first.api("revoke_token", uid="jti-9", expire_at=int(time.time()) + 60) == {}
    await first.hub.close()
    second = await start_hub(log_url=log_url)
    assert second.hub.cluster.access.blocked("mallory")
    for connect_token, closed in (
        (token("mallory"), (3503, "blocked")),
        (token("trent", token_id="jti-9"), (3500, "token revoked")),
    ):
        client = await RawClient.open(second.ws_url)
        await client.command("connect", {"token": connect_token})
        assert await client.closed() == closed
    assert await second.api("unblock_user", user="mallory") == {}
    async with await RawClient.open(second.ws_url) as client:
        await client.connect(token("mallory"))


async def test_the_api_checks_its_arguments(start_hub: StartHub) -> None:
    server = await start_hub()
    past = int(time.time()) - 10
    for method, params, message in (
        ("block_user", {}, "user required"),
        ("block_user", {"user": "a", "expire_at": past}, "expire_at must be in the future"),
        ("block_user", {"user": "a", "expire_at": "soon"}, "expire_at must be a Unix time"),
        ("revoke_token", {"expire_at": 10**10}, "uid required"),
        ("invalidate_user_tokens", {"user": "a", "channel": "bad channel"}, "channel"),
        ("invalidate_user_tokens", {"user": "a", "issued_before": True}, "issued_before"),
        ("refresh", {"user": "a", "expired": "yes"}, "expired must be a boolean"),
        ("refresh", {"client": "c"}, "user required"),
        ("disconnect", {"user": "a", "whitelist": "c1"}, "whitelist must be a list"),
        ("disconnect", {"user": "a", "disconnect": {"code": 200}}, "3000-4999"),
        ("disconnect", {"user": "a", "disconnect": {"reason": "é" * 62}}, "123 bytes"),
        ("channels", {"pattern": "[unclosed"}, "malformed pattern"),
        ("channels", {"pattern": "x" * 2000}, "pattern too long"),
    ):
        response = await server.call(method, params)
        assert response.status_code == 200, (method, response.text)
        error = response.json()["error"]
        assert error["code"] == 107, (method, error)
        assert message in error["message"], (method, error)
