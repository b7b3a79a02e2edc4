"""Multi-process training: `torchrun --nproc_per_node 2 -m imgclf train …` on CPU (gloo).

Rank 0 alone writes (every write of every rank is recorded by an audit hook); two processes with
the global batch split between them train the same model as one process with that batch; a
DDP run killed with SIGKILL, and one stopped by Ctrl-C, resume to the uninterrupted run exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgclf.config import load_config
from imgclf.workflows.training import train
from test_train import TINY, metrics_without_time, same_weights

import factory as fx

AUDIT = Path(__file__).parent / "write_audit"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
# Without BatchNorm the two computations are the same sums in another order: 2 processes with
# 4 images each must match 1 process with 8 to float rounding. (With BatchNorm each process
# normalises its own 4 images, as in any DDP run without SyncBatchNorm: close, not equal.)
NO_BN = "model.scratch.batch_norm=false"
TOLERANCE = 1e-5


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=25, size=(40, 40)
    )


def base_args(data, tmp_path, *extra):
    return [
        *TINY,
        "train.accelerator=cpu",
        f"data.root={data}",
        f"data.manifest={tmp_path / 'manifest'}",
        *extra,
    ]


def torchrun(args, *, env=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [*TORCHRUN, "-m", "imgclf", "train", *map(str, args), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def only_run(runs: Path) -> Path:
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc): torchrun starts its workers in new sessions."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_processes_match_one_and_only_rank_0_writes(data, tmp_path):
    args = base_args(data, tmp_path, NO_BN, "train.stages=[{epochs: 2, lr: 0.01}]")
    single = train(
        load_config(None, [*args, f"runs_dir={tmp_path / 'single'}"]), progress=False, log=print
    )
    audit = tmp_path / "audit"
    audit.mkdir()
    env = {
        "PYTHONPATH": os.pathsep.join([str(AUDIT), os.environ.get("PYTHONPATH", "")]),
        "IMGCLF_AUDIT_ROOT": str(tmp_path),
        "IMGCLF_AUDIT_DIR": str(audit),
    }
    finish(torchrun([*args, f"runs_dir={tmp_path / 'ddp'}"], env=env))
    run = only_run(tmp_path / "ddp")

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert json.loads((run / "environment.json").read_text())["processes"] == 2
    ddp_rows, one_rows = metrics_without_time(run), metrics_without_time(single)
    assert len(ddp_rows) == len(one_rows) == 2
    for d, s in zip(ddp_rows, one_rows, strict=True):
        for key in ("train_loss", "val_loss"):
            assert abs(float(d[key]) - float(s[key])) <= TOLERANCE, (key, d, s)
        for key in ("train_accuracy", "val_accuracy", "lr"):
            assert d[key] == s[key], (key, d, s)
    wd, ws = load_file(run / "model.safetensors"), load_file(single / "model.safetensors")
    assert max((wd[k] - ws[k]).abs().max().item() for k in ws) <= TOLERANCE

    rank0 = (audit / "rank0.log").read_text()
    for name in ("checkpoints/last.pt", "model.safetensors", "summary.json"):
        assert f" {run / name}\n" in rank0, f"the audit hook did not see {name} written"
    assert (audit / "rank1.log").read_text() == "", "rank 1 wrote into the run or manifest"


def test_ddp_resumes_after_kill_and_after_ctrl_c_to_the_uninterrupted_run(data, tmp_path):
    args = base_args(
        data, tmp_path, "train.stages=[{epochs: 3, lr: 0.01}]", "train.checkpoint_every=1"
    )
    finish(torchrun([*args, f"runs_dir={tmp_path / 'ref'}"]))
    ref = only_run(tmp_path / "ref")

    # 1. SIGKILL to every process (a node lost) after the first mid-epoch checkpoint.
    runs = tmp_path / "runs"
    proc = torchrun([*args, f"runs_dir={runs}"])
    wait_for(lambda: list(runs.glob("*/checkpoints/last.pt")), "the first checkpoint")
    for pid in [*children(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    run = only_run(runs)
    assert json.loads((run / "summary.json").read_text())["status"] == "running"

    # 2. Resume, and interrupt it like Ctrl-C in the terminal: torchrun passes SIGTERM on, the
    # ranks agree on the step, rank 0 saves and the run is marked interrupted.
    ckpt = run / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    proc = torchrun(["--resume", run])
    wait_for(lambda: ckpt.stat().st_mtime_ns != before, "a checkpoint of the resumed run")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] in ("interrupted", "completed"), out[-3000:]
    stopped_early = summary["status"] == "interrupted"

    # 3. Resume to the end: the same metrics and weights as the run never interrupted.
    if stopped_early:
        finish(torchrun(["--resume", run]))
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert metrics_without_time(run) == metrics_without_time(ref)
    assert same_weights(run, ref)
    assert stopped_early, "the interrupt landed after the run finished: nothing was tested"


def test_settings_that_cannot_run_distributed_are_refused(data, tmp_path):
    out = torchrun(base_args(data, tmp_path, "train.batch_size=7", f"runs_dir={tmp_path}/r"))
    text, _ = out.communicate(timeout=300)
    assert out.returncode != 0
    # Said once, by rank 0, without imgclf's traceback (torchrun's own failure report remains).
    assert text.count("train.batch_size=7 is the global batch") == 1, text
    assert "imgclf/train/distributed.py" not in text and "check_config" not in text
    assert not (tmp_path / "r").exists()
    assert torch.distributed.is_available()
