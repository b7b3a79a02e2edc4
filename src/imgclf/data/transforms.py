"""Train augmentation presets and the eval transform: PIL RGB image → normalised float tensor.

A preset sets every transform; any field of `AugmentConfig` set explicitly overrides it (0 turns a
transform off). `resolve_augment` gives the effective values, which is what a run saves.

| preset  | crop (area)   | hflip | rotation | shear | translate | color_jitter | erasing | noise |
|---------|---------------|-------|----------|-------|-----------|--------------|---------|-------|
| none    | eval crop     | 0     | 0        | 0     | 0         | 0            | 0       | 0     |
| light   | RRC (0.6, 1)  | 0.5   | 0        | 0     | 0         | 0            | 0       | 0     |
| default | RRC (0.35, 1) | 0.5   | 10°      | 0     | 0         | 0.2          | 0       | 0     |
| strong  | RRC (0.25, 1) | 0.5   | 20°      | 10°   | 0.1       | 0.4          | 0.25    | 0.03  |

vflip is 0 in every preset. color_jitter j means brightness, contrast and saturation j, hue j/4;
shear s shears both axes by up to ±s degrees; translate t shifts by up to t × the side; erasing is
the probability of one RandomErasing box; noise is the Gaussian std on the 0–1 scale.

Order: geometric transforms on the PIL / uint8 image (crop → flips → RandomAffine), then colour
jitter, then ToImage → float in [0, 1] → Gaussian noise (clipped to [0, 1]) → Normalize →
RandomErasing (value 0, i.e. the mean). The affine fill (black, white or the dataset mean) is
applied before normalisation, so a rotated digit keeps a truly black background.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from imgclf.config import AugmentConfig
from imgclf.errors import ImgclfError

TRANSFORM_KEYS = (
    "scale",
    "hflip",
    "vflip",
    "rotation",
    "shear",
    "translate",
    "color_jitter",
    "erasing",
    "noise",
)
_OFF: dict[str, Any] = {k: 0.0 for k in TRANSFORM_KEYS} | {"scale": None}
PRESETS: dict[str, dict[str, Any]] = {
    "none": _OFF,
    "light": _OFF | {"scale": (0.6, 1.0), "hflip": 0.5},
    "default": _OFF | {"scale": (0.35, 1.0), "hflip": 0.5, "rotation": 10.0, "color_jitter": 0.2},
    "strong": _OFF
    | {
        "scale": (0.25, 1.0),
        "hflip": 0.5,
        "rotation": 20.0,
        "shear": 10.0,
        "translate": 0.1,
        "color_jitter": 0.4,
        "erasing": 0.25,
        "noise": 0.03,
    },
}
INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def resolve_augment(aug: AugmentConfig) -> dict[str, Any]:
    """The effective value of every transform (plain values): the preset, overridden by fields."""
    if aug.preset not in PRESETS:
        raise ImgclfError(f"unknown augment preset {aug.preset!r}; choose one of {list(PRESETS)}")
    resolved: dict[str, Any] = {"preset": aug.preset}
    for key in TRANSFORM_KEYS:
        explicit = getattr(aug, key)
        resolved[key] = PRESETS[aug.preset][key] if explicit is None else explicit
    if resolved["scale"] is not None:
        lo, hi = (float(x) for x in resolved["scale"])
        if not 0 < lo <= hi <= 1:
            raise ImgclfError(
                f"augment.scale must be (low, high) with 0 < low ≤ high ≤ 1, got {aug.scale}"
            )
        resolved["scale"] = [lo, hi]
    for key in TRANSFORM_KEYS[1:]:
        resolved[key] = float(resolved[key])
    resolved["fill"] = aug.fill
    return resolved


def _interpolation(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ImgclfError(
            f"unknown interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}"
        )
    return INTERPOLATIONS[name]


def _fill(name: str, mean: Sequence[float]) -> int | tuple[int, ...]:
    """The affine fill in uint8 pixel values (it is applied before normalisation)."""
    if name == "black":
        return 0
    if name == "white":
        return 255
    if name == "mean":
        return tuple(round(255 * m) for m in mean)
    raise ImgclfError(f"unknown augment.fill {name!r}; choose one of black, white, mean")


def _resize_crop(size: int, crop_pct: float, mode: InterpolationMode) -> list[Callable]:
    if not 0 < crop_pct <= 1:
        raise ImgclfError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return [v2.Resize(round(size / crop_pct), interpolation=mode), v2.CenterCrop(size)]


def _to_normalised(
    mean: Sequence[float], std: Sequence[float], noise: float = 0.0
) -> list[Callable]:
    steps: list[Callable] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if noise:
        steps.append(v2.GaussianNoise(sigma=noise, clip=True))
    steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return steps


def eval_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 0.875,
) -> Callable:
    """Resize the short side to round(size / crop_pct), center-crop size × size, normalise."""
    mode = _interpolation(interpolation)
    return v2.Compose(
        [*_resize_crop(size, crop_pct, mode), *_to_normalised(mean, std), v2.ToPureTensor()]
    )


def train_transform(
    aug: AugmentConfig,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 0.875,
) -> Callable:
    """The training pipeline for `aug` (crop_pct is used only without a random resized crop)."""
    r = resolve_augment(aug)
    mode = _interpolation(interpolation)
    if r["scale"] is None:
        steps = _resize_crop(size, crop_pct, mode)
    else:
        steps = [v2.RandomResizedCrop(size, scale=tuple(r["scale"]), interpolation=mode)]
    if r["hflip"]:
        steps.append(v2.RandomHorizontalFlip(r["hflip"]))
    if r["vflip"]:
        steps.append(v2.RandomVerticalFlip(r["vflip"]))
    if r["rotation"] or r["shear"] or r["translate"]:
        steps.append(
            v2.RandomAffine(
                degrees=r["rotation"],
                translate=(r["translate"], r["translate"]) if r["translate"] else None,
                shear=(-r["shear"], r["shear"], -r["shear"], r["shear"]) if r["shear"] else None,
                interpolation=mode,
                fill=_fill(r["fill"], mean),
            )
        )
    if r["color_jitter"]:
        j = r["color_jitter"]
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 4))
    steps += _to_normalised(mean, std, r["noise"])
    if r["erasing"]:
        # value 0 after Normalize is the dataset mean: the erased box carries no colour signal.
        steps.append(v2.RandomErasing(p=r["erasing"], value=0))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


class _FiveViews:
    """Picklable (DataLoader workers): centre first, then the four corners."""

    def __init__(self, resize: Callable, size: int, tail: Callable) -> None:
        self.resize, self.five, self.tail = resize, v2.FiveCrop(size), tail

    def __call__(self, image):
        tl, tr, bl, br, center = self.five(self.resize(image))
        return torch.stack([self.tail(v) for v in (center, tl, tr, bl, br)])


def multicrop_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 0.875,
) -> Callable:
    """Test-time views: centre and four corner crops of the eval resize, stacked (5, C, H, W)."""
    resize = v2.Resize(round(size / crop_pct), interpolation=_interpolation(interpolation))
    tail = v2.Compose([*_to_normalised(mean, std), v2.ToPureTensor()])
    return _FiveViews(resize, size, tail)
