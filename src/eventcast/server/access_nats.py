"""Access entries in a NATS JetStream key-value bucket, shared by every node.

The bucket is ``{prefix}_access`` (created if missing, with no age limit:
entries end by their own ``expire_at`` or when removed). Each entry's key is
``<kind>.k<subject>.k<channel>`` (subject and channel base32-encoded behind a
``k``, so any string fits the key alphabet); its value is the JSON array
``[issued_before, expire_at]``. Loading watches every key for its last value
and deletes entries past their ``expire_at``.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ..exceptions import ConfigurationError
from ._kv import NATSBucket, decode_key_token, encode_key_token
from .access import AccessEntry, AccessStore, Key, entry_of

__all__ = ["NATSAccessStore"]

_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,200}$")

_encode = msgspec.json.Encoder().encode
_decode_value = msgspec.json.Decoder(tuple[float, float | None]).decode


def _key(key: Key) -> str:
    kind, subject, channel = key
    return f"{kind}.{encode_key_token(subject)}.{encode_key_token(channel)}"


class NATSAccessStore(AccessStore):
    """:class:`~eventcast.server.access.AccessStore` in a JetStream key-value bucket.

    Args:
        url: ``nats://host:4222`` (several comma-separated servers allowed).
        prefix: the bucket is ``{prefix}_access`` (letters, digits, ``_``, ``-``;
            other characters become ``_``).
        connect_timeout: seconds to reach NATS.
        timeout: seconds to wait for one operation.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "eventcast",
        connect_timeout: float = 5.0,
        timeout: float = 5.0,
    ) -> None:
        bucket = f"{re.sub(r'[^A-Za-z0-9_-]', '_', prefix)}_access"
        if not _BUCKET.match(bucket):
            raise ConfigurationError(f"invalid access store prefix {prefix!r} for NATS")
        self._kv = NATSBucket(
            url,
            bucket=bucket,
            what="the access store",
            connect_timeout=connect_timeout,
            timeout=timeout,
        )
        self.bucket = bucket

    async def open(self) -> None:
        await self._kv.open()

    async def close(self) -> None:
        await self._kv.close()

    async def put(self, entry: AccessEntry) -> None:
        key = _key(entry.key)
        value = _encode((entry.issued_before, entry.expire_at))

        async def put(kv: Any) -> None:
            await kv.put(key, value)

        await self._kv.run("store an entry", put)

    async def remove(self, key: Key) -> None:
        name = _key(key)

        async def purge(kv: Any) -> None:
            await kv.purge(name)

        await self._kv.run("remove an entry", purge)

    async def load(self, now: float) -> list[AccessEntry]:
        live: list[AccessEntry] = []
        dead: list[str] = []
        for item in await self._kv.latest(">"):
            if item.deleted or not item.value:  # a delete or purge marker
                continue
            try:
                kind, subject, channel = item.key.split(".")
                issued_before, expire_at = _decode_value(item.value)
                entry = entry_of(
                    kind,
                    decode_key_token(subject),
                    decode_key_token(channel),
                    issued_before,
                    expire_at,
                )
            except (ValueError, msgspec.DecodeError):
                dead.append(item.key)  # not ours: unreadable
                continue
            if entry is None or not entry.live(now):
                dead.append(item.key)
            else:
                live.append(entry)
        for name in dead:

            async def purge(kv: Any, name: str = name) -> None:
                await kv.purge(name)

            await self._kv.run("delete expired entries", purge)
        return live

    def __repr__(self) -> str:
        return f"<NATSAccessStore bucket={self.bucket!r}>"
