"""One training step, assembled from a RunConfig: the one place that says how imgclf trains.

Every trainer — a run (`workflows/training.py` and `train/fit.py`), `imgclf lr-find`
(`workflows/lr_search.py`), `imgclf bench train` (`workflows/bench.py`) and
`benchmarks/fast_path.py` — builds its step here, so a setting means the same everywhere:

- `assemble(cfg, world)`: the device side, once per process — the Fabric (one device, or DDP
  over every rank under torchrun: `train/distributed.py`), the precision (`resolve_precision`:
  bf16 autocast on a CUDA device that has it, fp16 on one that does not, fp32 elsewhere), the
  memory format (channels_last unless `train.channels_last` says otherwise) and cuDNN
  autotuning on CUDA (fixed input sizes: time the algorithms once, keep the fastest).
- `seed_everything(seed)`: Python, NumPy and torch generators; each caller picks the moment
  (a run seeds after its data is prepared, `seed + rank` under torchrun).
- `prepare_model(parts, model)`: the model in the step's memory format, BatchNorm synchronised
  across processes when `train.sync_bn` is set; `maybe_compile` for `train.compile`.
- `setup_stage(fabric, model, stage, steps_per_epoch)`: per stage, in this order, the trainable
  policy (`models/freeze.py`) → the fabric-wrapped module → parameter groups → optimizer (fused
  on CUDA) → lr schedule (`train/optim.py`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf.config import RunConfig, StageConfig
from imgclf.models import apply_trainable, default_channels_last, param_groups
from imgclf.train.distributed import SINGLE, World, make_fabric
from imgclf.train.optim import Schedule, build_optimizer, describe_groups


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(cfg: RunConfig) -> str:
    """`train.precision`, with "auto" made concrete for the machine this runs on."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if cfg.train.accelerator in ("auto", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where bf16 autocast
    trains faster instead of slower. Measured on the 2-core CPU (AVX-512 BF16): the model's
    step alone 1.3× faster for EfficientNet-Lite0 and Lite1, inference 1.8–1.9×
    (`benchmarks/memory_format.py --compare precision`); the whole pipeline (`imgclf bench
    train`, the held-in recipe, images decoded and augmented) 15–17 → 17–20 images/s. The
    same accuracy on the held-in clip art (docs/PERFORMANCE.md). On other CPUs bf16 is
    emulated and slower.
    `imgclf fit` uses it; a run chooses it with `train.precision=bf16-mixed`."""
    # private probes: a torch without one of them answers False for it
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def use_channels_last(cfg: RunConfig, device_type: str) -> bool:
    """`train.channels_last`, or `default_channels_last` for the device."""
    if cfg.train.channels_last is not None:
        return cfg.train.channels_last
    return default_channels_last(device_type)


@dataclass(frozen=True)
class StepParts:
    """The device side of a training step: built once per process by `assemble`."""

    fabric: Any
    precision: str
    channels_last: bool
    world: World = SINGLE

    @property
    def device(self) -> torch.device:
        return self.fabric.device


def assemble(cfg: RunConfig, world: World = SINGLE) -> StepParts:
    """Fabric, precision, memory format and backend settings for `cfg` on this process."""
    precision = resolve_precision(cfg)
    fabric = make_fabric(cfg, world, precision)
    device_type = fabric.device.type
    if device_type == "cuda":
        # Fixed input sizes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    return StepParts(fabric, precision, use_channels_last(cfg, device_type), world)


def prepare_model(cfg: RunConfig, parts: StepParts, model: nn.Module) -> nn.Module:
    """The model in the step's memory format; SyncBatchNorm across processes if asked for
    (`train.sync_bn`: refused on one process by `check_config`, ignored there by benchmarks)."""
    if parts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn and parts.world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def maybe_compile(cfg: RunConfig, model: nn.Module) -> nn.Module | None:
    """torch.compile(model) when `train.compile` is set (the raw module stays for state_dict
    and freezing); None otherwise."""
    return torch.compile(model) if cfg.train.compile else None


@dataclass
class StageStep:
    """One stage's trainable module, optimizer and schedule, as `setup_stage` built them."""

    model: nn.Module  # fabric-wrapped: forward and backward go through it
    optimizer: Any  # fabric-wrapped
    schedule: Schedule | None
    trainable: dict[str, Any]  # apply_trainable's counts


def setup_stage(
    fabric,
    raw_model: nn.Module,
    stage: StageConfig,
    steps_per_epoch: int | Callable[[], int] | None,
    *,
    compiled: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
) -> StageStep:
    """Trainable policy → fabric-wrapped module → parameter groups → optimizer → schedule.

    `steps_per_epoch` may be a callable, asked once the module is on the device (a head-only
    stage on cached features counts its steps after extracting them); None builds no schedule
    (lr-find drives the lr itself). The caller drops a previous stage's wrapper first: DDP
    registers the parameters that require gradients when it wraps.
    """
    summary = apply_trainable(raw_model, stage.trainable)
    if log:
        log(
            f"stage {stage.name or ''}: trainable={stage.trainable} "
            f"({summary['trainable']:,} trainable / {summary['frozen']:,} frozen parameters)"
        )
    model = fabric.setup_module(raw_model if compiled is None else compiled)
    optimizer = build_optimizer(param_groups(raw_model, stage), stage, fabric.device.type)
    if log:
        log(describe_groups(optimizer.param_groups))
    optimizer = fabric.setup_optimizers(optimizer)
    steps = steps_per_epoch() if callable(steps_per_epoch) else steps_per_epoch
    schedule = None if steps is None else Schedule(optimizer, stage, steps)
    return StageStep(model, optimizer, schedule, summary)
