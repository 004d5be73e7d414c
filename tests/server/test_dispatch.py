"""A channel's dispatcher is a callback run at the end of the loop turn, not a task.

These run against an in-process hub, so the publications of one test step all
land in one loop turn, as a burst from one API call or one client frame does.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from eventcast import Event
from eventcast.protocol.codec import BOUNDED_DEPTH, Shape
from eventcast.server import api as api_module, channels as channels_module
from eventcast.server.fanout import Batch

from .conftest import StartHub
from .hubtools import NAMESPACES, HubServer, RawClient, token, until


async def _member(hub: HubServer, user: str, channel: str) -> RawClient:
    """A client connected as ``user`` and subscribed to ``channel``."""
    client = await RawClient.open(hub.ws_url)
    await client.connect(token(user))
    await client.subscribe(channel)
    return client


async def test_a_burst_larger_than_one_dispatch_arrives_whole_and_in_order(
    hub: HubServer,
) -> None:
    """More events in one turn than one dispatch takes: the rest follow in the next turns."""
    total = channels_module.DISPATCH_BATCH * 2 + 100
    async with (
        await _member(hub, "burst", "live:dispatch.burst") as member,
        await _member(hub, "neighbour", "live:dispatch.other") as neighbour,
    ):
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
        await _member(hub, "broken", "live:dispatch.broken") as member,
        await _member(hub, "neighbour", "live:dispatch.fine") as neighbour,
    ):
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


async def test_a_batch_answers_every_command_in_order_whichever_path_it_takes(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publications to live channels run without a coroutine each (the first
    one too); the rest (durable, tags, bad input) the awaited way."""
    bus = hub.hub.bus
    known = bus.publish_known
    at_once: list[object] = []

    def publish_known(topic: str, data: object) -> Event | None:
        event = known(topic, data)
        if event is not None:
            at_once.append(event.data)
        return event

    monkeypatch.setattr(bus, "publish_known", publish_known)
    async with await RawClient.open(hub.ws_url) as member:
        await member.connect(token("batcher"))
        await member.subscribe("live:batch.a")
        await member.subscribe("batch.durable")
        commands: list[object] = [
            {"publish": {"channel": "live:batch.a", "data": {"n": 1}}},  # first: at once too
            {"publish": {"channel": "live:batch.a", "data": {"n": 2}}},  # known: at once
            {"publish": {"channel": "batch.durable", "data": {"n": 3}}},  # durable
            {"publish": {"channel": "live:batch.a", "data": {"n": 4}, "tags": {"k": "v"}}},
            {"publish": {"channel": "live:batch.a"}},  # no data
            {"publish": {"channel": "nowhere:x", "data": {}}},  # unknown namespace
            {"publish": {"channel": "live:bad name", "data": {}}},  # malformed
            {"publish": {"channel": "live:batch.a", "data": {"n": 5}, "idempotency_key": 7}},
            {"publish": {"channel": "live:batch.a", "data": {"n": 6}}},
            {"publish": {"channel": "live:batch.a", "data": {"n": 7}}, "extra": {}},
            "not a command",
        ]
        response = await hub.call("batch", {"commands": commands})
        assert response.status_code == 200
        replies = response.json()["replies"]
        assert replies[0] == {"publish": {}}
        assert replies[1] == {"publish": {}}
        assert replies[2] == {"publish": {"offset": 1, "epoch": replies[2]["publish"]["epoch"]}}
        assert replies[3] == {"publish": {}}
        assert replies[4]["error"]["code"] == 107
        assert replies[5]["error"]["code"] == 102
        assert replies[6]["error"]["code"] == 107
        assert replies[7]["error"]["code"] == 107
        assert replies[8] == {"publish": {}}
        assert replies[9]["error"]["code"] == 107
        assert replies[10]["error"]["code"] == 107
        assert len(replies) == len(commands)
        assert at_once == [{"n": 1}, {"n": 2}, {"n": 6}]  # the others: the awaited path
        got: list[tuple[str, int]] = []
        while len(got) < 5:
            push = await member.publication()
            got.append((push["channel"], push["pub"]["data"]["n"]))
        assert got == [
            ("live:batch.a", 1),
            ("live:batch.a", 2),
            ("batch.durable", 3),
            ("live:batch.a", 4),
            ("live:batch.a", 6),
        ]


