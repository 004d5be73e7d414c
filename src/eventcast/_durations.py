"""Durations in seconds, from numbers or Centrifugo's (Go's) strings such as ``"5m"``.

Used by the hub's settings and by the consumers' options (:mod:`eventcast.ingest`).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Final

from pydantic import BeforeValidator

__all__ = ["Duration", "parse_duration"]

_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # micro sign
    "μs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(value: object) -> float:
    """Parse a duration into seconds.

    Accepts a number of seconds (``>= 0``, finite) or Centrifugo's (Go's) string
    form: one or more ``<number><unit>`` parts with units ``ns``, ``us``, ``ms``,
    ``s``, ``m``, ``h`` (``"300s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"0s"``).
    A string holding just a number is taken as seconds.

    Raises:
        ValueError: the value is not a valid duration (the message says why).
    """
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _parse_duration_string(text)
    else:
        raise ValueError(
            f"a duration must be a number of seconds or a string like '5m', "
            f"not {type(value).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and >= 0, got {value!r}")
    return seconds


def _parse_duration_string(text: str) -> float:
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(
            f"invalid duration {text!r}: use a number of seconds or a string such as "
            "'300s', '5m', '1h30m' or '500ms' (units: ns, us, ms, s, m, h)"
        )
    return total


#: Seconds, from a number or a string such as ``"5m"``.
Duration = Annotated[float, BeforeValidator(parse_duration)]
