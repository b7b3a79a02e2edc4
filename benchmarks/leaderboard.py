"""Leaderboard speed on 1,000 generated run folders (target: ≤ 1 s to list, sort and render).

    .venv/bin/python benchmarks/leaderboard.py [--runs 1000] [--rounds 5] [--dir DIR]

Each fake run folder holds what a real run writes and the leaderboard reads: `config.yaml` (the
resolved config of a varied recipe, written by `dump_yaml` like a real run's), `summary.json`
(status, best epoch, val/test metrics, parameter counts, timings), `metrics.csv`, and
`model.json` for runs whose image size is the model's default. Prints:
  cold  — the first listing in this process (imports done; the files were just written, so the
          OS page cache is warm: a truly cold disk is slower);
  warm  — the median of --rounds further listings;
  cli   — `imgclf leaderboard --runs DIR --top 20` in a fresh process (Python start included).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgclf.config import dump_yaml, load_config
from imgclf.runs.leaderboard import leaderboard

TARGET_S = 1.0
MODELS = ("efficientnet_lite0", "efficientnet_lite1", "scratch_cnn", "resnet18", "mobilenetv2_100")
STATUSES = ("completed",) * 16 + ("interrupted", "failed", "diverged", "running")


def fake_run(root: Path, i: int, rng: random.Random) -> None:
    """One run folder shaped like a real one (config.yaml, summary.json, metrics.csv)."""
    model = MODELS[i % len(MODELS)]
    scratch = model == "scratch_cnn"
    size = rng.choice((None, 64, 96, 128, 224)) if not scratch else 32
    two_stage = not scratch and rng.random() < 0.6
    stages = (
        f"[{{trainable: head, epochs: {rng.randint(1, 5)}, lr: {rng.choice((1e-2, 3e-3, 1e-3))}}},"
        f" {{trainable: {{last_blocks: {rng.randint(1, 4)}}}, epochs: {rng.randint(3, 20)},"
        f" lr: {rng.choice((1e-3, 3e-4, 1e-4))}, bn: eval}}]"
        if two_stage
        else f"[{{epochs: {rng.randint(2, 30)}, lr: {rng.choice((1e-2, 4e-3, 1e-3))}}}]"
    )
    cfg = load_config(
        None,
        [
            f"data.root=/data/garbage-{i % 3}",
            f"data.manifest=manifests/garbage-{i % 3}",
            f"data.image_size={'null' if size is None else size}",
            f"model.name={model}",
            f"model.pretrained={'none' if scratch else 'packaged'}",
            f"model.head.hidden={rng.choice(('[]', '[256]', '[512, 128]'))}",
            f"train.batch_size={rng.choice((16, 32, 64, 128))}",
            f"train.augment.preset={rng.choice(('none', 'light', 'default', 'strong'))}",
            f"train.imbalance={rng.choice(('none', 'weighted_loss', 'sampler', 'focal'))}",
            f"train.stages={stages}",
            f"runs_dir={root}",
            f"seed={i}",
        ],
    )
    run_id = f"20260101-{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}-{model}-{i:06x}"
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    epochs = sum(s.epochs for s in cfg.train.stages)
    status = rng.choice(STATUSES)
    rows = [
        "stage,stage_name,epoch,stage_epoch,lr,train_loss,train_accuracy,val_loss,"
        "val_accuracy,bad_images,seconds,images_per_s"
    ]
    for e in range(1, epochs + 1):
        rows.append(
            f"0,,{e},{e},0.001,{1 / e:.4f},{1 - 0.5 / e:.4f},{1.1 / e:.4f},{1 - 0.6 / e:.4f},"
            f"0,12.5,800.1"
        )
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    total = rng.randint(10_000, 5_000_000)
    trainable = total if not two_stage else total // rng.randint(2, 10)
    val_acc, test_acc = rng.uniform(0.5, 0.99), rng.uniform(0.5, 0.99)
    # Like finalize: predictions (val/test metrics) only where best weights were kept.
    scored = status in ("completed", "interrupted")
    summary = {
        "run_id": run_id,
        "status": status,
        "params": {
            "total": total,
            "trainable": trainable,
            "non_trainable": total - trainable,
            "optimizer_state": 2 * trainable + 2,
        },
        "model_size_mb": total * 4 / 2**20,
        "error": "CUDA out of memory" if status == "failed" else None,
        "model": model,
        "pretrained": cfg.model.pretrained,
        "best": {
            "metric": "val_accuracy",
            "value": val_acc,
            "epoch": rng.randint(1, epochs),
            "stage": 0,
        }
        if scored
        else None,
        "val": {"val_loss": rng.uniform(0.05, 2), "val_accuracy": val_acc} if scored else {},
        "test": {"test_loss": rng.uniform(0.05, 2), "test_accuracy": test_acc} if scored else {},
        "epochs": epochs,
        "train_seconds": round(rng.uniform(10, 5000), 2),
        "images_per_s": round(rng.uniform(100, 3000), 1),
        "bad_images": 0,
        "position": {"stage": len(cfg.train.stages), "epoch": 0},
    }
    if status == "running":
        summary = {k: summary[k] for k in ("run_id", "status", "params", "model_size_mb")}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if size is None:
        pre = {
            "input_size": 224,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
        }
        (folder / "model.json").write_text(json.dumps({"format": 1, "preprocessing": pre}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="keep the runs here (default: temp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgclf-leaderboard-") as tmp:
        root = (args.dir or Path(tmp)) / "runs"
        if not root.is_dir() or len(list(root.iterdir())) < args.runs:
            rng = random.Random(0)
            t0 = time.perf_counter()
            for i in range(args.runs):
                fake_run(root, i, rng)
            print(f"generated {args.runs} run folders in {time.perf_counter() - t0:.1f} s")

        def once() -> float:
            t0 = time.perf_counter()
            text, n = leaderboard(root, warn=lambda m: None)
            took = time.perf_counter() - t0
            assert n >= args.runs and text.count("\n") >= n, "rows missing"
            return took

        cold = once()
        warm = statistics.median(once() for _ in range(args.rounds))
        cmd = [sys.executable, "-m", "imgclf", "leaderboard", "--runs", str(root), "--top", "20"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli = time.perf_counter() - t0
    print(f"{args.runs} runs, list + sort + render as a table:")
    print(
        f"  cold {cold:.3f} s   warm {warm:.3f} s (median of {args.rounds})   target ≤ {TARGET_S} s"
    )
    print(f"  cli  {cli:.3f} s  (`imgclf leaderboard --top 20` in a fresh process)")
    print("PASS" if max(cold, warm) <= TARGET_S else "MISS")


if __name__ == "__main__":
    main()
