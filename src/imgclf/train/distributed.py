"""Training on several processes under torchrun: which rank this is, its Fabric, and the few
points where ranks must agree.

`torchrun --nproc_per_node N -m imgclf train …` starts N copies of the ordinary command; each
finds its place in the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE). The rules:
- `train.batch_size` is the global batch: each rank takes batch_size / WORLD_SIZE images of
  every global batch (the sampler shards), so a recipe means the same on 1 or 8 processes.
- Rank 0 alone writes: manifest, run folder, checkpoints, MLflow. The other ranks read what
  rank 0 wrote (they wait for it at a barrier) and write nothing.
- Ranks are seeded seed + rank (independent dropout / MixUp draws); the model starts from rank
  0's weights because DDP broadcasts them. Each rank's RNG state is saved in the checkpoint, so
  a resume with the same world size continues every stream exactly.
- Where ranks could disagree, rank 0 decides: validation metrics (per-rank BatchNorm statistics
  differ) are broadcast before best-weights and early-stopping decisions, and a stop request
  (Ctrl-C, SIGTERM) seen by any rank is summed into the metric all-reduce, so every rank leaves
  the loop at the same step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgclf.errors import ImgclfError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return self.size // self.local_size


SINGLE = World()


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The process layout torchrun (or SLURM via torchrun) describes; one process otherwise."""
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError as e:
        raise ImgclfError(f"cannot read the torchrun environment (RANK, WORLD_SIZE): {e}") from e
    if size <= 1:
        return SINGLE
    if not 0 <= rank < size or local < 1 or size % local:
        raise ImgclfError(
            f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={size} "
            f"LOCAL_WORLD_SIZE={local}; start training with torchrun --nproc_per_node N"
        )
    return World(rank=rank, size=size, local_size=local)


class EveryRankError(ImgclfError):
    """A refusal every rank reaches identically: rank 0 alone prints it (the CLI's `main`)."""

    every_rank = True


def check_config(cfg, world: World) -> None:
    """Settings that cannot work across processes, refused before anything starts."""
    if not world.distributed:
        if cfg.train.sync_bn:
            raise ImgclfError("train.sync_bn needs several processes (torchrun); remove it")
        return
    t = cfg.train
    batches = {"train.batch_size": t.batch_size}
    if t.eval_batch_size:
        batches["train.eval_batch_size"] = t.eval_batch_size
    for key, value in batches.items():
        if value % world.size:
            raise EveryRankError(
                f"{key}={value} is the global batch and must divide evenly over "
                f"{world.size} processes; use a multiple of {world.size}"
            )
    if t.features == "cache":
        raise EveryRankError(
            "train.features=cache trains heads in one process; run it without torchrun "
            "(the head-only stage is fast on one device) or set train.features=none"
        )
    if t.sync_bn and t.accelerator == "cpu":
        raise EveryRankError(
            "train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU)"
        )


def make_fabric(cfg, world: World, precision: str):
    """One device for one process; DDP over every rank under torchrun."""
    from lightning.fabric import Fabric

    if not world.distributed:
        return Fabric(accelerator=cfg.train.accelerator, devices=1, precision=precision)
    fabric = Fabric(
        accelerator=cfg.train.accelerator,
        devices=world.local_size,
        num_nodes=world.nodes,
        strategy="ddp",
        precision=precision,
    )
    fabric.launch()  # under torchrun: joins the process group, starts no processes
    return fabric


def gather_objects(fabric, obj: Any) -> list[Any]:
    """Every rank's `obj` (plain values and CPU tensors), in rank order (one item alone)."""
    if fabric.world_size == 1:
        return [obj]
    out: list[Any] = [None] * fabric.world_size
    # Tensors travel as numpy arrays: a pickled tensor fails to load in all_gather_object.
    torch.distributed.all_gather_object(out, _map_tensors(obj, lambda t: t.cpu().numpy()))
    return [_map_tensors(o, torch.from_numpy, np.ndarray) for o in out]


def _map_tensors(obj: Any, fn, kind: type = torch.Tensor) -> Any:
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, kind) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, fn, kind) for v in obj)
    return obj


def end_process_group() -> None:
    """Tear down torch.distributed's process group, if one is up, before the process exits.

    Left to interpreter finalisation, gloo's worker threads can abort a rank that finished
    cleanly ("terminate called without an active exception", exit -6: seen once under load in
    tests/faults/test_ddp.py). Nothing collective runs after training returns (rank 0 finalises
    alone), so no rank waits for another here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
