"""The protocol core does no I/O: no module it imports, directly or not, is an I/O library.

``import eventcast`` loads the bus (which uses asyncio), so a runtime check of
``sys.modules`` cannot tell; this follows the imports of ``eventcast.protocol``
statically instead, through every eventcast module they reach.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PROTOCOL = SRC / "eventcast" / "protocol"

FORBIDDEN = {
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "threading",
    "subprocess",
    "redis",
    "nats",
    "websockets",
    "starlette",
    "uvicorn",
    "httpx",
    "psycopg",
}
#: The only exceptions, each (package, module): the event-id lock is a mutex held
#: for microseconds when a chunk of ids starts, not I/O.
ALLOWED_USES = {("threading", "eventcast.events")}
#: Third-party packages the core may use.
ALLOWED_THIRD_PARTY = {"msgspec", "google"}


def _module_path(name: str) -> Path:
    base = SRC.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imports(name: str) -> tuple[set[str], set[str]]:
    """The eventcast modules and the other top-level packages that module ``name`` imports."""
    path = _module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                targets = [module]
                # ``from . import codec`` names a module, not an attribute.
                targets += [f"{module}.{alias.name}" for alias in node.names]
            else:
                targets = [node.module or ""]
        else:
            continue
        for target in targets:
            if target.startswith("eventcast"):
                if _module_path(target).is_file():
                    internal.add(target)
            else:
                external.add(target.split(".")[0])
    return internal, external


def test_protocol_imports_no_io_library() -> None:
    todo = [
        "eventcast.protocol." + path.stem if path.stem != "__init__" else "eventcast.protocol"
        for path in PROTOCOL.glob("*.py")
    ]
    todo += ["eventcast.protocol._pb.client_pb2"]
    seen: set[str] = set()
    external: dict[str, set[str]] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        internal, outside = _imports(name)
        for package in outside:
            external.setdefault(package, set()).add(name)
        todo += sorted(internal - seen)
    assert "eventcast.protocol.protobuf" in seen
    assert "eventcast.events" in seen  # the walk follows imports out of the package
    assert not seen & {"eventcast.bus", "eventcast.subscription"}, sorted(seen)
    forbidden = {
        package: {user for user in users if (package, user) not in ALLOWED_USES}
        for package, users in external.items()
        if package in FORBIDDEN
    }
    forbidden = {package: users for package, users in forbidden.items() if users}
    assert not forbidden
    third_party = {
        package
        for package in external
        if package not in sys.stdlib_module_names and package != "__future__"
    }
    assert third_party <= ALLOWED_THIRD_PARTY, third_party
