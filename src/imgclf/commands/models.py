"""`imgclf` commands for models and configs: `models`, `config show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgclf.commands._common import console, split_config_arg

config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")


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


def config_show(
    config: Annotated[Path | None, typer.Argument(help="run config YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value …")] = None,
    describe: Annotated[
        bool, typer.Option(help="one line per key: key, value, description")
    ] = False,
) -> None:
    """Print the fully resolved config, every default filled in."""
    from imgclf.config import dump_yaml, load_config

    config, overrides = split_config_arg(config, overrides)
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


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
    app.command()(models)
    config_app.command("show")(config_show)
    app.add_typer(config_app, name="config")
