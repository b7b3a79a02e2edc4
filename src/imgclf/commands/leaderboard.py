"""`imgclf` commands for the leaderboard area: `leaderboard`, `ui`, `mirror`, `data preview`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)
data_app = typer.Typer(no_args_is_help=True, help="Look at a manifest's images.")


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
    from imgclf.io import atomic_write_text
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


def preview(
    manifest: Annotated[Path, typer.Argument(help="manifest folder written by `imgclf scan`")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides of the run config (train.augment.*, mixup…)"),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="run config YAML, or a run folder (its config.yaml): its train.augment, "
            "MixUp and CutMix",
        ),
    ] = None,
    per_class: Annotated[int, typer.Option(min=1, max=64, help="samples per class")] = 6,
    augment: Annotated[
        Literal["none", "light", "default", "strong"] | None,
        typer.Option(help="augmentation preset (default: the config's, else default)"),
    ] = None,
    size: Annotated[int, typer.Option(min=8, max=1024, help="tile side in pixels")] = 96,
    split: Annotated[str | None, typer.Option(help="take samples from this split")] = None,
    seed: Annotated[int, typer.Option(help="which samples and which augmentations")] = 0,
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file")] = Path("preview.png"),
) -> None:
    """Contact sheet: N samples per class, raw beside augmented, to tune augmentation by eye.

    With --config (or key=value overrides) the run config's own augmentation is drawn, and its
    MixUp / CutMix in a third block."""
    from imgclf.data.preview import contact_sheet

    if config is None and not overrides:
        sheet = contact_sheet(
            manifest,
            per_class=per_class,
            preset=augment or "default",
            size=size,
            split=split,
            seed=seed,
            out=out,
        )
    else:
        sheet = _preview_config(manifest, config, overrides or [], augment, per_class, size,
                                split, seed, out)  # fmt: skip
    mixed = " (+ MixUp / CutMix)" if sheet.mixed else ""
    console.print(
        f"{sheet.classes} classes × {sheet.per_class} samples{mixed} → {out}", highlight=False
    )


def _preview_config(manifest, config, overrides, augment, per_class, size, split, seed, out):
    """A contact sheet of a run config's augmentation (and its batch mixer)."""
    from imgclf.config import load_config
    from imgclf.data.manifest import read_manifest
    from imgclf.data.preview import contact_sheet
    from imgclf.errors import ImgclfError
    from imgclf.train.losses import batch_mixer

    if config is not None and config.is_dir():
        if not (config / "config.yaml").is_file():
            raise ImgclfError(f"{config} is a folder without config.yaml: give a run folder or a "
                              "run config YAML")  # fmt: skip
        config = config / "config.yaml"
    preset = [f"train.augment.preset={augment}"] if augment else []
    cfg = load_config(config, [*preset, *overrides])
    train = cfg.train
    mixer = batch_mixer(train, len(read_manifest(manifest).labels))
    parts = [
        f"mixup {train.mixup:g}" if train.mixup else "",
        f"cutmix {train.cutmix:g}" if train.cutmix else "",
    ]
    name = (
        config.parent.name
        if config and config.name == "config.yaml"
        else (config.name if config else "overrides")
    )
    return contact_sheet(
        manifest,
        per_class=per_class,
        size=size,
        split=split,
        seed=seed,
        out=out,
        augment=train.augment,
        title=f"{name} ({train.augment.preset} preset + its overrides)",
        mixer=mixer,
        mix_title=f"mixed: {' / '.join(p for p in parts if p)} (with the class above)",
    )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(leaderboard)
    app.command()(ui)
    app.command()(mirror)
    data_app.command()(preview)
    app.add_typer(data_app, name="data")
