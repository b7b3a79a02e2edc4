"""The decode-once image cache: every image decoded and resized once, kept as uint8 pixels.

Each image goes through `load_image` (every bad-input rule applies; large JPEGs use the
reduced-size decode), its SHORTER side is resized to `stored = round(size / crop_pct)` pixels
exactly as the eval transform resizes (Pillow, antialiased, torchvision's output size), and a
`stored × stored` square is cut from it and kept as uint8 HWC (the arithmetic is
`imgclf.geometry`'s, shared with the eval transform and the ONNX preprocessing).

Aspect ratio (crop_mode "squash": both sides are resized to `stored`, the square is the whole
image and none of this applies): the square is the central part of the image along its long
side. Training crops and flips come from that square only, so the outer parts of wide or tall
images (beyond the central square) are never seen by training; a 4:3 photo loses 1/8 of its
width on each side.
The square's offset is the eval center crop's offset minus the inner crop's (torchvision
rounds both), so it may sit one pixel off the exact middle; that is what makes the
center `size × size` crop of the square (`CachedImages.eval_crop()`) equal the eval transform's
output pixel for pixel, which is why `size` is part of the key and not only `stored`.

An entry is `<root>/<key>/images.u8` (raw N×S×S×3 uint8, C order, no header) and `meta.json`
(format, n, stored, size, interpolation, ok, reasons, paths digest, sha256 of images.u8). It
is written by `imgclf.data.image_cache_build` in a temporary folder `.<key>.XXXXXXXX` beside it
(images through a memory-mapped, preallocated file) and renamed into place, so a crash never
leaves an entry that looks complete; a builder that loses a race for the same key uses the
winner's entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from imgclf.errors import ImgclfError
from imgclf.geometry import (
    DEFAULT_CROP_MODE,
    DEFAULT_CROP_PCT,
    DEFAULT_INTERPOLATION,
    Preprocessing,
    center_anchor,
    check_crop_mode,
    check_crop_pct,
    check_interpolation,
    crop_mode_of,
    resize_short,
    resize_side,
    stored_square_box,
    unpack,
)

CACHE_FORMAT = 1
IMAGES_FILE = "images.u8"
META_FILE = "meta.json"
MODES = ("auto", "memory", "disk")
_MEMORY_CAP = 16 * 2**30
Log = Callable[[str], None]


@dataclass(frozen=True)
class CacheSpec:
    """What the cached pixels depend on, besides the images themselves."""

    size: int
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = DEFAULT_INTERPOLATION
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    size_hint: int | None = None  # None: `stored`, so the reduced decode never needs upscaling
    crop_mode: str = DEFAULT_CROP_MODE  # squash: the whole image, both sides to `stored`

    def __post_init__(self) -> None:
        check_interpolation(self.interpolation)
        check_crop_mode(self.crop_mode)
        check_crop_pct(self.crop_pct)
        if self.size < 1:
            raise ImgclfError(f"image size must be at least 1, got {self.size}")

    @property
    def stored(self) -> int:
        return stored_size(self.size, self.crop_pct)

    @property
    def hint(self) -> int:
        return self.size_hint or self.stored


@dataclass
class CachedImages:
    """One cache entry opened for use: `images` is [N, S, S, 3] uint8 (memmap or RAM)."""

    images: Any  # torch.Tensor, uint8 [N, S, S, 3]
    ok: Any  # torch.Tensor, bool [N]: False where the image could not be loaded (zeros there)
    reasons: list[str]  # "" where ok, else the ImageLoadError kind and detail
    stored: int
    size: int
    key: str
    folder: Path
    mode: str  # "memory" | "disk"
    build_seconds: float  # 0.0 when an existing entry was reused
    nbytes: int
    array: np.ndarray  # what `images` views: an np.memmap in disk mode

    @property
    def crop_offset(self) -> int:
        """Top-left corner (both axes) of the eval center crop inside the stored square."""
        return center_anchor(self.stored, self.size)

    def eval_crop(self):
        """[N, size, size, 3] view: the eval transform's pixels before normalisation."""
        o = self.crop_offset
        return self.images[:, o : o + self.size, o : o + self.size]


def stored_size(size: int, crop_pct: float) -> int:
    """The short side the eval transform resizes to: round(size / crop_pct)."""
    return resize_side(size, crop_pct)


def estimate_bytes(n: int, stored: int) -> int:
    """Bytes of an entry's pixels (meta.json is a few bytes per image on top)."""
    return n * stored * stored * 3


def default_cache_root() -> Path:
    from imgclf.data.example import cache_dir

    return cache_dir() / "images"


