"""The `imgclf` command line: parse → config → call one function → print.

Heavy imports (torch, timm) stay inside the commands that need them so `imgclf scan` starts fast.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from imgclf.errors import ImgclfError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn a folder of labelled images into a tracked leaderboard of image classifiers.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")
console = Console()
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


@app.command()
def scan(
    data: Annotated[Path, typer.Argument(help="class-folder tree, or CSV of path,label[,split]")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="manifest folder")] = None,
    root: Annotated[Path | None, typer.Option(help="data root for CSV paths")] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="file with one class name per line: the label order (kept by re-scans)"),
    ] = None,
    config: Annotated[Path | None, typer.Option("-c", "--config", help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="data.scan.key=value …")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Validate every image (full decode), write the manifest and a report."""
    from imgclf.config import load_config
    from imgclf.data.prepare import rescan
    from imgclf.data.scan import REPORT_JSON, default_manifest_dir
    from imgclf.views import print_scan_report

    cfg = load_config(config, overrides or [])
    named, out = out is not None, out or default_manifest_dir(data)
    names = _read_labels(labels) if labels else None
    manifest, notes = rescan(
        data, out, cfg.data.scan, root=root, labels=names, progress=progress, named=named
    )
    print_scan_report(manifest.report, console)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    console.print(f"manifest: {out}/manifest.csv, report: {out}/{REPORT_JSON}")
    if not manifest.usable:
        raise ImgclfError(f"the data in {data} is not usable as it is; fix the errors above")


@app.command()
def split(
    manifest: Annotated[Path, typer.Argument(help="manifest folder written by `imgclf scan`")],
    train: float = 0.65,
    val: float = 0.20,
    test: float = 0.15,
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="recompute even if a split is given")] = False,
) -> None:
    """Stratified, duplicate-grouped, seeded train/val/test split (a column in the manifest)."""
    from imgclf.config import SplitConfig
    from imgclf.data.prepare import split_and_save
    from imgclf.views import print_split_report

    fractions = _validated(SplitConfig, train=train, val=val, test=test, seed=seed)
    _, report = split_and_save(manifest, fractions, force=force)
    print_split_report(report.to_dict(), console)


