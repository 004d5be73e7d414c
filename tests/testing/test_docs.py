"""docs/testing.md: its example is the one in examples/testing/, and it runs (in well under 1 s)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "testing.md"
EXAMPLE = ROOT / "examples" / "testing"

#: What every inner pytest session of these tests runs with (as a user's project would).
INI = """[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_doc_shows_the_example_files_verbatim() -> None:
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks[0] == (EXAMPLE / "orders.py").read_text(encoding="utf-8")
    assert blocks[1] == (EXAMPLE / "test_orders.py").read_text(encoding="utf-8")


def test_the_example_passes_in_well_under_a_second(pytester: pytest.Pytester) -> None:
    pytest.importorskip("fastapi")
    pytester.makeini(INI)
    for name in ("orders.py", "test_orders.py"):
        pytester.makepyfile(**{name[:-3]: (EXAMPLE / name).read_text(encoding="utf-8")})
    pytester.syspathinsert()
    result = pytester.inline_run("-p", "no:cacheprovider")
    result.assertoutcome(passed=1)
    (call,) = [r for r in result.getreports("pytest_runtest_logreport") if r.when == "call"]
    assert call.duration < 0.5, f"the example took {call.duration:.3f} s"


def test_the_fixtures_snippet_passes(pytester: pytest.Pytester) -> None:
    """The doc's fixture examples, under pytest-asyncio (auto mode)."""
    pytester.makeini(INI)
    pytester.makepyfile(test_snippet=python_blocks(DOC.read_text(encoding="utf-8"))[2])
    result = pytester.inline_run("-p", "no:cacheprovider")
    result.assertoutcome(passed=2)
