"""`make gpu-check`: every CUDA code path of imgclf at small size, and the throughput of the four
pipelines of issue 12, in one run of at most 5 minutes on one GPU (16 cores), with no network.

    make gpu-check [GPU_CHECK_ARGS="--out gpu_check.json"]
    .venv/bin/python benchmarks/gpu_check.py [--smoke] [--out gpu_check.json] [--keep]
    PYTHONPATH=src python3 benchmarks/gpu_check.py     # a GPU machine without .venv

It generates its own data, runs each path below in its own try/except (one failure does not stop
the others; its traceback tail goes into the JSON), prints a table of pass / fail / skipped (with
the reason) and the throughput figures, writes everything to --out and exits 1 when a path failed.
Paths go through imgclf's Python API or its CLI (`python -m imgclf`) as a user's would:

  standard, cache-memory-host, cache-memory-device, cache-disk-host   training from the DataLoader
      (1 worker, pinned memory on a GPU) and from the image cache in pinned host memory, on the
      model's device and memory-mapped (`data.cache`, `data.cache_device`)
  bf16-channels-last, fp32-contiguous   `train.precision` / `train.channels_last` both ways
  compile            `train.compile=true`
  kill-resume        `python -m imgclf train` (with a weight average, `ema`) in a subprocess,
                     SIGKILL once its first checkpoint exists, then `train(resume=RUN)` (what
                     `--resume` calls) to status completed (bitwise equality is the CPU fault
                     tests' job, not checked here)
  predict, evaluate, export-onnx   of the `standard` run (predict on the GPU; export's parity)
  torchrun-1         `torchrun --nproc_per_node 1 -m imgclf train`
  mlflow-mirror, sweep-optuna, serve-fastapi   the optional packages' paths: the GPU run mirrored
                     to MLflow, a 2-trial sweep training on the GPU, the run served (torch backend)
  tp-*               fast_path.py's pipelines: (a) torchvision ImageFolder + a plain loop,
                     (b) imgclf standard, (c) imgclf cached, (d) synthetic batches on the device;
                     EfficientNet-Lite0 at 16 and 4 loader workers (at most the cores), then
                     (c) with the cache present, and ResNet-50 for (c) and (d) (tp-*-model2)

Training configs turn MLflow off (`tracking.mlflow=false`): imgclf imports MLflow only to mirror
a finished run, and only the mlflow-mirror path needs it. MLflow, Optuna, FastAPI and onnxruntime
are imported only by their paths; a missing one makes its path "skipped", naming it.
IMGCLF_GPU_CHECK_HIDE=mlflow,optuna,... makes those imports fail here and in the imgclf processes
started here (they run through this file's `--imgclf` entry, which hides them, then runs
`python -m imgclf`), so the CPU smoke test proves the check works without them.

Without a CUDA GPU it says so and exits 0. `--smoke` runs the same paths on the CPU at toy size
(tests/test_gpu_check.py, < 90 s on 2 cores): the tiny model of tests/factory.py, timm's
test_efficientnet / test_resnet for tp-*, in-process loading, `compile` skipped unless
--cpu-compile.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HIDE_ENV = "IMGCLF_GPU_CHECK_HIDE"
REPO = Path(__file__).resolve().parents[1]
# The functional paths' model: a small from-scratch CNN (tests/factory.py's TINY_MODEL on the CPU).
TINY_SMOKE = [
    "model.scratch.blocks=2",
    "model.scratch.width=8",
    "data.image_size=32",
    "train.batch_size=8",
]
TINY_GPU = [
    "model.scratch.blocks=3",
    "model.scratch.width=16",
    "data.image_size=64",
    "train.batch_size=16",
]
# Issue 12's expectation for cached training against the synthetic limit on the GPU.
CACHED_TARGET = {"tf_efficientnet_lite0": 0.93, "resnet50": 0.95}
# The sizes of the tp-* rows: --images … --few-workers, defaults per mode in parse_args.
THROUGHPUT = ("images", "photo", "model", "model2", "size", "batch", "epochs", "workers")
THROUGHPUT += ("few_workers",)


def hide_packages() -> list[str]:
    """Make `import NAME` fail for each NAME in $IMGCLF_GPU_CHECK_HIDE, as if not installed
    (`sys.modules[NAME] = None` is Python's own switch: import raises ModuleNotFoundError and
    importlib.util.find_spec answers None)."""
    names = [n.strip() for n in os.environ.get(HIDE_ENV, "").split(",") if n.strip()]
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    return names


class Skip(Exception):
    """A path that cannot run here, with the reason."""


def need(*packages: str) -> None:
    import importlib

    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            hidden = name in os.environ.get(HIDE_ENV, "").split(",")
            raise Skip(f"{name} is not installed" + f" (hidden by {HIDE_ENV})" * hidden) from None


class Check:
    """The machine, the generated data and the rows of one gpu-check run."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        self.args, self.work, self.rows, self.t0 = args, work, [], time.perf_counter()
        self.smoke = args.smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.runs: dict[str, Path] = {}
        self.hidden = hide_packages()
        self.setup: dict = {}
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])
            ),
            "PYTHONUNBUFFERED": "1",
        }
        self.tiny = tiny_folder(
            work / "tiny",
            per_class=14 if self.smoke else 40,
            size=(56, 48) if self.smoke else (96, 72),
        )
        model = ["model.name=scratch_cnn", *(TINY_SMOKE if self.smoke else TINY_GPU)]
        self.base = [
            *model,
            "model.pretrained=none",
            f"data.root={self.tiny}",
            f"data.manifest={work / 'manifests' / 'tiny'}",
            "data.split.train=0.6",
            "data.split.val=0.2",
            "data.split.test=0.2",
            "train.augment.preset=light",
            f"train.accelerator={self.device.type}",
            "tracking.mlflow=false",
        ]

    def overrides(self, name: str, *extra: str, epochs: int = 1) -> list[str]:
        return [
            *self.base,
            f"train.stages=[{{epochs: {epochs}, lr: 0.01}}]",
            f"runs_dir={self.work / 'runs' / name}",
            *extra,
        ]

    def imgclf(self, *args: str) -> list[str]:
        """The command line of `python -m imgclf ARGS` (through the hiding entry when asked)."""
        if self.hidden:
            return [sys.executable, str(Path(__file__).resolve()), "--imgclf", *args]
        return [sys.executable, "-m", "imgclf", *args]

    def save(self, ratios: list[dict] | None = None) -> list[str]:
        """Write --out (after every path too, so a run cut short still leaves its rows)."""
        failed = [r["path"] for r in self.rows if r["status"] == "fail"]
        record = {
            "setup": self.setup,
            "complete": ratios is not None,
            "seconds": round(time.perf_counter() - self.t0, 1),
            "failed": failed,
            "rows": self.rows,
            "ratios": ratios or [],
        }
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(record, indent=2, default=str))
        return failed

    def attempt(self, path: str, what: str, fn, *fn_args) -> dict:
        import torch

        t0 = time.perf_counter()
        row = {"path": path, "what": what, "status": "pass", "detail": "", "figures": {}}
        try:
            row["detail"], row["figures"] = fn(self, *fn_args)
        except Skip as e:
            row["status"], row["detail"] = "skipped", str(e)
        except Exception as e:
            row["status"], row["detail"] = "fail", f"{type(e).__name__}: {e}".splitlines()[0]
            row["error"] = traceback.format_exc()[-4000:]
        row["seconds"] = round(time.perf_counter() - t0, 2)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.rows.append(row)
        self.save()
        print(
            f"{row['status']:>7}  {path:<20} {row['seconds']:6.1f} s  {row['detail']}", flush=True
        )
        return row


