"""The pytest plugin: its fixtures under pytest-asyncio and under anyio, and its cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

import eventcast.testing.pytest_plugin

FIXTURE_TESTS = """
import pytest

from eventcast import Bus
from eventcast.client import Client
from eventcast.testing import TestHub, wait_for_publication

{mark}

CLIENTS = []


async def test_hub_and_clients(eventcast_hub, eventcast_client):
    assert isinstance(eventcast_hub, TestHub)
    alice = await eventcast_client(user="alice")
    bob = await eventcast_client(user="bob")
    assert isinstance(alice, Client) and alice.connected
    async with bob.subscribe("chat") as sub:
        await alice.publish("chat", {{"text": "hi"}})
        event = await wait_for_publication(sub)
    assert event.data == {{"text": "hi"}}
    await eventcast_hub.disconnect(alice)
    await alice.publish("chat", "back")  # reconnected by itself
    CLIENTS.extend((alice, bob))


def test_clients_were_closed_after_the_test():
    assert len(CLIENTS) == 2
    assert all(client.closed for client in CLIENTS)


async def test_bus(eventcast_bus):
    assert isinstance(eventcast_bus, Bus)
    async with eventcast_bus.subscribe("jobs.>") as sub:
        await eventcast_bus.publish("jobs.a.b", 1)
        assert (await wait_for_publication(sub)).data == 1
"""


def test_the_fixtures_under_pytest_asyncio(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    pytester.makepyfile(test_fixtures=FIXTURE_TESTS.format(mark=""))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_fixtures_under_anyio(pytester: pytest.Pytester) -> None:
    pytest.importorskip("anyio")
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(
        conftest="import pytest\n\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n",
        test_fixtures=FIXTURE_TESTS.format(mark="pytestmark = pytest.mark.anyio"),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=3)


def test_the_plugin_is_registered_and_imports_nothing_heavy() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="pytest11") if e.name == "eventcast"]
    assert entry.load() is eventcast.testing.pytest_plugin
    code = (
        "import sys\n"
        "import eventcast.testing.pytest_plugin\n"
        "heavy = {'starlette', 'httpx', 'websockets', 'eventcast.server.hub'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_the_kit_exports_its_names_lazily() -> None:
    import eventcast
    import eventcast.testing as kit

    assert kit.__all__ == sorted(kit.__all__)
    for name in kit.__all__:
        assert getattr(kit, name) is not None
        assert name in dir(kit)
    with pytest.raises(AttributeError):
        _ = kit.NoSuchName  # type: ignore[attr-defined]
    assert "InvalidDataError" in eventcast.__all__
