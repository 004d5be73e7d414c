"""Tools of the security tests: a neighbour that must keep receiving, raw HTTP, and log checks.

Every hostile input of ``test_security.py`` is sent while a :class:`Neighbour`
runs in a process of its own: a well-behaved WebSocket subscriber and a
publisher that publishes on a fixed schedule. Afterwards the neighbour asserts
that it received every publication, in order, none later than
:data:`MAX_DELAY` after it was due: the hub kept serving everyone else while it
was attacked.

The machines the tests run on are shared: another program's load delays every
process now and then, the hub and the test alike (by over 200 ms at a load of
7 on two cores, with no attack at all). :class:`MachineNoise` measures what the
machine took during each publication's flight: how long the threads on the
delivery path (the neighbour's, and the hub's event loop) waited for a CPU, and
how late a separate sleeping process woke up (the whole machine held up). A
publication's delay is judged net of the larger: an attack that stalls the hub
keeps its event loop *running*, so it is never discounted, while a busy
machine is. Raw and net figures are both reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .hubtools import API_KEY, WAIT, HubServer, token

#: Seconds between the neighbour's publications.
PERIOD = 0.02
#: The longest a neighbour's publication may take, from when it was due to its arrival.
MAX_DELAY = 0.1
#: Publications the neighbour still receives after the attack, before it is checked.
AFTERWARDS = 3


_PROBE = """
import sys, time
period = 0.002
due = time.monotonic()
while True:
    due += period
    time.sleep(max(0.0, due - time.monotonic()))
    late = time.monotonic() - due
    if late > 0.005:
        sys.stdout.write(f"{due:.6f} {late:.6f}\\n")
        sys.stdout.flush()
        due = time.monotonic()
"""


def _wait_seconds(path: str) -> float:
    """How long a thread has waited for a CPU so far (``/proc/.../schedstat``)."""
    try:
        with open(path) as file:
            return int(file.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class MachineNoise:
    """What the machine, not the hub, took from the delivery path in a window of time.

    Args:
        pids: processes whose main thread is on the delivery path.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self._paths = [f"/proc/{pid}/task/{pid}/schedstat" for pid in pids]
        #: ``(time, total CPU wait of the threads)``, sampled every 2 ms.
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._probe = NoiseProbe()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = sum(_wait_seconds(path) for path in self._paths)
            self._samples.append((time.monotonic(), total))
            self._stop.wait(0.002)

    def _waited_at(self, when: float) -> float:
        samples = self._samples
        before = [s for s in samples if s[0] <= when]
        after = [s for s in samples if s[0] >= when]
        if not before:
            return samples[0][1] if samples else 0.0
        if not after:
            return before[-1][1]
        (t0, w0), (t1, w1) = before[-1], after[0]
        return w0 if t1 == t0 else w0 + (w1 - w0) * (when - t0) / (t1 - t0)

    def during(self, start: float, end: float) -> float:
        """Seconds the machine held up the delivery path within ``[start, end]``."""
        waited = self._waited_at(end) - self._waited_at(start)
        return max(waited, self._probe.within(start, end))

    def close(self) -> None:
        self._stop.set()
        self._sampler.join(5)
        self._probe.close()


