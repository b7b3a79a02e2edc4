"""`imgclf fit --quality good` against a linear probe on the held-in data set, in one run.

    .venv/bin/python benchmarks/fit_heldin.py [--time 30m] [--probe-only] [--out FILE]
        [--data DIR] [--workdir DIR] [--probe-crop-mode center|squash]

Data: the openclipart9 class folders (`make heldin-data`, benchmarks/heldin_data.py). Before
anything, imgclf's own `scan` and `split --train 0.55 --val 0.15 --test 0.30` write one manifest
into WORKDIR/manifests/openclipart9 (default WORKDIR: $IMGCLF_CACHE/bench/fit_heldin); both
parts below read that manifest, so they see the same split.

(a) Linear probe: EfficientNet-Lite0 with its packaged ImageNet weights, pooled features of every
    image through the model's own eval preprocessing (imgclf's eval transform and loader; its
    centre crop, or the whole image squashed with --probe-crop-mode squash); a standardised
    scikit-learn LogisticRegression fitted on train, C chosen on val from a small grid,
    accuracy and balanced accuracy on test.
(b) `imgclf fit MANIFEST --quality good --time T` in a subprocess (in WORKDIR, so its runs stay
    there); its last three stdout lines are `chosen: PATH`, `test_accuracy: X`,
    `balanced_accuracy: X`.
(c) The time of each part, the gap fit − probe in points (the issue asks for ≥ 10), whether fit
    kept its time budget (+10 %), and a JSON of every figure (--out).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from heldin_data import dataset_folder, is_complete
from imgclf.data.example import cache_dir
from imgclf.files import atomic_write_json

SPLIT = {"train": 0.55, "val": 0.15, "test": 0.30}
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
BUDGET_SLACK = 0.10
TAIL_KEYS = ("chosen", "test_accuracy", "balanced_accuracy")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


class BenchError(RuntimeError):
    """A step failed: what, and what to do."""


def child_env() -> dict[str, str]:
    """This environment with PYTHONPATH made absolute: the children run in another folder."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        parts = env["PYTHONPATH"].split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in parts if p)
    return env


def imgclf(args: list[str], cwd: Path) -> None:
    """`python -m imgclf ARGS`, its output shown as it comes."""
    cmd = [sys.executable, "-m", "imgclf", *args]
    print(f"$ imgclf {' '.join(args)}", flush=True)
    if subprocess.run(cmd, cwd=cwd, env=child_env()).returncode != 0:
        raise BenchError(f"`imgclf {' '.join(args)}` failed (its output is above)")


def prepare_manifest(data: Path, workdir: Path, seed: int = 0) -> Path:
    """Scan `data` and split it 55/15/30 with imgclf's commands; the manifest folder."""
    manifest = workdir / "manifests" / data.name
    imgclf(["scan", str(data), "-o", str(manifest)], workdir)
    fractions = [f"--{k}={v}" for k, v in SPLIT.items()]
    imgclf(["split", str(manifest), *fractions, f"--seed={seed}"], workdir)
    return manifest


# ---------------------------------------------------------------- (a) the linear probe


def pooled_features(model, dataset, device, batch_size: int, workers: int, show: bool, name=""):
    """Pooled backbone features of every item of `dataset`, its targets and a load mask."""
    import numpy as np
    import torch

    from imgclf.data.loaders import make_loader
    from imgclf.progress import progress_bar

    x = np.zeros((len(dataset), model.head.pooled_dim), np.float32)
    ok = np.zeros(len(dataset), bool)
    model.eval()
    loader = make_loader(dataset, batch_size, workers=workers)
    with torch.inference_mode(), progress_bar(f"features {name}", len(dataset), show) as advance:
        for batch in loader:
            if batch["x"] is not None:
                fmap = model.forward_features(batch["x"].to(device))
                idx = batch["index"].numpy()
                x[idx], ok[idx] = model.head.pool(fmap).float().cpu().numpy(), True
            advance(len(batch["index"]) + len(batch["bad"]))
    return x, np.asarray(dataset.targets, np.int64), ok


