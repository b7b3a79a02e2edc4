"""imgclf.data.images against real good, bad and odd files (docs/RELIABILITY.md rows 1-15)."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

import factory

try:
    import imgclf  # noqa: F401
except ModuleNotFoundError:  # package not installed in the venv: use this checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgclf.data.images import (
    ALPHA_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageInfo,
    ImageLoadError,
    check_image,
    load_image,
    probe,
    sniff_format,
)

PILLOW_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@pytest.fixture(autouse=True)
def _pillow_globals_untouched():
    yield
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_PIXELS


def px(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def notes(im: Image.Image) -> tuple[str, ...]:
    return im.info["imgclf_notes"]


def raises_kind(kind: str, fn, *args, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        fn(*args, **kwargs)
    assert info.value.kind == kind, str(info.value)
    return info.value


# --- accepted, normalised, recorded ----------------------------------------------------------


def test_plain_jpeg(tmp_path):
    path = factory.write_jpeg(tmp_path / "a.jpg", size=(64, 48))
    assert probe(path) == ImageInfo("JPEG", 64, 48, "RGB", 1, ())
    assert check_image(path) == probe(path)
    im = load_image(path)
    assert (im.mode, im.size, notes(im)) == ("RGB", (64, 48), ())


def test_png_named_jpg_is_accepted_with_real_format(tmp_path):
    path = factory.write_png_named_jpg(tmp_path / "really_png.jpg")
    info = check_image(path)
    assert info.format == "PNG"
    assert info.notes == ("extension .jpg but content is PNG",)
    with Image.open(path) as raw:
        expected = np.asarray(raw.convert("RGB")).astype(int)
    assert (px(load_image(path)) == expected).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = factory.write_cmyk_jpeg(tmp_path / "cmyk.jpg", seed=3)
    assert probe(path).mode == "CMYK"
    im = load_image(path)
    assert notes(im) == ("CMYK converted to RGB",)
    original = factory._rgb((64, 48), 3).astype(int)  # what was converted to CMYK and saved
    assert np.abs(px(im) - original).mean() < 12  # not inverted, not channel-swapped


def test_palette_png_transparency_composited_on_background(tmp_path):
    path = factory.write_palette_png_transparent(tmp_path / "p.png", seed=1)
    im = load_image(path)
    assert notes(im) == ("alpha composited on white",)
    arr = px(im)
    assert (arr[:8, :8] == ALPHA_BACKGROUND).all()
    with Image.open(path) as raw:
        index = raw.getpixel((20, 20))
        palette = raw.getpalette()
    assert tuple(arr[20, 20]) == tuple(palette[3 * index : 3 * index + 3])


def test_rgba_png_composited_on_background(tmp_path):
    path = factory.write_rgba_png(tmp_path / "rgba.png", seed=2)
    with Image.open(path) as raw:
        src = np.asarray(raw).astype(int)
    arr = px(load_image(path))
    assert (arr[:, :8] == ALPHA_BACKGROUND).all()  # alpha 0
    assert (arr[:, 16:] == src[:, 16:, :3]).all()  # alpha 255
    bg = np.asarray(ALPHA_BACKGROUND)
    half = (src[:, 8:16, :3] * 128 + bg * 127) / 255  # alpha 128
    assert np.abs(arr[:, 8:16] - half).max() <= 1
    assert check_image(path).notes == ("alpha composited on white",)


def test_la_png_composited_and_replicated(tmp_path):
    path = factory.write_la_png(tmp_path / "la.png")
    im = load_image(path)
    assert notes(im) == ("alpha composited on white", "grayscale replicated to 3 channels")
    arr = px(im)
    assert (arr[:, :8] == ALPHA_BACKGROUND).all()
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_16bit_png_scaled_not_saturated(tmp_path):
    path = factory.write_16bit_png(tmp_path / "16.png", seed=4)
    info = probe(path)
    assert (info.mode, info.width, info.height) == ("I;16", 256, 8)
    with Image.open(path) as raw:
        src = np.asarray(raw).astype(int)
    im = load_image(path)
    assert notes(im) == ("16-bit scaled to 8-bit", "grayscale replicated to 3 channels")
    arr = px(im)
    assert src[0, 255] == 65535 and arr[0, 255, 0] == 255
    assert src[1, 0] == 32768 and arr[1, 0, 0] == 128  # mid-gray stays mid-gray
    assert (arr[0, :, 0] == np.arange(256)).all()  # v * 257 -> v for the whole gradient
    assert (arr[..., 0] == np.rint(src / 257)).all()
    assert (arr[..., 0] == arr[..., 2]).all()
    assert (arr < 255).mean() > 0.9  # a plain convert("RGB") would make ~all of it 255


def _tiff_bytes(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "TIFF")
    return buf.getvalue()


def test_mode_I_with_8bit_values_kept():
    values = np.tile(np.arange(0, 256, 4, dtype=np.int32), (8, 1))
    data = _tiff_bytes(values)
    assert probe(data).mode == "I"
    assert check_image(io.BytesIO(data)).notes == ("grayscale replicated to 3 channels",)
    assert (px(load_image(data))[..., 1] == values).all()


def test_mode_I_with_16bit_values_scaled():
    values = np.tile(np.array([0, 257, 32768, 65535, 70000, -5, 1000, 128], np.int32), (8, 1))
    data = _tiff_bytes(values)
    assert check_image(io.BytesIO(data)).notes[0] == "16-bit scaled to 8-bit"
    assert list(px(load_image(data))[0, :, 0]) == [0, 1, 128, 255, 255, 0, 4, 0]


def test_mode_F_clipped():
    values = np.tile(np.array([-10.0, 0.4, 127.6, 255.0, 300.0, 1.5, 2.5, 9.0], np.float32), (8, 1))
    im = load_image(_tiff_bytes(values))
    assert list(px(im)[0, :, 0]) == [0, 0, 128, 255, 255, 2, 2, 9]
    assert notes(im)[0] == "float pixels clipped to 0-255"


def test_grayscale_replicated(tmp_path):
    path = factory.write_grayscale_png(tmp_path / "g.png", seed=5)
    with Image.open(path) as raw:
        src = np.asarray(raw).astype(int)
    im = load_image(path)
    assert notes(im) == ("grayscale replicated to 3 channels",)
    for channel in range(3):
        assert (px(im)[..., channel] == src).all()


def test_animated_gif_first_frame(tmp_path):
    path = factory.write_animated_gif(tmp_path / "anim.gif", frames=3, seed=6)
    with Image.open(path) as raw:
        frame0 = np.asarray(raw.convert("RGB")).astype(int)
        raw.seek(1)
        frame1 = np.asarray(raw.convert("RGB")).astype(int)
    assert (frame0 != frame1).any()
    assert probe(path).frames == 3
    im = load_image(path)
    assert "first of 3 frames used" in notes(im)
    assert (px(im) == frame0).all()


def test_multipage_tiff_first_page(tmp_path):
    path = factory.write_multipage_tiff(tmp_path / "pages.tif", pages=2, seed=7)
    info = check_image(path)
    assert (info.frames, info.notes) == (2, ("first of 2 frames used",))
    first = factory._rgb((64, 48), (7, 0), (0, 60, 120))
    assert (px(load_image(path)) == first).all()


def test_exif_orientation_6_applied_first(tmp_path):
    path = factory.write_exif_rotated_jpeg(tmp_path / "rot.jpg", orientation=6, size=(64, 32))
    info = probe(path)
    assert (info.width, info.height, info.notes) == (32, 64, ("EXIF orientation 6 applied",))
    im = load_image(path)
    assert im.size == (32, 64)
    assert notes(im) == ("EXIF orientation 6 applied",)
    arr = px(im).mean(axis=(1, 2))
    # Stored dark left half; orientation 6 means "rotate 90° clockwise to display": left -> top.
    assert arr[:32].mean() < 100 < 160 < arr[32:].mean()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_size(tmp_path, orientation):
    path = factory.write_exif_rotated_jpeg(tmp_path / "r.jpg", orientation, size=(40, 20))
    expected = (20, 40) if orientation >= 5 else (40, 20)
    info = probe(path)
    assert (info.width, info.height) == expected
    assert load_image(path).size == expected


@pytest.mark.parametrize(
    ("writer", "fmt"),
    [(factory.write_webp, "WEBP"), (factory.write_bmp, "BMP"), (factory.write_tiff, "TIFF")],
)
def test_webp_bmp_tiff_accepted(tmp_path, writer, fmt):
    path = writer(tmp_path / f"x.{fmt.lower()}", seed=8)
    assert check_image(path).format == fmt
    assert (px(load_image(path)) == factory._rgb((64, 48), 8)).all()  # all three lossless here


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF support")
def test_real_avif_accepted_when_pillow_supports_it(tmp_path):
    path = factory.write_avif(tmp_path / "x.avif")
    assert check_image(path).format == "AVIF"
    assert load_image(path).size == (64, 48)


def test_fake_avif(tmp_path):
    path = factory.write_fake_avif(tmp_path / "x.avif")
    kind = "truncated or corrupt" if features.check("avif") else "unsupported format AVIF"
    raises_kind(kind, probe, path)


# --- skipped with a reason ---------------------------------------------------------------------


def test_truncated_jpeg_passes_probe_fails_decode(tmp_path):
    path = factory.write_truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(path) as raw:
        raw.verify()  # the trap: Pillow's cheap check says it is fine
    assert probe(path).format == "JPEG"
    raises_kind("truncated or corrupt", check_image, path)
    raises_kind("truncated or corrupt", load_image, path)
    raises_kind("truncated or corrupt", load_image, path, size_hint=16)


def test_bomb_rejected_from_header(tmp_path, monkeypatch):
    path = factory.write_bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 100
    start = time.perf_counter()
    for fn in (probe, check_image, load_image):
        raises_kind("over pixel cap", fn, path)
    assert time.perf_counter() - start < 0.5


def test_bomb_in_pillow_warning_range_no_warning_escapes(tmp_path):
    path = factory.write_bomb_png(tmp_path / "bomb.png", width=10_000, height=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = raises_kind("over pixel cap", probe, path)
    assert "100,000,000" in err.detail


def test_pixel_cap_is_a_setting_checked_before_decoding(tmp_path, monkeypatch):
    path = factory.write_png(tmp_path / "a.png", size=(64, 48))

    def no_decoding(self):
        raise AssertionError("decoded despite the cap")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for fn in (probe, check_image, load_image):
        raises_kind("over pixel cap", fn, path, max_pixels=64 * 48 - 1)
    bomb = factory.write_bomb_png(tmp_path / "b.png", width=10_000, height=10_000)
    assert probe(bomb, max_pixels=2 * DEFAULT_MAX_PIXELS).width == 10_000  # a raised cap holds


def test_tiny_image(tmp_path):
    path = factory.write_tiny_png(tmp_path / "t.png", size=(4, 12))
    raises_kind("too small", check_image, path)
    assert load_image(path, min_side=4).size == (4, 12)


def test_zero_byte(tmp_path):
    raises_kind("empty file", check_image, factory.write_zero_byte(tmp_path / "z.jpg"))
    raises_kind("empty file", load_image, b"")


def test_text_as_jpg(tmp_path):
    err = raises_kind("not an image", check_image, factory.write_text_as_jpg(tmp_path / "t.jpg"))
    assert err.detail == "content is HTML"


def test_fake_heic(tmp_path):
    err = raises_kind(
        "unsupported format HEIC", check_image, factory.write_fake_heic(tmp_path / "x.heic")
    )
    assert str(err) == f"{tmp_path / 'x.heic'}: unsupported format HEIC"


def test_unknown_bytes_named_by_extension(tmp_path):
    junk = bytes(range(256)) * 4
    (tmp_path / "x.heif").write_bytes(junk)
    (tmp_path / "x.jpg").write_bytes(junk)
    raises_kind("unsupported format HEIF", probe, tmp_path / "x.heif")
    raises_kind("not an image", probe, tmp_path / "x.jpg")


def test_unreadable(tmp_path):
    err = raises_kind("unreadable", check_image, tmp_path / "gone.jpg")
    assert "No such file" in err.detail
    raises_kind("unreadable", check_image, tmp_path)  # a directory


# --- sources, size hint, resources, errors -----------------------------------------------------


def test_bytes_and_file_object_sources(tmp_path):
    path = factory.write_exif_rotated_jpeg(tmp_path / "r.jpg")
    expected = px(load_image(path))
    data = path.read_bytes()
    assert probe(data) == probe(io.BytesIO(data)) == probe(path)
    assert (px(load_image(data)) == expected).all()
    with open(path, "rb") as fp:
        assert (px(load_image(fp)) == expected).all()
        assert not fp.closed  # the caller's file stays the caller's
    raises_kind("truncated or corrupt", load_image, data[: len(data) // 2])


def test_non_seekable_stream(tmp_path):
    path = factory.write_png(tmp_path / "a.png")

    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self._buf = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self._buf.readinto(b)

    assert load_image(Pipe(path.read_bytes())).size == (64, 48)


def test_size_hint_drafts_large_jpeg(tmp_path):
    path = factory.write_jpeg(tmp_path / "big.jpg", size=(2000, 1500))
    small = load_image(path, size_hint=224)
    assert min(small.size) >= 224
    assert small.size[0] < 2000 and small.size[1] < 1500
    assert load_image(path, size_hint=1000).size == (2000, 1500)  # not >= 2x: full size
    assert load_image(path).size == (2000, 1500)


def test_files_closed_and_no_resource_warning(tmp_path):
    writers = [w for name, w in vars(factory).items() if name.startswith("write_")]
    paths = [w(tmp_path / f"{w.__name__}.img") for w in writers if w is not factory.write_avif]
    fd_dir = Path("/proc/self/fd")
    before = len(os.listdir(fd_dir)) if fd_dir.exists() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in paths:
            for fn in (probe, check_image, load_image):
                with contextlib.suppress(ImageLoadError):
                    fn(path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    if before is not None:
        assert len(os.listdir(fd_dir)) == before


def test_image_load_error_contract():
    err = ImageLoadError("a/b.jpg", "truncated or corrupt", "image file is truncated")
    assert str(err) == "a/b.jpg: truncated or corrupt (image file is truncated)"
    assert str(ImageLoadError(Path("c.png"), "too small")) == "c.png: too small"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.kind, again.detail, str(again)) == (
        err.path,
        err.kind,
        err.detail,
        str(err),
    )


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
        (b"GIF89a\x10\x00", "GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"BM" + bytes(12) + b"\x28\x00\x00\x00", "BMP"),
        (b"II*\x00\x08\x00", "TIFF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif", "AVIF"),
        (b"%PDF-1.7\n", "PDF"),
        (b"PK\x03\x04\x14\x00", "ZIP"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg">', "SVG"),
        (b"\xef\xbb\xbf  <!DOCTYPE html><html>", "HTML"),
        (b"just some notes\n", "TEXT"),
        (b"P6\n64 48\n255\n", "PPM"),
        (b"\x00\x01\x02\x03\x04\x05\x06\x07", None),
        (b"", None),
    ],
)
def test_sniff_format(head, expected):
    assert sniff_format(head) == expected


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".heic", ".avif", ".tif", ".ico"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


# --- the factory itself ------------------------------------------------------------------------


def test_factory_is_deterministic_and_seeded(tmp_path):
    for writer in (factory.write_jpeg, factory.write_png, factory.write_animated_gif):
        a = writer(tmp_path / "a" / writer.__name__, seed=1).read_bytes()
        b = writer(tmp_path / "b" / writer.__name__, seed=1).read_bytes()
        c = writer(tmp_path / "c" / writer.__name__, seed=2).read_bytes()
        assert a == b and a != c


def test_make_class_folder(tmp_path):
    root = factory.make_class_folder(tmp_path / "data", per_class=3, ext=".jpg")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == [f"{c}/{c}_{i}.jpg" for c in ("cat", "dog", "fish") for i in range(3)]
    assert len({(root / f).read_bytes() for f in files}) == 9
    assert all(check_image(root / f).format == "JPEG" for f in files)


def test_a_tiff_whose_second_directory_has_no_width_keeps_its_first_frame():
    """RELIABILITY H3 (found by tests/test_fuzz_server.py): counting the frames of a TIFF whose
    second directory lacks ImageWidth raised Pillow's TypeError("Missing dimensions"), which
    escaped as a 500 from the server. A damaged later frame costs nothing: frame 0 is used."""
    import io
    import struct

    buf = io.BytesIO()
    first, second = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (40, 30))
    first.save(buf, format="TIFF", save_all=True, append_images=[second])
    raw = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", raw, 4)[0]
    nxt = struct.unpack_from("<I", raw, ifd + 2 + 12 * struct.unpack_from("<H", raw, ifd)[0])[0]
    for i in range(struct.unpack_from("<H", raw, nxt)[0]):
        if struct.unpack_from("<H", raw, nxt + 2 + 12 * i)[0] == 256:  # ImageWidth → unknown
            struct.pack_into("<H", raw, nxt + 2 + 12 * i, 65000)
    with pytest.raises(TypeError):  # what Pillow does with it
        _ = Image.open(io.BytesIO(bytes(raw))).n_frames
    image = load_image(io.BytesIO(bytes(raw)))
    assert image.size == (40, 30) and image.getpixel((0, 0)) == (200, 10, 10)
