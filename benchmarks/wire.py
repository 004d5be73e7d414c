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

    python benchmarks/wire.py [--updates 2000] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="fewer updates, for a smoke run")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
