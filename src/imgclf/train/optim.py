"""Optimizers and learning-rate schedules for one training stage.

`Schedule` is the one object the loop drives, whatever the kind: `step_batch()` after every
optimizer step, `step_epoch(metrics)` at every epoch end. Each kind is a multiplier curve f(t)
computed for the stage's lr, and group g gets `base_lr_g × f(t)`: discriminative and layer-decayed
lrs keep their ratios, and floors (min_lr) scale with the group. The state is a few plain numbers,
so a resumed run continues the exact same curve.

| kind     | advances on | curve                                                                |
|----------|-------------|----------------------------------------------------------------------|
| constant | -           | lr                                                                   |
| step     | epoch       | lr / step.factor^(epoch // step.every), never below step.min_lr      |
| cosine   | batch       | lr → min_lr (half cosine) over the steps after warmup                |
| onecycle | batch       | torch OneCycleLR: lr/25 → lr over 30 % of the stage → lr/25e4, cosine |
| cyclic   | batch       | torch CyclicLR (triangular, triangular2, exp_range), no momentum     |
|          |             | cycling, between lr × cyclic.base_lr_fraction and lr                  |
| plateau  | epoch       | × plateau.factor after more than plateau.patience epochs without     |
|          |             | improvement of plateau.metric (torch ReduceLROnPlateau semantics)    |

`warmup_epochs` (constant, step, cosine, plateau) ramps linearly over W = round(warmup_epochs ×
steps_per_epoch) steps, from lr/(W+1) at the first step to lr at step W.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from imgclf.config import CyclicSchedule, StageConfig
from imgclf.errors import ImgclfError
from imgclf.metric_names import lower_is_better

WARMUP_KINDS = ("constant", "step", "cosine", "plateau")
# torch OneCycleLR defaults, kept so a onecycle stage means what the torch docs say.
ONECYCLE_PCT_START = 0.3
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4
# torch ReduceLROnPlateau default: an epoch counts as better only by this relative margin.
PLATEAU_THRESHOLD = 1e-4


def _sgd(groups: list[dict], stage: StageConfig, extra: dict) -> torch.optim.Optimizer:
    if stage.nesterov and stage.momentum == 0:
        raise ImgclfError("stage.nesterov needs stage.momentum > 0 (SGD); set a momentum")
    return torch.optim.SGD(
        groups, lr=stage.lr, momentum=stage.momentum, nesterov=stage.nesterov, **extra
    )


def _adam(groups: list[dict], stage: StageConfig, extra: dict) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=stage.lr, **extra)


def _adamw(groups: list[dict], stage: StageConfig, extra: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=stage.lr, **extra)


OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], Callable[..., torch.optim.Optimizer]]] = {
    "sgd": (torch.optim.SGD, _sgd),
    "adam": (torch.optim.Adam, _adam),
    "adamw": (torch.optim.AdamW, _adamw),
}


def _device_kwargs(cls: type[torch.optim.Optimizer], device_type: str) -> dict[str, Any]:
    """fused on CUDA where the optimizer has it, foreach on other accelerators, CPU defaults."""
    if device_type == "cpu":
        return {}
    if device_type == "cuda" and "fused" in inspect.signature(cls).parameters:
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(
    param_groups: list[dict], stage: StageConfig, device_type: str = "cpu"
) -> torch.optim.Optimizer:
    """The stage's optimizer; each group keeps its own lr and weight_decay (default: stage's)."""
    if stage.optimizer not in OPTIMIZERS:
        raise ImgclfError(
            f"unknown optimizer {stage.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    groups = []
    for i, group in enumerate(param_groups):
        if "params" not in group:
            raise ImgclfError(f"parameter group {i} ({group.get('name', '?')}) has no 'params'")
        groups.append(
            {
                **group,
                "params": list(group["params"]),
                "lr": float(group.get("lr", stage.lr)),
                "weight_decay": float(group.get("weight_decay", stage.weight_decay)),
            }
        )
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ImgclfError("nothing to train: no parameter group holds a trainable parameter")
    cls, builder = OPTIMIZERS[stage.optimizer]
    return builder(groups, stage, _device_kwargs(cls, device_type))


def describe_groups(param_groups: list[dict]) -> str:
    """One line: each group's base lr and parameter count (decay / no-decay halves merged)."""
    merged: dict[str, list] = {}
    for i, group in enumerate(param_groups):
        name = str(group.get("name", f"group{i}")).split("/")[0]
        count = sum(p.numel() for p in group["params"] if p.requires_grad)
        lr, total = merged.setdefault(name, [float(group["lr"]), 0])
        merged[name] = [lr, total + count]
    parts = [f"{name} {lr:.2e} ({count:,})" for name, (lr, count) in merged.items()]
    return "lr per group (params): " + ", ".join(parts)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _onecycle(step: int, total: int) -> float:
    """torch OneCycleLR's lr as a fraction of max_lr (two phases, cosine annealing)."""
    initial = 1.0 / ONECYCLE_DIV
    final = initial / ONECYCLE_FINAL_DIV
    end_up = ONECYCLE_PCT_START * total - 1
    if step <= end_up:
        return _cos_anneal(initial, 1.0, step / end_up)
    end_down = total - 1
    pct = (step - end_up) / (end_down - end_up) if end_down > end_up else 1.0
    return _cos_anneal(1.0, final, min(pct, 1.0))


