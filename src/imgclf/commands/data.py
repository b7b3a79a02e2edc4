"""`imgclf` commands for the data area: `scan`, `split`, `data preview`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from imgclf.commands._common import console
from imgclf.errors import ImgclfError

data_app = typer.Typer(no_args_is_help=True, help="Look at a manifest's images.")


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
    from imgclf.commands.tables import print_scan_report
    from imgclf.config import load_config
    from imgclf.data.prepare import rescan
    from imgclf.data.scan import REPORT_JSON, default_manifest_dir

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


def split(
    manifest: Annotated[Path, typer.Argument(help="manifest folder written by `imgclf scan`")],
    train: float = 0.65,
    val: float = 0.20,
    test: float = 0.15,
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="recompute even if a split is given")] = False,
) -> None:
    """Stratified, duplicate-grouped, seeded train/val/test split (a column in the manifest)."""
    from imgclf.commands.tables import print_split_report
    from imgclf.config import SplitConfig
    from imgclf.data.prepare import split_and_save

    fractions = _validated(SplitConfig, train=train, val=val, test=test, seed=seed)
    _, report = split_and_save(manifest, fractions, force=force)
    print_split_report(report.to_dict(), console)


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
    crop_mode: Annotated[
        Literal["center", "squash"] | None,
        typer.Option(
            help="center: the centre square of each image; squash: the whole image resized to "
            "a square (default: the config's data.crop_mode, else center)"
        ),
    ] = None,
) -> None:
    """Contact sheet: N samples per class, raw beside augmented, to tune augmentation by eye.

    With --config (or key=value overrides) the run config's own augmentation and crop mode are
    drawn, and its MixUp / CutMix in a third block."""
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
            crop_mode=crop_mode or "center",
        )
    else:
        sheet = _preview_config(manifest, config, overrides or [], augment, per_class, size,
                                split, seed, out, crop_mode)  # fmt: skip
    mixed = " (+ MixUp / CutMix)" if sheet.mixed else ""
    console.print(
        f"{sheet.classes} classes × {sheet.per_class} samples{mixed} → {out}", highlight=False
    )


def _preview_config(
    manifest, config, overrides, augment, per_class, size, split, seed, out, crop_mode
):
    """A contact sheet of a run config's augmentation (and its batch mixer)."""
    from imgclf.config import load_config
    from imgclf.data.manifest import read_manifest
    from imgclf.data.preview import contact_sheet
    from imgclf.runs.layout import CONFIG_YAML
    from imgclf.train.losses import batch_mixer

    if config is not None and config.is_dir():
        if not (config / CONFIG_YAML).is_file():
            raise ImgclfError(f"{config} is a folder without {CONFIG_YAML}: give a run folder "
                              "or a run config YAML")  # fmt: skip
        config = config / CONFIG_YAML
    preset = [f"train.augment.preset={augment}"] if augment else []
    mode = [f"data.crop_mode={crop_mode}"] if crop_mode else []
    cfg = load_config(config, [*preset, *mode, *overrides])
    train = cfg.train
    mixer = batch_mixer(train, len(read_manifest(manifest).labels))
    parts = [
        f"mixup {train.mixup:g}" if train.mixup else "",
        f"cutmix {train.cutmix:g}" if train.cutmix else "",
    ]
    name = (
        config.parent.name
        if config and config.name == CONFIG_YAML
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
        crop_mode=cfg.data.crop_mode or "center",
    )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(scan)
    app.command()(split)
    data_app.command()(preview)
    app.add_typer(data_app, name="data")
