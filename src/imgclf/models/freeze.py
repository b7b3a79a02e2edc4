"""What trains in a stage: freeze policies, BatchNorm mode, and optimizer parameter groups.

The backbone is seen as an ordered list of blocks from stem to last (`trainable_blocks`); every
policy and the layer-wise learning-rate decay are expressed in those blocks.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from imgclf.config import StageConfig
from imgclf.errors import ImgclfError
from imgclf.models.model import ImgclfModel

# Containers whose children are the natural unfreezing steps (timm, torchvision, scratch).
_CONTAINERS = ("blocks", "stages", "layers", "features")
_POLICIES = "head | all | {last_blocks: N} | {last_fraction: F} | {from_layer: NAME}"


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def trainable_blocks(model: ImgclfModel) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks from stem to last, as (name relative to the backbone, module)."""
    blocks = []
    for name, child in model.backbone.named_children():
        if name in _CONTAINERS and isinstance(child, nn.Sequential | nn.ModuleList):
            blocks += [(f"{name}.{n}", c) for n, c in child.named_children() if _has_params(c)]
        elif _has_params(child):
            blocks.append((name, child))
    return blocks


def _block_params(model: ImgclfModel) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Each block's parameters by full name; parameters outside any block join the first."""
    blocks = [
        (name, [(f"backbone.{name}.{n}", p) for n, p in module.named_parameters()])
        for name, module in trainable_blocks(model)
    ]
    seen = {id(p) for _, params in blocks for _, p in params}
    # ViT's cls_token / pos_embed sit on the backbone itself: they belong with the stem.
    loose = [
        (f"backbone.{n}", p) for n, p in model.backbone.named_parameters() if id(p) not in seen
    ]
    if loose:
        if blocks:
            blocks[0] = (blocks[0][0], loose + blocks[0][1])
        else:
            blocks = [("backbone", loose)]
    return blocks


def _select_blocks(names: list[str], trainable: str | dict[str, Any]) -> list[str]:
    if trainable == "head":
        return []
    if trainable == "all":
        return list(names)
    if not isinstance(trainable, dict) or len(trainable) != 1:
        raise ImgclfError(f"trainable {trainable!r} is unknown; valid: {_POLICIES}")
    ((key, value),) = trainable.items()
    n = len(names)
    if key == "last_blocks" and isinstance(value, int) and value >= 0:
        return names[max(n - value, 0) :]
    if key == "last_fraction" and isinstance(value, int | float) and 0 < value <= 1:
        return names[n - math.ceil(value * n) :]
    if key == "from_layer" and isinstance(value, str):
        name = value.removeprefix("backbone.")
        if name not in names:
            raise ImgclfError(
                f"trainable.from_layer {value!r} is not a block of this backbone; "
                f"valid blocks, stem to last: {', '.join(names)}"
            )
        return names[names.index(name) :]
    raise ImgclfError(
        f"trainable {trainable!r} is invalid; valid: {_POLICIES} (last_blocks: integer ≥ 0, "
        f"last_fraction: in (0, 1], from_layer: a block name)"
    )


def apply_trainable(model: ImgclfModel, trainable: str | dict[str, Any]) -> dict[str, Any]:
    """Set requires_grad for a policy: the head always trains, plus the chosen blocks."""
    blocks = _block_params(model)
    chosen = set(_select_blocks([name for name, _ in blocks], trainable))
    # Parameters the backbone never uses (or that timm fixes) must stay frozen.
    never = {f"backbone.{n}" for n in model.spec.get("frozen_params", [])}
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    for name, params in blocks:
        if name in chosen:
            for full_name, p in params:
                p.requires_grad_(full_name not in never)
    trainable_n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_n = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {
        "trainable": trainable_n,
        "frozen": frozen_n,
        "trainable_blocks": [name for name, _ in blocks if name in chosen] + ["head"],
    }


def set_train_mode(model: nn.Module, training: bool, bn: str = "frozen-eval") -> None:
    """model.train(training) with BatchNorm layers per `bn` (see StageConfig.bn)."""
    model.train(training)
    if not training or bn == "train":
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            # A frozen layer's running statistics must keep matching its frozen weights; with
            # "eval", unfrozen layers also keep the pretrained statistics their weights expect.
            if bn == "eval" or (params and not any(p.requires_grad for p in params)):
                module.eval()


def param_groups(model: ImgclfModel, stage: StageConfig) -> list[dict[str, Any]]:
    """Optimizer groups of trainable parameters: per-block lrs, no decay on 1-D parameters."""
    backbone_lr = stage.lr * stage.backbone_lr_mult
    no_decay = _no_weight_decay_names(model)
    groups: dict[str, dict[str, Any]] = {}

    def add(group: str, lr: float, name: str, param: nn.Parameter) -> None:
        if not param.requires_grad:
            return
        decay = param.ndim > 1 and name not in no_decay
        key = f"{group}/{'decay' if decay else 'no_decay'}"
        wd = stage.weight_decay if decay else 0.0
        entry = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "name": key})
        entry["params"].append(param)

    blocks = _block_params(model)
    n = len(blocks)
    for i, (block, params) in enumerate(blocks):
        if stage.layer_decay is None:
            group, lr = "backbone", backbone_lr
        else:
            # Block i of n (0 = stem) is n - i steps from the head; the decay multiplies
            # backbone_lr_mult rather than replacing it, so both knobs can be combined.
            group, lr = f"backbone.{block}", backbone_lr * stage.layer_decay ** (n - i)
        for name, p in params:
            add(group, lr, name, p)
    for name, p in model.head.named_parameters():
        add("head", stage.lr, f"head.{name}", p)
    return [g for g in groups.values() if g["params"]]


def _no_weight_decay_names(model: ImgclfModel) -> set[str]:
    # timm lists embeddings that must not decay (pos_embed, cls_token, relative biases).
    hook = getattr(model.backbone, "no_weight_decay", None)
    names = hook() if callable(hook) else set()
    return {f"backbone.{n}" for n in names}