def _cyclic(step: int, cfg: CyclicSchedule, steps_per_epoch: int) -> float:
    """torch CyclicLR's lr as a fraction of max_lr (symmetric cycle)."""
    half = cfg.half_cycle_epochs * steps_per_epoch
    cycle = math.floor(1 + step / (2 * half))
    x = 1 + step / (2 * half) - cycle
    rise = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
    height = (1 - cfg.base_lr_fraction) * rise
    if cfg.mode == "triangular2":
        height /= 2.0 ** (cycle - 1)
    elif cfg.mode == "exp_range":
        height *= cfg.gamma**step
    return cfg.base_lr_fraction + height


class Schedule:
    """Drives the lr of every param group along the stage's curve; see the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer, stage: StageConfig, steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ImgclfError(f"steps_per_epoch must be ≥ 1, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.stage = stage
        self.kind = stage.schedule
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = stage.epochs * steps_per_epoch
        self.warmup_steps = round(stage.warmup_epochs * steps_per_epoch)
        self._check()
        # Taken once, here: build the Schedule right after the optimizer, before any step.
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_count = 0
        self.epoch = 0
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0
        self._apply()

    def _check(self) -> None:
        st = self.stage
        if self.warmup_steps and self.kind not in WARMUP_KINDS:
            raise ImgclfError(
                f"warmup_epochs applies to {', '.join(WARMUP_KINDS)}; the {self.kind} schedule "
                "shapes its own start, so set warmup_epochs: 0"
            )
        if self.warmup_steps >= self.total_steps and self.warmup_steps:
            raise ImgclfError(
                f"warmup_epochs ({st.warmup_epochs:g}) must be shorter than the stage "
                f"({st.epochs} epochs)"
            )
        floors = {"cosine": st.min_lr, "step": st.step.min_lr, "plateau": st.plateau.min_lr}
        if floors.get(self.kind, 0.0) > st.lr:
            raise ImgclfError(
                f"the {self.kind} floor min_lr ({floors[self.kind]:g}) is above lr ({st.lr:g})"
            )

    def factor(self) -> float:
        """The multiplier of every group's base lr at the current step and epoch."""
        st, s = self.stage, self.step_count
        if self.kind == "onecycle":
            return _onecycle(s, self.total_steps)
        if self.kind == "cyclic":
            return _cyclic(s, st.cyclic, self.steps_per_epoch)
        warm = min(1.0, (s + 1) / (self.warmup_steps + 1))
        if self.kind == "cosine":
            floor = st.min_lr / st.lr
            progress = min(
                1.0, max(0, s - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            )
            return warm * _cos_anneal(1.0, floor, progress)
        if self.kind == "step":
            decayed = st.step.factor ** -(self.epoch // st.step.every)
            return warm * max(decayed, st.step.min_lr / st.lr)
        if self.kind == "plateau":
            return warm * self.plateau_scale
        return warm

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step_batch(self) -> None:
        """Call after every optimizer step."""
        self.step_count += 1
        self._apply()

    def step_epoch(self, metrics: Mapping[str, float] | None = None) -> None:
        """Call at every epoch end; plateau reads its metric from `metrics`."""
        self.epoch += 1
        if self.kind == "plateau":
            self._plateau(metrics or {})
        self._apply()

    def _plateau(self, metrics: Mapping[str, float]) -> None:
        cfg = self.stage.plateau
        if cfg.metric not in metrics:
            raise ImgclfError(
                f"the plateau schedule watches {cfg.metric!r}, but this epoch's metrics are "
                f"{sorted(metrics) or 'empty'}; set stage.plateau.metric to one of them"
            )
        value = float(metrics[cfg.metric])
        minimize = lower_is_better(cfg.metric)
        if self.best is None:
            better = not math.isnan(value)
        elif minimize:
            better = value < self.best * (1 - PLATEAU_THRESHOLD)
        else:
            better = value > self.best * (1 + PLATEAU_THRESHOLD)
        if better:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > cfg.patience:
            self.plateau_scale = max(self.plateau_scale * cfg.factor, cfg.min_lr / self.stage.lr)
            self.bad_epochs = 0

    def lrs(self) -> list[float]:
        """The current lr of each param group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain values: enough to continue the identical curve."""
        return {
            "kind": self.kind,
            "steps_per_epoch": self.steps_per_epoch,
            "base_lrs": list(self.base_lrs),
            "step": self.step_count,
            "epoch": self.epoch,
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`; the stage and steps per epoch must be the same."""
        for key, mine in (("kind", self.kind), ("steps_per_epoch", self.steps_per_epoch)):
            if state[key] != mine:
                raise ImgclfError(
                    f"cannot resume the schedule: it was saved with {key}={state[key]!r}, this "
                    f"run has {mine!r}; resume with the same stage, data and batch size"
                )
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ImgclfError(
                f"cannot resume the schedule: saved for {len(state['base_lrs'])} param groups, "
                f"the optimizer has {len(self.optimizer.param_groups)}"
            )
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.step_count = int(state["step"])
        self.epoch = int(state["epoch"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self._apply()


def lr_curve(stage: StageConfig, steps_per_epoch: int, base_lr: float | None = None) -> list[float]:
    """The lr at every step of the stage (plateau: the metric always improves)."""
    if base_lr is not None:
        if not base_lr > 0:
            raise ImgclfError(f"base_lr must be > 0, got {base_lr}")
        stage = stage.model_copy(update={"lr": float(base_lr)})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=stage.lr)
    schedule = Schedule(optimizer, stage, steps_per_epoch)
    sign = -1.0 if lower_is_better(stage.plateau.metric) else 1.0
    lrs = []
    for epoch in range(stage.epochs):
        for _ in range(steps_per_epoch):
            lrs.append(schedule.lrs()[0])
            schedule.step_batch()
        schedule.step_epoch({stage.plateau.metric: sign * epoch})
    return lrs
