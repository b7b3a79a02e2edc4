"""The one image loader: scan, training, prediction and serving all open images through here, so a
file is accepted, normalised or skipped for the same reason everywhere (docs/RELIABILITY.md rows
1-15)."""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclf.errors import ImgclfError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default guard; imgclf's config may change ours
DEFAULT_MIN_SIDE = 8
ALPHA_BACKGROUND = (255, 255, 255)  # the alpha notes below say "white"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
    | {".ppm", ".pgm", ".pbm", ".heic", ".heif", ".avif", ".jp2", ".ico"}
)

Source = str | os.PathLike | bytes | IO[bytes]

# Formats Pillow may try. Obscure plugins stay off: uploads are untrusted and EPS, for one,
# hands the file to Ghostscript.
_ALLOWED = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "ICO", "JPEG2000", "AVIF")
_ALLOWED += ("HEIF",)  # only present when a plugin such as pillow-heif registers it
_PILLOW_NAME = {"HEIC": "HEIF"}
_NOT_IMAGES = frozenset({"PDF", "ZIP", "GZIP", "SVG", "HTML", "XML", "TEXT"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "F"})
# What plugins raise on damaged data; Pillow wraps most of it in OSError but not all.
# TypeError and KeyError: Pillow raises them for TIFF directories that lack a required tag
# ("Missing dimensions" when counting the frames of a file whose second IFD has no width).
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error,
    zlib.error,
)  # fmt: skip

_MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
    "ICO": (b"\x00\x00\x01\x00",),
    "JPEG2000": (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"),
    "PSD": (b"8BPS",),
    "QOI": (b"qoif",),
    "PDF": (b"%PDF-",),
    "ZIP": (b"PK\x03\x04", b"PK\x05\x06"),
    "GZIP": (b"\x1f\x8b",),
}
_BYTES = (bytes, bytearray, memoryview)
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


