"""The chaos harness's short profile, one scenario per test (``benchmarks/chaos.py --short``).

Each test runs the harness as ``make chaos`` does, in a process of its own:
real ``eventcast serve`` nodes, private ``redis-server``/``nats-server``
processes and a schema of its own on the shared PostgreSQL, real sockets. The
scenario must pass (the history checker found nothing and every check of the
scenario held) and must leave nothing behind. Under
``EVENTCAST_REQUIRE_SERVICES=1`` a missing server binary or service fails the
test instead of skipping it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES, ensure_service

from .conftest import BENCHMARKS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: What each scenario needs besides the hub: server binaries and shared services.
NEEDS: dict[str, tuple[str, ...]] = {
    "steady": (),
    "kill9": (),
    "slow": (),
    "churn": (),
    "redis-backplane": ("redis-server", "postgres"),
    "nats-backplane": ("nats-server", "postgres"),
    "node-kill": ("redis-server", "postgres"),
    "postgres-churn": ("postgres",),
    "redis-log-churn": ("redis-server",),
}
BINARIES = {"redis-server": "redis-server", "nats-server": "/usr/sbin/nats-server"}


def require(need: str) -> None:
    if need == "postgres":
        ensure_service("postgres")
        return
    binary = BINARIES[need]
    if shutil.which(binary) is None:
        message = f"{need} is not installed"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)


def test_every_scenario_is_covered() -> None:
    import chaos  # benchmarks/ is on the path (conftest)

    assert set(NEEDS) == set(chaos.SCENARIOS)


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(name, marks=[pytest.mark.postgres] if "postgres" in needs else [])
        for name, needs in NEEDS.items()
    ],
)
def test_scenario_passes_in_the_short_profile(scenario: str, tmp_path: Path) -> None:
    for need in NEEDS[scenario]:
        require(need)
    results = tmp_path / "results.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "chaos.py"),
            "--short",
            "--only",
            scenario,
            "--json",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    (result,) = json.loads(results.read_text())["runs"]
    assert result["ok"], output
    assert result["scenario"] == scenario
    assert (result["lost"], result["duplicated"], result["out_of_order"]) == (0, 0, 0)
    assert result["delivered"] > 0
    assert {"check": "left behind: nothing", "held": True} in result["checks"]
    assert f"PASS {scenario}" in run.stdout
