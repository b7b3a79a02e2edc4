"""One vocabulary of metric names: what each stage measures, and which way is better.

Torch-free (the config, the sweep spec and the leaderboard import it on their fast paths).

- EPOCH_METRICS: what training measures every epoch (a row of `metrics.csv`), the names that
  `train.best_metric`, `train.early_stopping.metric`, a stage's `plateau.metric` and a sweep's
  `metric` may name; checked when the config or sweep file loads.
- FINAL_METRICS: `summary.json`'s `val` and `test` blocks, measured once with the best weights.
- EVALUATION_METRICS: `imgclf evaluate`'s `metrics.json` summary (leaderboard columns
  `<evaluation>.<name>`).

`val_top5` (training) and `top_5_accuracy` (evaluation) are the same measure under two names,
computed by one function (`imgclf.evaluate.metrics.top_k_hits`); both names stay, since run
folders written before keep them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction
    meaning: str
    only_when: str = ""  # measured only under this condition ("" = always)
    alias_of: str = ""  # the same measure under another stage's name


TOP5_CLASSES = 5  # top-5 accuracy is measured only with more classes than this


def _table(*metrics: Metric) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


EPOCH_METRICS = _table(
    Metric("train_loss", "minimize", "mean training loss over the epoch's batches"),
    Metric("train_accuracy", "maximize", "top-1 accuracy on the training batches"),
    Metric("val_loss", "minimize", "negative log-likelihood of the validation probabilities"),
    Metric("val_accuracy", "maximize", "top-1 accuracy on the validation split"),
    Metric(
        "val_top5",
        "maximize",
        "top-5 accuracy on the validation split",
        only_when="more than 5 classes",
        alias_of="top_5_accuracy",
    ),
)

FINAL_METRICS = _table(
    *(
        Metric(f"{split}_{base}", m.direction, m.meaning.replace("validation", split), m.only_when)
        for split in ("val", "test")
        for base, m in (
            ("loss", EPOCH_METRICS["val_loss"]),
            ("accuracy", EPOCH_METRICS["val_accuracy"]),
            ("top5", EPOCH_METRICS["val_top5"]),
        )
    )
)

EVALUATION_METRICS = _table(
    Metric("accuracy", "maximize", "top-1 accuracy"),
    *(
        Metric(
            f"top_{k}_accuracy",
            "maximize",
            f"fraction of images whose class is among the {k} most probable",
            only_when=f"more than {k} classes",
            alias_of="val_top5 / test_top5" if k == 5 else "",
        )
        for k in (1, 3, 5)
    ),
    Metric("balanced_accuracy", "maximize", "mean recall over the classes present"),
    *(
        Metric(f"{score}_{avg}", "maximize", f"{avg} {score}")
        for score in ("precision", "recall", "f1")
        for avg in ("macro", "weighted")
    ),
    Metric("log_loss", "minimize", "mean negative log probability of the true class"),
    Metric("ece", "minimize", "expected calibration error (15 bins of top-1 confidence)"),
    Metric("mean_confidence", "maximize", "mean top-1 probability (informative, not a score)"),
)

ALL_METRICS = {**EPOCH_METRICS, **FINAL_METRICS, **EVALUATION_METRICS}

# Columns outside the vocabulary (leaderboard --sort on anything): a name with one of these
# words, separated by "_" or ".", is a cost.
_LOWER_WORDS = frozenset({"loss", "error", "ece"})


def direction(name: str) -> Direction:
    """maximize or minimize. Names in the vocabulary (an evaluation's `<name>.` prefix
    ignored) have their declared direction; any other name is minimised when one of its words is
    loss, error or ece, else maximised."""
    base = name.rsplit(".", 1)[-1]
    metric = ALL_METRICS.get(name) or ALL_METRICS.get(base)
    if metric is not None:
        return metric.direction
    words = set(base.replace(".", "_").split("_"))
    return "minimize" if words & _LOWER_WORDS else "maximize"


def lower_is_better(name: str) -> bool:
    """True for losses and errors: the smaller value is the better one."""
    return direction(name) == "minimize"


def check_epoch_metric(name: str) -> str:
    """`name` when training measures it every epoch, else ValueError with the nearest name."""
    if name in EPOCH_METRICS:
        return name
    choices = list(EPOCH_METRICS)
    near = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]}? " if near else ""
    if name in ALL_METRICS:
        hint = f"{name} is measured after training, not every epoch; " + hint
    raise ValueError(f"unknown metric {name!r}; {hint}(choose from {', '.join(choices)})")


def unmeasured(name: str, num_classes: int) -> str | None:
    """Why an epoch metric will not be measured with `num_classes` classes (None: it will)."""
    if name == "val_top5" and num_classes <= TOP5_CLASSES:
        return f"val_top5 is measured only with more than 5 classes; this data has {num_classes}"
    return None
