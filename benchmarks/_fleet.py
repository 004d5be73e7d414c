"""Private servers of the chaos harness: hub nodes, ``redis-server``, ``nats-server``, schemas.

A :class:`Fleet` owns everything one scenario starts: real ``eventcast serve``
processes, a private ``redis-server`` or ``nats-server`` on free ports, a
PostgreSQL schema of its own on the shared server, and one temporary
directory for their data and logs. Closing the fleet (also on an error or
Ctrl-C) kills every process it started *by its process id*, reaps it, drops
the schema and removes the directory: nothing is left behind. Each child is
also started in its own session (a Ctrl-C in the terminal reaches only the
harness, which then stops them in order) and with ``PR_SET_PDEATHSIG``, so
even a harness killed with SIGKILL takes its servers with it.

Servers are started from the event loop's thread (the parent-death signal is
tied to the thread that forks), and waited for by polling their port: they
are external processes, nothing in them can signal readiness to us.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import httpx

__all__ = ["DEADLINE", "Fleet", "HubNode", "Proc", "free_port"]

#: Bound of every wait on an external process (a safety deadline, never a delay).
DEADLINE: Final = 30.0
#: The secrets of the private hubs (they listen on 127.0.0.1 only).
SECRET: Final = "chaos-harness-hmac-secret-" + "x" * 32
API_KEY: Final = "chaos-harness-api-key"
_PR_SET_PDEATHSIG: Final = 1
_POLL: Final = 0.05


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _answers(port: int, probe: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if probe:
                sock.sendall(probe)
            return sock.recv(64).startswith(expect)
    except OSError:
        return False


class Proc:
    """A child process, its output in a log file; signalled and reaped by its pid."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: Mapping[str, str], port: int = 0
    ) -> None:
        self.name = name
        self.port = port
        self.argv = argv
        self.log = log
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        """The current process's id."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    def spawn(self) -> None:
        """Start the process (again, after a kill), appending to the same log."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running")
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(b"\n--- start %d ---\n" % self.starts)
            out.flush()
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                # Only prctl() runs between fork and exec: no lock of ours is taken there.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, by pid: no goodbye to anyone. Reaps the process."""
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(DEADLINE)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL past ``grace`` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, grace)
        self.kill()

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition`` (in a thread) until it holds; fail if the process dies."""
        deadline = time.monotonic() + DEADLINE
        while not await asyncio.to_thread(condition):
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.tail()}")
            await asyncio.sleep(_POLL)

    def rss_mib(self) -> float | None:
        """The resident set size, in MiB (``None`` when the process is gone)."""
        if not self.alive():
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def output(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        """The last lines of the output."""
        return "\n".join(self.output().splitlines()[-lines:])


class HubNode(Proc):
    """One ``eventcast serve`` process; the same port and data across restarts."""

    def __init__(self, name: str, port: int, log: Path, env: Mapping[str, str]) -> None:
        argv = [sys.executable, "-m", "eventcast", "serve", "--port", str(port)]
        super().__init__(name, argv, log, env, port)
        self.up = False

    @property
    def base(self) -> str:
        """The HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    async def start(self) -> None:
        """Start the process and return once ``/healthz`` answers 200."""
        self.spawn()
        await self.wait_until(self._healthy, f"{self.name} to answer /healthz")
        self.up = True

    def kill(self) -> None:
        self.up = False
        super().kill()

    async def stop(self, grace: float = 10.0) -> None:
        self.up = False
        await super().stop(grace)

    def tracebacks(self) -> int:
        """How many tracebacks the node wrote (a defect: errors are logged in one line)."""
        return self.output().count("Traceback (most recent call last)")


class Fleet:
    """Everything one scenario starts; :meth:`close` leaves nothing behind.

    Args:
        name: a label for the temporary directory.
        keep: keep the directory (data and logs) after closing, for a post-mortem.
    """

    def __init__(self, name: str, *, keep: bool = False) -> None:
        self.token = uuid.uuid4().hex[:8]
        self.dir = Path(tempfile.mkdtemp(prefix=f"eventcast-chaos-{name}-"))
        self.keep = keep
        self.procs: list[Proc] = []
        self.schemas: list[tuple[str, str]] = []
        self.closed = False

    # -- servers ---------------------------------------------------------------------------

    def hub(self, settings: Mapping[str, Any]) -> HubNode:
        """A hub node (not started): ``settings`` become ``EVENTCAST_*`` variables.

        Without a ``log_url`` the node gets an SQLite log in its own directory,
        which survives its restarts.
        """
        index = sum(isinstance(p, HubNode) for p in self.procs)
        name = f"node{index}"
        data = self.dir / name
        data.mkdir()
        values: dict[str, Any] = {
            "token_hmac_secret": SECRET,
            "api_key": API_KEY,
            "node_name": name,
            "log_level": "warning",
            "log_url": f"sqlite:///{data}/events.db",
            **settings,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTCAST_")}
        for key, value in values.items():
            env[f"EVENTCAST_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        node = HubNode(name, free_port(), self.dir / f"{name}.log", env)
        self.procs.append(node)
        return node

    async def redis(self) -> tuple[Proc, str]:
        """A private ``redis-server`` (no persistence), started; and its URL."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        port = free_port()
        data = self.dir / f"redis{port}"
        data.mkdir()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--daemonize", "no", "--dir", str(data)]
        proc = Proc(f"redis:{port}", argv, self.dir / f"redis{port}.log", os.environ, port)
        self.procs.append(proc)
        await self.restart(proc)
        return proc, f"redis://127.0.0.1:{port}/0"

    async def nats(self) -> tuple[Proc, str]:
        """A private ``nats-server`` (JetStream on, for presence), started; and its URL."""
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not os.access(binary, os.X_OK):
            raise RuntimeError("nats-server is not installed")
        port = free_port()
        data = self.dir / f"nats{port}"
        data.mkdir()
        argv = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)]
        proc = Proc(f"nats:{port}", argv, self.dir / f"nats{port}.log", os.environ, port)
        self.procs.append(proc)
        await self.restart(proc)
        return proc, f"nats://127.0.0.1:{port}"

    async def restart(self, proc: Proc) -> None:
        """(Re)start a private Redis or NATS on its port and wait until it answers."""
        proc.spawn()
        if proc.name.startswith("redis"):
            probe, expect = b"PING\r\n", b"+PONG"
        else:
            probe, expect = b"", b"INFO"
        port = proc.port
        await proc.wait_until(lambda: _answers(port, probe, expect), f"{proc.name} to answer")

    def postgres_schema(self, url: str) -> str:
        """A log URL on a schema of the fleet's own on the shared PostgreSQL (dropped on close)."""
        schema = f"chaos_{self.token}_{len(self.schemas)}"
        self.schemas.append((url, schema))
        return f"{url}?schema={schema}"

    # -- closing -------------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """The fleet's processes still running."""
        return [f"{p.name} (pid {p.pid})" for p in self.procs if p.alive()]

    def close(self) -> None:
        """Kill every process by pid, drop the schemas, remove the directory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.kill()
        if self.schemas:
            import psycopg

            for url, schema in self.schemas:
                try:
                    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                except psycopg.Error as exc:
                    print(f"warning: schema {schema} was not dropped: {exc}", file=sys.stderr)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
