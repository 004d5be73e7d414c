"""``eventcast outbox init|backlog``: the PostgreSQL outbox table of :mod:`eventcast.ingest`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Final

import typer
from rich.table import Table

from .common import EXIT_OK, EXIT_USAGE, fail
from .output import json_line, stdout_console

__all__ = ["outbox_app"]

EXIT_CODES_HELP: Final = (
    "Exit codes: 0 success; 1 runtime error (PostgreSQL unreachable, the table missing); "
    "2 usage or configuration error (bad table name, no DSN)."
)

outbox_app = typer.Typer(
    name="outbox",
    help="The transactional outbox table in the application's PostgreSQL database.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

DsnOption = Annotated[
    str,
    typer.Option(
        "--dsn",
        envvar="EVENTCAST_OUTBOX_DSN",
        show_envvar=True,
        help="The application database: postgresql://user:password@host:5432/db.",
        metavar="DSN",
        show_default=False,
    ),
]
TableOption = Annotated[
    str,
    typer.Option("--table", help="The outbox table (name or schema.name).", metavar="NAME"),
]


def _require_postgres() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        fail("the postgres extra is not installed: pip install 'eventcast[postgres]'")


@outbox_app.command("init", epilog=EXIT_CODES_HELP)
def init(dsn: DsnOption, table: TableOption = "eventcast_outbox") -> int:
    """Create the outbox table, its (partition, id) index and its NOTIFY trigger.

    Idempotent: an existing table is kept. Examples:

    * `eventcast outbox init --dsn postgresql://app@127.0.0.1/shop`
    * `eventcast outbox init --dsn "$DATABASE_URL" --table realtime.outbox`
    """
    from ..exceptions import ConfigurationError
    from ..ingest.outbox import create_outbox

    _require_postgres()
    try:
        asyncio.run(create_outbox(dsn, table))
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)
    stdout_console().print(f"outbox table {table} is ready")
    return EXIT_OK


@outbox_app.command("backlog", epilog=EXIT_CODES_HELP)
def backlog_command(
    dsn: DsnOption,
    table: TableOption = "eventcast_outbox",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per partition.")
    ] = False,
) -> int:
    """Show the rows waiting in the outbox, per partition, with the oldest row's age.

    Examples:

    * `eventcast outbox backlog --dsn postgresql://app@127.0.0.1/shop`
    * `eventcast outbox backlog --dsn "$DATABASE_URL" --json`
    """
    from ..exceptions import ConfigurationError
    from ..ingest.outbox import backlog

    _require_postgres()
    try:
        rows = asyncio.run(backlog(dsn, table))
    except ConfigurationError as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        for partition, count, age in rows:
            json_line({"partition": partition, "rows": count, "oldest_age": age})
        return EXIT_OK
    total = sum(count for _, count, _ in rows)
    result = Table(title=f"{total} row(s) waiting in {table}")
    for name in ("partition", "rows", "oldest (s)"):
        result.add_column(name, justify="right")
    for partition, count, age in rows:
        result.add_row(str(partition), str(count), "" if age is None else f"{age:.1f}")
    stdout_console().print(result)
    return EXIT_OK
