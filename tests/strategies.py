"""Hypothesis strategies for topic names and patterns.

Segments are drawn mostly from a small vocabulary so that generated patterns
and names actually collide and match, with some arbitrary valid segments mixed
in to exercise every allowed character.
"""

from __future__ import annotations

from hypothesis import strategies as st

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
def commands(draw: st.DrawFn) -> dict[str, object]:
    """A Centrifuge command, well formed or nearly: an id, a method and request fields."""
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

    lines = draw(st.lists(commands(), min_size=1, max_size=3))
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
