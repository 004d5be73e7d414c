"""Helpers shared by the benchmarks: the machine, CPU time, percentiles, WebSocket frames."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_process(cpus: set[int] | None) -> None:
    """Set up a load-generator process: the orchestrator stops it, on these CPUs if given."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpus:
        os.sched_setaffinity(0, cpus)


def save_json(path: str | None, data: Any) -> None:
    """Write a benchmark's results to ``path`` (``--json``), if given."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """A description of the machine, for the JSON output and the headers."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "system": f"{platform.system()} {platform.release()}",
    }


def header(title: str) -> str:
    m = machine()
    return f"# {title} ({m['cpu']}, {m['cores']} cores, Python {m['python']})"


def _stat_cpu(path: str) -> float:
    """utime + stime in seconds from a /proc/.../stat file."""
    with open(path) as f:
        data = f.read()
    # The command name (field 2) may contain spaces: split after its ')'.
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by a process."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def process_run_time(pid: int) -> float:
    """CPU seconds a process's live threads have run, to the nanosecond (``schedstat``).

    ``/proc/<pid>/stat`` counts in clock ticks (10 ms here): too coarse for a
    server that uses a few percent of a core in a window.
    """
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process, from /proc/<pid>/stat."""
    return _stat_cpu(f"/proc/{pid}/stat")


def thread_cpu(native_id: int) -> float:
    """CPU seconds used so far by one thread of this process."""
    return _stat_cpu(f"/proc/self/task/{native_id}/stat")


def threads_named(prefix: str) -> list[int]:
    """Native ids of this process's Python threads whose name starts with ``prefix``."""
    return [
        t.native_id
        for t in threading.enumerate()
        if t.name.startswith(prefix) and t.native_id is not None
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def rate(value: float) -> str:
    """A rate, human-readable: 12.3k/s, 1.23M/s."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M/s"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k/s"
    return f"{value:.0f}/s"


def system_busy() -> float:
    """CPU seconds every process on the machine has used (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- a minimal WebSocket client's framing (RFC 6455) ----------------------------------------


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame; the mask key is zero, so the payload goes as is."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The complete WebSocket frames at the start of ``data``, and where the rest begins.

    Each frame is ``(opcode, payload)``, its payload unmasked if the peer masked it.
    """
    frames: list[tuple[int, bytes]] = []
    pos, size = 0, len(data)
    while size - pos >= 2:
        second = data[pos + 1]
        length = second & 0x7F
        head = 2
        if length == 126:
            if size - pos < 4:
                break
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if size - pos < 10:
                break
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            head = 10
        mask = b""
        if second & 0x80:
            mask = data[pos + head : pos + head + 4]
            head += 4
        end = pos + head + length
        if end > size:
            break
        payload = data[pos + head : end]
        if mask and mask != b"\0\0\0\0":
            pad = (mask * (length // 4 + 1))[:length]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(pad, "big")).to_bytes(
                length, "big"
            )
        frames.append((data[pos] & 0x0F, payload))
        pos = end
    return frames, pos


class PySpy:
    """``py-spy record`` of one process for ``seconds``: samples per thread and function.

    py-spy (a dev dependency) samples from outside the process, so the code
    measured runs unchanged. Start it with :meth:`start`; :meth:`wait`
    returns ``{thread name: {"samples", "self": {frame: n}, "inclusive":
    {frame: n}}}``, frames being ``function (file)`` (``--function``).
    """

    RATE = 250  # samples per second

    def __init__(self, pid: int, seconds: float) -> None:
        self.pid = pid
        self.seconds = max(1, int(seconds))
        fd, self.path = tempfile.mkstemp(prefix="eventcast-pyspy-", suffix=".txt")
        os.close(fd)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
        options = ["--duration", str(self.seconds), "--rate", str(self.RATE), "--format", "raw"]
        # Blocking (the default): py-spy pauses the process for each sample (~1% at
        # 250/s); --nonblocking reads stacks while they change and misattributes.
        options += ["--threads", "--function", "--output", self.path]
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> dict[str, dict[str, Any]]:
        """Wait for py-spy to finish (blocking); return the samples by thread name."""
        assert self.proc is not None
        self.proc.wait()
        threads: dict[str, dict[str, Any]] = {}
        try:
            with open(self.path) as f:
                for line in f:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    if not stack:
                        continue
                    frames = stack.split(";")
                    name = frames[0].split(": ", 1)[-1]
                    entry = threads.setdefault(name, {"samples": 0, "self": {}, "inclusive": {}})
                    n = int(count)
                    entry["samples"] += n
                    # Only the thread's own frame: native code outside any Python call.
                    leaf = frames[-1] if len(frames) > 1 else "(no Python frame)"
                    entry["self"][leaf] = entry["self"].get(leaf, 0) + n
                    for frame in set(frames[1:]):
                        entry["inclusive"][frame] = entry["inclusive"].get(frame, 0) + n
        finally:
            os.unlink(self.path)
        return threads


def merge_threads(threads: dict[str, dict[str, Any]], prefix: str) -> dict[str, Any]:
    """The samples of every thread whose name starts with ``prefix``, added up."""
    out: dict[str, Any] = {"samples": 0, "self": {}, "inclusive": {}}
    for name, entry in threads.items():
        if not name.startswith(prefix):
            continue
        out["samples"] += entry["samples"]
        for key in ("self", "inclusive"):
            for frame, n in entry[key].items():
                out[key][frame] = out[key].get(frame, 0) + n
    return out


def print_samples(
    title: str,
    entry: dict[str, Any],
    cpu_per_unit: float,
    unit: str,
    top: int = 12,
    inclusive_filter: tuple[str, ...] = ("eventcast",),
) -> None:
    """One thread's samples as µs of CPU per ``unit``: own time, then inclusive.

    py-spy counts a thread that is runnable but waiting for a core as busy,
    so on a shared machine raw sample counts overstate CPU time: the samples
    are scaled to ``cpu_per_unit``, the CPU time measured from /proc.
    """
    per = cpu_per_unit / max(entry["samples"], 1)
    print(f"{title}: {cpu_per_unit:.2f} µs of CPU per {unit} ({entry['samples']} samples); own:")
    for frame, n in sorted(entry["self"].items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {n * per:7.2f}  {frame}")
    print(f"  inclusive (functions of {', '.join(inclusive_filter)}):")
    ours = [(f, n) for f, n in entry["inclusive"].items() if any(m in f for m in inclusive_filter)]
    for frame, n in sorted(ours, key=lambda kv: -kv[1])[:top]:
        print(f"  {n * per:7.2f}  {frame}")
