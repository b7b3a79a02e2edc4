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
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from imgclf.commands.predict import predict_files
from imgclf.config import ModelConfig
from imgclf.data.example import cache_dir
from imgclf.models import build_model
from imgclf.runs.record import RunDir


def make_jpeg(job: tuple[Path, int, int, int]) -> None:
    """A photo-like JPEG: smooth gradients, blocks and noise, different per seed."""
    path, w, h, seed = job
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            127 + 100 * np.sin(xx * rng.uniform(0.002, 0.03) + yy * rng.uniform(0.002, 0.03) + c)
            for c in range(3)
        ],
        axis=-1,
    )
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        img[y0 : y0 + rng.integers(10, 120), x0 : x0 + rng.integers(10, 120)] = rng.uniform(
            0, 255, 3
        )
    img += rng.normal(0, 10, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def dataset(folder: Path, n: int, w: int, h: int) -> Path:
    """n JPEGs in 10 class folders (ImageFolder needs classes), made once."""
    marker = folder.parent / f"{folder.name}.complete"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    jobs = []
    for i in range(n):
        cls = folder / f"class_{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        jobs.append((cls / f"{i:05d}.jpg", w, h, i))
    with ProcessPoolExecutor() as pool:
        list(pool.map(make_jpeg, jobs, chunksize=32))
    marker.write_text("ok\n")
    return folder


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
