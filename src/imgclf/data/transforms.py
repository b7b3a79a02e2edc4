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

Order: crop and flips on the PIL image, so everything after the crop works at the training
resolution, never on the full-size photo; then `ToNormalised`: float in [0, 1] → affine
(rotation, shear, translation) → colour jitter → Gaussian noise (clipped to [0, 1]) → Normalize;
then RandomErasing (value 0, i.e. the mean). The affine fill (black, white or the dataset mean) is
applied before normalisation, so a rotated digit keeps a truly black background. The affine is
one bilinear grid_sample with the batch path's matrix (`affine_theta`), drawn as RandomAffine
draws.

Colour jitter draws its factors and order as torchvision's ColorJitter does, and applies them on
the float image exactly as the batch path (`data/batch_aug.py`) does, through the same
`colour_steps`: brightness, contrast and saturation are torchvision's blends, hue rotates the
chroma plane of YIQ instead of shifting HSV's hue (PIL's HSV round trip costs about 2 ms per
224-px image, more than all the rest of the pipeline; the rotation is a 3×3 matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms import v2

from imgclf.config import AugmentConfig
from imgclf.errors import ImgclfError
from imgclf.geometry import (
    DEFAULT_CROP_MODE,
    DEFAULT_INTERPOLATION,
    Preprocessing,
    check_crop_mode,
    check_interpolation,
    crop_mode_of,
    pil_resample,
    resize_side,
    torch_interpolation,
    unpack,
)

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


def _fill(name: str, mean: Sequence[float]) -> int | tuple[int, ...]:
    """The affine fill in uint8 pixel values (it is applied before normalisation)."""
    if name == "black":
        return 0
    if name == "white":
        return 255
    if name == "mean":
        return tuple(round(255 * m) for m in mean)
    raise ImgclfError(f"unknown augment.fill {name!r}; choose one of black, white, mean")


def _resize(size: int, crop_pct: float, interpolation: str, crop_mode: str) -> Callable:
    """torchvision's Resize with the shared geometry (`imgclf.geometry`): the short side, or
    both sides when squashed, to round(size / crop_pct)."""
    side = resize_side(size, crop_pct)
    target = (side, side) if check_crop_mode(crop_mode) == "squash" else side
    return v2.Resize(target, interpolation=torch_interpolation(interpolation))


def _resize_crop(size: int, crop_pct: float, interpolation: str, crop_mode: str) -> list[Callable]:
    """torchvision's Resize → CenterCrop with the shared geometry (`imgclf.geometry`)."""
    return [_resize(size, crop_pct, interpolation, crop_mode), v2.CenterCrop(size)]


GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_steps(factors: np.ndarray, order: np.ndarray) -> np.ndarray:
    """[B, 4, 10] from factors [B, 4] (brightness, contrast, saturation, hue) and each sample's
    order [B, 4] (ColorJitter's ids): per step, in that order, a 3×3 colour matrix and the
    coefficient of the current mean gray (contrast). Brightness, contrast and saturation are
    torchvision's blends; hue rotates YIQ's chroma plane (the sign makes +h turn red towards
    yellow, as in HSV)."""
    f, n = np.asarray(factors, dtype=np.float64), len(factors)
    eye = np.eye(3)
    ops = np.zeros((n, 4, 10))
    ops[:, 0, :9] = (f[:, 0, None, None] * eye).reshape(n, 9)
    ops[:, 1, :9] = (f[:, 1, None, None] * eye).reshape(n, 9)
    ops[:, 1, 9] = 1 - f[:, 1]
    s = f[:, 2, None, None]
    ops[:, 2, :9] = (s * eye + (1 - s) * np.outer(np.ones(3), GRAY)).reshape(n, 9)
    t = -2 * math.pi * f[:, 3]
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, np.cos(t), np.cos(t)
    rot[:, 1, 2], rot[:, 2, 1] = -np.sin(t), np.sin(t)
    ops[:, 3, :9] = (np.linalg.inv(_YIQ) @ rot @ _YIQ).reshape(n, 9)
    return np.take_along_axis(ops, np.asarray(order, dtype=np.int64)[:, :, None], 1)


