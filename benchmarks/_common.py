"""Helpers shared by the benchmarks: the machine, CPU time from /proc, percentiles."""

from __future__ import annotations

import os
import platform
import sys
import threading
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def percentile(values: list[float], q: float) -> float:
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
