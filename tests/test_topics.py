"""The topic grammar, pattern matching and the TopicMatcher trie."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from eventcast import EventcastError, InvalidTopicError
from eventcast.topics import (
    MAX_TOPIC_LENGTH,
    TopicMatcher,
    is_pattern,
    namespace_of,
    topic_matches,
    validate_many,
    validate_pattern,
    validate_topic,
)

from .strategies import (
    SEGMENT_ALPHABET,
    pattern_for,
    topic_names,
    topic_patterns,
)

# -- a reference implementation, independent of the one under test -----------

_SEG = r"[A-Za-z0-9_\-@#,=+]+"
_NS = r"[A-Za-z0-9_\-]+"
_NAME_RE = re.compile(rf"(?:{_NS}:)?{_SEG}(?:\.{_SEG})*")
_PATTERN_RE = re.compile(rf"(?:{_NS}:)?(?:{_SEG}|\*)(?:\.(?:{_SEG}|\*))*(?:\.>)?|(?:{_NS}:)?>")


def reference_valid(text: str, *, pattern: bool) -> bool:
    if len(text.encode()) > MAX_TOPIC_LENGTH:
        return False
    return bool((_PATTERN_RE if pattern else _NAME_RE).fullmatch(text))


def reference_match(pattern: str, topic: str) -> bool:
    """Translate the pattern into a regex over the whole topic and match it."""
    namespace, sep, rest = pattern.partition(":")
    if not sep:
        namespace, rest = "", pattern
    seg = r"[^.:]+"
    parts = []
    for segment in rest.split("."):
        if segment == "*":
            parts.append(seg)
        elif segment == ">":
            parts.append(rf"{seg}(?:\.{seg})*")
        else:
            parts.append(re.escape(segment))
    body = r"\.".join(parts)
    prefix = re.escape(namespace) + ":" if namespace else ""
    return re.fullmatch(prefix + body, topic) is not None


# -- valid names and patterns ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "orders",
        "orders.created",
        "a.b.c.d.e",
        "prices.EURUSD",
        "ns:a.b",
        "chat:room.42",
        "dialog#42,43",
        "user@example",
        "k=v+w",
        "under_score-dash",
        "x" * MAX_TOPIC_LENGTH,
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_topic(name) == name
    assert validate_pattern(name) == name
    assert not is_pattern(name)


@pytest.mark.parametrize(
    "pattern",
    ["*", ">", "orders.*", "orders.>", "*.created", "a.*.c", "ns:*", "ns:a.>", "*.*.>"],
)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern
    assert is_pattern(pattern)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "must not be empty"),
        (".a", "empty segment"),
        ("a.", "empty segment"),
        ("a..b", "empty segment"),
        ("ns:", "empty segment"),
        (":a", "invalid namespace"),
        ("n s:a", "invalid namespace"),
        ("n@s:a", "invalid namespace"),
        ("a:b:c", "invalid character"),
        ("a b", "invalid character"),
        ("a/b", "invalid character"),
        ("a*b", "invalid character"),
        ("a>", "invalid character"),
        ("caf\u00e9", "invalid character"),
        ("a.*", "wildcard '*' is not allowed"),
        ("a.>", "wildcard '>' is not allowed"),
        ("x" * (MAX_TOPIC_LENGTH + 1), str(MAX_TOPIC_LENGTH)),
    ],
)
def test_invalid_names_say_why(name: str, why: str) -> None:
    with pytest.raises(InvalidTopicError, match=re.escape(why)):
        validate_topic(name)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (">.a", "'>' must be the last segment"),
        ("a.>.b", "'>' must be the last segment"),
        ("a.**", "invalid character"),
        ("a.b*", "invalid character"),
        ("*:a", "invalid namespace"),
        ("a..*", "empty segment"),
        ("x." * 127 + "*>", str(MAX_TOPIC_LENGTH)),
    ],
)
def test_invalid_patterns_say_why(pattern: str, why: str) -> None:
    with pytest.raises(InvalidTopicError, match=re.escape(why)):
        validate_pattern(pattern)


@pytest.mark.parametrize("value", [None, 42, b"orders", ["orders"]])
def test_non_str_is_invalid(value: object) -> None:
    with pytest.raises(InvalidTopicError, match="must be a str"):
        validate_topic(value)
    with pytest.raises(InvalidTopicError, match="must be a str"):
        validate_pattern(value)


def test_invalid_topic_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty segment") as info:
        validate_topic("a..b")
    assert isinstance(info.value, EventcastError)


def test_length_limit_is_in_bytes_at_the_boundary() -> None:
    assert validate_topic("a" * 255) == "a" * 255
    assert validate_topic("ns:" + "a" * 252) == "ns:" + "a" * 252
    with pytest.raises(InvalidTopicError, match="255 bytes"):
        validate_topic("ns:" + "a" * 253)
    # Non-ASCII characters are never allowed, whatever their byte length.
    with pytest.raises(InvalidTopicError):
        validate_topic("\u00e9" * 200)


def test_invalid_character_message_names_the_characters() -> None:
    with pytest.raises(InvalidTopicError) as info:
        validate_topic("orders.cr$ea%ted")
    message = str(info.value)
    assert "$" in message
    assert "%" in message
    assert "cr$ea%ted" in message


def test_validate_many() -> None:
    assert validate_many("a.b") == ("a.b",)
    assert validate_many(["a", "b.*", "a"]) == ("a", "b.*")
    with pytest.raises(InvalidTopicError, match="at least one topic"):
        validate_many([])
    with pytest.raises(InvalidTopicError):
        validate_many(["a", "b..c"])


def test_namespace_of() -> None:
    assert namespace_of("ns:a.b") == "ns"
    assert namespace_of("a.b") == ""
    assert namespace_of("ns:*") == "ns"


@given(topic_names())
def test_generated_names_are_valid(name: str) -> None:
    assert validate_topic(name) == name
    assert reference_valid(name, pattern=False)


@given(topic_patterns())
def test_generated_patterns_are_valid(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern
    assert reference_valid(pattern, pattern=True)


_FUZZ_ALPHABET = SEGMENT_ALPHABET[-12:] + "ab.:*> \u00e9"


@given(st.text(alphabet=_FUZZ_ALPHABET, max_size=12))
def test_validation_agrees_with_the_reference_grammar(text: str) -> None:
    for validate, pattern in ((validate_topic, False), (validate_pattern, True)):
        message = ""
        try:
            validate(text)
        except InvalidTopicError as exc:
            message = str(exc)
        ok = not message
        assert ok == reference_valid(text, pattern=pattern), (text, pattern, message)


# -- matching -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("orders", "orders", True),
        ("orders", "orders.created", False),
        ("orders.*", "orders.created", True),
        ("orders.*", "orders", False),
        ("orders.*", "orders.created.eu", False),
        ("*.created", "orders.created", True),
        ("*", "orders", True),
        ("*", "orders.created", False),
        ("orders.>", "orders", False),
        ("orders.>", "orders.created", True),
        ("orders.>", "orders.created.eu.west", True),
        (">", "orders", True),
        (">", "a.b.c", True),
        ("a.*.>", "a.b", False),
        ("a.*.>", "a.b.c", True),
        ("ns:a.b", "ns:a.b", True),
        ("ns:a.b", "a.b", False),
        ("a.b", "ns:a.b", False),
        ("ns:*", "ns:a", True),
        ("ns:>", "ns:a.b", True),
        ("*", "ns:a", False),
        (">", "ns:a", False),
        ("ns:>", "other:a", False),
        ("dialog#42,43", "dialog#42,43", True),
        ("dialog#42,43", "dialog#42", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected
    assert reference_match(pattern, topic) is expected  # the reference agrees
    matcher = TopicMatcher()
    matcher.add(pattern, "v")
    assert matcher.match(topic) == (frozenset({"v"}) if expected else frozenset())


@given(st.data())
def test_topic_matches_agrees_with_the_reference(data: st.DataObject) -> None:
    topic = data.draw(topic_names())
    pattern = data.draw(st.one_of(pattern_for(topic), topic_patterns()))
    assert topic_matches(pattern, topic) == reference_match(pattern, topic)


@given(
    st.lists(st.tuples(topic_patterns(), st.integers(0, 5)), max_size=12),
    st.lists(topic_names(), min_size=1, max_size=8),
    st.data(),
)
def test_matcher_agrees_with_the_reference(
    entries: list[tuple[str, int]], topics: list[str], data: st.DataObject
) -> None:
    # Bias the filters towards the topics so that many of them match.
    entries = entries + [(data.draw(pattern_for(t)), data.draw(st.integers(0, 5))) for t in topics]
    matcher = TopicMatcher(cache_size=4)
    for f, v in entries:
        matcher.add(f, v)

    def expected(topic: str, live: list[tuple[str, int]]) -> frozenset[object]:
        return frozenset(v for f, v in live if reference_match(f, topic))

    for topic in topics:
        assert matcher.match(topic) == expected(topic, entries)
        assert matcher.match(topic) == expected(topic, entries)  # cached answer
    distinct = set(entries)
    assert len(matcher) == len({f for f, _ in distinct if not is_pattern(f)}) + len(
        {(f, v) for f, v in distinct if is_pattern(f)}
    )

    # Remove some entries: the answers follow.
    removed = data.draw(st.lists(st.sampled_from(entries), unique=True)) if entries else []
    for f, v in removed:
        matcher.remove(f, v)
    live = [e for e in entries if e not in set(removed)]
    for topic in topics:
        assert matcher.match(topic) == expected(topic, live)

    # Remove everything: the trie is pruned back to nothing.
    for f, v in distinct:
        matcher.remove(f, v)
    assert len(matcher) == 0
    assert matcher._root.children == {}
    assert matcher._exact == {}
    for topic in topics:
        assert matcher.match(topic) == frozenset()


def test_matcher_add_remove_prunes() -> None:
    matcher = TopicMatcher()
    matcher.add("orders.*", 1)
    matcher.add("orders.>", 2)
    matcher.add("orders.created", 3)
    matcher.add("orders.created", 4)
    matcher.add("ns:a.*.c", 5)
    assert len(matcher) == 4  # one exact name, three pattern entries
    assert matcher.match("orders.created") == {1, 2, 3, 4}
    assert matcher.match("orders.created.eu") == {2}
    assert matcher.match("ns:a.b.c") == {5}
    assert sorted(matcher.filters()) == ["orders.created"]

    matcher.remove("orders.*", 1)
    assert matcher.match("orders.created") == {2, 3, 4}
    matcher.remove("orders.created", 3)
    assert matcher.match("orders.created") == {2, 4}
    # Removing what is not there changes nothing.
    matcher.remove("orders.*", 1)
    matcher.remove("never.*", 1)
    matcher.remove("never", 1)
    matcher.remove("orders.created", 99)
    assert len(matcher) == 3

    matcher.remove("orders.>", 2)
    matcher.remove("orders.created", 4)
    matcher.remove("ns:a.*.c", 5)
    assert len(matcher) == 0
    assert matcher._root.children == {}
    assert list(matcher.filters()) == []
    assert matcher.match("orders.created") == frozenset()


def test_matcher_same_value_twice_is_one_entry() -> None:
    matcher = TopicMatcher()
    matcher.add("a.*", "v")
    matcher.add("a.*", "v")
    assert len(matcher) == 1
    matcher.remove("a.*", "v")
    assert len(matcher) == 0
    assert matcher._root.children == {}


def test_matcher_rejects_a_bad_cache_size() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        TopicMatcher(cache_size=0)
