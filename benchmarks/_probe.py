"""A memory probe inside a benchmark server process (``benchmarks/memory.py`` drives it).

Two environment variables, read by ``hub.py --serve`` before the server starts:

* ``EVENTCAST_BENCH_PROBE=/path/report``: on ``SIGUSR1`` the server writes
  ``/path/report.<n>.json`` (n = 1, 2, ...): its RSS after a full collection,
  a ``sys.getsizeof`` walk of the objects of one connection (grouped by the
  part that holds them, see :func:`connection_roots`), and, when tracemalloc
  runs, what was allocated since the first report, by file and line;
* ``EVENTCAST_BENCH_TRACEMALLOC=<frames>``: start tracemalloc at start-up,
  keeping that many frames per allocation (1 is enough to group by line).

The first ``SIGUSR1`` is sent before the clients connect (the baseline), the
second once they all are.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import tracemalloc
import types
from collections.abc import Callable, Iterable
from typing import Any

#: Types with one instance per server (or per channel), never per connection: a walk stops there.
SHARED_TYPE_NAMES = frozenset(
    {
        # eventcast
        "Hub",
        "HubApp",
        "Bus",
        "Settings",
        "NamespaceConfig",
        "Flusher",
        "Channels",
        "HubChannel",
        "Registry",
        "Commands",
        "Permissions",
        "Admin",
        "Supervisor",
        "TokenVerifier",
        "SSEStreams",
        "WebSocketEndpoint",
        "SSEEndpoint",
        "Subscription",
        "_Ring",
        "Router",
        "MemoryPresence",
        "PresenceKeeper",
        # starlette, uvicorn, uvloop, asyncio, logging
        "Starlette",
        "Route",
        "WebSocketRoute",
        "Mount",
        "Config",
        "ServerState",
        "Server",
        "Loop",
        "Logger",
        "RootLogger",
        "Manager",
        "PlaceHolder",
        # python-socketio / engineio
        "AsyncServer",
        "AsyncManager",
        "ASGIApp",
    }
)
_SHARED_KINDS = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
)
#: Types of the objects a connection is made of: a walk from one connection never
#: enters another connection's (their instances are found with ``gc.get_objects()``).
ROOT_TYPE_NAMES = frozenset(
    {
        "Connection",
        "HubWebSocket",
        "ServerSession",
        "Membership",
        "WebSocketsSansIOProtocol",
        "HttpToolsProtocol",
        "HeaderTimeoutProtocol",
        "ServerProtocol",
        "ServerConnection",
        "Task",
        "TCPTransport",
        "Conn",
    }
)
#: A walk stops after this many objects (a sign it escaped into shared state).
WALK_LIMIT = 100_000

_reports = 0
_baseline: tracemalloc.Snapshot | None = None


def install_probe_from_env() -> None:
    """Install the probe if ``EVENTCAST_BENCH_PROBE`` is set (and tracemalloc if asked).

    ``EVENTCAST_BENCH_GC=/path.json`` also times the garbage collector: at exit
    the server writes, per generation, the collections and the seconds they took.
    ``EVENTCAST_BENCH_GC_THRESHOLD=700,10,10`` sets the collector's thresholds
    (an experiment: what tuning the collector would be worth).
    """
    threshold = os.environ.get("EVENTCAST_BENCH_GC_THRESHOLD")
    if threshold:
        gc.set_threshold(*(int(n) for n in threshold.split(",")))
    gc_path = os.environ.get("EVENTCAST_BENCH_GC")
    if gc_path:
        _time_gc(gc_path)
    path = os.environ.get("EVENTCAST_BENCH_PROBE")
    if not path:
        return
    frames = os.environ.get("EVENTCAST_BENCH_TRACEMALLOC")
    if frames:
        tracemalloc.start(int(frames))
    signal.signal(signal.SIGUSR1, lambda signum, frame: _report(path))


def _time_gc(path: str) -> None:
    import atexit
    import time

    totals = {str(g): [0, 0.0, 0] for g in range(3)}  # collections, seconds, objects collected
    started = [0.0]
    written = [0.0]

    def write() -> None:
        with open(path, "w") as f:
            json.dump(totals, f)

    def on_gc(phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            started[0] = now
            return
        entry = totals[str(info["generation"])]
        entry[0] += 1
        entry[1] += now - started[0]
        entry[2] += info["collected"]
        if now - written[0] > 1.0:  # the server may die of its signal: no atexit
            written[0] = now
            write()

    gc.callbacks.append(on_gc)
    atexit.register(write)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _report(path: str) -> None:
    global _reports, _baseline
    _reports += 1
    gc.collect()
    report: dict[str, Any] = {"rss": rss_bytes(), "gc_objects": len(gc.get_objects())}
    try:
        report["walk"] = walk_connection()
    except Exception as exc:  # a report without the walk is still worth having
        report["walk_error"] = f"{type(exc).__name__}: {exc}"
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        current, _peak = tracemalloc.get_traced_memory()
        report["traced"] = current
        if _baseline is None:
            _baseline = snapshot
        else:
            report["tracemalloc"] = {
                group: [
                    {
                        "where": str(stat.traceback),
                        "size_diff": stat.size_diff,
                        "count_diff": stat.count_diff,
                    }
                    for stat in snapshot.compare_to(_baseline, group)[:limit]
                ]
                for group, limit in (("lineno", 40), ("filename", 25))
            }
    tmp = f"{path}.{_reports}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, f"{path}.{_reports}.json")


# -- the walk ------------------------------------------------------------------------------


def _is_shared(obj: object) -> bool:
    return isinstance(obj, _SHARED_KINDS) or type(obj).__name__ in SHARED_TYPE_NAMES


def reachable(roots: Iterable[object], stop: set[int]) -> dict[int, object]:
    """Objects reachable from ``roots`` (by ``gc.get_referents``), not entering shared ones."""
    seen: dict[int, object] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        key = id(obj)
        if key in seen or key in stop or _is_shared(obj):
            continue
        seen[key] = obj
        if len(seen) > WALK_LIMIT:
            raise RuntimeError(f"the walk passed {WALK_LIMIT} objects: shared state not stopped")
        stack.extend(gc.get_referents(obj))
    return seen


def _shared_attributes(a: object, b: object) -> set[int]:
    """Ids of the attribute values two connections' objects share (the server's, not theirs)."""
    shared: set[int] = set()
    for name in set(_attrs(a)) & set(_attrs(b)):
        value_a, value_b = _attrs(a)[name], _attrs(b)[name]
        if value_a is value_b and value_a is not None:
            shared.add(id(value_a))
    return shared


def _attrs(obj: object) -> dict[str, object]:
    out = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(obj, slot):
                out[slot] = getattr(obj, slot)
    return out


def _task_of(match: Callable[[dict[str, Any]], bool]) -> asyncio.Task[Any] | None:
    """The task whose outermost coroutine frame's locals satisfy ``match``."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if frame is not None and match(frame.f_locals):
            return task
    return None


