"""Shared fixtures: real services on 127.0.0.1, started if they are down.

Under ``EVENTCAST_REQUIRE_SERVICES=1`` (set by ``.ci/run``) a service that
cannot be reached fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

#: ``make fuzz``: the fuzz tests of tests/fuzz with many more examples (``--hypothesis-profile``);
#: ``EVENTCAST_FUZZ_EXAMPLES`` sets how many (5,000 by default: a few minutes).
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("EVENTCAST_FUZZ_EXAMPLES", "5000"))
)

REQUIRE_SERVICES = os.environ.get("EVENTCAST_REQUIRE_SERVICES", "") not in ("", "0")

#: How each shared service is started when it is down (from SERVICES.md).
START_COMMANDS: dict[str, str] = {
    "postgres": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "redis": (
        "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' "
        "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
    ),
    "nats": (
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
        "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
    ),
    "rabbitmq": "rabbitmq-server -detached",
    "mosquitto": "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
}
PORTS = {"postgres": 5432, "redis": 6379, "nats": 4222, "rabbitmq": 5672, "mosquitto": 1883}

#: A token unique to this test run, for database schemas, key and subject prefixes.
RUN_ID = uuid.uuid4().hex[:10]


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


_checked: dict[str, bool] = {}


def ensure_service(name: str) -> None:
    """Make sure a shared service is up, starting it if needed; else skip or fail."""
    if name not in _checked:
        port = PORTS[name]
        ok = _reachable(port)
        if not ok:
            subprocess.run(START_COMMANDS[name], shell=True, check=False, timeout=60)
            deadline = time.monotonic() + 30
            while not ok and time.monotonic() < deadline:
                time.sleep(0.2)
                ok = _reachable(port)
        _checked[name] = ok
    if not _checked[name]:
        message = f"{name} is not reachable on 127.0.0.1:{PORTS[name]} and could not be started"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)


#: The npm packages the tests run on node (tests/js, installed by scripts/setup.sh).
JS_DIR = Path(__file__).resolve().parent / "js"


def node_with(package: str) -> str:
    """Return the node executable once ``package`` is installed in tests/js.

    Skips without node; without the package, skips, or fails under
    ``EVENTCAST_REQUIRE_SERVICES``.
    """
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (JS_DIR / "node_modules" / package / "package.json").is_file():
        message = "tests/js/node_modules is missing: run scripts/setup.sh (make install)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return node


@pytest.fixture
def run_id() -> str:
    """A token unique to this test run."""
    return RUN_ID


@pytest.fixture
def postgres_service() -> Iterator[str]:
    """The shared PostgreSQL server's URL (database ``test``)."""
    ensure_service("postgres")
    return "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def redis_service() -> Iterator[str]:
    """The shared Redis server's URL."""
    ensure_service("redis")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def nats_service() -> Iterator[str]:
    """The shared NATS server's URL."""
    ensure_service("nats")
    return "nats://127.0.0.1:4222"
