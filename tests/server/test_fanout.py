"""What one batch becomes for each kind of member: once per variant, never once per connection.

Pure tests of :class:`eventcast.server.fanout.Batch` (no sockets): the
end-to-end behaviour with real clients is in test_centrifuge_python.py,
test_centrifuge_js.py and test_conflation.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from eventcast.events import Event
from eventcast.protocol import codec, delta, protobuf
from eventcast.protocol.encodings import JSON, UNI_JSON, get_encoding
from eventcast.protocol.filters import compile_filter
from eventcast.protocol.frames import FilterNode
from eventcast.server import fanout
from eventcast.server.channels import Membership
from eventcast.server.fanout import Batch

PROTOBUF = get_encoding("protobuf")


def document(n: int) -> dict[str, Any]:
    return {"n": n, "bid": 100 + n, "rows": [{"level": i, "size": i * 7} for i in range(30)]}


def events(count: int, *, start: int = 1) -> list[Event]:
    return [
        Event(
            topic="prices.S1",
            data=document(n),
            offset=n,
            epoch="e",
            tags={"symbol": "S1" if n % 2 else "S2", "size": str(n * 10)},
        )
        for n in range(start, start + count)
    ]


def counting(function: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return function(*args, **kwargs)

    return wrapper


def test_each_publication_is_encoded_once_per_encoding() -> None:
    calls = [0]
    publication_of = counting(codec.publication_of, calls)
    json_ = dataclasses.replace(JSON, publication_of=publication_of)
    uni = dataclasses.replace(UNI_JSON, publication_of=publication_of)
    batch = Batch("prices.S1", False, events(5), None)
    first = batch.payload(json_)
    for _ in range(100):  # as many connections as you like
        assert batch.payload(json_) is first
        batch.payload(uni)
    # JSON and the unidirectional JSON share the publication bytes; only the wrapper differs.
    assert calls == [5]
    lines = [json.loads(line) for line in first.split(b"\n")]
    assert [line["push"]["pub"]["offset"] for line in lines] == [1, 2, 3, 4, 5]
    assert json.loads(batch.payload(uni).split(b"\n")[0]) == lines[0]["push"]
    replies = protobuf.decode_replies(batch.payload(PROTOBUF))
    assert [r.push.pub.offset for r in replies if r.push is not None] == [1, 2, 3, 4, 5]


def test_each_distinct_filter_is_evaluated_once_per_publication() -> None:
    node = FilterNode(op="and", nodes=[FilterNode(key="symbol", cmp="eq", val="S1")])
    twin = FilterNode(op="and", nodes=[FilterNode(key="symbol", cmp="eq", val="S1")])
    same = compile_filter(node), compile_filter(twin)
    other = compile_filter(FilterNode(key="size", cmp="gte", val="30"))
    batch = Batch("prices.S1", False, events(6), None)
    members = [Membership(channel="prices.S1", tag_filter=f) for f in (*same, other, other)]
    payloads = [batch.for_member(m, JSON, fresh=False) for m in members]
    assert payloads[0] is payloads[1]  # equal filters share one payload
    assert batch.filter_evaluations == 2 * 6  # two distinct filters, six publications
    offsets = [
        [json.loads(line)["push"]["pub"]["offset"] for line in p.split(b"\n")] for p in payloads
    ]
    assert offsets == [[1, 3, 5], [1, 3, 5], [3, 4, 5, 6], [3, 4, 5, 6]]


def test_deltas_are_computed_once_per_publication(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    monkeypatch.setattr(fanout, "smaller_delta", counting(delta.smaller_delta, calls))
    before, *batch_events = events(5)
    batch = Batch("prices.S1", False, batch_events, before)
    continuing = Membership(channel="prices.S1", delta=True, delta_base=before)
    fresh = Membership(channel="prices.S1", delta=True)
    for encoding in (JSON, PROTOBUF):
        for _ in range(50):
            batch.for_member(continuing, encoding, fresh=False)
            continuing.delta_base = before
            batch.for_member(fresh, encoding, fresh=False)
    assert calls == [4]  # once per publication, whatever the members and encodings

    # A continuing member gets four deltas; a fresh one the first in full.
    payload = batch.for_member(continuing, JSON, fresh=False)
    assert continuing.delta_base is batch_events[-1]
    pubs = [json.loads(line)["push"]["pub"] for line in payload.split(b"\n")]
    assert [p.get("delta", False) for p in pubs] == [True, True, True, True]
    source = before.encoded_data()
    for pub, event in zip(pubs, batch_events, strict=True):
        source = delta.apply(source, pub["data"].encode())
        assert json.loads(source) == event.data
    fresh.delta_base = None
    first = json.loads(batch.for_member(fresh, JSON, fresh=False).split(b"\n")[0])
    assert "delta" not in first["push"]["pub"]
    assert json.loads(first["push"]["pub"]["data"]) == batch_events[0].data

    # Protobuf carries the same deltas as bytes.
    continuing.delta_base = before
    replies = protobuf.decode_replies(batch.for_member(continuing, PROTOBUF, fresh=False))
    assert all(r.push.pub.delta for r in replies if r.push is not None)


def test_a_member_given_a_batch_alone_gets_it_in_full() -> None:
    before, *batch_events = events(3)
    batch = Batch("prices.S1", False, batch_events, None)
    member = Membership(channel="prices.S1", delta=True, delta_base=before)
    pubs = [
        json.loads(line)["push"]["pub"]
        for line in batch.for_member(member, JSON, fresh=True).split(b"\n")
    ]
    assert [p.get("delta", False) for p in pubs] == [False, False]
    assert [json.loads(p["data"]) for p in pubs] == [e.data for e in batch_events]


def test_an_event_that_cannot_be_encoded_is_skipped_once() -> None:
    good, bad = events(2)
    bad = Event(topic="prices.S1", data={"not json": object()}, offset=2, epoch="e")
    batch = Batch("prices.S1", False, [good, bad], None)
    for encoding in (JSON, PROTOBUF, UNI_JSON):
        assert batch.payload(encoding)
    member = Membership(channel="prices.S1", delta=True)
    assert batch.for_member(member, JSON, fresh=False).count(b"\n") == 0
    assert batch.failed == {1}


def test_an_event_that_cannot_be_encoded_is_counted_by_a_delta_member_alone() -> None:
    good, _ = events(2)
    bad = Event(topic="prices.S1", data={"not json": object()}, offset=2, epoch="e")
    batch = Batch("prices.S1", False, [good, bad], None)
    member = Membership(channel="prices.S1", delta=True)
    assert batch.for_member(member, JSON, fresh=False).count(b"\n") == 0
    assert batch.failed == {1}
