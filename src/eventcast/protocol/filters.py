"""Publication filters over tags: the ``tf`` of a subscribe request (pure).

A subscriber may ask to receive only the publications whose tags match a
filter, a tree of :class:`~.frames.FilterNode` as the SDKs send it (in JSON or
Protobuf, decoded with the rest of the command). The operators and their
meaning follow Centrifugo's publication filtering:

============  ===========================================================================
``cmp``       a leaf (``op`` empty) matches when the tag ``key`` …
============  ===========================================================================
``eq``        is present and equals ``val``
``neq``       is absent or differs from ``val``
``in``        has a value in ``vals`` (an absent tag counts as the empty string)
``nin``       has no value in ``vals`` (likewise)
``ex``        is present
``nex``       is absent
``sw``        is present and starts with ``val``
``ew``        is present and ends with ``val``
``ct``        is present and contains ``val``
``gt``        is present, a decimal number, and greater than ``val``
``gte``       … greater than or equal to ``val``
``lt``        … less than ``val``
``lte``       … less than or equal to ``val``
============  ===========================================================================

A branch combines its ``nodes``: ``and`` (all match), ``or`` (one matches),
``not`` (exactly one node, which must not match).

:func:`compile_filter` validates a tree against :class:`FilterLimits` (the
tree comes from the network: its depth, size and values are bounded) and
turns it into a :class:`TagFilter`: a function of the tags, plus a canonical
key, so that equal filters are equal and hash alike. The hub evaluates each
*distinct* filter once per publication (:class:`MatchCache`), whatever the
number of subscribers that share it.

Beyond Centrifugo's checks, the value of a numeric comparison must itself be
a decimal number (Centrifugo accepts any value and never matches).

Error contract: :func:`compile_filter` raises only :class:`FilterError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, TypeAlias

from .codec import ProtocolError
from .frames import FilterNode

__all__ = [
    "DEFAULT_FILTER_LIMITS",
    "FilterError",
    "FilterLimits",
    "MatchCache",
    "TagFilter",
    "compile_filter",
]

Tags: TypeAlias = Mapping[str, str]
_Predicate: TypeAlias = Callable[[Tags], bool]
# The canonical form of a filter: nested tuples of strings and Decimals.
FilterKey: TypeAlias = tuple[object, ...]


class FilterError(ProtocolError):
    """A tags filter is malformed or over the limits (the hub answers 107 "bad request")."""


@dataclass(frozen=True, slots=True)
class FilterLimits:
    """Bounds on a filter from the network.

    Attributes:
        max_depth: the deepest nesting of nodes (a single leaf is 1).
        max_nodes: the most nodes in the tree.
        max_values: the most values in all ``in``/``nin`` lists together.
        max_number_length: the longest number a numeric comparison parses,
            in characters (a longer tag value does not match).
    """

    max_depth: int = 8
    max_nodes: int = 64
    max_values: int = 256
    max_number_length: int = 64


#: The limits :func:`compile_filter` applies unless told otherwise.
DEFAULT_FILTER_LIMITS: Final = FilterLimits()

_LEAF, _AND, _OR, _NOT = "", "and", "or", "not"
_WITH_VALUE: Final = frozenset({"eq", "neq", "sw", "ew", "ct", "gt", "gte", "lt", "lte"})
_WITH_VALUES: Final = frozenset({"in", "nin"})
_EXISTENCE: Final = frozenset({"ex", "nex"})
_NUMERIC: Final = frozenset({"gt", "gte", "lt", "lte"})
_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _number(text: str | None, max_length: int) -> Decimal | None:
    if text is None or len(text) > max_length or not _NUMBER.fullmatch(text):
        return None
    return Decimal(text)  # the pattern admits only what Decimal parses


class TagFilter:
    """A validated, compiled tags filter: call :meth:`matches` with a publication's tags.

    Two filters with the same meaning in the same form are equal and hash
    alike (``in`` lists compare as sets, numbers by value, the children of
    ``and``/``or`` in any order), so the hub can group subscribers by filter.
    Build one with :func:`compile_filter`.
    """

    __slots__ = ("_hash", "_match", "key", "node")

    def __init__(self, key: FilterKey, match: _Predicate, node: FilterNode) -> None:
        #: The canonical form (nested tuples): equal filters have equal keys.
        self.key = key
        #: The tree it was compiled from.
        self.node = node
        self._match = match
        self._hash = hash(key)

    def matches(self, tags: Tags | None) -> bool:
        """Whether a publication with these tags passes the filter."""
        return self._match(tags or _NO_TAGS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TagFilter):
            return NotImplemented
        return self._hash == other._hash and self.key == other.key

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"TagFilter({self.key!r})"


_NO_TAGS: Final[Tags] = {}


class MatchCache:
    """The result of each distinct filter for one publication, evaluated at most once.

    Create one per publication and call it for each subscriber's filter::

        matches = MatchCache(event.tags)
        for member in members:
            if member.filter is None or matches(member.filter):
                deliver(member)

    Args:
        tags: the publication's tags.
    """

    __slots__ = ("_results", "evaluations", "tags")

    def __init__(self, tags: Tags | None) -> None:
        self.tags: Tags = tags or _NO_TAGS
        self._results: dict[TagFilter, bool] = {}
        #: How many filters were evaluated (each distinct one once).
        self.evaluations = 0

    def __call__(self, tag_filter: TagFilter) -> bool:
        """Whether the publication passes ``tag_filter``."""
        result = self._results.get(tag_filter)
        if result is None:
            result = self._results[tag_filter] = tag_filter._match(self.tags)
            self.evaluations += 1
        return result


def compile_filter(node: FilterNode, *, limits: FilterLimits = DEFAULT_FILTER_LIMITS) -> TagFilter:
    """Validate a filter tree and compile it.

    Raises:
        FilterError: the tree is malformed (an unknown operator, a missing or
            extra value, a ``not`` without exactly one node …) or over
            ``limits``.
    """
    counts = [0, 0]  # nodes, values
    key, match = _compile(node, 1, limits, counts)
    return TagFilter(key, match, node)


def _compile(
    node: FilterNode, depth: int, limits: FilterLimits, counts: list[int]
) -> tuple[FilterKey, _Predicate]:
    if depth > limits.max_depth:
        raise FilterError(f"the filter is nested deeper than {limits.max_depth} levels")
    counts[0] += 1
    if counts[0] > limits.max_nodes:
        raise FilterError(f"the filter has more than {limits.max_nodes} nodes")
    op = node.op
    if op == _LEAF:
        return _compile_leaf(node, limits, counts)
    if op not in (_AND, _OR, _NOT):
        raise FilterError(f"unknown filter op {op!r} (expected '', 'and', 'or' or 'not')")
    if node.key or node.cmp or node.val or node.vals:
        raise FilterError(f"an {op!r} node takes only nodes, not key, cmp, val or vals")
    children = node.nodes or []
    if op == _NOT:
        if len(children) != 1:
            raise FilterError("a 'not' node must have exactly one node")
        key, inner = _compile(children[0], depth + 1, limits, counts)
        return (_NOT, key), lambda tags: not inner(tags)
    if not children:
        raise FilterError(f"an {op!r} node must have at least one node")
    compiled = [_compile(child, depth + 1, limits, counts) for child in children]
    # Canonical order, so that the same conditions in another order are one filter.
    compiled.sort(key=lambda item: repr(item[0]))
    keys = tuple(key for key, _ in compiled)
    predicates = tuple(predicate for _, predicate in compiled)
    if len(predicates) == 1:
        return (op, keys), predicates[0]
    if op == _AND:

        def all_match(tags: Tags) -> bool:
            return all(predicate(tags) for predicate in predicates)

        return (op, keys), all_match

    def any_match(tags: Tags) -> bool:
        return any(predicate(tags) for predicate in predicates)

    return (op, keys), any_match


def _compile_leaf(
    node: FilterNode, limits: FilterLimits, counts: list[int]
) -> tuple[FilterKey, _Predicate]:
    cmp, key, val, vals = node.cmp, node.key, node.val, node.vals or []
    if node.nodes:
        raise FilterError("a comparison (op '') takes no nodes")
    if not cmp:
        raise FilterError("a comparison (op '') needs cmp")
    if cmp in _WITH_VALUE:
        if not val or vals:
            raise FilterError(f"{cmp!r} needs val, and no vals")
    elif cmp in _WITH_VALUES:
        if not vals or val:
            raise FilterError(f"{cmp!r} needs a non-empty vals, and no val")
        counts[1] += len(vals)
        if counts[1] > limits.max_values:
            raise FilterError(f"the filter has more than {limits.max_values} values")
    elif cmp in _EXISTENCE:
        if val or vals:
            raise FilterError(f"{cmp!r} takes no val or vals")
    else:
        raise FilterError(f"unknown comparison {cmp!r}")
    if not key and cmp not in _EXISTENCE:
        raise FilterError(f"{cmp!r} needs a key")
    return _predicate(cmp, key, val, vals, limits.max_number_length)


def _predicate(
    cmp: str, key: str, val: str, vals: list[str], max_length: int
) -> tuple[FilterKey, _Predicate]:
    # One closure per operator, so that evaluating a leaf is one dict lookup
    # and one comparison.
    if cmp == "eq":
        return (cmp, key, val), lambda tags: tags.get(key) == val
    if cmp == "neq":
        return (cmp, key, val), lambda tags: tags.get(key) != val
    if cmp in _WITH_VALUES:
        values = frozenset(vals)
        canonical = (cmp, key, tuple(sorted(values)))
        if cmp == "in":
            return canonical, lambda tags: tags.get(key, "") in values
        return canonical, lambda tags: tags.get(key, "") not in values
    if cmp == "ex":
        return (cmp, key), lambda tags: key in tags
    if cmp == "nex":
        return (cmp, key), lambda tags: key not in tags
    # ``val`` is not empty, so an absent tag ("") never matches these three.
    if cmp == "sw":
        return (cmp, key, val), lambda tags: tags.get(key, "").startswith(val)
    if cmp == "ew":
        return (cmp, key, val), lambda tags: tags.get(key, "").endswith(val)
    if cmp == "ct":
        return (cmp, key, val), lambda tags: val in tags.get(key, "")
    bound = _number(val, max_length)
    if bound is None:
        raise FilterError(f"{cmp!r} needs a decimal number as val, not {val[:32]!r}")
    compare = _COMPARE[cmp]

    def numeric(tags: Tags) -> bool:
        number = _number(tags.get(key), max_length)
        return number is not None and compare(number, bound)

    return (cmp, key, bound.normalize()), numeric


_COMPARE: Final[dict[str, Callable[[Decimal, Decimal], bool]]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}
