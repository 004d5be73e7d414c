"""The sans-I/O client session, byte by byte: no event loop, no socket."""

from __future__ import annotations

import json

import pytest

from eventcast.protocol.client import (
    ClientSession,
    ClientState,
    DisconnectReceived,
    JoinReceived,
    LeaveReceived,
    MessageReceived,
    PingReceived,
    PublicationReceived,
    ReplyReceived,
    SubscribedPush,
    UnsubscribedPush,
)
from eventcast.protocol.codec import ProtocolError
from eventcast.protocol.frames import ConnectResult, HistoryResult, SubscribeResult

CONNECTED = b'{"id":1,"connect":{"client":"c1","version":"x","ping":25,"pong":true}}'


def lines(data: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in data.split(b"\n")]


def connected() -> ClientSession:
    session = ClientSession()
    session.connect(token="t")
    session.data_to_send()
    session.receive(CONNECTED)
    return session


def test_connect_command_and_reply() -> None:
    session = ClientSession()
    assert session.data_to_send() == b""
    command_id = session.connect(token="tok", name="python", version="1.0")
    assert command_id == 1
    assert session.state is ClientState.CONNECTING
    assert session.data_to_send() == (
        b'{"id":1,"connect":{"token":"tok","name":"python","version":"1.0"}}'
    )
    [event] = session.receive(CONNECTED)
    assert isinstance(event, ReplyReceived)
    assert (event.id, event.method, event.error) == (1, "connect", None)
    assert isinstance(event.result, ConnectResult)
    assert (event.result.client, event.result.ping, event.result.pong) == ("c1", 25, True)
    assert session.state is ClientState.CONNECTED
    assert session.connect_result is event.result


def test_connect_error_reply() -> None:
    session = ClientSession()
    session.connect(token="old")
    [event] = session.receive(b'{"id":1,"error":{"code":109,"message":"token expired"}}')
    assert isinstance(event, ReplyReceived)
    assert event.error is not None
    assert (event.error.code, event.error.message) == (109, "token expired")
    assert event.result is None
    assert session.state is ClientState.DISCONNECTED


def test_ids_increase_and_every_command_encodes() -> None:
    session = connected()
    ids = [
        session.subscribe("news.a"),
        session.unsubscribe("news.a"),
        session.publish("news.a", b'{"n":1}'),
        session.history("news.a", limit=5, since=(3, "ep"), reverse=True),
        session.presence("room:x"),
        session.presence_stats("room:x"),
        session.rpc("echo", b"[1,2]"),
        session.refresh("new-token"),
        session.sub_refresh("priv:x", "sub-token"),
    ]
    assert ids == list(range(2, 11))
    session.send(b'{"hello":true}')
    session.pong()
    assert lines(session.data_to_send()) == [
        {"id": 2, "subscribe": {"channel": "news.a"}},
        {"id": 3, "unsubscribe": {"channel": "news.a"}},
        {"id": 4, "publish": {"channel": "news.a", "data": {"n": 1}}},
        {
            "id": 5,
            "history": {
                "channel": "news.a",
                "limit": 5,
                "since": {"offset": 3, "epoch": "ep"},
                "reverse": True,
            },
        },
        {"id": 6, "presence": {"channel": "room:x"}},
        {"id": 7, "presence_stats": {"channel": "room:x"}},
        {"id": 8, "rpc": {"data": [1, 2], "method": "echo"}},
        {"id": 9, "refresh": {"token": "new-token"}},
        {"id": 10, "sub_refresh": {"channel": "priv:x", "token": "sub-token"}},
        {"send": {"data": {"hello": True}}},
        {},
    ]
    assert session.pending == frozenset(range(2, 11))
    assert session.data_to_send() == b""


def test_raw_data_is_embedded_byte_for_byte() -> None:
    session = connected()
    session.publish("a", b'{"z":1,  "a":[1.50]}')
    assert (
        session.data_to_send() == b'{"id":2,"publish":{"channel":"a","data":{"z":1,  "a":[1.50]}}}'
    )


def test_several_replies_in_one_frame_and_publications() -> None:
    session = connected()
    sub_id = session.subscribe("news.a")
    history_id = session.history("news.a", limit=1)
    session.data_to_send()
    frame = b"\n".join(
        [
            b'{"id":%d,"subscribe":{"recoverable":true,"epoch":"E","offset":4,"positioned":true}}'
            % sub_id,
            b'{"push":{"channel":"news.a","pub":{"data":{"n":5},"offset":5,"tags":{"k":"v"}}}}',
            b'{"id":%d,"history":{"epoch":"E","offset":5,"publications":[{"data":1,"offset":5}]}}'
            % history_id,
            b"{}",
        ]
    )
    events = session.receive(frame)
    assert [type(e) for e in events] == [
        ReplyReceived,
        PublicationReceived,
        ReplyReceived,
        PingReceived,
    ]
    sub_reply, pub, history, _ = events
    assert isinstance(sub_reply, ReplyReceived)
    assert isinstance(sub_reply.result, SubscribeResult)
    assert isinstance(pub, PublicationReceived)
    assert (pub.channel, pub.publication.offset, bytes(pub.publication.data)) == (
        "news.a",
        5,
        b'{"n":5}',
    )
    assert pub.publication.tags == {"k": "v"}
    assert isinstance(history, ReplyReceived)
    assert isinstance(history.result, HistoryResult)
    assert session.position("news.a") == (5, "E")
    # The pong was queued because the connect result asked for pongs.
    assert session.data_to_send() == b"{}"


