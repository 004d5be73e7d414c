"""Wire formats: bytes per delivery and encoding CPU for a ticker, JSON and Protobuf, with deltas.

The workload of issue 17: 100 instruments, each a channel whose publications are
a JSON document of about 2 KB; every update changes a few fields of one
instrument's document. For each update this measures, with the protocol core
alone (no sockets: the hub writes these bytes as they are, one frame per
delivery or several coalesced):

* **bytes per delivery**: the publication push as it goes into a WebSocket frame
  (without the 2- to 4-byte frame header), for JSON and Protobuf, with the full
  document and with a fossil delta against the channel's previous publication
  (sent only when smaller, as the hub will);
* **CPU per publication**: encoding the push once (it is then shared by every
  connection of that encoding), and computing the delta once per publication.

Then the same stream through a real hub (``create_app`` under uvicorn with
``uvicorn_config``, in this process, memory log): one WebSocket client per
mode (JSON, Protobuf, JSON with fossil deltas, Protobuf with fossil deltas),
each subscribed to the 100 channels, counts the bytes it reads per delivery,
frame headers included (several pushes may share a frame); and a **slow
client beside a fast one** on a conflating channel (``conflation_key``) and on
one without: the fast client reads everything as it comes, the slow one reads
nothing (tiny socket buffers) until the stream is published, then reads: with
conflation it stays connected and ends with the newest value of every
instrument; without, it is closed with 3008.

    python benchmarks/wire.py [--updates 2000] [--quick] [--no-hub] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from _common import header, machine
from eventcast.events import Event
from eventcast.protocol import delta
from eventcast.protocol.encodings import JSON, Encoding, get_encoding

INSTRUMENTS = 100


def document(rng: random.Random, symbol: str) -> dict[str, Any]:
    """About 2 KB of JSON describing one instrument."""
    return {
        "symbol": symbol,
        "name": f"{symbol} Holdings plc, ordinary shares",
        "exchange": "XLON",
        "currency": "GBP",
        "bid": round(rng.uniform(10, 500), 2),
        "ask": round(rng.uniform(10, 500), 2),
        "last": round(rng.uniform(10, 500), 2),
        "volume": rng.randint(0, 10**7),
        "updated": 1_700_000_000_000,
        "depth": [
            {
                "level": level,
                "bid": round(rng.uniform(10, 500), 2),
                "bid_size": rng.randint(1, 10**5),
                "ask": round(rng.uniform(10, 500), 2),
                "ask_size": rng.randint(1, 10**5),
            }
            for level in range(20)
        ],
        "notes": "Indicative prices, delayed by 15 minutes. " * 8,
    }


def updates(count: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """``count`` publications: (channel, data), each changing a few fields of one document."""
    rng = random.Random(seed)
    documents = {f"S{i:03}": document(rng, f"S{i:03}") for i in range(INSTRUMENTS)}
    out = []
    for n in range(count):
        symbol = rng.choice(sorted(documents))
        doc = documents[symbol]
        doc["bid"] = round(doc["bid"] * rng.uniform(0.999, 1.001), 2)
        doc["ask"] = round(doc["bid"] + rng.uniform(0.01, 0.5), 2)
        doc["last"] = doc["bid"]
        doc["volume"] += rng.randint(1, 5000)
        doc["updated"] += n
        level = doc["depth"][rng.randrange(20)]
        level["bid_size"] = rng.randint(1, 10**5)
        out.append((f"prices.{symbol}", json.dumps(doc, separators=(",", ":")).encode()))
    return out


def wire_bytes(encoding: Encoding, stream: list[tuple[str, bytes]], with_delta: bool) -> float:
    """Average bytes of a publication push, full or as a delta when smaller."""
    previous: dict[str, bytes] = {}
    total = 0
    for offset, (channel, data) in enumerate(stream, start=1):
        base = previous.get(channel)
        previous[channel] = data
        payload, is_delta = data, False
        if with_delta and base is not None:
            made = delta.smaller_delta(base, data)
            if made is not None:
                payload, is_delta = made, True
        if with_delta:
            # A delta subscription gets its data in delta form (a JSON string in JSON).
            encoded = encoding.delta_data(payload)
            if encoded is None:  # a JSON delta that is not text: the full payload
                encoded, is_delta = encoding.delta_data(data), False
            assert encoded is not None
        else:
            encoded = payload
        pub = encoding.encode_publication(encoded, offset=offset, delta=is_delta)
        total += len(encoding.encode_pub_push(channel, pub))
    return total / len(stream)


def cpu_per_call(function: Callable[[], object], calls: int, repeat: int = 5) -> float:
    """The best CPU time of ``calls`` calls, per call, in microseconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(calls):
            function()
        best = min(best, time.process_time() - start)
    return best / calls * 1e6