def _coroutine_chain(task: asyncio.Task[Any] | None) -> list[str]:
    """The names of the coroutines a task is suspended in, outermost first."""
    names: list[str] = []
    coro: Any = task.get_coro() if task is not None else None
    while coro is not None and len(names) < 50:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is None:
            break
        names.append(code.co_qualname)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return names


def connection_roots() -> list[list[tuple[str, list[object]]]]:
    """Two connections' objects, each as ``[(part, [objects]), ...]`` in claiming order.

    Recognises the servers of ``hub.py``: eventcast (its ``Hub``), a plain
    ``websockets`` server (``ServerConnection``) and the floor (``Conn``).
    """
    objects = gc.get_objects()
    # (The hub itself is frozen by `eventcast serve`'s collector tuning, so not listed;
    # its connections, made later, are.)
    conns = [
        o
        for o in objects
        if type(o).__name__ == "Connection" and type(o).__module__ == "eventcast.server.connection"
    ]
    if conns:
        return [_eventcast_parts(c) for c in _two(conns)]
    ws = [o for o in objects if type(o).__name__ == "ServerConnection"]
    if ws:
        return [_websockets_parts(c) for c in _two(ws)]
    floor = [o for o in objects if type(o).__name__ == "Conn" and getattr(o, "mode", "") == "ws"]
    if floor:
        return [
            [("floor protocol object", [c]), ("uvloop transport", [c.transport])]
            for c in _two(floor)
        ]
    raise RuntimeError("no connection found")