def tiny_folder(folder: Path, per_class: int, size: tuple[int, int]) -> Path:
    """Three classes of small photo-like JPEGs (benchmarks/photos.py's generator)."""
    from photos import make_jpeg

    for i in range(3 * per_class):
        cls = folder / f"class_{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        make_jpeg((cls / f"{i:04d}.jpg", *size, 1000 + i))
    return folder


def quiet(*_args, **_kwargs) -> None:
    return None


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def completed(run: Path) -> tuple[str, dict]:
    s = summary_of(run)
    if s["status"] != "completed":
        raise RuntimeError(f"{run.name}: status {s['status']} ({s.get('error')})")
    acc = s["test"].get("test_accuracy")
    figures = {"epochs": s["epochs"], "images_per_s": s["images_per_s"], "test_accuracy": acc}
    return f"{s['epochs']} epoch(s), {s['images_per_s']} img/s, test acc {acc:.3f}", figures


def train_path(check: Check, name: str, extra: str) -> tuple[str, dict]:
    from imgclf.config import load_config
    from imgclf.workflows.training import train

    cfg = load_config(None, check.overrides(name, *extra.split()))
    check.runs[name] = train(cfg, progress=False, log=quiet)
    return completed(check.runs[name])


# path → overrides; each trains the tiny model through `imgclf.workflows.training.train`
TRAININGS = {
    "standard": "train.workers=1",
    "cache-memory-host": "data.cache=memory data.cache_device=host",
    "cache-memory-device": "data.cache=memory data.cache_device=device",
    "cache-disk-host": "data.cache=disk data.cache_device=host",
    "bf16-channels-last": "train.precision=bf16-mixed train.channels_last=true",
    "fp32-contiguous": "train.precision=32-true train.channels_last=false",
}


