from eventcast.demo import run_demo


async def test_seed_scenario():
    """Three subscribers, publish, unsubscribe client2, publish again."""
    got = await run_demo()
    assert got["client1"] == [
        "orders={'order_id': 1, 'item': 'book'}",
        "notifications=order 1 received",
        "orders={'order_id': 2, 'item': 'pen'}",
    ]
    assert got["client2"] == ["orders={'order_id': 1, 'item': 'book'}"]
    assert got["client3"] == ["orders.shipped={'order_id': 1}"]
