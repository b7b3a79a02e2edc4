"""`imgclf lr-find`: the learning-rate range test on a run's first stage, with its real data,
model, trainable policy, optimizer and loss, on the device, precision and memory format a run
would use (`train/step.py`). Nothing is written but the plot."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from imgclf.config import RunConfig
from imgclf.data.batches import build_loaders
from imgclf.data.prepare import prepare
from imgclf.errors import ImgclfError
from imgclf.models import build_model, set_train_mode
from imgclf.progress import progress_bar
from imgclf.train.losses import build_loss
from imgclf.train.lr_find import LRFindResult, lr_find, plot_lr_find
from imgclf.train.recipe import resolve_recipe
from imgclf.train.step import assemble, prepare_model, seed_everything, setup_stage
from imgclf.workflows.training import warm_start


def find_lr(
    cfg: RunConfig,
    plot: Path,
    *,
    num_steps: int = 100,
    deadline: float | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    progress: bool = True,
) -> LRFindResult:
    """Sweep the first stage's lr exponentially; save the loss-vs-lr plot; return the result.

    `deadline` (`time.monotonic()`): past it the sweep stops with an ImgclfError."""
    parts = assemble(cfg)
    fabric, device = parts.fabric, parts.device
    seed_everything(cfg.seed)
    manifest, _ = prepare(cfg.data, progress=progress)
    raw, pre = build_model(cfg.model, len(manifest.labels), cfg.data.image_size, cfg.data.crop_mode)
    if cfg.model.init_from:  # e.g. a trained head, before unfreezing (imgclf fit)
        warm_start(raw, cfg.model.init_from, lambda *_: None)
    raw = prepare_model(cfg, parts, raw)
    # The first stage a run would train (the default recipe skips its head stage on a random
    # backbone); its epochs do not matter here.
    random_backbone = raw.spec.get("pretrained") == "none"
    stage = resolve_recipe(cfg.train, len(manifest.split_entries("train")), random_backbone)
    stage = stage.first_trained
    # No schedule: the sweep sets every group's lr itself.
    built = setup_stage(fabric, raw, stage, None)
    model, optimizer = built.model, built.optimizer
    set_train_mode(raw, True, stage.bn)
    # keep discriminative multipliers
    ratios = [g["lr"] / stage.lr for g in optimizer.param_groups]
    train_loader, _, _ = build_loaders(
        cfg, manifest, pre, device=device, channels_last=parts.channels_last
    )
    counts = torch.bincount(
        torch.tensor(train_loader.dataset.targets), minlength=len(manifest.labels)
    )
    loss_fn = build_loss(cfg.train, counts.tolist()).to(device)
    batches = (b for b in itertools.cycle(train_loader) if b["x"] is not None)

    def step(lr: float) -> float:
        if deadline is not None and time.monotonic() > deadline:
            raise ImgclfError("the LR range test ran out of its time (imgclf fit's budget)")
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        batch = next(batches)
        x = batch["x"].to(device, non_blocking=True)
        if parts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(x), batch["y"].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        return loss.item()

    with progress_bar("lr-find", num_steps, progress) as advance:

        def on_step(lr: float, loss: float) -> None:
            advance(description=f"lr-find: lr {lr:.1e}, loss {loss:.3f}")

        result = lr_find(
            step, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, on_step=on_step
        )
    plot_lr_find(result, plot)
    return result
