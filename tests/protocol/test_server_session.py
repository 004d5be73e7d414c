"""The server's per-connection state machine at the byte level: no loop, no socket."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from eventcast.protocol import codes
from eventcast.protocol.frames import ConnectResult
from eventcast.protocol.session import Request, ServerSession, SessionState


def connected(session: ServerSession | None = None) -> ServerSession:
    session = session or ServerSession()
    [request] = session.receive(b'{"id":1,"connect":{"token":"t"}}')
    assert session.admit(request)
    session.connected(request, ConnectResult(client="c1", version="v"))
    assert session.data_to_send() == [b'{"id":1,"connect":{"client":"c1","version":"v"}}']
    return session


def test_connect_first_then_commands_in_order() -> None:
    session = connected()
    requests = session.receive(
        b'{"id":2,"subscribe":{"channel":"a"}}\n{"id":3,"publish":{"channel":"a","data":{}}}'
    )
    assert [(r.id, r.method) for r in requests] == [(2, "subscribe"), (3, "publish")]
    assert requests[0].body.channel == "a"
    for request in requests:
        assert session.admit(request)
        session.reply(request, None)
    assert session.data_to_send() == [b'{"id":2,"subscribe":{}}', b'{"id":3,"publish":{}}']


def test_a_command_before_connect_closes_with_3501() -> None:
    session = ServerSession()
    [request] = session.receive(b'{"id":1,"subscribe":{"channel":"a"}}')
    assert not session.admit(request)
    assert session.state is SessionState.CLOSED
    assert session.disconnect == codes.DISCONNECT_BAD_REQUEST


@pytest.mark.parametrize("frame", [b"", b"not json", b"[1,2]", b'{"id":"x","connect":{}}'])
def test_a_malformed_frame_closes_with_3501(frame: bytes) -> None:
    session = ServerSession()
    assert session.receive(frame) == []
    assert session.disconnect == codes.DISCONNECT_BAD_REQUEST
    assert session.receive(b'{"id":1,"connect":{}}') == []  # closed: nothing more is read


def test_an_unknown_method_is_answered_104() -> None:
    session = connected()
    assert session.receive(b'{"id":5,"frobnicate":{}}') == []
    [reply] = session.data_to_send()
    assert json.loads(reply) == {"id": 5, "error": {"code": 104, "message": "method not found"}}


def test_a_bare_object_is_a_pong() -> None:
    session = connected()
    assert session.receive(b"{}") == []
    assert session.pongs == 1
    assert session.data_to_send() == []


def test_commands_need_an_id_except_send() -> None:
    session = connected()
    [send] = session.receive(b'{"send":{"data":{"x":1}}}')
    assert send.method == "send"
    session.reply(send, None)  # send has no reply
    assert session.data_to_send() == []
    assert session.receive(b'{"publish":{"channel":"a","data":{}}}') == []
    assert session.disconnect == codes.DISCONNECT_BAD_REQUEST


def test_a_second_connect_is_an_error_reply() -> None:
    session = connected()
    [again] = session.receive(b'{"id":2,"connect":{}}')
    assert not session.admit(again)
    [reply] = session.data_to_send()
    assert json.loads(reply)["error"]["code"] == 107
    assert session.connected_state


def test_client_errors_up_to_the_budget_end_in_3509() -> None:
    session = connected(ServerSession(max_bad_commands=3))
    for i in range(2):
        session.error(10 + i, codes.ERROR_PERMISSION_DENIED)
    assert session.connected_state
    session.error(99, codes.ERROR_TOO_MANY_REQUESTS, client_fault=False)  # not counted
    assert session.connected_state
    session.error(12, codes.ERROR_PERMISSION_DENIED)
    assert session.disconnect == codes.DISCONNECT_TOO_MANY_ERRORS
    assert len(session.data_to_send()) == 4


def test_nothing_is_queued_once_closed() -> None:
    session = connected()
    session.close(codes.DISCONNECT_SHUTDOWN)
    session.close(codes.DISCONNECT_SLOW)  # the first reason stays
    assert session.disconnect == codes.DISCONNECT_SHUTDOWN
    session.ping()
    session.push(b'{"push":{}}')
    session.reply(Request(3, "history", None), None)
    session.error(4, codes.ERROR_INTERNAL)
    assert session.data_to_send() == []


def test_max_bad_commands_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_bad_commands"):
        ServerSession(max_bad_commands=0)


@given(st.binary(max_size=512))
def test_random_bytes_never_raise(data: bytes) -> None:
    session = ServerSession()
    requests = session.receive(data)
    # Whatever came in, the session either closed or returned commands to admit.
    assert session.state is SessionState.CLOSED or all(isinstance(r, Request) for r in requests)


def test_unidirectional_sessions_answer_connect_with_a_push_and_keep_the_last_error() -> None:
    from eventcast.protocol.encodings import UNI_JSON

    session = ServerSession(encoding=UNI_JSON)
    refused = Request(1, "connect", None)
    session.error(1, codes.ERROR_TOKEN_EXPIRED)
    assert session.last_error == codes.ERROR_TOKEN_EXPIRED
    assert session.data_to_send() == [b""]  # no error replies: the transport says goodbye
    session.connected(refused, ConnectResult(client="c", ping=25))
    assert json.loads(session.data_to_send()[0]) == {"connect": {"client": "c", "ping": 25}}
    session.ping()
    assert session.data_to_send() == [b"{}"]


def _holds_int(kind: object) -> bool:
    import msgspec.inspect as mi

    if isinstance(kind, (mi.IntType, mi.AnyType)):
        return True
    if isinstance(kind, mi.CustomType):  # ``object``: anything
        return kind.cls is object
    if isinstance(kind, mi.UnionType):
        return any(_holds_int(member) for member in kind.types)
    if isinstance(kind, mi.DictType):  # (a dict's structs are checked; a list's are not)
        return _holds_int(kind.value_type)
    return isinstance(kind, mi.StructType)


def test_the_range_check_reads_every_field_that_can_hold_a_number() -> None:
    """``out_of_range`` reads, per request class, only the fields whose type can hold
    an ``int`` or a nested request (alone or in a dict): exactly those, for every
    request, and a ``publish`` has none (its check costs one lookup)."""
    import msgspec.inspect as mi

    from eventcast.protocol import frames

    classes = [
        mi.type_info(kind)
        for kind in vars(frames).values()
        if isinstance(kind, type)
        and issubclass(kind, frames._Message)
        and kind is not frames._Message
    ]
    assert len(classes) > 10
    for info in classes:
        assert isinstance(info, mi.StructType)
        expected = {field.name for field in info.fields if _holds_int(field.type)}
        assert set(frames._fields_to_check(info.cls)) == expected, info.cls
    assert frames._fields_to_check(frames.PublishRequest) == ()
    request = frames.HistoryRequest(
        channel="c", since=frames.StreamPosition(offset=2**63, epoch="e")
    )
    assert frames.out_of_range(request) == "since.offset out of range"
    request = frames.ConnectRequest(subs={"a": frames.SubscribeRequest(offset=-1)})
    assert frames.out_of_range(request) == "subs.offset out of range"