def split_features(
    manifest_dir: Path, *, batch_size=64, image_size=None, progress=True, crop_mode=None
) -> dict:
    """{split: (features, targets)} of Lite0 (packaged weights) through its eval preprocessing."""
    import torch

    from imgclf.config import ModelConfig
    from imgclf.data.loaders import ManifestDataset, resolve_workers
    from imgclf.data.manifest import read_manifest
    from imgclf.data.transforms import eval_transform
    from imgclf.models import build_model

    manifest = read_manifest(manifest_dir)
    manifest.require_usable(manifest_dir)
    if not manifest.has_split:
        raise BenchError(f"{manifest_dir} has no split; run `imgclf split {manifest_dir}`")
    cfg = ModelConfig(name="efficientnet_lite0", pretrained="packaged")
    model, pre = build_model(cfg, len(manifest.labels), image_size, crop_mode)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    scan = manifest.settings
    common = {"size_hint": pre.input_size, "max_pixels": scan.get("max_pixels", 89_478_485),
              "min_side": scan.get("min_side", 8)}  # fmt: skip
    out, dropped = {}, 0
    for split in SPLIT:
        entries = manifest.split_entries(split)
        ds = ManifestDataset(manifest.root, entries, manifest.labels, eval_transform(pre), **common)
        workers = resolve_workers("auto", len(ds), device.type)["workers"]
        x, y, ok = pooled_features(model, ds, device, batch_size, workers, progress, split)
        out[split], dropped = (x[ok], y[ok]), dropped + int((~ok).sum())
    return {"features": out, "unreadable": dropped, "preprocessing": pre.to_dict()}


def fit_probe(features: dict, c_grid=C_GRID, seed: int = 0) -> dict:
    """Standardised LogisticRegression on train, C by val accuracy (ties: the smaller C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xt, yt), (xv, yv), (xs, ys) = (features[s] for s in SPLIT)

    def fitted(c: float):
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed)
        return make_pipeline(StandardScaler(), clf).fit(xt, yt)

    val = {c: accuracy_score(yv, fitted(c).predict(xv)) for c in c_grid}
    best = max(c_grid, key=lambda c: (val[c], -c))
    pred = fitted(best).predict(xs)
    return {
        "accuracy": float(accuracy_score(ys, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(ys, pred)),
        "C": best,
        "val_accuracy_by_C": {str(c): round(float(v), 4) for c, v in val.items()},
        "images": {s: len(features[s][1]) for s in SPLIT},
    }


def linear_probe(
    manifest_dir: Path, *, batch_size=64, image_size=None, progress=True, crop_mode=None
) -> dict:
    """(a): the probe's figures, with the seconds of feature extraction and of the fits."""
    t0 = time.perf_counter()
    extracted = split_features(
        manifest_dir,
        batch_size=batch_size,
        image_size=image_size,
        progress=progress,
        crop_mode=crop_mode,
    )
    t1 = time.perf_counter()
    print(f"features in {t1 - t0:.1f} s; logistic regression over C in {list(C_GRID)} …")
    result = fit_probe(extracted["features"])
    t2 = time.perf_counter()
    return {
        **result,
        "unreadable": extracted["unreadable"],
        "preprocessing": extracted["preprocessing"],
        "feature_seconds": round(t1 - t0, 1),
        "fit_seconds": round(t2 - t1, 1),
        "seconds": round(t2 - t0, 1),
    }


# ---------------------------------------------------------------- (b) imgclf fit


