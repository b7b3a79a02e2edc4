"""`epochs: auto` and `early_stopping.patience: auto`, resolved once when a run starts.

The default recipe (`config.DEFAULT_STAGES`: a head stage, then fine-tuning) leaves its length
to the data. What a stage needs is a number of *images seen*, not of epochs: a head on frozen
pretrained features settles after about 3,000, fine-tuning the whole model after about 15,000.
So an auto stage trains ceil(3,000 / n) or ceil(15,000 / n) epochs for n training images,
clamped: at least 2 (head) or 3 (fine-tuning), so a large dataset still gets a cosine schedule
and a second look at each image; at most 10 or 30, so a tiny one does not memorise itself for
hundreds of epochs. About 1,000 training images give head 3 + fine-tuning 15, the hand recipe
the transfer-learning examples settled on; 100,000 give 2 + 3.

Auto stages also stop early (patience 3 on `early_stopping.metric`) when
`early_stopping.patience` is auto: their length is an estimate, a fixed length is a decision.

A head-only auto stage on a randomly initialised backbone (a scratch model, `pretrained: none`)
would train a classifier on noise, so it is skipped (0 epochs) when a later stage trains more
than the head; a stage the user sized keeps `train/fit.py`'s warning instead. On such a backbone
an auto stage's `bn: eval` (the default fine-tuning stage's: keep the pretrained statistics)
becomes `frozen-eval`: there are no statistics to keep, and BatchNorm frozen at its initial
mean 0 / variance 1 would not normalise at all.

The same config and data give the same numbers, so a resumed run (which checks that the data is
unchanged) recomputes them; config.yaml keeps `auto` and summary.json's `config` has the numbers.
Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imgclf.config import StageConfig, TrainConfig

HEAD_IMAGES, HEAD_EPOCHS = 3_000, (2, 10)  # a head-only stage: images to see, epoch bounds
OTHER_IMAGES, OTHER_EPOCHS = 15_000, (3, 30)  # any other stage
AUTO_PATIENCE = 3  # early stopping of auto stages when early_stopping.patience is auto
SKIPPED_HEAD = "no pretrained backbone: the head stage is skipped; the model trains whole"
OWN_STATISTICS = "no pretrained BatchNorm statistics to keep: bn: eval → frozen-eval"


def auto_epochs(trainable: object, n_train: int) -> int:
    """Epochs of an `epochs: auto` stage for `n_train` training images (module docstring)."""
    images, (low, high) = (
        (HEAD_IMAGES, HEAD_EPOCHS) if trainable == "head" else (OTHER_IMAGES, OTHER_EPOCHS)
    )
    return min(high, max(low, math.ceil(images / max(n_train, 1))))


@dataclass(frozen=True)
class Recipe:
    """A TrainConfig with every stage's epochs an int (0: skipped), and what was decided."""

    train: TrainConfig
    patience: tuple[int | None, ...]  # early stopping per stage; None: never
    lines: tuple[str, ...]  # what the run logs about it, once

    @property
    def first_trained(self) -> StageConfig:
        """The first stage that trains (lr-find and `bench train` set it up)."""
        return next(s for s in self.train.stages if s.epochs)


def resolve_recipe(train: TrainConfig, n_train: int, random_backbone: bool = False) -> Recipe:
    """Every `auto` of `train` as a number, for `n_train` training images."""
    stages, patience, shown = [], [], []
    skip = own_statistics = False
    for i, stage in enumerate(train.stages):
        auto = stage.epochs == "auto"
        epochs = auto_epochs(stage.trainable, n_train) if auto else stage.epochs
        update: dict = {"epochs": epochs}
        if auto and random_backbone and stage.trainable == "head" and _trains_more(train, i):
            update["epochs"], skip = 0, True
        if auto and random_backbone and stage.bn == "eval":
            update["bn"], own_statistics = "frozen-eval", True
        p = train.early_stopping.patience
        patience.append((AUTO_PATIENCE if auto else None) if p == "auto" else p)
        if auto:
            shown.append(f"{stage.name or f'stage {i}'} {update['epochs']}")
        # model_copy does not validate: 0 (skipped) is never a value a user may write.
        stages.append(stage.model_copy(update=update) if auto else stage)
    lines = []
    if shown:
        lines.append(f"epochs: auto → {', '.join(shown)} ({n_train:,} training images)")
    if skip:
        lines.append(SKIPPED_HEAD)
    if own_statistics:
        lines.append(OWN_STATISTICS)
    return Recipe(train.model_copy(update={"stages": stages}), tuple(patience), tuple(lines))


def _trains_more(train: TrainConfig, index: int) -> bool:
    return any(s.trainable != "head" for s in train.stages[index + 1 :])
