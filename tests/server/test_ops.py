"""Operations endpoints: ``/metrics`` after real traffic, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import StartHub
from .hubtools import WAIT, RawClient, token
from .opstools import Samples, sample, scrape


def ws(samples: Samples, name: str) -> float:
    return sample(samples, name, transport="websocket")


async def test_metrics_move_with_traffic(start_hub: StartHub) -> None:
    server = await start_hub()
    before = await scrape(server.base)
    assert ws(before, "eventcast_connections") == 0
    assert sample(before, "eventcast_publications_total") == 0
    assert sample(before, "eventcast_log_append_seconds_count") == 0

    channel = "news.metrics"
    reader = await RawClient.open(server.ws_url)
    await reader.connect(token("alice"))
    first = await reader.subscribe(channel)
    leaver = await RawClient.open(server.ws_url)
    leaver_id = (await leaver.connect(token("bob")))["client"]
    await leaver.subscribe(channel)

    for n in range(3):
        await server.publish(channel, {"n": n})
    for client in (reader, leaver):
        assert [(await client.publication())["pub"]["data"] for _ in range(3)] == [
            {"n": 0},
            {"n": 1},
            {"n": 2},
        ]
    # One recovery that works and one that cannot (an epoch the log never had).
    recovering = await RawClient.open(server.ws_url)
    await recovering.connect(token("carol"))
    ok = await recovering.subscribe(channel, recover=True, epoch=first["epoch"], offset=1)
    assert ok["recovered"] is True
    assert [p["data"] for p in ok["publications"]] == [{"n": 1}, {"n": 2}]
    failed = await recovering.subscribe("news.other", recover=True, epoch="nope", offset=5)
    assert not failed.get("recovered", False)
    # An API error, and a server-side disconnect with a code.
    assert (await server.call("publish", {"channel": "nope:x", "data": {}})).json()["error"][
        "code"
    ] == 102
    await server.api("disconnect", user="bob", disconnect={"code": 4321, "reason": "bye"})
    assert await leaver.closed() == (4321, "bye")

    during = await scrape(server.base)
    assert ws(during, "eventcast_connections") == 2
    assert sample(during, "eventcast_connections", transport="sse") == 0
    assert sample(during, "eventcast_subscriptions") == 3  # reader 1, recovering 2
    assert sample(during, "eventcast_channels") == 2
    assert sample(during, "eventcast_publications_total") == 3
    assert sample(during, "eventcast_disconnects_total", code="4321", reason="") == 1
    assert sample(during, "eventcast_recoveries_total", result="ok") == 1
    assert sample(during, "eventcast_recoveries_total", result="failed") == 1
    assert sample(during, "eventcast_api_calls_total", method="publish", result="ok") == 3
    assert sample(during, "eventcast_api_calls_total", method="publish", result="error") == 1
    assert sample(during, "eventcast_api_calls_total", method="disconnect", result="ok") == 1
    assert sample(during, "eventcast_log_append_seconds_count") == 3
    assert sample(during, "eventcast_log_append_seconds_bucket", le="+Inf") == 3
    assert sample(during, "eventcast_log_append_seconds_sum") > 0
    # Each client got at least its connect reply, subscribe replies and 3 publications
    # (several may share a frame, so messages are counted, not frames).
    sent = ws(during, "eventcast_messages_sent_total")
    assert sent >= 2 * (2 + 3) + 3
    assert ws(during, "eventcast_bytes_sent_total") > ws(before, "eventcast_bytes_sent_total")
    received = ws(during, "eventcast_messages_received_total")
    assert received >= 2 + 2 + 3  # connect and subscribe frames of the three clients
    assert ws(during, "eventcast_bytes_received_total") > 0
    assert sample(during, "eventcast_backplane_up") == 1

    # A client that goes away takes nothing out of the counters.
    await reader.close()
    await recovering.close()
    for conn in list(server.hub.connections.values()):
        await conn.wait_closed()
    after = await scrape(server.base)
    assert ws(after, "eventcast_connections") == 0
    assert sample(after, "eventcast_subscriptions") == 0
    assert ws(after, "eventcast_messages_sent_total") >= sent
    assert ws(after, "eventcast_messages_received_total") >= received
    assert (
        sample(after, "eventcast_disconnects_total", code="3000", reason="connection closed") == 2
    )
    assert sample(after, "eventcast_api_calls_total", method="disconnect", result="ok") == 1
    assert leaver_id not in server.hub.connections


async def test_metrics_count_unknown_api_methods_without_a_label_per_name(
    start_hub: StartHub,
) -> None:
    server = await start_hub()
    for name in ("no_such_method", "another_one"):
        assert (await server.call(name, {})).status_code == 404
    samples = await scrape(server.base)
    assert sample(samples, "eventcast_api_calls_total", method="unknown", result="error") == 2
    assert not any(dict(labels).get("method") == "no_such_method" for _, labels in samples)


# -- readiness -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, so the test can fill it up (needs the right to mount: root)."""
    directory = tmp_path / "small-disk"
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; return it."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012 - until full
            while True:
                os.write(fd, chunk)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC
    return filler


async def get(base: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        return await http.get(f"{base}{path}")


async def test_health_and_readiness_follow_the_log(small_disk: Path, start_hub: StartHub) -> None:
    server = await start_hub(log_url=f"sqlite:///{small_disk}/events.db")
    healthz = await get(server.base, "/healthz")
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    readyz = await get(server.base, "/readyz")
    assert (readyz.status_code, readyz.json()) == (200, {"status": "ok"})
    client = await RawClient.open(server.ws_url)
    await client.connect(token("alice"))
    await client.subscribe("news.ready")
    await server.publish("news.ready", {"n": 1})
    assert (await client.publication())["pub"]["data"] == {"n": 1}

    # The disk fills up: the log cannot commit, the node is not ready, but alive.
    filler = fill(small_disk)
    readyz = await get(server.base, "/readyz")
    assert readyz.status_code == 503
    assert readyz.json() == {"status": "unavailable", "problems": {"log": "LogError"}}
    assert (await get(server.base, "/healthz")).status_code == 200
    failed = (await server.call("publish", {"channel": "news.ready", "data": {"n": 2}})).json()
    assert failed["error"]["code"] == 100

    # Space again: ready again, and durable publishing works.
    filler.unlink()
    readyz = await get(server.base, "/readyz")
    assert (readyz.status_code, readyz.json()) == (200, {"status": "ok"})
    assert (await server.publish("news.ready", {"n": 3}))["offset"] == 2
    push = await client.publication()
    assert (push["pub"]["data"], push["pub"]["offset"]) == ({"n": 3}, 2)
    await client.close()


async def test_readyz_is_unavailable_while_shutting_down(start_hub: StartHub) -> None:
    server = await start_hub()
    client = await RawClient.open(server.ws_url)
    await client.connect(token("alice"))
    await server.hub.begin_shutdown(grace=WAIT)
    assert await client.closed() == (3001, "shutdown")
    readyz = await get(server.base, "/readyz")
    assert readyz.status_code == 503
    assert readyz.json()["problems"] == {"hub": "shutting down"}
    assert (await get(server.base, "/healthz")).status_code == 200
