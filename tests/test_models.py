"""Model zoo: builders, packaged/file/hub weights, heads, freeze policies, groups, accounting."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_sample_image
from torch import nn

from imgclf.config import HeadConfig, ModelConfig, ScratchConfig, StageConfig
from imgclf.errors import ImgclfError
from imgclf.models import (
    SCRATCH_PRESETS,
    Head,
    Preprocessing,
    apply_trainable,
    build_model,
    count_parameters,
    list_models,
    model_from_spec,
    model_size_mb,
    optimizer_state_numel,
    packaged_preprocessing,
    packaged_state_dict,
    param_groups,
    registry,
    set_train_mode,
    trainable_blocks,
)
from imgclf.models.scratch import block_widths

TIMM_SAMPLE = [
    "resnet18",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "convnext_atto",
    "vit_tiny_patch16_224",
]
POOLS = ["avg", "max", "avgmax", "flatten"]
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_worker():
    """Tiny tensors: with xdist, one intra-op thread per worker beats oversubscribing cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, classes: int = 3, size: int | None = SIZE, **kw) -> nn.Module:
    model, _ = build_model(ModelConfig(name=name, pretrained="none", **kw), classes, size)
    return model


def images(n: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_scratch(**head) -> nn.Module:
    cfg = ScratchConfig(blocks=2, width=4, max_width=8)
    model, _ = build_model(
        ModelConfig(name="scratch_cnn", pretrained="none", scratch=cfg, head=HeadConfig(**head)),
        3,
        16,
    )
    return model


# --- packaged weights ------------------------------------------------------------------------


def preprocess(array, prep: Preprocessing) -> torch.Tensor:
    """Resize the short side to size / crop_pct, center crop, normalize: the eval transform."""
    img = Image.fromarray(array)
    scale = math.floor(prep.input_size / prep.crop_pct)
    w, h = img.size
    ratio = scale / min(w, h)
    img = img.resize((round(w * ratio), round(h * ratio)), Image.Resampling.BICUBIC)
    left, top = (img.size[0] - prep.input_size) // 2, (img.size[1] - prep.input_size) // 2
    img = img.crop((left, top, left + prep.input_size, top + prep.input_size))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(prep.mean)[:, None, None], torch.tensor(prep.std)[:, None, None]
    return ((x - mean) / std)[None]


def test_packaged_lite0_classifies_real_photos():
    model, prep = build_model(ModelConfig(name="efficientnet_lite0"), 1000)
    assert prep == Preprocessing(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    assert model.spec["architecture"] == "tf_efficientnet_lite0"
    model.eval()
    with torch.no_grad():
        china = model(preprocess(load_sample_image("china.jpg"), prep)).argmax(1).item()
        flower = model(preprocess(load_sample_image("flower.jpg"), prep)).argmax(1).item()
    assert (china, flower) == (698, 985)  # palace, daisy


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_packaged_lite1_lite2_load_into_backbone(name, size):
    assert packaged_preprocessing(name).input_size == size
    state = packaged_state_dict(name)
    assert "classifier.weight" in state and state["classifier.weight"].shape == (1000, 1280)
    model, prep = build_model(ModelConfig(name=name), 5, image_size=64)
    assert prep.input_size == 64 and prep.mean == (0.5,) * 3  # image_size overrides size only
    for key, value in model.backbone.state_dict().items():
        assert value.shape == state[key].shape
        assert torch.equal(value, state[key])


def test_packaged_for_other_architecture_lists_alternatives():
    with pytest.raises(ImgclfError) as err:
        build_model(ModelConfig(name="resnet18", pretrained="packaged"), 3)
    msg = str(err.value)
    assert "efficientnet_lite0" in msg and "file:PATH" in msg and "hub" in msg


def test_scratch_ignores_default_packaged_and_refuses_hub():
    model, prep = build_model(ModelConfig(name="scratch_small"), 3)
    assert model.spec["pretrained"] == "none" and prep.input_size == 64
    with pytest.raises(ImgclfError, match="pretrained: none"):
        build_model(ModelConfig(name="scratch_small", pretrained="hub"), 3)


# --- forward + one training step over the zoo ----------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("name", [*SCRATCH_PRESETS, *TIMM_SAMPLE])
def test_forward_and_sgd_step_train_only_trainable(name, pool):
    model = build(name, head=HeadConfig(pool=pool, hidden=[8], dropout=0.1))
    apply_trainable(model, {"last_blocks": 1})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(param_groups(model, StageConfig(lr=0.5, weight_decay=0)), lr=0.5)
    set_train_mode(model, True)
    # 4 images: with 2, a BatchNorm over 1×1 maps outputs ±1 whatever its input (zero grads).
    logits = model(images(4))
    assert logits.shape == (4, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 2, 1, 0])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    for n, p in model.named_parameters():
        # Some trainable tensors legitimately get zero gradients at init (timm zero-inits the
        # last BN of ResNet blocks; ConvNeXt's layer scale is 1e-6), so "gets a gradient".
        assert (p.grad is not None) == p.requires_grad, n
        assert p.requires_grad or n not in changed, n
    assert {n for n in changed if n.startswith("head.")} == {
        n for n, _ in model.named_parameters() if n.startswith("head.")
    }
    assert any(n.startswith("backbone.") for n in changed)
    assert not all(p.requires_grad for p in model.backbone.parameters())


def test_fixed_size_and_token_backbones_record_their_layout():
    vit = build("vit_tiny_patch16_224")
    assert vit.spec["feature_format"] == "NLC" and vit.spec["fixed_input_size"]
    assert vit.forward_features(images()).shape == (2, 192, 2, 2)
    mobile = build("mobilenetv3_small_050")
    # conv_head only runs after timm's own pooling: replaced, so it is not counted.
    assert mobile.spec["removed_modules"] == ["conv_head"]


# --- heads -----------------------------------------------------------------------------------


def test_head_pools_and_classify_compose():
    fmap = torch.randn(2, 6, 3, 3)
    dims = {"avg": 6, "max": 6, "avgmax": 12, "flatten": 54}
    for pool, dim in dims.items():
        head = Head(6, 4, HeadConfig(pool=pool, hidden=[5], activation="gelu"), (3, 3))
        assert head.pool(fmap).shape == (2, dim)
        assert torch.equal(head(fmap), head.classify(head.pool(fmap)))
    with pytest.raises(ImgclfError, match="fmap_size"):
        Head(6, 4, HeadConfig(pool="flatten"), None)
    with pytest.raises(ImgclfError, match="avg"):
        Head(6, 4, HeadConfig(pool="flatten"), (3, 3)).pool(torch.randn(1, 6, 4, 4))
    dropped = Head(6, 4, HeadConfig(dropout=0.5), None)
    assert isinstance(dropped.pre_logits[-1], nn.Dropout)


# --- freeze policies -------------------------------------------------------------------------


def test_trainable_blocks_follow_the_backbone_structure():
    names = [n for n, _ in trainable_blocks(build("efficientnet_lite0"))]
    assert names == ["conv_stem", "bn1", *[f"blocks.{i}" for i in range(7)], "conv_head", "bn2"]
    names = [n for n, _ in trainable_blocks(build("resnet18"))]
    assert names == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    names = [n for n, _ in trainable_blocks(build("scratch_cnn"))]
    assert names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]


