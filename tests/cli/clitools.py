"""Helpers of the CLI tests: run ``main`` in a thread, run the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue

import pytest

from eventcast.cli import main
from tests.server.hubtools import API_KEY, WAIT

ROOT = Path(__file__).resolve().parents[2]
EVENTCAST = Path(sys.executable).parent / "eventcast"


def assert_one_error_line(err: str) -> str:
    """Exactly one line, ``error: ...``, and no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


async def run_main(argv: Sequence[str]) -> int:
    """``main(argv)`` in a worker thread, so the in-process hub keeps serving meanwhile."""
    return await asyncio.to_thread(main, list(argv))


def api_args(base: str) -> list[str]:
    return ["--url", base, "--api-key", API_KEY]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EVENTCAST_")}
    env.update(extra)
    env["COLUMNS"] = "200"
    return env


def run_cli(
    args: Sequence[str], *, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``eventcast`` script to completion."""
    return subprocess.run(
        [str(EVENTCAST), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=60,
        check=False,
    )


@dataclass
class LineReader:
    """Reads a subprocess's stdout and stderr lines in threads; wait for lines with a timeout."""

    process: subprocess.Popen[str]
    stdout: Queue[str | None] = field(default_factory=Queue)
    stderr: Queue[str | None] = field(default_factory=Queue)
    err_lines: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, queue in (
            (self.process.stdout, self.stdout),
            (self.process.stderr, self.stderr),
        ):
            thread = threading.Thread(target=self._pump, args=(stream, queue), daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        """Kill the process if it still runs, wait for it, and close its pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for thread in self.threads:
            thread.join(10)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    @staticmethod
    def _pump(stream: object, queue: Queue[str | None]) -> None:
        assert stream is not None
        for line in stream:  # type: ignore[attr-defined]
            queue.put(line)
        queue.put(None)

    def _line(self, queue: Queue[str | None]) -> str:
        try:
            line = queue.get(timeout=WAIT * 3)
        except Empty:
            pytest.fail("no output line in time")
        if line is None:
            pytest.fail(f"the process ended early (exit code {self.process.poll()})")
        return line

    def out_line(self) -> str:
        return self._line(self.stdout)

    def err_line(self) -> str:
        line = self._line(self.stderr)
        self.err_lines.append(line)
        return line

    def rest(self, queue: Queue[str | None]) -> list[str]:
        lines = []
        while (line := queue.get(timeout=WAIT * 3)) is not None:
            lines.append(line)
        return lines
