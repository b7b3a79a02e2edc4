"""The eval geometry every path shares, torch-free: the preprocessing contract and its arithmetic.

`Preprocessing` (re-exported by `imgclf.models`) is how images must be prepared for a model:
resize the SHORT side to `resize_side(input_size, crop_pct)` = round(input_size / crop_pct)
(Python's round: halves to even), the long side to int(short × long / short_old) (truncated, as
torchvision computes it), with `interpolation`; centre-crop input_size × input_size, top-left at
`center_anchor` (round((length - crop) / 2), again halves to even); normalise with mean / std.
With `crop_mode` "squash" (timm's name) both sides are resized to that length instead, so the
centre crop keeps the whole image but for the crop_pct margin, its aspect ratio not kept: what
clip art and other wide or tall images need, whose centre square cuts the object's ends (held-in
drawings: a linear probe on Lite0 features 0.729 with the centre crop, 0.757 squashed).

Every consumer computes those numbers here: the CPU transforms (`data/transforms.py`, through
torchvision's Resize and CenterCrop), the decode-once cache's stored squares (`data/image_cache.py`)
and batch augmentation's eval crop (`data/batch_aug.py`), the torch-free ONNX preprocessing the
server uses (`predict/onnx_preprocess.py`, through `resize_crop`). tests/test_preprocessing_paths.py
checks that the three give the same pixels.

Interpolation names map to Pillow filters (`pil_resample`) and to torchvision's
InterpolationMode (`torch_interpolation`, imported only when asked for); `check_interpolation`
and `check_crop_pct` are the one validation, with one error message each. This module imports
neither torch nor torchvision: the server runs without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image

from imgclf.errors import ImgclfError

# The one default: what model.json files without the key have always meant, what every packaged
# pretrained model uses, and what every loose-argument helper (eval_transform, CacheSpec, ...)
# falls back to. At run time the model's Preprocessing is always passed explicitly.
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_CROP_PCT = 0.875
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_CROP_MODE = "center"
CROP_MODES = ("center", "squash")


def check_interpolation(name: str) -> str:
    """`name` when it is a known interpolation, else the one error naming the choices."""
    if name not in INTERPOLATIONS:
        raise ImgclfError(
            f"unknown interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}"
        )
    return name


def check_crop_pct(crop_pct: float) -> float:
    """`crop_pct` as a float when it is in (0, 1], else the one error."""
    value = float(crop_pct)
    if not 0 < value <= 1:
        raise ImgclfError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return value


def check_crop_mode(name: str) -> str:
    """`name` when it is a known crop mode, else the one error naming the choices."""
    if name not in CROP_MODES:
        raise ImgclfError(f"unknown crop_mode {name!r}; choose one of {', '.join(CROP_MODES)}")
    return name


def pil_resample(name: str) -> Image.Resampling:
    """Pillow's filter for an interpolation name."""
    return {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
    }[check_interpolation(name)]


def torch_interpolation(name: str) -> Any:
    """torchvision's InterpolationMode for an interpolation name (imports torchvision)."""
    from torchvision.transforms import InterpolationMode

    return {
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "nearest": InterpolationMode.NEAREST,
    }[check_interpolation(name)]


def resize_side(size: int, crop_pct: float) -> int:
    """The short side the eval resize gives: round(size / crop_pct) (halves to even)."""
    return round(size / check_crop_pct(crop_pct))


def resized_size(
    width: int, height: int, short_side: int, crop_mode: str = DEFAULT_CROP_MODE
) -> tuple[int, int]:
    """(width, height) after resizing the short side to `short_side`, with torchvision's
    rounding (the long side truncated: int(short_side × long / short)); squashed, both sides."""
    if check_crop_mode(crop_mode) == "squash":
        return (short_side, short_side)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if width <= height else (new_long, short_side)