@pytest.mark.parametrize(
    "policy,expected",
    [
        ("head", []),
        ("all", [0, 1, 2, 3]),
        ({"last_blocks": 2}, [2, 3]),
        ({"last_fraction": 0.5}, [2, 3]),
        ({"last_fraction": 0.3}, [2, 3]),
        ({"last_fraction": 0.25}, [3]),
        ({"from_layer": "blocks.1"}, [1, 2, 3]),
    ],
)
def test_trainable_policies_set_requires_grad(policy, expected):
    model = build("scratch_cnn")
    summary = apply_trainable(model, policy)
    assert all(p.requires_grad for p in model.head.parameters())
    for i, (_, block) in enumerate(trainable_blocks(model)):
        assert all(p.requires_grad == (i in expected) for p in block.parameters())
    assert summary["trainable_blocks"] == [f"blocks.{i}" for i in expected] + ["head"]
    counts = count_parameters(model)
    assert (summary["trainable"], summary["frozen"]) == (
        counts["trainable"],
        counts["non_trainable"],
    )


def test_unknown_from_layer_lists_the_blocks():
    with pytest.raises(ImgclfError, match=r"blocks\.0, blocks\.1"):
        apply_trainable(build("scratch_cnn"), {"from_layer": "block.9"})


def test_frozen_batchnorm_keeps_running_stats():
    model = build("scratch_small")
    apply_trainable(model, {"last_blocks": 1})
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    set_train_mode(model, True)
    model(images(4))
    changed = [not torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True)]
    trainable = [m.weight.requires_grad for m in bns]
    assert changed == trainable and any(trainable) and not all(trainable)
    set_train_mode(model, True, bn="train")
    model(images(4))
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
    frozen_stats = [m.running_mean.clone() for m in bns]
    set_train_mode(model, True, bn="eval")  # trainable or not, every BatchNorm keeps its stats
    model(images(4))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(frozen_stats, bns, strict=True))
    assert model.training and not any(m.training for m in bns)


