import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from imgclf.config import AugmentConfig
from imgclf.data.transforms import (
    PRESETS,
    ColourJitter,
    ToNormalised,
    apply_colour_steps,
    colour_steps,
    eval_transform,
    resolve_augment,
    train_transform,
)
from imgclf.errors import ImgclfError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _noise_image(w=300, h=200, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _coordinate_image(side=256):
    """Red = x, green = y: a crop's position and size can be read back from its pixels."""
    a = np.zeros((side, side, 3), np.uint8)
    a[..., 0] = np.arange(side)[None, :]
    a[..., 1] = np.arange(side)[:, None]
    return Image.fromarray(a)


def _normalised(rgb):
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, MEAN, STD, strict=True)])


def _close(a, b):
    # One grey level is ≥ 0.017 after normalisation; 1e-5 only absorbs float rounding.
    return torch.allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("size", [32, 224])
def test_every_preset_gives_normalised_float_tensors(preset, size):
    torch.manual_seed(0)
    t = train_transform(AugmentConfig(preset=preset), size, MEAN, STD)
    out = t(_coordinate_image())
    assert type(out) is torch.Tensor
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    # Normalised: inside the image of [0, 1] under (x - mean) / std, not raw [0, 1] or [0, 255].
    low, high = _normalised((0, 0, 0)).min().item(), _normalised((255, 255, 255)).max().item()
    assert low - 1e-5 <= out.min() < -1 and out.max() <= high + 1e-5
    assert out.std() > 0.2
    assert eval_transform(size, MEAN, STD)(_noise_image()).shape == (3, size, size)


def test_none_preset_is_deterministic_and_equals_eval():
    img = _noise_image()
    t = train_transform(AugmentConfig(preset="none"), 64, MEAN, STD, interpolation="bicubic")
    expected = eval_transform(64, MEAN, STD, interpolation="bicubic")(img)
    for _ in range(3):
        assert torch.equal(t(img), expected)


def test_eval_resizes_short_side_by_crop_pct_then_center_crops():
    img = _coordinate_image()  # 256 × 256; crop_pct 0.5 → resize to 128, keep the middle 64
    out = eval_transform(64, (0, 0, 0), (1, 1, 1), crop_pct=0.5)(img) * 255
    assert out[0, 0, 0].item() == pytest.approx(64.5, abs=1.5)
    assert out[0, 0, -1].item() == pytest.approx(190.5, abs=1.5)
    full = eval_transform(64, (0, 0, 0), (1, 1, 1), crop_pct=1.0)(img) * 255
    assert full[0, 0, 0].item() < 3 and full[0, 0, -1].item() > 252
    with pytest.raises(ImgclfError, match="crop_pct"):
        eval_transform(64, MEAN, STD, crop_pct=1.5)
    with pytest.raises(ImgclfError, match="bilinear, bicubic, nearest"):
        eval_transform(64, MEAN, STD, interpolation="lanczos4")


def test_resolve_augment_explicit_fields_override_the_preset():
    assert resolve_augment(AugmentConfig(preset="strong")) == {
        "preset": "strong",
        "scale": [0.25, 1.0],
        "hflip": 0.5,
        "vflip": 0.0,
        "rotation": 20.0,
        "shear": 10.0,
        "translate": 0.1,
        "color_jitter": 0.4,
        "erasing": 0.25,
        "noise": 0.03,
        "fill": "black",
    }
    r = resolve_augment(
        AugmentConfig(preset="default", rotation=0, hflip=0, vflip=0.3, scale=(0.5, 0.8))
    )
    assert (r["rotation"], r["hflip"], r["vflip"], r["scale"]) == (0.0, 0.0, 0.3, [0.5, 0.8])
    assert r["color_jitter"] == 0.2  # untouched preset value
    assert resolve_augment(AugmentConfig(preset="none"))["scale"] is None
    with pytest.raises(ImgclfError, match="scale"):
        resolve_augment(AugmentConfig(scale=(0.9, 0.2)))


def test_rotation_fill_black_keeps_a_pure_black_background():
    black = Image.new("RGB", (32, 32))
    aug = AugmentConfig(preset="none", rotation=45, fill="black")
    t = train_transform(aug, 32, MEAN, STD, crop_pct=1.0)
    expected = _normalised((0, 0, 0))[:, None, None].expand(3, 32, 32)
    torch.manual_seed(0)
    for _ in range(10):
        assert _close(t(black), expected)


def test_rotation_fill_white_gives_white_corners():
    aug = AugmentConfig(preset="none", rotation=45, fill="white")
    t = train_transform(aug, 32, MEAN, STD, crop_pct=1.0)
    white = _normalised((255, 255, 255))
    torch.manual_seed(0)
    corners_white = 0
    for _ in range(20):
        out = t(Image.new("RGB", (32, 32)))
        corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        corners_white += _close(corners, white[:, None].expand(3, 4))
        assert _close(out[:, 16, 16], _normalised((0, 0, 0)))  # the centre stays black
    assert corners_white >= 16  # only angles within a few degrees of 0 leave a corner black


