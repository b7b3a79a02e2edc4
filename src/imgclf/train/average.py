"""An exponential moving average of a model's weights over the last epochs of a stage.

Fine-tuning a few hundred steps on a small set, the weights after any one step carry that
step's batch noise; their running average over about `horizon` epochs does not, and validates
steadier (timm's ModelEma, Lightning's EMA callback, torch.optim.swa_utils' EMA). A stage with
`ema: H` keeps one: it is updated after every optimizer step, validated instead of the raw
weights, and it is what the run keeps as its best weights. Training itself goes on from the
raw weights; checkpoints hold both, so a resumed run averages on where it stopped.

Parameters that train, and floating-point buffers: BatchNorm's running statistics are averaged
with the weights they normalise (timm's ModelEma does the same), so a stage that updates them
(`bn: train`, or `frozen-eval` on unfrozen layers) validates a consistent pair; with `bn: eval`
they do not change. Frozen parameters do not change either, and are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The average of `model`'s trainable parameters and floating-point buffers, a horizon of
    `horizon_steps`. Built once a stage's trainable policy is set; the model's tensors are
    updated in place for the whole stage, so references to them are kept.

    The decay is 1 − 1 / horizon_steps, lowered over the first steps as timm's is
    ((1 + t) / (10 + t)), so the first weights are not held for a whole horizon.
    """

    def __init__(self, model: nn.Module, horizon_steps: float) -> None:
        if horizon_steps <= 0:
            raise ValueError(f"horizon_steps must be positive, got {horizon_steps}")
        self.decay = 1.0 - 1.0 / max(horizon_steps, 1.0)
        live = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        live += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.names = [n for n, _ in live]
        self.live = [t for _, t in live]
        self.values = [t.detach().clone() for t in self.live]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights in (after an optimizer step)."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.values, [t.detach() for t in self.live], 1 - decay)

    def state_dict_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged tensors in place of its own."""
        state = model.state_dict()
        state.update(zip(self.names, self.values, strict=True))
        return state

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged tensors in the model for the block (validation), its own after."""
        own = [t.detach().clone() for t in self.live]
        with torch.no_grad():
            torch._foreach_copy_(self.live, self.values)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, own)

    def state_dict(self) -> dict:
        """Plain values for a checkpoint."""
        return {
            "decay": self.decay,
            "steps": self.steps,
            "values": dict(zip(self.names, (v.detach().cpu() for v in self.values), strict=True)),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["values"]) != self.names:
            raise ValueError(
                "the checkpoint's weight average (ema) covers other tensors than this stage "
                "trains: resume with the run's own config, or start a new run"
            )
        self.decay, self.steps = float(state["decay"]), int(state["steps"])
        self.values = [
            state["values"][n].to(v.device, v.dtype)
            for n, v in zip(self.names, self.values, strict=True)
        ]
