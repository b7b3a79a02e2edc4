"""The `imgclf` command line: parse → config → call one function → print.

Heavy imports (torch, timm) stay inside the commands that need them so `imgclf scan` starts fast.
"""

from __future__ import annotations

import json
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


@app.command()
def scan(
    data: Annotated[Path, typer.Argument(help="class-folder tree, or CSV of path,label[,split]")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="manifest folder")] = None,
    root: Annotated[Path | None, typer.Option(help="data root for CSV paths")] = None,
    labels: Annotated[Path | None, typer.Option(help="file with one class name per line")] = None,
    config: Annotated[Path | None, typer.Option("-c", "--config", help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="data.scan.key=value …")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Validate every image (full decode), write the manifest and a report."""
    from imgclf.config import load_config
    from imgclf.data.scan import REPORT_JSON, default_manifest_dir, scan_to
    from imgclf.views import print_scan_report

    cfg = load_config(config, overrides or [])
    out = out or default_manifest_dir(data)
    names = _read_labels(labels) if labels else None
    manifest = scan_to(data, out, cfg.data.scan, root=root, labels=names, progress=progress)
    print_scan_report(manifest.report, console)
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
    config: Annotated[Path | None, typer.Argument(help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run folder")] = None,
    force: Annotated[bool, typer.Option(help="resume despite config/data changes")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train one run into runs/<run-id>/ (or continue one with --resume RUN)."""
    from imgclf.config import load_config
    from imgclf.train.distributed import world_from_env
    from imgclf.train.run import train as run_training

    config, overrides = _split_config_arg(config, overrides)
    if resume is not None and config is None and overrides and (resume / "config.yaml").is_file():
        # `--resume RUN key=value`: the overrides apply to the run's own config, not to the
        # defaults (which would differ from it in every key the run's config set).
        config = resume / "config.yaml"
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
) -> None:
    """List the model names `model.name` accepts (scratch CNNs, then every timm architecture)."""
    from imgclf.models import list_models

    names = list_models(filter)
    console.print("\n".join(names), markup=False, highlight=False)
    console.print(f"{len(names)} models", style="dim")


@config_app.command("show")
def config_show(
    config: Annotated[Path | None, typer.Argument(help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
) -> None:
    """Print the fully resolved config, every default filled in."""
    from imgclf.config import dump_yaml, load_config

    config, overrides = _split_config_arg(config, overrides)
    console.print(dump_yaml(load_config(config, overrides)), markup=False, highlight=False)


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
        err_console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
