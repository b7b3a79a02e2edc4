"""docs/RELIABILITY.md F1 and F2: a training killed with SIGKILL again and again — at random
moments from outside, inside checkpoint writes, between a complete temporary file and its rename,
inside other run files — resumes every time from the newest complete checkpoint, never leaves a
partial file under a final name, and ends with exactly the weights and metrics of a run never
killed.

The kill points are drawn from a seeded generator; a failure prints the seed, and
IMGCLF_FAULT_SEED=<seed> replays the same sequence.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from imgclf.config import load_config
from imgclf.files import is_temp_name
from imgclf.runs.checkpoint import load_checkpoint
from imgclf.workflows.training import train
from test_train import TINY, metrics_without_time, same_weights

import factory as fx

INJECT = Path(__file__).parent / "inject.py"
TRIALS = 10


def fault_plan(rng: random.Random) -> list[str]:
    """TRIALS faults that each land for sure while the run still has work: the fresh run dies in
    its first weights write (the first epoch's best); then, shuffled, a metrics.csv write, at
    least two checkpoint writes and a kill before a rename, and random picks among those and
    kills from outside (each consumes at most a few batches, or one epoch for metrics.csv)."""
    rest = ["file:metrics.csv:1", "write:2:0.5", "rename:2", "external"]
    while len(rest) < TRIALS - 1:
        kind = rng.choice(["write", "rename", "external"])
        nth = rng.randint(2, 3)
        if kind == "write":
            rest.append(f"write:{nth}:{rng.choice([0.0, 0.01, 0.5, 0.99])}")
        elif kind == "rename":
            rest.append(f"rename:{nth}")
        else:
            rest.append("external")
    rng.shuffle(rest)
    return ["file:model.safetensors:1", *rest]


def launch(fault: str, args: list[str]) -> subprocess.Popen:
    inner = "none" if fault == "external" else fault
    return subprocess.Popen(
        [sys.executable, str(INJECT), inner, "--", "train", *args, "--no-progress"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_from_outside(proc: subprocess.Popen, runs: Path, rng: random.Random) -> None:
    """Wait for this process's first checkpoint, then SIGKILL it a random moment later."""

    def stamp():
        ckpts = list(runs.glob("*/checkpoints/last.pt"))
        return ckpts[0].stat().st_mtime_ns if ckpts else None

    before, deadline = stamp(), time.time() + 180
    while stamp() == before and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)


def assert_whole(run: Path) -> None:
    """F2: every file under its final name is complete."""
    for name in ("config.yaml", "summary.json", "data.json", "environment.json", "model.json"):
        text = (run / name).read_text()
        if name.endswith(".json"):
            json.loads(text)
    load_checkpoint(run / "checkpoints" / "last.pt")  # checksum over every tensor
    if (run / "model.safetensors").exists():
        load_file(run / "model.safetensors")
    if (run / "metrics.csv").exists():
        rows = metrics_without_time(run)
        assert all(len(r) == len(rows[0]) and None not in r.values() for r in rows)


def test_ten_random_kills_then_resume_equal_an_uninterrupted_run(tmp_path):
    seed = int(os.environ.get("IMGCLF_FAULT_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    data = fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=40, size=(40, 40)
    )
    args = [
        *TINY,
        "train.stages=[{epochs: 4, lr: 0.01}, {trainable: head, epochs: 1, lr: 0.001}]",
        "train.checkpoint_every=1",
        f"data.root={data}",
        f"data.manifest={tmp_path / 'manifest'}",
    ]
    ref = train(
        load_config(None, [*args, f"runs_dir={tmp_path / 'ref'}"]), progress=False, log=print
    )
    runs = tmp_path / "runs"
    kills, log = 0, []
    for i, fault in enumerate(fault_plan(rng)):
        run = next(runs.iterdir(), None) if runs.exists() else None
        proc = launch(fault, [*args, f"runs_dir={runs}"] if run is None else ["--resume", run])
        if fault == "external":
            kill_from_outside(proc, runs, rng)
        out, _ = proc.communicate(timeout=300)
        log.append(f"trial {i}: {fault} → rc {proc.returncode}")
        context = f"seed {seed}; " + "; ".join(log) + "\n" + out[-3000:]
        if proc.returncode == 0:  # the fault came after the run's end: nothing left to kill
            break
        assert proc.returncode == -signal.SIGKILL, context
        kills += 1
        run = next(runs.iterdir())
        assert json.loads((run / "summary.json").read_text())["status"] == "running", context
        assert_whole(run)

    run = next(runs.iterdir())
    if json.loads((run / "summary.json").read_text())["status"] != "completed":
        done = launch("none", ["--resume", run])
        out, _ = done.communicate(timeout=300)
        assert done.returncode == 0, f"seed {seed}; " + "; ".join(log) + "\n" + out[-3000:]
    context = f"seed {seed}; " + "; ".join(log)
    assert metrics_without_time(run) == metrics_without_time(ref), context
    assert same_weights(run, ref), context
    assert kills >= TRIALS, f"only {kills} kills landed before the run ended ({context})"
    assert not [p for p in run.rglob("*") if is_temp_name(p.name)], "temporary files left"
