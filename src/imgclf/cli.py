"""The `imgclf` command line: parse → config → call one function → print.

This module holds the app, its global options and `main()`; every command lives in
`imgclf.commands.<area>` and registers itself on the app. Heavy imports (torch, timm) stay inside
the commands that need them so `imgclf scan` starts fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from imgclf.commands import register_all
from imgclf.errors import ImgclfError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn a folder of labelled images into a tracked leaderboard of image classifiers.",
)
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from imgclf import __version__

        typer.echo(f"imgclf {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print and exit"),
    ] = False,
) -> None:
    """Turn a folder of labelled images into a tracked leaderboard of image classifiers."""


register_all(app)


def main() -> None:
    try:
        app()
    except ImgclfError as e:
        # Under torchrun every rank reaches the same refusal: one copy of it is enough.
        if not (getattr(e, "every_rank", False) and os.environ.get("RANK", "0") != "0"):
            err_console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
