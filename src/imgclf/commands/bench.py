"""`imgclf bench loader | train | predict`: throughput on the user's own data and machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
bench_app = typer.Typer(help="Measure the loader, the training pipelines and prediction.")

ConfigArg = Annotated[
    Path | None, typer.Argument(help="run config YAML, or a data folder (data.root)")
]
Overrides = Annotated[list[str] | None, typer.Argument(help="section.key=value …")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _config(config, overrides):
    from imgclf.commands._common import split_config_arg
    from imgclf.config import load_config

    config, overrides = split_config_arg(config, overrides)
    if config is not None and config.is_dir():  # `imgclf bench loader DATA`: a folder of images
        config, overrides = None, [f"data.root={config}", *overrides]
    return load_config(config, overrides)


def _emit(as_json: bool, payload: dict) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2))


@bench_app.command("loader")
def loader(
    config: ConfigArg = None,
    overrides: Overrides = None,
    workers: Annotated[str, typer.Option(help="worker counts to try, comma-separated")] = (
        "0,1,2,4,8,16"
    ),
    batches: Annotated[
        int | None, typer.Option(min=1, help="stop each pass after this many batches")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Epoch time of the standard training loader (no model) against its worker count."""
    from imgclf.errors import ImgclfError
    from imgclf.workflows.bench import bench_loader, describe, recommend_workers

    cfg = _config(config, overrides)
    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError:
        raise ImgclfError(f"--workers {workers!r}: give counts like 0,2,4,8") from None
    log = (lambda _m: None) if as_json else console.print
    rows = bench_loader(cfg, counts, batches, log)
    best = recommend_workers(rows)
    if not as_json:
        console.print(f"recommended: train.workers={best} (the fewest within 5 % of the best)")
    _emit(as_json, {"setup": describe(cfg), "rows": rows, "recommended_workers": best})


@bench_app.command("train")
def train(
    config: ConfigArg = None,
    overrides: Overrides = None,
    pipelines: Annotated[str, typer.Option(help="standard,cached,synthetic")] = (
        "standard,cached,synthetic"
    ),
    steps: Annotated[int, typer.Option(min=1, help="timed steps per pipeline")] = 30,
    warmup: Annotated[int, typer.Option(min=0, help="untimed steps after the first")] = 5,
    as_json: AsJson = False,
) -> None:
    """Images/s of the standard pipeline, the cached pipeline and synthetic on-device data."""
    from imgclf.workflows.bench import bench_train, describe

    cfg = _config(config, overrides)
    setup = describe(cfg)
    log = (lambda _m: None) if as_json else console.print
    log(", ".join(f"{k} {v}" for k, v in setup.items()))
    names = [p.strip() for p in pipelines.split(",") if p.strip()]
    rows = bench_train(cfg, names, steps=steps, warmup=warmup, log=log)
    limit = next((r["images_per_s"] for r in rows if r["pipeline"] == "synthetic"), None)
    for r in rows:
        r["of_limit"] = r["images_per_s"] / limit if limit else None
    if not as_json and limit:
        console.print("  ".join(f"{r['pipeline']} {r['of_limit']:.0%} of the limit" for r in rows))
    _emit(as_json, {"setup": setup, "rows": rows})


@bench_app.command("predict")
def predict(
    run: Annotated[Path, typer.Argument(help="run folder")],
    inputs: Annotated[list[str], typer.Argument(help="image files, folders or lists")],
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    workers: Annotated[int, typer.Option(min=0)] = 0,
    as_json: AsJson = False,
) -> None:
    """Images/s of a run's predictor over images (model loading excluded)."""
    from imgclf.errors import ImgclfError
    from imgclf.predict.inputs import expand
    from imgclf.workflows.bench import bench_predict

    paths = [Path(p) for p in expand(inputs).paths]
    if not paths:
        raise ImgclfError(f"no images found in {' '.join(inputs)}")
    log = (lambda _m: None) if as_json else console.print
    _emit(as_json, bench_predict(run, paths, batch_size, workers, log))


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.add_typer(bench_app, name="bench")
