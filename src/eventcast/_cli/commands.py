"""The commands that talk to a running hub: publish, tail, history, dead-letters, bench.

``register`` also adds ``outbox`` (:mod:`eventcast._cli.outbox`), which talks to PostgreSQL.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.markup import escape
from rich.table import Table

from .common import (
    DEFAULT_URL,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    parse_json,
    parse_position,
    parse_since,
    pattern_arg,
    topic_arg,
)
from .output import compact_json, json_line, stderr_console, stdout_console

__all__ = ["register"]

EXIT_CODES_HELP: Final = (
    "Exit codes: 0 success; 1 runtime error (hub unreachable, rejected key or token, "
    "API error); 2 usage or configuration error (bad option, invalid topic or JSON); "
    "130 interrupted (Ctrl-C)."
)

#: Publications sent in one ``batch`` API call when publishing stdin.
STDIN_BATCH: Final = 100

UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="EVENTCAST_URL",
        show_envvar=True,
        help="The hub's base URL (http://, https://, ws:// or wss://).",
        metavar="URL",
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="EVENTCAST_API_KEY",
        show_envvar=True,
        help="The hub's HTTP API key (the api_key setting).",
        metavar="KEY",
        show_default=False,
    ),
]
TokenOption = Annotated[
    str,
    typer.Option(
        "--token",
        envvar="EVENTCAST_TOKEN",
        show_envvar=True,
        help="A connection token (JWT), e.g. from `eventcast token`; empty for anonymous.",
        metavar="JWT",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object per line instead of rich text.")
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for each answer.", metavar="SECONDS"),
]


def _api(url: str, api_key: str | None, timeout: float) -> Any:
    from .api import HubAPI, require_api_key

    return HubAPI(url, require_api_key(api_key), timeout=timeout)


# -- publish ---------------------------------------------------------------------------------


def publish(
    topic: Annotated[str, typer.Argument(help="The topic (channel) to publish to.")],
    data: Annotated[
        str | None,
        typer.Argument(
            help="The data, as JSON. Without it, stdin is read: one JSON value per line.",
            show_default=False,
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Store the publication once even if sent again (stdin lines get KEY-LINE).",
            metavar="KEY",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = 10.0,
) -> int:
    """Publish JSON data to a topic through the hub's HTTP API; print each offset and epoch.

    With no DATA, every non-blank line of stdin is one JSON value, published in
    order (in `batch` calls of up to 100).

    Examples:

    * `eventcast publish news.eu '{"title": "hello"}'`
    * `eventcast publish orders.42 '{"status": "shipped"}' --idempotency-key order-42-shipped`
    * `cat events.jsonl | eventcast publish news.eu --json`
    * `EVENTCAST_URL=https://hub.example.com EVENTCAST_API_KEY=... eventcast publish news '"hi"'`
    """
    topic = topic_arg(topic)
    out = stdout_console()
    if data is not None:
        value = parse_json(data, "DATA")
        with _api(url, api_key, timeout) as api:
            params: dict[str, Any] = {"channel": topic, "data": value}
            if idempotency_key:
                params["idempotency_key"] = idempotency_key
            result = api.call("publish", params)
        _print_published(out, topic, result, as_json)
        return EXIT_OK
    return _publish_stdin(topic, idempotency_key, as_json, url, api_key, timeout)


def _print_published(out: Any, topic: str, result: Any, as_json: bool, line: int = 0) -> None:
    result = result if isinstance(result, dict) else {}
    offset, epoch = result.get("offset"), result.get("epoch")
    if as_json:
        json_line({"topic": topic, "offset": offset, "epoch": epoch})
    elif offset:
        where = f"line {line}: " if line else ""
        out.print(
            f"{where}published to [bold cyan]{escape(topic)}[/] at offset [magenta]{offset}[/], "
            f"epoch {escape(str(epoch))} (position [bold]{offset}:{escape(str(epoch))}[/])"
        )
    else:
        where = f"line {line}: " if line else ""
        out.print(f"{where}published to [bold cyan]{escape(topic)}[/] (no history: no offset)")


def _stdin_lines() -> queue.Queue[tuple[int, str] | None]:
    """Read stdin in a thread; yield (line number, text) of non-blank lines, then None."""
    lines: queue.Queue[tuple[int, str] | None] = queue.Queue()
    stdin = sys.stdin

    def read() -> None:
        try:
            for number, text in enumerate(stdin, start=1):
                if text.strip():
                    lines.put((number, text))
        finally:
            lines.put(None)

    threading.Thread(target=read, name="eventcast-cli-stdin", daemon=True).start()
    return lines


def _publish_stdin(
    topic: str,
    idempotency_key: str | None,
    as_json: bool,
    url: str,
    api_key: str | None,
    timeout: float,
) -> int:
    out = stdout_console()
    lines = _stdin_lines()
    published = 0
    with _api(url, api_key, timeout) as api:
        ended = False
        while not ended:
            first = lines.get()
            if first is None:
                break
            chunk = [first]
            while len(chunk) < STDIN_BATCH:
                try:
                    item = lines.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    ended = True
                    break
                chunk.append(item)
            commands = []
            for number, text in chunk:
                value = parse_json(text, f"stdin line {number} ({published} published before it)")
                params: dict[str, Any] = {"channel": topic, "data": value}
                if idempotency_key:
                    params["idempotency_key"] = f"{idempotency_key}-{number}"
                commands.append({"publish": params})
            body = api.post("batch", {"commands": commands})
            replies = body.get("replies")
            if "error" in body or not isinstance(replies, list) or len(replies) != len(chunk):
                fail(f"the hub refused batch: {body.get('error', body)}")
            for (number, _), reply in zip(chunk, replies, strict=True):
                error = reply.get("error") if isinstance(reply, dict) else {"message": reply}
                if error is not None:
                    fail(
                        f"the hub refused publish of stdin line {number}: "
                        f"{error.get('code')} {error.get('message')} "
                        f"({published} published before it)"
                    )
                _print_published(out, topic, reply.get("publish"), as_json, number)
                published += 1
    if published == 0:
        stderr_console().print("[yellow]note:[/] stdin was empty: nothing published")
    return EXIT_OK


# -- history ---------------------------------------------------------------------------------


def history(
    topic: Annotated[str, typer.Argument(help="The topic whose history to show.")],
    limit: Annotated[
        int,
        typer.Option("--limit", "-n", min=0, help="Publications to show (0: only the position)."),
    ] = 20,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only publications after this position, OFFSET:EPOCH.",
            metavar="OFFSET:EPOCH",
            show_default=False,
        ),
    ] = None,
    reverse: Annotated[bool, typer.Option("--reverse", help="Newest first.")] = False,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = 10.0,
) -> int:
    """Show a topic's stored history (a rich table, or JSON lines with `--json`).

    Examples:

    * `eventcast history news.eu`
    * `eventcast history news.eu --limit 5 --reverse`
    * `eventcast history news.eu --since 41:Xq3d --json | jq .data`
    """
    topic = topic_arg(topic)
    params: dict[str, Any] = {"channel": topic, "limit": limit, "reverse": reverse}
    if since is not None:
        position = parse_position(since)
        params["since"] = {"offset": position.offset, "epoch": position.epoch}
    with _api(url, api_key, timeout) as api:
        result = api.call("history", params)
    if not isinstance(result, dict):
        fail("the hub's history answer is malformed")
    publications = result.get("publications") or []
    epoch = result.get("epoch", "")
    if as_json:
        for pub in publications:
            row: dict[str, Any] = {
                "topic": topic,
                "offset": pub.get("offset"),
                "epoch": epoch,
                "data": pub.get("data"),
            }
            if pub.get("tags"):
                row["tags"] = pub["tags"]
            json_line(row)
        return EXIT_OK
    out = stdout_console()
    table = Table(
        title=f"{escape(topic)}: {len(publications)} publication(s)",
        caption=f"top position {result.get('offset', 0)}:{escape(str(epoch))}",
    )
    table.add_column("offset", justify="right", style="magenta")
    table.add_column("data", overflow="fold")
    table.add_column("tags", style="dim", overflow="fold")
    for pub in publications:
        tags = pub.get("tags")
        table.add_row(
            str(pub.get("offset", "")),
            escape(compact_json(pub.get("data"))),
            escape(compact_json(tags)) if tags else "",
        )
    out.print(table)
    return EXIT_OK


# -- dead letters ----------------------------------------------------------------------------

dead_letters_app = typer.Typer(
    name="dead-letters",
    help="Inspect and redrive the hub's dead letters (events its subscribers did not get).",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

SubscriberOption = Annotated[
    str | None,
    typer.Option("--subscriber", help="Only this subscriber's.", metavar="ID", show_default=False),
]
ReasonOption = Annotated[
    str | None,
    typer.Option(
        "--reason",
        help="Only this reason (overflow_drop_newest, overflow_drop_oldest, block_timeout, "
        "slow_consumer, handler_error, ack_failed).",
        metavar="REASON",
        show_default=False,
    ),
]


@dead_letters_app.command("list", epilog=EXIT_CODES_HELP)
def dead_letters_list(
    subscriber: SubscriberOption = None,
    reason: ReasonOption = None,
    topic: Annotated[
        str | None,
        typer.Option("--topic", help="Only this topic's.", metavar="TOPIC", show_default=False),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=0, help="The newest N dead letters.")
    ] = 100,
    as_json: JsonOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = 10.0,
) -> int:
    """List dead letters (newest last), optionally filtered.

    Examples:

    * `eventcast dead-letters list`
    * `eventcast dead-letters list --subscriber audit --reason overflow_drop_newest`
    * `eventcast dead-letters list --limit 10 --json`
    """
    params: dict[str, Any] = {"limit": limit}
    if topic is not None:
        params["topic"] = topic_arg(topic)
    if subscriber:
        params["subscriber"] = subscriber
    if reason:
        params["reason"] = reason
    with _api(url, api_key, timeout) as api:
        result = api.call("dead_letters", params)
    letters = result.get("dead_letters") if isinstance(result, dict) else None
    if not isinstance(letters, list):
        fail("the hub's dead_letters answer is malformed")
    if as_json:
        for letter in letters:
            json_line(letter)
        return EXIT_OK
    table = Table(
        title=f"{len(letters)} dead letter(s)",
        caption=f"{result.get('total', len(letters))} in the hub's store",
    )
    for name, style in (
        ("id", "bold"),
        ("time", "dim"),
        ("topic", "cyan"),
        ("offset", "magenta"),
        ("subscriber", ""),
        ("reason", "yellow"),
        ("attempts", ""),
        ("error", "red"),
        ("data", ""),
    ):
        table.add_column(name, style=style, overflow="fold")
    import time as _time

    for letter in letters:
        when = letter.get("time")
        table.add_row(
            str(letter.get("id", "")),
            _time.strftime("%H:%M:%S", _time.localtime(when)) if when else "",
            escape(str(letter.get("topic", ""))),
            str(letter.get("offset") or ""),
            escape(str(letter.get("subscriber", ""))),
            escape(str(letter.get("reason", ""))),
            str(letter.get("attempts", "")),
            escape(str(letter.get("error") or "")),
            escape(compact_json(letter.get("data"))),
        )
    stdout_console().print(table)
    return EXIT_OK


@dead_letters_app.command("redrive", epilog=EXIT_CODES_HELP)
def dead_letters_redrive(
    ids: Annotated[
        list[int] | None,
        typer.Option(
            "--id", help="A dead letter id (repeatable).", metavar="N", show_default=False
        ),
    ] = None,
    subscriber: SubscriberOption = None,
    reason: ReasonOption = None,
    redrive_all: Annotated[
        bool, typer.Option("--all", help="Redrive every dead letter (no filter needed).")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = 10.0,
) -> int:
    """Deliver dead letters again to their subscribers; print how many were redriven.

    Give at least one filter (`--id`, `--subscriber`, `--reason`), or `--all`.

    Examples:

    * `eventcast dead-letters redrive --id 3 --id 4`
    * `eventcast dead-letters redrive --subscriber audit --reason overflow_drop_newest`
    * `eventcast dead-letters redrive --all`
    """
    if not (ids or subscriber or reason or redrive_all):
        fail(
            "say which dead letters to redrive: --id, --subscriber, --reason, or --all",
            EXIT_USAGE,
        )
    params: dict[str, Any] = {}
    if ids:
        params["ids"] = list(ids)
    if subscriber:
        params["subscriber"] = subscriber
    if reason:
        params["reason"] = reason
    with _api(url, api_key, timeout) as api:
        result = api.call("dead_letters_redrive", params)
    count = result.get("redriven") if isinstance(result, dict) else None
    if not isinstance(count, int):
        fail("the hub's dead_letters_redrive answer is malformed")
    stdout_console().print(f"redriven {count} dead letter(s)")
    return EXIT_OK


# -- tail ------------------------------------------------------------------------------------


def tail(
    patterns: Annotated[
        list[str],
        typer.Argument(
            help="Topics or patterns (`*`: one segment, `>`: the rest) to follow.",
            metavar="PATTERN...",
        ),
    ],
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Replay first (a single topic only): `earliest`, or OFFSET:EPOCH.",
            metavar="earliest|OFFSET:EPOCH",
            show_default=False,
        ),
    ] = None,
    count: Annotated[
        int, typer.Option("--count", "-n", min=0, help="Exit after N events (0: never).")
    ] = 0,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per line: topic, offset, epoch and data."),
    ] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
    timeout: TimeoutOption = 10.0,
) -> int:
    """Follow live events over the hub's WebSocket until Ctrl-C (which exits with 0).

    Reconnects by itself, resuming durable topics where it left off.

    Examples:

    * `eventcast tail news.eu --token "$(eventcast token --user me)"`
    * `eventcast tail 'live:prices.*' 'live:news.>' --json | jq .data`
    * `eventcast tail news.eu --since earliest --count 10`
    * `eventcast tail orders.42 --since 41:Xq3d`
    """
    from .tail import run_tail

    checked = [pattern_arg(pattern) for pattern in patterns]
    start = None
    if since is not None:
        start = parse_since(since)
        if len(checked) != 1 or any(c in checked[0] for c in "*>"):
            fail("--since needs exactly one topic (not a pattern)", EXIT_USAGE)
    coro = run_tail(
        url,
        checked,
        token=token,
        since=start,
        as_json=as_json,
        count=count,
        out=stdout_console(),
        err=stderr_console(),
        timeout=timeout,
    )
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:  # Ctrl-C is how tail is meant to end
        return EXIT_OK


# -- bench -----------------------------------------------------------------------------------


def bench(
    target: Annotated[
        str | None,
        typer.Argument(
            help="The hub's URL (default: --url, EVENTCAST_URL or http://127.0.0.1:8000).",
            metavar="[URL]",
            show_default=False,
        ),
    ] = None,
    clients: Annotated[
        int, typer.Option("--clients", "-c", min=1, help="WebSocket subscribers to open.")
    ] = 10,
    rate: Annotated[
        float, typer.Option("--rate", "-r", min=0.1, help="Publications per second.")
    ] = 100.0,
    duration: Annotated[
        float, typer.Option("--duration", "-d", min=0.1, help="Seconds of publishing.")
    ] = 5.0,
    channel: Annotated[
        str, typer.Option("--channel", help="The channel the clients subscribe to.")
    ] = "bench",
    plot_path: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write latency percentiles and throughput per second to this PNG "
            "(needs matplotlib: pip install 'eventcast[plot]').",
            metavar="OUT.png",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the results as one JSON object.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = "",
    api_key: ApiKeyOption = None,
    timeout: TimeoutOption = 10.0,
) -> int:
    """Load-test a hub: N subscribers, publications at a fixed rate, latency and throughput.

    Opens N WebSocket clients (the Centrifuge JSON protocol), subscribes them to
    one channel, then publishes through the HTTP API at `--rate` per second for
    `--duration` seconds; each publication carries its send time, so every
    client measures publish -> receive latency. Prints deliveries/s, latency
    percentiles and errors (failed publishes, dropped clients, deliveries lost).

    The channel must let these clients subscribe (`allow_subscribe_for_client`
    with a token from `--token`, or anonymous access). All clients use the same
    token: mind `connections_per_user` (default 100) on the hub.

    Examples:

    * `eventcast bench --token "$(eventcast token --user bench)" --api-key $KEY`
    * `eventcast bench http://hub:8000 --clients 200 --rate 500 --duration 30`
    * `eventcast bench --clients 50 --rate 100 --plot bench.png`
    """
    from .api import require_api_key
    from .bench import BenchConfig, check_plot_support, plot, run_bench

    base_url = target or url
    channel = topic_arg(channel)
    key = require_api_key(api_key)
    if plot_path is not None:
        check_plot_support()
        if not plot_path.parent.is_dir():
            fail(f"--plot: no such directory: {plot_path.parent}", EXIT_USAGE)
    config = BenchConfig(
        url=base_url,
        token=token,
        api_key=key,
        clients=clients,
        rate=rate,
        duration=duration,
        channel=channel,
        timeout=timeout,
    )
    err = stderr_console()
    out = stdout_console()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    with progress:
        task = progress.add_task(
            f"connecting {clients} client(s)", total=duration, status="", start=False
        )

        def connected(n: int) -> None:
            progress.update(task, description=f"publishing to {channel} ({n} clients)")
            progress.start_task(task)

        def advanced(elapsed: float, result: Any) -> None:
            progress.update(
                task,
                completed=elapsed,
                status=f"{result.published} published, {result.deliveries} delivered",
            )

        try:
            result = asyncio.run(run_bench(config, on_progress=advanced, on_connected=connected))
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    summary = result.summary()
    if plot_path is not None:
        plot(result, plot_path, f"eventcast bench: {clients} clients, {rate:g}/s on {channel}")
    if as_json:
        if plot_path is not None:
            summary["plot"] = str(plot_path)
        json_line(summary)
    else:
        out.print(_bench_table(summary, channel, rate))
        if plot_path is not None:
            out.print(f"plot written to {escape(str(plot_path))}")
    return EXIT_OK if summary["deliveries"] else EXIT_ERROR


def _bench_table(summary: dict[str, Any], channel: str, rate: float) -> Table:
    table = Table(title=f"eventcast bench on {escape(channel)} ({rate:g} publications/s asked)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    latency = summary["latency_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    rows = [
        ("clients", str(summary["clients"])),
        ("duration", f"{summary['duration_s']:.2f} s"),
        ("publications sent", str(summary["published"])),
        ("publications/s", f"{summary['publications_per_s']:.1f}"),
        ("deliveries", f"{summary['deliveries']} of {summary['expected_deliveries']}"),
        ("deliveries/s", f"{summary['deliveries_per_s']:.1f}"),
        ("latency p50", ms(latency["p50"])),
        ("latency p90", ms(latency["p90"])),
        ("latency p99", ms(latency["p99"])),
        ("latency max", ms(latency["max"])),
        ("publish errors", str(summary["publish_errors"])),
        ("client errors", str(summary["client_errors"])),
        ("lost deliveries", str(summary["lost"])),
        ("errors", str(summary["errors"])),
    ]
    for name, value in rows:
        style = "red" if name == "errors" and summary["errors"] else None
        table.add_row(name, value, style=style)
    return table


def register(app: typer.Typer) -> None:
    """Add the hub commands to the ``eventcast`` app."""
    for command, name in (
        (publish, "publish"),
        (tail, "tail"),
        (history, "history"),
        (bench, "bench"),
    ):
        app.command(name, epilog=EXIT_CODES_HELP)(command)
    app.add_typer(dead_letters_app, name="dead-letters")
    from .outbox import outbox_app

    app.add_typer(outbox_app, name="outbox")
