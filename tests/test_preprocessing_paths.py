"""The three ways an image reaches a model agree pixel for pixel (imgclf.geometry):

(a) the CPU eval transform (torchvision Resize → CenterCrop, `eval_transform(pre)`),
(b) the decode-once image cache's stored square + its centre crop, as the cached eval path
    takes it (`ImageCache.open_or_build(size=pre)` → `BatchAugment(pre).eval`),
(c) the torch-free ONNX preprocessing the server uses (`onnx_preprocess.load_input`).

Each reads the file as training and prediction do (`load_image(..., size_hint=input_size)`), on
real JPEG and PNG files of odd, non-square sizes, one large enough for libjpeg's reduced decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgclf.config import AugmentConfig
from imgclf.data.batch_aug import BatchAugment
from imgclf.data.image_cache import ImageCache
from imgclf.data.images import load_image
from imgclf.data.transforms import eval_transform, resolve_augment
from imgclf.errors import ImgclfError
from imgclf.geometry import (
    Preprocessing,
    center_crop_box,
    check_crop_pct,
    check_interpolation,
    pil_resample,
    resize_side,
    resized_size,
    stored_square_box,
    torch_interpolation,
)
from imgclf.models import Preprocessing as ModelsPreprocessing
from imgclf.predict.onnx_preprocess import load_input, preprocess

import factory as fx

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5,) * 3, (0.5,) * 3)
# (file name, writer, width × height): odd sides, both orientations, one big JPEG (draft decode).
IMAGES = [
    ("wide.jpg", fx.write_jpeg, (301, 199)),
    ("tall.png", fx.write_png, (97, 257)),
    ("odd.png", fx.write_png, (333, 121)),
    ("big.jpg", fx.write_jpeg, (1001, 667)),
]
# The packaged models' contracts (EfficientNet-Lite0 / Lite1), the scratch one, and odd ones.
PREPROCESSINGS = [
    Preprocessing(224, *HALF, "bicubic", 0.875),
    Preprocessing(240, *HALF, "bicubic", 0.882),
    Preprocessing(64, *HALF, "bilinear", 1.0),
    Preprocessing(57, *IMAGENET, "bilinear", 0.9),
    Preprocessing(33, *IMAGENET, "nearest", 0.77),
    # crop_mode squash: both sides resized, so the whole image is in the crop
    Preprocessing(224, *HALF, "bicubic", 0.875, "squash"),
    Preprocessing(57, *IMAGENET, "bilinear", 1.0, "squash"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("paths")
    for i, (name, writer, wh) in enumerate(IMAGES):
        writer(root / "c" / name, size=wh, seed=10 + i)
    return root, [f"c/{name}" for name, _, _ in IMAGES]


def _uint8_chw(x: torch.Tensor, pre: Preprocessing) -> np.ndarray:
    """Undo the normalisation of an eval tensor: the uint8 pixels it was made from."""
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    pixels = ((x * std + mean) * 255).round()
    assert (pixels - (x * std + mean) * 255).abs().max() < 1e-3  # really whole numbers
    return pixels.to(torch.uint8).numpy()


@pytest.mark.parametrize(
    "pre", PREPROCESSINGS, ids=lambda p: f"{p.input_size}-{p.interpolation}-{p.crop_mode}"
)
def test_cpu_transform_cache_and_onnx_give_the_same_pixels(files, tmp_path, pre):
    root, rel = files
    size = pre.input_size
    images = [load_image(root / p, size_hint=size) for p in rel]

    # (a) the CPU eval transform, normalised as training sees it.
    cpu = torch.stack([eval_transform(pre)(im) for im in images])
    cpu_u8 = np.stack([_uint8_chw(x, pre) for x in cpu])
    # Its geometry steps alone (torchvision on the PIL image): the same uint8 pixels.
    steps = eval_transform(pre).transforms[:-1]
    for image, expected in zip(images, cpu_u8, strict=True):
        for step in steps:
            image = step(image)
        assert np.array_equal(np.asarray(image).transpose(2, 0, 1), expected)

    # (b) the cache's stored squares, then the cached eval path (centre crop + normalise).
    cached = ImageCache(tmp_path / "cache").open_or_build(
        root, rel, data_version="v", size=pre, size_hint=size, workers=0
    )
    assert bool(cached.ok.all()) and cached.stored == resize_side(size, pre.crop_pct)
    crop_u8 = cached.eval_crop().permute(0, 3, 1, 2).numpy()
    assert np.array_equal(crop_u8, cpu_u8)
    batch = BatchAugment(resolve_augment(AugmentConfig(preset="none")), pre).eval(cached.images)
    torch.testing.assert_close(batch, cpu, atol=1e-6, rtol=0)

    # (c) ONNX preprocessing from model.json's dict (0..1, not normalised), and from the value.
    onnx = np.stack([load_input(root / p, pre.to_dict()) for p in rel])
    assert onnx.dtype == np.float32 and onnx.shape == (len(rel), 3, size, size)
    onnx_u8 = np.round(onnx * 255).astype(np.uint8)
    assert np.abs(onnx * 255 - onnx_u8).max() < 1e-3
    assert np.array_equal(onnx_u8, cpu_u8)
    assert np.array_equal(np.stack([preprocess(im, pre) for im in images]), onnx)


def test_geometry_numbers():
    # round halves to even, the long side truncates (torchvision's rules)
    assert resize_side(224, 0.875) == 256 and resize_side(240, 0.882) == 272
    assert resize_side(3, 0.4) == 8  # 7.5 → 8 (even)
    assert resize_side(5, 0.4) == 12  # 12.5 → 12 (even)
    assert resized_size(301, 199, 256) == (387, 256)  # 256 × 301 / 199 = 387.2
    assert resized_size(97, 257, 256) == (256, 678)  # 256 × 257 / 97 = 678.3
    assert center_crop_box(387, 256, 224) == (82, 16, 306, 240)  # 81.5 → 82, 16
    assert center_crop_box(5, 9, 2) == (2, 4, 4, 6)  # 1.5 → 2, 3.5 → 4
    # the stored square holds the eval crop at its own centre anchor
    left, top, right, bottom = stored_square_box(387, 256, 224, 256)
    assert (right - left, bottom - top) == (256, 256)
    assert (left + 16, top + 16) == center_crop_box(387, 256, 224)[:2]
    # squashed: both sides to the resize side, and the stored square is the whole image
    assert resized_size(301, 199, 256, "squash") == (256, 256)
    assert stored_square_box(256, 256, 224, 256) == (0, 0, 256, 256)


def test_squash_keeps_the_ends_of_a_wide_image_in_eval_and_training():
    """A 90×30 image, red at both ends: the centre square never shows the red, the squashed
    image always does, at evaluation and in a training crop over the whole (squashed) image."""
    from imgclf.data.transforms import CropFlip

    pixels = np.full((30, 90, 3), 255, np.uint8)
    pixels[:, :10] = pixels[:, -10:] = (255, 0, 0)
    image = Image.fromarray(pixels)

    def red_at_ends(chw: np.ndarray) -> bool:
        return bool((chw[1, :, 0] < 100).all() and (chw[1, :, -1] < 100).all())

    for crop_pct in (1.0, 0.875):  # the crop_pct margin (2 px of 37) leaves some of the red
        pre = Preprocessing(32, *HALF, "bilinear", crop_pct, "squash")
        assert red_at_ends(_uint8_chw(eval_transform(pre)(image), pre))
    center = Preprocessing(32, *HALF, "bilinear", 1.0)
    assert not (_uint8_chw(eval_transform(center)(image), center)[1] < 100).any()
    # scale (1, 1): the whole squashed image, exactly the squashed resize
    torch.manual_seed(0)
    whole = CropFlip(32, (1.0, 1.0), crop_mode="squash", interpolation="bilinear")(image)
    resized = image.resize((32, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(whole), np.asarray(resized))
    torch.manual_seed(0)
    part = CropFlip(32, (1.0, 1.0), interpolation="bilinear")(image)
    assert not (np.asarray(part)[:, :, 1] < 100).any()  # the plain crop: the middle third


def test_one_validation_and_one_default():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ImgclfError, match=r"crop_pct must be in \(0, 1\]"):
            check_crop_pct(bad)
        with pytest.raises(ImgclfError, match=r"crop_pct must be in \(0, 1\]"):
            Preprocessing(32, *HALF, crop_pct=bad)
    for call in (
        lambda: check_interpolation("lanczos"),
        lambda: pil_resample("lanczos"),
        lambda: torch_interpolation("lanczos"),
        lambda: Preprocessing(32, *HALF, interpolation="lanczos"),
        lambda: eval_transform(32, *HALF, "lanczos"),
        lambda: preprocess(Image.new("RGB", (8, 8)), {"input_size": 8, "interpolation": "lanczos"}),
    ):
        with pytest.raises(ImgclfError, match="unknown interpolation 'lanczos'; choose one of "):
            call()
    # models re-exports the one contract; model.json without the keys means bicubic, 0.875
    assert ModelsPreprocessing is Preprocessing
    pre = Preprocessing.from_dict({"input_size": 32, "mean": HALF[0], "std": HALF[1]})
    assert (pre.interpolation, pre.crop_pct, pre.crop_mode) == ("bicubic", 0.875, "center")
    assert Preprocessing(32, *HALF).geometry == (32, "bicubic", 0.875, "center")
    squash = Preprocessing(32, *HALF, crop_mode="squash")
    assert Preprocessing.from_dict(squash.to_dict()) == squash
    for call in (
        lambda: Preprocessing(32, *HALF, crop_mode="border"),
        lambda: preprocess(Image.new("RGB", (8, 8)), {"input_size": 8, "crop_mode": "border"}),
    ):
        with pytest.raises(ImgclfError, match="unknown crop_mode 'border'; choose one of "):
            call()


def test_geometry_imports_no_torch():
    import os
    import subprocess
    import sys

    import imgclf

    src = str(Path(imgclf.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, imgclf.geometry, imgclf.predict.onnx_preprocess, imgclf.serve.backend; "
        "sys.exit('torch' in sys.modules or 'torchvision' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False, env=env).returncode == 0
