"""The model type every builder returns, and the preprocessing contract it travels with."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from imgclf.errors import ImgclfError
from imgclf.models.heads import Head

INTERPOLATIONS = ("bilinear", "bicubic")
FEATURE_FORMATS = ("NCHW", "NHWC", "NLC")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a model: resize side / crop_pct, center crop, normalize."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ImgclfError(
                f"preprocessing interpolation {self.interpolation!r} is unknown; "
                f"choose one of {INTERPOLATIONS}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ImgclfError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ImgclfError("preprocessing mean and std need one value per RGB channel")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists, not tuples), as stored in model.json."""
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of to_dict; unknown or missing keys are an error naming them."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names[:3] if n not in data]
        if unknown or missing:
            raise ImgclfError(
                f"preprocessing: unknown keys {unknown}, missing keys {missing}; "
                f"valid keys: {names}"
            )
        return cls(
            input_size=int(data["input_size"]),
            mean=as_triple(data["mean"]),
            std=as_triple(data["std"]),
            interpolation=str(data.get("interpolation", "bicubic")),
            crop_pct=float(data.get("crop_pct", 0.875)),
        )


def as_triple(values: Any) -> tuple[float, float, float]:
    """Three floats (per RGB channel) from any sequence."""
    a, b, c = (float(v) for v in values)
    return (a, b, c)


class ImgclfModel(nn.Module):
    """A backbone that returns a N×C×H×W feature map, and a head that turns it into logits."""

    def __init__(self, backbone: nn.Module, head: Head, spec: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Everything model_from_spec needs to rebuild this architecture; saved as model.json.
        self.spec = spec
        self._feature_format = spec.get("feature_format", "NCHW")
        self._prefix_tokens = int(spec.get("prefix_tokens", 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images → N×C×H×W feature map."""
        return to_nchw(self.backbone.forward_features(x), self._feature_format, self._prefix_tokens)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map → logits."""
        return self.head(fmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def to_nchw(out: torch.Tensor, feature_format: str, prefix_tokens: int = 0) -> torch.Tensor:
    """Backbone output in its native layout → N×C×H×W, so every head sees one layout."""
    if feature_format == "NCHW":
        return out
    if feature_format == "NHWC":
        return out.permute(0, 3, 1, 2)
    # Transformers return tokens: drop class/register tokens, fold the patch grid back.
    tokens = out[:, prefix_tokens:]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ImgclfError(
            f"the backbone returned {tokens.shape[1]} patch tokens, which is not a square grid; "
            f"use a square data.image_size"
        )
    return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
