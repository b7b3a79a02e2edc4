"""`imgclf doctor`: versions, GPU, free disk, the MLflow store, cache and checkpoint integrity,
stale temporary files — each with what to do about it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

_STYLE = {"ok": "green", "warn": "yellow", "problem": "bold red"}


def doctor(
    runs: Annotated[Path, typer.Option(help="runs folder")] = Path("runs"),
    cache: Annotated[
        Path | None, typer.Option(help="imgclf cache (default: $IMGCLF_CACHE or ~/.cache/imgclf)")
    ] = None,
    manifests: Annotated[Path, typer.Option(help="manifests folder")] = Path("manifests"),
    uri: Annotated[
        str | None, typer.Option(help="tracking URI (default: sqlite beside the runs)")
    ] = None,
    min_free_gb: Annotated[
        float, typer.Option(min=0, help="less free disk than this is a problem")
    ] = 2.0,
    stale_minutes: Annotated[
        float, typer.Option(min=0, help="temporary files older than this are stale")
    ] = 60.0,
    fix: Annotated[
        bool,
        typer.Option(help="remove stale temporary files and corrupt cache entries (only those)"),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check the environment and imgclf's folders; exit 1 when something is a problem."""
    from imgclf.data.example import cache_dir
    from imgclf.doctor import Places, apply_fixes, problems, run_checks
    from imgclf.errors import ImgclfError

    for label, path in (("--runs", runs), ("--cache", cache), ("--manifests", manifests)):
        if path is not None and path.exists() and not path.is_dir():
            raise ImgclfError(f"{label} {path} is a file; give the folder imgclf writes into")
    places = Places(runs=runs, cache=cache or cache_dir(), manifests=manifests, uri=uri)
    findings = run_checks(places, min_free_gb=min_free_gb, stale_minutes=stale_minutes)
    removed = apply_fixes(findings) if fix else []
    left = problems(findings)
    if as_json:
        out = {
            "problems": len(left),
            "warnings": sum(f.status == "warn" and not f.fixed for f in findings),
            "checks": [f.to_dict() for f in findings],
            "removed": removed,
        }
        typer.echo(json.dumps(out, indent=2))
    else:
        _print(findings, removed)
    if left:
        raise typer.Exit(1)


def _print(findings, removed: list[str]) -> None:
    from rich.table import Table

    console = Console()  # made now: the terminal width (COLUMNS) at the time of printing

    table = Table(show_lines=False)
    for column in ("check", "status", "detail", "what to do"):
        table.add_column(column, overflow="fold")
    for f in findings:
        status = f"[{_STYLE[f.status]}]{f.status}[/]" + (" [green](fixed)[/]" if f.fixed else "")
        table.add_row(f.check, status, escape(f.detail), escape(f.fix))
    console.print(table)
    for line in removed:
        console.print(escape(line), highlight=False)
    n_problems = sum(f.status == "problem" and not f.fixed for f in findings)
    n_warnings = sum(f.status == "warn" and not f.fixed for f in findings)
    fixable = sum(f.removable and f.status != "ok" and not f.fixed for f in findings)
    summary = f"{_count(n_problems, 'problem')}, {_count(n_warnings, 'warning')}"
    if fixable:
        summary += f"; imgclf doctor --fix deals with {fixable} of them"
    console.print(summary, style="bold red" if n_problems else "bold green", highlight=False)


def _count(n: int, noun: str) -> str:
    return f"{n or 'no'} {noun}{'' if n == 1 else 's'}"


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command("doctor")(doctor)