def center_anchor(length: int, crop: int) -> int:
    """Where a centre crop of `crop` starts in `length` (torchvision's CenterCrop anchor)."""
    return round((length - crop) / 2.0)


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre `crop` × `crop` square of a width × height image."""
    left, top = center_anchor(width, crop), center_anchor(height, crop)
    return (left, top, left + crop, top + crop)


def resize_short(
    image: Image.Image, short_side: int, interpolation: str, crop_mode: str = DEFAULT_CROP_MODE
) -> Image.Image:
    """Pillow resize of the short side to `short_side` (antialiased, as torchvision's Resize of a
    PIL image; squashed: both sides); an image already at that size is returned as it is."""
    new = resized_size(*image.size, short_side, crop_mode)
    return image if new == image.size else image.resize(new, resample=pil_resample(interpolation))


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a model: resize side / crop_pct, center crop, normalize."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = DEFAULT_INTERPOLATION
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = DEFAULT_CROP_MODE

    def __post_init__(self) -> None:
        check_interpolation(self.interpolation)
        check_crop_pct(self.crop_pct)
        check_crop_mode(self.crop_mode)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ImgclfError("preprocessing mean and std need one value per RGB channel")

    @property
    def geometry(self) -> tuple[int, str, float, str]:
        """(input_size, interpolation, crop_pct, crop_mode): what decides the pixels before
        normalisation."""
        return (self.input_size, self.interpolation, self.crop_pct, self.crop_mode)

    @property
    def resize_side(self) -> int:
        """The short side of the eval resize: round(input_size / crop_pct)."""
        return resize_side(self.input_size, self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists, not tuples), as stored in model.json."""
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
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
            **resize_fields(data),
        )


def resize_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """{interpolation, crop_pct, crop_mode} of a model.json `preprocessing` mapping, defaults
    filled in and checked (mean and std are not needed to resize and crop; model.json files
    written before crop_mode existed mean the centre crop)."""
    return {
        "interpolation": check_interpolation(str(data.get("interpolation", DEFAULT_INTERPOLATION))),
        "crop_pct": check_crop_pct(data.get("crop_pct", DEFAULT_CROP_PCT)),
        "crop_mode": check_crop_mode(str(data.get("crop_mode", DEFAULT_CROP_MODE))),
    }


def as_triple(values: Any) -> tuple[float, float, float]:
    """Three floats (per RGB channel) from any sequence."""
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def resize_crop(
    image: Image.Image,
    size: int,
    crop_pct: float,
    interpolation: str,
    crop_mode: str = DEFAULT_CROP_MODE,
) -> Image.Image:
    """The eval geometry with Pillow alone: short side (squashed: both sides) to
    round(size / crop_pct), centre crop size × size (what torchvision's Resize → CenterCrop give
    for a PIL image)."""
    resized = resize_short(image, resize_side(size, crop_pct), interpolation, crop_mode)
    return resized.crop(center_crop_box(*resized.size, size))


def stored_square_box(width: int, height: int, size: int, stored: int) -> tuple[int, int, int, int]:
    """The stored × stored square the image cache keeps of a resized width × height image: the
    eval centre crop's offset minus the inner crop's, so that the centre `size` crop of the
    square (at `center_anchor(stored, size)`) is the eval crop itself, pixel for pixel."""
    inner = center_anchor(stored, size)
    left = center_anchor(width, size) - inner
    top = center_anchor(height, size) - inner
    return (left, top, left + stored, top + stored)


def crop_mode_of(size: int | Preprocessing, crop_mode: str | None = None) -> str:
    """The crop mode for the helpers that take a `Preprocessing` or loose values: `crop_mode`
    when given, else the Preprocessing's, else the default (checked)."""
    if crop_mode is None:
        crop_mode = size.crop_mode if isinstance(size, Preprocessing) else DEFAULT_CROP_MODE
    return check_crop_mode(crop_mode)


def unpack(
    size: int | Preprocessing,
    mean: Any = None,
    std: Any = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> tuple[int, Any, Any, str, float]:
    """(input_size, mean, std, interpolation, crop_pct), checked, for the helpers that take
    either a `Preprocessing` or the loose values: loose values left None come from the
    Preprocessing when one is given, else interpolation and crop_pct from the one default
    (mean and std have none)."""
    if isinstance(size, Preprocessing):
        pre = size
        size = pre.input_size
        mean = pre.mean if mean is None else mean
        std = pre.std if std is None else std
        interpolation = interpolation or pre.interpolation
        crop_pct = pre.crop_pct if crop_pct is None else crop_pct
    interpolation = check_interpolation(interpolation or DEFAULT_INTERPOLATION)
    crop_pct = check_crop_pct(DEFAULT_CROP_PCT if crop_pct is None else crop_pct)
    return int(size), mean, std, interpolation, crop_pct
