"""`imgclf lr-find`: the learning-rate range test on a run's first stage, with its real data,
model, trainable policy, optimizer and loss. Nothing is written but the plot."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from imgclf.config import RunConfig
from imgclf.data.pipeline import build_loaders
from imgclf.data.prepare import prepare
from imgclf.models import apply_trainable, build_model, param_groups, set_train_mode
from imgclf.progress import progress_bar
from imgclf.train.losses import build_loss
from imgclf.train.lr_find import LRFindResult, lr_find, plot_lr_find
from imgclf.train.optim import build_optimizer
from imgclf.train.run import seed_everything


def find_lr(
    cfg: RunConfig,
    plot: Path,
    *,
    num_steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    progress: bool = True,
) -> LRFindResult:
    """Sweep the first stage's lr exponentially; save the loss-vs-lr plot; return the result."""
    seed_everything(cfg.seed)
    manifest, _ = prepare(cfg.data, progress=progress)
    model, pre = build_model(cfg.model, len(manifest.labels), cfg.data.image_size)
    stage = cfg.train.stages[0]
    apply_trainable(model, stage.trainable)
    set_train_mode(model, True, stage.bn)
    groups = param_groups(model, stage)
    ratios = [g["lr"] / stage.lr for g in groups]  # keep discriminative multipliers
    optimizer = build_optimizer(groups, stage)
    train_loader, _, _ = build_loaders(cfg, manifest, pre)
    counts = torch.bincount(
        torch.tensor(train_loader.dataset.targets), minlength=len(manifest.labels)
    )
    loss_fn = build_loss(cfg.train, counts.tolist())
    batches = (b for b in itertools.cycle(train_loader) if b["x"] is not None)

    def step(lr: float) -> float:
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        batch = next(batches)
        loss = loss_fn(model(batch["x"]), batch["y"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