def test_ping_without_pong_requested_is_not_answered() -> None:
    session = ClientSession()
    session.connect()
    session.data_to_send()
    session.receive(b'{"id":1,"connect":{"client":"c","ping":25}}')
    assert session.receive(b"{}") == [PingReceived()]
    assert session.data_to_send() == b""


def test_resubscribe_recovers_from_the_tracked_position_and_drops_duplicates() -> None:
    session = connected()
    first = session.subscribe("news.a", recover=True)  # no position yet: a plain subscribe
    assert lines(session.data_to_send()) == [{"id": first, "subscribe": {"channel": "news.a"}}]
    session.receive(
        b'{"id":%d,"subscribe":{"recoverable":true,"epoch":"E","offset":2,"positioned":true}}'
        % first
    )
    session.receive(b'{"push":{"channel":"news.a","pub":{"data":3,"offset":3}}}')
    assert session.position("news.a") == (3, "E")

    assert session.connection_lost() == []
    assert session.state is ClientState.DISCONNECTED
    session.connect()
    session.data_to_send()
    session.receive(b'{"id":%d,"connect":{"client":"c2"}}' % (first + 1))
    again = session.subscribe("news.a", recover=True)
    assert lines(session.data_to_send()) == [
        {
            "id": again,
            "subscribe": {"channel": "news.a", "recover": True, "epoch": "E", "offset": 3},
        }
    ]
    reply = (
        b'{"id":%d,"subscribe":{"recoverable":true,"epoch":"E","offset":5,"positioned":true,'
        b'"recovered":true,"was_recovering":true,'
        b'"publications":[{"data":3,"offset":3},{"data":4,"offset":4},{"data":5,"offset":5}]}}'
        % again
    )
    live = b'{"push":{"channel":"news.a","pub":{"data":5,"offset":5}}}'
    events = session.receive(reply + b"\n" + live)
    pubs = [e for e in events if isinstance(e, PublicationReceived)]
    # Offset 3 was already seen; the live 5 duplicates the replayed 5.
    assert [(p.publication.offset, p.recovered) for p in pubs] == [(4, True), (5, True)]
    assert session.duplicates == 2
    assert session.position("news.a") == (5, "E")


def test_explicit_since_wins_and_unrecovered_result_resets_the_position() -> None:
    session = connected()
    command_id = session.subscribe("news.a", recover=True, since=(1, "bad"))
    assert lines(session.data_to_send()) == [
        {
            "id": command_id,
            "subscribe": {"channel": "news.a", "recover": True, "epoch": "bad", "offset": 1},
        }
    ]
    session.receive(
        b'{"id":%d,"subscribe":{"recoverable":true,"epoch":"E","offset":9,"positioned":true,'
        b'"was_recovering":true}}' % command_id
    )
    assert session.position("news.a") == (9, "E")


def test_live_subscriptions_are_not_positioned() -> None:
    session = connected()
    command_id = session.subscribe("live.>", recover=True)
    session.receive(b'{"id":%d,"subscribe":{}}' % command_id)
    events = session.receive(
        b'{"push":{"channel":"live.>","pub":{"data":1,"channel":"live.x","tags":{"topic":"live.x"}}}}'
    )
    [pub] = events
    assert isinstance(pub, PublicationReceived)
    assert (pub.channel, pub.publication.channel) == ("live.>", "live.x")
    assert session.position("live.>") is None


