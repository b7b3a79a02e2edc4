"""Scan throughput against the machine's own Pillow decode rate, measured in the same run.

    .venv/bin/python benchmarks/scan.py [--files 5000] [--size 640x480] [--dir DIR]

Prints files/s for (1) a plain single-core Pillow decode loop, (2) a full `scan` with one worker
per core, (3) the re-scan of the unchanged folder, and the ratios the foundation issue targets:
full scan ≥ 0.8 × cores × single-core decode rate; re-scan ≥ 20× faster than the first scan.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from imgclf.config import ScanConfig
from imgclf.data.example import cache_dir
from imgclf.data.scan import scan_to

from photos import dataset


def single_core_decode_rate(files: list[Path], seconds: float = 5.0) -> float:
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and done < len(files):
        with Image.open(files[done]) as im:
            im.load()
        done += 1
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--dir", type=Path, default=None, help="where the generated JPEGs are kept")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    folder = args.dir or cache_dir() / "bench" / f"jpeg-{args.files}-{w}x{h}"
    data = dataset(folder, args.files, w, h)
    files = sorted(data.rglob("*.jpg"))
    cores = os.cpu_count() or 1

    single_core_decode_rate(files[:200], seconds=1.0)  # warm the page cache and the code paths
    decode = single_core_decode_rate(files)
    out = Path(tempfile.mkdtemp(prefix="imgclf-scan-bench-"))
    try:
        t0 = time.perf_counter()
        first = scan_to(data, out, ScanConfig(workers=cores), progress=False)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = scan_to(data, out, ScanConfig(workers=cores), progress=False)
        t_again = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert len(first.ok_entries) == len(again.ok_entries) == len(files)
    assert again.report["files"]["reused"] == len(files)

    n = len(files)
    scan_rate, rescan_rate = n / t_first, n / t_again
    limit = cores * decode
    print(f"files: {n} JPEGs {w}x{h}; cores: {cores}; Pillow {Image.__version__}")
    print(f"single-core Pillow decode:  {decode:8.1f} files/s")
    print(f"cores x single-core:        {limit:8.1f} files/s (the reference)")
    print(f"full scan:                  {scan_rate:8.1f} files/s  ({t_first:.2f} s)")
    print(f"re-scan, unchanged:         {rescan_rate:8.1f} files/s  ({t_again:.2f} s)")
    print(f"full scan / reference:      {scan_rate / limit:8.2f}   (target >= 0.80)")
    print(f"re-scan speed-up:           {t_first / t_again:8.1f}x  (target >= 20x)")


if __name__ == "__main__":
    main()
