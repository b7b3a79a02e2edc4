"""`imgclf demo`: the embedded example end to end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from imgclf.commands._common import console


def demo(
    out: Annotated[Path, typer.Option(help="where manifests and runs go")] = Path("."),
    train: Annotated[bool, typer.Option(help="also train the two demo models")] = True,
    overrides: Annotated[list[str] | None, typer.Argument(help="applied to both runs")] = None,
) -> None:
    """The embedded example end to end: digits → scan → split → a scratch CNN and Lite0."""
    from imgclf.commands.tables import print_run_table, print_scan_report, print_split_report
    from imgclf.config import ScanConfig, SplitConfig, load_config
    from imgclf.configs import config_path
    from imgclf.data.example import digits_folder
    from imgclf.data.prepare import split_and_save
    from imgclf.data.scan import scan_to
    from imgclf.workflows.training import train as run_training

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


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(demo)
