"""Hypothesis strategies: topic names and patterns, and the protocol's frames.

Segments are drawn mostly from a small vocabulary so that generated patterns
and names actually collide and match, with some arbitrary valid segments mixed
in to exercise every allowed character.
"""

from __future__ import annotations

import msgspec
from hypothesis import strategies as st

from eventcast.protocol import frames as _f
from eventcast.protocol.frames import METHODS

#: Every character allowed in a segment.
SEGMENT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-@#,=+"
#: Every character allowed in a namespace.
NAMESPACE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"

_common_segments = st.sampled_from(["a", "b", "c", "orders", "42", "x-y", "user#1,2", "k=v+w"])
any_segments = st.text(alphabet=SEGMENT_ALPHABET, min_size=1, max_size=8)
segments = st.one_of(_common_segments, _common_segments, any_segments)

namespaces = st.one_of(
    st.sampled_from(["", "", "ns", "chat"]),
    st.text(alphabet=NAMESPACE_ALPHABET, min_size=1, max_size=6),
)


def _join(namespace: str, parts: list[str]) -> str:
    body = ".".join(parts)
    return f"{namespace}:{body}" if namespace else body


@st.composite
def topic_names(draw: st.DrawFn, max_segments: int = 4) -> str:
    """A valid concrete topic name (no wildcards)."""
    namespace = draw(namespaces)
    parts = draw(st.lists(segments, min_size=1, max_size=max_segments))
    return _join(namespace, parts)


@st.composite
def topic_patterns(draw: st.DrawFn, max_segments: int = 4) -> str:
    """A valid topic filter: a name, possibly with ``*`` segments and a final ``>``."""
    namespace = draw(namespaces)
    parts = draw(
        st.lists(
            st.one_of(segments, st.just("*")),
            min_size=1,
            max_size=max_segments,
        )
    )
    if draw(st.booleans()):
        parts[-1] = ">"
    return _join(namespace, parts)


@st.composite
def pattern_for(draw: st.DrawFn, topic: str) -> str:
    """A pattern derived from ``topic`` (so it often matches it), sometimes perturbed."""
    namespace, sep, rest = topic.partition(":")
    if not sep:
        namespace, rest = "", topic
    parts = rest.split(".")
    out = [draw(st.sampled_from([p, "*"])) for p in parts]
    if draw(st.booleans()):
        cut = draw(st.integers(min_value=0, max_value=len(out) - 1))
        out = [*out[:cut], ">"]
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        # Perturb: change the namespace, add or drop a segment.
        choice = draw(st.sampled_from(["namespace", "longer", "shorter"]))
        if choice == "namespace":
            namespace = draw(namespaces)
        elif choice == "longer" and out[-1] != ">":
            out.append(draw(st.one_of(segments, st.just("*"))))
        elif choice == "shorter" and len(out) > 1:
            out.pop()
    return _join(namespace, out)


# -- the Centrifuge protocol's frames (tests/protocol) ---------------------------------------
#
# Values a Protobuf round trip keeps exactly: proto3 drops fields at their default,
# so an empty container is drawn as None, an empty payload as NO_DATA.

