"""Write real good, bad and odd image files for tests (docs/RELIABILITY.md rows 1-15).

Every writer takes the target path, creates parent folders, writes the file and returns it as a
Path. Pixels come from seeded numpy noise and gradients: the same arguments give identical bytes,
a different ``seed`` gives different bytes.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Size = tuple[int, int]


def _target(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rgb(size: Size, seed: int | Sequence[int], tint: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Height x width x 3 uint8: smooth gradients (so JPEG stays small) plus seeded noise."""
    w, h = size
    rng = _rng(seed)
    x = np.linspace(0, 6, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 3, h, dtype=np.float32)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    chans = [127 + 80 * np.sin(x + y + np.float32(p)) for p in phase]
    base = np.stack(chans, axis=-1) + np.asarray(tint, dtype=np.float32)
    noise = rng.integers(-40, 41, size=(h, w, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _gray(size: Size, seed: int | Sequence[int]) -> np.ndarray:
    return _rgb(size, seed)[..., 0]


def _save(path: str | Path, im: Image.Image, fmt: str, **params) -> Path:
    target = _target(path)
    im.save(target, format=fmt, **params)
    return target


def write_jpeg(path, size: Size = (64, 48), seed: int = 0, quality: int = 90) -> Path:
    return _save(path, Image.fromarray(_rgb(size, seed)), "JPEG", quality=quality)


def write_png(path, size: Size = (64, 48), seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_rgb(size, seed)), "PNG")


def write_truncated_jpeg(path, size: Size = (128, 96), seed: int = 0) -> Path:
    """Cut inside the entropy-coded scan: headers intact, so open() and verify() succeed."""
    buf = io.BytesIO()
    Image.fromarray(_rgb(size, seed)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    target = _target(path)
    target.write_bytes(data[: len(data) // 2])
    return target


def write_zero_byte(path) -> Path:
    target = _target(path)
    target.write_bytes(b"")
    return target


def write_text_as_jpg(path) -> Path:
    target = _target(path)
    target.write_text(
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        "<body><h1>Not Found</h1><p>The requested image was not found.</p></body></html>\n",
        encoding="utf-8",
    )
    return target


def write_png_named_jpg(path, seed: int = 0) -> Path:
    """PNG bytes whatever the name says; callers pass a ``.jpg`` path."""
    target = _target(path)
    Image.fromarray(_rgb((64, 48), seed)).save(target, format="PNG")
    return target


def write_cmyk_jpeg(path, seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_rgb((64, 48), seed)).convert("CMYK"), "JPEG", quality=95)


def write_palette_png_transparent(path, seed: int = 0) -> Path:
    """16-colour palette image; index 0 is transparent and fills the top-left 8x8 block."""
    rng = _rng(seed)
    idx = rng.integers(1, 16, size=(48, 64), dtype=np.uint8)
    idx[:8, :8] = 0
    im = Image.frombytes("P", (64, 48), idx.tobytes())
    palette = rng.integers(0, 256, size=16 * 3, dtype=np.uint8)
    im.putpalette(palette.tobytes())
    return _save(path, im, "PNG", transparency=0)


def write_rgba_png(path, seed: int = 0) -> Path:
    """Left 8 columns fully transparent (over random colours), next 8 half, the rest opaque."""
    rgb = _rgb((64, 48), seed)
    alpha = np.full((48, 64, 1), 255, dtype=np.uint8)
    alpha[:, :8] = 0
    alpha[:, 8:16] = 128
    return _save(path, Image.fromarray(np.concatenate([rgb, alpha], axis=-1)), "PNG")


def write_la_png(path, seed: int = 0) -> Path:
    """Grayscale + alpha; the left 8 columns are fully transparent."""
    gray = _gray((64, 48), seed)
    alpha = np.full((48, 64), 255, dtype=np.uint8)
    alpha[:, :8] = 0
    return _save(path, Image.fromarray(np.stack([gray, alpha], axis=-1)), "PNG")


def write_16bit_png(path, seed: int = 0) -> Path:
    """256x8 mode I;16. Row 0 is the gradient 0, 257, ..., 65535 (x * 257, so it maps to x in
    8 bits); pixel (x=0, y=1) is 32768 (mid-gray); the rest is seeded 16-bit noise."""
    rng = _rng(seed)
    arr = rng.integers(0, 65536, size=(8, 256), dtype=np.uint16)
    arr[0] = np.arange(256, dtype=np.uint16) * 257
    arr[1, 0] = 32768
    im = Image.fromarray(arr)
    assert im.mode == "I;16", im.mode
    return _save(path, im, "PNG")


def write_grayscale_png(path, seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_gray((64, 48), seed)), "PNG")


def _frames(n: int, size: Size, seed: int) -> list[Image.Image]:
    # Each frame gets its own seed and tint so consecutive frames never coincide (Pillow would
    # merge identical frames when saving a GIF).
    tints = [(60 * (k % 3), 60 * ((k + 1) % 3), 60 * ((k + 2) % 3)) for k in range(n)]
    return [Image.fromarray(_rgb(size, (seed, k), tints[k])) for k in range(n)]


def write_animated_gif(path, frames: int = 3, seed: int = 0) -> Path:
    ims = [f.quantize(colors=64, dither=Image.Dither.NONE) for f in _frames(frames, (64, 48), seed)]
    return _save(path, ims[0], "GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)


def write_multipage_tiff(path, pages: int = 2, seed: int = 0) -> Path:
    ims = _frames(pages, (64, 48), seed)
    return _save(path, ims[0], "TIFF", save_all=True, append_images=ims[1:])


def write_exif_rotated_jpeg(
    path, orientation: int = 6, size: Size = (64, 32), seed: int = 0
) -> Path:
    """Stored as ``size`` with a dark left half and bright right half, plus the EXIF tag."""
    arr = _rgb(size, seed)
    half = size[0] // 2
    arr[:, :half] //= 4
    arr[:, half:] = 255 - (255 - arr[:, half:]) // 4
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(path, Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_bomb_png(path, width: int = 50_000, height: int = 50_000) -> Path:
    """A few dozen bytes whose IHDR declares width x height 8-bit grayscale pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )
    target = _target(path)
    target.write_bytes(data)
    return target


def write_tiny_png(path, size: Size = (4, 4), seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_rgb(size, seed)), "PNG")


def _fake_bmff(path, brand: bytes, compatible: bytes) -> Path:
    ftyp = b"ftyp" + brand + b"\x00\x00\x00\x00" + compatible
    junk = _rng(7).integers(0, 256, size=256, dtype=np.uint8).tobytes()
    target = _target(path)
    target.write_bytes(struct.pack(">I", len(ftyp) + 4) + ftyp + junk)
    return target


def write_fake_heic(path) -> Path:
    return _fake_bmff(path, b"heic", b"mif1heic")


def write_fake_avif(path) -> Path:
    return _fake_bmff(path, b"avif", b"avifmif1miaf")


def write_webp(path, seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_rgb((64, 48), seed)), "WEBP", lossless=True)


def write_bmp(path, seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_rgb((64, 48), seed)), "BMP")


def write_tiff(path, seed: int = 0) -> Path:
    return _save(path, Image.fromarray(_rgb((64, 48), seed)), "TIFF")


def write_avif(path, seed: int = 0) -> Path:
    """Only where this Pillow was built with AVIF support."""
    return _save(path, Image.fromarray(_rgb((64, 48), seed)), "AVIF", quality=90)


def make_class_folder(
    root,
    classes: Sequence[str] = ("cat", "dog", "fish"),
    per_class: int = 4,
    ext: str = ".png",
    size: Size = (32, 32),
    seed: int = 0,
) -> Path:
    """A tiny real dataset ``root/<class>/<class>_<i><ext>``; each class has its own tint so a
    model can learn something, and every file has distinct bytes."""
    fmt = Image.registered_extensions()[ext.lower()]
    root = Path(root)
    for c, name in enumerate(classes):
        tint = [(-70, 0, 70)[(c + k) % 3] for k in range(3)]
        for i in range(per_class):
            arr = _rgb(size, (seed, c, i), tint)
            im = Image.fromarray(arr)
            params = {"quality": 95} if fmt == "JPEG" else {}
            _save(root / name / f"{name}_{i}{ext}", im, fmt, **params)
    return root


# The smallest real training run the tests use: a two-block scratch CNN on 32-px images.
TINY_MODEL = [
    "model.name=scratch_cnn",
    "model.pretrained=none",
    "model.scratch.blocks=2",
    "model.scratch.width=8",
    "data.image_size=32",
    "train.batch_size=8",
]