def compile_path(check: Check) -> tuple[str, dict]:
    if check.smoke and not check.args.cpu_compile:
        raise Skip(
            "CPU smoke: a cold torch.compile takes 25-50 s on 2 cores, over the smoke's "
            "budget (--cpu-compile runs it)"
        )
    return train_path(check, "compile", "train.compile=true")


def kill_resume(check: Check) -> tuple[str, dict]:
    """SIGKILL `imgclf train` once its first checkpoint exists, then resume it."""
    runs = check.work / "runs" / "kill"
    # with a weight average, whose update, validation swap and restore run on the device
    args = check.overrides(
        "kill", "train.checkpoint_every=1", "train.stages.0.ema=1.0", epochs=4 if check.smoke else 6
    )
    log = open(check.work / "kill.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*check.imgclf("train", *args, "--no-progress")],
        env=check.env,
        cwd=check.work,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + check.args.timeout
    try:
        while not list(runs.glob("*/checkpoints/last.pt")):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"imgclf train ended (rc {proc.returncode}) before its first "
                    f"checkpoint: {tail(check.work / 'kill.log')}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"no checkpoint after {check.args.timeout} s")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    (run,) = runs.iterdir()
    state = summary_of(run)["status"]
    if state != "running":
        raise RuntimeError(f"the run was already {state} when killed: nothing was resumed")
    from imgclf.workflows.training import train

    train(resume=run, progress=False, log=quiet)  # what `imgclf train --resume RUN` calls
    detail, figures = completed(run)
    return f"killed at the first checkpoint, resumed: {detail}", figures


def tail(path: Path, n: int = 800) -> str:
    return path.read_text(errors="replace")[-n:]


def trained_run(check: Check) -> Path:
    if "standard" not in check.runs:
        raise Skip("needs the run of the `standard` path, which did not finish")
    return check.runs["standard"]


def predict_path(check: Check) -> tuple[str, dict]:
    from imgclf.commands.predict import predict_files

    run = trained_run(check)
    rows = predict_files(
        [str(run), str(check.tiny)], out=check.work / "predict.csv", device=check.device.type
    )
    bad = [r for r in rows if r["status"] != "ok"]
    if bad or not rows:
        raise RuntimeError(f"{len(bad)} of {len(rows)} images not predicted: {bad[:2]}")
    return f"{len(rows)} images on {check.device.type}", {"images": len(rows)}


def evaluate_path(check: Check) -> tuple[str, dict]:
    from imgclf.evaluate.evaluate import evaluate_run

    result = evaluate_run(trained_run(check), progress=False)
    if not (result.folder / "metrics.json").is_file():
        raise RuntimeError(f"no metrics.json in {result.folder}")
    acc, n = result.record["metrics"].get("accuracy"), result.record["images"]["evaluated"]
    return f"{n} test images, accuracy {acc:.3f}", {"accuracy": acc, "images": n}


def export_path(check: Check) -> tuple[str, dict]:
    need("onnx", "onnxscript", "onnxruntime")
    from imgclf.predict.export import export_onnx

    result = export_onnx(trained_run(check), log=quiet)
    diff = result.max_abs_diff
    return f"parity on {result.images} {result.source} images: {diff:.1e}", {"max_abs_diff": diff}


def fit_path(check: Check) -> tuple[str, dict]:
    """`imgclf fit` end to end on the device (a scratch CNN only in the CPU smoke run): the
    budget, the last three lines and a chosen folder."""
    budget = 20 if check.smoke else 150
    args = ["fit", str(check.tiny), "--time", f"{budget}s", "--device", check.device.type]
    args += ["--runs-dir", str(check.work / "runs" / "fit"), "--fits-dir", str(check.work / "fits")]
    args += ["--no-mlflow", "--no-progress"]
    args += ["--models", "scratch_small"] if check.smoke else ["--quality", "good"]
    t0 = time.perf_counter()
    done = subprocess.run(
        check.imgclf(*args),
        cwd=check.work,
        env=check.env,
        capture_output=True,
        text=True,
        timeout=budget * 3 + 120,
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"imgclf fit exited {done.returncode}: {done.stderr[-600:]}")
    chosen, acc, bal = (line.split(": ", 1)[1] for line in done.stdout.strip().splitlines()[-3:])
    if not Path(chosen).is_dir():
        raise RuntimeError(f"the chosen folder {chosen} does not exist")
    if seconds > budget * 1.1 + 30:  # + the interpreter's start and the imports
        raise RuntimeError(f"{seconds:.0f} s for a {budget} s budget")
    figures = {"seconds": round(seconds, 1), "budget": budget, "test_accuracy": float(acc)}
    return f"{Path(chosen).name}: test accuracy {acc}, balanced {bal}, {seconds:.0f} s", figures


def torchrun_path(check: Check) -> tuple[str, dict]:
    runs = check.work / "runs" / "torchrun"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    entry = check.imgclf("train")[1:]  # `-m imgclf train` or `gpu_check.py --imgclf train`
    done = subprocess.run(
        [*launcher, *entry, *check.overrides("torchrun"), "--no-progress"],
        env={**check.env, "OMP_NUM_THREADS": "1"},
        cwd=check.work,
        capture_output=True,
        text=True,
        timeout=check.args.timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"torchrun exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}"
        )
    (run,) = runs.iterdir()
    processes = json.loads((run / "environment.json").read_text())["processes"]
    detail, figures = completed(run)
    return f"{processes} process: {detail}", figures


def mlflow_path(check: Check) -> tuple[str, dict]:
    need("mlflow")
    from imgclf.config import TrackingConfig
    from imgclf.runs.tracking import mirror_run

    said: list[str] = []
    run = trained_run(check)
    mlflow_id = mirror_run(run, TrackingConfig(mlflow=True), run.parent, log=said.append)
    if mlflow_id is None:
        raise RuntimeError(" ".join(said) or "mirror_run returned no MLflow run")
    return f"mirrored to {run.parent / 'mlflow.db'}", {"mlflow_run_id": mlflow_id}


def sweep_path(check: Check) -> tuple[str, dict]:
    need("optuna")
    import yaml

    from imgclf.sweep.runner import run_sweep

    spec = check.work / "gpu_check_sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "overrides": check.overrides("sweep"),
                "method": "grid",
                "parameters": {"train.stages.0.lr": {"values": [0.01, 0.003]}},
            }
        )
    )
    states = [t.state.name for t in run_sweep(spec, log=quiet).study().get_trials()]
    if states != ["COMPLETE", "COMPLETE"]:
        raise RuntimeError(f"trial states {states}")
    return "2 grid trials in one process, both complete", {"trials": len(states)}