uint32 = st.integers(min_value=0, max_value=2**32 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
#: Text that is valid UTF-8 (no lone surrogates), as Protobuf strings must be.
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
payloads = st.one_of(st.just(_f.NO_DATA), st.binary(min_size=1, max_size=24).map(msgspec.Raw))
string_maps = st.one_of(st.none(), st.dictionaries(texts, texts, min_size=1, max_size=3))

FILTER_COMPARISONS = (
    "eq",
    "neq",
    "in",
    "nin",
    "ex",
    "nex",
    "sw",
    "ew",
    "ct",
    "lt",
    "lte",
    "gt",
    "gte",
)

filter_leaves = st.builds(
    _f.FilterNode,
    key=texts,
    cmp=st.sampled_from(FILTER_COMPARISONS),
    val=texts,
    vals=st.one_of(st.none(), st.lists(texts, min_size=1, max_size=3)),
)
#: Filter trees as the wire carries them (not necessarily valid filters).
filter_trees = st.recursive(
    filter_leaves,
    lambda children: st.builds(
        _f.FilterNode,
        op=st.sampled_from(["and", "or", "not"]),
        nodes=st.lists(children, min_size=1, max_size=3),
    ),
    max_leaves=6,
)

subscribe_requests = st.builds(
    _f.SubscribeRequest,
    channel=texts,
    token=texts,
    recover=st.booleans(),
    epoch=texts,
    offset=uint64,
    data=payloads,
    positioned=st.booleans(),
    recoverable=st.booleans(),
    join_leave=st.booleans(),
    delta=st.sampled_from(["", "fossil"]),
    tf=st.one_of(st.none(), filter_trees),
    flag=int64,
)

_REQUESTS = {
    "connect": st.builds(
        _f.ConnectRequest,
        token=texts,
        data=payloads,
        subs=st.one_of(
            st.none(), st.dictionaries(texts, subscribe_requests, min_size=1, max_size=2)
        ),
        name=texts,
        version=texts,
        headers=string_maps,
        flag=int64,
    ),
    "subscribe": subscribe_requests,
    "unsubscribe": st.builds(_f.UnsubscribeRequest, channel=texts),
    "publish": st.builds(_f.PublishRequest, channel=texts, data=payloads),
    "presence": st.builds(_f.PresenceRequest, channel=texts),
    "presence_stats": st.builds(_f.PresenceStatsRequest, channel=texts),
    "history": st.builds(
        _f.HistoryRequest,
        channel=texts,
        limit=int32,
        since=st.one_of(st.none(), st.builds(_f.StreamPosition, offset=uint64, epoch=texts)),
        reverse=st.booleans(),
    ),
    "ping": st.just(_f.PingRequest()),
    "send": st.builds(_f.SendRequest, data=payloads),
    "rpc": st.builds(_f.RPCRequest, data=payloads, method=texts),
    "refresh": st.builds(_f.RefreshRequest, token=texts),
    "sub_refresh": st.builds(_f.SubRefreshRequest, channel=texts, token=texts),
}

#: A command: an id and exactly one request (every method of the protocol).
commands = st.sampled_from(_f.METHODS).flatmap(
    lambda method: st.builds(_f.Command, id=uint32, **{method: _REQUESTS[method]})
)

client_infos = st.builds(
    _f.ClientInfo, user=texts, client=texts, conn_info=payloads, chan_info=payloads
)
publications = st.builds(
    _f.Publication,
    data=payloads,
    info=st.one_of(st.none(), client_infos),
    offset=uint64,
    tags=string_maps,
    delta=st.booleans(),
    time=int64,
    channel=texts,
)
subscribe_results = st.builds(
    _f.SubscribeResult,
    expires=st.booleans(),
    ttl=uint32,
    recoverable=st.booleans(),
    epoch=texts,
    publications=st.one_of(st.none(), st.lists(publications, min_size=1, max_size=2)),
    recovered=st.booleans(),
    offset=uint64,
    positioned=st.booleans(),
    data=payloads,
    was_recovering=st.booleans(),
    delta=st.booleans(),
)

#: (method, result) pairs a server replies with.
results = st.one_of(
    st.tuples(
        st.just("connect"),
        st.builds(
            _f.ConnectResult,
            client=texts,
            version=texts,
            expires=st.booleans(),
            ttl=uint32,
            data=payloads,
            subs=st.one_of(
                st.none(), st.dictionaries(texts, subscribe_results, min_size=1, max_size=2)
            ),
            ping=uint32,
            pong=st.booleans(),
            session=texts,
            node=texts,
            time=int64,
        ),
    ),
    st.tuples(st.just("subscribe"), subscribe_results),
    st.tuples(
        st.just("presence"),
        st.builds(
            _f.PresenceResult,
            presence=st.one_of(
                st.none(), st.dictionaries(texts, client_infos, min_size=1, max_size=2)
            ),
        ),
    ),
    st.tuples(
        st.just("presence_stats"),
        st.builds(_f.PresenceStatsResult, num_clients=uint32, num_users=uint32),
    ),
    st.tuples(
        st.just("history"),
        st.builds(
            _f.HistoryResult,
            publications=st.one_of(st.none(), st.lists(publications, min_size=1, max_size=2)),
            epoch=texts,
            offset=uint64,
        ),
    ),
    st.tuples(st.just("rpc"), st.builds(_f.RPCResult, data=payloads)),
    st.tuples(
        st.just("refresh"),
        st.builds(_f.RefreshResult, client=texts, version=texts, expires=st.booleans(), ttl=uint32),
    ),
    st.tuples(
        st.just("sub_refresh"), st.builds(_f.SubRefreshResult, expires=st.booleans(), ttl=uint32)
    ),
)
# -- input from outside, for the decoders' fuzz tests (tests/fuzz) ---------------------------

#: Any JSON value.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=40,
)

#: Numbers where range checks bite: both ends of a signed 64-bit integer and past them.
edge_integers = (
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, -(10**30)])
    | st.integers()
)

_request_fields = st.fixed_dictionaries(
    {},
    optional={
        "channel": st.text(max_size=12) | json_values,
        "token": st.text(max_size=12) | json_values,
        "data": json_values,
        "limit": edge_integers | json_values,
        "offset": edge_integers | json_values,
        "epoch": st.text(max_size=6) | json_values,
        "recover": st.booleans() | json_values,
        "since": st.fixed_dictionaries({}, optional={"offset": edge_integers, "epoch": st.text()})
        | json_values,
        "subs": st.dictionaries(
            st.text(max_size=6), st.fixed_dictionaries({}, optional={"offset": edge_integers})
        ),
        "method": st.text(max_size=6),
        "flag": edge_integers,
    },
)

_METHODS = st.sampled_from([*METHODS, "nope"])


@st.composite
def raw_commands(draw: st.DrawFn) -> dict[str, object]:
    """A Centrifuge command as JSON, well formed or nearly: an id, a method and request fields."""
    command: dict[str, object] = {}
    if draw(st.integers(0, 5)):
        command["id"] = draw(edge_integers | json_values)
    if draw(st.integers(0, 5)):
        command[draw(_METHODS)] = draw(_request_fields | json_values)
    return command


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A WebSocket frame's bytes: commands (one per line), mangled now and then."""
    import json

    lines = draw(st.lists(raw_commands(), min_size=1, max_size=3))
    data = "\n".join(json.dumps(line) for line in lines).encode()
    mangle = draw(st.sampled_from(["none", "none", "cut", "insert", "nest"]))
    if mangle == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mangle == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    elif mangle == "nest":
        depth = draw(st.integers(1, 2000))
        data = b'{"id":1,"publish":{"channel":"a","data":' + b"[" * depth + b"]" * depth + b"}}"
    return data
