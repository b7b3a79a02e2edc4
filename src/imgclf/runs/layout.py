"""The run folder's layout: its file names, and the one reader of what training wrote.

runs/<run-id>/ config.yaml, environment.json, data.json, metrics.csv, summary.json,
model.safetensors + model.json, checkpoints/last.pt, plots/, predictions/<split>.csv,
evaluations/<name>/. An ensemble folder adds ensemble.json, a two-stage folder two_stage.json
(and comparison.json); model.json's `kind` tells the three apart.

Torch-free (the leaderboard lists a thousand runs with it): writers that need torch live in
runs/record.py and runs/checkpoint.py, and take their names from here.

One error policy: a file that is missing, unreadable, not UTF-8 or not the expected JSON object
raises `RunFileError` (an `ImgclfError`) naming the file and what to do. Callers that must
tolerate half-written folders (the leaderboard, warnings, best-effort extras) catch it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from imgclf.data.manifest import MANIFEST_JSON
from imgclf.errors import ImgclfError

CONFIG_YAML = "config.yaml"
ENVIRONMENT_JSON = "environment.json"
DATA_JSON = "data.json"
METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"
CHECKPOINT = f"{CHECKPOINTS}/last.pt"
PLOTS = "plots"
PREDICTIONS = "predictions"
EVALUATIONS = "evaluations"
EVALUATION_METRICS = "metrics.json"  # evaluations/<name>/metrics.json
LOCK = ".lock"
ENSEMBLE_JSON = "ensemble.json"
TWO_STAGE_JSON = "two_stage.json"
COMPARISON_JSON = "comparison.json"
FIT_JSON = "fit.json"  # fits/<id>/fit.json: the record of an `imgclf fit`
SUBFOLDERS = (CHECKPOINTS, PLOTS, PREDICTIONS)  # made when a training run starts

# model.json's `kind` (absent: single): a training run, an ensemble, a two-stage model.
SINGLE, ENSEMBLE, TWO_STAGE = "single", "ensemble", "two_stage"
KINDS = (SINGLE, ENSEMBLE, TWO_STAGE)
DEFINITIONS = {ENSEMBLE: ENSEMBLE_JSON, TWO_STAGE: TWO_STAGE_JSON}

# What to do when a file is missing or broken, by file name.
_FIX = {
    SUMMARY_JSON: "is it a run folder? A run killed while starting has none: train it again",
    MODEL_JSON: "is it a finished run (or ensemble) folder?",
    CONFIG_YAML: "is it a run folder? Train it again, or restore the file from a copy",
    DATA_JSON: "it names the manifest the run trained on; evaluate a labelled folder with "
    "--data FOLDER instead",
    ENVIRONMENT_JSON: "restore the file from a copy of the run folder",
    ENSEMBLE_JSON: "the folder is not a complete model; rebuild it with `imgclf ensemble`",
    TWO_STAGE_JSON: "the folder is not a complete model; rebuild it with `imgclf two-stage`",
}
# PyYAML's C loader when built with libyaml: the same safe loader, about 7× faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RunFileError(ImgclfError):
    """A run-folder file that is missing (`missing`), unreadable, or of the wrong shape."""

    def __init__(self, message: str, path: Path, missing: bool = False) -> None:
        super().__init__(message)
        self.path, self.missing = Path(path), missing


def read_json(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """A JSON object from a run-like folder; RunFileError names the file and what to do."""
    path = Path(path)
    fix = fix or _FIX.get(path.name, "restore it from a copy of the folder")
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RunFileError(f"{path.parent} has no {path.name}: {fix}", path, True) from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise RunFileError(f"cannot read {path}: {e}; {fix}", path) from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path} must hold a JSON object; {fix}", path)
    return data


def read_yaml(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """A YAML mapping (safe loading only); RunFileError names the file and what to do."""
    path = Path(path)
    fix = fix or _FIX.get(path.name, "restore it from a copy of the folder")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{path.parent} has no {path.name}: {fix}", path, True) from None
    except (OSError, ValueError) as e:
        raise RunFileError(f"cannot read {path}: {e}; {fix}", path) from None
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader (C when available)
    except yaml.YAMLError as e:
        raise RunFileError(f"{path} is not valid YAML: {e}; {fix}", path) from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path} is not a mapping of sections; {fix}", path)
    return data


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """metrics.csv as rows of floats (empty or unreadable cells become NaN); [] when absent."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, csv.Error) as e:
        raise RunFileError(f"cannot read {path}: {e}; restore it from a copy", Path(path)) from None
    return [{k: _float(v) for k, v in r.items() if k} for r in rows]


def _float(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def is_model_folder(path: str | Path) -> bool:
    """A folder holding model.json: a run, an ensemble or a two-stage folder."""
    return Path(path).is_dir() and (Path(path) / MODEL_JSON).is_file()


class RunFolder:
    """A run-like folder (run, ensemble or two-stage), read through one error policy."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def json(self, name: str) -> dict[str, Any]:
        return read_json(self.path / name)

    def summary(self) -> dict[str, Any]:
        return self.json(SUMMARY_JSON)

    def model_spec(self) -> dict[str, Any]:
        """model.json: what rebuilds the model (format, kind, spec, preprocessing, labels)."""
        return self.json(MODEL_JSON)

    def data(self) -> dict[str, Any]:
        """data.json: the manifest, data version, labels and split the run trained on."""
        return self.json(DATA_JSON)

    def environment(self) -> dict[str, Any]:
        return self.json(ENVIRONMENT_JSON)

    def config(self) -> dict[str, Any]:
        """config.yaml as written (for an ensemble or two-stage folder: how it was built)."""
        return read_yaml(self.path / CONFIG_YAML)

    def metrics(self) -> list[dict[str, float]]:
        return read_metrics(self.path / METRICS_CSV)

    @property
    def kind(self) -> str:
        """single, ensemble or two_stage: model.json's `kind`, else summary.json's, else single
        (a training run before model.json is written)."""
        for name in (MODEL_JSON, SUMMARY_JSON):
            try:
                kind = self.json(name).get("kind")
            except RunFileError:
                continue
            if kind is not None:
                if kind not in KINDS:
                    raise RunFileError(
                        f"{self.path / name}: unknown kind {kind!r}; this imgclf reads "
                        f"{', '.join(KINDS)}",
                        self.path / name,
                    )
                return kind
        return SINGLE

    def definition_file(self) -> Path | None:
        """ensemble.json or two_stage.json; None for a single run."""
        name = DEFINITIONS.get(self.kind)
        return None if name is None else self.path / name

    def manifest_dir(self, data: dict[str, Any] | None = None) -> Path:
        """The manifest folder the run trained on, named in data.json: as written (from the
        working directory), else beside the runs folder (where `imgclf demo` puts both)."""
        where = self.path / DATA_JSON
        info = self.data() if data is None else data
        named = info.get("manifest")
        if not named:
            raise RunFileError(
                f"{where} names no manifest, so {self.path} has no split of its own; "
                "evaluate a labelled folder with --data FOLDER",
                where,
            )
        named = Path(str(named))
        for candidate in (named, self.path.resolve().parent.parent / named):
            if (candidate / MANIFEST_JSON).is_file():
                return candidate
        raise RunFileError(
            f"the manifest {named} named in {where} is gone; re-create it with `imgclf scan`, "
            "or evaluate a folder with --data FOLDER",
            where,
            missing=True,
        )
