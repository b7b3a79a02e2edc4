"""Search space → Optuna distributions, the finite list of trial slots, and each trial's config.

Every method becomes a list of *slots*: a stable key (`g3` for grid point 3, a variant's name,
`r2`, `o5`) and the Optuna params fixed for it (`None`: the TPE sampler chooses). Slots are what
make re-runs continue a sweep and what keep parallel workers from running a point twice.

Dotted keys index into the *resolved* base config, lists included: `train.stages.0.lr`.
Categorical values that are not scalars (e.g. `model.head.hidden: [[], [256]]`) are stored in
Optuna as compact JSON strings and decoded back before they reach the config.
"""

from __future__ import annotations

import copy
import difflib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from imgclf.config import RunConfig, load_config, resolve, validate
from imgclf.errors import ImgclfError
from imgclf.runs.layout import CONFIG_YAML, MODEL_WEIGHTS
from imgclf.sweep.spec import SweepConfig, encode_choice

VARIANT = "variant"  # the one Optuna parameter of a `list` sweep


@dataclass(frozen=True)
class Slot:
    """One point of the sweep: `key` identifies it across re-runs and workers."""

    key: str
    params: dict[str, Any] | None  # encoded Optuna params; None: sampled when the trial starts


def distributions(spec: SweepConfig) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every parameter (a `list` sweep has one: the variant)."""
    if spec.method == "list":
        return {VARIANT: CategoricalDistribution([v.name for v in spec.variants])}
    out: dict[str, BaseDistribution] = {}
    for key, p in spec.parameters.items():
        if p.values is not None:
            out[key] = CategoricalDistribution([encode_choice(v) for v in p.values])
        elif p.is_int:
            step = int(p.step) if p.step else 1
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=step)  # type: ignore[arg-type]
        else:
            out[key] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)  # type: ignore[arg-type]
    return out


def plan(spec: SweepConfig) -> list[Slot]:
    """Every slot of the sweep, in the order they are queued."""
    if spec.method == "grid":
        keys = list(spec.parameters)
        choices = [[encode_choice(v) for v in spec.parameters[k].values or []] for k in keys]
        return [
            Slot(f"g{i}", dict(zip(keys, combo, strict=True)))
            for i, combo in enumerate(itertools.product(*choices))
        ]
    if spec.method == "list":
        return [Slot(v.name, {VARIANT: v.name}) for v in spec.variants]
    fixed = [{k: encode_choice(v) for k, v in point.items()} for point in spec.enqueue]
    assert spec.trials is not None
    if spec.method == "random":
        sampled = _random_points(spec)
        return [
            Slot(f"r{i}", {**sampled[i], **(fixed[i] if i < len(fixed) else {})})
            for i in range(spec.trials)
        ]
    return [Slot(f"o{i}", fixed[i] if i < len(fixed) else None) for i in range(spec.trials)]


def _random_points(spec: SweepConfig) -> list[dict[str, Any]]:
    """`trials` points from a seeded RandomSampler: the same for any number of workers, and a
    longer sweep extends a shorter one (the sequence does not depend on `trials`)."""
    dists = distributions(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.seed))
    points = []
    for _ in range(spec.trials or 0):
        trial = study.ask(dists)
        points.append(dict(trial.params))
        study.tell(trial, 0.0)
    return points


def decode(spec: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Optuna params → config values (JSON-encoded choices back to lists and mappings)."""
    values = dict(params)
    for name, dist in distributions(spec).items():
        p = spec.parameters.get(name)
        if name in values and p is not None and isinstance(dist, CategoricalDistribution):
            values[name] = p.values[list(dist.choices).index(values[name])]  # type: ignore[index]
    return values


