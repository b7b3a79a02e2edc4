"""`imgclf` commands for the leaderboard area: `leaderboard`, `ui`, `mirror`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning[/]: {escape(message)}", highlight=False)


def leaderboard(
    runs: Annotated[Path, typer.Option(help="runs folder")] = Path("runs"),
    sort: Annotated[str, typer.Option(help="column to rank by")] = "val_accuracy",
    order: Annotated[
        Literal["auto", "asc", "desc"],
        typer.Option(help="auto: losses ascending, others descending"),
    ] = "auto",
    top: Annotated[int | None, typer.Option(min=1, help="show the best N")] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="filter, e.g. 'model == efficientnet_lite0 and test_accuracy >= 0.9' or "
            "'status in (completed, interrupted) or val_accuracy > 0.8' (and binds before or)"
        ),
    ] = None,
    fmt: Annotated[
        Literal["table", "csv", "markdown", "html", "json"], typer.Option("--format", "-f")
    ] = "table",
    columns: Annotated[
        str | None, typer.Option(help="comma-separated columns (default: a compact set)")
    ] = None,
    wide: Annotated[
        bool, typer.Option(help="table: also config, losses, top-5 and parameter counts")
    ] = False,
    sweep: Annotated[str | None, typer.Option(help="only the trials of this sweep")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="write to this file")] = None,
) -> None:
    """Rank the runs in a folder: one row per run, with metrics, parameters and status."""
    from imgclf.files import atomic_write_text
    from imgclf.runs.leaderboard import leaderboard as build

    chosen = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    if sweep:
        where = f"sweep == {sweep}" + (f" and {where}" if where else "")
    text, n = build(runs, sort, order, top, where, fmt, chosen, warn=_warn, wide=wide)
    if out is not None:
        atomic_write_text(out, text)
        console.print(f"{n} runs → {out}", highlight=False)
    elif n == 0 and fmt == "table":
        _warn(f"no runs to show in {runs}")
    else:
        typer.echo(text, nl=False)


def ui(
    runs: Annotated[Path, typer.Option(help="runs folder whose tracking store to open")] = Path(
        "runs"
    ),
    uri: Annotated[str | None, typer.Option(help="tracking URI (default: tracking.uri)")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    experiment: Annotated[
        str, typer.Option(help="MLflow experiment whose runs to open")
    ] = "imgclf",
) -> None:
    """Start the MLflow UI on the runs' tracking store, bound to 127.0.0.1 (Ctrl-C stops it).

    The printed URL opens the experiment's runs table.
    """
    from imgclf.runs.tracking import run_ui

    raise typer.Exit(run_ui(runs, uri=uri, port=port, log=typer.echo, experiment=experiment))


def mirror(
    runs_paths: Annotated[list[Path], typer.Argument(help="run folders to mirror")],
    runs: Annotated[
        Path | None, typer.Option(help="runs folder (default: the run's parent)")
    ] = None,
    uri: Annotated[
        str | None, typer.Option(help="tracking URI (default: sqlite beside runs)")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "imgclf",
) -> None:
    """Mirror finished run folders to MLflow again (idempotent: no duplicate MLflow runs)."""
    from imgclf.config import TrackingConfig
    from imgclf.errors import ImgclfError
    from imgclf.runs.tracking import mirror_run

    tracking = TrackingConfig(mlflow=True, uri=uri, experiment=experiment)
    failed = [p for p in runs_paths if mirror_run(p, tracking, runs or p.parent, log=_warn) is None]
    if failed:
        raise ImgclfError(f"{len(failed)} of {len(runs_paths)} runs were not mirrored (see above)")
    console.print(f"mirrored {len(runs_paths)} runs", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(leaderboard)
    app.command()(ui)
    app.command()(mirror)