def _two(items: Iterable[Any]) -> list[Any]:
    found = []
    for item in items:
        if not getattr(item, "closed", False):
            found.append(item)
            if len(found) == 2:
                return found
    raise RuntimeError("fewer than two connections")


def _eventcast_parts(conn: Any) -> list[tuple[str, list[object]]]:
    transport = conn._transport
    proto = (
        transport.get_protocol() if transport is not None else getattr(conn._send, "__self__", None)
    )
    if type(proto).__name__ == "HubWebSocket":  # eventcast's own WebSocket protocol
        return [
            ("eventcast HubWebSocket (protocol, frame reader, timers)", [proto]),
            ("eventcast Memberships", list(conn.channels.values())),
            ("eventcast ServerSession", [conn.session]),
            ("eventcast Connection (queue, ids, counters)", [conn]),
            ("uvloop transport (Python-visible part)", [transport]),
        ]
    task = _task_of(lambda f: f.get("self") is proto)
    return [
        ("websockets ServerProtocol (sans-I/O parser, buffers)", [proto.conn]),
        ("uvicorn WebSocketsSansIOProtocol (queue, scope, events)", [proto]),
        ("ASGI task and its coroutine frames", [task] if task is not None else []),
        ("eventcast Memberships", list(conn.channels.values())),
        ("eventcast ServerSession", [conn.session]),
        ("eventcast Connection (queue, ids, counters)", [conn]),
        ("uvloop transport (Python-visible part)", [transport] if transport is not None else []),
    ]


def _websockets_parts(ws: Any) -> list[tuple[str, list[object]]]:
    task = _task_of(lambda f: any(v is ws for v in f.values()))
    return [
        ("websockets ServerProtocol (sans-I/O parser, buffers)", [ws.protocol]),
        ("websockets ServerConnection (assembler, futures)", [ws]),
        ("handler task and its coroutine frames", [task] if task is not None else []),
        ("uvloop transport (Python-visible part)", [ws.transport]),
    ]


def walk_connection() -> dict[str, Any]:
    """``sys.getsizeof`` of the objects only one connection holds, by the part holding them.

    Each part claims what is reachable from it and not yet claimed by an
    earlier part; whatever a second connection reaches too is shared, so not
    counted; the walk never enters the server's singletons (types, modules,
    functions, the hub, the loop, ...).
    """
    first, second = connection_roots()
    every_root = {id(o) for o in gc.get_objects() if type(o).__name__ in ROOT_TYPE_NAMES}
    shared: set[int] = set()
    for (_, objs_a), (_, objs_b) in zip(first, second, strict=True):
        for a, b in zip(objs_a, objs_b, strict=False):
            shared |= _shared_attributes(a, b)

    def own_roots(parts: list[tuple[str, list[object]]]) -> set[int]:
        return {id(o) for _, objs in parts for o in objs}

    # What the second connection reaches without entering another connection is
    # shared by connections (or its own): never counted for the first.
    stop_b = shared | (every_root - own_roots(second))
    other: dict[int, object] = {}
    for _, objs in second:
        other.update(reachable(objs, stop_b))
    stop = shared | (every_root - own_roots(first)) | set(other)
    claimed: set[int] = set()
    parts = []
    total = 0
    for name, objs in first:
        # A part owns what it reaches without entering another part (or connection).
        boundary = own_roots(first) - {id(o) for o in objs}
        mine = reachable(objs, stop | claimed | boundary)
        claimed |= set(mine)
        by_type: dict[str, list[int]] = {}
        size = 0
        for obj in mine.values():
            n = sys.getsizeof(obj)
            size += n
            entry = by_type.setdefault(type(obj).__qualname__, [0, 0])
            entry[0] += 1
            entry[1] += n
        total += size
        top = sorted(by_type.items(), key=lambda kv: -kv[1][1])[:8]
        parts.append(
            {
                "part": name,
                "bytes": size,
                "objects": len(mine),
                "top_types": [{"type": t, "count": c, "bytes": b} for t, (c, b) in top],
            }
        )
    tasks = [objs[0] for name, objs in first if "task" in name and objs]
    return {
        "parts": parts,
        "total_bytes": total,
        "coroutine_chain": _coroutine_chain(tasks[0]) if tasks else [],  # type: ignore[arg-type]
    }