class ImageLoadError(ImgclfError):
    """An image that cannot be used; ``kind`` is the short key the scan report groups by."""

    def __init__(self, path: object, kind: str, detail: str = "") -> None:
        self.path, self.kind, self.detail = str(path), kind, detail
        super().__init__(f"{self.path}: {kind}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # DataLoader workers pickle errors back to the main process
        return type(self), (self.path, self.kind, self.detail)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str
    frames: int
    notes: tuple[str, ...]


def sniff_format(head: bytes) -> str | None:
    """Name the format from magic bytes alone (extensions lie); None when unknown."""
    for name, magics in _MAGIC.items():
        if head.startswith(magics):
            return name
    if head[4:8] == b"ftyp":
        return _bmff_format(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "PPM"
    return _sniff_text(head)


def _bmff_format(head: bytes) -> str | None:
    # ISO base media (HEIF, AVIF, MP4): the major brand, then compatible brands after 4 bytes
    # of minor version, up to the end of the ftyp box.
    end = min(len(head), int.from_bytes(head[:4], "big"))
    brands = [head[8:12]] + [head[i : i + 4] for i in range(16, end - 3, 4)]
    for brand in brands:
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in _HEIC_BRANDS:
            return "HEIC"
    return "HEIF" if brands[0] in (b"mif1", b"msf1") else None


def _sniff_text(head: bytes) -> str | None:
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<") and b"<svg" in text:
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--")):
        return "HTML"
    if text.startswith(b"<?xml"):
        return "XML"
    # Control bytes other than tab/newline/carriage return mean binary data.
    if text and not any(b < 9 or 13 < b < 32 or b == 127 for b in head):
        return "TEXT"
    return None


def probe(
    source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> ImageInfo:
    """Format, size and planned normalisation from the header alone; never decodes pixels."""
    with _opened(source, max_pixels, min_side) as (im, _name, ext):
        return _info(im, ext)


def check_image(
    path: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> ImageInfo:
    """``probe`` plus a full decode of the first frame: truncated files only fail there."""
    with _opened(path, max_pixels, min_side) as (im, name, ext):
        info = _info(im, ext)
        im.seek(0)  # counting frames walks the file; frame 0 is the one we keep
        _decode(name, im.load)
        if im.mode == "I":  # only the decoded values tell whether this is 8- or 16-bit data
            info = _info(im, ext, im.getextrema()[1])
        return info


def load_image(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    size_hint: int | None = None,
) -> Image.Image:
    """A decoded, normalised RGB image detached from the file.

    What was normalised is in ``image.info["imgclf_notes"]`` (the same wording as ImageInfo).
    """
    with _opened(source, max_pixels, min_side) as (im, name, ext):
        frames = _frame_count(im)
        if size_hint and im.format == "JPEG" and min(im.size) >= 2 * size_hint:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale for almost free; draft keeps both
            # sides >= size_hint so the later resize still only shrinks.
            im.draft("RGB", (size_hint, size_hint))
        im.seek(0)  # counting frames walks the file; frame 0 is the one we keep
        # Notes first: reading the orientation caches the header EXIF on `im`, so exif_transpose
        # applies exactly the orientation that probe reports.
        notes = _header_notes(im, ext, frames)
        if _orientation(im) == 1:  # exif_transpose would return a copy of the decoded image
            _decode(name, im.load)
            upright = im
        else:
            upright = _decode(name, lambda: ImageOps.exif_transpose(im))
        rgb, mode_notes = _decode(name, lambda: _to_rgb(upright))
    rgb.info["imgclf_notes"] = tuple(notes + mode_notes)
    return rgb


@contextmanager
def _opened(source: Source, max_pixels: int, min_side: int) -> Iterator[tuple]:
    """Open with every check that needs only the header; yields (image, name, extension)."""
    name = _name(source)
    ext = Path(source).suffix.lower() if isinstance(source, (str, os.PathLike)) else ""
    with _binary(source, name) as fp:
        try:
            fp.seek(0)
            head = fp.read(512)
        except OSError as e:
            raise ImageLoadError(name, "unreadable", e.strerror or str(e)) from e
        if not head:
            raise ImageLoadError(name, "empty file")
        sniffed = sniff_format(head)
        if sniffed in _NOT_IMAGES:
            raise ImageLoadError(name, "not an image", f"content is {sniffed}")
        with _open_image(fp, name, ext, sniffed) as im:
            w, h = im.size
            if w * h > max_pixels:
                detail = f"{w}x{h} = {w * h:,} pixels, limit {max_pixels:,}"
                raise ImageLoadError(name, "over pixel cap", detail)
            if min(w, h) < min_side:
                raise ImageLoadError(name, "too small", f"{w}x{h}, minimum side {min_side}")
            yield im, name, ext


def _open_image(fp: IO[bytes], name: str, ext: str, sniffed: str | None) -> Image.Image:
    try:
        # Pillow warns past its limit and raises past twice it. Our own cap (a setting) decides,
        # so the warning is silenced here only; nothing global changes. catch_warnings is not
        # thread-safe before Python 3.14, at worst another thread's warning is lost meanwhile.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=_formats())
    except Image.DecompressionBombError as e:
        raise ImageLoadError(name, "over pixel cap", f"refused by Pillow: {e}") from e
    except UnidentifiedImageError as e:
        raise _unidentified(name, ext, sniffed) from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(name, "truncated or corrupt", str(e)) from e


def _unidentified(name: str, ext: str, sniffed: str | None) -> ImageLoadError:
    if sniffed and _PILLOW_NAME.get(sniffed, sniffed) in _formats():
        return ImageLoadError(name, "truncated or corrupt", f"{sniffed} header not readable")
    if sniffed:
        return ImageLoadError(name, f"unsupported format {sniffed}")
    # Unknown bytes: trust the extension only to name a format this Pillow cannot read.
    if ext and Image.registered_extensions().get(ext) not in _formats():
        return ImageLoadError(name, f"unsupported format {ext[1:].upper()}")
    return ImageLoadError(name, "not an image")


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so a missing optional one (HEIF) is simply absent
    return tuple(f for f in _ALLOWED if f in Image.OPEN)


def _name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<bytes>" if isinstance(source, _BYTES) else str(getattr(source, "name", "<stream>"))


@contextmanager
def _binary(source: Source, name: str) -> Iterator[IO[bytes]]:
    if isinstance(source, _BYTES):
        yield io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        from imgclf.files import NotRegularFile, open_regular

        try:
            # A FIFO or device is refused from its stat alone, never opened (RELIABILITY 32).
            fp = open_regular(source)
        except NotRegularFile as e:
            raise ImageLoadError(name, "not a regular file", e.kind) from e
        except OSError as e:
            raise ImageLoadError(name, "unreadable", e.strerror or str(e)) from e
        with fp:
            yield fp
    elif not getattr(source, "seekable", lambda: False)():
        yield io.BytesIO(source.read())  # sniffing and Pillow both need to go back to byte 0
    else:
        yield source  # the caller's file: the caller closes it


def _decode(name: str, fn):
    try:
        return fn()
    except _DECODE_ERRORS as e:
        raise ImageLoadError(name, "truncated or corrupt", str(e)) from e


def _orientation(im: Image.Image) -> int:
    # PngImageFile.getexif() decodes the whole image to look for a trailing eXIf chunk; the
    # base method reads only what the header gave (eXIf before IDAT, XMP).
    try:
        exif = Image.Image.getexif(im) if im.format == "PNG" else im.getexif()
    except _DECODE_ERRORS:  # damaged EXIF must not cost a good image
        return 1
    orientation = exif.get(0x0112, 1)
    return orientation if orientation in range(2, 9) else 1


def _info(im: Image.Image, ext: str, int_max: int | None = None) -> ImageInfo:
    w, h = im.size
    if _orientation(im) in (5, 6, 7, 8):  # the transposing ones
        w, h = h, w
    frames = _frame_count(im)
    notes = _header_notes(im, ext, frames) + _mode_notes(im, int_max)
    return ImageInfo(im.format or "", w, h, im.mode, frames, tuple(notes))


def _frame_count(im: Image.Image) -> int:
    try:
        return getattr(im, "n_frames", 1)
    except _DECODE_ERRORS:  # a damaged later frame; only frame 0 is used anyway
        return 1


def _header_notes(im: Image.Image, ext: str, frames: int) -> list[str]:
    notes = []
    family = {"MPO": "JPEG"}  # a camera's multi-picture JPEG is still a JPEG
    expected = Image.registered_extensions().get(ext)
    if ext and family.get(expected, expected) != family.get(im.format, im.format):
        notes.append(f"extension {ext} but content is {im.format}")
    if (orientation := _orientation(im)) != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    if frames > 1:
        notes.append(f"first of {frames} frames used")
    return notes


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)


def _mode_notes(im: Image.Image, int_max: int | None) -> list[str]:
    """What _to_rgb does to this mode; ``int_max`` is the largest value of an "I" image."""
    mode, notes = im.mode, []
    if _has_alpha(im):
        notes.append("alpha composited on white")
    if mode.startswith("I;16") or (mode == "I" and int_max is not None and int_max > 255):
        notes.append("16-bit scaled to 8-bit")
    elif mode == "I" and int_max is None:
        notes.append("integer pixels mapped to 8-bit (scaled if above 255)")
    elif mode == "F":
        notes.append("float pixels clipped to 0-255")
    elif mode == "P" and not notes:
        notes.append("palette expanded to RGB")
    elif mode not in _GRAY_MODES | _ALPHA_MODES | {"P", "RGB"}:
        notes.append(f"{mode} converted to RGB")
    if mode in _GRAY_MODES or mode.startswith("I;16"):
        notes.append("grayscale replicated to 3 channels")
    return notes


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """Normalise any mode to RGB without saturating 16-bit data or dropping alpha."""
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), _mode_notes(im, None)
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im.convert("RGB") if im.mode != "RGB" else im, _mode_notes(im, None)
    values = np.asarray(im)
    int_max = int(values.max()) if im.mode == "I" else None
    if im.mode == "F":
        gray = np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
    elif im.mode == "I" and int_max <= 255:
        gray = np.clip(values, 0, 255).astype(np.uint8)
    else:
        # (v + 128) // 257 == round(v / 257): 65535 -> 255 and 32768 -> 128; integer maths
        # keeps a 90-megapixel image at 4 bytes per pixel.
        wide = np.clip(values, 0, 65535).astype(np.uint32)
        gray = ((wide + 128) // 257).astype(np.uint8)
    out = Image.fromarray(gray).convert("RGB")
    out.info = dict(im.info)
    return out, _mode_notes(im, int_max)
