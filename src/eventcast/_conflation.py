"""Latest-value conflation: the newest item per key, in publication order (pure, no I/O).

One rule, used by the bus (``Overflow.CONFLATE``: a subscriber that fell
behind keeps only the newest event per key) and by the hub (a connection that
fell behind on a channel whose namespace sets ``conflation_key`` keeps only the
newest publication per key until its socket drains):

* the key of an event is its topic and the value of the conflation tag
  (:func:`conflation_key`); an event without the tag shares the key of the
  topic's other untagged events;
* appending an item whose key is already held replaces the held one, and the
  new item takes the newest position, so what is held stays in publication
  order and ends with the newest item of every key;
* each item replaced is reported once to ``superseded`` (the caller counts
  it: nothing the reader needs is lost, and the offsets it then receives show
  what it skipped).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from .events import Event

__all__ = ["LatestByKey", "conflation_key"]

_T = TypeVar("_T")


def conflation_key(event: Event, tag: str | None) -> Hashable:
    """The key under which ``event`` replaces older ones: its topic and the value of ``tag``.

    With no tag, the topic alone.
    """
    if tag is None:
        return event.topic
    return (event.topic, event.tags.get(tag))


class LatestByKey(Generic[_T]):
    """A buffer that holds the newest item per key, in the order the newest ones arrived.

    It offers the part of ``deque``'s interface its users need. Its size is
    the number of distinct keys held: the caller bounds it.

    Args:
        key: the key of an item.
        superseded: called with each item replaced by a newer one of its key.
        items: items to start with, oldest first.
    """

    __slots__ = ("_entries", "_key", "_superseded")

    def __init__(
        self,
        key: Callable[[_T], Hashable],
        superseded: Callable[[_T], None],
        items: Iterable[_T] = (),
    ) -> None:
        self._entries: OrderedDict[Hashable, _T] = OrderedDict()
        self._key = key
        self._superseded = superseded
        self.extend(items)

    def append(self, item: _T) -> None:
        """Hold ``item`` as the newest of its key (replacing and reporting an older one)."""
        key = self._key(item)
        old = self._entries.pop(key, None)
        self._entries[key] = item
        if old is not None:
            self._superseded(old)

    def extend(self, items: Iterable[_T]) -> None:
        """Append each item in turn."""
        for item in items:
            self.append(item)

    def popleft(self) -> _T:
        """Remove and return the oldest item held."""
        return self._entries.popitem(last=False)[1]

    def clear(self) -> None:
        """Forget every item."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[_T]:
        return iter(self._entries.values())
