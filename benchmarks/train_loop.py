"""imgclf's training loop against a minimal hand-written PyTorch loop, in one run.

    .venv/bin/python benchmarks/train_loop.py [--model efficientnet_lite0] [--size 96]
        [--batch 32] [--steps 20] [--rounds 3]

Both loops train the same freshly built model on the same in-memory batches with the same
optimizer, batch size, precision and memory format, so the difference is the loop alone
(Fabric, device-side metric accumulation, schedule, divergence checks). Rounds alternate
between the two loops and the median images/s of each is reported, with the ratio
(target ≥ 0.95). Both use channels_last (imgclf's default on CUDA and the CPU); on a GPU,
bf16 autocast.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from imgclf.config import ModelConfig, StageConfig
from imgclf.models import build_model, param_groups
from imgclf.train.loop import EpochState, train_one_epoch
from imgclf.train.optim import build_optimizer
from imgclf.train.step import setup_stage


def make_batches(n: int, batch: int, size: int, classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch, 3, size, size, generator=g).to(device),
            torch.randint(0, classes, (batch,), generator=g).to(device),
        )
        for _ in range(n)
    ]


def fresh(model_name: str, size: int, classes: int, device, channels_last: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(name=model_name, pretrained="none")
    model, _ = build_model(cfg, classes, size)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    stage = StageConfig(lr=1e-3, schedule="constant")
    return model, stage


def plain_loop(model, stage, batches, autocast, channels_last) -> float:
    opt = build_optimizer(param_groups(model, stage), stage, batches[0][0].device.type)
    model.train()
    sync = torch.cuda.synchronize if batches[0][0].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for x, y in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - t0)


def imgclf_loop(model, stage, batches, fabric, channels_last) -> float:
    step = setup_stage(fabric, model, stage, len(batches))  # as every imgclf trainer sets up
    wrapped, opt, schedule = step.model, step.optimizer, step.schedule
    loader = [{"x": x, "y": y, "index": None, "bad": []} for x, y in batches]
    model.train()
    sync = torch.cuda.synchronize if fabric.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    state = train_one_epoch(
        fabric,
        wrapped,
        loader,
        torch.nn.CrossEntropyLoss(),
        opt,
        schedule,
        state=EpochState(),
        channels_last=channels_last,
        sync_every=1 if fabric.device.type == "cpu" else 25,
    )
    sync()
    return state.seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from lightning.fabric import Fabric

    cuda = torch.cuda.is_available()
    precision = "bf16-mixed" if cuda else "32-true"
    fabric = Fabric(accelerator="cuda" if cuda else "cpu", devices=1, precision=precision)
    device = fabric.device
    channels_last = True  # imgclf's default on CUDA and the CPU (train/step.py)

    def autocast():
        return (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cuda
            else torch.autocast("cpu", enabled=False)
        )

    classes = 10
    warm = make_batches(args.warmup, args.batch, args.size, classes, device)
    batches = make_batches(args.steps, args.batch, args.size, classes, device)
    rates: dict[str, list[float]] = {"plain": [], "imgclf": []}
    for _ in range(args.rounds):
        for name in ("plain", "imgclf"):
            model, stage = fresh(args.model, args.size, classes, device, channels_last)
            if name == "plain":
                plain_loop(model, stage, warm, autocast, channels_last)
                rates[name].append(plain_loop(model, stage, batches, autocast, channels_last))
            else:
                imgclf_loop(model, stage, warm, fabric, channels_last)
                rates[name].append(imgclf_loop(model, stage, batches, fabric, channels_last))
    plain, ours = statistics.median(rates["plain"]), statistics.median(rates["imgclf"])
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {where}; torch {torch.__version__}; model {args.model} at {args.size}px; "
        f"batch {args.batch}; precision {precision}; channels_last {channels_last}"
    )
    for name, value in (("plain PyTorch loop", plain), ("imgclf loop", ours)):
        rounds = [round(r, 1) for r in rates["plain" if name.startswith("plain") else "imgclf"]]
        print(f"{name + ':':20s}{value:8.1f} images/s  (rounds: {rounds})")
    print(f"ratio imgclf/plain: {ours / plain:8.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
