"""One table from a model folder's `kind` (model.json) to the function that opens it.

Each predictor module registers its own kind when it is imported (`register_loader`):
`predictor` the single run, `ensemble` and `two_stage` the composite folders. `load_predictor`
(predictor.py) asks `loader_for(kind)`, which imports the kind's home module on first need, so
predictor.py never imports ensemble.py or two_stage.py and they never import each other: both
sit on top of predictor.py and this table. `read_definition` reads the composite folders'
ensemble.json / two_stage.json through the run folder's one reader (runs/layout.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

from imgclf.errors import ImgclfError
from imgclf.runs.layout import ENSEMBLE, SINGLE, TWO_STAGE, read_json

FORMAT = 1  # of ensemble.json and two_stage.json
# kind → the module that registers its loader when imported
HOMES = {
    SINGLE: "imgclf.predict.predictor",
    ENSEMBLE: "imgclf.predict.ensemble",
    TWO_STAGE: "imgclf.predict.two_stage",
}
LOADERS: dict[str, Callable] = {}  # kind → loader(folder, device)


def register_loader(kind: str, loader: Callable) -> None:
    """Open folders of this kind with `loader(folder, device)`."""
    LOADERS[kind] = loader


def loader_for(kind: str) -> Callable:
    """The registered loader of a kind, importing its home module first when needed."""
    if kind not in LOADERS and kind in HOMES:
        importlib.import_module(HOMES[kind])
    try:
        return LOADERS[kind]
    except KeyError:
        raise ImgclfError(f"no loader for model kind {kind!r}; known: {sorted(HOMES)}") from None


def read_definition(path: Path, required: Sequence[str]) -> dict:
    """ensemble.json / two_stage.json, with the keys named in errors."""
    spec = read_json(path)
    missing = [k for k in required if k not in spec]
    if missing:
        raise ImgclfError(f"{path} lacks the keys {missing}")
    if spec.get("format", FORMAT) > FORMAT:
        raise ImgclfError(f"{path} has format {spec['format']}; upgrade imgclf to read it")
    return spec
