"""Batch augmentation of uint8 squares on their own device (CPU or GPU): the fast path.

Input: uint8 images [B, S, S, 3] (HWC), each the eval view before its last crop — short side
resized to S = round(size / crop_pct), centre-cropped to a square (`eval_square` builds one) —
and one int64 seed per sample (the EpochSampler's). Output: float32 [B, 3, size, size],
normalised, optionally channels_last. `eval` is the CPU eval transform exactly; `train` follows
the preset table of transforms.py in the same order, with these differences:

- The random resized crop is drawn over the S × S square, not over the whole original image
  (same algorithm: area scale, log-uniform ratio in (3/4, 4/3), 10 tries, central fallback).
- Crop, flips and RandomAffine are ONE resampling (grid_sample, align_corners=False: the
  pixel-centre convention of PIL and torchvision resizes), not three, and without antialiasing
  (preset crops are at most S / size ≈ 1.14 × the output, so there is little to alias).
- Output pixels whose affine source falls outside the crop get the fill, blended by the crop's
  bilinear coverage (a one-pixel ramp, the coverage torchvision's tensor affine computes); PIL
  cuts hard, and so does `nearest` here.
- Colour jitter: brightness, contrast, saturation, hue in a random order per sample (as
  ColorJitter), each step clamped to [0, 1]; hue is a rotation of the chroma plane in YIQ, not an
  HSV hue shift; values stay float between steps (the CPU path rounds to uint8 after each).
- Gaussian noise comes from a device generator seeded per sample: reproducible on one device,
  not equal between CPU and CUDA.

Randomness: sample k's parameters all come from a fixed table of uniforms drawn on the CPU by
torch.Generator().manual_seed(seeds[k]), so they depend on its seed only, never on the batch; the
derived per-sample matrices reach the device in one transfer, and nothing on the device is read
back to the host.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, ImageDraw

from imgclf.config import AugmentConfig
from imgclf.data.image_cache import CacheSpec, square_pixels
from imgclf.data.preview import _font, _text_width, to_pil
from imgclf.data.transforms import (
    _fill,
    affine_theta,
    apply_colour_steps,
    colour_steps,
    resolve_augment,
    train_transform,
)
from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_bytes
from imgclf.geometry import Preprocessing, center_anchor, crop_mode_of, unpack

# Columns of a sample's table of uniforms: a fixed layout, so no draw shifts another.
_AREA, _RATIO, _TOP, _LEFT = slice(0, 10), slice(10, 20), 20, 21  # 10 tries, as torchvision
_HFLIP, _VFLIP, _ANGLE, _TX, _TY, _SHEAR_X, _SHEAR_Y = 22, 23, 24, 25, 26, 27, 28
_JITTER, _ORDER = slice(29, 33), slice(33, 37)
_ERASE, _E_AREA, _E_RATIO, _E_TOP, _E_LEFT = 37, slice(38, 48), slice(48, 58), 58, 59
_NOISE, _UNIFORMS = 60, 61
# Columns of the float32 table sent to the device: affine theta, crop scale (with flip sign) and
# centre, flip flags, 4 colour steps × (3×3 matrix + contrast offset), erasing box.
_THETA, _SCALE, _SHIFT, _FLIPS, _COLOUR, _BOX = (
    slice(0, 6), slice(6, 8), slice(8, 10), slice(10, 12), slice(12, 52), slice(52, 56),
)  # fmt: skip
_CROP_RATIO, _ERASE_SCALE, _ERASE_RATIO = (3 / 4, 4 / 3), (0.02, 0.33), (0.3, 3.3)
_PAD = 4


@dataclass(frozen=True)
class AugParams:
    """One batch's per-sample draws (CPU tensors, [B] unless noted). The crop box is in pixels of
    the S × S square; translation and the erasing box in pixels of the size × size output."""

    top: torch.Tensor  # crop box, int64
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    hflip: torch.Tensor  # bool
    vflip: torch.Tensor
    angle: torch.Tensor  # degrees, clockwise positive (F.affine's convention, as RandomAffine)
    translate_x: torch.Tensor  # whole pixels, as RandomAffine rounds them
    translate_y: torch.Tensor
    shear_x: torch.Tensor  # degrees
    shear_y: torch.Tensor
    jitter: torch.Tensor  # [B, 4] brightness, contrast, saturation, hue factors
    jitter_order: torch.Tensor  # [B, 4] a permutation of 0..3 (ColorJitter's ids, same order)
    erase: torch.Tensor  # [B, 4] top, left, height, width; height 0 = nothing erased
    noise_seed: torch.Tensor  # int64


class BatchAugment:
    """The training and eval transforms of one preset over batches of uint8 squares."""

    def __init__(
        self,
        augment: Mapping[str, Any],
        size: int | Preprocessing,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        fill: str | None = None,
        channels_last: bool = False,
    ) -> None:
        # `size` may be the model's Preprocessing; the same names and errors as the CPU transforms
        size, mean, std, interpolation, _ = unpack(size, mean, std, interpolation)
        if mean is None or std is None:
            raise ImgclfError("batch augmentation needs mean and std (or a Preprocessing)")
        self.r, self.size, self.mode = dict(augment), size, interpolation
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.fill = [
            float(v) for v in np.broadcast_to(_fill(fill or self.r.get("fill", "black"), mean), 3)
        ]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.affine = bool(self.r["rotation"] or self.r["shear"] or self.r["translate"])
        # No random crop and no affine: crop and flips are exact slices (no resampling at all).
        self.plain = self.r["scale"] is None and not self.affine
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """Centre crop `size` from each square and normalise: the CPU eval transform's values."""
        side = self._check(images)
        o = center_anchor(side, self.size)
        x = images[:, o : o + self.size, o : o + self.size].permute(0, 3, 1, 2)
        return self._finish(x.float().mul_(1.0 / 255))

    def train(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Augment each sample under its own seed (a CPU int64 tensor [B], the sampler's)."""
        return self.apply(images, self.sample_params(seeds, self._check(images)))

    def sample_params(self, seeds: torch.Tensor | Sequence[int], side: int) -> AugParams:
        """Every random choice of the batch (seeds on the CPU, as the sampler yields them)."""
        # numpy: tiny float64 arrays, no intra-op threads to wake (costly on a loaded host).
        u, r, size = _uniforms(seeds), self.r, self.size
        if r["scale"] is None:
            o, n = center_anchor(side, size), len(u)
            crop = (np.full(n, o), np.full(n, o), np.full(n, size), np.full(n, size))
        else:
            crop = _random_resized_crop(u, side, r["scale"])
        deg, shear, j, t = r["rotation"], r["shear"], r["color_jitter"], r["translate"] * size
        lo, ju = max(0.0, 1 - j), u[:, _JITTER]  # ColorJitter's ranges; hue j/4
        values = dict(
            zip(("top", "left", "height", "width"), crop, strict=True),
            hflip=u[:, _HFLIP] < r["hflip"],
            vflip=u[:, _VFLIP] < r["vflip"],
            angle=deg * _sym(u[:, _ANGLE]),
            translate_x=np.round(t * _sym(u[:, _TX])),
            translate_y=np.round(t * _sym(u[:, _TY])),
            shear_x=shear * _sym(u[:, _SHEAR_X]),
            shear_y=shear * _sym(u[:, _SHEAR_Y]),
            jitter=np.concatenate([lo + (1 + j - lo) * ju[:, :3], j / 4 * _sym(ju[:, 3:])], 1),
            jitter_order=np.argsort(u[:, _ORDER], axis=1),  # a uniform random permutation
            erase=_erasing_boxes(u, size, r["erasing"]),
            noise_seed=(u[:, _NOISE] * 2.0**53).astype(np.int64),
        )
        return AugParams(**{k: torch.from_numpy(np.asarray(v)) for k, v in values.items()})

    def apply(self, images: torch.Tensor, p: AugParams) -> torch.Tensor:
        """The training transform with given parameters (`sample_params`, or edited ones)."""
        side = self._check(images)
        table = _to_device(self._table(p, side), images.device)
        x = self._geometry(images, p, table, side)
        if self.r["color_jitter"]:
            x = self._jitter(x, p, table)
        if self.r["noise"]:
            g = torch.Generator(device=x.device)
            noise = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            for row, seed in zip(noise, p.noise_seed.tolist(), strict=True):
                row.normal_(0.0, self.r["noise"], generator=g.manual_seed(seed))
            x = x.add_(noise).clamp_(0, 1)
        x = self._finish(x)
        if bool((p.erase[:, 2] > 0).any()):  # a CPU tensor: no device sync
            x = _erase(x, table[:, _BOX])
        return x

    def _check(self, images: torch.Tensor) -> int:
        ok = isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        if not ok or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            got = f"{images.dtype} {tuple(images.shape)}" if ok else type(images).__name__
            raise ImgclfError(f"batch augmentation takes uint8 squares [B, S, S, 3]; got {got}")
        if images.shape[1] < self.size:
            raise ImgclfError(
                f"squares of side {images.shape[1]} are smaller than the output size {self.size}; "
                "store them at round(size / crop_pct)"
            )
        return int(images.shape[1])

    def _table(self, p: AugParams, side: int) -> torch.Tensor:
        """The per-sample matrices (float64 on the CPU), packed as float32 for one transfer."""
        table = np.zeros((len(p.top), _BOX.stop))
        table[:, _THETA] = _affine_theta(p, self.size)
        flips = np.stack([_np(p.hflip), _np(p.vflip)], 1)
        extent = np.stack([_np(p.width), _np(p.height)], 1)
        table[:, _SCALE] = (1 - 2 * flips) * extent / side
        table[:, _SHIFT] = (2 * np.stack([_np(p.left), _np(p.top)], 1) + extent) / side - 1
        table[:, _FLIPS] = flips
        if self.r["color_jitter"]:
            table[:, _COLOUR] = _colour_steps(p).reshape(len(table), -1)
        table[:, _BOX] = _np(p.erase)
        return torch.from_numpy(table.astype(np.float32))

    def _geometry(self, images, p: AugParams, table, side: int) -> torch.Tensor:
        """[B, 3, size, size] in [0, 1]: crop, flips and affine as one sampling of the square."""
        size, b = self.size, images.shape[0]
        if self.plain:
            o = center_anchor(side, size)
            x = images[:, o : o + size, o : o + size].permute(0, 3, 1, 2).float()
            for dim, column, flips in ((-1, 0, p.hflip), (-2, 1, p.vflip)):
                if bool(flips.any()):
                    flag = table[:, _FLIPS][:, column].view(-1, 1, 1, 1) > 0.5
                    x = torch.where(flag, x.flip(dim), x)
            return x.mul_(1.0 / 255)
        src = images.permute(0, 3, 1, 2).float()
        # a: output pixel → affine source in the crop's normalised frame; then → the square.
        a = nnf.affine_grid(table[:, _THETA].view(b, 2, 3), [b, 3, size, size], align_corners=False)
        grid = a * table[:, None, None, _SCALE] + table[:, None, None, _SHIFT]
        x = nnf.grid_sample(src, grid, mode=self.mode, padding_mode="border", align_corners=False)
        if self.affine:
            inside = _inside(a, size, hard=self.mode == "nearest")
            x = x.mul_(inside).add_((1 - inside) * self._constants(x.device)["fill"])
        if self.mode == "bicubic":  # cubic weights overshoot; bilinear stays in range
            x = x.clamp_(0, 255)
        return x.mul_(1.0 / 255)

    def _jitter(self, x: torch.Tensor, p: AugParams, table: torch.Tensor) -> torch.Tensor:
        steps = table[:, _COLOUR].view(-1, 4, 10)
        return apply_colour_steps(x, steps, (p.jitter_order == 1).any(0).tolist())

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize exactly as torchvision does (subtract, then divide), then the layout."""
        c = self._constants(x.device)
        return x.sub(c["mean"]).div_(c["std"]).contiguous(memory_format=self.memory_format)

    def _constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """mean, std and fill (0–255) as [1, 3, 1, 1], copied to `device` once."""
        if device not in self._on_device:
            values = {"mean": self.mean, "std": self.std, "fill": self.fill}
            self._on_device[device] = {
                k: torch.as_tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                for k, v in values.items()
            }
        return self._on_device[device]


def _uniforms(seeds: torch.Tensor | Sequence[int]) -> np.ndarray:
    """[B, _UNIFORMS] float64 in [0, 1); row k from a CPU generator seeded with seeds[k]."""
    values = torch.as_tensor(seeds).tolist()
    out = torch.empty(len(values), _UNIFORMS, dtype=torch.float64)
    g = torch.Generator()
    for row, seed in zip(out, values, strict=True):
        torch.rand(_UNIFORMS, generator=g.manual_seed(int(seed)), dtype=torch.float64, out=row)
    return out.numpy()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _sym(u: np.ndarray) -> np.ndarray:
    """Uniform in [-1, 1)."""
    return 2 * u - 1


def _tries(u_area, u_ratio, side: int, scale, ratio) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's candidate boxes: round(√(area·r)), round(√(area/r)) for each try."""
    area = side * side * (scale[0] + (scale[1] - scale[0]) * u_area)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = np.exp(lo + (hi - lo) * u_ratio)
    return np.round(np.sqrt(area * r)), np.round(np.sqrt(area / r))  # half to even, as round()


def _first(ok: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Whether any try fits, and each value at the first try that does."""
    first = ok.argmax(1)[:, None]
    return ok.any(1), *(np.take_along_axis(v, first, 1)[:, 0] for v in values)


def _offset(u: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Uniform integer in [0, room], as torch.randint(0, room + 1)."""
    return np.minimum(np.floor(u * (room + 1)), room).astype(np.int64)


def _random_resized_crop(u: np.ndarray, side: int, scale) -> tuple[np.ndarray, ...]:
    w, h = _tries(u[:, _AREA], u[:, _RATIO], side, scale, _CROP_RATIO)
    found, w, h = _first((w > 0) & (w <= side) & (h > 0) & (h <= side), w, h)
    # All ten tries failed: a square is within the ratio range, so the fallback is all of it.
    w, h = np.where(found, w, side), np.where(found, h, side)
    top, left = _offset(u[:, _TOP], side - h), _offset(u[:, _LEFT], side - w)
    return top, left, h.astype(np.int64), w.astype(np.int64)


def _erasing_boxes(u: np.ndarray, size: int, p: float) -> np.ndarray:
    h, w = _tries(u[:, _E_AREA], u[:, _E_RATIO], size, _ERASE_SCALE, _ERASE_RATIO)
    found, h, w = _first((h < size) & (w < size), h, w)
    h = np.where(found & (u[:, _ERASE] < p), h, 0)
    top, left = _offset(u[:, _E_TOP], size - h), _offset(u[:, _E_LEFT], size - w)
    return np.stack([top, left, h, w], 1).astype(np.int64)


def _affine_theta(p: AugParams, size: int) -> np.ndarray:
    """The samples' affine matrices for grid_sample (`transforms.affine_theta`): [B, 6]."""
    values = (p.angle, p.translate_x, p.translate_y, p.shear_x, p.shear_y)
    return affine_theta(*(_np(t) for t in values), size)


def _colour_steps(p: AugParams) -> np.ndarray:
    """[B, 4, 10]: the samples' colour steps in their own order (`transforms.colour_steps`)."""
    return colour_steps(_np(p.jitter), p.jitter_order.numpy())


def _inside(a: torch.Tensor, size: int, hard: bool) -> torch.Tensor:
    """[B, 1, size, size] weight of the crop at each affine source point: 1 inside, a one-pixel
    linear ramp across the edge (bilinear's view of the crop's border), 0 outside."""
    pix = (a + 1) * (size / 2) - 0.5
    ramp = torch.minimum(pix + 1, size - pix).clamp_(0, 1)
    if hard:
        ramp = (ramp >= 0.5).float()
    return (ramp[..., 0] * ramp[..., 1]).unsqueeze(1)


def _erase(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Zero (= the mean after normalisation) each sample's box; height 0 erases nothing."""
    pos = torch.arange(x.shape[-1], device=x.device, dtype=box.dtype)
    rows = (pos >= box[:, 0:1]) & (pos < box[:, 0:1] + box[:, 2:3])
    cols = (pos >= box[:, 1:2]) & (pos < box[:, 1:2] + box[:, 3:4])
    return x.masked_fill_((rows[:, :, None] & cols[:, None, :]).unsqueeze(1), 0.0)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host → device copy; from pinned memory on CUDA, so it does not block the host."""
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def eval_square(
    image: Image.Image,
    size: int | Preprocessing,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    crop_mode: str | None = None,
) -> torch.Tensor:
    """The uint8 square [S, S, 3] the image cache stores for `image` (`cache.square_pixels`):
    its centre `size` crop is exactly the eval transform's crop. `size` may be a Preprocessing."""
    mode = crop_mode_of(size, crop_mode)
    size, _, _, interpolation, crop_pct = unpack(size, None, None, interpolation, crop_pct)
    spec = CacheSpec(size=size, crop_pct=crop_pct, interpolation=interpolation, crop_mode=mode)
    return torch.from_numpy(square_pixels(image.convert("RGB"), spec).copy())


def contact_sheet(
    cpu_images: torch.Tensor | Sequence[torch.Tensor],
    batch_images: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    titles: tuple[str, str] = ("CPU", "batch"),
) -> Path:
    """One PNG: the CPU-augmented samples (top row) above the batch-augmented ones, denormalised."""
    rows = [torch.stack(list(t)).detach().float().cpu() for t in (cpu_images, batch_images)]
    if rows[0].shape != rows[1].shape or rows[0].ndim != 4:
        raise ImgclfError(
            "contact_sheet needs two [N, 3, H, W] batches of one shape; got "
            f"{tuple(rows[0].shape)} and {tuple(rows[1].shape)}"
        )
    n, _, h, w = rows[0].shape
    font = _font(max(10, min(16, h // 6)))
    label_w = 3 * _PAD + max(_text_width(font, t) for t in titles)
    sheet = Image.new("RGB", (label_w + n * (w + _PAD), _PAD + 2 * (h + _PAD)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (title, tiles) in enumerate(zip(titles, rows, strict=True)):
        y = _PAD + r * (h + _PAD)
        draw.text((_PAD, y + h // 2 - 8), title, fill=(20, 20, 20), font=font)
        for c, tile in enumerate(tiles):
            sheet.paste(to_pil(tile, mean, std), (label_w + c * (w + _PAD), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def compare_sheet(
    images: Sequence[Image.Image],
    aug: AugmentConfig,
    size: int,
    path: str | Path,
    seed: int = 0,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> Path:
    """`contact_sheet` for PIL images: train_transform (seeded per image) above BatchAugment."""
    mean = std = (0.5, 0.5, 0.5)
    seeds = torch.arange(len(images), dtype=torch.long) + seed * 1_000_003
    size, _, _, interpolation, crop_pct = unpack(size, None, None, interpolation, crop_pct)
    cpu_tf = train_transform(aug, size, mean, std, interpolation, crop_pct)
    cpu = []
    for image, s in zip(images, seeds.tolist(), strict=True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            cpu.append(cpu_tf(image))
    squares = torch.stack([eval_square(im, size, crop_pct, interpolation) for im in images])
    batch = BatchAugment(resolve_augment(aug), size, mean, std, interpolation).train(squares, seeds)
    return contact_sheet(cpu, batch, path, mean, std, ("CPU", "batch"))
