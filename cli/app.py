"""The `securegmi` typer app, its consoles, and how errors reach the terminal."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, ParamSpec

import typer
from rich.console import Console
from rich.markup import escape

from securegmi.errors import SecureGMIError

app = typer.Typer(
    help="Privacy-enhanced federated learning for probabilistic mixtures (FedGMI).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped or redirected, rich would assume 80 columns and cut table cells ("cluster_…"): a file
# or a pipe has no width, so a wide one, unless COLUMNS says otherwise.
UNBOUNDED_WIDTH = 400


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=UNBOUNDED_WIDTH if piped else None)


console = _console()
err_console = _console(stderr=True)
P = ParamSpec("P")


USER_ERROR, BUG = 2, 70  # exit codes: a mistake the message tells you how to fix; a bug in securegmi
_debug = False


def _version(shown: bool) -> None:
    if shown:
        from securegmi import __version__

        console.print(f"securegmi {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of any error")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    global _debug
    _debug = debug


def errors_as_messages(command: Callable[P, None]) -> Callable[P, None]:
    """Every error a user can cause (the tree in securegmi.errors) becomes one line and exit
    code 2; anything else is a bug: one line that says so and exit code 70. `--debug` shows the
    traceback of either."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except (SecureGMIError, typer.BadParameter) as exc:
            # typer.BadParameter is click's class under typer 0.20 and typer's vendored copy,
            # no longer a click.ClickException, under 0.29: named through typer, both count.
            if _debug:
                raise
            message = exc.format_message() if isinstance(exc, typer.BadParameter) else str(exc)
            # escape: a message such as "pip install 'securegmi[flower]'" is not rich markup.
            err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
            raise typer.Exit(code=USER_ERROR) from None
        except Exception as exc:
            if _debug:
                raise
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}. This is a bug in "
                "securegmi, not in your input: run again with --debug for the traceback and report it.",
                soft_wrap=True,
            )
            raise typer.Exit(code=BUG) from None

    return run


keys_app = typer.Typer(
    help="Key ceremonies: the CKKS keys of the secure protocol, the clients' signing keys.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
