"""The typed sweep file: a base run config, a search space, a method and where the study lives.

Validated once, at the edge, in the style of `imgclf.config`: unknown keys fail with the nearest
valid key, and method-specific rules (a grid needs `values`, random and optuna need `trials`)
fail with the fix. Parameter keys are checked against the run config later, by `space`, because
only the resolved base config knows which keys (and list indices) exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgclf.config import explain
from imgclf.errors import ImgclfError
from imgclf.metric_names import check_epoch_metric, lower_is_better

METHODS = ("grid", "list", "random", "optuna")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def encode_choice(value: Any) -> Any:
    """Optuna stores only scalars as choices: lists and mappings travel as compact JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class ParamSpec(_Strict):
    """One dotted config key: a list of `values`, or a range `low`..`high` (random / optuna)."""

    values: list[Any] | None = Field(None, min_length=1, description="categorical choices")
    low: int | float | None = None  # ints stay ints: an integer range
    high: int | float | None = None
    log: bool = Field(False, description="sample the range on a log scale")
    step: int | float | None = Field(None, gt=0, description="range quantisation (not with log)")
    type: Literal["int", "float"] | None = Field(None, description="None: int if bounds are")

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        has_range = self.low is not None or self.high is not None
        if self.values is not None and has_range:
            raise ValueError("give either values or low/high, not both")
        if self.values is None and not has_range:
            raise ValueError("give values: [...] or a range low: / high:")
        if self.values is not None:
            encoded = [json.dumps([type(v).__name__, encode_choice(v)]) for v in self.values]
            if len(set(encoded)) != len(encoded):
                raise ValueError(f"values repeat: {self.values}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if not self.low < self.high:
            raise ValueError(f"low must be below high, got {self.low:g} and {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("step cannot be combined with log: true")
        return self

    @property
    def is_range(self) -> bool:
        return self.values is None

    @property
    def is_int(self) -> bool:
        if self.type is not None:
            return self.type == "int"
        bounds = [self.low, self.high, *([self.step] if self.step else [])]
        return all(isinstance(b, int) for b in bounds)

    def contains(self, value: Any) -> bool:
        if self.values is not None:
            return encode_choice(value) in [encode_choice(v) for v in self.values]
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
        return ok_type and self.low <= value <= self.high  # type: ignore[operator]


class Variant(_Strict):
    """One named trial of a `list` sweep: overrides on top of the base."""

    name: str = Field(min_length=1, max_length=64)
    overrides: list[str] = Field(default_factory=list, description="a.b=value, as on the CLI")


class PrunerSpec(_Strict):
    """Stop unpromising trials early on the epoch-by-epoch metric."""

    type: Literal["none", "median", "hyperband"] = "none"
    startup_trials: int = Field(2, ge=0, description="median: finished trials before pruning")
    warmup_epochs: int = Field(0, ge=0, description="median: epochs a trial always runs")
    min_epochs: int = Field(1, ge=1, description="hyperband: smallest budget")
    reduction_factor: int = Field(3, ge=2, description="hyperband: keep 1 in this many")


class HeartbeatSpec(_Strict):
    """RDB heartbeat: a trial whose worker stops beating for `grace` seconds is marked failed."""

    interval: int = Field(30, ge=1, description="seconds between heartbeats")
    grace: int | None = Field(None, ge=1, description="None: 4 × interval")

    @property
    def grace_seconds(self) -> int:
        return self.grace if self.grace is not None else 4 * self.interval


class SweepConfig(_Strict):
    """A sweep: trials are ordinary runs of `base` + `overrides` + one point of the space."""

    id: str | None = Field(None, description="study name; default: the sweep file's stem")
    base: Path | None = Field(None, description="run config, relative to the sweep file")
    overrides: list[str] = Field(default_factory=list, description="applied to every trial")
    method: Literal["grid", "list", "random", "optuna"] = "grid"
    parameters: dict[str, ParamSpec] = Field(default_factory=dict, description="dotted keys")
    variants: list[Variant] = Field(default_factory=list, description="method: list")
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list, description="random / optuna: points tried first"
    )
    trials: int | None = Field(None, ge=1, description="random / optuna: how many in all")
    metric: str = Field("val_accuracy", description="what the study optimises")
    direction: Literal["auto", "maximize", "minimize"] = "auto"
    seed: int = Field(0, description="sampler seed (random points, TPE)")
    startup_trials: int = Field(10, ge=0, description="optuna: random trials before TPE models")
    pruner: PrunerSpec = PrunerSpec()
    storage: str | None = Field(None, description="None: sqlite in <runs>/sweeps/<id>/")
    init_from: Path | None = Field(None, description="warm start every trial from this run")
    heartbeat: HeartbeatSpec = HeartbeatSpec()

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, v: str | None) -> str | None:
        if v is not None and not _ID.match(v):
            raise ValueError("use letters, digits, '_', '.', '-' (at most 64), e.g. digits-heads")
        return v

    @field_validator("parameters")
    @classmethod
    def _keys_are_dotted(cls, v: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        bad = [k for k in v if not _KEY.match(k)]
        if bad:
            raise ValueError(f"parameter keys are dotted config keys like model.head.pool: {bad}")
        return v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        return check_epoch_metric(v)

    @model_validator(mode="after")
    def _fits_the_method(self) -> SweepConfig:
        m, params = self.method, self.parameters
        if m in ("grid", "random", "optuna") and not params:
            raise ValueError(f"method {m} needs parameters: {{key: {{values: [...]}}}}")
        if m != "list" and self.variants:
            raise ValueError(f"variants are for method: list (this sweep is method: {m})")
        if m == "grid":
            ranges = [k for k, p in params.items() if p.is_range]
            if ranges:
                raise ValueError(
                    f"a grid needs values: for every parameter; {ranges} are ranges "
                    "(use method: random or optuna for ranges)"
                )
        if m == "list":
            if not self.variants or params:
                raise ValueError("method: list takes variants: [{name, overrides}], no parameters")
            names = [v.name for v in self.variants]
            if len(set(names)) != len(names):
                raise ValueError(f"variant names must be unique: {names}")
        if m in ("grid", "list") and self.trials is not None:
            raise ValueError(f"method {m} runs every point once; remove trials")
        if m in ("random", "optuna") and self.trials is None:
            raise ValueError(f"method {m} needs trials: N")
        self._check_enqueue()
        return self

    def _check_enqueue(self) -> None:
        if self.enqueue and self.method not in ("random", "optuna"):
            raise ValueError("enqueue is for method: random or optuna")
        if self.trials is not None and len(self.enqueue) > self.trials:
            raise ValueError(f"enqueue has {len(self.enqueue)} points but trials is {self.trials}")
        for i, point in enumerate(self.enqueue):
            unknown = sorted(set(point) - set(self.parameters))
            if unknown:
                raise ValueError(f"enqueue[{i}] sets {unknown}, which are not parameters")
            outside = [k for k, v in point.items() if not self.parameters[k].contains(v)]
            if outside:
                raise ValueError(f"enqueue[{i}]: {outside} outside the parameter's values/range")

    @property
    def maximize(self) -> bool:
        if self.direction != "auto":
            return self.direction == "maximize"
        return not lower_is_better(self.metric)


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; `id` defaults to its stem, `base` resolves beside it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImgclfError(f"sweep file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ImgclfError(f"{path} is not valid YAML: {e}") from e
    if raw is not None and not isinstance(raw, dict):
        raise ImgclfError(f"{path} must hold a mapping (id, base, method, parameters, …)")
    spec = validate_sweep(raw or {}, source=f"sweep file {path}")
    update: dict[str, Any] = {}
    if spec.id is None:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "sweep"
        update["id"] = stem[:64]
    if spec.base is not None and not spec.base.is_absolute():
        update["base"] = (path.parent / spec.base).resolve()
    return spec.model_copy(update=update)


def validate_sweep(raw: dict[str, Any], source: str = "sweep") -> SweepConfig:
    """Validate a sweep mapping; errors list every problem with the nearest valid key."""
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ImgclfError(f"invalid {source}:\n" + "\n".join(explain(e, SweepConfig))) from None


SWEEPS_DIR = "sweeps"  # <runs_dir>/sweeps/<id>/: sweep.json, study.db, logs/, report.html


def sweep_folder(runs_dir: str | Path, sweep_id: str) -> Path:
    """Where a sweep keeps its study (by default), worker logs and report."""
    return Path(runs_dir) / SWEEPS_DIR / sweep_id


def default_storage(runs_dir: str | Path, sweep_id: str) -> str:
    """The local SQLite study beside the runs (an absolute path: workers may change folder)."""
    return f"sqlite:///{(sweep_folder(runs_dir, sweep_id) / 'study.db').resolve()}"