def apply_colour_steps(x: torch.Tensor, steps: torch.Tensor, contrast: Sequence[bool]):
    """Float images [B, 3, H, W] in [0, 1] through `colour_steps` (on x's device), each step
    clamped to [0, 1] as torchvision's float kernels do; `contrast[k]`: some sample's step k is
    the contrast blend (only then is the mean gray computed)."""
    gray = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    for k in range(4):
        matrix, offset = steps[:, k, :9].view(-1, 3, 3), steps[:, k, 9]
        y = torch.einsum("bij,bjhw->bihw", matrix, x)
        if contrast[k]:
            mean_gray = (x.mean(dim=(2, 3), keepdim=True) * gray).sum(1, keepdim=True)
            y = y.add_(offset.view(-1, 1, 1, 1) * mean_gray)
        x = y.clamp_(0, 1)
    return x


def affine_theta(angle, translate_x, translate_y, shear_x, shear_y, size: int) -> np.ndarray:
    """torchvision's inverse affine matrix (centre of the image, scale 1) for a size × size
    image, normalised as grid_sample's theta (align_corners=False): [B, 6]. Angles and shears
    in degrees (F.affine's clockwise convention), translations in whole pixels."""
    rot, sx, sy = (np.radians(np.asarray(t, dtype=np.float64)) for t in (angle, shear_x, shear_y))
    a = np.cos(rot - sy) / np.cos(sy)
    b = -np.cos(rot - sy) * np.tan(sx) / np.cos(sy) - np.sin(rot)
    c = np.sin(rot - sy) / np.cos(sy)
    d = -np.sin(rot - sy) * np.tan(sx) / np.cos(sy) + np.cos(rot)
    tx, ty = (np.asarray(t, dtype=np.float64) for t in (translate_x, translate_y))
    shift_x, shift_y = (-d * tx + b * ty) * 2 / size, (c * tx - a * ty) * 2 / size
    return np.stack([d, -b, shift_x, -c, a, shift_y], -1)


