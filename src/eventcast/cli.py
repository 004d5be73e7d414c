"""The ``eventcast`` command line: run the hub, mint development tokens, talk to a hub.

Commands: ``serve``, ``token``, ``asyncapi``, and (in :mod:`eventcast._cli`) ``publish``,
``tail``, ``history``, ``dead-letters list|redrive``, ``bench`` and ``outbox init|backlog``.

Exit codes: 0 success, 1 error, 2 usage or configuration error, 130 interrupted.
Expected errors print one line to stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console

try:  # typer >= 0.2x vendors click: its usage errors derive from TyperException
    from typer import TyperException as _UsageException
except ImportError:  # pragma: no cover - older typer, on click
    from click import ClickException as _UsageException  # type: ignore[assignment, unused-ignore]

from . import __version__
from ._cli.commands import register as _register_hub_commands
from ._cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, fail
from .exceptions import ConfigurationError, EventcastError

__all__ = ["app", "main"]

_EXIT_CODES_HELP: Final = (
    "Exit codes: 0 success, 1 error, 2 usage or configuration error, 130 interrupted. "
    "Settings come from EVENTCAST_* environment variables and the optional --config TOML file."
)

app = typer.Typer(
    name="eventcast",
    help="eventcast: real-time event broadcasting (a hub on the Centrifuge protocol).",
    epilog=_EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="EVENTCAST_CONFIG",
        help="A TOML settings file (keys are the setting names, e.g. `api_key`).",
        show_default=False,
    ),
]


def _load_settings(config: Path | None, **overrides: Any) -> Any:
    try:
        from .server.config import Settings
    except ImportError as exc:
        fail(
            f"the server extra is not installed ({exc.name} is missing): "
            "pip install 'eventcast[server]'",
            EXIT_ERROR,
        )
    return Settings.load(config, **overrides)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"eventcast {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Show the version and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """eventcast: real-time event broadcasting (a hub on the Centrifuge protocol).

    Run `eventcast COMMAND --help` for a command's options.
    """


@app.command(epilog=_EXIT_CODES_HELP)
def token(
    user: Annotated[
        str,
        typer.Option("--user", "-u", help="The user id (claim `sub`); may be empty.", metavar="ID"),
    ],
    ttl: Annotated[
        float,
        typer.Option(
            "--ttl", min=0, help="Seconds until the token expires (0: never).", metavar="SECONDS"
        ),
    ] = 3600,
    channel: Annotated[
        list[str] | None,
        typer.Option(
            "--channel",
            help="A server-side channel of the connection token (repeatable).",
            metavar="C",
            show_default=False,
        ),
    ] = None,
    sub_channel: Annotated[
        str | None,
        typer.Option(
            "--sub-channel",
            help="Make a subscription token for this one channel instead.",
            metavar="C",
            show_default=False,
        ),
    ] = None,
    info: Annotated[
        str | None,
        typer.Option(
            "--info",
            help="Connection or channel info, as JSON (claim `info`).",
            metavar="JSON",
            show_default=False,
        ),
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            help="The HMAC secret (default: the token_hmac_secret setting, "
            "EVENTCAST_TOKEN_HMAC_SECRET).",
            metavar="S",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Print a signed HS256 token, for development.

    A connection token by default; a subscription token with `--sub-channel`.
    The token's `aud` and `iss` follow the token_audience and token_issuer settings.

    Examples:

    * `eventcast token --user alice`
    * `eventcast token --user alice --ttl 600 --channel news --channel chat:lobby`
    * `eventcast token --user alice --sub-channel chat:secret --info '{"role": "mod"}'`
    * `EVENTCAST_TOKEN_HMAC_SECRET=... eventcast token --user bob --ttl 0`
    """
    from .server.auth import mint_token

    if sub_channel is not None and channel:
        fail("use either --channel (connection token) or --sub-channel", EXIT_USAGE)
    info_value: Any = None
    if info is not None:
        try:
            info_value = json.loads(info)
        except json.JSONDecodeError as exc:
            fail(f"--info is not valid JSON: {exc}", EXIT_USAGE)
    settings = _load_settings(config)
    if secret is None and settings.token_hmac_secret is not None:
        secret = settings.token_hmac_secret.get_secret_value()
    if not secret:
        fail(
            "no token secret: pass --secret or set EVENTCAST_TOKEN_HMAC_SECRET "
            "(or token_hmac_secret in the --config file)",
            EXIT_USAGE,
        )
    try:
        signed = mint_token(
            secret=secret,
            user=user,
            ttl=ttl or None,
            channels=channel or (),
            channel=sub_channel,
            info=info_value,
            audience=settings.token_audience,
            issuer=settings.token_issuer,
        )
    except ValueError as exc:  # an invalid channel name (InvalidTopicError) or ttl
        fail(str(exc), EXIT_USAGE)
    typer.echo(signed)


