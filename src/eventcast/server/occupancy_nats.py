"""Channel occupancy shared by every node, in a NATS JetStream key-value bucket.

The bucket is ``{prefix}_occupancy``. An occupied channel has one entry (its
key is the channel, encoded as presence encodes it), whose value is the JSON
``{"shares": {node: expiry}}`` (wall-clock seconds: nodes' clocks are assumed
to be roughly in sync, as for presence). Every change reads the entry and
writes it back only if its revision did not move meanwhile (compare-and-set),
trying again on a conflict, so exactly one node sees a channel become occupied
or vacated.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from ..exceptions import BackplaneError
from ._kv import decode_key_token, encode_key_token
from .occupancy import SWEEP_LIMIT, Change, Occupancy

if TYPE_CHECKING:
    from .presence_nats import NATSPresence

__all__ = ["NATSOccupancy"]

#: Compare-and-set attempts of one change before giving up (a busy channel).
_ATTEMPTS: Final = 20
#: JetStream's error codes for a failed "expected last subject sequence" check.
_WRONG_LAST_SEQUENCE: Final = (10071, 10164)

_T = TypeVar("_T")
_encode = msgspec.json.Encoder().encode


class _Value(msgspec.Struct):
    shares: dict[str, float] = msgspec.field(default_factory=dict)


_decode = msgspec.json.Decoder(_Value).decode


class NATSOccupancy(Occupancy):
    """:class:`~eventcast.server.occupancy.Occupancy` in the NATS of a ``NATSPresence``.

    Args:
        presence: the presence store whose connection (and prefix) it shares.
        clock: the wall clock (seconds since the epoch), injectable for tests.
    """

    def __init__(self, presence: NATSPresence, *, clock: Callable[[], float] = time.time) -> None:
        self._presence = presence
        self._clock = clock
        self.bucket = f"{presence.prefix}_occupancy"
        self._kv: Any = None
        self._lock = asyncio.Lock()

    async def _store(self) -> Any:
        if self._kv is not None:
            return self._kv
        from nats.errors import Error as NATSError
        from nats.js.errors import BucketNotFoundError

        async with self._lock:
            if self._kv is None:
                js = await self._presence.jetstream()
                try:
                    async with asyncio.timeout(self._presence.timeout):
                        try:
                            self._kv = await js.key_value(self.bucket)
                        except BucketNotFoundError:
                            self._kv = await js.create_key_value(bucket=self.bucket, history=1)
                except (NATSError, OSError, TimeoutError) as exc:
                    raise BackplaneError(
                        f"cannot open the NATS occupancy bucket {self.bucket!r}: "
                        f"{type(exc).__name__}"
                    ) from exc
        return self._kv

    async def _cas(self, action: str, change: Callable[[Any], Awaitable[_T | None]]) -> _T:
        """Run ``change(bucket)`` until it returns a value (``None``: a conflict, try again)."""
        from nats.errors import Error as NATSError

        kv = await self._store()
        try:
            for _ in range(_ATTEMPTS):
                async with asyncio.timeout(self._presence.timeout):
                    result = await change(kv)
                if result is not None:
                    return result
        except (NATSError, OSError, TimeoutError) as exc:
            raise BackplaneError(f"occupancy could not {action}: {type(exc).__name__}") from exc
        raise BackplaneError(f"occupancy could not {action}: too many concurrent changes")

    @staticmethod
    async def _read(kv: Any, key: str) -> tuple[_Value | None, int]:
        """The entry's value and revision (``None, revision`` when absent or deleted)."""
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            entry = await kv.get(key)
        except KeyDeletedError as exc:
            return None, exc.entry.revision if exc.entry is not None else 0
        except KeyNotFoundError:
            return None, 0
        try:
            return _decode(entry.value or b""), entry.revision
        except msgspec.DecodeError:
            return _Value(), entry.revision  # unreadable: no live share

    @staticmethod
    async def _write(kv: Any, key: str, value: _Value | None, revision: int) -> bool:
        """Write (or delete, for ``None``) if the revision did not move; False on a conflict."""
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        try:
            if value is None:
                await kv.delete(key, last=revision)
            elif revision:
                await kv.update(key, _encode(value), last=revision)
            else:
                await kv.create(key, _encode(value))
        except KeyWrongLastSequenceError:
            return False
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    def _live(self, value: _Value) -> dict[str, float]:
        now = self._clock()
        return {node: expiry for node, expiry in value.shares.items() if expiry > now}

    async def join(self, channel: str, node: str, ttl: float) -> Change:
        key = encode_key_token(channel)

        async def change(kv: Any) -> Change | None:
            value, revision = await self._read(kv, key)
            if value is None:
                result = Change.OCCUPIED
                shares: dict[str, float] = {}
            else:
                shares = self._live(value)
                result = Change.NONE if shares else Change.REOCCUPIED
            shares[node] = self._clock() + ttl
            if await self._write(kv, key, _Value(shares), revision if value is not None else 0):
                return result
            return None

        return await self._cas("record a channel's occupancy", change)

    async def _vacate(self, channel: str, node: str) -> bool:
        key = encode_key_token(channel)

        async def change(kv: Any) -> bool | None:
            value, revision = await self._read(kv, key)
            if value is None:
                return False
            shares = self._live(value)
            shares.pop(node, None)
            if shares:
                if node not in value.shares and len(shares) == len(value.shares):
                    return False  # nothing to change
                done = await self._write(kv, key, _Value(shares), revision)
                return False if done else None
            return True if await self._write(kv, key, None, revision) else None

        return await self._cas("release a channel's occupancy", change)

    async def leave(self, channel: str, node: str) -> bool:
        return await self._vacate(channel, node)

    async def sweep(self, limit: int = SWEEP_LIMIT) -> list[str]:
        from nats.errors import Error as NATSError
        from nats.js.errors import NoKeysError

        kv = await self._store()
        try:
            async with asyncio.timeout(self._presence.timeout):
                keys: list[str] = await kv.keys()
        except NoKeysError:
            return []
        except (NATSError, OSError, TimeoutError) as exc:
            raise BackplaneError(
                f"occupancy could not list channels: {type(exc).__name__}"
            ) from exc
        # A random window: live channels beyond the limit must not hide expired ones.
        random.shuffle(keys)
        vacated: list[str] = []
        for key in keys[:limit]:
            channel = decode_key_token(key)
            if await self._vacate(channel, ""):
                vacated.append(channel)
        return vacated

    def __repr__(self) -> str:
        return f"<NATSOccupancy bucket={self.bucket!r}>"
