"""Contact sheets: a few samples per class, raw beside augmented, to tune augmentation by eye.

Rows are classes (in the label map's order); on the left the eval view of each sample (resized,
centre-cropped), on the right the same samples through the training transform of the chosen
preset (or of a run config's `train.augment`), de-normalised for display. With a batch mixer
(MixUp / CutMix, from a run config) a third block shows the augmented tiles mixed as a training
batch mixes them: the batch is taken column by column, so each tile is paired with the tile of
the class above it (torchvision's MixUp / CutMix pair each sample with the one before it). The
samples and their augmentations are seeded, so a sheet can be redrawn with another preset for a
side-by-side comparison of the same images.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from imgclf.config import AugmentConfig
from imgclf.data.images import ImageLoadError, load_image
from imgclf.data.manifest import Entry, Manifest, read_manifest
from imgclf.data.transforms import eval_transform, train_transform
from imgclf.errors import ImgclfError
from imgclf.files import atomic_write_bytes

# Normalisation is undone for display, so any statistics do; 0.5 makes `fill: mean` mid-grey.
_MEAN = _STD = (0.5, 0.5, 0.5)
_PAD, _GAP, _HEADER = 4, 16, 28
_BACKGROUND, _MISSING, _TEXT = (255, 255, 255), (220, 220, 220), (20, 20, 20)


@dataclass
class Sheet:
    """What was drawn: the PNG, its class rows, and the samples per class."""

    path: Path
    classes: int
    per_class: int
    skipped: int  # samples that failed to load (drawn as grey tiles)
    mixed: bool = False  # a third block shows MixUp / CutMix


def pick_samples(
    manifest: Manifest, per_class: int, split: str | None = None, seed: int = 0
) -> dict[str, list[Entry]]:
    """Up to `per_class` usable entries of each class (of one split if given), seeded."""
    rng = random.Random(seed)
    picked = {}
    for name in manifest.labels.names:
        pool = sorted(
            (e for e in manifest.ok_entries if e.label == name and (not split or e.split == split)),
            key=lambda e: e.path,
        )
        picked[name] = rng.sample(pool, min(per_class, len(pool)))
    if not any(picked.values()):
        where = f" in split {split!r}" if split else ""
        raise ImgclfError(f"the manifest has no usable images{where}; check `imgclf scan`")
    return picked


def contact_sheet(
    manifest_dir: Path,
    per_class: int = 6,
    preset: str = "default",
    size: int = 96,
    split: str | None = None,
    seed: int = 0,
    out: Path = Path("preview.png"),
    *,
    augment: AugmentConfig | None = None,
    title: str | None = None,
    mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    mix_title: str = "mixed",
    crop_mode: str = "center",
) -> Sheet:
    """Draw the raw and augmented grid for a manifest and write it as a PNG (atomically).

    `augment` (a run config's `train.augment`) replaces `preset`; `title` names it on the
    sheet. `mixer`: (images, labels) → (mixed images, soft targets), e.g. `batch_mixer`.
    `crop_mode` (a run config's `data.crop_mode`): `squash` draws each image whole, resized to
    a square, as a run with it sees them; `center` keeps the centre square."""
    manifest = read_manifest(manifest_dir)
    if augment is None:
        try:
            augment = AugmentConfig(preset=preset)
        except ValueError:
            raise ImgclfError(
                f"unknown augment preset {preset!r}; choose none, light, default or strong"
            ) from None
        title = title or preset
    aug = augment
    picked = pick_samples(manifest, per_class, split, seed)
    # No model here: bilinear, no margin (crop_pct 1), as the sheet has always been drawn.
    raw_tf = eval_transform(size, _MEAN, _STD, "bilinear", crop_pct=1.0, crop_mode=crop_mode)
    aug_tf = train_transform(  # preset none: the raw view
        aug, size, _MEAN, _STD, "bilinear", crop_pct=1.0, crop_mode=crop_mode
    )
    font = _font(max(10, min(16, size // 6)))
    label_w = _PAD + max(_text_width(font, n) for n in picked) + 2 * _PAD
    block_w = per_class * (size + _PAD)
    blocks = 3 if mixer is not None else 2
    sheet = Image.new(
        "RGB",
        (
            label_w + blocks * block_w + (blocks - 1) * _GAP,
            _HEADER + len(picked) * (size + _PAD) + _PAD,
        ),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    view = "eval view" if crop_mode == "center" else f"eval view, {crop_mode}"
    draw.text((label_w, _PAD), f"raw ({view})", fill=_TEXT, font=font)
    draw.text((label_w + block_w + _GAP, _PAD), f"augmented: {title}", fill=_TEXT, font=font)
    skipped = 0
    views: dict[tuple[int, int], torch.Tensor] = {}
    for row, (name, entries) in enumerate(picked.items()):
        y = _HEADER + row * (size + _PAD)
        draw.text((_PAD, y + size // 2 - 8), name, fill=_TEXT, font=font)
        for col, entry in enumerate(entries):
            x = label_w + col * (size + _PAD)
            image = _load(manifest, entry, size)
            if image is None:
                skipped += 1
                for left in (x, x + block_w + _GAP):
                    draw.rectangle([left, y, left + size - 1, y + size - 1], fill=_MISSING)
                continue
            sheet.paste(to_pil(raw_tf(image)), (x, y))
            augmented = _seeded(aug_tf, image, seed * 1_000_003 + row * 1009 + col)
            sheet.paste(to_pil(augmented), (x + block_w + _GAP, y))
            views[row, col] = augmented
    if mixer is not None:
        left = label_w + 2 * (block_w + _GAP)
        draw.text((left, _PAD), mix_title, fill=_TEXT, font=font)
        for (row, col), tile in _mixed(views, mixer, seed).items():
            sheet.paste(to_pil(tile), (left + col * (size + _PAD), _HEADER + row * (size + _PAD)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return Sheet(Path(out), len(picked), per_class, skipped, mixed=mixer is not None)


def _mixed(views: dict[tuple[int, int], torch.Tensor], mixer, seed: int):
    """The augmented tiles through `mixer` as one batch, column by column (each tile's partner
    is the one before it in the batch: the class above, in the same column)."""
    order = sorted(views, key=lambda rc: (rc[1], rc[0]))
    if not order:
        return {}
    batch = torch.stack([views[rc] for rc in order])
    labels = torch.tensor([row for row, _ in order])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + 7)
        mixed, _targets = mixer(batch, labels)
    return dict(zip(order, mixed, strict=True))


def augmented_batch(
    manifest: Manifest,
    aug: AugmentConfig,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    n: int = 32,
    seed: int = 0,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> torch.Tensor:
    """(n, 3, size, size) augmented training samples, normalised (for TensorBoard's grid)."""
    entries = manifest.split_entries("train") or manifest.ok_entries
    chosen = random.Random(seed).sample(entries, min(n, len(entries)))
    tf = train_transform(aug, size, mean, std, interpolation, crop_pct, crop_mode)
    views = []
    for i, entry in enumerate(chosen):
        image = _load(manifest, entry, size)
        if image is not None:
            views.append(_seeded(tf, image, seed * 1_000_003 + i))
    if not views:
        raise ImgclfError("no training image could be loaded for the sample grid")
    return torch.stack(views)


def to_pil(x: torch.Tensor, mean=_MEAN, std=_STD) -> Image.Image:
    """A normalised (3, H, W) tensor back to a displayable RGB image."""
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    pixels = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _seeded(tf: Callable, image: Image.Image, seed: int) -> torch.Tensor:
    """One augmentation under its own seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf(image)


def _load(manifest: Manifest, entry: Entry, size: int) -> Image.Image | None:
    """The image, or None when it has gone bad or missing since the scan."""
    try:
        return load_image(Path(manifest.root) / entry.path, size_hint=size)
    except (ImageLoadError, OSError):
        return None


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)