def default_memory_budget() -> int:
    """25 % of physical RAM, at most 16 GiB (1 GiB where the RAM size is unknown)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**30
    return min(ram // 4, _MEMORY_CAP)


def cache_key(rel_paths: Sequence[str], data_version: str, spec: CacheSpec) -> str:
    """sha256 over the format, data version, settings and the exact path list in order."""
    parts = {
        "format": CACHE_FORMAT,
        "data_version": data_version,
        "stored": spec.stored,
        "size": spec.size,
        "interpolation": spec.interpolation,
        # Only when squashed: the keys of centre-crop entries are what they always were.
        **({"crop_mode": spec.crop_mode} if spec.crop_mode != DEFAULT_CROP_MODE else {}),
        "max_pixels": spec.max_pixels,
        "min_side": spec.min_side,
        "size_hint": spec.hint,
    }
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    h.update(b"\0" + paths_digest(rel_paths).encode())
    return h.hexdigest()[:24]


def square_pixels(image: Image.Image, spec: CacheSpec) -> np.ndarray:
    """Resize the short side (squashed: both sides) to `stored` as the eval transform does; the
    stored square, HWC."""
    image = resize_short(image, spec.stored, spec.interpolation, spec.crop_mode)
    box = stored_square_box(*image.size, spec.size, spec.stored)
    return np.asarray(image.crop(box), dtype=np.uint8)


class ImageCache:
    """Content-addressed entries of decoded images under `root` (default $IMGCLF_CACHE/images)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    def open_or_build(
        self,
        data_root: Path | str,
        rel_paths: Sequence[str],
        *,
        data_version: str,
        size: int | Preprocessing,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        crop_mode: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
        size_hint: int | None = None,
        mode: str = "auto",
        memory_budget_bytes: int | None = None,
        workers: int | None = None,
        progress: bool = False,
        log: Log | None = None,
    ) -> CachedImages:
        """The entry for these images and settings, decoding them only when none is cached.

        `size` may be the model's `Preprocessing` (its input size, crop_pct, interpolation and
        crop_mode); those left None are the defaults of `imgclf.geometry`.
        mode "auto" keeps the images in RAM when they fit `memory_budget_bytes` (default:
        `default_memory_budget()`), else memory-maps the file; "memory" also writes the entry.
        workers: decode processes; 0 (or 1) decodes in this process, None = one per core (in
        this process below 64 images).
        """
        crop_mode = crop_mode_of(size, crop_mode)
        size, _, _, interpolation, crop_pct = unpack(size, None, None, interpolation, crop_pct)
        spec = CacheSpec(size, crop_pct, interpolation, max_pixels, min_side, size_hint, crop_mode)
        if mode not in MODES:
            raise ImgclfError(f"unknown image cache mode {mode!r}; choose one of {MODES}")
        key = cache_key(rel_paths, data_version, spec)
        if mode == "auto":
            budget = default_memory_budget() if memory_budget_bytes is None else memory_budget_bytes
            mode = "memory" if estimate_bytes(len(rel_paths), spec.stored) <= budget else "disk"
        found = self.open(key, mode=mode, log=log)
        if found is not None:
            return found
        t0 = time.perf_counter()
        paths = [os.path.join(os.fspath(data_root), p) for p in rel_paths]
        # Imported here: the builder imports this module for the entry's format.
        from imgclf.data.image_cache_build import build_entry

        build_entry(self, key, paths, rel_paths, data_version, spec, workers, progress, log)
        seconds = time.perf_counter() - t0
        built = self.open(key, mode=mode, log=log)
        if built is None:
            raise ImgclfError(
                f"the image cache entry {self.root / key} is not readable after writing"
            )
        built.build_seconds = seconds
        return built

    def open(self, key: str, *, mode: str = "disk", log: Log | None = None) -> CachedImages | None:
        """A complete entry as memmap ("disk") or RAM copy ("memory"); None when there is none."""
        if mode not in ("disk", "memory"):
            raise ImgclfError(f"open() takes mode 'disk' or 'memory', not {mode!r}")
        meta = self.read_meta(key)
        if meta is None:
            return None
        import torch

        n, s = meta["n"], meta["stored"]
        shape, file = (n, s, s, 3), self.root / key / IMAGES_FILE
        if mode == "disk" and n:
            # Copy-on-write: a writable view (torch warns on read-only arrays) that never
            # changes the file.
            array = np.memmap(file, dtype=np.uint8, mode="c", shape=shape)
            images = torch.from_numpy(array)
        else:
            images = _read_into_ram(file, shape, log)
            array = images.numpy()
        return CachedImages(
            images=images,
            ok=torch.tensor(meta["ok"], dtype=torch.bool),
            reasons=list(meta["reasons"]),
            stored=s,
            size=meta["size"],
            key=key,
            folder=self.root / key,
            mode=mode,
            build_seconds=0.0,
            nbytes=estimate_bytes(n, s),
            array=array,
        )

    def read_meta(self, key: str) -> dict | None:
        """The entry's meta.json when the entry is complete and consistent, else None."""
        folder = self.root / key
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            n, s = int(meta["n"]), int(meta["stored"])
            good = (
                meta["format"] == CACHE_FORMAT
                and meta["key"] == key
                and len(meta["ok"]) == n == len(meta["reasons"])
                and (folder / IMAGES_FILE).stat().st_size == estimate_bytes(n, s)
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if good else None

    def _publish(self, tmp: Path, key: str) -> None:
        """Rename a finished build into place; losing that race to another builder is fine."""
        try:
            os.replace(tmp, self.root / key)
        except OSError:
            # Another process published the same key first: theirs holds the same pixels.
            shutil.rmtree(tmp, ignore_errors=True)
            if self.read_meta(key) is None:
                raise


def paths_digest(rel_paths: Iterable[str]) -> str:
    """sha256 of the exact image path list, in order."""
    # JSON, not "\n".join: a file name may itself contain a newline.
    return hashlib.sha256(json.dumps(list(rel_paths), ensure_ascii=False).encode()).hexdigest()


def _read_into_ram(file: Path, shape: tuple[int, ...], log: Log | None):
    import torch

    pin = torch.cuda.is_available()
    try:
        images = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
    except RuntimeError as e:  # page-locking this much can fail; pageable memory still works
        if log:
            log(f"image cache not pinned ({e}); using pageable memory")
        images = torch.empty(shape, dtype=torch.uint8)
    view = memoryview(images.numpy().reshape(-1))  # flat bytes, a view of the tensor
    with open(file, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise ImgclfError(f"{file} is shorter than its meta.json says; delete it")
            done += got
    return images