@app.command(epilog=_EXIT_CODES_HELP)
def serve(
    host: Annotated[str, typer.Option("--host", help="The interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, help="The TCP port to listen on.")
    ] = 8000,
    config: ConfigOption = None,
) -> None:
    """Run the hub: WebSocket clients on `/connection/websocket`, the HTTP API on `/api`.

    Examples:

    * `eventcast serve`
    * `EVENTCAST_TOKEN_HMAC_SECRET=... eventcast serve --host 0.0.0.0 --port 8000`
    * `eventcast serve --config eventcast.toml`
    """
    settings = _load_settings(config)
    try:
        from .server.app import serve as run_server  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        fail(
            f"the hub server is not available ({exc}); "
            "install the server extra: pip install 'eventcast[server]'",
            EXIT_ERROR,
        )
    run_server(settings, host=host, port=port)


@app.command(epilog=_EXIT_CODES_HELP)
def asyncapi(
    host: Annotated[
        str,
        typer.Option("--host", help="The `host[:port]` clients reach the hub at.", metavar="HOST"),
    ] = "localhost:8000",
    secure: Annotated[
        bool, typer.Option("--secure", help="Clients use wss:// and https://.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write to this file instead of stdout.", show_default=False
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Print the hub's AsyncAPI 3.0 document: servers, channels by namespace, operations.

    Each namespace's `schema` is its messages' payload; the operations follow
    its permissions.

    Examples:

    * `eventcast asyncapi --config eventcast.toml`
    * `eventcast asyncapi --host rt.example.com --secure -o asyncapi.json`
    """
    settings = _load_settings(config)
    from .server.asyncapi import asyncapi_document

    text = json.dumps(asyncapi_document(settings, host=host, secure=secure), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")


_register_hub_commands(app)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line in-process and return its exit code.

    Args:
        argv: the arguments without the program name (default: ``sys.argv[1:]``).

    Expected errors print one line to stderr (usage errors also show the usage)
    and return 1 (error) or 2 (usage or configuration error); Ctrl-C returns 130
    (``tail`` treats it as the normal way to stop: 0).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    stderr = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        result = app(args=args, prog_name="eventcast", standalone_mode=False)
    except typer.Exit as exc:  # --help, --version; typer turns Ctrl-C into Exit(130)
        if exc.exit_code == EXIT_INTERRUPTED:
            stderr.print("interrupted", markup=False)
        return exc.exit_code
    except _UsageException as exc:  # bad usage: print the usage and the error
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:  # pragma: no cover - every usage error of typer/click has show()
            stderr.print(f"error: {exc.format_message()}", markup=False)
        return int(exc.exit_code)
    except typer.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            stderr.print("interrupted", markup=False)
            return EXIT_INTERRUPTED
        stderr.print("aborted", markup=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        stderr.print("interrupted", markup=False)
        return EXIT_INTERRUPTED
    except CliError as exc:
        stderr.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except ConfigurationError as exc:
        stderr.print(f"error: {exc}", markup=False)
        return EXIT_USAGE
    except EventcastError as exc:
        stderr.print(f"error: {exc}", markup=False)
        return EXIT_ERROR
    if result == EXIT_INTERRUPTED:  # typer turns Ctrl-C into the exit code 130
        stderr.print("interrupted", markup=False)
    return result if isinstance(result, int) else EXIT_OK
