"""Several commands in one frame get all their replies; replies and pushes may share frames."""

from __future__ import annotations

import json
from typing import Any

from .hubtools import HubServer, RawClient, token


async def test_commands_in_one_frame_get_every_reply(hub: HubServer) -> None:
    commands = [
        {"id": 1, "connect": {"token": token("coalesce")}},
        {"id": 2, "subscribe": {"channel": "co.a"}},
        {"id": 3, "subscribe": {"channel": "live:co.b"}},
        {"id": 4, "publish": {"channel": "co.a", "data": {"text": "hi"}}},
        {"id": 5, "history": {"channel": "co.a", "limit": 10}},
        {"id": 6, "ping": {}},
        {"id": 7, "rpc": {"method": "nope"}},
        {"id": 8, "presence": {"channel": "co.a"}},
        {"id": 9, "unsubscribe": {"channel": "live:co.b"}},
    ]
    async with await RawClient.open(hub.ws_url) as client:
        # Blank lines and a trailing newline are allowed between commands.
        await client.send_raw("\n".join(json.dumps(c) for c in commands[:4]) + "\n\n")
        await client.send_raw("\n".join(json.dumps(c) for c in commands[4:]) + "\n")
        messages: list[dict[str, Any]] = []
        while len([m for m in messages if m.get("id")]) < len(commands):
            messages.append(await client.message())
        frames = client.frames

    replies = [m for m in messages if m.get("id")]
    assert [m["id"] for m in replies] == list(range(1, 10))
    by_id = {m["id"]: m for m in replies}
    assert by_id[1]["connect"]["client"]
    assert by_id[2]["subscribe"]["recoverable"] is True
    assert "subscribe" in by_id[3]
    assert by_id[4] == {"id": 4, "publish": {}}
    history = by_id[5]["history"]
    assert [(p["offset"], p["data"]) for p in history["publications"]] == [(1, {"text": "hi"})]
    assert by_id[6] == {"id": 6, "ping": {}}
    assert by_id[7]["error"]["code"] == 104
    assert by_id[8]["error"]["code"] == 108
    assert by_id[9] == {"id": 9, "unsubscribe": {}}
    # The client's own publication reaches it, after its subscribe reply.
    pushes = [m["push"] for m in messages if "push" in m]
    assert pushes == [{"channel": "co.a", "pub": {"data": {"text": "hi"}, "offset": 1}}]
    assert messages.index({"push": pushes[0]}) > messages.index(by_id[2])
    # Coalesced: fewer frames than messages (at most one frame per command frame,
    # plus the publication if it went out on its own).
    assert frames < len(messages)


async def test_a_burst_of_publications_arrives_in_order(hub: HubServer) -> None:
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(token("burst"))
        await client.subscribe("co.burst")
        frames_before = client.frames
        # One API call publishes 50 events: the hub may send them in few frames.
        response = await hub.call(
            "batch",
            {
                "commands": [
                    {"publish": {"channel": "co.burst", "data": {"i": i}}} for i in range(50)
                ]
            },
        )
        replies = response.json()["replies"]  # top-level, as in Centrifugo
        assert [r["publish"]["offset"] for r in replies] == list(range(1, 51))
        pubs = [await client.publication() for _ in range(50)]
        frames = client.frames - frames_before
    assert [p["pub"]["data"]["i"] for p in pubs] == list(range(50))
    assert [p["pub"]["offset"] for p in pubs] == list(range(1, 51))
    assert 1 <= frames <= 50


async def test_a_second_channel_joined_and_left_keeps_publications_in_order(
    hub: HubServer,
) -> None:
    # Publications on one channel, then on two, then on one again: nothing is
    # lost or reordered, and a reply queued before a publication goes first.
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(token("direct"))
        await client.subscribe("co.one")
        await hub.publish("co.one", {"i": 0})
        pubs = [await client.publication()]

        await client.subscribe("co.two")
        for i in range(1, 6):
            await hub.publish("co.one", {"i": i})
            await hub.publish("co.two", {"j": i})
        pubs += [await client.publication() for _ in range(10)]

        reply = await client.request("unsubscribe", {"channel": "co.two"})
        assert reply.get("unsubscribe") == {}, reply
        for i in range(6, 9):
            await hub.publish("co.one", {"i": i})
        pubs += [await client.publication() for _ in range(3)]

        # A reply queued before a publication is written before it.
        await client.send_raw(
            '{"id":100,"ping":{}}\n{"id":101,"publish":{"channel":"co.one","data":{"i":9}}}'
        )
        order: list[Any] = []
        while len(order) < 3:
            message = await client.message()
            if message.get("id") or "pub" in message.get("push", {}):
                order.append(message.get("id") or message["push"]["pub"]["data"])
        assert order.index(100) < order.index({"i": 9})

    one = [p["pub"] for p in pubs if p["channel"] == "co.one"]
    two = [p["pub"] for p in pubs if p["channel"] == "co.two"]
    assert [p["data"]["i"] for p in one] == list(range(9))
    assert [p["offset"] for p in one] == list(range(1, 10))
    assert [p["data"]["j"] for p in two] == list(range(1, 6))