# --- parameter groups ------------------------------------------------------------------------


def test_param_groups_backbone_lr_mult_and_no_decay():
    model = build("scratch_cnn")
    groups = param_groups(model, StageConfig(lr=0.1, backbone_lr_mult=0.1, weight_decay=0.05))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"}
    assert by_name["head/decay"]["lr"] == 0.1
    assert by_name["backbone/decay"]["lr"] == pytest.approx(0.01)
    assert by_name["backbone/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in by_name["backbone/no_decay"]["params"])
    assert by_name["head/decay"]["weight_decay"] == 0.05
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))
    apply_trainable(model, "head")
    assert {g["name"] for g in param_groups(model, StageConfig())} == {
        "head/decay",
        "head/no_decay",
    }


def test_param_groups_layer_decay():
    model = build("scratch_cnn")
    groups = param_groups(model, StageConfig(lr=1.0, layer_decay=0.5))
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs == {
        "backbone.blocks.0": 0.5**4,
        "backbone.blocks.1": 0.5**3,
        "backbone.blocks.2": 0.5**2,
        "backbone.blocks.3": 0.5,
        "head": 1.0,
    }


# --- file: weights ---------------------------------------------------------------------------


def _file_cfg(path: Path, name: str = "scratch_small") -> ModelConfig:
    return ModelConfig(name=name, pretrained=f"file:{path}")


def _assert_same_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_file_state_dict_and_safetensors(tmp_path):
    source = build("scratch_small").backbone.state_dict()
    torch.save(source, tmp_path / "w.pth")
    save_file(source, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "w.pth", tmp_path / "w.safetensors"):
        model, _ = build_model(_file_cfg(path), 3)
        _assert_same_backbone(model, source)
        assert model.spec["pretrained"] == "file"


def test_file_nested_and_prefixed(tmp_path):
    source = build("scratch_small").backbone.state_dict()
    nested = {"epoch": 3, "state_dict": {f"module.model.{k}": v for k, v in source.items()}}
    torch.save(nested, tmp_path / "ckpt.pt")
    model, _ = build_model(_file_cfg(tmp_path / "ckpt.pt"), 3)
    _assert_same_backbone(model, source)
    torch.save({"model": {f"model.{k}": v for k, v in source.items()}}, tmp_path / "m.bin")
    _assert_same_backbone(build_model(_file_cfg(tmp_path / "m.bin"), 3)[0], source)
    whole = build("scratch_small", classes=9)  # an imgclf model: backbone.* and head.* keys
    torch.save(whole.state_dict(), tmp_path / "run.pth")
    _assert_same_backbone(
        build_model(_file_cfg(tmp_path / "run.pth"), 3)[0], whole.backbone.state_dict()
    )


def test_file_timm_checkpoint_drops_its_classifier(tmp_path):
    full = timm.create_model("resnet18", num_classes=7).state_dict()
    torch.save(full, tmp_path / "r18.pth")
    model, _ = build_model(_file_cfg(tmp_path / "r18.pth", "resnet18"), 3, SIZE)
    _assert_same_backbone(model, full)


def test_file_mismatch_names_file_and_keys(tmp_path):
    torch.save(build("scratch_wide").backbone.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ImgclfError) as err:
        build_model(_file_cfg(tmp_path / "wide.pth"), 3)
    msg = str(err.value)
    assert "wide.pth" in msg and "blocks.0.0.weight" in msg and "(64, 3, 3, 3)" in msg
    assert "unexpected blocks.3" in msg


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_file_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv.weight": torch.zeros(1), "x": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ImgclfError) as err:
        build_model(_file_cfg(tmp_path / "evil.pth"), 3)
    assert "evil.pth" in str(err.value) and "state_dict" in str(err.value)
    assert not marker.exists()


