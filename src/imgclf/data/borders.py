"""What surrounds the subject: the colour of the images' outermost pixels.

Drawings, icons, product shots and scans sit on a plain background, most often white (and
imgclf composites transparent images on white). A rotation or shear fills the corners it
uncovers with `train.augment.fill`; black corners on white-background images are something
the model sees only in training. `imgclf fit` reads a seeded sample's borders to choose the fill
(held-in clip art: 89 % of the 64 sampled training images have a white border).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from imgclf.data.images import ImageLoadError, load_image
from imgclf.data.manifest import Manifest

LIGHT, DARK = 240, 15  # a border averaging above / below this (of 255) is white / black
# When half a sample of the training images have a white border, rotations should fill white.
WHITE_SHARE = 0.5


@dataclass(frozen=True)
class Borders:
    """Shares of a sample of images whose one-pixel border is light or dark."""

    sampled: int
    light: float
    dark: float


def sample_borders(
    manifest: Manifest, split: str | None = "train", sample: int = 64, seed: int = 0
) -> Borders:
    """The border shares of up to `sample` images of `split` (None: every usable image;
    seeded; unreadable ones skipped)."""
    pool = manifest.split_entries(split) if split else manifest.ok_entries
    entries = sorted(pool, key=lambda e: e.path)
    picked = random.Random(seed).sample(entries, min(sample, len(entries)))
    means = []
    for entry in picked:
        try:
            # a JPEG decodes at a fraction of its size (its border colour is the same)
            image = load_image(manifest.root / entry.path, size_hint=64)
        except (ImageLoadError, OSError):
            continue
        a = np.asarray(image, dtype=np.float32)
        ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        means.append(float(ring.mean()))
    if not means:
        return Borders(0, 0.0, 0.0)
    m = np.asarray(means)
    return Borders(len(m), round(float((m > LIGHT).mean()), 3), round(float((m < DARK).mean()), 3))
