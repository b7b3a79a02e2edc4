"""Load test of `imgclf serve` on loopback: N concurrent clients for a bounded time.

    .venv/bin/python benchmarks/serve_load.py [EXPORT] [--clients 8] [--seconds 10]
        [--concurrency 2] [--queue 8] [--image 640x480]

Without EXPORT a tiny scratch CNN is trained on generated images and exported to ONNX first
(a few seconds). The server runs as `imgclf serve` in its own process on a free 127.0.0.1 port;
each client posts the same JPEG to /predict in a loop. Prints requests/s, p50 and p99 latency,
the answers by status and the number of 5xx answers; exits 1 when there is any 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def tiny_export(root: Path) -> Path:
    """Train a 3-class scratch CNN on generated 40-px images and export it (needs torch)."""
    from imgclf.config import load_config
    from imgclf.predict.export import export_onnx
    from imgclf.workflows.training import train

    rng = np.random.default_rng(0)
    for c, name in enumerate("abc"):
        (root / "data" / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (40, 40, 3)) // 2 + 40 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / name / f"{i}.png")
    overrides = [
        f"data.root={root / 'data'}",
        f"runs_dir={root / 'runs'}",
        f"data.manifest={root / 'manifest'}",
        "model.name=scratch_cnn",
        "model.pretrained=none",
        "model.scratch.blocks=2",
        "model.scratch.width=8",
        "data.image_size=32",
        "train.batch_size=8",
        "train.stages=[{epochs: 1, lr: 0.01}]",
        "tracking.mlflow=false",
    ]
    run = train(load_config(None, overrides), progress=False, log=lambda *_: None)
    return export_onnx(run, dynamic_batch=True, log=print).folder


def photo_jpeg(width: int, height: int) -> bytes:
    """A photo-sized JPEG (gradients + noise) so decode and resize cost what they do for real."""
    rng = np.random.default_rng(1)
    x = np.linspace(0, 6, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 3, height, dtype=np.float32)[:, None, None]
    pixels = 127 + 80 * np.sin(x + y + np.array([0, 2, 4], np.float32))
    pixels += rng.normal(0, 20, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_server(export: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "imgclf", "serve", str(export), "--port", str(port)]
    command += ["--concurrency", str(args.concurrency), "--queue", str(args.queue)]
    command += ["--log-level", "warning"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not come up within 60 s")


async def load(url: str, image: bytes, clients: int, seconds: float):
    """``clients`` tasks posting ``image`` until ``seconds`` pass; (latencies, statuses)."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one_client() -> None:
            while time.monotonic() < stop:
                start = time.perf_counter()
                try:
                    r = await client.post("/predict", files={"file": ("p.jpg", image)})
                    statuses[r.status_code] += 1
                except httpx.TransportError as e:
                    statuses[type(e).__name__] += 1
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", nargs="?", type=Path, help="export folder (default: train one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--image", default="640x480", help="WIDTHxHEIGHT of the posted JPEG")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or tiny_export(Path(tmp))
        width, height = (int(v) for v in args.image.split("x"))
        image = photo_jpeg(width, height)
        proc, url = start_server(export, args)
        try:
            httpx.post(f"{url}/predict", files={"file": ("p.jpg", image)}, timeout=30)  # warm up
            started = time.perf_counter()
            latencies, statuses = asyncio.run(load(url, image, args.clients, args.seconds))
            elapsed = time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(10)
    report(latencies, statuses, elapsed, args, len(image))


def report(latencies, statuses: Counter, elapsed: float, args, image_bytes: int) -> None:
    ms = np.array(latencies) * 1000
    non_2xx = sum(n for s, n in statuses.items() if not (isinstance(s, int) and 200 <= s < 300))
    server_errors = sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)
    print(
        f"clients {args.clients}, {args.seconds:g} s, server --concurrency {args.concurrency} "
        f"--queue {args.queue}, {args.image} JPEG ({image_bytes / 1024:.0f} KiB), "
        f"{os.cpu_count()} CPUs"
    )
    print(f"requests     {len(ms)} in {elapsed:.1f} s = {len(ms) / elapsed:.1f} requests/s")
    print(f"latency      p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms")
    print(f"by status    {dict(sorted(statuses.items(), key=str))}")
    print(f"non-2xx      {non_2xx}")
    print(f"5xx          {server_errors}")
    if server_errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
