"""The Protobuf encoding, byte by byte, against the upstream schema and a real SDK's codec.

``centrifuge.protocol.client_pb2`` is the module centrifuge-python generated
from the protocol's own ``client.proto``: bytes it parses (and bytes it
produces) prove that our schema has the same field numbers and types. The
SDK's ``_ProtobufCodec`` frames commands as centrifuge-python sends them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from centrifuge import Filter
from centrifuge.codecs import _ProtobufCodec
from centrifuge.protocol import client_pb2 as upstream
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message
from hypothesis import given, settings, strategies as st

import eventcast
from eventcast.events import Event
from eventcast.protocol import codec, protobuf
from eventcast.protocol.codec import ProtocolError
from eventcast.protocol.codes import DISCONNECT_BAD_REQUEST, ERROR_BAD_REQUEST, ClientError
from eventcast.protocol.encodings import get_encoding
from eventcast.protocol.frames import (
    ClientInfo,
    Command,
    ConnectRequest,
    ConnectResult,
    FilterNode,
    HistoryResult,
    PresenceResult,
    Publication,
    PublishRequest,
    Reply,
    SubscribeRequest,
    SubscribeResult,
    raw,
)
from eventcast.protocol.session import ServerSession, SessionState
from tests import strategies

PROTOBUF = get_encoding("protobuf")


def delimited(message: bytes) -> bytes:
    return protobuf._varint(len(message)) + message


def through_upstream(cls: type[Message], message: bytes) -> bytes:
    """Parse with the upstream schema, keep only the fields it knows, serialise again."""
    fields = MessageToDict(cls.FromString(message), preserving_proto_field_name=True)
    return ParseDict(fields, cls()).SerializeToString()


def upstream_replies(frame: bytes) -> list[dict[str, object]]:
    return [
        MessageToDict(upstream.Reply.FromString(message), preserving_proto_field_name=True)
        for message in protobuf.split(frame)
    ]


# -- commands ---------------------------------------------------------------------------------


@given(st.lists(strategies.commands, min_size=1, max_size=3))
def test_commands_round_trip(commands: list[Command]) -> None:
    assert protobuf.decode_commands(protobuf.encode_commands(commands)) == commands


@given(strategies.commands)
def test_upstream_schema_reads_and_writes_our_commands(command: Command) -> None:
    (message,) = protobuf.split(protobuf.encode_command(command))
    theirs = through_upstream(upstream.Command, message)
    assert protobuf.decode_commands(delimited(theirs)) == [command]


def test_commands_as_centrifuge_python_frames_them() -> None:
    tags_filter = Filter.all(Filter.eq("ticker", "AAPL"), Filter.gte("price", "100"))
    frame = _ProtobufCodec.encode_commands(
        [
            {"id": 1, "connect": {"token": "t", "name": "python", "version": "0.7"}},
            {
                "id": 2,
                "subscribe": {
                    "channel": "prices",
                    "recover": True,
                    "offset": 7,
                    "epoch": "e",
                    "delta": "fossil",
                    "tf": tags_filter.node,
                },
            },
            {"id": 3, "publish": {"channel": "chat", "data": base64.b64encode(b"\x00\xffhi")}},
            {},
        ]
    )
    connect, subscribe, publish, pong = protobuf.decode_commands(frame)
    assert connect == Command(id=1, connect=ConnectRequest(token="t", name="python", version="0.7"))
    assert subscribe.subscribe == SubscribeRequest(
        channel="prices",
        recover=True,
        offset=7,
        epoch="e",
        delta="fossil",
        tf=FilterNode(
            op="and",
            nodes=[
                FilterNode(key="ticker", cmp="eq", val="AAPL"),
                FilterNode(key="price", cmp="gte", val="100"),
            ],
        ),
    )
    assert publish.publish == PublishRequest(channel="chat", data=raw(b"\x00\xffhi"))
    assert pong == Command()  # an empty command: the client's pong


def test_a_bare_empty_command_is_a_pong() -> None:
    assert protobuf.decode_commands(protobuf.PONG) == [Command()]
    assert protobuf.encode_command(Command()) == protobuf.PONG


# -- replies and pushes ------------------------------------------------------------------------


@given(st.data())
def test_replies_round_trip(data: st.DataObject) -> None:
    method, result = data.draw(strategies.results)
    command_id = data.draw(strategies.uint32)
    (reply,) = protobuf.decode_replies(protobuf.encode_reply(command_id, method, result))
    assert reply.id == command_id
    assert getattr(reply, method) == result


@given(st.data())
def test_upstream_schema_reads_our_replies(data: st.DataObject) -> None:
    method, result = data.draw(strategies.results)
    (message,) = protobuf.split(protobuf.encode_reply(5, method, result))
    (back,) = protobuf.decode_replies(delimited(through_upstream(upstream.Reply, message)))
    assert getattr(back, method) == result


def test_results_of_empty_methods_are_present_but_empty() -> None:
    frame = b"".join(
        protobuf.encode_reply(n, method, None)
        for n, method in enumerate(("unsubscribe", "publish", "ping"), start=1)
    )
    assert upstream_replies(frame) == [
        {"id": 1, "unsubscribe": {}},
        {"id": 2, "publish": {}},
        {"id": 3, "ping": {}},
    ]
    replies = protobuf.decode_replies(frame)
    assert [r.unsubscribe for r in replies] == [{}, None, None]


def test_a_reply_from_a_mapping_with_the_schema_names() -> None:
    frame = protobuf.encode_reply(
        4, "presence", {"presence": {"c1": {"user": "u", "client": "c1", "conn_info": b"{}"}}}
    )
    assert upstream_replies(frame) == [
        {
            "id": 4,
            "presence": {
                "presence": {
                    "c1": {
                        "user": "u",
                        "client": "c1",
                        "conn_info": base64.b64encode(b"{}").decode(),
                    }
                }
            },
        }
    ]
    (reply,) = protobuf.decode_replies(frame)
    assert reply.presence == PresenceResult(
        presence={"c1": ClientInfo(user="u", client="c1", conn_info=raw(b"{}"))}
    )


def test_a_field_missing_from_the_schema_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="no field 'nickname'"):
        protobuf.encode_reply(1, "refresh", {"nickname": "x"})
    with pytest.raises(TypeError, match="cannot encode"):
        protobuf.encode_reply(1, "refresh", 42)


def test_error_replies() -> None:
    frame = protobuf.encode_error(9, ERROR_BAD_REQUEST) + protobuf.encode_error(
        10, ClientError(111, "too many requests", temporary=True)
    )
    assert upstream_replies(frame) == [
        {"id": 9, "error": {"code": 107, "message": "bad request"}},
        {"id": 10, "error": {"code": 111, "message": "too many requests", "temporary": True}},
    ]


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        (
            "join",
            {"info": ClientInfo(user="u", client="c")},
            {"info": {"user": "u", "client": "c"}},
        ),
        ("leave", {"info": {"user": "u", "client": "c"}}, {"info": {"user": "u", "client": "c"}}),
        ("unsubscribe", {"code": 2000, "reason": "server"}, {"code": 2000, "reason": "server"}),
        ("message", {"data": raw(b"hi")}, {"data": base64.b64encode(b"hi").decode()}),
        (
            "subscribe",
            {"recoverable": True, "epoch": "e", "offset": 3, "positioned": True},
            {"recoverable": True, "epoch": "e", "offset": "3", "positioned": True},
        ),
        ("disconnect", {"code": 3001, "reason": "shutdown"}, {"code": 3001, "reason": "shutdown"}),
        ("refresh", {"expires": True, "ttl": 60}, {"expires": True, "ttl": 60}),
        (
            "connect",
            {"client": "c", "version": "v", "ping": 25},
            {"client": "c", "version": "v", "ping": 25},
        ),
    ],
)
def test_pushes(kind: str, body: object, expected: dict[str, object]) -> None:
    channel = "" if kind in ("disconnect", "refresh", "connect", "message") else "room"
    frame = protobuf.encode_push(channel, kind, body)
    push: dict[str, object] = {kind: expected}
    if channel:
        push["channel"] = channel
    assert upstream_replies(frame) == [{"push": push}]


@given(
    channel=strategies.texts,
    data=st.one_of(st.binary(max_size=40), st.integers(0, 20_000).map(lambda n: b"x" * n)),
    offset=st.integers(0, 2**64 - 1),
    tags=st.dictionaries(strategies.texts, strategies.texts, max_size=3),
    delta=st.booleans(),
)
@settings(max_examples=60)
def test_the_hand_assembled_push_is_what_the_library_serialises(
    channel: str, data: bytes, offset: int, tags: dict[str, str], delta: bool
) -> None:
    pub = protobuf.encode_publication(data, offset=offset, tags=tags, delta=delta)
    expected = upstream.Reply(
        push=upstream.Push(channel=channel, pub=upstream.Publication.FromString(pub))
    )
    ours = protobuf.encode_pub_push(channel, pub)
    (message,) = protobuf.split(ours)
    assert upstream.Reply.FromString(message) == expected
    if len(tags) <= 1:  # the order of map entries is free
        assert ours == delimited(expected.SerializeToString())


def test_a_publication_is_encoded_once_and_wrapped_per_channel() -> None:
    event = Event(
        topic="prices.EURUSD", data={"bid": 1.1}, tags={"symbol": "EURUSD"}, offset=4, epoch="e"
    )
    pub = protobuf.publication_of(event)
    first, second = (
        protobuf.encode_pub_push("prices.EURUSD", pub),
        protobuf.encode_pub_push("prices.*", pub),
    )
    assert pub in first
    assert pub in second
    assert upstream_replies(first) == [
        {
            "push": {
                "channel": "prices.EURUSD",
                "pub": {
                    "data": base64.b64encode(b'{"bid":1.1}').decode(),
                    "offset": "4",
                    "tags": {"symbol": "EURUSD"},
                },
            }
        }
    ]
    assert protobuf.publication_push("prices.EURUSD", event) == first
    # A pattern subscription gets the concrete channel, in the publication and its tags.
    (reply,) = protobuf.decode_replies(
        protobuf.publication_push("prices.*", event, concrete_channel=True)
    )
    assert reply.push is not None
    assert reply.push.pub is not None
    assert reply.push.channel == "prices.*"
    assert reply.push.pub.channel == "prices.EURUSD"
    assert reply.push.pub.tags == {"symbol": "EURUSD", "topic": "prices.EURUSD"}


def test_binary_event_data_travels_as_is() -> None:
    event = Event(topic="bin", data=b"\x00\x01\xfe")
    (reply,) = protobuf.decode_replies(protobuf.publication_push("bin", event))
    assert reply.push is not None
    assert reply.push.pub is not None
    assert bytes(reply.push.pub.data) == b"\x00\x01\xfe"


def test_a_frame_of_several_replies_is_their_concatenation() -> None:
    messages = [
        protobuf.encode_reply(1, "ping", None),
        protobuf.PING,
        protobuf.encode_error(2, ERROR_BAD_REQUEST),
    ]
    frame = protobuf.join(messages)
    assert frame == b"".join(messages)
    assert [r.id for r in protobuf.decode_replies(frame)] == [1, 0, 2]
    assert protobuf.decode_replies(protobuf.PING) == [Reply()]  # a server ping


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "empty frame"),
        ("{}", "binary"),
        (b"\x05\x08", "runs past the end"),
        (b"\xff" * 11, "length prefix"),
        (b"\x80", "length prefix"),
        (b"\x02\xff\xff", "malformed command"),  # a truncated field inside the message
        (delimited(b"\x22\x03\x0a\x01\xff"), "malformed command"),  # a string that is not UTF-8
    ],
)
def test_malformed_frames(frame: bytes | str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protobuf.decode_commands(frame)


def test_a_filter_nested_beyond_the_decoder_limit_is_a_protocol_error() -> None:
    # FilterNode{op: "not", nodes: [child]}, 150 deep: built by hand, since the
    # library itself refuses to parse (so to build) a message nested that deep.
    node = upstream.FilterNode(key="k", cmp="ex").SerializeToString()
    for _ in range(150):
        node = b"\x0a\x03not\x32" + protobuf._varint(len(node)) + node
    subscribe = b"\x0a\x01c\x6a" + protobuf._varint(len(node)) + node  # channel, tf
    command = b"\x08\x01\x2a" + protobuf._varint(len(subscribe)) + subscribe  # id, subscribe
    with pytest.raises(ProtocolError, match="malformed command"):
        protobuf.decode_commands(delimited(command))


def decodes_or_fails_cleanly(decode: Callable[[bytes], list[Any]], data: bytes, cls: type) -> None:
    try:
        decoded = decode(data)
    except ProtocolError:
        return
    assert all(isinstance(item, cls) for item in decoded)


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    decodes_or_fails_cleanly(protobuf.decode_commands, data, Command)
    decodes_or_fails_cleanly(protobuf.decode_replies, data, Reply)


@given(strategies.commands, st.data())
@settings(max_examples=300)
def test_corrupted_commands_raise_only_protocol_error(
    command: Command, data: st.DataObject
) -> None:
    frame = bytearray(protobuf.encode_command(command))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(frame)))
    decodes_or_fails_cleanly(protobuf.decode_commands, bytes(frame[:cut]), Command)


# -- emulation requests -----------------------------------------------------------------------


def test_emulation_requests_in_both_encodings() -> None:
    commands = protobuf.encode_commands(
        [Command(id=4, publish=PublishRequest(channel="c", data=raw(b"x")))]
    )
    body = protobuf.encode_emulation_request("node-1", "session-1", commands)
    request = protobuf.decode_emulation_request(body)
    assert (request.node, request.session) == ("node-1", "session-1")
    assert protobuf.decode_commands(request.data)[0].publish == PublishRequest(
        channel="c", data=raw(b"x")
    )
    # centrifuge-js over JSON: JSON.stringify({session, node, data}) with data the command lines.
    lines = '{"id":4,"publish":{"channel":"c","data":{"x":1}}}\n{"id":5,"ping":{}}'
    body = json.dumps({"session": "s", "node": "n", "data": lines}).encode()
    request = codec.decode_emulation_request(body)
    assert (request.node, request.session) == ("n", "s")
    assert [c.id for c in codec.decode_commands(request.data)] == [4, 5]


@pytest.mark.parametrize("body", [b"\xff\xff", b"\x1a\x05ab"])
def test_malformed_protobuf_emulation_requests(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="emulation request"):
        protobuf.decode_emulation_request(body)


@pytest.mark.parametrize("body", [b"", b"[]", b'{"data": 3}', b"{" * 5000])
def test_malformed_json_emulation_requests(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="emulation request"):
        codec.decode_emulation_request(body)


# -- the session speaks whatever encoding it is given -------------------------------------------


def test_server_session_over_protobuf() -> None:
    session = ServerSession(encoding=PROTOBUF)
    frame = protobuf.encode_commands(
        [
            Command(id=1, connect=ConnectRequest(token="t")),
            Command(id=2, subscribe=SubscribeRequest(channel="c", delta="fossil")),
        ]
    )
    connect, subscribe = session.receive(frame)
    assert session.admit(connect)
    session.connected(connect, ConnectResult(client="c1", version="v", ping=25, pong=True))
    assert session.admit(subscribe)
    session.reply(subscribe, SubscribeResult(recoverable=True, epoch="e", delta=True))
    session.ping()
    out = PROTOBUF.join(session.data_to_send())
    assert upstream_replies(out) == [
        {"id": 1, "connect": {"client": "c1", "version": "v", "ping": 25, "pong": True}},
        {"id": 2, "subscribe": {"recoverable": True, "epoch": "e", "delta": True}},
        {},
    ]
    assert session.receive(protobuf.PONG) == []
    assert session.pongs == 1
    assert session.receive(b"\x07garbage") == []
    assert session.state is SessionState.CLOSED
    assert session.disconnect == DISCONNECT_BAD_REQUEST


def test_history_publications_carry_their_bytes() -> None:
    result = HistoryResult(
        publications=[
            Publication(data=raw(b'{"n":1}'), offset=1),
            Publication(data=raw(b"\x00"), offset=2),
        ],
        epoch="e",
        offset=2,
    )
    (reply,) = protobuf.decode_replies(protobuf.encode_reply(3, "history", result))
    assert reply.history == result
    assert [bytes(p.data) for p in reply.history.publications or []] == [b'{"n":1}', b"\x00"]
    assert isinstance(reply.history.publications[0].data, msgspec.Raw)  # type: ignore[index]


def test_the_generated_module_matches_the_schema(tmp_path: Path) -> None:
    # `make proto` regenerates it; a schema edited without regenerating fails here.
    src = Path(eventcast.__file__).resolve().parents[1]
    proto = "eventcast/protocol/_pb/client.proto"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"{src}/{proto}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in ("client_pb2.py", "client_pb2.pyi"):
        generated = tmp_path / "eventcast" / "protocol" / "_pb" / name
        assert (
            generated.read_text() == (src / "eventcast" / "protocol" / "_pb" / name).read_text()
        ), name