class _Recorded:
    """A typed body decoder that notes what it decoded (the typed path was taken)."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.decoded: list[object] = []

    def decode(self, data: bytes) -> object:
        value = self.decoder.decode(data)  # raises as the real one does
        self.decoded.append(value)
        return value


def _recorded(monkeypatch: pytest.MonkeyPatch, method: str) -> tuple[_Recorded, _Recorded]:
    """Record what each form of ``method``'s shape decodes: (bounded, typed)."""
    shape = api_module._BODY_SHAPES[method]
    bounded, typed = _Recorded(shape.bounded), _Recorded(shape.typed)
    monkeypatch.setitem(api_module._BODY_SHAPES, method, Shape(bounded, typed))  # type: ignore[arg-type]
    return bounded, typed


async def test_a_batch_of_publications_alone_is_decoded_into_structs_and_answers_the_same(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body of ``publish`` commands only is decoded straight into structs (by the
    bounded form when its data nest at most BOUNDED_DEPTH levels and it names no
    other field); any other body (another method, a malformed publication) the
    plain way, command by command. All give the same replies and deliveries."""
    bounded, recorded = _recorded(monkeypatch, "batch")
    async with await RawClient.open(hub.ws_url) as member:
        await member.connect(token("typed"))
        await member.subscribe("live:typed.a")
        await member.subscribe("typed.durable")
        publications: list[object] = [
            {"publish": {"channel": "live:typed.a", "data": {"n": 1}}},
            {"publish": {"channel": "typed.durable", "data": {"n": 2}}},
            {"publish": {"channel": "live:typed.a", "data": {"n": 3}, "tags": {"k": "v"}}},
            {"publish": {"channel": "live:typed.a", "data": {"n": 4}, "idempotency_key": "k4"}},
            {"publish": {"channel": "nowhere:x", "data": {}}},  # well-formed, refused by the hub
            {"publish": {"channel": "live:typed.a", "data": None, "ignored": 1}},
        ]
        typed = await hub.call("batch", {"commands": publications})
        assert typed.status_code == 200
        assert not bounded.decoded  # (a field it does not name: "ignored")
        assert len(recorded.decoded) == 1  # the typed path
        assert type(recorded.decoded[0]).__name__ == "_PublishBatch"
        # The same publications beside a command of another method: decoded plainly.
        plain = await hub.call("batch", {"commands": [*publications, {"info": {}}]})
        assert plain.status_code == 200
        assert len(recorded.decoded) == 1
        typed_replies = typed.json()["replies"]
        plain_replies = plain.json()["replies"]
        assert len(typed_replies) == len(publications)
        assert "info" in plain_replies[-1]
        assert typed_replies[0] == plain_replies[0] == {"publish": {}}
        assert typed_replies[1]["publish"]["offset"] == 1
        assert plain_replies[1]["publish"]["offset"] == 2
        for i in (2, 3, 5):
            assert typed_replies[i] == plain_replies[i] == {"publish": {}}
        assert typed_replies[4] == plain_replies[4]
        assert typed_replies[4]["error"]["code"] == 102
        data = [(await member.publication())["pub"]["data"] for _ in range(10)]
        assert data == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, None] * 2
        # A malformed publication spoils the typed decode: the body is decoded
        # plainly and only that command is refused (msgspec says what is wrong).
        bad: list[object] = [
            {"publish": {"channel": 5, "data": {}}},
            {"publish": {"channel": "live:typed.a", "data": {"n": 6}}},
            {"publish": {"channel": "live:typed.a", "tags": {"k": 1}, "data": {}}},
            {"publish": {"channel": "live:typed.a"}},
        ]
        response = await hub.call("batch", {"commands": bad, "parallel": True})
        assert len(recorded.decoded) == 1
        replies = response.json()["replies"]
        assert replies[1] == {"publish": {}}
        assert replies[0]["error"] == {
            "code": 107,
            "message": "Expected `str`, got `int` - at `$.channel`",
        }
        assert replies[2]["error"]["code"] == 107
        assert "$.tags" in replies[2]["error"]["message"]
        assert replies[3]["error"] == {
            "code": 107,
            "message": "Object missing required field `data`",
        }
        assert (await member.publication())["pub"]["data"] == {"n": 6}
        # The same, parallel and well-formed: the bounded form.
        response = await hub.call("batch", {"commands": publications[:1], "parallel": True})
        assert response.json()["replies"] == [{"publish": {}}]
        assert len(recorded.decoded) == 1
        assert [type(b).__name__ for b in bounded.decoded] == ["_BoundedPublishBatch"]
        assert (await member.publication())["pub"]["data"] == {"n": 1}
        # All but the unknown field: bounded, with the typed path's replies and data.
        known = [*publications[:5], {"publish": {"channel": "live:typed.a", "data": None}}]
        again = await hub.call("batch", {"commands": known})
        assert len(bounded.decoded) == 2
        replies = again.json()["replies"]
        assert [replies[i] for i in (0, 2, 3, 4, 5)] == [typed_replies[i] for i in (0, 2, 3, 4, 5)]
        assert replies[1]["publish"]["offset"] == 3
        data = [(await member.publication())["pub"]["data"] for _ in range(5)]
        assert data == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, None]
        # Data nested deeper than the bounded form takes: typed.
        deep: object = {"n": 7}
        for _ in range(BOUNDED_DEPTH):
            deep = [deep]
        await hub.call(
            "batch", {"commands": [{"publish": {"channel": "live:typed.a", "data": deep}}]}
        )
        assert (await member.publication())["pub"]["data"] == deep
        assert (len(bounded.decoded), len(recorded.decoded)) == (2, 2)


async def test_publish_and_broadcast_bodies_are_decoded_into_the_same_structs(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``publish`` and ``broadcast`` take the typed decode too; a malformed body is
    decoded plainly and refused by the same structs, with the same message."""
    forms = {method: _recorded(monkeypatch, method) for method in ("publish", "broadcast")}
    recorded = {method: bounded for method, (bounded, _) in forms.items()}
    async with await RawClient.open(hub.ws_url) as member:
        await member.connect(token("shapes"))
        await member.subscribe("live:shapes.a")
        await member.subscribe("live:shapes.b")
        assert await hub.api("publish", channel="live:shapes.a", data={"n": 1}) == {}
        both = await hub.api("broadcast", channels=["live:shapes.a", "live:shapes.b"], data=2)
        assert both == {"responses": [{"result": {}}, {"result": {}}]}
        assert [len(d.decoded) for d in recorded.values()] == [1, 1]
        got = [(await member.publication())["pub"]["data"] for _ in range(3)]
        assert got == [{"n": 1}, 2, 2]
        for method, params, message in [
            ("publish", {"channel": 5, "data": 1}, "Expected `str`, got `int` - at `$.channel`"),
            ("publish", {"channel": "live:shapes.a"}, "Object missing required field `data`"),
            ("broadcast", {"channels": "live:shapes.a", "data": 1}, "Expected `array`, got `str`"),
        ]:
            response = await hub.call(method, params)
            assert response.status_code == 200
            error = response.json()["error"]
            assert error["code"] == 107
            assert error["message"].startswith(message), error
        assert [len(d.decoded) for d in recorded.values()] == [1, 1]
        # Nothing of the refused calls was published.
        assert await hub.api("publish", channel="live:shapes.b", data="after") == {}
        assert (await member.publication())["pub"]["data"] == "after"
        assert not any(typed.decoded for _, typed in forms.values())
        # A field the structs do not name (ignored): the typed form.
        assert await hub.api("publish", channel="live:shapes.b", data=3, skip_history=True) == {}
        assert (await member.publication())["pub"]["data"] == 3
        assert type(forms["publish"][1].decoded[0]).__name__ == "PublishParams"


async def test_a_channel_keeps_its_last_publication_only_while_a_member_takes_deltas(
    start_hub: StartHub,
) -> None:
    """The delta base of a channel's next batch is kept for delta members alone: held
    until the next publication, it would only keep an event alive (and cold) for nobody."""
    ticker = {"name": "ticker", "allow_subscribe_for_client": True}
    hub = await start_hub(namespaces=[*NAMESPACES, {**ticker, "allowed_delta_types": ["fossil"]}])
    channel = "ticker:keep"
    document = [{"level": level, "size": level * 10} for level in range(40)]
    async with await _member(hub, "plain", channel) as plain:
        await hub.publish(channel, {"n": 1, "depth": document})
        assert (await plain.publication())["pub"]["data"]["n"] == 1
        dispatcher = hub.hub.channels.by_name[channel]
        assert dispatcher.last_event is None  # no member needs a delta base
        async with await RawClient.open(hub.ws_url) as raw:
            await raw.connect(token("delta"))
            assert (await raw.subscribe(channel, delta="fossil"))["delta"] is True
            for n in (2, 3):
                await hub.publish(channel, {"n": n, "depth": document})
            pushes = [(await raw.publication())["pub"] for _ in range(2)]
            # The first in full (no base kept before it), the next a delta against it.
            assert [p.get("delta", False) for p in pushes] == [False, True]
            assert [(await plain.publication())["pub"]["data"]["n"] for _ in range(2)] == [2, 3]
            assert dispatcher.last_event is not None
            assert dispatcher.last_event.data == {"n": 3, "depth": document}
        await hub.publish(channel, {"n": 4, "depth": document})
        assert (await plain.publication())["pub"]["data"]["n"] == 4
        assert dispatcher.last_event is None  # the delta member left


async def test_the_node_counts_its_subscriptions_as_members_join_and_leave(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``info``'s figures are kept as clients come and go (a heartbeat reads them every
    few seconds), and agree with the channels they count: through unsubscribes,
    disconnects and a channel whose dispatcher fell behind."""
    channels = hub.hub.channels

    async def figures() -> tuple[int, int, int]:
        (node,) = (await hub.api("info"))["nodes"]
        counted = sum(len(c.members) for c in channels.by_name.values())
        assert node["num_subs"] == channels.subscriptions == counted
        return node["num_users"], node["num_channels"], node["num_subs"]

    monkeypatch.setattr(channels_module, "CHANNEL_BUFFER", 64)  # for the channel that falls behind
    async with (
        await _member(hub, "alice", "live:count.a") as alice,
        await _member(hub, "alice", "live:count.a") as alice_again,
        await _member(hub, "bob", "live:count.a") as bob,
    ):
        await alice.subscribe("live:count.b")
        await bob.subscribe("live:count.slow")
        assert await figures() == (2, 3, 5)
        reply = await alice_again.request("unsubscribe", {"channel": "live:count.a"})
        assert "error" not in reply
        await until(lambda: channels.subscriptions == 4, "the unsubscribe")
        assert await figures() == (2, 3, 4)
        # More than the channel's buffer in one call: its dispatcher falls behind and
        # its member is told to recover (the channel is dropped at once).
        await hub.hub.bus.publish_many([("live:count.slow", {"i": i}) for i in range(100)])
        code, _ = await bob.closed()
        assert code == 3010  # insufficient state: the client reconnects and recovers
        await until(lambda: "live:count.slow" not in channels.by_name, "the dropped channel")
        await until(lambda: len(hub.hub.registry.connections) == 2, "bob's disconnect")
        assert await figures() == (1, 2, 2)
        await alice.close()
        await until(lambda: channels.subscriptions == 0, "alice's disconnect")
        assert await figures() == (1, 0, 0)  # alice's other connection has no channel
    await until(lambda: not hub.hub.registry.connections, "the last disconnect")
    assert await figures() == (0, 0, 0)
