"""The cache of checked channel names is sized from the channels in use."""

from __future__ import annotations

import pytest

import eventcast._caches as caches
from eventcast.server.config import Settings
from eventcast.server.hub import Hub


@pytest.mark.parametrize("in_use", [0, 50])
def test_checked_names_stay_cached_up_to_the_limit_of_the_channels_in_use(
    monkeypatch: pytest.MonkeyPatch, in_use: int
) -> None:
    monkeypatch.setattr(caches, "TOPIC_SPARE", 8)
    hub = Hub(Settings.load(namespaces=[{"name": "room"}]))
    permissions = hub.permissions
    monkeypatch.setattr(permissions, "_in_use", lambda: in_use)
    checks = 0
    check = permissions._check

    def counted(channel: str, allow_pattern: bool) -> object:
        nonlocal checks
        checks += 1
        return check(channel, allow_pattern)

    monkeypatch.setattr(permissions, "_check", counted)
    names = [f"room:r{i}" for i in range(40)]
    for _ in range(3):
        for name in names:
            assert permissions.channel(name).name == "room"
    # 40 names: re-checked on every round past the bound of 8, once each within 108.
    assert checks == (120 if in_use == 0 else 40)
    assert len(permissions._checked[False]) <= caches.topic_limit(in_use)


def test_the_hub_sizes_its_checks_from_its_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub(Settings.load())
    assert hub.permissions._in_use() == 0
    monkeypatch.setitem(hub.channels.by_name, "room:x", None)  # type: ignore[arg-type]
    assert hub.permissions._in_use() == 1
