"""The model type every builder returns, and the preprocessing contract it travels with."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from imgclf.errors import ImgclfError

# The contract lives in the torch-free geometry module; imported from here as it always was.
from imgclf.geometry import INTERPOLATIONS as INTERPOLATIONS
from imgclf.geometry import Preprocessing as Preprocessing
from imgclf.geometry import as_triple as as_triple
from imgclf.models.heads import Head

FEATURE_FORMATS = ("NCHW", "NHWC", "NLC")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_channels_last(device_type: str) -> bool:
    """The memory format a model runs in unless a run says otherwise (`train.channels_last`):
    channels_last on CUDA and on the CPU alike, for training and prediction.

    CUDA's convolutions prefer it (tensor cores); so do oneDNN's on the CPU: measured on the
    2-core CPU (`benchmarks/memory_format.py`), training is 1.5–1.9× faster (EfficientNet-Lite0
    at 224 px 10.6 → 19.4 images/s, Lite1 at 240 px 4.7 → 8.9, the scratch CNN at 32 px
    1,436 → 2,211) and inference 1.0–2.3× (batches of 1 to 32). Other devices (mps)
    keep the contiguous layout."""
    return device_type in ("cuda", "cpu")


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