def test_file_missing_path():
    with pytest.raises(ImgclfError, match="does not exist"):
        build_model(_file_cfg(Path("nope.pth")), 3)


# --- hub -------------------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_offline_fails_at_once(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")

    def no_network(*args, **kwargs):
        raise AssertionError("hub weights were requested while offline")

    monkeypatch.setattr("imgclf.models.pretrained.timm.create_model", no_network)
    start = time.perf_counter()
    with pytest.raises(ImgclfError) as err:
        build_model(ModelConfig(name="resnet18", pretrained="hub"), 3)
    assert time.perf_counter() - start < 2
    msg = str(err.value)
    assert var in msg and "pretrained: packaged" in msg and "pretrained: file:PATH" in msg


def _online(monkeypatch):
    """No offline variable set and the connectivity probe answering: the hub path is tried."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("imgclf.models.pretrained.hub_unreachable", lambda *a, **k: None)


@pytest.mark.parametrize("network", ["refused", "silent"])
def test_hub_without_network_fails_at_once(monkeypatch, network):
    # No offline variable: the probe alone must stop it, never huggingface_hub's ~50 s retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr("imgclf.models.pretrained.HUB_PROBE_TIMEOUT", 0.3)

    def connect(address, timeout=None):
        if network == "silent":
            time.sleep(30)  # a black-holed network: no answer at all
        raise OSError("Network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted without network")

    monkeypatch.setattr("imgclf.models.pretrained.socket.create_connection", connect)
    monkeypatch.setattr("imgclf.models.pretrained.timm.create_model", no_download)
    start = time.perf_counter()
    with pytest.raises(ImgclfError) as err:
        build_model(ModelConfig(name="resnet18", pretrained="hub"), 3)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "no network" in msg and "huggingface.co:443" in msg
    assert "pretrained: packaged" in msg and "pretrained: file:PATH" in msg


def test_hub_download_error_gives_the_same_advice(monkeypatch):
    _online(monkeypatch)

    def unreachable(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr("imgclf.models.pretrained.timm.create_model", unreachable)
    with pytest.raises(ImgclfError, match="connection refused") as err:
        build_model(ModelConfig(name="resnet18", pretrained="hub"), 3)
    assert "pretrained: packaged" in str(err.value) and "file:PATH" in str(err.value)


def test_hub_online_builds_a_headless_backbone(monkeypatch):
    _online(monkeypatch)
    calls = []
    real = timm.create_model

    def fake_download(name, pretrained=False, **kwargs):
        calls.append((pretrained, kwargs))
        return real(name, pretrained=False, **kwargs)  # stands in for the downloaded weights

    monkeypatch.setattr("imgclf.models.pretrained.timm.create_model", fake_download)
    model, prep = build_model(ModelConfig(name="resnet18", pretrained="hub"), 3, SIZE)
    assert calls[0] == (True, {"num_classes": 0, "global_pool": ""})
    assert model(images(2)).shape == (2, 3) and model.spec["pretrained"] == "hub"
    assert prep.mean == (0.485, 0.456, 0.406)


# --- names, specs, accounting ----------------------------------------------------------------


def test_list_models_presets_first_and_filter():
    names = list_models()
    assert names[: len(SCRATCH_PRESETS)] == list(SCRATCH_PRESETS)
    assert "resnet18" in names and len(names) > 500
    lite = list_models("*lite*")
    assert "efficientnet_lite0" in lite and "tf_efficientnet_lite2" in lite
    assert all("lite" in n for n in lite)


@pytest.mark.parametrize(
    "typo,suggestion",
    [("efficentnet_lite0", "efficientnet_lite0"), ("scratch_smal", "scratch_small")],
)
def test_unknown_model_suggests_close_names(typo, suggestion):
    with pytest.raises(ImgclfError, match=f"did you mean.*{suggestion}"):
        build_model(ModelConfig(name=typo), 3)


@pytest.mark.parametrize(
    "name,pretrained,head",
    [
        ("efficientnet_lite0", "packaged", HeadConfig(pool="avgmax", hidden=[16])),
        ("mobilenetv3_small_050", "none", HeadConfig()),
        ("vit_tiny_patch16_224", "none", HeadConfig()),
        ("scratch_vgg4", "none", HeadConfig(pool="flatten")),
    ],
)
def test_model_from_spec_round_trip(tmp_path, monkeypatch, name, pretrained, head):
    cfg = ModelConfig(name=name, pretrained=pretrained, head=head, drop_path=0.0)
    model, _ = build_model(cfg, 4, 64)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(model.spec))

    def forbidden(*args, **kwargs):
        raise AssertionError("model_from_spec must not load weights")

    for fn in ("packaged_state_dict", "read_state_dict", "create_hub_backbone"):
        monkeypatch.setattr(registry, fn, forbidden)
    rebuilt = model_from_spec(json.loads((tmp_path / "model.json").read_text()))
    rebuilt.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    model.eval()
    rebuilt.eval()
    x = images(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert rebuilt.spec == model.spec


def test_scratch_presets_and_schedules():
    assert block_widths(ScratchConfig(blocks=4, width=32, max_width=128)) == [32, 64, 128, 128]
    assert block_widths(ScratchConfig(blocks=3, width=16, schedule="fixed")) == [16, 16, 16]
    inverted = ScratchConfig(blocks=4, width=64, max_width=256, schedule="inverted")
    assert block_widths(inverted) == [256, 128, 64, 64]
    vgg = build("scratch_vgg4")
    assert vgg.spec["scratch"]["convs_per_block"] == 2 and vgg.spec["head"]["hidden"] == [256]
    custom = build("scratch_vgg4", head=HeadConfig(hidden=[32]))
    assert custom.spec["head"]["hidden"] == [32]
    assert build("scratch_small").spec["scratch"]["blocks"] == 3
    with pytest.raises(ImgclfError, match="image_size"):
        build("scratch_cnn", size=8)


@pytest.mark.parametrize(
    "scratch",
    [
        ScratchConfig(blocks=3, width=8, downsample="stride", kernel_size=5, batch_norm=False),
        ScratchConfig(blocks=2, width=8, downsample="avg", dropout=0.2, convs_per_block=3),
        ScratchConfig(blocks=3, width=8, max_width=32, schedule="inverted", kernel_size=1),
    ],
)
def test_scratch_config_variants_build_and_run(scratch):
    model, _ = build_model(ModelConfig(name="scratch_cnn", pretrained="none", scratch=scratch), 3)
    side = 64 // 2**scratch.blocks
    assert model.forward_features(images(2, 64)).shape == (2, block_widths(scratch)[-1], side, side)
    assert model.spec["scratch"] == scratch.model_dump(mode="json")


def test_preprocessing_round_trip():
    prep = packaged_preprocessing("efficientnet_lite1")
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    with pytest.raises(ImgclfError, match="valid keys"):
        Preprocessing.from_dict({"input_size": 3, "mean": [0] * 3, "stdev": [1] * 3})


def test_parameter_counts_match_a_hand_count():
    model = tiny_scratch()
    # conv 3→4 (3×3, no bias) + BN(4); conv 4→8 + BN(8); Linear 8→3.
    convs_and_bns = (3 * 4 * 9 + 2 * 4) + (4 * 8 * 9 + 2 * 8)
    head = 8 * 3 + 3
    assert count_parameters(model) == {
        "total": convs_and_bns + head,
        "trainable": convs_and_bns + head,
        "non_trainable": 0,
    }
    apply_trainable(model, "head")
    assert count_parameters(model)["non_trainable"] == convs_and_bns
    buffers = 2 * (4 + 8) * 4 + 2 * 8  # running mean/var float32 + int64 batch counters
    assert model_size_mb(model) == ((convs_and_bns + head) * 4 + buffers) / 2**20
    opt = torch.optim.Adam(param_groups(model, StageConfig()))
    model(images(2, 16)).sum().backward()
    opt.step()
    # Adam: two moments per trainable element + one step counter per parameter tensor.
    assert optimizer_state_numel(opt) == 2 * head + 2


def test_describe_groups_merges_decay_halves_and_counts_parameters():
    from imgclf.train.optim import describe_groups

    model = build("scratch_cnn")
    line = describe_groups(param_groups(model, StageConfig(lr=1.0, layer_decay=0.5)))
    head = sum(p.numel() for p in model.head.parameters())
    assert line.startswith("lr per group (params): backbone.blocks.0 6.25e-02 (")
    assert line.endswith(f"head 1.00e+00 ({head:,})")
    assert line.count("backbone.blocks.") == 4