def test_fill_mean_uses_the_dataset_mean_before_normalisation():
    aug = AugmentConfig(preset="none", rotation=45, fill="mean")
    t = train_transform(aug, 32, MEAN, STD, crop_pct=1.0)
    torch.manual_seed(1)
    values = [t(Image.new("RGB", (32, 32)))[:, 0, 0] for _ in range(10)]
    mean_fill = _normalised([round(255 * m) for m in MEAN])
    assert sum(_close(v, mean_fill) for v in values) >= 8
    assert mean_fill.abs().max() < 0.01  # ≈ 0 after normalisation


def test_hflip_one_mirrors_exactly():
    img = _noise_image(32, 32)
    base = train_transform(AugmentConfig(preset="none"), 32, MEAN, STD, crop_pct=1.0)(img)
    t = train_transform(AugmentConfig(preset="none", hflip=1.0), 32, MEAN, STD, crop_pct=1.0)
    assert torch.equal(t(img), base.flip(-1))
    assert not torch.equal(base, base.flip(-1))


def test_flip_rate_matches_p():
    img = _noise_image(16, 16)
    base = train_transform(AugmentConfig(preset="none"), 16, MEAN, STD, crop_pct=1.0)(img)
    t = train_transform(AugmentConfig(preset="none", hflip=0.3), 16, MEAN, STD, crop_pct=1.0)
    torch.manual_seed(0)
    flips = 0
    for _ in range(600):
        out = t(img)
        flipped = torch.equal(out, base.flip(-1))
        assert flipped or torch.equal(out, base)
        flips += flipped
    assert abs(flips / 600 - 0.3) < 0.06  # ≈ 3 standard deviations


def test_random_resized_crop_area_stays_in_the_configured_range():
    img = _coordinate_image()
    aug = AugmentConfig(preset="light", hflip=0, scale=(0.3, 0.7))
    t = train_transform(aug, 32, (0, 0, 0), (1, 1, 1))
    torch.manual_seed(0)
    areas = []
    for _ in range(150):
        out = t(img) * 255
        # The side spanned by the first and last output pixel centres is (n-1)/n of the crop's.
        w = (out[0, :, -1].mean() - out[0, :, 0].mean()) * 32 / 31 + 1
        h = (out[1, -1, :].mean() - out[1, 0, :].mean()) * 32 / 31 + 1
        areas.append((w * h / 256**2).item())
    assert 0.3 - 0.02 <= min(areas) < 0.4
    assert 0.6 < max(areas) <= 0.7 + 0.02


def test_pipeline_pickles_for_dataloader_workers():
    aug = AugmentConfig(preset="strong", fill="mean", vflip=0.2)
    t = train_transform(aug, 32, MEAN, STD, interpolation="bicubic")
    clone = pickle.loads(pickle.dumps(t))
    img = _noise_image()
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    assert torch.equal(clone(img), a)
    assert pickle.loads(pickle.dumps(eval_transform(32, MEAN, STD)))(img).shape == (3, 32, 32)


def test_strong_pipeline_order_geometric_then_colour_then_tensor_ops():
    t = train_transform(AugmentConfig(preset="strong", fill="mean"), 32, MEAN, STD)
    names = [type(step).__name__ for step in t.transforms]
    assert names == [
        "CropFlip",  # random resized crop + flips, one PIL resampling
        "ToNormalised",  # float → affine → colour jitter → noise → Normalize, at the output size
        "RandomErasing",
        "ToPureTensor",
    ]
    tail = t.transforms[1]
    assert tail.jitter is not None and tail.jitter.j == 0.4 and tail.noise == 0.03
    expected_fill = torch.tensor([round(255 * m) / 255 for m in MEAN])
    assert torch.allclose(tail.affine.fill.flatten(), expected_fill)  # before Normalize


