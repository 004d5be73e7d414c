"""Fossil deltas: the ``delta: "fossil"`` compression of the Centrifuge protocol (pure).

A subscription that negotiated deltas receives each publication's data either
in full or as a delta against the data of the previous publication it
received, whichever is smaller. The format is Fossil's (``delta_format.wiki``
of fossil-scm), which the SDKs apply:

* a **header**: the target's length, then ``\\n``;
* **segments**: ``<count>@<offset>,`` copies ``count`` bytes of the source
  from ``offset``, and ``<count>:`` followed by ``count`` bytes inserts them;
* a **trailer**: a checksum of the target, then ``;``.

Numbers are written most significant digit first in base 64, with the digits
``0-9 A-Z _ a-z ~``. The checksum is the sum, modulo 2**32, of the target read
as big-endian 32-bit words (the last one padded with zero bytes).

:func:`create` runs once per publication and delta base, not once per
connection, and is written for that: it follows the target through the
source with C-level ``find`` and slice comparisons, so a document with a few
changed fields costs a few probes per change rather than a step per byte; only
when the target wanders far from the source does it index the source by
blocks, as Fossil's encoder does. Any valid delta is accepted by every applier; this one is not
byte-identical to Fossil's C encoder, and need not be.

Error contract: :func:`apply` raises only :class:`DeltaError`.
"""

from __future__ import annotations

import sys
from array import array
from typing import Final

from .codec import ProtocolError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "FOSSIL",
    "DeltaError",
    "apply",
    "create",
    "smaller_delta",
]

#: The delta type a subscribe request names (``SubscribeRequest.delta``).
FOSSIL: Final = "fossil"
#: The largest target :func:`apply` builds unless told otherwise, in bytes.
DEFAULT_MAX_SIZE: Final = 16 * 1024 * 1024

_DIGITS: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUE: Final = {digit: value for value, digit in enumerate(_DIGITS)}
# 11 digits hold 66 bits: more than any size or checksum (a checksum is 32 bits).
_MAX_DIGITS: Final = 11
# The shortest match looked for: a copy command of 16 bytes always costs less
# than inserting them.
_BLOCK: Final = 16
# Probing near the expected offset: the reach of the window each side, and the
# step between probes (a common run of _BLOCK + _STRIDE - 1 bytes is found).
_WINDOW: Final = 48
_STRIDE: Final = 8
# How far the target may go without a nearby match before the source is indexed.
_LOCAL_REACH: Final = 2 * _WINDOW
# Candidate source offsets kept per indexed block (repeated blocks are common in JSON).
_CANDIDATES: Final = 4
_NEWLINE, _AT, _COMMA, _COLON, _SEMICOLON = b"\n@,:;"

_WORD: Final = next(code for code in "IL" if array(code).itemsize == 4)


class DeltaError(ProtocolError):
    """A delta is malformed or does not apply to the source it is given."""


def _int(value: int) -> bytes:
    if value == 0:
        return b"0"
    out = bytearray()
    while value:
        out.append(_DIGITS[value & 63])
        value >>= 6
    out.reverse()
    return bytes(out)


def _checksum(data: bytes) -> int:
    # Sum of big-endian 32-bit words: read native words and swap them on a
    # little-endian machine, so the sum runs in C.
    pad = -len(data) % 4
    words = array(_WORD, data + b"\0" * pad if pad else data)
    if sys.byteorder == "little":
        words.byteswap()
    return sum(words) & 0xFFFFFFFF


def _common_prefix(a: bytes, i: int, b: bytes, j: int) -> int:
    """The length of the common prefix of ``a[i:]`` and ``b[j:]``."""
    high = min(len(a) - i, len(b) - j)
    if a[i : i + high] == b[j : j + high]:
        return high
    low = 0  # a[i:i+low] == b[j:j+low] and a[i:i+high] != b[j:j+high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[i + low : i + mid] == b[j + low : j + mid]:
            low = mid
        else:
            high = mid
    return low


def _common_suffix(a: bytes, i: int, b: bytes, j: int, limit: int) -> int:
    """The length of the common suffix of ``a[:i]`` and ``b[:j]``, at most ``limit``."""
    if limit <= 0:
        return 0
    if a[i - limit : i] == b[j - limit : j]:
        return limit
    low, high = 0, limit
    while high - low > 1:
        mid = (low + high) // 2
        if a[i - mid : i - low] == b[j - mid : j - low]:
            low = mid
        else:
            high = mid
    return low


def _index(source: bytes) -> dict[bytes, list[int]]:
    index: dict[bytes, list[int]] = {}
    for offset in range(0, len(source) - _BLOCK + 1, _BLOCK):
        offsets = index.setdefault(source[offset : offset + _BLOCK], [])
        if len(offsets) < _CANDIDATES:
            offsets.append(offset)
    return index


