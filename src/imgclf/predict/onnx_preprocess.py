"""The input of an exported model.onnx, made with numpy and Pillow only (this module must never
import torch: the server runs from an export folder without it).

For model.json's `preprocessing` {input_size S, interpolation, crop_pct, crop_mode} and an
image decoded by `imgclf.data.images.load_image(source, size_hint=S)` — EXIF orientation,
alpha compositing, 16-bit scaling as in training, and, for JPEGs at least 2 × S on the short
side, libjpeg's reduced-size decoding (`draft`), which changes the pixels: pass size_hint=S
exactly as `imgclf predict` and `evaluate` do, or the probabilities drift by up to ~1e-2
(`load_input` does both steps):

1. resize so the short side is R = round(S / crop_pct) (Python's round: halves to even) and the
   long side is int(R × long / short) (truncated), with Pillow's BILINEAR, BICUBIC or NEAREST
   filter (`interpolation`, default bicubic); an image already at that size is not resampled;
   with crop_mode "squash" (default "center"), both sides are resized to R;
2. centre-crop S × S, top-left at (round((w - S) / 2), round((h - S) / 2));
3. uint8 → float32 × (1 / 255), HWC → CHW; stack images into N × 3 × S × S.

Steps 1 and 2 are `imgclf.geometry.resize_crop`, the arithmetic the CPU transforms and the
image cache share; `preprocessing` may also be the `Preprocessing` value itself.

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
from imgclf.geometry import Preprocessing, resize_crop, resize_fields

Spec = Preprocessing | Mapping[str, Any]


def resize_spec(preprocessing: Spec) -> tuple[int, str, float, str]:
    """(input_size, interpolation, crop_pct, crop_mode) of a Preprocessing or a model.json
    mapping (only input_size is required there; the rest default as `Preprocessing.from_dict`
    does), checked."""
    if isinstance(preprocessing, Preprocessing):
        p = preprocessing
        return p.input_size, p.interpolation, p.crop_pct, p.crop_mode
    rest = resize_fields(preprocessing)
    size = int(preprocessing["input_size"])
    return size, rest["interpolation"], rest["crop_pct"], rest["crop_mode"]


def preprocess(image: Image.Image, preprocessing: Spec) -> np.ndarray:
    """One RGB image → float32 array (3, S, S) in 0..1 (before normalisation)."""
    if image.mode != "RGB":
        raise ImgclfError(
            f"onnx preprocessing takes RGB images, got mode {image.mode}; open files with "
            "imgclf.data.images.load_image, which converts every mode as training did"
        )
    size, interpolation, crop_pct, crop_mode = resize_spec(preprocessing)
    crop = np.asarray(resize_crop(image, size, crop_pct, interpolation, crop_mode), np.uint8)
    return crop.astype(np.float32).transpose(2, 0, 1) * np.float32(1.0 / 255)


def preprocess_batch(images: Sequence[Image.Image], preprocessing: Spec) -> np.ndarray:
    """RGB images → the model's input (N, 3, S, S) float32, contiguous."""
    return np.ascontiguousarray(np.stack([preprocess(im, preprocessing) for im in images]))


def load_input(
    source: Source,
    preprocessing: Spec,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """A file, bytes or stream → (3, S, S) float32, decoded exactly as prediction decodes it
    (raises `ImageLoadError` for files the image loader refuses, too small ones included)."""
    size = resize_spec(preprocessing)[0]
    image = load_image(source, max_pixels=max_pixels, min_side=min_side, size_hint=size)
    return preprocess(image, preprocessing)
