"""Hypothesis strategies for topic names and patterns.

Segments are drawn mostly from a small vocabulary so that generated patterns
and names actually collide and match, with some arbitrary valid segments mixed
in to exercise every allowed character.
"""

from __future__ import annotations

from hypothesis import strategies as st

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
