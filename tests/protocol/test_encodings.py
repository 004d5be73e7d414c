"""One interface over both encodings: selection, encode-once publications, delta publications."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace

import msgspec
import pytest
from centrifuge.codecs import _JsonCodec, _ProtobufCodec

from eventcast.events import Event
from eventcast.protocol import codec, delta, protobuf
from eventcast.protocol.codec import ProtocolError
from eventcast.protocol.codes import ClientError
from eventcast.protocol.encodings import (
    JSON,
    PROTOBUF_SUBPROTOCOL,
    Encoding,
    get_encoding,
    stream_encoding,
    websocket_encoding,
)
from eventcast.protocol.frames import (
    ClientInfo,
    ConnectPush,
    ConnectRequest,
    Publication,
    SubscribeRequest,
    SubscribeResult,
)
from eventcast.protocol.session import ServerSession

PROTOBUF = get_encoding("protobuf")
BOTH = [JSON, PROTOBUF]


def test_get_encoding() -> None:
    assert get_encoding("json") is JSON
    assert get_encoding("protobuf") is PROTOBUF  # loaded once
    assert (JSON.name, JSON.binary, PROTOBUF.name, PROTOBUF.binary) == (
        "json",
        False,
        "protobuf",
        True,
    )
    assert repr(PROTOBUF) == "<Encoding protobuf>"
    with pytest.raises(ValueError, match="unknown encoding 'msgpack'"):
        get_encoding("msgpack")
    assert ServerSession().encoding is JSON


@pytest.mark.parametrize(
    ("subprotocols", "query", "expected"),
    [
        ([], {}, ("json", None)),
        (["centrifuge-json"], {}, ("json", None)),
        ([PROTOBUF_SUBPROTOCOL], {}, ("protobuf", PROTOBUF_SUBPROTOCOL)),
        (["other", PROTOBUF_SUBPROTOCOL], {}, ("protobuf", PROTOBUF_SUBPROTOCOL)),
        ([], {"cf_protocol": "protobuf"}, ("protobuf", None)),
        ([], {"format": "protobuf"}, ("protobuf", None)),
        ([], {"format": "json", "cf_protocol": "json"}, ("json", None)),
    ],
)
def test_websocket_selection(
    subprotocols: list[str], query: dict[str, str], expected: tuple[str, str | None]
) -> None:
    assert websocket_encoding(subprotocols, query) == expected


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, "json"),
        ("application/json", "json"),
        ("text/plain", "json"),
        ("application/octet-stream", "protobuf"),
        ("Application/Octet-Stream; charset=binary", "protobuf"),
    ],
)
def test_http_streaming_selection(content_type: str | None, expected: str) -> None:
    assert stream_encoding(content_type) == expected


@pytest.mark.parametrize("encoding", BOTH, ids=lambda e: e.name)
def test_a_publication_is_encoded_once_per_encoding(encoding: Encoding) -> None:
    event = Event(
        topic="prices.EURUSD", data={"bid": 1.1}, tags={"symbol": "EURUSD"}, offset=3, epoch="e"
    )
    publication = encoding.publication_of(event)
    pushes = [
        encoding.encode_pub_push(channel, publication) for channel in ("prices.EURUSD", "prices.>")
    ]
    for push in pushes:
        assert publication in push
    assert pushes[0] == encoding.publication_push("prices.EURUSD", event)
    frame = encoding.join([*pushes, encoding.ping])
    decode = codec.decode_replies if encoding is JSON else protobuf.decode_replies
    replies = decode(frame)
    assert [r.push.channel if r.push else None for r in replies] == [
        "prices.EURUSD",
        "prices.>",
        None,
    ]
    pub = replies[0].push.pub  # type: ignore[union-attr]
    assert pub is not None
    assert (bytes(pub.data), pub.offset, pub.tags) == (b'{"bid":1.1}', 3, {"symbol": "EURUSD"})


@pytest.mark.parametrize("encoding", BOTH, ids=lambda e: e.name)
def test_encodings_frame_replies_and_errors(encoding: Encoding) -> None:
    session = ServerSession(encoding=encoding)
    connect_frame = (
        b'{"id":1,"connect":{}}'
        if encoding is JSON
        else protobuf.encode_commands([codec.decode_commands(b'{"id":1,"connect":{}}')[0]])
    )
    (request,) = session.receive(connect_frame)
    session.connected(request, {"client": "c1"})
    session.error(7, ClientError(107, "bad request"))
    decode = codec.decode_replies if encoding is JSON else protobuf.decode_replies
    first, second = decode(encoding.join(session.data_to_send()))
    assert first.connect is not None
    assert first.connect.client == "c1"
    assert second.error is not None
    assert (second.id, second.error.code) == (7, 107)


def sdk_publication(encoding: Encoding, publication: bytes) -> SimpleNamespace:
    """The publication as an SDK sees it after decoding the push."""
    if encoding is JSON:
        fields = json.loads(publication)
        return SimpleNamespace(data=fields["data"], delta=fields.get("delta", False))
    pub = protobuf._parse(protobuf.pb.Publication, publication)
    return SimpleNamespace(data=pub.data, delta=pub.delta)


@pytest.mark.parametrize("encoding", BOTH, ids=lambda e: e.name)
def test_delta_publications_as_the_sdks_apply_them(encoding: Encoding) -> None:
    # centrifuge-python's codecs turn each delta-mode publication back into data,
    # keeping the bytes as the base of the next delta, as centrifuge-js does.
    sdk = _JsonCodec if encoding is JSON else _ProtobufCodec
    payloads = [
        json.dumps(
            {"bid": 1.10 + n / 1000, "ask": 1.12, "name": "EUR/USD ünïcode", "pad": "x" * 300}
        ).encode()
        for n in range(4)
    ]
    base = b""
    for n, payload in enumerate(payloads):
        made = delta.smaller_delta(base, payload) if n else None
        data = encoding.delta_data(made if made is not None else payload)
        assert data is not None
        pub = encoding.encode_publication(data, offset=n + 1, delta=made is not None)
        received, base = sdk.apply_delta_if_needed(base, sdk_publication(encoding, pub))
        expected = json.loads(payload) if encoding is JSON else payload
        assert received == expected
        assert (made is not None) == (n > 0)


def test_json_delta_data_must_be_text() -> None:
    assert JSON.delta_data("é".encode()) == b'"\xc3\xa9"'
    assert JSON.delta_data(b'{"a":"\n"}') == b'"{\\"a\\":\\"\\n\\"}"'
    assert JSON.delta_data(b"\xc3") is None  # a delta cut inside a character: send it in full
    assert PROTOBUF.delta_data(b"\xc3") == b"\xc3"


def test_json_publications_carry_the_delta_flag() -> None:
    pub = codec.encode_publication(b'"3\\n1:x1;"', offset=2, delta=True)
    assert json.loads(pub) == {"data": "3\n1:x1;", "offset": 2, "delta": True}
    assert msgspec.json.decode(pub, type=Publication) == Publication(
        data=msgspec.Raw(b'"3\\n1:x1;"'), offset=2, delta=True
    )


@pytest.mark.parametrize(
    "decode", [codec.decode_commands, codec.decode_replies, codec.decode_emulation_request]
)
def test_json_nested_too_deep_is_a_protocol_error(decode: Callable[[bytes], object]) -> None:
    deep = b'{"id":1,"publish":{"channel":"c","data":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    with pytest.raises(ProtocolError):
        decode(deep)


# -- unidirectional transports (JSON only, as in Centrifugo) ------------------------------------


def test_unidirectional_pushes_are_bare_pushes() -> None:
    # The frames of Centrifugo's unidirectional protocol documentation.
    join = codec.encode_uni_push("#2694", "join", {"info": ClientInfo(user="2694", client="c1")})
    assert json.loads(join) == {
        "channel": "#2694",
        "join": {"info": {"user": "2694", "client": "c1"}},
    }
    pub = codec.encode_uni_pub_push("test", codec.encode_publication(b'{"input":1}', offset=1))
    assert json.loads(pub) == {"channel": "test", "pub": {"data": {"input": 1}, "offset": 1}}
    connect = codec.encode_uni_push(
        "",
        "connect",
        ConnectPush(client="c1", version="v", subs={"global": SubscribeResult()}, ping=25),
    )
    assert json.loads(connect) == {
        "connect": {"client": "c1", "version": "v", "subs": {"global": {}}, "ping": 25}
    }
    disconnect = codec.encode_uni_push("", "disconnect", {"code": 3001, "reason": "shutdown"})
    assert json.loads(disconnect) == {"disconnect": {"code": 3001, "reason": "shutdown"}}
    assert json.loads(codec.UNI_PING) == {}
    # The bidirectional push is the same object inside a reply.
    assert codec.encode_push("#2694", "join", None) == b'{"push":{"channel":"#2694","join":{}}}'
    assert json.loads(codec.encode_pub_push("test", b'{"data":1}')) == {
        "push": json.loads(codec.encode_uni_pub_push("test", b'{"data":1}'))
    }


def test_unidirectional_connect_requests() -> None:
    body = (
        '{"token": "<JWT>", "data": {"a": 1},'
        ' "subs": {"user#2694": {"recover": true, "offset": 12, "epoch": "xD5R"}}}'
    )
    request = codec.decode_connect_request(body)
    assert request.token == "<JWT>"
    assert request.subs == {"user#2694": SubscribeRequest(recover=True, offset=12, epoch="xD5R")}
    assert bytes(request.data) == b'{"a": 1}'
    assert codec.decode_connect_request(b"{}") == ConnectRequest()
    for bad in (
        b"",
        b"[]",
        b'{"token": 1}',
        b'{"subs": []}',
        b'{"data":' + b"[" * 5000 + b"]" * 5000 + b"}",
    ):
        with pytest.raises(ProtocolError, match="connect request"):
            codec.decode_connect_request(bad)
