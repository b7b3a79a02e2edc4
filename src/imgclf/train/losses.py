"""Classification losses, class-imbalance handling and batch mixing (MixUp / CutMix).

Every loss here takes logits (N×C) and either class indices (N,) or soft targets (N×C
probabilities, e.g. from `batch_mixer`). `train.imbalance` picks the loss:

| imbalance     | loss                                                                     |
|---------------|--------------------------------------------------------------------------|
| none          | cross-entropy                                                            |
| weighted_loss | cross-entropy weighted by `class_weights(counts)`                        |
| sampler       | cross-entropy (the loader's weighted sampler balances the classes)       |
| focal         | `FocalLoss(train.focal_gamma)`                                           |

All of them apply `train.label_smoothing`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError

IMBALANCE = ("none", "weighted_loss", "sampler", "focal")


def class_weights(counts: Sequence[int]) -> Tensor:
    """Inverse-frequency weights, mean 1 over the classes present; absent classes get 0."""
    c = torch.as_tensor(list(counts), dtype=torch.float64)
    if c.ndim != 1 or len(c) == 0 or bool((c < 0).any()):
        raise ImgclfError(f"class counts must be a non-empty list of counts ≥ 0, got {counts}")
    present = c > 0
    if not present.any():
        raise ImgclfError("class counts are all zero: there is nothing to weight")
    if not present.all():
        missing = torch.nonzero(~present).flatten().tolist()
        warnings.warn(
            f"classes {missing} have no training examples; their loss weight is 0",
            stacklevel=2,
        )
    w = torch.zeros_like(c)
    w[present] = 1.0 / c[present]
    w[present] /= w[present].mean()
    return w.float()


class FocalLoss(nn.Module):
    """Multi-class focal loss on logits; exactly cross-entropy at gamma 0.

    Per sample: -Σ_c w_c q_c (1 - p_c)^γ log p_c, with q the (smoothed) target distribution.
    The mean follows torch's cross_entropy: divided by Σ w[target] for class indices with a
    weight, by N otherwise.
    """

    def __init__(
        self, gamma: float = 2.0, weight: Tensor | None = None, label_smoothing: float = 0.0
    ):
        super().__init__()
        if gamma < 0 or not 0 <= label_smoothing < 1:
            raise ImgclfError(
                f"focal loss needs gamma ≥ 0 and 0 ≤ label_smoothing < 1, got {gamma}, "
                f"{label_smoothing}"
            )
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", None if weight is None else weight.float())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # float32 even under autocast: log-probabilities of confident classes underflow in half.
        logp = F.log_softmax(logits.float(), dim=1)
        num_classes = logp.shape[1]
        hard = not target.is_floating_point()
        q = F.one_hot(target, num_classes).float() if hard else target.float()
        if self.label_smoothing:
            q = q * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        terms = -q * logp
        if self.gamma:
            # 1 - p as -expm1(log p) keeps precision for confident classes; the floor keeps the
            # gradient of (1 - p)^γ finite for γ < 1 when p rounds to 1.
            terms = terms * (-torch.expm1(logp)).clamp(min=1e-12) ** self.gamma
        if self.weight is not None:
            terms = terms * self.weight
        total = terms.sum()
        if hard and self.weight is not None:
            return total / self.weight[target].sum()
        return total / logp.shape[0]

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}"


def build_loss(train: TrainConfig, class_counts: Sequence[int] | None = None) -> nn.Module:
    """The training loss for `train.imbalance`; weighted_loss needs the train-split class counts."""
    smoothing = train.label_smoothing
    if train.imbalance in ("none", "sampler"):
        return nn.CrossEntropyLoss(label_smoothing=smoothing)
    if train.imbalance == "weighted_loss":
        if class_counts is None:
            raise ImgclfError("imbalance: weighted_loss needs the class counts of the train split")
        return nn.CrossEntropyLoss(weight=class_weights(class_counts), label_smoothing=smoothing)
    if train.imbalance == "focal":
        return FocalLoss(train.focal_gamma, label_smoothing=smoothing)
    raise ImgclfError(
        f"unknown imbalance {train.imbalance!r}; choose one of {', '.join(IMBALANCE)}"
    )


def imbalance_record(
    train: TrainConfig, counts: Sequence[int], labels: Sequence[str]
) -> dict | None:
    """What `train.imbalance` does to each class, for the log and data.json (None for none).

    weighted_loss: the loss weights; sampler: the relative chance of drawing one image of each
    class (the loader's weights 1 / count, scaled to mean 1); focal: no class weights, every
    class 1, the loss down-weights easy examples by (1 - p)^gamma instead.
    """
    mode = train.imbalance
    if mode == "none":
        return None
    if mode == "focal":
        weights = [1.0] * len(labels)
    else:
        with warnings.catch_warnings():  # an empty class is already said by build_loss
            warnings.simplefilter("ignore")
            weights = class_weights(counts).tolist()
    record = {
        "mode": mode,
        "class_counts": dict(zip(labels, map(int, counts), strict=True)),
        "class_weights": {n: round(w, 4) for n, w in zip(labels, weights, strict=True)},
        "applied_as": {
            "weighted_loss": "cross-entropy weight per class",
            "sampler": "relative chance of drawing each image of the class",
            "focal": f"no class weights; focal loss with gamma {train.focal_gamma:g}",
        }[mode],
    }
    return record


def describe_imbalance(record: dict) -> str:
    """One log line: `imbalance weighted_loss: class weights a 0.5, b 1.5 (…)`."""
    shown = ", ".join(f"{n} {w:g}" for n, w in list(record["class_weights"].items())[:30])
    more = " …" if len(record["class_weights"]) > 30 else ""
    return f"imbalance {record['mode']}: class weights {shown}{more} ({record['applied_as']})"


def batch_mixer(
    train: TrainConfig, num_classes: int
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """MixUp and/or CutMix: (images, labels) → (images, N×C soft targets); None when both off."""
    mixers = []
    if train.mixup > 0:
        mixers.append(v2.MixUp(alpha=train.mixup, num_classes=num_classes))
    if train.cutmix > 0:
        mixers.append(v2.CutMix(alpha=train.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    # One of the two per batch, chosen at random, as in torchvision's classification references.
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
