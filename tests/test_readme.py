"""The README's in-process examples run as written and print what their comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    # The blocks that need a running hub (the client) are run by the client's tests.
    return [b for b in blocks if "eventcast.connect" not in b]


def test_the_bus_examples_run(tmp_path: Path) -> None:
    blocks = _blocks()
    assert len(blocks) == 2, "the README's bus and durable-topic examples"
    program = blocks[0] + "\n" + blocks[1] + "\nasyncio.run(durable())\n"
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "orders.created {'id': 1}"
    assert lines[1].startswith("[1, 2] Position(offset=2, epoch=")
    assert lines[2] == "True {'id': 2}"