@app.command()
def train(
    config: Annotated[
        Path | None,
        typer.Argument(help="run config YAML, or a data folder / CSV (sets data.root)"),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    model: Annotated[str | None, typer.Option(help="model.name (`imgclf models`)")] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="epochs of the run's single stage")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="data.image_size")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run folder")] = None,
    force: Annotated[bool, typer.Option(help="resume despite config/data changes")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train one run into runs/<run-id>/ (or continue one with --resume RUN).

    `imgclf train data/photos --model resnet18 --epochs 5`: a folder or CSV as the first
    argument is the data (every other key at its default); key=value overrides apply last.
    """
    from imgclf.config import load_config
    from imgclf.train.distributed import world_from_env
    from imgclf.train.run import train as run_training

    config, overrides = _split_config_arg(config, overrides)
    if config is not None and (config.is_dir() or config.suffix.lower() in (".csv", ".tsv")):
        config, overrides = None, [f"data.root={json.dumps(str(config))}", *overrides]
    changes = overrides or (model, epochs, image_size) != (None, None, None)
    if resume is not None and config is None and changes and (resume / "config.yaml").is_file():
        # `--resume RUN key=value`: the overrides apply to the run's own config, not to the
        # defaults (which would differ from it in every key the run's config set).
        config = resume / "config.yaml"
    overrides = _train_shortcuts(config, overrides, model, epochs, image_size)
    cfg = load_config(config, overrides) if (config or overrides or not resume) else None
    path = run_training(cfg, resume=resume, force=force, progress=progress, log=console.print)
    if not world_from_env().is_zero:
        return  # under torchrun rank 0 reports for every rank
    console.print(f"run folder: {path}")
    status = json.loads((path / "summary.json").read_text())["status"]
    if status == "interrupted":
        console.print(f"interrupted and saved; continue with: imgclf train --resume {path}")
        raise typer.Exit(130)


@app.command("lr-find")
def lr_find(
    config: Annotated[Path | None, typer.Argument(help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="plot file")] = Path("lr_find.png"),
    steps: Annotated[int, typer.Option(help="lrs tried")] = 100,
) -> None:
    """Sweep the first stage's learning rate over a short run; plot loss vs lr; suggest one."""
    from imgclf.config import load_config
    from imgclf.train.lr_search import find_lr

    config, overrides = _split_config_arg(config, overrides)
    result = find_lr(load_config(config, overrides), out, num_steps=steps)
    console.print(f"suggested lr: [bold]{result.suggestion:.2e}[/] ({result.reason}); plot: {out}")


@app.command()
def models(
    filter: Annotated[str | None, typer.Argument(help="pattern, e.g. '*lite*'")] = None,
    packaged: Annotated[bool, typer.Option(help="only names with packaged weights")] = False,
) -> None:
    """List the model names `model.name` accepts (scratch CNNs, then every timm architecture).

    Names marked `packaged` have ImageNet weights installed with imgclf (`pretrained: packaged`).
    """
    from imgclf.models import list_models
    from imgclf.models.registry import has_packaged_weights

    names = list_models(filter)
    with_weights = [n for n in names if has_packaged_weights(n)]
    if packaged:
        names = with_weights
    width = max((len(n) for n in with_weights), default=0)
    rows = [f"{n:<{width}}  packaged" if n in with_weights else n for n in names]
    console.print("\n".join(rows), markup=False, highlight=False)
    console.print(
        f"{len(names)} models; {len(with_weights)} with packaged weights "
        "(pretrained: packaged, no network)",
        style="dim",
    )


@config_app.command("show")
def config_show(
    config: Annotated[Path | None, typer.Argument(help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    describe: Annotated[
        bool, typer.Option(help="one line per key: key, value, description")
    ] = False,
) -> None:
    """Print the fully resolved config, every default filled in."""
    from imgclf.config import dump_yaml, load_config

    config, overrides = _split_config_arg(config, overrides)
    cfg = load_config(config, overrides)
    if not describe:
        console.print(dump_yaml(cfg), markup=False, highlight=False)
        return
    rows = _described(cfg)
    width = max(len(key) for key, _, _ in rows)
    lines = [f"{key:<{width}}  {value}" + (f"  # {doc}" if doc else "") for key, value, doc in rows]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def _described(model, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value as YAML, the Field's description) for every leaf of a config."""
    from pydantic import BaseModel

    rows = []
    for name, field in type(model).model_fields.items():
        value, key = getattr(model, name), f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows += _described(value, f"{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, item in enumerate(value):
                rows += _described(item, f"{key}[{i}].")
        else:
            shown = json.dumps(
                value.model_dump(mode="json") if isinstance(value, BaseModel) else value,
                default=str,
            )
            rows.append((key, shown, " ".join((field.description or "").split())))
    return rows


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where manifests and runs go")] = Path("."),
    train: Annotated[bool, typer.Option(help="also train the two demo models")] = True,
    overrides: Annotated[list[str] | None, typer.Argument(help="applied to both runs")] = None,
) -> None:
    """The embedded example end to end: digits → scan → split → a scratch CNN and Lite0."""
    from imgclf.config import ScanConfig, SplitConfig, load_config
    from imgclf.configs import config_path
    from imgclf.data.example import digits_folder
    from imgclf.data.prepare import split_and_save
    from imgclf.data.scan import scan_to
    from imgclf.train.run import train as run_training
    from imgclf.views import print_run_table, print_scan_report, print_split_report

    folder = digits_folder()
    console.rule("[bold]1. scan")
    manifest_dir = out / "manifests" / "digits"
    manifest = scan_to(folder, manifest_dir, ScanConfig())
    print_scan_report(manifest.report, console)
    console.rule("[bold]2. split")
    _, report = split_and_save(manifest_dir, SplitConfig(), force=True)
    print_split_report(report.to_dict(), console)
    if not train:
        return
    runs = []
    for i, name in enumerate(("digits_scratch", "digits_lite0"), start=3):
        console.rule(f"[bold]{i}. train {name}")
        where = [f"data.root={folder}", f"data.manifest={manifest_dir}", f"runs_dir={out / 'runs'}"]
        cfg = load_config(config_path(name), [*where, *(overrides or [])])
        runs.append(run_training(cfg, progress=sys.stdout.isatty(), log=console.print))
    console.rule("[bold]results")
    print_run_table(runs, console)


def _split_config_arg(
    config: Path | None, overrides: list[str] | None
) -> tuple[Path | None, list[str]]:
    """`imgclf config show a.b=1` has no file: the first argument is then an override."""
    if config is not None and re.match(r"^[A-Za-z_][\w.]*=", str(config)) and not config.exists():
        return None, [str(config), *(overrides or [])]
    return config, list(overrides or [])


def _train_shortcuts(
    config: Path | None,
    overrides: list[str],
    model: str | None,
    epochs: int | None,
    image_size: int | None,
) -> list[str]:
    """`--model`, `--epochs`, `--image-size` as overrides placed before the user's own."""
    from imgclf.config import load_config

    short = [f"model.name={json.dumps(model)}"] if model is not None else []
    if image_size is not None:
        short.append(f"data.image_size={image_size}")
    if epochs is not None:
        stages = load_config(config, overrides).train.stages
        if len(stages) > 1:
            raise ImgclfError(
                f"--epochs sets the epochs of a single stage, and this config has {len(stages)}: "
                "set train.stages.N.epochs=… for each stage instead"
            )
        short.append(f"train.stages.0.epochs={epochs}")
    return [*short, *overrides]


def _read_labels(path: Path) -> list[str]:
    try:
        return [
            ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()
        ]
    except OSError as e:
        raise ImgclfError(f"cannot read the label list {path}: {e.strerror}") from e


def _validated(model, **values):
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as e:
        raise ImgclfError(f"invalid options: {e.errors()[0]['msg']}") from None


def _register_areas() -> None:
    from imgclf.commands import register_all

    register_all(app)


_register_areas()


def main() -> None:
    try:
        app()
    except ImgclfError as e:
        # Under torchrun every rank reaches the same refusal: one copy of it is enough.
        if not (getattr(e, "every_rank", False) and os.environ.get("RANK", "0") != "0"):
            err_console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
