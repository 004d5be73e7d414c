"""Events (immutable, shared, lazily encoded once) and stream positions."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest

from eventcast import (
    EncodeError,
    Event,
    EventcastError,
    LogError,
    Position,
    PositionError,
    events as events_module,
)
from eventcast.events import encode_data, freeze_tags, new_event_id


def test_event_fields_and_defaults() -> None:
    event = Event(topic="orders", data={"n": 1})
    assert event.topic == "orders"
    assert event.data == {"n": 1}
    assert isinstance(event.time, float)
    assert len(event.id) == 32
    assert event.id.isdigit()
    assert event.offset is None
    assert event.epoch is None
    assert event.position is None
    assert dict(event.tags) == {}


@pytest.mark.parametrize("field", ["topic", "data", "id", "time", "offset", "tags", "new"])
def test_event_is_immutable(field: str) -> None:
    event = Event(topic="orders", data=1)
    before = (event.topic, event.data, event.id, event.time)
    with pytest.raises(AttributeError):
        setattr(event, field, "changed")
    assert (event.topic, event.data, event.id, event.time) == before


def test_event_tags_are_read_only() -> None:
    tags = {"k": "v"}
    event = Event(topic="a", data=1, tags=freeze_tags(tags))
    tags["k"] = "changed"  # the event kept its own copy
    assert event.tags["k"] == "v"
    with pytest.raises(TypeError):
        event.tags["k"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError, match="str to str"):
        freeze_tags({"k": 1})  # type: ignore[dict-item]


def test_event_position() -> None:
    event = Event(topic="a", data=1, offset=7, epoch="e1")
    assert event.position == Position(7, "e1")


def test_events_equal_by_id() -> None:
    a = Event(topic="a", data=1)
    b = Event(topic="a", data=1)
    assert a != b
    same = Event(topic="b", data=2, id=a.id)
    assert a == same
    assert hash(a) == hash(same)
    assert len({a, b, same}) == 2


def test_ids_are_unique_and_sort_in_time_order() -> None:
    events = [Event(topic="a", data=i) for i in range(5000)]
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 32 and i.isdigit() for i in ids)
    # The 13-digit prefix is the creation time in milliseconds.
    for event in (events[0], events[-1]):
        assert abs(int(event.id[:13]) - event.time * 1000) < 1000


def test_ids_are_unique_across_threads() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        out.extend(new_event_id() for _ in range(2000))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in results for i in out]
    assert len(set(every)) == len(every) == 8000
    for out in results:
        assert out == sorted(out)


def test_ids_keep_increasing_past_a_chunk_and_when_the_clock_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ids come in chunks of 1,000 under one 29-digit prefix; a frozen clock makes
    # 2,500 ids span three chunks within one millisecond.
    frozen = time.time() - 60  # in the past: once the test ends, the real clock moves on
    monkeypatch.setattr(events_module, "_clock", lambda: frozen)
    ids = [new_event_id() for _ in range(2500)]
    assert len(set(ids)) == 2500
    assert ids == sorted(ids)
    assert len({i[:29] for i in ids}) >= 3
    assert all(len(i) == 32 and i.isdigit() for i in ids)
    # The clock steps back a second: the millisecond part holds, ids still increase.
    monkeypatch.setattr(events_module, "_clock", lambda: frozen - 1.0)
    later = [new_event_id() for _ in range(10)]
    assert later == sorted(later)
    assert later[0] > ids[-1]
    assert {i[:13] for i in later} == {ids[-1][:13]}


def test_a_chunk_counter_that_runs_out_moves_the_process_part_up() -> None:
    # Set, not monkeypatched: putting the counter back afterwards could repeat ids.
    events_module._chunk = 10**6 - 2
    high = events_module._high
    before = [new_event_id() for _ in range(3000)]
    assert before == sorted(before)
    assert len(set(before)) == 3000
    assert int(before[-1][13:23]) == high + 1
    assert int(before[-1][23:29]) < 10  # the chunk counter started again


def test_encoded_data_encodes_once_and_caches() -> None:
    event = Event(topic="a", data={"n": 1, "s": "x"})
    first = event.encoded_data()
    assert msgspec.json.decode(first) == {"n": 1, "s": "x"}
    assert event.encoded_data() is first
    assert event.encoded_data() is first


def test_encoding_is_lazy_and_happens_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def counting_encode(data: object) -> bytes:
        calls.append(data)
        return encode_data(data)

    monkeypatch.setattr(events_module, "encode_data", counting_encode)
    event = Event(topic="a", data=[1, 2, 3])
    assert calls == []  # building an event encodes nothing
    assert event.encoded_data() == b"[1,2,3]"
    assert event.encoded_data() == b"[1,2,3]"
    assert len(calls) == 1
    # Un-encodable data does not fail until it is encoded.
    lazy = Event(topic="a", data=object())
    assert len(calls) == 1
    with pytest.raises(EncodeError):
        lazy.encoded_data()


def test_bytes_pass_through() -> None:
    payload = b"\x00\x01raw"
    event = Event(topic="a", data=payload)
    assert event.encoded_data() is payload
    assert encode_data(payload) is payload


def test_known_bytes_can_be_given() -> None:
    event = Event(topic="a", data={"n": 1}, _cache=b'{"n":1}')
    assert event.encoded_data() == b'{"n":1}'


@pytest.mark.parametrize(
    "data",
    [object(), {"f": lambda: None}, complex(1, 2), {(1, 2): "tuple key"}],
)
def test_unencodable_data_raises_encode_error(data: object) -> None:
    event = Event(topic="a", data=data)
    with pytest.raises(EncodeError, match="cannot encode") as info:
        event.encoded_data()
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, EventcastError)
    assert info.value.__cause__ is not None
    # Nothing was cached: it fails again, the same way.
    with pytest.raises(EncodeError):
        event.encoded_data()


def test_any_object_is_allowed_as_data_in_process() -> None:
    marker = object()
    event = Event(topic="a", data=marker)
    assert event.data is marker


def test_repr_shows_topic_data_and_id() -> None:
    event = Event(topic="a", data={"n": 1}, offset=3, epoch="e", tags=freeze_tags({"k": "v"}))
    text = repr(event)
    assert "topic='a'" in text
    assert event.id in text
    assert "offset=3" in text
    assert "'k': 'v'" in text


# -- positions ------------------------------------------------------------------


def test_position_valid() -> None:
    p = Position(5, "epoch-1")
    assert p.offset == 5
    assert p.epoch == "epoch-1"
    assert Position(0, "") == Position(0, "")
    with pytest.raises(AttributeError):
        p.offset = 6  # type: ignore[misc]


@pytest.mark.parametrize(
    ("offset", "epoch", "why"),
    [
        (-1, "e", ">= 0"),
        ("5", "e", "must be an int"),
        (1.0, "e", "must be an int"),
        (True, "e", "must be an int"),
        (None, "e", "must be an int"),
        (1, 5, "epoch must be a str"),
        (1, None, "epoch must be a str"),
    ],
)
def test_position_invalid(offset: object, epoch: object, why: str) -> None:
    with pytest.raises(PositionError, match=why) as info:
        Position(offset, epoch)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LogError)
    assert isinstance(info.value, EventcastError)


@pytest.mark.parametrize(
    "value",
    [Position(3, "e"), (3, "e"), [3, "e"], {"offset": 3, "epoch": "e"}],
)
def test_position_coerce_good(value: object) -> None:
    assert Position.coerce(value) == Position(3, "e")


def test_position_coerce_returns_a_position_as_is() -> None:
    p = Position(1, "e")
    assert Position.coerce(p) is p


@pytest.mark.parametrize(
    "value",
    [
        None,
        3,
        "3:e",
        (3,),
        (3, "e", "x"),
        [],
        {"offset": 3},
        {"epoch": "e"},
        {"offset": "x", "epoch": "e"},
        ("3", "e"),
        (-1, "e"),
        (1, 2),
    ],
)
def test_position_coerce_malformed(value: object) -> None:
    with pytest.raises(PositionError):
        Position.coerce(value)