class NoiseProbe:
    """A process that sleeps in 2 ms steps and reports each wake-up later than 5 ms.

    ``time.monotonic()`` is the system's monotonic clock, shared by every
    process, so its reports line up with the test's own timestamps.
    """

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, text=True
        )
        #: ``(when it was due, how late it woke)``, in seconds.
        self.late: list[tuple[float, float]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            due, late = line.split()
            self.late.append((float(due), float(late)))

    def within(self, start: float, end: float) -> float:
        """The longest the probe was held up during ``[start, end]``."""
        overlaps = (min(due + late, end) - max(due, start) for due, late in self.late)
        return max(0.0, max(overlaps, default=0.0))

    def close(self) -> None:
        self._process.kill()
        self._process.wait(5)
        self._reader.join(5)
        if self._process.stdout is not None:
            self._process.stdout.close()


_NEIGHBOUR = Path(__file__).with_name("neighbour.py")


@dataclass
class Neighbour:
    """A subscriber and a steady publisher next to an attack, in a process of their own.

    ``async with Neighbour(hub) as neighbour: <attack>``, then checked on exit.
    Publication ``k`` is due at ``start + k * PERIOD`` and published then (through
    the HTTP API); its delay is its arrival at the subscriber minus that due time,
    so a stall anywhere (the hub's event loop, its HTTP API, its fan-out) shows.
    See ``neighbour.py``.
    """

    hub: HubServer
    channel: str = field(default_factory=lambda: f"live:neighbour-{uuid.uuid4().hex[:8]}")
    #: When each publication was due, by number.
    due: dict[int, float] = field(default_factory=dict)
    #: Publication numbers in the order they arrived.
    received: list[int] = field(default_factory=list)
    #: Arrival minus due time, by number.
    delays: dict[int, float] = field(default_factory=dict)
    #: The same, net of the machine's own delay meanwhile (see MachineNoise).
    net_delays: dict[int, float] = field(default_factory=dict)
    published: int = 0
    _frozen: bool = False

    async def __aenter__(self) -> Neighbour:
        if self.hub.pid is None:
            # An in-process hub shares the test process's heap: everything the
            # suite's earlier tests left behind. A full collection of it (200 ms
            # and more late in a run) is the harness's pause, not the hub's:
            # collect now, and keep those objects out of the collections until
            # the end, as `eventcast serve` does with its start-up objects.
            gc.collect()
            gc.freeze()
            self._frozen = True
        try:
            await self._start()
        except BaseException:
            self._thaw()
            raise
        # The hub's event loop (here when it runs in this process) and the neighbour's.
        loop_pid = os.getpid() if self.hub.pid is None else self.hub.pid
        self._noise = MachineNoise([loop_pid, self._process.pid])
        try:
            assert self._process.stdout is not None
            async with asyncio.timeout(WAIT):
                ready = await self._process.stdout.readline()
            assert ready == b"ready\n", ready
        except BaseException:
            await self._end()
            raise
        return self

    def _thaw(self) -> None:
        if self._frozen:
            self._frozen = False
            gc.unfreeze()

    async def _start(self) -> None:
        url = urlsplit(self.hub.base)
        assert url.hostname is not None
        assert url.port is not None
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(_NEIGHBOUR),
            url.hostname,
            str(url.port),
            url.path.rstrip("/"),
            self.channel,
            token("neighbour"),
            API_KEY,
            str(PERIOD),
            str(AFTERWARDS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if exc_info[0] is None:
                await self._collect()
        finally:
            await self._end()
        print(
            f"neighbour: {self.published} publications, max delay {self.max_delay * 1000:.1f} ms, "
            f"net of the machine's {max(self.net_delays.values(), default=0) * 1000:.1f} ms"
        )
        if exc_info[0] is None:
            self.check()

    async def _collect(self) -> None:
        process = self._process
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(b"stop\n")
        await process.stdin.drain()
        async with asyncio.timeout(WAIT * 3):
            line = await process.stdout.readline()
        assert line, "the neighbour ended without its summary"
        summary = json.loads(line)
        self.published = summary["published"]
        self.due = {int(n): t for n, t in summary["due"].items()}
        self.received = summary["order"]
        for n, arrived in summary["arrived"].items():
            due = self.due[int(n)]
            delay = self.delays[int(n)] = arrived - due
            self.net_delays[int(n)] = max(0.0, delay - self._noise.during(due, arrived))

    async def _end(self) -> None:
        self._thaw()
        self._noise.close()
        process = self._process
        if process.returncode is None:
            process.kill()
        await process.wait()

    @property
    def max_delay(self) -> float:
        return max(self.delays.values(), default=0.0)

    def check(self) -> None:
        """Every publication arrived, in order, none later than MAX_DELAY (net of the machine)."""
        assert self.received == list(range(1, self.published + 1)), self.received
        late = {
            n: (round(self.delays[n], 3), round(net, 3))
            for n, net in self.net_delays.items()
            if net > MAX_DELAY
        }
        assert not late, f"publications delayed past {MAX_DELAY} s (raw, net): {late}"


# -- raw HTTP ----------------------------------------------------------------------------------


def address(hub: HubServer) -> tuple[str, int]:
    host, port = hub.base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def exchange(
    hub: HubServer, request: bytes | Iterable[bytes], *, timeout: float = WAIT
) -> tuple[bytes, float]:
    """Send ``request`` on a new connection and read one response (blocking: run it in a thread).

    Returns the response (head and body) and the seconds it took. Sending stops
    quietly if the server closes first; its answer is read all the same.
    """
    started = time.monotonic()
    with socket.create_connection(address(hub), timeout=timeout) as sock:
        parts = [request] if isinstance(request, bytes) else request
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for part in parts:
                sock.sendall(part)
        return read_response(sock), time.monotonic() - started


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response: its head, then ``Content-Length`` bytes (or up to the close)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while length is None or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    return data


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset after its answer is an end too)."""
    chunks: list[bytes] = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response."""
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


# -- logs --------------------------------------------------------------------------------------


def problems_in(records: Iterable[logging.LogRecord], secrets: Iterable[str]) -> list[str]:
    """Tracebacks, errors and secrets in captured log records (an empty list when clean)."""
    found: list[str] = []
    secrets = [s for s in secrets if s]
    for record in records:
        text = record.getMessage()
        if record.exc_info is not None or record.exc_text:
            found.append(f"traceback: {record.name}: {text}")
        elif record.levelno >= logging.ERROR:
            found.append(f"error: {record.name}: {text}")
        full = f"{text} {record.args!r} {record.exc_text or ''}"
        found += [f"secret in {record.name}: {text}" for s in secrets if s in full]
    return found


def log_capture(caplog: Any) -> None:
    """Capture eventcast's and uvicorn's loggers at every level (access log included)."""
    for name in ("eventcast", "uvicorn", "uvicorn.error", "uvicorn.access"):
        caplog.set_level(logging.DEBUG, logger=name)
