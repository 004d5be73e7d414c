"""Bad input and faults around the backplane: wrong URLs, unreachable engines, dropped
connections, undecodable messages, and a log that fails while the backplane is up."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from eventcast import Bus, Namespace
from eventcast.exceptions import BackplaneError, ConfigurationError, LogError
from eventcast.log.postgres import PostgresLog
from tests.server.hubtools import WAIT, free_port

from .conftest import PrivateRedis, drop_redis_keys, unique, until, write_node_config
from .tools import assert_exact

pytestmark = [pytest.mark.slow]

DURABLE = {"": Namespace(history_size=1000)}


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``eventcast serve`` expecting it to stop by itself (it fails at start)."""
    port = str(free_port())
    return subprocess.run(
        [sys.executable, "-m", "eventcast", "serve", "--port", port, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _closed_port() -> int:
    """A port nothing listens on (bound, never listening, so no one else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _closed_sockets.append(sock)
    port: int = sock.getsockname()[1]
    return port


_closed_sockets: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _release_closed_ports() -> object:
    yield
    while _closed_sockets:
        _closed_sockets.pop().close()


# -- configuration and start --------------------------------------------------------------


def test_a_wrong_backplane_scheme_is_one_clear_line_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown backplane URL scheme 'bogus'"):
        Bus(backplane="bogus://127.0.0.1:1")
    config = write_node_config(
        tmp_path / "node.toml",
        backplane_url="bogus://127.0.0.1:1",
        log_url=f"sqlite:///{tmp_path}/events.db",
    )
    result = _serve(config)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: unknown backplane URL scheme 'bogus'"), lines


@pytest.mark.parametrize("scheme", ["redis", "nats"])
async def test_an_unreachable_backplane_is_a_backplane_error_at_start(scheme: str) -> None:
    port = _closed_port()
    bus = Bus(backplane=f"{scheme}://127.0.0.1:{port}?prefix={unique('bp')}")
    if scheme == "nats":
        assert bus.backplane is not None
        bus.backplane.connect_timeout = 1.0  # type: ignore[attr-defined]
    with pytest.raises(BackplaneError, match="cannot reach"):
        await bus.start()
    await bus.close()


def test_serve_with_an_unreachable_backplane_exits_with_a_clear_error(tmp_path: Path) -> None:
    port = _closed_port()
    config = write_node_config(
        tmp_path / "node.toml",
        backplane_url=f"redis://127.0.0.1:{port}/0?prefix={unique('bp')}",
        log_url=f"sqlite:///{tmp_path}/events.db",
    )
    result = _serve(config)
    assert result.returncode != 0, result
    assert "cannot reach Redis" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.postgres
def test_serve_with_an_unreachable_log_exits_with_a_clear_error(
    tmp_path: Path, redis_service: str
) -> None:
    port = _closed_port()
    prefix = unique("bp")
    config = write_node_config(
        tmp_path / "node.toml",
        backplane_url=f"{redis_service}?prefix={prefix}",
        log_url=f"postgresql://postgres@127.0.0.1:{port}/test?schema={unique('s')}",
    )
    try:
        result = _serve(config)
    finally:
        drop_redis_keys(redis_service, prefix)
    assert result.returncode != 0, result
    assert "event log could not open" in result.stderr
    assert f"port {port} failed" in result.stderr
    assert "Traceback" not in result.stderr


# -- faults while running -------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_dropped_subscriber_connection_reconnects_and_catches_up(
    private_redis: PrivateRedis, pg_log_url: str
) -> None:
    url = f"{private_redis.url}?prefix={unique('bp')}"
    async with (
        Bus(log=pg_log_url, namespaces=DURABLE, backplane=url) as a,
        Bus(log=pg_log_url, namespaces=DURABLE, backplane=url) as b,
    ):
        assert b.backplane is not None
        sub = b.subscribe("drop.topic")
        await until(lambda: "drop.topic" in b.backplane.filters, "b's subscription")
        await until(lambda: _subscribers(private_redis) >= 2, "two pub/sub connections")
        acked = []
        for n in range(1, 61):
            acked.append((await a.publish("drop.topic", {"n": n})).offset)
            if n == 20:
                # Cut every pub/sub connection while messages are in flight.
                client = private_redis.client()
                try:
                    killed = client.client_kill_filter(_type="pubsub")
                finally:
                    client.close()
                assert killed >= 2
        final = await a.publish("drop.topic", {"n": "final"})
        got: list[int] = []
        while not got or got[-1] < (final.offset or 0):
            event = await asyncio.wait_for(sub.get(), WAIT)
            got.append(event.offset or 0)
        assert_exact(got, 1, final.offset or 0, "after the connection was cut")
        assert set(acked) <= set(got)


def _subscribers(server: PrivateRedis) -> int:
    client = server.client()
    try:
        return len(client.client_list(_type="pubsub"))
    finally:
        client.close()


@pytest.mark.redis
async def test_undecodable_backplane_messages_are_counted_logged_and_skipped(
    redis_service: str, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = unique("bp")
    url = f"{redis_service}?prefix={prefix}"
    try:
        async with Bus(backplane=url) as a, Bus(backplane=url) as b:
            assert b.backplane is not None
            sub = b.subscribe("garbage.topic")
            await until(lambda: "garbage.topic" in b.backplane.filters, "b's subscription")
            raw = redis.Redis.from_url(redis_service)
            try:
                for payload in (b"\xff\xfe not json", b'["node",0]', b"{}"):
                    assert raw.publish(f"{prefix}:garbage.topic", payload) >= 1
            finally:
                raw.close()
            a.publish_nowait("garbage.topic", {"ok": 1})
            event = await asyncio.wait_for(sub.get(), WAIT)
            assert event.data == {"ok": 1}
            assert b.backplane_stats["undecodable"] == 3
            assert sub.buffered == 0
            skipped = [
                r for r in caplog.records if "skipping a backplane message" in r.getMessage()
            ]
            assert len(skipped) == 3
            assert all(r.levelno == logging.WARNING for r in skipped)
            a.publish_nowait("garbage.topic", {"ok": 2})
            assert (await asyncio.wait_for(sub.get(), WAIT)).data == {"ok": 2}
    finally:
        drop_redis_keys(redis_service, prefix)


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_failing_log_publishes_nothing_on_any_node(
    redis_service: str, pg_log_url: str
) -> None:
    prefix = unique("bp")
    url = f"{redis_service}?prefix={prefix}"
    broken = PostgresLog(pg_log_url)
    try:
        async with (
            Bus(log=broken, namespaces=DURABLE, backplane=url) as a,
            Bus(log=pg_log_url, namespaces=DURABLE, backplane=url) as b,
        ):
            assert b.backplane is not None
            on_a = a.subscribe("fail.topic")
            on_b = b.subscribe("fail.topic")
            await until(lambda: "fail.topic" in b.backplane.filters, "b's subscription")
            first = await a.publish("fail.topic", {"n": 1})
            assert first.offset == 1
            assert (await asyncio.wait_for(on_a.get(), WAIT)).offset == 1
            assert (await asyncio.wait_for(on_b.get(), WAIT)).offset == 1

            # The log of node A breaks: its pool is gone under it.
            pool = broken._pool
            assert pool is not None
            await pool.close()
            with pytest.raises(LogError):
                await a.publish("fail.topic", {"n": "lost"})
            assert a.backplane is not None
            sent = a.backplane.sent

            # Node B still publishes; it is the next thing everyone sees.
            second = await b.publish("fail.topic", {"n": 2})
            assert second.offset == 2
            for sub in (on_a, on_b):
                event = await asyncio.wait_for(sub.get(), WAIT)
                assert (event.offset, event.data) == (2, {"n": 2})
                assert sub.buffered == 0
            assert a.backplane.sent == sent  # nothing of the failed publish went out
    finally:
        drop_redis_keys(redis_service, prefix)