def suggest(trial: optuna.Trial, spec: SweepConfig) -> dict[str, Any]:
    """Ask the trial for every parameter (fixed ones come back as queued); decoded values."""
    values: dict[str, Any] = {}
    for name, dist in distributions(spec).items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        else:
            assert isinstance(dist, FloatDistribution)
            values[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
    return decode(spec, values)


def base_tree(spec: SweepConfig, cli_overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved base config every trial starts from: the base file (or the warm-start run's
    config), then the sweep's overrides, then the command line's."""
    if spec.base is not None:
        cfg = load_config(spec.base)
    elif spec.init_from is not None:
        cfg = load_config(finished_run(spec.init_from) / CONFIG_YAML)
    else:
        cfg = RunConfig()
    tree = resolve(cfg)
    for item in spec.overrides:
        set_override(tree, item, "sweep overrides")
    for item in cli_overrides:
        set_override(tree, item, "command line")
    if spec.init_from is not None:
        tree["model"]["init_from"] = str(finished_run(spec.init_from))
    validate(tree, source=f"base config of sweep {spec.id}")
    return tree


def finished_run(path: Path) -> Path:
    """A completed run folder to warm-start from (absolute), or an error saying what is wrong."""
    path = Path(path).expanduser().resolve()
    if not (path / CONFIG_YAML).is_file():
        raise ImgclfError(f"init_from: {path} is not a run folder (no {CONFIG_YAML})")
    if not (path / MODEL_WEIGHTS).is_file():
        raise ImgclfError(f"init_from: {path} has no {MODEL_WEIGHTS}; it never finished")
    return path


def trial_config(tree: dict, spec: SweepConfig, values: dict[str, Any], number: int) -> RunConfig:
    """The run config of trial `number`: the base tree with its values, name and sweep tags."""
    t = copy.deepcopy(tree)
    if spec.method == "list":
        variant = next(v for v in spec.variants if v.name == values[VARIANT])
        for item in variant.overrides:
            set_override(t, item, f"variant {variant.name}")
    else:
        for key, value in values.items():
            set_dotted(t, key, value, "parameters")
    t["tags"] = {**(t.get("tags") or {}), "sweep": str(spec.id), "trial": str(number)}
    t["name"] = f"{str(spec.id)[:24]}-t{number}"
    return validate(t, source=f"trial {number} of sweep {spec.id} ({values})")


def check_space(tree: dict, spec: SweepConfig) -> None:
    """Fail before any training if a parameter key or value does not fit the config."""
    if spec.method == "list":
        for v in spec.variants:
            trial_config(tree, spec, {VARIANT: v.name}, 0)
        return
    for key, p in spec.parameters.items():
        probes = p.values if p.values is not None else [p.low, p.high]
        for value in probes:  # type: ignore[union-attr]
            t = copy.deepcopy(tree)
            set_dotted(t, key, value, "parameters")
            validate(t, source=f"sweep {spec.id}: parameter {key}={value!r}")


def set_override(tree: dict, item: str, source: str) -> None:
    """Apply one `a.b.0.c=value` override (value parsed as YAML) to a resolved config tree."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ImgclfError(f"{source}: {item!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ImgclfError(f"{source}: the value of {key.strip()} is not valid YAML: {e}") from e
    set_dotted(tree, key.strip(), parsed, source)


def set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    """Set `a.b.0.c` in a resolved config: every part must exist (list indices in range)."""
    parts, node, walked = key.split("."), tree, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(walked) or "the config"
        if isinstance(node, list):
            if not part.isdigit():
                raise ImgclfError(f"{source}: {key}: {where} is a list; index it, e.g. {where}.0")
            if int(part) >= len(node):
                raise ImgclfError(
                    f"{source}: {key}: {where} has {len(node)} item(s), no index {part}"
                )
            part_key: Any = int(part)
        elif isinstance(node, dict):
            if part not in node:
                raise ImgclfError(f"{source}: {key} is not a config key{_near(node, walked, part)}")
            part_key = part
        else:
            raise ImgclfError(f"{source}: {key}: {where} is a value ({node!r}), not a section")
        if last:
            node[part_key] = value
        else:
            node = node[part_key]
        walked.append(part)


def _near(node: dict, walked: list[str], part: str) -> str:
    near = difflib.get_close_matches(part, list(node), n=1, cutoff=0.5)
    prefix = ".".join(walked) + "." if walked else ""
    hint = f"; did you mean {prefix}{near[0]}?" if near else ""
    return f"{hint} (valid under {prefix.rstrip('.') or 'the top level'}: {', '.join(node)})"