def test_pushes() -> None:
    session = connected()
    frame = b"\n".join(
        [
            b'{"push":{"channel":"r","join":{"info":{"user":"u","client":"c"}}}}',
            b'{"push":{"channel":"r","leave":{"info":{"user":"u","client":"c"}}}}',
            b'{"push":{"channel":"r","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}',
            b'{"push":{"channel":"s","unsubscribe":{"code":2500,"reason":"insufficient state"}}}',
            b'{"push":{"channel":"t","subscribe":{"epoch":"E","offset":2,"positioned":true}}}',
            b'{"push":{"message":{"data":{"hi":1}}}}',
            b'{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}',
            b'{"push":{"refresh":{"expires":true,"ttl":5}}}',
        ]
    )
    events = session.receive(frame)
    assert len(events) == 7
    join, leave, gone, back, subscribed, message, disconnect = events
    assert isinstance(join, JoinReceived)
    assert (join.channel, join.info.user, join.info.client) == ("r", "u", "c")
    assert isinstance(leave, LeaveReceived)
    assert leave.info.client == "c"
    assert gone == UnsubscribedPush("r", 2000, "server unsubscribe")
    assert not gone.resubscribe
    assert isinstance(back, UnsubscribedPush)
    assert back.resubscribe
    assert isinstance(subscribed, SubscribedPush)
    assert session.position("t") == (2, "E")
    assert message == MessageReceived(b'{"hi":1}')
    assert disconnect == DisconnectReceived(3001, "shutdown")


def test_late_and_unknown_replies_are_ignored() -> None:
    session = connected()
    command_id = session.publish("a", b"1")
    session.forget(command_id)
    assert session.receive(b'{"id":%d,"publish":{}}' % command_id) == []
    assert session.receive(b'{"id":999,"publish":{}}') == []


def test_connection_lost_returns_unanswered_commands() -> None:
    session = connected()
    a = session.publish("a", b"1")
    b = session.history("a")
    session.receive(b'{"id":%d,"publish":{}}' % a)
    assert session.connection_lost() == [b]
    assert session.pending == frozenset()
    assert session.data_to_send() == b""


def test_publish_reply_without_result_is_accepted() -> None:
    session = connected()
    command_id = session.publish("a", b"1")
    [event] = session.receive(b'{"id":%d}' % command_id)
    assert event == ReplyReceived(command_id, "publish", None)


@pytest.mark.parametrize(
    "frame",
    [
        b"not json",
        b"[1,2,3]",
        b'{"id":"one"}',
        b'{"push":{"channel":5}}',
        b'{"push":{"pub":{"offset":"x"}}}',
        b"\xff\xfe",
        b'{"error":{"code":100,"message":"no id"}}',
        b'{"id":1,"connect":{}}\n{"id":',
    ],
)
def test_garbage_raises_protocol_error_only(frame: bytes) -> None:
    session = ClientSession()
    session.connect()
    with pytest.raises(ProtocolError):
        session.receive(frame)


def test_a_connect_reply_without_result_is_a_protocol_error() -> None:
    session = ClientSession()
    session.connect()
    with pytest.raises(ProtocolError, match="connect"):
        session.receive(b'{"id":1}')


def test_server_side_subscriptions_are_resumed_on_the_next_connect() -> None:
    session = ClientSession()
    session.connect(token="t")
    session.data_to_send()
    reply = {
        "id": 1,
        "connect": {
            "client": "c1",
            "subs": {"news": {"recoverable": True, "epoch": "E", "offset": 4}},
        },
    }
    _, subscribed = session.receive(json.dumps(reply).encode())
    assert isinstance(subscribed, SubscribedPush)
    assert (subscribed.channel, subscribed.result.offset) == ("news", 4)
    assert session.server_side == {"news"}
    # A push moves the position; a pushed subscription is server-side too.
    pub = {"push": {"channel": "news", "pub": {"data": {"n": 5}, "offset": 5}}}
    push = {"push": {"channel": "late", "subscribe": {"epoch": "L", "offset": 1}}}
    session.receive(json.dumps(pub).encode() + b"\n" + json.dumps(push).encode())
    assert session.server_side == {"news", "late"}

    session.connection_lost()
    session.connect(token="t")
    [command] = lines(session.data_to_send())
    assert command["connect"]["subs"] == {  # type: ignore[index]
        "late": {"recover": True, "epoch": "L", "offset": 1},
        "news": {"recover": True, "epoch": "E", "offset": 5},
    }
    # The hub resumes "news" (one missed publication, one already seen); "late" is gone.
    reply = {
        "id": 2,
        "connect": {
            "client": "c2",
            "subs": {
                "news": {
                    "recoverable": True,
                    "epoch": "E",
                    "offset": 6,
                    "recovered": True,
                    "was_recovering": True,
                    "publications": [{"data": 5, "offset": 5}, {"data": 6, "offset": 6}],
                }
            },
        },
    }
    _, subscribed, recovered = session.receive(json.dumps(reply).encode())
    assert isinstance(subscribed, SubscribedPush)
    assert subscribed.result.recovered
    assert isinstance(recovered, PublicationReceived)
    assert (recovered.publication.offset, recovered.recovered) == (6, True)
    assert session.duplicates == 1
    assert session.server_side == {"news"}
    assert session.position("late") is None
    gone = {"push": {"channel": "news", "unsubscribe": {"code": 2000, "reason": "x"}}}
    session.receive(json.dumps(gone).encode())
    assert session.server_side == frozenset()
