"""The seed scenario, printed to the terminal: ``python -m eventcast.demo``.

Three subscribers, a publish, client2 unsubscribes, another publish.
"""

from __future__ import annotations

import asyncio

from .bus import Bus
from .subscription import Overflow, Subscription

__all__ = ["main"]


async def _drain(sub: Subscription) -> list[str]:
    received: list[str] = []
    while (event := sub.get_nowait()) is not None:
        received.append(f"{event.topic}={event.data}")
    return received


async def run_demo() -> dict[str, list[str]]:
    """Run the seed scenario and return what each client received."""
    async with Bus() as bus:
        subs = {
            "client1": bus.subscribe(["orders", "notifications"], id="client1", maxsize=10),
            "client2": bus.subscribe(
                ["orders"], id="client2", maxsize=10, overflow=Overflow.DROP_NEWEST
            ),
            "client3": bus.subscribe("orders.*", id="client3"),
        }
        await bus.publish("orders", {"order_id": 1, "item": "book"})
        await bus.publish("notifications", "order 1 received")
        await bus.publish("orders.shipped", {"order_id": 1})
        got = {name: await _drain(sub) for name, sub in subs.items()}
        await bus.unsubscribe("client2")
        await bus.publish("orders", {"order_id": 2, "item": "pen"})
        for name, sub in subs.items():
            if not sub.closed:
                got[name] += await _drain(sub)
        return got


def main() -> None:
    """Print the seed scenario's deliveries."""
    result = asyncio.run(run_demo())
    for name, received in result.items():
        print(f"{name}: {received}")


if __name__ == "__main__":
    main()
