"""`imgclf evaluate` and `imgclf report`: score runs and render self-contained HTML pages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgclf.commands._common import console

SUMMARY_KEYS = ["accuracy", "top_3_accuracy", "top_5_accuracy", "balanced_accuracy", "f1_macro"]
SUMMARY_KEYS += ["recall_weighted", "log_loss", "ece"]


def evaluate(
    run: Annotated[Path, typer.Argument(help="run folder")],
    split: Annotated[
        str | None, typer.Option(help="test | val: the run's own split (default test, else val)")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="a new labelled class-folder tree or CSV of path,label")
    ] = None,
    tta: Annotated[
        str | None, typer.Option(help="test-time augmentation: flip | multi-crop")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="evaluation folder name (default: split or folder name)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per batch")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="image-loading worker processes")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Metrics, confusion, calibration and error analysis into RUN/evaluations/<name>/."""
    from imgclf.evaluate.evaluate import evaluate_run

    result = evaluate_run(run, split, data, tta, name, batch_size, workers, progress)
    print_evaluation(result.record, result.folder, console)


def report(
    runs: Annotated[list[Path] | None, typer.Argument(help="one or more run folders")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--out",
            help="page to write: one run → default RUN/report.html; several → the comparison "
            "page, default reports/compare-<time>.html",
        ),
    ] = None,
    sweep: Annotated[str | None, typer.Option(help="the report of this sweep instead")] = None,
    runs_dir: Annotated[Path, typer.Option(help="runs folder of --sweep")] = Path("runs"),
    storage: Annotated[
        str | None,
        typer.Option(
            envvar="IMGCLF_SWEEP_STORAGE", help="storage URL of --sweep (default: sweep.json's)"
        ),
    ] = None,
) -> None:
    """One self-contained HTML page per run (evaluating it first if needed); a comparison page
    for several runs."""
    from imgclf.errors import ImgclfError
    from imgclf.evaluate.report import compare_runs, write_report

    if sweep:
        from imgclf.sweep.report import write_sweep_report

        path = write_sweep_report(sweep, runs_dir, storage)
        console.print(f"sweep report: {path}", soft_wrap=True)
        return
    if not runs:
        raise ImgclfError("name one or more run folders, or --sweep ID")
    if len(runs) == 1:
        console.print(f"report: {write_report(runs[0], out)}", soft_wrap=True)
        return
    for run in runs:
        console.print(f"report: {write_report(run)}", soft_wrap=True)
    console.print(f"comparison: {compare_runs(runs, out)}", soft_wrap=True)


def print_evaluation(record: dict, folder: Path, console) -> None:
    """A short summary of one evaluation on the terminal."""
    from rich.table import Table

    m, images = record["metrics"], record["images"]
    t = Table(title=f"evaluation {record['name']}", show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    failed = images["total"] - images["evaluated"]
    t.add_row("images", f"{images['evaluated']}" + (f" ({failed} unreadable)" if failed else ""))
    for key in SUMMARY_KEYS:
        if m.get(key) is not None:
            t.add_row(key, f"{m[key]:.4f}")
    gap = record.get("overfitting") or {}
    if gap:
        t.add_row("train−val accuracy gap", f"{gap['accuracy_gap']:+.4f}")
    console.print(t)
    groups = [g for g in record["confusion_groups"] if len(g) > 1]
    if groups:
        console.print("confused groups: " + "; ".join(", ".join(g) for g in groups[:5]))
    for w in record["warnings"]:
        console.print(f"[yellow]warning[/]: {w}", highlight=False)
    console.print(f"evaluation: {folder}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(evaluate)
    app.command()(report)
