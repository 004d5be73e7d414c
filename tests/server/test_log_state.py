"""Subscribing to channels nobody publishes to leaves nothing in the durable log (real sockets)."""

from __future__ import annotations

import contextlib
import sqlite3

from tests.server.hubtools import RawClient, token


def _streams(hub) -> list[str]:
    """The topics with a row in the hub's SQLite log, read from the file itself."""
    path = hub.settings.log_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT topic FROM ec_streams ORDER BY topic")]


async def test_subscribing_to_never_published_channels_leaves_no_rows(hub):
    # The default namespace of the test hub is durable (history 100, recovery on).
    channels = [f"never.{i}" for i in range(100)]
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(token("alice"))
        replies = [await client.subscribe(channel) for channel in channels]
        assert all(reply.get("offset", 0) == 0 and reply["epoch"] for reply in replies)
        # A second look: the same epochs (nothing was created, nothing changed).
        await client.request("unsubscribe", {"channel": channels[0]})
        again = await client.subscribe(channels[0])
        assert again["epoch"] == replies[0]["epoch"]
        assert _streams(hub) == []
        # The first publication creates the row, under the epoch the client saw,
        # and a resubscribe from (0, epoch) recovers it exactly.
        await hub.publish(channels[1], {"n": 1})
        publication = await client.publication()
        assert publication["channel"] == channels[1]
        assert publication["pub"]["offset"] == 1
    assert _streams(hub) == [channels[1]]
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(token("alice"))
        recovered = await client.subscribe(
            channels[1], recover=True, offset=0, epoch=replies[1]["epoch"]
        )
        assert recovered["recovered"] is True
        assert [p["data"] for p in recovered["publications"]] == [{"n": 1}]