class TensorAffine:
    """RandomAffine's draws (its own `make_params`, torch's global RNG) applied to one float
    image in [0, 1] as the batch path applies them: one bilinear `grid_sample` with the fill
    composited by the image's coverage (torchvision's tensor kernel does the same). The grid is
    built directly: `affine_grid` costs twice the sampling, and PIL's bilinear affine about
    1.3 ms at 224 px, more than the rest of the `default` preset together."""

    def __init__(
        self,
        degrees: float,
        translate: float,
        shear: float,
        fill: int | tuple[int, ...],
        interpolation: str = DEFAULT_INTERPOLATION,
    ) -> None:
        self.params = v2.RandomAffine(
            degrees=degrees,
            translate=(translate, translate) if translate else None,
            shear=(-shear, shear, -shear, shear) if shear else None,
        )
        self.fill = torch.tensor(np.broadcast_to(fill, 3) / 255.0, dtype=torch.float32).view(
            3, 1, 1
        )
        self.mode = check_interpolation(interpolation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.params.make_params([x])
        if h != w:  # the presets always give squares; anything else takes torchvision's kernel
            fill = self.fill.flatten().tolist()
            mode = torch_interpolation(self.mode)
            return v2.functional.affine(x, **p, interpolation=mode, fill=fill)
        (tx, ty), (sx, sy) = p["translate"], p["shear"]
        t = affine_theta(p["angle"], tx, ty, sx, sy, w).tolist()
        # Output pixel centres in grid_sample's [-1, 1] (align_corners=False); each grid plane
        # is an outer sum written in place (affine_grid's batched product costs 5× more).
        coords = torch.arange(w, dtype=torch.float32).mul_(2 / w).add_(1 / w - 1)
        row, col = coords[None, :], coords[:, None]
        grid = torch.empty(1, h, w, 2)
        torch.add(row * t[0], col * t[1] + t[2], out=grid[0, :, :, 0])
        torch.add(row * t[3], col * t[4] + t[5], out=grid[0, :, :, 1])
        out = nnf.grid_sample((x - self.fill)[None], grid, mode=self.mode, padding_mode="zeros",
                              align_corners=False)[0]  # fmt: skip
        out = out.add_(self.fill)
        return out.clamp_(0, 1) if self.mode == "bicubic" else out


class ColourJitter:
    """ColorJitter(j, j, j, j / 4)'s draws from torch's global RNG (a random order, then the
    factors), applied to one float image in [0, 1] by `apply_colour_steps`."""

    def __init__(self, j: float) -> None:
        self.j = float(j)

    def draw(self) -> tuple[torch.Tensor, list[float]]:
        """(order, [brightness, contrast, saturation, hue]), drawn as ColorJitter draws them."""
        j, lo = self.j, max(0.0, 1 - self.j)
        order = torch.randperm(4)
        factors = [float(torch.empty(1).uniform_(lo, 1 + j)) for _ in range(3)]
        factors.append(float(torch.empty(1).uniform_(-j / 4, j / 4)))
        return order, factors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`apply_colour_steps` for one image, the three blends written as the elementwise
        operations they are (a third of the cost of 3×3 products at 224 px)."""
        order, (b, c, s, h) = self.draw()
        gray = torch.tensor(GRAY, dtype=x.dtype).view(3, 1, 1)
        for op in order.tolist():
            if op == 0:
                x = x.mul_(b)
            elif op == 1:
                mean_gray = float((x.mean(dim=(1, 2), keepdim=True) * gray).sum())
                x = x.mul_(c).add_((1 - c) * mean_gray)
            elif op == 2:
                luma = (x * gray).sum(0, keepdim=True)
                x = x.mul_(s).add_(luma, alpha=1 - s)
            else:
                hue = colour_steps(np.array([[1, 1, 1, h]]), np.array([[3, 0, 1, 2]]))[0, 0, :9]
                matrix = torch.from_numpy(hue.astype(np.float32)).view(3, 3)
                x = torch.mm(matrix, x.reshape(3, -1)).view(x.shape)
            x = x.clamp_(0, 1)
        return x


class CropFlip:
    """RandomResizedCrop + RandomHorizontalFlip + RandomVerticalFlip on a PIL image, drawn as
    those three draw (RandomResizedCrop's `make_params`, then one `torch.rand(1)` per flip) and
    resampled once by PIL straight from the crop box (`resize(box=...)`: no intermediate crop,
    no v2 dispatch — the random resized crop is the largest cost after decoding).

    crop_mode "squash": the crop is drawn on the image squashed to a square (side: its short
    side) and its box scaled back to the image, so training sees crops of the squashed image
    as the eval squash sees it whole, with no resize before the crop."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float],
        hflip: float = 0.0,
        vflip: float = 0.0,
        interpolation: str = DEFAULT_INTERPOLATION,
        crop_mode: str = DEFAULT_CROP_MODE,
    ) -> None:
        self.size, self.hflip, self.vflip = int(size), float(hflip), float(vflip)
        self.crop = v2.RandomResizedCrop(size, scale=scale)
        self.resample = pil_resample(interpolation)  # the same names and error as everywhere
        self.squash = check_crop_mode(crop_mode) == "squash"

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.squash and width != height:
            side = min(width, height)  # only its shape is read: empty() touches no memory
            p = self.crop.make_params([torch.empty((1, side, side), dtype=torch.uint8)])
            fx, fy = width / side, height / side
            top, left, h, w = p["top"] * fy, p["left"] * fx, p["height"] * fy, p["width"] * fx
        else:
            p = self.crop.make_params([image])
            top, left, h, w = p["top"], p["left"], p["height"], p["width"]
        out = image.resize(
            (self.size, self.size), self.resample, box=(left, top, left + w, top + h)
        )
        if self.hflip and torch.rand(1) < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.vflip and torch.rand(1) < self.vflip:
            out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return out


class ToNormalised:
    """PIL RGB image → normalised float tensor [3, H, W]: what ToImage, ToDtype(scale=True),
    [colour jitter], [GaussianNoise(clip=True)] and Normalize compute, value for value, without
    v2's per-transform dispatch (a third of a light pipeline's cost at 224 px)."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        jitter: float = 0.0,
        noise: float = 0.0,
        affine: TensorAffine | None = None,
    ) -> None:
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        self.affine = affine
        self.jitter = ColourJitter(jitter) if jitter else None
        self.noise = float(noise)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):  # uint8 [3, H, W], as v2.ToImage would give
            pixels = image
        else:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # HWC → CHW: a view
        # CHW-contiguous while still uint8 (a quarter of the bytes): the float ops after it and
        # the batch stacking run over a dense tensor, 2.3× faster than over the permuted view.
        x = pixels.contiguous().to(torch.float32).mul_(1.0 / 255)
        # v2's tensor of a PIL image is the permuted view, and torch draws randn_like over its
        # strides in another order than over a dense tensor: the noise is drawn on a tensor
        # laid out as torchvision's, so it is torchvision's noise.
        layout = pixels
        if self.affine is not None:
            x = layout = self.affine(x)
        if self.jitter is not None:
            x = self.jitter(x)
        if self.noise:
            noise = torch.randn_like(layout, dtype=torch.float32)
            x = (x + noise * self.noise).clamp_(0, 1)
        return x.sub_(self.mean).div_(self.std)


def eval_transform(
    size: int | Preprocessing,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> Callable:
    """Resize the short side (squashed: both sides) to round(size / crop_pct), center-crop
    size × size, normalise.

    `size` may be a model's `Preprocessing` (loose values given beside it override its own);
    interpolation, crop_pct and crop_mode left None are the defaults of `imgclf.geometry`."""
    mode = crop_mode_of(size, crop_mode)
    size, mean, std, interpolation, crop_pct = _loose(size, mean, std, interpolation, crop_pct)
    steps = _resize_crop(size, crop_pct, interpolation, mode)
    return v2.Compose([*steps, ToNormalised(mean, std)])


def _loose(size, mean, std, interpolation, crop_pct) -> tuple:
    size, mean, std, interpolation, crop_pct = unpack(size, mean, std, interpolation, crop_pct)
    if mean is None or std is None:
        raise ImgclfError("a transform needs mean and std (or a Preprocessing that has them)")
    return size, mean, std, interpolation, crop_pct


def train_transform(
    aug: AugmentConfig,
    size: int | Preprocessing,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> Callable:
    """The training pipeline for `aug` (crop_pct is used only without a random resized crop;
    `size` may be a `Preprocessing`, as for `eval_transform`)."""
    mode = crop_mode_of(size, crop_mode)
    size, mean, std, interpolation, crop_pct = _loose(size, mean, std, interpolation, crop_pct)
    r = resolve_augment(aug)
    if r["scale"] is None:
        steps = _resize_crop(size, crop_pct, interpolation, mode)
        if r["hflip"]:
            steps.append(v2.RandomHorizontalFlip(r["hflip"]))
        if r["vflip"]:
            steps.append(v2.RandomVerticalFlip(r["vflip"]))
    else:
        steps = [CropFlip(size, tuple(r["scale"]), r["hflip"], r["vflip"], interpolation, mode)]
    affine = None
    if r["rotation"] or r["shear"] or r["translate"]:
        fill = _fill(r["fill"], mean)
        affine = TensorAffine(r["rotation"], r["translate"], r["shear"], fill, interpolation)
    steps.append(ToNormalised(mean, std, jitter=r["color_jitter"], noise=r["noise"], affine=affine))
    if r["erasing"]:
        # value 0 after Normalize is the dataset mean: the erased box carries no colour signal.
        steps += [v2.RandomErasing(p=r["erasing"], value=0), v2.ToPureTensor()]
    return v2.Compose(steps)


class _FiveViews:
    """Picklable (DataLoader workers): centre first, then the four corners."""

    def __init__(self, resize: Callable, size: int, tail: Callable) -> None:
        self.resize, self.five, self.tail = resize, v2.FiveCrop(size), tail

    def __call__(self, image):
        tl, tr, bl, br, center = self.five(self.resize(image))
        return torch.stack([self.tail(v) for v in (center, tl, tr, bl, br)])


def multicrop_transform(
    size: int | Preprocessing,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> Callable:
    """Test-time views: centre and four corner crops of the eval resize, stacked (5, C, H, W)."""
    mode = crop_mode_of(size, crop_mode)
    size, mean, std, interpolation, crop_pct = _loose(size, mean, std, interpolation, crop_pct)
    resize = _resize(size, crop_pct, interpolation, mode)
    tail = ToNormalised(mean, std)
    return _FiveViews(resize, size, tail)
