"""The input of an exported model.onnx, made with numpy and Pillow only (this module must never
import torch: the server runs from an export folder without it).

For model.json's `preprocessing` {input_size S, interpolation, crop_pct} and an image decoded by
`imgclf.data.images.load_image(source, size_hint=S)` — EXIF orientation, alpha compositing,
16-bit scaling as in training, and, for JPEGs at least 2 × S on the short side, libjpeg's
reduced-size decoding (`draft`), which changes the pixels: pass size_hint=S exactly as
`imgclf predict` and `evaluate` do, or the probabilities drift by up to ~1e-2 (`load_input`
does both steps):

1. resize so the short side is R = round(S / crop_pct) (Python's round: halves to even) and the
   long side is int(R × long / short) (truncated), with Pillow's BILINEAR or BICUBIC filter
   (`interpolation`); an image already at that size is not resampled;
2. centre-crop S × S, top-left at (round((w - S) / 2), round((h - S) / 2));
3. uint8 → float32 × (1 / 255), HWC → CHW; stack images into N × 3 × S × S.

Mean and std are NOT applied here: the graph normalises inside. This is pixel for pixel what
torchvision's `Resize(R) → CenterCrop(S) → ToDtype(float32, scale=True)` does to a PIL image, so
PyTorch and onnxruntime see the same numbers (tests/test_export.py checks both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from imgclf.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, Source, load_image
from imgclf.errors import ImgclfError

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def resized_size(width: int, height: int, size: int, crop_pct: float) -> tuple[int, int]:
    """(width, height) after the short-side resize, with torchvision's rounding."""
    short_target = round(size / crop_pct)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_target * long / short)
    return (short_target, new_long) if width <= height else (new_long, short_target)


def preprocess(image: Image.Image, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """One RGB image → float32 array (3, S, S) in 0..1 (before normalisation)."""
    if image.mode != "RGB":
        raise ImgclfError(
            f"onnx preprocessing takes RGB images, got mode {image.mode}; open files with "
            "imgclf.data.images.load_image, which converts every mode as training did"
        )
    size = int(preprocessing["input_size"])
    crop_pct = float(preprocessing.get("crop_pct", 0.875))
    interpolation = str(preprocessing.get("interpolation", "bicubic"))
    if interpolation not in RESAMPLE:
        raise ImgclfError(f"unknown interpolation {interpolation!r}; valid: {list(RESAMPLE)}")
    if not 0 < crop_pct <= 1:
        raise ImgclfError(f"crop_pct must be in (0, 1], got {crop_pct}")
    w, h = image.size
    new = resized_size(w, h, size, crop_pct)
    if new != (w, h):
        image = image.resize(new, resample=RESAMPLE[interpolation])
    left = round((new[0] - size) / 2.0)
    top = round((new[1] - size) / 2.0)
    crop = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return crop.astype(np.float32).transpose(2, 0, 1) * np.float32(1.0 / 255)


def preprocess_batch(images: Sequence[Image.Image], preprocessing: Mapping[str, Any]) -> np.ndarray:
    """RGB images → the model's input (N, 3, S, S) float32, contiguous."""
    return np.ascontiguousarray(np.stack([preprocess(im, preprocessing) for im in images]))


def load_input(
    source: Source,
    preprocessing: Mapping[str, Any],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """A file, bytes or stream → (3, S, S) float32, decoded exactly as prediction decodes it
    (raises `ImageLoadError` for files the image loader refuses, too small ones included)."""
    size = int(preprocessing["input_size"])
    image = load_image(source, max_pixels=max_pixels, min_side=min_side, size_hint=size)
    return preprocess(image, preprocessing)
