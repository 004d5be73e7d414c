"""Helpers of the scale-out tests: private servers, hub nodes as processes, clean-up.

Fault tests never touch the shared services: they start their own
``redis-server`` / ``nats-server`` on a free port, kill and restart those, and
stop them by PID. Keys, subjects and schemas carry :data:`RUN_ID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from tests.conftest import RUN_ID
from tests.server.hubtools import API_KEY, SECRET, WAIT, free_port
from tests.server.opstools import ServeProcess

_names = itertools.count()

#: Bound of every wait on an external process (a safety deadline, never a delay).
DEADLINE = 20.0


def unique(kind: str) -> str:
    """A name unique to this run and call (letters, digits and ``_``)."""
    return f"ec_{RUN_ID}_{kind}{next(_names)}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll an external process's state until ``condition()`` holds (fail past the deadline)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll (an async or sync) ``condition`` of an external process until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# -- private servers -------------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port, killed and restarted at will."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(self._answers, f"redis-server on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL: no goodbye to any client."""
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=5)


class PrivateNats:
    """A ``nats-server`` (with JetStream, for presence) of the test's own on a free port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [
                "/usr/sbin/nats-server",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(self._answers, f"nats-server on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis, started; stopped by PID afterwards."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    """A private nats-server with JetStream, started; stopped by PID afterwards."""
    if not Path("/usr/sbin/nats-server").exists():
        pytest.skip("nats-server is not installed")
    directory = tmp_path / "nats"
    directory.mkdir()
    server = PrivateNats(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- a private Redis Cluster ----------------------------------------------------------------


class RedisClusterServers:
    """A private Redis Cluster: its servers, a seed port, and who serves a slot."""

    def __init__(self, servers: list[PrivateRedis]) -> None:
        self.servers = servers

    @property
    def seed(self) -> int:
        return self.servers[0].port

    def owner(self, slot: int) -> int:
        """The port of the master serving a slot."""
        client = redis.Redis(port=self.seed)
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            client.close()
        raise AssertionError(f"slot {slot} is not served")


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise AssertionError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def redis_cluster(directory: Path) -> Iterator[RedisClusterServers]:
    """Three cluster-enabled redis-servers on free ports, joined as three masters."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli (Debian's redis-tools) are needed")
    servers: list[PrivateRedis] = []
    try:
        for i in range(3):
            node_directory = directory / f"cluster{i}"
            node_directory.mkdir()
            server = PrivateRedis(
                node_directory,
                _cluster_port(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_directory / f"nodes-{i}.conf"),
            )
            server.start()
            servers.append(server)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ready() -> bool:
            for server in servers:
                client = server.client()
                try:
                    if client.cluster("INFO").get("cluster_state") != "ok":
                        return False
                finally:
                    client.close()
            return True

        wait_until(ready, "the cluster to be ok")
        yield RedisClusterServers(servers)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A private Redis Cluster of three masters, stopped by PID afterwards."""
    with redis_cluster(tmp_path) as servers:
        yield servers


# -- shared logs ----------------------------------------------------------------------------


@pytest.fixture
def pg_log_url(postgres_service: str) -> Iterator[str]:
    """A PostgreSQL log URL on a schema of its own, dropped afterwards."""
    schema = unique("s")
    yield f"{postgres_service}?schema={schema}"
    with psycopg.connect(postgres_service, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def drop_redis_keys(url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (and ``{prefix:``) on a Redis (the shared one: ours)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        keys += list(client.scan_iter(f"{{{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_log_url(redis_service: str) -> Iterator[str]:
    """A Redis Streams log URL with a prefix of its own, deleted afterwards."""
    prefix = unique("l")
    yield f"{redis_service}?prefix={prefix}"
    drop_redis_keys(redis_service, prefix)


@pytest.fixture
async def js_log_url(nats_service: str) -> AsyncIterator[str]:
    """A JetStream log URL with a prefix of its own, whose streams are deleted afterwards."""
    from tests.log.natstools import delete_streams

    prefix = unique("l").replace("_", "-")  # "_" separates a JetStream prefix in stream names
    yield nats_service.replace("nats://", "nats+jetstream://", 1) + f"?prefix={prefix}"
    await delete_streams(nats_service, prefix)


# -- hub nodes --------------------------------------------------------------------------------

#: Namespaces of the scale-out nodes: durable with recovery and presence, and live-only.
SCALE_NAMESPACES: list[dict[str, Any]] = [
    {
        "name": "",
        "history_size": 10000,
        "history_ttl": 600,
        "allow_subscribe_for_client": True,
        "allow_history_for_client": True,
        "allow_recovery": True,
        "force_recovery": True,
        "presence": True,
        "allow_presence_for_subscriber": True,
    },
    {"name": "live", "allow_subscribe_for_client": True},
]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def write_node_config(path: Path, **settings: Any) -> Path:
    """A TOML config file of one node (the test secrets, ``settings``, the namespaces)."""
    values = {
        "token_hmac_secret": SECRET,
        "api_key": API_KEY,
        "replay_cap": 10000,
        **settings,
    }
    # Lists of tables ([[webhooks]]) go after the plain keys, as TOML wants.
    tables = {k: v for k, v in values.items() if isinstance(v, list) and v and type(v[0]) is dict}
    lines = [f"{key} = {_toml(value)}" for key, value in values.items() if key not in tables]
    for key, rows in {"namespaces": SCALE_NAMESPACES, **tables}.items():
        for row in rows:
            lines += ["", f"[[{key}]]"]
            lines += [f"{name} = {_toml(value)}" for name, value in row.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Node(ServeProcess):
    """One ``eventcast serve`` node, with HTTP API helpers."""

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    async def api(self, method: str, **params: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            response = await client.post(
                f"{self.base}/api/{method}", json=params, headers={"X-API-Key": API_KEY}
            )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert "error" not in body, body
        result: dict[str, Any] = body["result"]
        return result

    async def ready_status(self) -> int:
        async with httpx.AsyncClient(timeout=WAIT) as client:
            return (await client.get(f"{self.base}/readyz")).status_code


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start ``eventcast serve`` nodes (``await start(count, **settings)``); stop them after."""
    started: list[Node] = []

    async def start(count: int, **settings: Any) -> list[Node]:
        batch = []
        for _ in range(count):
            index = len(started)
            config = write_node_config(
                tmp_path / f"node{index}.toml", node_name=f"node-{index}", **settings
            )
            node = Node(port=free_port(), config=config)
            started.append(node)
            batch.append(node)
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in batch))
        return batch

    try:
        yield start
    finally:
        for node in started:
            if node.process is not None and node.process.poll() is None:
                node.signal(signal.SIGTERM)
        for node in started:
            if node.process is not None:
                with contextlib.suppress(Exception):
                    await node.wait(15)
                node.kill()
        for node in started:
            output = node.output()
            assert "Traceback" not in output, output
