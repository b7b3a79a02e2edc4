import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from imgclf.config import TrainConfig
from imgclf.errors import ImgclfError
from imgclf.train.losses import FocalLoss, batch_mixer, build_loss, class_weights


def _batch(n=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    target = torch.randint(0, c, (n,), generator=g)
    soft = torch.softmax(torch.randn(n, c, generator=g), dim=1)
    return logits, target, soft


def test_class_weights_are_inverse_frequency_with_mean_one():
    w = class_weights([10, 30, 60])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([2.0, 2 / 3, 1 / 3])


def test_class_weights_zero_count_gets_zero_and_a_warning():
    with pytest.warns(UserWarning, match=r"\[1\]"):
        w = class_weights([10, 0, 40])
    assert w.tolist() == pytest.approx([1.6, 0.0, 0.4])
    with pytest.raises(ImgclfError, match="all zero"):
        class_weights([0, 0])
    with pytest.raises(ImgclfError, match="≥ 0"):
        class_weights([3, -1])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("soft", [False, True])
def test_focal_is_cross_entropy_at_gamma_zero(weighted, smoothing, soft):
    logits, target, soft_target = _batch()
    t = soft_target if soft else target
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.2]) if weighted else None
    focal = FocalLoss(0.0, weight=weight, label_smoothing=smoothing)(logits, t)
    ce = F.cross_entropy(logits, t, weight=weight, label_smoothing=smoothing)
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)


def test_focal_down_weights_easy_examples():
    target = torch.arange(4)
    easy = torch.eye(4) * 6  # p(correct) ≈ 0.99
    hard = torch.zeros(4, 4)  # p(correct) = 0.25
    fl, ce = FocalLoss(2.0), nn.CrossEntropyLoss()
    assert fl(easy, target) < 0.01 * ce(easy, target)
    assert fl(hard, target).item() == pytest.approx(0.75**2 * ce(hard, target).item(), rel=1e-6)


def test_focal_soft_one_hot_equals_index_targets_and_gradients_are_finite():
    logits, target, _ = _batch()
    fl = FocalLoss(2.0)
    one_hot = F.one_hot(target, 5).float()
    assert fl(logits, one_hot).item() == pytest.approx(fl(logits, target).item(), rel=1e-6)
    confident = torch.tensor([[60.0, 0.0, 0.0]], requires_grad=True)
    FocalLoss(0.5)(confident, torch.tensor([0])).backward()
    assert torch.isfinite(confident.grad).all()


@pytest.mark.parametrize(
    ("imbalance", "cls", "weighted"),
    [
        ("none", nn.CrossEntropyLoss, False),
        ("weighted_loss", nn.CrossEntropyLoss, True),
        ("sampler", nn.CrossEntropyLoss, False),
        ("focal", FocalLoss, False),
    ],
)
def test_build_loss_per_imbalance_option(imbalance, cls, weighted):
    train = TrainConfig(imbalance=imbalance, label_smoothing=0.1, focal_gamma=1.5)
    counts = [10, 20, 20, 40, 10]
    loss = build_loss(train, counts)
    assert type(loss) is cls
    assert loss.label_smoothing == 0.1
    if weighted:
        assert torch.equal(loss.weight, class_weights(counts))
    else:
        assert loss.weight is None
    if cls is FocalLoss:
        assert loss.gamma == 1.5
    logits, target, soft = _batch()
    for t in (target, soft):
        value = loss(logits, t)
        assert value.ndim == 0 and torch.isfinite(value) and value > 0


def test_weighted_loss_needs_counts():
    with pytest.raises(ImgclfError, match="class counts"):
        build_loss(TrainConfig(imbalance="weighted_loss"), None)


def test_batch_mixer_none_when_off_and_kind_per_setting():
    assert batch_mixer(TrainConfig(), 5) is None
    assert isinstance(batch_mixer(TrainConfig(mixup=0.2), 5), v2.MixUp)
    assert isinstance(batch_mixer(TrainConfig(cutmix=1.0), 5), v2.CutMix)
    assert isinstance(batch_mixer(TrainConfig(mixup=0.2, cutmix=1.0), 5), v2.RandomChoice)


@pytest.mark.parametrize(
    "setting", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 1.0, "cutmix": 1.0}]
)
def test_batch_mixer_produces_soft_targets_summing_to_one(setting):
    torch.manual_seed(0)
    mixer = batch_mixer(TrainConfig(**setting), 4)
    images = torch.rand(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, soft = mixer(images, labels)
    assert mixed.shape == images.shape and not torch.equal(mixed, images)
    assert soft.shape == (8, 4) and soft.dtype == torch.float32
    assert torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert (soft.max(dim=1).values < 1).any()  # really mixed, not one-hot
    assert build_loss(TrainConfig(), None)(torch.randn(8, 4), soft) > 0
