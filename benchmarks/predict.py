"""`imgclf predict` throughput against a plain timm + DataLoader inference loop, in the same run.

    .venv/bin/python benchmarks/predict.py [--images 500] [--size 320x240] [--batch-size 32]
                                           [--workers N] [--input-size 224] [--rounds 2]

Both sides run EfficientNet-Lite0 (timm's tf_efficientnet_lite0; imgclf's with the packaged
ImageNet weights wrapped into a run folder) on the same folder of JPEGs (made once under
$IMGCLF_CACHE/bench/), with the same batch size, worker count and preprocessing (resize the short
side to round(S / 0.875) bicubic, centre crop S, normalise). The imgclf side is the function the
CLI calls (`predict_files`: input expansion, the one image loader with its checks, the model,
top-k rows, a CSV file), timed in-process so process start-up is excluded. The baseline is a
torchvision `ImageFolder` + `DataLoader` + `model(x).softmax(1)` loop. Both timings include
building the model (imgclf's also reads the run folder's weights). Rounds alternate between the
two; the best round of each counts. Prints images/s of both and the ratio (target ≥ 0.9).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import timm
import torch
from torchvision import datasets
from torchvision import transforms as T

from imgclf.commands.predict import predict_files
from imgclf.config import ModelConfig
from imgclf.data.example import cache_dir
from imgclf.models import build_model
from imgclf.runs.record import RunDir

from photos import dataset


def lite0_run(runs_dir: Path, size: int) -> Path:
    """EfficientNet-Lite0 with the packaged weights and a 10-class head, as a run folder."""
    model, pre = build_model(ModelConfig(name="efficientnet_lite0"), 10, size)
    run = RunDir.create(runs_dir, f"bench-lite0-{size}")
    run.write_model_json(model.spec, pre.to_dict(), [f"class_{i}" for i in range(10)])
    run.write_weights(model.state_dict())
    return run.path


def baseline(folder: Path, size: int, batch_size: int, workers: int) -> float:
    """The plain loop: images/s (building the model counts, as it does for imgclf)."""
    t0 = time.perf_counter()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
    tf = T.Compose(
        [
            T.Resize(round(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform=tf), batch_size=batch_size, num_workers=workers
    )
    n = 0
    with torch.inference_mode():
        for x, _ in loader:
            model(x).softmax(1)
            n += len(x)
    return n / (time.perf_counter() - t0)


def imgclf_predict(run: Path, folder: Path, batch_size: int, workers: int, out: Path) -> float:
    """What `imgclf predict RUN FOLDER -o OUT.csv` does, in-process: images/s."""
    t0 = time.perf_counter()
    rows = predict_files(
        [str(run), str(folder)], out=out, batch_size=batch_size, workers=workers, device="cpu"
    )
    seconds = time.perf_counter() - t0
    assert all(r["status"] == "ok" for r in rows), "every benchmark image must be predicted"
    return len(rows) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", default="320x240", help="image width x height")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(4, (os.cpu_count() or 2) - 1))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="image folder (default: in the cache)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    folder = args.dir or cache_dir() / "bench" / f"predict-{args.images}-{w}x{h}"
    dataset(folder, args.images, w, h)
    print(
        f"{args.images} JPEGs {w}x{h} → lite0 at {args.input_size}px; batch {args.batch_size}, "
        f"{args.workers} workers, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = lite0_run(Path(tmp) / "runs", args.input_size)
        out = Path(tmp) / "predictions.csv"
        best = {"timm + DataLoader": 0.0, "imgclf predict": 0.0}
        for i in range(args.rounds):
            base = baseline(folder, args.input_size, args.batch_size, args.workers)
            ours = imgclf_predict(run, folder, args.batch_size, args.workers, out)
            print(f"round {i + 1}: timm + DataLoader {base:.1f} img/s, imgclf predict {ours:.1f}")
            best = {
                "timm + DataLoader": max(best["timm + DataLoader"], base),
                "imgclf predict": max(best["imgclf predict"], ours),
            }
    for name, rate in best.items():
        print(f"{name:>18}: {rate:8.1f} images/s")
    ratio = best["imgclf predict"] / best["timm + DataLoader"]
    print(f"{'ratio':>18}: {ratio:8.2f} (target ≥ 0.9)")


if __name__ == "__main__":
    main()
