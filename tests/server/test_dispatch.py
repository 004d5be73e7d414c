"""A channel's dispatcher is a callback run at the end of the loop turn, not a task.

These run against an in-process hub, so the publications of one test step all
land in one loop turn, as a burst from one API call or one client frame does.
"""

from __future__ import annotations

import logging

import pytest

from eventcast.server import channels as channels_module
from eventcast.server.fanout import Batch

from .hubtools import HubServer, RawClient, token


async def test_a_burst_larger_than_one_dispatch_arrives_whole_and_in_order(
    hub: HubServer,
) -> None:
    """More events in one turn than one dispatch takes: the rest follow in the next turns."""
    total = channels_module.DISPATCH_BATCH * 2 + 100
    async with (
        await RawClient.open(hub.ws_url) as member,
        await RawClient.open(hub.ws_url) as neighbour,
    ):
        await member.connect(token("burst"))
        await member.subscribe("live:dispatch.burst")
        await neighbour.connect(token("neighbour"))
        await neighbour.subscribe("live:dispatch.other")
        bus = hub.hub.bus
        # One call, no await: every event is in the channel's buffer before any dispatch.
        await bus.publish_many([("live:dispatch.burst", {"i": i}) for i in range(total)])
        await bus.publish("live:dispatch.other", {"n": 1})
        received = [(await member.publication())["pub"]["data"]["i"] for _ in range(total)]
        assert received == list(range(total))
        other = await neighbour.publication()
        assert other["pub"]["data"] == {"n": 1}
        channel = hub.hub.channels.by_name["live:dispatch.burst"]
        assert channel.publications == total
        assert not channel.queued
        assert channel.sub.buffered == 0


async def test_a_failing_dispatch_closes_its_members_and_spares_other_channels(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_payload = Batch.payload

    def payload(self: Batch, encoding: object) -> bytes:
        if self.channel == "live:dispatch.broken":
            raise RuntimeError("broken encoder")
        return real_payload(self, encoding)  # type: ignore[arg-type]

    monkeypatch.setattr(Batch, "payload", payload)
    async with (
        await RawClient.open(hub.ws_url) as member,
        await RawClient.open(hub.ws_url) as neighbour,
    ):
        await member.connect(token("broken"))
        await member.subscribe("live:dispatch.broken")
        await neighbour.connect(token("neighbour"))
        await neighbour.subscribe("live:dispatch.fine")
        bus = hub.hub.bus
        with caplog.at_level(logging.ERROR, logger="eventcast.server"):
            # Both channels are ready in the same turn: the failure of one
            # must not keep the other from its dispatch.
            await bus.publish_many(
                [("live:dispatch.broken", {"n": 1}), ("live:dispatch.fine", {"n": 1})]
            )
            code, _ = await member.closed()
            assert code == 3004  # server error: the client reconnects
            pushed = await neighbour.publication()
        assert pushed["pub"]["data"] == {"n": 1}
        failures = [r for r in caplog.records if "dispatcher of" in r.getMessage()]
        assert len(failures) == 1
        assert "live:dispatch.broken" in failures[0].getMessage()
        # The neighbour's channel keeps dispatching.
        await bus.publish("live:dispatch.fine", {"n": 2})
        assert (await neighbour.publication())["pub"]["data"] == {"n": 2}
