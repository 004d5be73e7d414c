"""Interest changes at the instant the Redis subscriber connection dies.

Found by the chaos harness (``benchmarks/chaos.py``, redis-backplane): a node
whose last client left a channel just as the private Redis was SIGKILLed
logged ``background task eventcast-interest failed`` with a traceback. The
lean subscriber raises :class:`BackplaneError` once its transport is closing,
which the Redis backplane's ``subscribe``/``unsubscribe`` did not expect while
its reader had not yet noticed the loss (the state still said connected), so
the bus's interest task died and the node never changed its backplane
subscriptions again. A change made in that instant must instead wait for the
reconnect, which subscribes exactly the filters wanted then.
"""

from __future__ import annotations

import pytest

from eventcast.backplane.redis import RedisBackplane

from .conftest import unique, until

pytestmark = pytest.mark.redis


async def test_interest_changes_while_the_connection_dies_wait_for_the_reconnect(
    redis_service: str,
) -> None:
    url = f"{redis_service}?prefix={unique('bp')}"
    node, publisher = RedisBackplane(url), RedisBackplane(url)
    got: list[bytes] = []
    node.on_messages = got.extend
    try:
        await node.open()
        await publisher.open()
        await node.subscribe("interest.kept")
        await node.subscribe("interest.dropped")
        # The instant the subscriber connection dies, before the reader notices
        # (nothing below yields to the event loop until the first await returns).
        node._pubsub._protocol.transport.abort()
        assert node.connected
        await node.unsubscribe("interest.dropped")
        await node.subscribe("interest.added")
        assert node.filters == {"interest.kept", "interest.added"}
        await until(lambda: node.reconnects >= 1 and node.connected, "the reconnect")
        # Published in this order on one connection, so delivered in this order.
        for topic in ("interest.dropped", "interest.kept", "interest.added"):
            await publisher.publish([(topic, topic.encode())])
        await until(lambda: b"interest.added" in got, "the added filter's message")
        assert got == [b"interest.kept", b"interest.added"]
    finally:
        await node.close()
        await publisher.close()
