"""Run every benchmark in turn: bus, log, hub, backplane, ingest, wire (``make bench``).

Each module is also runnable alone (``python benchmarks/<name>.py --help``)
and exposes ``main(argv) -> dict``.

    python benchmarks/run.py [--quick] [--only bus,log] [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from types import ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ("bus", "log", "hub", "backplane", "ingest", "wire")
#: Default arguments per module, so each default run stays within ~5 minutes.
DEFAULTS = {
    "bus": ["--passes", "3"],
    # 20 publications/s beside full and half load: the latency floor of the
    # machine, which the `floor` system measures in the same run.
    "hub": ["--rate", "20", "--rate", "300"],
}


def load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py under a private name (``log`` is a common word)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)  # for _common
    spec = importlib.util.spec_from_file_location(f"eventcast_bench_{name}", f"{HERE}/{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="passed to every benchmark")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(MODULES)}")
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(MODULES)
    for name in names:
        if name not in MODULES:
            parser.error(f"unknown benchmark {name!r}")
    results: dict[str, Any] = {}
    failed = []
    for name in names:
        print(f"\n{'=' * 20} {name} {'=' * 20}", flush=True)
        start = time.perf_counter()
        try:
            argv_ = ["--quick"] if args.quick else DEFAULTS.get(name, [])
            results[name] = load(name).main(argv_)
        except KeyboardInterrupt:
            raise
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - start:.0f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