def create(source: bytes, target: bytes) -> bytes:
    """Return a fossil delta that turns ``source`` into ``target``.

    ``apply(source, create(source, target)) == target`` for any two byte
    strings; the delta may be larger than ``target`` when they share little
    (see :func:`smaller_delta`).
    """
    # Two ways to find where the target continues in the source after a change:
    # * near where it would be if the change kept the length (a window around the
    #   "expected" offset): the common case of edited fields, found with one
    #   C-level find() per probe, probing every _STRIDE bytes;
    # * anywhere (moved or repeated content): an index of the source's aligned
    #   blocks, probed at every byte. It is built only once _LOCAL_REACH bytes
    #   of the target were found nowhere near.
    # A match is then extended backwards over the bytes skipped between probes,
    # and forwards, with slice comparisons.
    size = len(target)
    out = [_int(size), b"\n"]
    literal = 0  # start of the target bytes not yet emitted
    if len(source) >= _BLOCK and size >= _BLOCK:
        find = source.find
        index: dict[bytes, list[int]] | None = None
        anchor = 0  # the source offset matching target offset ``literal``
        inserted = 0  # target bytes emitted as inserts so far
        position = 0
        last = size - _BLOCK
        while position <= last:
            block = target[position : position + _BLOCK]
            near = position - literal < _LOCAL_REACH
            found = -1
            if near or index is None:
                expected = anchor + position - literal
                found = find(block, max(0, expected - _WINDOW), expected + _WINDOW + _BLOCK)
            if index is None:
                if found < 0:
                    if inserted + position - literal < _LOCAL_REACH:
                        position += _STRIDE
                        continue
                    # Too much of the target found nowhere near: index the
                    # source, and look again at the bytes probed only nearby.
                    index = _index(source)
                    position = literal
                    continue
            else:
                # The content moves around: the nearby match may be a repeated
                # block, so it competes with the indexed ones.
                candidates = index.get(block, [])
                if found >= 0:
                    candidates = [found, *candidates]
                if not candidates:
                    position += 1
                    continue
                found = max(
                    candidates,
                    key=lambda offset: _common_prefix(target, position, source, offset),
                )
            back = _common_suffix(target, position, source, found, min(position - literal, found))
            start = position - back
            origin = found - back
            after = _common_prefix(target, position + _BLOCK, source, found + _BLOCK)
            length = back + _BLOCK + after
            if start > literal:
                out += (_int(start - literal), b":", target[literal:start])
                inserted += start - literal
            out += (_int(length), b"@", _int(origin), b",")
            position = literal = start + length
            anchor = origin + length
    if literal < size:
        out += (_int(size - literal), b":", target[literal:])
    out += (_int(_checksum(target)), b";")
    return b"".join(out)


def smaller_delta(source: bytes, target: bytes) -> bytes | None:
    """Return the delta from ``source`` to ``target`` if smaller than ``target``, else ``None``."""
    delta = create(source, target)
    return delta if len(delta) < len(target) else None


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def integer(self) -> int:
        data = self.data
        start = pos = self.pos
        end = min(len(data), start + _MAX_DIGITS + 1)
        value = 0
        while pos < end:
            digit = _VALUE.get(data[pos])
            if digit is None:
                break
            value = (value << 6) | digit
            pos += 1
        if pos == start:
            raise DeltaError(f"expected a number at byte {start} of the delta")
        if pos - start > _MAX_DIGITS:
            raise DeltaError(f"number too large at byte {start} of the delta")
        self.pos = pos
        return value

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise DeltaError("the delta ends in the middle of a command")
        byte = self.data[self.pos]
        self.pos += 1
        return byte


def apply(source: bytes, delta: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Apply a fossil delta to ``source`` and return the target.

    Args:
        source: the data the delta was made against.
        delta: the delta.
        max_size: the largest target to build, in bytes (the size is read from
            the delta's header before anything is built).

    Raises:
        DeltaError: the delta is malformed, does not fit ``source``, announces
            a target over ``max_size``, or its checksum does not match.
    """
    reader = _Reader(bytes(delta))
    size = reader.integer()
    if reader.byte() != _NEWLINE:
        raise DeltaError("the delta's size is not followed by a newline")
    if size > max_size:
        raise DeltaError(f"the delta's target of {size} bytes is over the limit of {max_size}")
    data = reader.data
    out = bytearray()
    while reader.pos < len(data):
        count = reader.integer()
        op = reader.byte()
        if op == _AT:
            offset = reader.integer()
            if reader.byte() != _COMMA:
                raise DeltaError("a copy command is not terminated by ','")
            if len(out) + count > size:
                raise DeltaError("a copy command exceeds the target's size")
            if offset + count > len(source):
                raise DeltaError("a copy command reads past the end of the source")
            out += source[offset : offset + count]
        elif op == _COLON:
            if len(out) + count > size:
                raise DeltaError("an insert command exceeds the target's size")
            start = reader.pos
            if start + count > len(data):
                raise DeltaError("an insert command runs past the end of the delta")
            out += data[start : start + count]
            reader.pos = start + count
        elif op == _SEMICOLON:
            if len(out) != size:
                raise DeltaError(f"the delta built {len(out)} bytes, not the {size} announced")
            target = bytes(out)
            if _checksum(target) != count:
                raise DeltaError("the target's checksum does not match the delta's")
            return target
        else:
            raise DeltaError(f"unknown delta command {bytes((op,))!r}")
    raise DeltaError("the delta has no trailer")
