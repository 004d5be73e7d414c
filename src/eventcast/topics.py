"""Topic names and patterns: one strict grammar, validated everywhere (pure, no I/O).

A topic name has an optional namespace followed by dot-separated segments::

    chat:room.42        namespace "chat", segments ["room", "42"]
    prices.EURUSD       namespace "",     segments ["prices", "EURUSD"]
    dialog#42,43        user-limited channel (Centrifugo's ``#`` form)

* Segment characters: ``A-Z a-z 0-9 _ - @ # , = +``.
* A name is at most 255 bytes (UTF-8; every allowed character is one byte).
* A pattern may use ``*`` as a whole segment (exactly one segment) and ``>`` as
  the last segment (one or more segments).

Because ``*`` and ``>`` are never valid inside a concrete name and no other
special character is allowed, a name can never be smuggled into a Redis
``PSUBSCRIBE`` glob or a NATS subject wildcard.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from ._caches import remember
from .exceptions import InvalidTopicError

__all__ = [
    "MAX_TOPIC_LENGTH",
    "TopicMatcher",
    "is_pattern",
    "namespace_of",
    "topic_matches",
    "validate_pattern",
    "validate_topic",
]

#: The longest topic name or pattern accepted, in bytes.
MAX_TOPIC_LENGTH = 255

_SEGMENT = re.compile(r"[A-Za-z0-9_\-@#,=+]+")
_NAMESPACE = re.compile(r"[A-Za-z0-9_\-]+")


def _split(name: object, *, allow_wildcards: bool) -> tuple[str, list[str]]:
    if not isinstance(name, str):
        raise InvalidTopicError(f"a topic must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidTopicError("a topic must not be empty")
    if len(name) > MAX_TOPIC_LENGTH:
        raise InvalidTopicError(
            f"a topic is at most {MAX_TOPIC_LENGTH} bytes; this one has {len(name.encode())}"
        )
    namespace, sep, rest = name.partition(":")
    if not sep:
        namespace, rest = "", name
    elif not _NAMESPACE.fullmatch(namespace):
        raise InvalidTopicError(
            f"invalid namespace {namespace!r} in {name!r}: "
            "use letters, digits, '_' and '-' before the ':'"
        )
    segments = rest.split(".")
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if not segment:
            raise InvalidTopicError(f"empty segment in {name!r}: dots must separate segments")
        if segment in ("*", ">"):
            if not allow_wildcards:
                raise InvalidTopicError(
                    f"wildcard {segment!r} is not allowed in the topic name {name!r}; "
                    "only patterns may use '*' and '>'"
                )
            if segment == ">" and i != last:
                raise InvalidTopicError(f"'>' must be the last segment of the pattern {name!r}")
            continue
        if not _SEGMENT.fullmatch(segment):
            bad = sorted({c for c in segment if not _SEGMENT.fullmatch(c)})
            raise InvalidTopicError(
                f"invalid character(s) {''.join(bad)!r} in segment {segment!r} of {name!r}; "
                "allowed are letters, digits and _ - @ # , = +"
            )
    return namespace, segments


#: Most names remembered as valid by :func:`validate_topic` (then it forgets them all).
_VALID_CACHE_SIZE: Final = 10_000
_valid: set[str] = set()


def validate_topic(name: object) -> str:
    """Check a concrete topic name and return it.

    A name found valid is remembered (up to ``_VALID_CACHE_SIZE`` of them), so
    checking it again costs one set lookup.

    Raises:
        InvalidTopicError: the name breaks the grammar (the message says how).
    """
    if type(name) is str and name in _valid:
        return name
    _split(name, allow_wildcards=False)
    if len(_valid) >= _VALID_CACHE_SIZE:
        _valid.clear()
    _valid.add(name)  # type: ignore[arg-type]  # _split checked it is a str
    return name  # type: ignore[return-value]


def validate_pattern(pattern: object) -> str:
    """Check a topic filter (a name, or a pattern with ``*`` / ``>``) and return it.

    Raises:
        InvalidTopicError: the filter breaks the grammar (the message says how).
    """
    _split(pattern, allow_wildcards=True)
    return pattern  # type: ignore[return-value]


def is_pattern(topic_filter: str) -> bool:
    """Return whether a *valid* topic filter contains a wildcard segment."""
    return any(s in ("*", ">") for s in _segments(topic_filter))


def namespace_of(topic: str) -> str:
    """Return the namespace of a topic or pattern (``""`` when there is none)."""
    namespace, sep, _ = topic.partition(":")
    return namespace if sep else ""


def _segments(topic_filter: str) -> list[str]:
    _namespace, sep, rest = topic_filter.partition(":")
    if not sep:
        rest = topic_filter
    return rest.split(".")


def _key(topic_filter: str) -> list[str]:
    """Split a filter into the tokens the trie walks: namespace first, then segments."""
    namespace, sep, rest = topic_filter.partition(":")
    if not sep:
        return ["", *topic_filter.split(".")]
    return [namespace, *rest.split(".")]


def topic_matches(pattern: str, topic: str) -> bool:
    """Return whether the valid filter ``pattern`` matches the valid name ``topic``.

    The namespace must be equal; ``*`` matches exactly one segment and a final
    ``>`` one or more.
    """
    p = _key(pattern)
    t = _key(topic)
    if p[0] != t[0]:
        return False
    for i in range(1, len(p)):
        seg = p[i]
        if seg == ">":
            return len(t) > i
        if i >= len(t):
            return False
        if seg != "*" and seg != t[i]:
            return False
    return len(p) == len(t)


class _Node:
    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.values: set[object] = set()


class TopicMatcher:
    """Maps topic filters to values and finds every value whose filter matches a topic.

    Exact names live in a dict; patterns in a trie. ``match`` results are cached
    per topic until the next change, and the cache is bounded.
    """

    def __init__(self, *, cache_size: int = 10_000) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be positive")
        self._exact: dict[str, set[object]] = {}
        self._root = _Node()
        self._patterns = 0
        self._cache: dict[str, frozenset[object]] = {}
        self._cache_size = cache_size

    def add(self, topic_filter: str, value: object) -> None:
        """Register ``value`` under a valid ``topic_filter``."""
        self._cache.clear()
        if not is_pattern(topic_filter):
            self._exact.setdefault(topic_filter, set()).add(value)
            return
        node = self._root
        for token in _key(topic_filter):
            node = node.children.setdefault(token, _Node())
        if value not in node.values:
            node.values.add(value)
            self._patterns += 1

    def remove(self, topic_filter: str, value: object) -> None:
        """Unregister ``value`` from ``topic_filter``; prune what becomes empty."""
        self._cache.clear()
        if not is_pattern(topic_filter):
            values = self._exact.get(topic_filter)
            if values is not None:
                values.discard(value)
                if not values:
                    del self._exact[topic_filter]
            return
        path: list[tuple[_Node, str]] = []
        node = self._root
        for token in _key(topic_filter):
            child = node.children.get(token)
            if child is None:
                return
            path.append((node, token))
            node = child
        if value in node.values:
            node.values.discard(value)
            self._patterns -= 1
        for parent, token in reversed(path):
            child = parent.children[token]
            if child.values or child.children:
                break
            del parent.children[token]

    def match(self, topic: str) -> frozenset[object]:
        """Return every value registered under a filter matching the valid ``topic``."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: set[object] = set()
        exact = self._exact.get(topic)
        if exact:
            found.update(exact)
        if self._patterns:
            self._walk(self._root, _key(topic), 0, found)
        return remember(self._cache, topic, frozenset(found), self._cache_size)

    def _walk(self, node: _Node, tokens: list[str], i: int, found: set[object]) -> None:
        if i == len(tokens):
            found.update(node.values)
            return
        if i > 0:  # '>' needs at least one segment and never stands for the namespace
            tail = node.children.get(">")
            if tail is not None:
                found.update(tail.values)
        child = node.children.get(tokens[i])
        if child is not None:
            self._walk(child, tokens, i + 1, found)
        if i > 0:
            star = node.children.get("*")
            if star is not None:
                self._walk(star, tokens, i + 1, found)

    def filters(self) -> Iterable[str]:
        """Yield the exact names registered (patterns are not listed)."""
        return iter(self._exact)

    def __len__(self) -> int:
        return len(self._exact) + self._patterns


def validate_many(filters: str | Iterable[str]) -> tuple[str, ...]:
    """Validate one filter or several and return them as a deduplicated tuple."""
    if isinstance(filters, str):
        return (validate_pattern(filters),)
    out: list[str] = []
    for f in filters:
        validate_pattern(f)
        if f not in out:
            out.append(f)
    if not out:
        raise InvalidTopicError("subscribe needs at least one topic")
    return tuple(out)