def parse_duration(text: str) -> float:
    """`30m`, `90s`, `1h`, `1h30m`, `2.5h` → seconds (a unit is required)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise BenchError(f"cannot read the time budget {text!r}; write it like 30m, 90s or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def parse_fit_tail(lines: list[str]) -> dict:
    """The last three stdout lines of `imgclf fit`: chosen, test_accuracy, balanced_accuracy."""
    tail = [ln.rstrip() for ln in lines]
    while tail and not tail[-1]:
        tail.pop()
    tail = tail[-3:]
    values = {}
    for key, line in zip(TAIL_KEYS, tail, strict=False):
        prefix = f"{key}: "
        if line.startswith(prefix):
            values[key] = line[len(prefix) :].strip()
    if len(values) != 3:
        shown = "\n  ".join(tail) or "(no output)"
        raise BenchError(
            f"imgclf fit's last three lines should be {', '.join(k + ': …' for k in TAIL_KEYS)};"
            f" got:\n  {shown}"
        )
    try:
        return {
            "chosen": values["chosen"],
            "accuracy": float(values["test_accuracy"]),
            "balanced_accuracy": float(values["balanced_accuracy"]),
        }
    except ValueError as e:
        raise BenchError(f"imgclf fit printed a figure that is not a number: {e}") from None


def run_fit(manifest: Path, workdir: Path, budget: str) -> dict:
    """(b): `imgclf fit MANIFEST --quality good --time BUDGET`, its stdout shown and parsed."""
    args = ["fit", str(manifest.resolve()), "--quality", "good", "--time", budget]
    print(f"$ imgclf {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "imgclf", *args],
        cwd=workdir,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"`imgclf {' '.join(args)}` exited with {proc.returncode}")
    return {
        **parse_fit_tail(lines),
        "seconds": round(seconds, 1),
        "command": f"imgclf {' '.join(args)}",
    }


# ---------------------------------------------------------------- (c) the summary


def summary(record: dict) -> list[str]:
    """The lines printed at the end: each part's figures and time, the gap, the budget."""
    p, lines = record["probe"], []
    lines.append(f"scan + split: {record['prepare_seconds']:.1f} s ({record['manifest']})")
    mode = p["preprocessing"].get("crop_mode", "center")
    lines.append(
        f"linear probe (Lite0 features, {mode} crop, C={p['C']:g}): accuracy {p['accuracy']:.4f}, "
        f"balanced accuracy {p['balanced_accuracy']:.4f}, {p['seconds']:.1f} s "
        f"(features {p['feature_seconds']:.1f} s)"
    )
    f = record.get("fit")
    if f is None:
        lines.append("imgclf fit: not run (--probe-only)")
        return lines
    lines.append(
        f"imgclf fit --quality good: accuracy {f['accuracy']:.4f}, balanced accuracy "
        f"{f['balanced_accuracy']:.4f}, {f['seconds']:.1f} s ({f['chosen']})"
    )
    gap = record["gap_points"]
    lines.append(
        f"gap fit − probe: {gap['accuracy']:+.1f} points accuracy, "
        f"{gap['balanced_accuracy']:+.1f} balanced ({'≥' if gap['accuracy'] >= 10 else '<'} 10)"
    )
    b = record["budget"]
    lines.append(
        f"time budget {b['text']} ({b['seconds']:.0f} s, +10 % = {b['limit_seconds']:.0f} s): "
        f"fit used {f['seconds']:.0f} s, {'within' if b['within'] else 'OVER'} budget"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="class-folder tree (default: openclipart9)")
    ap.add_argument("--workdir", type=Path, help="default: $IMGCLF_CACHE/bench/fit_heldin")
    ap.add_argument("--time", default="30m", help="imgclf fit's budget (default 30m)")
    ap.add_argument("--probe-only", action="store_true", help="skip imgclf fit")
    ap.add_argument("--out", type=Path, help="JSON of every figure (default WORKDIR/...json)")
    ap.add_argument("--batch-size", type=int, default=64, help="probe feature batches")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed")
    ap.add_argument(
        "--probe-crop-mode",
        choices=("center", "squash"),
        default="center",
        help="the probe's eval crop (default center, Lite0's own: the issue's reference)",
    )
    args = ap.parse_args(argv)
    data = (args.data or dataset_folder()).resolve()
    if args.data is None and not is_complete(data):
        print(f"error: {data} is missing; fetch it with `make heldin-data`", file=sys.stderr)
        return 1
    workdir = (args.workdir or cache_dir() / "bench" / "fit_heldin").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or workdir / "fit_heldin.json"
    try:
        budget = parse_duration(args.time)
        t0 = time.perf_counter()
        manifest = prepare_manifest(data, workdir, args.seed)
        record = {"data": str(data), "manifest": str(manifest), "split": SPLIT, "seed": args.seed}
        record["prepare_seconds"] = round(time.perf_counter() - t0, 1)
        record["probe"] = linear_probe(
            manifest, batch_size=args.batch_size, crop_mode=args.probe_crop_mode
        )
        if not args.probe_only:
            fit = record["fit"] = run_fit(manifest, workdir, args.time)
            record["gap_points"] = {
                k: round(100 * (fit[k] - record["probe"][k]), 1)
                for k in ("accuracy", "balanced_accuracy")
            }
            limit = budget * (1 + BUDGET_SLACK)
            record["budget"] = {"text": args.time, "seconds": budget, "limit_seconds": limit,
                                "within": fit["seconds"] <= limit}  # fmt: skip
        record["total_seconds"] = round(time.perf_counter() - t0, 1)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    for line in summary(record):
        print(line)
    print(f"total: {record['total_seconds']:.1f} s; figures → {out}")
    atomic_write_json(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
