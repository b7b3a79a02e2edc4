"""The classifier on top of a backbone's feature map: pool → optional dense layers → logits.

`pool()` and `classify()` are separate so pooled features can be cached once and heads trained
on the cache without running the backbone again.
"""

from __future__ import annotations

import torch
from torch import nn

from imgclf.config import HeadConfig
from imgclf.errors import ImgclfError

POOL_KINDS = ("avg", "max", "avgmax", "flatten")

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Head(nn.Module):
    """Pool a N×C×H×W feature map, then dense layers to `num_classes` logits."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        cfg: HeadConfig,
        fmap_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ImgclfError(f"a head needs at least 1 class, got num_classes={num_classes}")
        if cfg.pool not in POOL_KINDS:
            raise ImgclfError(f"head.pool {cfg.pool!r} is unknown; choose one of {POOL_KINDS}")
        if cfg.pool == "flatten" and fmap_size is None:
            raise ImgclfError(
                "head.pool: flatten needs the feature map size (fmap_size); "
                "build the model with build_model(), which measures it at the input size"
            )
        self.pool_kind = cfg.pool
        self.fmap_size = tuple(fmap_size) if fmap_size is not None else None
        self.pooled_dim = _pooled_dim(cfg.pool, in_channels, self.fmap_size)
        layers: list[nn.Module] = []
        width = self.pooled_dim
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[cfg.activation]()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = hidden
        # Without hidden layers the dropout still belongs right before the output layer.
        if not cfg.hidden and cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        self.pre_logits = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """N×C×H×W feature map → N×pooled_dim vector."""
        if self.pool_kind == "avg":
            return fmap.mean(dim=(2, 3))
        if self.pool_kind == "max":
            return fmap.amax(dim=(2, 3))
        if self.pool_kind == "avgmax":
            return torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)
        if tuple(fmap.shape[2:]) != self.fmap_size:
            raise ImgclfError(
                f"head.pool: flatten was built for a {self.fmap_size} feature map but got "
                f"{tuple(fmap.shape[2:])}; feed images at the model's input size, or use "
                f"head.pool: avg, which accepts any size"
            )
        return fmap.flatten(1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled vector → logits."""
        return self.fc(self.pre_logits(pooled))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(fmap))


def _pooled_dim(pool: str, channels: int, fmap_size: tuple[int, ...] | None) -> int:
    if pool == "avgmax":
        return 2 * channels
    if pool == "flatten":
        assert fmap_size is not None
        return channels * fmap_size[0] * fmap_size[1]
    return channels
