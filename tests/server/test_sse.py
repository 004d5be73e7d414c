"""``/connection/sse`` over real sockets: the event format, the composite Last-Event-ID cursor,
authentication, heartbeats, token expiry, and bad input (each answered cleanly)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from eventcast.protocol.sse import InvalidFieldError, encode_event

from .conftest import StartHub
from .hubtools import SECRET, WAIT, HubServer, token
from .ssetools import Comment, Retry, SSEEvent, SSEParser, SSEStream, open_sse


async def publish(hub: HubServer, topic: str, data: Any) -> tuple[int, str]:
    """Publish through the HTTP API; return the publication's (offset, epoch)."""
    result = await hub.publish(topic, data)
    return result["offset"], result["epoch"]


def cursor(positions: dict[str, tuple[int, str]]) -> str:
    """The composite cursor's documented text form, built independently of the server."""
    return ";".join(["1", *(f"{t}!{o}!{e}" for t, (o, e) in sorted(positions.items()))])


def message(event: SSEEvent) -> dict[str, Any]:
    assert event.type == "message", event
    body: dict[str, Any] = event.json()
    assert set(body) == {"topic", "offset", "epoch", "data", "tags"}, body
    return body


async def next_messages(stream: SSEStream, n: int) -> list[dict[str, Any]]:
    return [message(event) for event in await stream.events(n)]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the ``eventcast`` and ``uvicorn`` loggers at every level (the access log too,
    which does not propagate to the root logger)."""
    attached = []
    for name in ("eventcast", "uvicorn", "uvicorn.error", "uvicorn.access"):
        caplog.set_level(logging.DEBUG, logger=name)
        logger = logging.getLogger(name)
        if not logger.propagate:
            logger.addHandler(caplog.handler)
            attached.append(logger)
    yield caplog
    for logger in attached:
        logger.removeHandler(caplog.handler)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# -- the stream --------------------------------------------------------------------------------


async def test_two_topics_in_one_stream(hub: HubServer) -> None:
    async with open_sse(hub.base, ["a", "b"], token=token()) as stream:
        assert stream.status == 200
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        assert stream.response.headers["cache-control"] == "no-cache"
        # The retry hint comes first, then the subscribed event.
        assert await stream.item() == Retry(int(hub.settings.sse_retry * 1000))
        first = await stream.event()
        assert first.type == "subscribed"
        assert first.id == ""
        subscribed = first.json()
        assert subscribed["topics"] == ["a", "b"]
        assert subscribed["recovered"] is False

        a1 = await publish(hub, "a", {"n": 1})
        b1 = await publish(hub, "b", {"n": 1, "text": "b"})
        a2 = await hub.publish("a", {"n": 2}, tags={"kind": "x"})
        events = await stream.events(3)

    assert [message(e) for e in events] == [
        {"topic": "a", "offset": 1, "epoch": a1[1], "data": {"n": 1}, "tags": {}},
        {"topic": "b", "offset": 1, "epoch": b1[1], "data": {"n": 1, "text": "b"}, "tags": {}},
        {"topic": "a", "offset": 2, "epoch": a2["epoch"], "data": {"n": 2}, "tags": {"kind": "x"}},
    ]
    # Each id is the composite cursor: the position of every topic after that event.
    assert [e.id for e in events] == [
        cursor({"a": a1, "b": (0, b1[1])}),
        cursor({"a": a1, "b": b1}),
        cursor({"a": (2, a2["epoch"]), "b": b1}),
    ]


async def missed_on_both_topics(hub: HubServer) -> tuple[str, list[dict[str, Any]]]:
    """Read two publications, leave, publish four more on both topics.

    Returns the last event id seen and the publications missed meanwhile.
    """
    async with open_sse(hub.base, ["a", "b"], token=token()) as stream:
        assert (await stream.subscribed())["recovered"] is False
        await publish(hub, "a", {"n": 1})
        await publish(hub, "b", {"n": 1})
        seen = await stream.events(2)
    assert [message(e)["topic"] for e in seen] == ["a", "b"]
    missed = []
    for n in (2, 3):
        for topic in ("b", "a"):
            offset, epoch = await publish(hub, topic, {"n": n})
            missed.append(
                {"topic": topic, "offset": offset, "epoch": epoch, "data": {"n": n}, "tags": {}}
            )
    return seen[-1].id, missed


async def assert_recovers(hub: HubServer, stream: SSEStream, missed: list[dict[str, Any]]) -> None:
    subscribed = await stream.subscribed()
    assert subscribed["topics"] == ["a", "b"]
    assert subscribed["recovered"] is True
    replayed = await next_messages(stream, len(missed))
    # Exactly the missed events, each once, in order within each topic.
    for topic in ("a", "b"):
        assert [m for m in replayed if m["topic"] == topic] == [
            m for m in missed if m["topic"] == topic
        ]
    assert len(replayed) == len(missed)
    # Nothing else was queued before the next live publication.
    offset, _ = await publish(hub, "b", {"n": "live"})
    assert await next_messages(stream, 1) == [
        {"topic": "b", "offset": offset, "epoch": missed[0]["epoch"], "data": {"n": "live"}}
        | {"tags": {}}
    ]


async def test_reconnect_with_last_event_id_recovers_both_topics(hub: HubServer) -> None:
    last_id, missed = await missed_on_both_topics(hub)
    headers = {"Last-Event-ID": last_id}
    async with open_sse(hub.base, ["a", "b"], token=token(), headers=headers) as stream:
        await assert_recovers(hub, stream, missed)


async def test_last_event_id_query_parameter_on_first_connection(hub: HubServer) -> None:
    last_id, missed = await missed_on_both_topics(hub)
    async with open_sse(hub.base, ["a", "b"], token=token(), lastEventID=last_id) as stream:
        await assert_recovers(hub, stream, missed)


async def test_the_replayed_ids_continue_the_cursor(hub: HubServer) -> None:
    last_id, missed = await missed_on_both_topics(hub)
    async with open_sse(hub.base, ["a", "b"], token=token(), lastEventID=last_id) as stream:
        assert (await stream.subscribed())["recovered"] is True
        events = await stream.events(len(missed))
    last = {m["topic"]: (m["offset"], m["epoch"]) for m in missed}
    assert events[-1].id == cursor(last)


@pytest.mark.parametrize(
    "last_id",
    [
        "garbage",
        "2;a!1!abc",  # unknown version
        "1;a!x!abc",  # offset not a number
        "1;a!1",  # missing epoch
        "1;a!1!ab!c",  # too many fields
        "1;!1!abc",  # no topic
        "1;a!1!ab-c",  # epoch not alphanumeric
        "1;a!-1!abc",
        "1;a!²!abc",  # a digit, but not an ASCII one
        "1;a!" + "9" * 5000 + "!abc",  # more digits than int() takes
        "1;a!9223372036854775808!abc",  # past a signed 64-bit offset
    ],
)
async def test_malformed_last_event_id_is_treated_as_none(
    hub: HubServer, logs: pytest.LogCaptureFixture, last_id: str
) -> None:
    await _assert_no_recovery(hub, logs, last_id)


async def test_a_last_event_id_over_the_length_limit_is_treated_as_none(
    start_hub: StartHub, logs: pytest.LogCaptureFixture
) -> None:
    # (Over the default max_header_size too: the request would get 431.)
    hub = await start_hub(max_header_size=131_072)
    await _assert_no_recovery(hub, logs, "1;" + "a!1!abc;" * 9000)


async def _assert_no_recovery(hub: HubServer, logs: pytest.LogCaptureFixture, last_id: str) -> None:
    await publish(hub, "a", {"n": 1})
    # Header bytes are Latin-1 on the wire (how the hub reads them).
    headers = {"Last-Event-ID": last_id.encode("latin-1")}
    async with open_sse(hub.base, ["a", "b"], token=token(), headers=headers) as stream:
        assert stream.status == 200
        subscribed = await stream.subscribed()
        assert subscribed["recovered"] is False
        # Nothing is replayed: the next event is the next live publication.
        offset, _ = await publish(hub, "a", {"n": 2})
        assert (await next_messages(stream, 1))[0]["offset"] == offset == 2
    no_tracebacks(logs)


async def test_malformed_last_event_id_query_parameter(hub: HubServer) -> None:
    async with open_sse(hub.base, ["a"], token=token(), lastEventID="1;a!oops!x") as stream:
        assert stream.status == 200
        assert (await stream.subscribed())["recovered"] is False


async def test_a_cursor_of_another_epoch_is_not_recovered(hub: HubServer) -> None:
    await publish(hub, "a", {"n": 1})
    headers = {"Last-Event-ID": cursor({"a": (0, "0ther")})}
    async with open_sse(hub.base, ["a"], token=token(), headers=headers) as stream:
        assert stream.status == 200
        assert (await stream.subscribed())["recovered"] is False
        offset, _ = await publish(hub, "a", {"n": 2})
        assert (await next_messages(stream, 1))[0]["offset"] == offset


async def test_pattern_topic_is_live_only(hub: HubServer) -> None:
    async with open_sse(hub.base, ["a", "live:x.*"], token=token()) as stream:
        assert (await stream.subscribed())["topics"] == ["a", "live:x.*"]
        a1 = await publish(hub, "a", {"n": 1})
        await hub.publish("live:x.one", {"n": 1})
        durable, live = await stream.events(2)
    assert message(live) == {
        "topic": "live:x.one",
        "offset": None,
        "epoch": None,
        "data": {"n": 1},
        "tags": {},
    }
    # A live event carries no id: the stream's cursor (the last id) is unchanged.
    assert live.id == durable.id == cursor({"a": a1})

    # Missed live events are gone; the durable topic is recovered.
    await hub.publish("live:x.two", {"n": 2})
    a2 = await publish(hub, "a", {"n": 2})
    headers = {"Last-Event-ID": live.id}
    async with open_sse(hub.base, ["a", "live:x.*"], token=token(), headers=headers) as stream:
        assert (await stream.subscribed())["recovered"] is True
        await hub.publish("live:x.three", {"n": 3})
        replayed, fresh = await next_messages(stream, 2)
    assert (replayed["topic"], replayed["offset"]) == ("a", a2[0])
    assert (fresh["topic"], fresh["data"]) == ("live:x.three", {"n": 3})


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["bearer", "cookie", "query"])
async def test_auth(hub: HubServer, logs: pytest.LogCaptureFixture, how: str) -> None:
    secret = token("carol")
    options: dict[str, Any] = {}
    if how == "bearer":
        options["token"] = secret
    elif how == "cookie":
        options["cookies"] = {hub.settings.sse_cookie: secret}
    else:
        options["access_token"] = secret
    async with open_sse(hub.base, ["a"], **options) as stream:
        assert stream.status == 200
        assert (await stream.subscribed())["topics"] == ["a"]
        assert {c.user for c in hub.hub.connections.values()} == {"carol"}
        offset, _ = await publish(hub, "a", {"n": 1})
        assert (await next_messages(stream, 1))[0]["offset"] == offset
    requests = [r for r in logs.records if "/connection/sse" in r.getMessage()]
    assert requests, "the access log was not captured"
    assert all(secret not in r.getMessage() for r in logs.records)
    assert secret not in logs.text
    assert all(secret not in str(r.args) for r in logs.records)


async def test_the_token_in_the_query_is_redacted_on_errors_too(
    hub: HubServer, logs: pytest.LogCaptureFixture
) -> None:
    secret = token("carol")
    async with open_sse(hub.base, ["nope:x"], access_token=secret) as stream:
        assert stream.status == 400
    async with open_sse(hub.base, ["a"], access_token=secret + "tampered") as stream:
        assert stream.status == 401
    assert [r for r in logs.records if "/connection/sse" in r.getMessage()]
    assert secret not in logs.text


async def test_stream_ends_when_the_token_expires(hub: HubServer) -> None:
    async with open_sse(hub.base, ["a"], token=token(ttl=3)) as stream:
        assert stream.status == 200
        await stream.subscribed()
        rest = await stream.rest()  # the server ends the response
        assert stream.ended
    # It ends with a retry hint (the browser reconnects, and then needs a new token).
    assert isinstance(rest[-1], Retry)
    assert not hub.hub.connections


# -- the event format --------------------------------------------------------------------------


async def test_multiline_data_never_breaks_an_event(hub: HubServer) -> None:
    text = "one\ntwo\r\nthree\rfour\n\ndata: injected\n\nid: 666\n"
    async with open_sse(hub.base, ["a"], token=token()) as stream:
        await stream.subscribed()
        await publish(hub, "a", {"text": text})
        await hub.hub.bus.publish("a", b'{"a":\n1}')
        await hub.hub.bus.publish("a", b'{"b":\r\n2,\r"c":\n\n3}')
        await publish(hub, "a", {"after": True})
        events = await stream.events(4)
    bodies = [message(e) for e in events]
    assert [b["data"] for b in bodies] == [
        {"text": text},
        {"a": 1},
        {"b": 2, "c": 3},
        {"after": True},
    ]
    assert [b["offset"] for b in bodies] == [1, 2, 3, 4]
    assert all(e.type == "message" for e in events)
    assert [e.id.split(";")[1].split("!")[1] for e in events] == ["1", "2", "3", "4"]


async def test_heartbeat_comment(start_hub: StartHub) -> None:
    hub = await start_hub(sse_heartbeat=0.2)
    async with open_sse(hub.base, ["a"], token=token()) as stream:
        await stream.subscribed()
        assert await stream.comment() == Comment("ping")
        # The stream still works after heartbeats.
        await stream.comment()
        offset, _ = await publish(hub, "a", {"n": 1})
        assert (await next_messages(stream, 1))[0]["offset"] == offset


@pytest.mark.parametrize("bad", ["\r", "\n", "\0", "a\r\nb", "x\ny", "nul\0"])
@pytest.mark.parametrize("field", ["event", "id"])
def test_encode_event_rejects_control_characters_in_fields(field: str, bad: str) -> None:
    fields: dict[str, Any] = {field: bad}
    with pytest.raises(InvalidFieldError):
        encode_event(b"{}", **fields)


def test_encode_event_round_trip() -> None:
    encoded = encode_event(b"line1\r\nline2\rline3\nline4", event="update", id="1;a!1!e")
    parser = SSEParser()
    assert parser.feed(encoded) == [SSEEvent("update", "line1\nline2\nline3\nline4", "1;a!1!e")]


# -- bad input ---------------------------------------------------------------------------------


async def assert_refused(
    hub: HubServer, status: int, topics: list[str], *, text: str | None = None, **options: Any
) -> None:
    async with open_sse(hub.base, topics, **options) as stream:
        assert stream.status == status, stream.response.text
        assert stream.response.headers["content-type"] == "application/json"
        body = stream.response.json()
        assert set(body) == {"error"}
        assert "Traceback" not in stream.response.text
        if text is not None:
            assert text in body["error"]
    assert not hub.hub.connections
    assert not hub.hub.channels


@pytest.mark.parametrize(
    ("topics", "status"),
    [
        (["nope:x"], 400),  # unknown namespace
        (["a", "nope:x"], 400),
        (["bad topic"], 400),
        (["a..b"], 400),
        (["x" * 300], 400),
        (["a.*"], 403),  # patterns not allowed in this namespace
        (["priv:x"], 403),  # needs a subscription token
    ],
)
async def test_bad_topic_is_a_clean_4xx(
    hub: HubServer, logs: pytest.LogCaptureFixture, topics: list[str], status: int
) -> None:
    await assert_refused(hub, status, topics, token=token())
    no_tracebacks(logs)
    # The server still serves a good stream.
    async with open_sse(hub.base, ["a"], token=token()) as stream:
        assert stream.status == 200
        await stream.subscribed()


async def test_too_many_topics(start_hub: StartHub) -> None:
    hub = await start_hub(channels_per_connection=2)
    await assert_refused(hub, 400, ["a", "b", "c"], text="at most 2", token=token())
    async with open_sse(hub.base, ["a", "b"], token=token()) as stream:
        assert stream.status == 200


async def test_no_topic(hub: HubServer) -> None:
    await assert_refused(hub, 400, [], text="topic", token=token())


async def test_disallowed_origin(start_hub: StartHub) -> None:
    hub = await start_hub(allowed_origins=["https://good.example"])
    await assert_refused(hub, 403, ["a"], token=token(), headers={"Origin": "https://evil.example"})
    assert hub.hub.refused["origin"] == 1
    headers = {"Origin": "https://good.example"}
    async with open_sse(hub.base, ["a"], token=token(), headers=headers) as stream:
        assert stream.status == 200
        assert stream.response.headers["access-control-allow-origin"] == "https://good.example"
        assert stream.response.headers["access-control-allow-credentials"] == "true"


async def test_disallowed_origin_same_origin_default(hub: HubServer) -> None:
    await assert_refused(hub, 403, ["a"], token=token(), headers={"Origin": "https://evil.example"})


async def test_no_token(hub: HubServer) -> None:
    await assert_refused(hub, 401, ["a"])


async def test_invalid_token(hub: HubServer) -> None:
    await assert_refused(hub, 401, ["a"], token="not-a-jwt")


async def test_expired_token(hub: HubServer) -> None:
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 60}, SECRET, "HS256")
    await assert_refused(hub, 401, ["a"], text="expired", token=expired)


async def test_slowloris_handshake_is_closed(start_hub: StartHub) -> None:
    hub = await start_hub(handshake_timeout=0.5)
    async with open_sse(hub.base, ["a"], token=token()) as stream:
        await stream.subscribed()
        port = int(hub.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /connection/sse?topic=a HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await writer.drain()
            async with asyncio.timeout(WAIT):
                assert await reader.read() == b""  # EOF: the server closed it
        finally:
            writer.close()
            await writer.wait_closed()
        # The well-behaved stream kept working meanwhile.
        offset, _ = await publish(hub, "a", {"n": 1})
        assert (await next_messages(stream, 1))[0]["offset"] == offset
