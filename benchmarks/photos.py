"""Generated photo-like JPEG folders shared by the benchmarks (made once, then reused)."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpeg(job: tuple[Path, int, int, int]) -> None:
    """A photo-like JPEG: smooth colour gradients plus blocks and noise, different per seed."""
    path, w, h, seed = job
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy = rng.uniform(0.002, 0.03, 2).tolist()
        ph = rng.uniform(0, 6.28)
        img[..., c] = 127 + 100 * np.sin(xx * fx + yy * fy + ph)
    for _ in range(8):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        img[y0 : y0 + rng.integers(20, 160), x0 : x0 + rng.integers(20, 160)] = rng.uniform(
            0, 255, 3
        )
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def dataset(folder: Path, n: int, w: int, h: int) -> Path:
    marker = folder.parent / f"{folder.name}.complete"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    jobs = []
    for i in range(n):
        cls = folder / f"class_{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        jobs.append((cls / f"{i:05d}.jpg", w, h, i))
    t0 = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        list(pool.map(make_jpeg, jobs, chunksize=32))
    marker.write_text("ok\n")
    print(f"generated {n} JPEGs of {w}x{h} in {time.perf_counter() - t0:.1f} s")
    return folder