def encode_cost(encoding: Encoding, stream: list[tuple[str, bytes]]) -> float:
    events = [
        Event(topic=channel, data=data, offset=n + 1, epoch="e")
        for n, (channel, data) in enumerate(stream)
    ]
    index = 0

    def one() -> None:
        nonlocal index
        event = events[index % len(events)]
        index += 1
        encoding.encode_pub_push(event.topic, encoding.publication_of(event))

    return cpu_per_call(one, len(events))


def delta_cost(stream: list[tuple[str, bytes]]) -> float:
    previous: dict[str, bytes] = {}
    pairs = []
    for channel, data in stream:
        if channel in previous:
            pairs.append((previous[channel], data))
        previous[channel] = data
    index = 0

    def one() -> None:
        nonlocal index
        source, target = pairs[index % len(pairs)]
        index += 1
        delta.create(source, target)

    return cpu_per_call(one, len(pairs))


# -- through a real hub ---------------------------------------------------------------------

SECRET = "benchmark-hmac-secret-" + "x" * 32
MODES = {
    "json": ("json", ""),
    "protobuf": ("protobuf", ""),
    "json+fossil": ("json", "fossil"),
    "protobuf+fossil": ("protobuf", "fossil"),
}


@contextlib.asynccontextmanager
async def running_hub(namespaces: list[dict[str, Any]], **settings: Any) -> AsyncIterator[Any]:
    """A hub on a free port of this process; yields ``(app, port)``."""
    import uvicorn

    from eventcast.server.app import create_app, make_server, uvicorn_config
    from eventcast.server.config import Settings

    config = Settings.load(
        token_hmac_secret=SECRET,
        log_url="memory://",
        namespaces=namespaces,
        log_level="error",
        connections_per_user=1000,
        **settings,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(config)
    options = uvicorn_config(config, host="127.0.0.1", port=port)
    options.update(log_level="error", loop="asyncio")
    server = make_server(app, uvicorn.Config(app, **options))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield app, port
    finally:
        server.should_exit = True
        await task


def _frame_header(size: int) -> int:
    return 2 if size < 126 else 4 if size < 65536 else 10


async def _client(port: int, user: str, encoding_name: str, **options: Any) -> Any:
    from websockets.asyncio.client import connect

    from eventcast.server.auth import mint_token

    protobuf = encoding_name == "protobuf"
    ws = await connect(
        f"ws://127.0.0.1:{port}/connection/websocket",
        subprotocols=["centrifuge-protobuf"] if protobuf else None,  # type: ignore[list-item]
        max_size=None,
        ping_interval=None,
        **options,
    )
    token = mint_token(secret=SECRET, user=user, ttl=None)
    return ws, token


async def _subscribe(
    ws: Any, token: str, encoding: Encoding, channels: list[str], mode: str
) -> None:
    from eventcast.protocol.frames import Command, ConnectRequest, SubscribeRequest

    commands = [Command(id=1, connect=ConnectRequest(token=token))]
    commands += [
        Command(id=n + 2, subscribe=SubscribeRequest(channel=c, delta=mode))
        for n, c in enumerate(channels)
    ]
    if encoding.binary:
        from eventcast.protocol import protobuf

        await ws.send(protobuf.encode_commands(commands))
    else:
        from eventcast.protocol import codec

        await ws.send(codec.encode_commands(commands).decode())
    replies = 0
    while replies < len(commands):
        replies += _count(await ws.recv(), encoding, replies=True)


def _count(frame: bytes | str, encoding: Encoding, *, replies: bool = False) -> int:
    """Publications (or replies) in a frame."""
    if encoding.binary:
        from eventcast.protocol import protobuf

        parts = protobuf.decode_replies(frame)  # type: ignore[arg-type]
        return sum(1 for r in parts if (r.id if replies else r.push is not None))
    lines = (frame if isinstance(frame, bytes) else frame.encode()).split(b"\n")
    if replies:
        return sum(1 for line in lines if line.startswith(b'{"id":'))
    return sum(1 for line in lines if line.startswith(b'{"push"'))


async def hub_bytes(stream: list[tuple[str, bytes]]) -> dict[str, float]:
    """Bytes read per delivery, frame headers included, by one client per mode."""
    channels = sorted({channel for channel, _ in stream})
    namespaces = [
        {"name": "", "allow_subscribe_for_client": True, "allowed_delta_types": ["fossil"]}
    ]
    results: dict[str, float] = {}
    # A queue large enough that these clients, read in this process, are never too slow.
    queue = 64 * 1024 * 1024
    async with running_hub(namespaces, channels_per_connection=256, client_queue_bytes=queue) as (
        app,
        port,
    ):
        clients = []
        for name, (encoding_name, mode) in MODES.items():
            ws, token = await _client(port, f"bytes-{name}", encoding_name)
            encoding = get_encoding(encoding_name)
            await _subscribe(ws, token, encoding, channels, mode)
            clients.append((name, ws, encoding))
        counts = {name: [0, 0] for name in MODES}  # deliveries, bytes

        async def read(name: str, ws: Any, encoding: Encoding) -> None:
            while counts[name][0] < len(stream):
                frame = await ws.recv()
                size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
                counts[name][0] += _count(frame, encoding)
                counts[name][1] += size + _frame_header(size)

        readers = [asyncio.ensure_future(read(*client)) for client in clients]
        for channel, data in stream:
            await app.hub.publish(channel, data)
        await asyncio.wait_for(asyncio.gather(*readers), 120)
        for name, ws, _ in clients:
            results[name] = round(counts[name][1] / counts[name][0], 1)
            await ws.close()
    return results


async def slow_beside_fast(stream: list[tuple[str, bytes]]) -> dict[str, Any]:
    """A fast and a slow client of a conflating channel, and of one that does not conflate."""
    from eventcast.protocol.encodings import JSON as JSON_

    symbol_of = {}
    for channel, _ in stream:
        symbol_of[channel] = channel.rsplit(".", 1)[1]
    base = {"allow_subscribe_for_client": True, "history_size": 10, "history_ttl": 60}
    namespaces = [
        {"name": "tick", **base, "conflation_key": "symbol"},
        {"name": "flood", **base},
    ]
    out: dict[str, Any] = {}
    async with running_hub(namespaces, client_queue_bytes=256 * 1024) as (app, port):
        for namespace in ("tick", "flood"):
            channel = f"{namespace}:prices"
            fast, token = await _client(port, f"fast-{namespace}", "json")
            await _subscribe(fast, token, JSON_, [channel], "")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            slow, token = await _client(port, f"slow-{namespace}", "json", sock=sock, max_queue=1)
            await _subscribe(slow, token, JSON_, [channel], "")
            conn = next(c for c in app.hub.connections.values() if c.user == f"slow-{namespace}")
            raw = conn._transport.get_extra_info("socket")  # small buffers: the hub sees the lag
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            fast_count = [0]
            progress = asyncio.Event()

            async def read_fast(
                ws: Any = fast, counter: list[int] = fast_count, event: Any = progress
            ) -> None:
                while counter[0] < len(stream):
                    counter[0] += _count(await ws.recv(), JSON_)
                    event.set()

            reader = asyncio.ensure_future(read_fast())
            conflated_before = app.hub.channels.conflated
            start = time.perf_counter()
            # Closed loop on the fast client: at most 64 publications it has not read yet.
            for n, (source, data) in enumerate(stream):
                while n - fast_count[0] > 64:
                    progress.clear()
                    await progress.wait()
                await app.hub.publish(channel, data, tags={"symbol": symbol_of[source]})
            await asyncio.wait_for(reader, 120)
            elapsed = time.perf_counter() - start
            newest: dict[str, int] = {}
            for n, (source, _) in enumerate(stream, start=1):
                newest[symbol_of[source]] = n
            seen: dict[str, int] = {}
            slow_count = 0
            closed_code: int | None = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(30):
                    while seen != newest:
                        frame = await slow.recv()
                        for line in (frame if isinstance(frame, bytes) else frame.encode()).split(
                            b"\n"
                        ):
                            if line.startswith(b'{"push"'):
                                pub = json.loads(line)["push"]["pub"]
                                seen[pub["tags"]["symbol"]] = pub["offset"]
                                slow_count += 1
            if conn.closed and conn.disconnect is not None:
                closed_code = conn.disconnect.code
            out[namespace] = {
                "conflation": namespace == "tick",
                "published": len(stream),
                "publish_seconds": round(elapsed, 2),
                "fast_received": fast_count[0],
                "slow_received": slow_count,
                "slow_conflated": app.hub.channels.conflated - conflated_before,
                "slow_connected": not conn.closed,
                "slow_closed_with": closed_code,
                "slow_current": seen == newest,
            }
            for ws in (fast, slow):
                with contextlib.suppress(Exception):
                    await ws.close()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="fewer updates, for a smoke run")
    parser.add_argument("--no-hub", action="store_true", help="only the protocol core")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    count = 300 if args.quick else args.updates
    stream = updates(count)
    protobuf = get_encoding("protobuf")
    size = sum(len(data) for _, data in stream) / len(stream)
    results: dict[str, Any] = {
        "machine": machine(),
        "updates": count,
        "instruments": INSTRUMENTS,
        "document_bytes": round(size),
        "bytes_per_delivery": {
            "json": round(wire_bytes(JSON, stream, False), 1),
            "protobuf": round(wire_bytes(protobuf, stream, False), 1),
            "json+fossil": round(wire_bytes(JSON, stream, True), 1),
            "protobuf+fossil": round(wire_bytes(protobuf, stream, True), 1),
        },
        "cpu_us_per_publication": {
            "json encode": round(encode_cost(JSON, stream), 2),
            "protobuf encode": round(encode_cost(protobuf, stream), 2),
            "fossil delta create": round(delta_cost(stream), 2),
        },
    }
    print(header("wire formats, ticker workload"))
    size_ = results["document_bytes"]
    print(f"{INSTRUMENTS} instruments, {count} updates, documents of {size_} bytes")
    print("\nbytes per delivery (publication push, without the WebSocket frame header)")
    for name, value in results["bytes_per_delivery"].items():
        print(f"  {name:16} {value:8.1f}")
    print("\nCPU per publication, once for all connections (µs, best of 5)")
    for name, value in results["cpu_us_per_publication"].items():
        print(f"  {name:20} {value:8.2f}")
    if not args.no_hub:
        results["hub_bytes_per_delivery"] = asyncio.run(hub_bytes(stream))
        print("\nthrough the hub: bytes read per delivery, frame headers included")
        for name, value in results["hub_bytes_per_delivery"].items():
            print(f"  {name:16} {value:8.1f}")
        results["slow_beside_fast"] = asyncio.run(slow_beside_fast(stream))
        print("\na slow client beside a fast one (client queue 256 KiB)")
        print(
            "  channel   | published | fast got | slow got | skipped | slow connected | "
            "slow current"
        )
        for row in results["slow_beside_fast"].values():
            label = "conflated" if row["conflation"] else "plain"
            state = "yes" if row["slow_connected"] else f"no ({row['slow_closed_with']})"
            print(
                f"  {label:9} | {row['published']:9} | {row['fast_received']:8} | "
                f"{row['slow_received']:8} | {row['slow_conflated']:7} | {state:14} | "
                f"{'yes' if row['slow_current'] else 'no'}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
