"""A price ticker: publishes random-walk prices to ``prices.<SYMBOL>`` through the HTTP API.

Browsers follow every symbol with a plain ``EventSource`` on the hub's SSE
endpoint (see ``price_ticker.html``)::

    new EventSource("/connection/sse?topic=prices.*&access_token=...")

Run::

    eventcast serve --config examples/eventcast.toml
    EVENTCAST_API_KEY=examples-only-api-key python examples/price_ticker.py --symbols EURUSD,BTCUSD
    # and, to watch in a browser, serve the page (the hub must allow its origin):
    python examples/price_ticker.py --page-port 8081 --ticks 0

Each tick publishes one price per symbol in a single ``batch`` API call; the
data is ``{"symbol", "price", "time"}``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import random
import sys
import threading
import time
from pathlib import Path

import httpx

PAGE = Path(__file__).with_name("price_ticker.html")
START_PRICES = {"EURUSD": 1.0850, "GBPUSD": 1.2700, "BTCUSD": 65000.0, "AAPL": 190.0}


def serve_page(port: int) -> http.server.ThreadingHTTPServer:
    """Serve price_ticker.html on ``port`` (in a thread)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(PAGE.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run(
    url: str, api_key: str, symbols: list[str], *, ticks: int, interval: float, seed: int | None
) -> int:
    """Publish ``ticks`` rounds (0: forever); return the number of publications."""
    rng = random.Random(seed)
    prices = {s: START_PRICES.get(s, 100.0) for s in symbols}
    published = 0
    with httpx.Client(
        base_url=url.rstrip("/") + "/api", headers={"X-API-Key": api_key}, timeout=10
    ) as http:
        tick = 0
        while ticks == 0 or tick < ticks:
            tick += 1
            commands = []
            for symbol in symbols:
                prices[symbol] *= 1 + rng.gauss(0, 0.001)
                data = {"symbol": symbol, "price": round(prices[symbol], 5), "time": time.time()}
                commands.append({"publish": {"channel": f"prices.{symbol}", "data": data}})
            response = http.post("/batch", json={"commands": commands})
            response.raise_for_status()
            for symbol, reply in zip(symbols, response.json()["replies"], strict=True):
                if "error" in reply:
                    raise RuntimeError(f"publish to prices.{symbol} refused: {reply['error']}")
            published += len(symbols)
            line = "  ".join(f"{s} {prices[s]:.5f}" for s in symbols)
            print(f"tick {tick}: {line}", flush=True)
            if interval and (ticks == 0 or tick < ticks):
                time.sleep(interval)  # the ticker's pace
    return published


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Publish random-walk prices to prices.<SYMBOL> through the hub's HTTP API.",
        epilog="Environment: EVENTCAST_URL (the hub), EVENTCAST_API_KEY (its API key).",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("EVENTCAST_URL", "http://127.0.0.1:8000"),
        help="the hub's URL (default: EVENTCAST_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("EVENTCAST_API_KEY"),
        help="the hub's API key (default: EVENTCAST_API_KEY)",
    )
    parser.add_argument("--symbols", default="EURUSD,GBPUSD,BTCUSD,AAPL")
    parser.add_argument("--ticks", type=int, default=0, help="rounds to publish (0: forever)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks")
    parser.add_argument("--seed", type=int, default=None, help="random seed (repeatable runs)")
    parser.add_argument(
        "--page-port", type=int, default=None, help="also serve price_ticker.html on this port"
    )
    args = parser.parse_args(argv)
    if not args.api_key:
        print("error: pass --api-key or set EVENTCAST_API_KEY", file=sys.stderr)
        return 2
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    if args.page_port is not None:
        serve_page(args.page_port)
        print(
            f"page: http://127.0.0.1:{args.page_port}/price_ticker.html?hub={args.url}"
            "&token=<a token from `eventcast token --user viewer`>",
            flush=True,
        )
    try:
        count = run(
            args.url,
            args.api_key,
            symbols,
            ticks=args.ticks,
            interval=args.interval,
            seed=args.seed,
        )
    except KeyboardInterrupt:
        return 0
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"published {count} prices", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
