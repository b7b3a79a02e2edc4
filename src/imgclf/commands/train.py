"""`imgclf` commands for the train area: `train`, `lr-find`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgclf.commands._common import console, split_config_arg
from imgclf.errors import ImgclfError
from imgclf.runs.layout import CONFIG_YAML, RunFolder


def train(
    config: Annotated[
        Path | None,
        typer.Argument(help="run config YAML, or a data folder / CSV (sets data.root)"),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    model: Annotated[str | None, typer.Option(help="model.name (`imgclf models`)")] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="epochs of the run's single stage; with no stages configured, one "
            "whole-model stage of that many epochs instead of the default two-stage recipe",
        ),
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
    from imgclf.workflows.training import train as run_training

    config, overrides = split_config_arg(config, overrides)
    if config is not None and (config.is_dir() or config.suffix.lower() in (".csv", ".tsv")):
        config, overrides = None, [f"data.root={json.dumps(str(config))}", *overrides]
    changes = overrides or (model, epochs, image_size) != (None, None, None)
    if resume is not None and config is None and changes and (resume / CONFIG_YAML).is_file():
        # `--resume RUN key=value`: the overrides apply to the run's own config, not to the
        # defaults (which would differ from it in every key the run's config set).
        config = resume / CONFIG_YAML
    overrides = _train_shortcuts(config, overrides, model, epochs, image_size)
    cfg = load_config(config, overrides) if (config or overrides or not resume) else None
    path = run_training(cfg, resume=resume, force=force, progress=progress, log=console.print)
    if not world_from_env().is_zero:
        return  # under torchrun rank 0 reports for every rank
    console.print(f"run folder: {path}")
    status = RunFolder(path).summary()["status"]
    if status == "interrupted":
        console.print(f"interrupted and saved; continue with: imgclf train --resume {path}")
        raise typer.Exit(130)


def lr_find(
    config: Annotated[Path | None, typer.Argument(help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="plot file")] = Path("lr_find.png"),
    steps: Annotated[int, typer.Option(help="lrs tried")] = 100,
) -> None:
    """Sweep the first stage's learning rate over a short run; plot loss vs lr; suggest one."""
    from imgclf.config import load_config
    from imgclf.workflows.lr_search import find_lr

    config, overrides = split_config_arg(config, overrides)
    result = find_lr(load_config(config, overrides), out, num_steps=steps)
    console.print(f"suggested lr: [bold]{result.suggestion:.2e}[/] ({result.reason}); plot: {out}")


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
        train = load_config(config, overrides).train
        stages = train.stages
        if "stages" not in train.model_fields_set:
            # No stages written: --epochs asks for one whole-model stage of that length
            # instead of the default two-stage recipe with auto epochs.
            return [*short, f"train.stages=[{{epochs: {epochs}}}]", *overrides]
        if len(stages) > 1:
            raise ImgclfError(
                f"--epochs sets the epochs of a single stage, and this config has {len(stages)}: "
                "set train.stages.N.epochs=… for each stage instead"
            )
        short.append(f"train.stages.0.epochs={epochs}")
    return [*short, *overrides]


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(train)
    app.command("lr-find")(lr_find)