def test_to_normalised_computes_torchvisions_values_exactly():
    """The lean tail (no v2 dispatch) against ToImage → ToDtype → GaussianNoise → Normalize,
    bit for bit, noise drawn from the same seed."""
    img = _noise_image(37, 23)
    reference = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )
    assert torch.equal(ToNormalised(MEAN, STD)(img), reference(img).as_subclass(torch.Tensor))
    noisy = v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.GaussianNoise(sigma=0.05, clip=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    torch.manual_seed(5)
    ours = ToNormalised(MEAN, STD, noise=0.05)(img)
    torch.manual_seed(5)
    assert torch.equal(ours, noisy(img).as_subclass(torch.Tensor))
    gray = img.convert("L")  # any mode is taken as RGB, like v2.ToImage after convert
    assert torch.equal(ToNormalised(MEAN, STD)(gray), ToNormalised(MEAN, STD)(gray.convert("RGB")))


def test_colour_jitter_draws_as_torchvision_and_blends_as_torchvision():
    """Same factors and order as ColorJitter(j, j, j, j/4) for a seed; brightness, contrast
    and saturation applied as torchvision's float kernels; hue a YIQ rotation (the batch
    path's), which keeps luma and turns red towards yellow for a positive factor."""
    jitter = ColourJitter(0.4)
    for seed in range(5):
        torch.manual_seed(seed)
        order, factors = jitter.draw()
        torch.manual_seed(seed)
        params = v2.ColorJitter(0.4, 0.4, 0.4, 0.1).make_params([])
        assert order.tolist() == params["fn_idx"].tolist()
        names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        assert factors == [params[n] for n in names]
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = jitter(x.clone())
    torch.manual_seed(1)
    order, factors = jitter.draw()
    expected = x.clone()
    steps = {0: F.adjust_brightness, 1: F.adjust_contrast, 2: F.adjust_saturation}
    for op in order.tolist():
        if op == 3:
            # Hue: rebuild its effect from the shared rotation, then compare all together.
            hue_only = colour_steps(
                np.array([[1.0, 1.0, 1.0, factors[3]]]), np.array([[3, 0, 1, 2]])
            )
            expected = apply_colour_steps(
                expected[None], torch.from_numpy(hue_only.astype(np.float32)), [False] * 4
            )[0]
        else:
            expected = steps[op](expected, factors[op])
    assert torch.allclose(out, expected, atol=1e-5)
    red = torch.tensor([0.6, 0.4, 0.4]).view(3, 1, 1).expand(3, 4, 4)
    turn = colour_steps(np.array([[1.0, 1.0, 1.0, 1 / 6]]), np.array([[3, 0, 1, 2]]))
    r, g, b = apply_colour_steps(red[None], torch.from_numpy(turn.astype(np.float32)),
                                 [False] * 4)[0, :, 0, 0].tolist()  # fmt: skip
    assert r > b + 0.1 and g > b + 0.1
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert abs(luma @ torch.tensor([r, g, b]) - luma @ torch.tensor([0.6, 0.4, 0.4])) < 1e-3


@pytest.mark.parametrize("fill", [0, 255])
def test_tensor_affine_draws_as_random_affine_and_matches_torchvisions_kernel(fill):
    """Same draws as RandomAffine for a seed; the same pixels as torchvision's bilinear tensor
    affine with the fill composited by coverage (the batch path's rule), up to float rounding;
    outside the image exactly the fill."""
    from imgclf.data.transforms import TensorAffine

    x = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1))
    affine = TensorAffine(20.0, 0.1, 10.0, fill, "bilinear")
    reference = v2.RandomAffine(degrees=20.0, translate=(0.1, 0.1), shear=(-10, 10, -10, 10))
    for seed in range(4):
        torch.manual_seed(seed)
        out = affine(x)
        torch.manual_seed(seed)
        p = reference.make_params([x])
        kw = dict(p, interpolation=F.InterpolationMode.BILINEAR)
        coverage = F.affine(torch.ones(1, 40, 40), **kw)
        expected = F.affine(x, **kw) + (1 - coverage) * fill / 255
        assert (out - expected).abs().max() < 1e-4, seed
        outside = (coverage[0] == 0).expand(3, -1, -1)
        assert torch.equal(out[outside], torch.full_like(out[outside], fill / 255))


def test_crop_flip_draws_and_resamples_as_torchvisions_three_transforms():
    """CropFlip against RandomResizedCrop → RandomHorizontalFlip → RandomVerticalFlip under the
    same seed: the same box and flips (same draws in the same order), the same pixels up to
    PIL resampling from the box directly instead of from a cropped copy."""
    from imgclf.data.transforms import CropFlip

    img = _noise_image(300, 200).filter(ImageFilter.GaussianBlur(2))
    ours = CropFlip(48, (0.25, 1.0), hflip=0.5, vflip=0.5, interpolation="bilinear")
    reference = v2.Compose(
        [
            v2.RandomResizedCrop(48, scale=(0.25, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomVerticalFlip(0.5),
        ]
    )
    for seed in range(8):
        torch.manual_seed(seed)
        a = np.asarray(ours(img), dtype=np.float64)
        torch.manual_seed(seed)
        b = np.asarray(reference(img), dtype=np.float64)
        assert np.abs(a - b).mean() < 1.0 and np.abs(a - b)[4:-4, 4:-4].max() < 4, seed
        # the same number of draws: the generator is left where torchvision leaves it
        torch.manual_seed(seed)
        ours(img)
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        reference(img)
        assert torch.equal(after_ours, torch.rand(1)), seed