def serve_path(check: Check) -> tuple[str, dict]:
    need("fastapi", "httpx")
    from fastapi.testclient import TestClient

    from imgclf.serve.app import create_app
    from imgclf.serve.backend import open_backend

    backend = open_backend(trained_run(check), "torch")
    image = next(check.tiny.rglob("*.jpg"))
    with TestClient(create_app(backend)) as client:
        r = client.post("/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    if r.status_code != 200:
        raise RuntimeError(f"POST /predict: {r.status_code} {r.text[:300]}")
    return "POST /predict → 200 (torch backend; serving has no CUDA path)", {}


FUNCTIONAL = [
    ("compile", "train, train.compile=true", compile_path),
    ("kill-resume", "imgclf train subprocess, SIGKILL, resume", kill_resume),
    ("predict", "predict with the standard run", predict_path),
    ("evaluate", "evaluate the standard run", evaluate_path),
    ("export-onnx", "ONNX export of the standard run + parity", export_path),
    ("torchrun-1", "torchrun --nproc_per_node 1 -m imgclf train", torchrun_path),
    ("fit", "imgclf fit on the device, with its time budget", fit_path),
    ("mlflow-mirror", "mirror the standard run to MLflow", mlflow_path),
    ("sweep-optuna", "imgclf sweep, 2 trials (Optuna storage)", sweep_path),
    ("serve-fastapi", "serve the standard run (FastAPI)", serve_path),
]


def throughput(check: Check) -> list[dict]:
    """fast_path.py's (a)–(d) at a small size, one row each; returns the ratios."""
    import fast_path

    from photos import dataset

    a, device = check.args, check.device
    folder = check.work / "photos"

    def generate(_check):
        t0 = time.perf_counter()
        dataset(folder, a.images, *a.photo_size)
        return f"{a.images} JPEGs of {a.photo} in {time.perf_counter() - t0:.1f} s", {}

    if check.attempt("tp-data", "generate the photo-like JPEGs", generate)["status"] != "pass":
        return []
    first = argparse.Namespace(
        model=a.model,
        size=a.size,
        batch=a.batch,
        epochs=a.epochs,
        steps_per_epoch=int(a.images * 0.9) // a.batch,
    )
    second = argparse.Namespace(**{**vars(first), "model": a.model2})
    image_cache = Path(os.environ["IMGCLF_CACHE"]) / "images"

    def run(kind: str, ns: argparse.Namespace, workers: int | None):
        def go(_check):
            if kind == "a":
                out = fast_path.conventional(ns, folder, workers, device)
            elif kind == "d":
                out = fast_path.synthetic(ns, device)
            else:
                if kind == "c-build":  # the cache build is part of this pipeline's run
                    shutil.rmtree(image_cache, ignore_errors=True)
                cache = "none" if kind == "b" else "auto"
                out = fast_path.imgclf_pipeline(ns, folder, cache, workers, device)
            out = {**out, "model": ns.model, "workers": workers}
            rate, step = out["steady_images_per_s"], out["first_step_s"]
            return f"{ns.model}: {rate:,.0f} img/s, first step {step:.1f} s", out

        return go

    plan = []
    counts = [("", a.workers)] + [("-few", a.few_workers)] * (a.few_workers != a.workers)
    for suffix, w in counts:
        plan += [
            (f"tp-a{suffix}", f"(a) torchvision ImageFolder + plain loop, {w} workers", "a", w),
            (f"tp-b{suffix}", f"(b) imgclf standard, {w} workers", "b", w),
            (f"tp-c{suffix}", f"(c) imgclf cached, its build included, {w} workers", "c-build", w),
        ]
    plan += [
        ("tp-c-present", "(c) imgclf cached, cache present, 0 workers", "c", 0),
        ("tp-d", "(d) synthetic batches on the device", "d", None),
    ]
    for path, what, kind, w in plan:
        check.attempt(path, what, run(kind, first, w))
    check.attempt("tp-c-model2", f"(c) imgclf cached, {a.model2}", run("c", second, a.workers))
    check.attempt("tp-d-model2", f"(d) synthetic, {a.model2}", run("d", second, None))
    return ratios(check, counts)


def ratios(check: Check, counts: list) -> list[dict]:
    """(c)/(d) per model, (b)/(a) per worker count, first step with the cache present."""
    a = check.args
    got = {r["path"]: r["figures"] for r in check.rows}

    def ratio(name: str, top: str, bottom: str, target: float | None) -> dict:
        x, y = (got.get(p, {}).get("steady_images_per_s") for p in (top, bottom))
        value = round(x / y, 3) if x and y else None
        met = None if value is None or target is None else value >= target
        return {"name": name, "value": value, "target": target and f">= {target:g}", "met": met}

    out = [
        ratio(f"c/d {a.model}", "tp-c", "tp-d", CACHED_TARGET.get(a.model)),
        ratio(f"c/d {a.model2}", "tp-c-model2", "tp-d-model2", CACHED_TARGET.get(a.model2)),
    ]
    for suffix, w in counts:
        out.append(ratio(f"b/a {w} workers", f"tp-b{suffix}", f"tp-a{suffix}", 1.0))
    step = got.get("tp-c-present", {}).get("first_step_s")
    met = None if step is None else step <= 5.0
    out.append({"name": "first step s, cache present", "value": step, "target": "<= 5", "met": met})
    return out


def print_report(check: Check, ratios: list[dict]) -> None:
    print("\n| path | what | status | s | detail |\n|---|---|---|---|---|")
    for r in check.rows:
        print(f"| {r['path']} | {r['what']} | {r['status']} | {r['seconds']:.1f} | {r['detail']} |")
    print("\n| pipeline | model | workers | first step s | cache build s | steady img/s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in check.rows:
        f = r["figures"]
        if "steady_images_per_s" in f:
            workers = "–" if f["workers"] is None else f["workers"]
            print(
                f"| {r['path']} | {f['model']} | {workers} | {f['first_step_s']:.1f} | "
                f"{f.get('cache_build_s', 0):.1f} | {f['steady_images_per_s']:,.0f} | "
                f"{f['wall_s']:.1f} |"
            )
    print()
    for r in ratios:
        value = "–" if r["value"] is None else f"{r['value']:.3f}"
        if r["target"] is None:
            note = "no target for this model"
        elif check.smoke:
            note = f"target {r['target']} applies to the GPU run"
        else:
            met = {None: "not measured", True: "met", False: "NOT met"}[r["met"]]
            note = f"target {r['target']}: {met}"
        print(f"{r['name']}: {value} ({note})")


def setup_info(check: Check) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not check.smoke
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "mode": "smoke (CPU)" if check.smoke else "gpu",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "commit": commit or None,
        "interpreter": sys.executable,
        "hidden": check.hidden,
        "throughput": {k: getattr(check.args, k) for k in THROUGHPUT},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every path on the CPU at toy size")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--workdir", type=Path, help="default: a temporary folder, removed after")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--only", help="comma-separated paths to run (default: all)")
    ap.add_argument("--images", type=int, help="generated JPEGs for tp-* (GPU 3000, smoke 100)")
    ap.add_argument("--photo", help="their W x H (GPU 500x375, smoke 64x48)")
    ap.add_argument(
        "--model", help="tp-* model (GPU tf_efficientnet_lite0, smoke timm's test_efficientnet)"
    )
    ap.add_argument(
        "--model2", help="the second model for (c) and (d) (GPU resnet50, smoke test_resnet)"
    )
    ap.add_argument("--size", type=int, help="input size for tp-* (GPU 224, smoke 32)")
    ap.add_argument("--batch", type=int, help="batch for tp-* (GPU 256, smoke 16)")
    ap.add_argument("--epochs", type=int, help="epochs for tp-* (GPU 3, smoke 2)")
    ap.add_argument("--workers", type=int, help="loader workers (min(16, cores); smoke 0)")
    ap.add_argument("--few-workers", type=int, help="a second count (min(4, cores); smoke: none)")
    ap.add_argument("--cpu-compile", action="store_true", help="smoke: run `compile` too")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per subprocess")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    gpu = [
        3000,
        "500x375",
        "tf_efficientnet_lite0",
        "resnet50",
        224,
        256,
        3,
        min(16, cores),
        min(4, cores),
    ]
    smoke = [100, "64x48", "test_efficientnet", "test_resnet", 32, 16, 2, 0, 0]
    for key, value in zip(THROUGHPUT, smoke if args.smoke else gpu, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.photo_size = tuple(int(v) for v in args.photo.lower().split("x"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hide_packages()
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach for the network
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check; run with --smoke for the CPU-sized smoke run")
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="imgclf-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["IMGCLF_CACHE"] = str(work / "cache")  # fresh caches, nothing of the user's
    try:
        check = Check(args, work)
        check.setup = setup_info(check)
        print(json.dumps(check.setup))
        only = set(args.only.split(",")) if args.only else None
        for path, extra in TRAININGS.items():
            if only is None or path in only:
                check.attempt(path, f"train, {extra}", train_path, path, extra)
        for path, what, fn in FUNCTIONAL:
            if only is None or path in only:
                check.attempt(path, what, fn)
        ratios = throughput(check) if only is None or "tp" in only else []
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_report(check, ratios)
    failed = check.save(ratios)
    seconds = time.perf_counter() - check.t0
    print(f"\n{len(check.rows)} paths, {len(failed)} failed, {seconds:.0f} s → {args.out}")
    return 1 if failed else 0


def imgclf_entry(argv: list[str]) -> None:
    """`gpu_check.py --imgclf ARGS`: `python -m imgclf ARGS` with the hidden packages hidden."""
    hide_packages()
    sys.argv = ["imgclf", *argv]
    sys.path[0] = os.getcwd()  # as `python -m` has it (src comes from PYTHONPATH)
    runpy.run_module("imgclf", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--imgclf"]:
        imgclf_entry(sys.argv[2:])
    else:
        sys.exit(main())
