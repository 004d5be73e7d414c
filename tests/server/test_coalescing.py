"""Several commands in one frame get all their replies; replies and pushes may share frames."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .conftest import StartHub
from .hubtools import NAMESPACES, HubServer, RawClient, token


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


async def test_live_publications_run_at_once_and_awaited_commands_keep_the_order(
    start_hub: StartHub,
) -> None:
    # A publication into a live channel runs in the read's callback; the first
    # command that must be awaited (a durable publish, history) continues in a
    # task, and every command and message behind it waits for it: replies and
    # publications stay in the order the client sent them.
    hub = await start_hub(
        namespaces=[
            *NAMESPACES,
            {"name": "chat", "allow_subscribe_for_client": True, "allow_publish_for_client": True},
        ]
    )
    first = [
        {"id": 2, "publish": {"channel": "chat:now", "data": 1}},
        {"id": 3, "publish": {"channel": "co.kept", "data": 2}},  # durable: awaited
        {"id": 4, "publish": {"channel": "chat:now", "data": 3}},
        {"id": 5, "history": {"channel": "co.kept", "limit": 10}},
        {"id": 6, "publish": {"channel": "chat:now", "data": 4}},
    ]
    second = [{"id": 7, "publish": {"channel": "chat:now", "data": 5}}]
    async with (
        await RawClient.open(hub.ws_url) as member,
        await RawClient.open(hub.ws_url) as client,
    ):
        await member.connect(token("member"))
        await member.subscribe("chat:now")
        await client.send_raw(json.dumps({"id": 1, "connect": {"token": token("sender")}}))
        # Two messages in one write: the second arrives while the first awaits.
        await client.ws.send("\n".join(json.dumps(c) for c in first))
        await client.ws.send("\n".join(json.dumps(c) for c in second))
        replies = [await client.message() for _ in range(7)]
        pushes = [(await member.message())["push"]["pub"]["data"] for _ in range(4)]

    assert [r["id"] for r in replies] == list(range(1, 8))
    assert [r for r in replies if "error" in r] == []
    assert replies[2] == {"id": 3, "publish": {}}  # the durable one: committed before 5
    assert [p["data"] for p in replies[4]["history"]["publications"]] == [2]
    assert pushes == [1, 3, 4, 5]


async def test_a_live_publication_over_the_command_rate_is_refused_with_111(
    start_hub: StartHub,
) -> None:
    hub = await start_hub(
        command_rate=2,
        namespaces=[
            *NAMESPACES,
            {"name": "chat", "allow_subscribe_for_client": True, "allow_publish_for_client": True},
        ],
    )
    async with await RawClient.open(hub.ws_url) as client:
        await client.connect(token("eager"))
        burst = [{"id": n, "publish": {"channel": "chat:fast", "data": n}} for n in range(2, 8)]
        await client.send_raw("\n".join(json.dumps(c) for c in burst))
        replies = [await client.message() for _ in burst]
        # The connection stays open and usable: a later publication is answered.
        await asyncio.sleep(1.1)
        again = await client.request("publish", {"channel": "chat:fast", "data": "later"})

    assert [r["id"] for r in replies] == list(range(2, 8))
    codes = [r.get("error", {}).get("code") for r in replies]
    assert codes == [None, None, 111, 111, 111, 111]  # the bucket holds one second's worth
    assert "error" not in again, again
