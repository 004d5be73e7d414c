"""Helpers of the JetStream log's tests: list and delete the streams of one test's prefix."""

from __future__ import annotations

import nats


async def stream_names(nats_url: str, prefix: str) -> list[str]:
    """The streams whose name starts with ``prefix_`` (a test's own)."""
    nc = await nats.connect(nats_url)
    try:
        infos = await nc.jetstream().streams_info()
    finally:
        await nc.close()
    return sorted(
        name for info in infos if (name := info.config.name or "").startswith(f"{prefix}_")
    )


async def delete_streams(nats_url: str, prefix: str) -> None:
    """Delete every stream of a test's prefix, and only those."""
    names = await stream_names(nats_url, prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for name in names:
            await js.delete_stream(name)
    finally:
        await nc.close()


async def subjects(nats_url: str, stream: str) -> dict[str, int]:
    """The subjects of a stream with their message counts."""
    nc = await nats.connect(nats_url)
    try:
        state = (await nc.jetstream().stream_info(stream, subjects_filter=">")).state
    finally:
        await nc.close()
    return dict(state.subjects or {})
