"""Tags filters: Centrifugo's operators, validation of hostile trees, distinct-filter evaluation."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from centrifuge import Filter
from centrifuge.codecs import _ProtobufCodec
from hypothesis import given, settings, strategies as st

from eventcast.protocol import codec, protobuf
from eventcast.protocol.codec import ProtocolError
from eventcast.protocol.filters import (
    DEFAULT_FILTER_LIMITS,
    FilterError,
    FilterLimits,
    MatchCache,
    TagFilter,
    compile_filter,
)
from eventcast.protocol.frames import FilterNode
from tests import strategies

# The publication of Centrifugo's documentation on filtering.
TAGS = {
    "ticker": "AAPL",
    "source": "NASDAQ",
    "price": "150.25",
    "category": "tech",
    "volume": "1000",
}


def leaf(key: str, cmp: str, val: str = "", vals: list[str] | None = None) -> FilterNode:
    return FilterNode(key=key, cmp=cmp, val=val, vals=vals)


def branch(op: str, *nodes: FilterNode) -> FilterNode:
    return FilterNode(op=op, nodes=list(nodes))


def matches(node: FilterNode, tags: dict[str, str] | None = TAGS) -> bool:
    return compile_filter(node).matches(tags)


@pytest.mark.parametrize(
    "node",
    [
        leaf("ticker", "eq", "AAPL"),
        leaf("source", "neq", "TEST"),
        leaf("category", "in", vals=["tech", "finance"]),
        leaf("ticker", "nin", vals=["MSFT", "GOOGL"]),
        leaf("price", "ex"),
        leaf("internal_id", "nex"),
        leaf("ticker", "sw", "AA"),
        leaf("source", "ew", "DAQ"),
        leaf("category", "ct", "ec"),
        leaf("price", "gt", "100"),
        leaf("volume", "gte", "1000"),
        leaf("price", "lt", "200"),
        leaf("volume", "lte", "1000"),
        branch("and", leaf("ticker", "eq", "AAPL"), leaf("category", "eq", "tech")),
        branch("or", leaf("ticker", "eq", "MSFT"), leaf("category", "eq", "tech")),
        branch("not", leaf("source", "eq", "NYSE")),
    ],
)
def test_the_documented_examples_match(node: FilterNode) -> None:
    assert matches(node)


@pytest.mark.parametrize(
    "node",
    [
        leaf("ticker", "eq", "MSFT"),
        leaf("source", "neq", "NASDAQ"),
        leaf("category", "in", vals=["finance"]),
        leaf("ticker", "nin", vals=["AAPL"]),
        leaf("missing", "ex"),
        leaf("price", "nex"),
        leaf("ticker", "sw", "PL"),
        leaf("source", "ew", "NAS"),
        leaf("category", "ct", "x"),
        leaf("price", "gt", "150.25"),
        leaf("volume", "gte", "1000.5"),
        leaf("price", "lt", "150.25"),
        leaf("volume", "lte", "999"),
        branch("and", leaf("ticker", "eq", "AAPL"), leaf("category", "eq", "food")),
        branch("or", leaf("ticker", "eq", "MSFT"), leaf("category", "eq", "food")),
        branch("not", leaf("source", "eq", "NASDAQ")),
    ],
)
def test_and_their_opposites_do_not(node: FilterNode) -> None:
    assert not matches(node)


def test_absent_tags() -> None:
    # As Centrifugo: an absent tag is unequal to anything, and counts as "" in a set.
    assert matches(leaf("k", "neq", "x"), {})
    assert not matches(leaf("k", "eq", "x"), {})
    assert matches(leaf("k", "nin", vals=["x"]), {})
    assert not matches(leaf("k", "in", vals=["x"]), {})
    assert matches(leaf("k", "in", vals=["", "x"]), {})
    for cmp in ("sw", "ew", "ct", "gt", "gte", "lt", "lte"):
        assert not matches(leaf("k", cmp, "1"), None)
    assert matches(leaf("k", "nex"), None)


def test_numeric_comparisons_are_decimal() -> None:
    assert matches(leaf("p", "gt", "0.1"), {"p": "0.10000000000000000001"})
    assert matches(leaf("p", "lt", "-1"), {"p": "-1.5"})
    assert matches(leaf("p", "gte", ".5"), {"p": "+0.5"})
    # A tag that is not a number (or too long to parse) never matches, either way.
    for value in ("abc", "1e5", "NaN", "Infinity", "1_000", " 1", "1" * 65):
        assert not matches(leaf("p", "gt", "0"), {"p": value})
        assert not matches(leaf("p", "lte", "0"), {"p": value})


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (FilterNode(), "needs cmp"),
        (leaf("k", "like", "x"), "unknown comparison"),
        (FilterNode(op="xor", nodes=[leaf("k", "ex")]), "unknown filter op"),
        (leaf("k", "eq"), "needs val"),
        (leaf("k", "eq", "x", ["y"]), "no vals"),
        (leaf("k", "in", vals=[]), "non-empty vals"),
        (leaf("k", "nin", "x", ["y"]), "no val"),
        (leaf("k", "ex", "x"), "takes no val"),
        (leaf("", "eq", "x"), "needs a key"),
        (leaf("p", "gt", "ten"), "decimal number"),
        (FilterNode(key="k", cmp="ex", nodes=[leaf("k", "ex")]), "takes no nodes"),
        (FilterNode(op="and"), "at least one node"),
        (FilterNode(op="or", key="k", nodes=[leaf("k", "ex")]), "takes only nodes"),
        (FilterNode(op="not"), "exactly one node"),
        (branch("not", leaf("a", "ex"), leaf("b", "ex")), "exactly one node"),
        (branch("and", leaf("a", "ex"), FilterNode(op="?")), "unknown filter op"),
    ],
)
def test_malformed_filters(node: FilterNode, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        compile_filter(node)


def test_existence_needs_no_key() -> None:
    # Centrifugo accepts ex/nex without a key: the empty tag name.
    assert matches(leaf("", "ex"), {"": "x"})


def test_limits() -> None:
    deep = leaf("k", "ex")
    for _ in range(DEFAULT_FILTER_LIMITS.max_depth - 1):
        deep = branch("not", deep)
    assert matches(deep, {"k": "v"}) is (DEFAULT_FILTER_LIMITS.max_depth % 2 == 1)
    with pytest.raises(FilterError, match="nested deeper than 8"):
        compile_filter(branch("not", deep))
    wide = branch("or", *(leaf(f"k{i}", "ex") for i in range(63)))
    assert matches(wide, {"k62": ""})
    with pytest.raises(FilterError, match="more than 64 nodes"):
        compile_filter(branch("or", *(leaf(f"k{i}", "ex") for i in range(64))))
    many = [str(i) for i in range(200)]
    compile_filter(branch("and", leaf("a", "in", vals=many), leaf("b", "nin", vals=many[:56])))
    with pytest.raises(FilterError, match="more than 256 values"):
        compile_filter(branch("and", leaf("a", "in", vals=many), leaf("b", "nin", vals=many[:57])))
    tight = FilterLimits(max_depth=1, max_nodes=1, max_values=1, max_number_length=3)
    assert compile_filter(leaf("p", "gt", "1"), limits=tight).matches({"p": "999"})
    assert not compile_filter(leaf("p", "gt", "1"), limits=tight).matches({"p": "1000"})
    with pytest.raises(FilterError, match="decimal number"):
        compile_filter(leaf("p", "gt", "1000"), limits=tight)


def test_equal_filters_are_one_filter() -> None:
    a = compile_filter(
        branch(
            "and", leaf("t", "in", vals=["b", "a", "a"]), leaf("p", "gt", "1.0"), leaf("x", "ex")
        )
    )
    b = compile_filter(
        branch("and", leaf("x", "ex"), leaf("p", "gt", "1"), leaf("t", "in", vals=["a", "b"]))
    )
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != compile_filter(
        branch("or", leaf("x", "ex"), leaf("p", "gt", "1"), leaf("t", "in", vals=["a", "b"]))
    )
    assert a != compile_filter(leaf("x", "ex"))
    assert a != "not a filter"
    assert a.key == ("and", (("ex", "x"), ("gt", "p", Decimal("1")), ("in", "t", ("a", "b"))))
    assert "TagFilter(('and'" in repr(a)


def test_each_distinct_filter_is_evaluated_once_per_publication() -> None:
    filters = [compile_filter(leaf("ticker", "eq", f"T{i % 3}")) for i in range(1000)]
    cache = MatchCache({"ticker": "T1"})
    delivered = sum(cache(f) for f in filters)
    assert delivered == 333
    assert cache.evaluations == 3
    assert MatchCache(None)(filters[0]) is False


def test_the_same_filter_from_json_and_protobuf_subscribe_commands() -> None:
    # Built with centrifuge-python's own filter helpers, sent as each encoding sends it.
    tags_filter = Filter.all(
        Filter.eq("ticker", "AAPL"),
        Filter.gte("price", "100"),
        Filter.any(Filter.is_in("source", ["NASDAQ", "NYSE"]), Filter.negate(Filter.exists("otc"))),
    )
    command = {"id": 2, "subscribe": {"channel": "market:stocks", "tf": tags_filter.node}}
    (from_json,) = codec.decode_commands(json.dumps(command))
    (from_protobuf,) = protobuf.decode_commands(_ProtobufCodec.encode_commands([command]))
    assert from_json.subscribe is not None
    assert from_protobuf.subscribe is not None
    assert from_json.subscribe.tf == from_protobuf.subscribe.tf
    compiled = compile_filter(from_protobuf.subscribe.tf)  # type: ignore[arg-type]
    assert compiled == compile_filter(from_json.subscribe.tf)  # type: ignore[arg-type]
    assert compiled.matches({"ticker": "AAPL", "price": "101", "source": "NYSE"})
    assert compiled.matches({"ticker": "AAPL", "price": "100", "source": "OTC"})
    assert not compiled.matches({"ticker": "AAPL", "price": "100", "source": "OTC", "otc": "1"})
    assert not compiled.matches({"ticker": "AAPL", "price": "99.99", "source": "NYSE"})


def test_a_json_filter_nested_too_deep_for_the_decoder_is_a_protocol_error() -> None:
    depth = 2000
    tf = '{"op":"not","nodes":[' * depth + '{"key":"k","cmp":"ex"}' + "]}" * depth
    with pytest.raises(ProtocolError):
        codec.decode_commands('{"id":1,"subscribe":{"channel":"c","tf":' + tf + "}}")


def test_a_filter_error_is_a_protocol_error() -> None:
    assert issubclass(FilterError, ProtocolError)


# -- against a reference evaluator --------------------------------------------------------------

KEYS = ["a", "b", "c"]
VALUES = ["", "x", "xy", "yx", "1", "2.5", "-3", "10"]
NUMBERS = {"1", "2.5", "-3", "10"}


def reference(node: FilterNode, tags: dict[str, str]) -> bool:
    """The documented semantics, written as plainly as possible."""
    if node.op == "and":
        return all(reference(child, tags) for child in node.nodes or [])
    if node.op == "or":
        return any(reference(child, tags) for child in node.nodes or [])
    if node.op == "not":
        return not reference((node.nodes or [])[0], tags)
    present = node.key in tags
    value = tags.get(node.key, "")
    if node.cmp in ("gt", "gte", "lt", "lte"):
        if not present or value not in NUMBERS:
            return False
        number = float(value)
        bound = float(node.val)
        return {
            "gt": number > bound,
            "gte": number >= bound,
            "lt": number < bound,
            "lte": number <= bound,
        }[node.cmp]
    return {
        "eq": present and value == node.val,
        "neq": not present or value != node.val,
        "in": value in (node.vals or []),
        "nin": value not in (node.vals or []),
        "ex": present,
        "nex": not present,
        "sw": present and value.startswith(node.val),
        "ew": present and value.endswith(node.val),
        "ct": present and node.val in value,
    }[node.cmp]


valid_leaves = st.one_of(
    st.builds(
        leaf,
        st.sampled_from(KEYS),
        st.sampled_from(["eq", "neq", "sw", "ew", "ct"]),
        st.sampled_from(VALUES[1:]),
    ),
    st.builds(
        leaf,
        st.sampled_from(KEYS),
        st.sampled_from(["in", "nin"]),
        st.just(""),
        st.lists(st.sampled_from(VALUES), min_size=1, max_size=3),
    ),
    st.builds(leaf, st.sampled_from(KEYS), st.sampled_from(["ex", "nex"])),
    st.builds(
        leaf,
        st.sampled_from(KEYS),
        st.sampled_from(["gt", "gte", "lt", "lte"]),
        st.sampled_from(["1", "2.5", "-3", "0"]),
    ),
)
valid_trees = st.recursive(
    valid_leaves,
    lambda children: st.one_of(
        st.builds(
            lambda op, nodes: FilterNode(op=op, nodes=nodes),
            st.sampled_from(["and", "or"]),
            st.lists(children, min_size=1, max_size=3),
        ),
        children.map(lambda child: branch("not", child)),
    ),
    max_leaves=6,
)
tag_sets = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)


@given(valid_trees, tag_sets)
@settings(max_examples=400)
def test_compiled_filters_agree_with_the_reference(node: FilterNode, tags: dict[str, str]) -> None:
    try:
        compiled = compile_filter(node)
    except FilterError:
        return  # over the limits: deep or wide trees
    assert compiled.matches(tags) is reference(node, tags)
    assert MatchCache(tags)(compiled) is reference(node, tags)


@given(strategies.filter_trees)
@settings(max_examples=400)
def test_trees_from_the_wire_compile_or_fail_cleanly(node: FilterNode) -> None:
    try:
        compiled = compile_filter(node)
    except FilterError:
        return
    assert isinstance(compiled, TagFilter)
    assert isinstance(compiled.matches({"": "", "a": "1"}), bool)
