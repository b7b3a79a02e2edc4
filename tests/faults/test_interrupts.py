"""docs/RELIABILITY.md F4–F6 and F8 for training: Ctrl-C once and twice, SIGTERM, checkpoints
that must be refused (including another architecture's), resuming against changed data, and a
second process resuming a run that is still training."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.predict.predictor import Predictor
from imgclf.runs.checkpoint import load_checkpoint
from imgclf.runs.record import RunDir
from imgclf.workflows.training import train
from test_train import TINY, cfg_for, metrics_without_time, same_weights

import factory as fx

STAGES = "train.stages=[{epochs: 3, lr: 0.01}]"


def quiet(*_):
    return None


def start_training(args, runs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "imgclf", "train", *args, f"runs_dir={runs}", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/checkpoints/last.pt")):
        time.sleep(0.01)
    return proc


@pytest.fixture
def slow_data(tmp_path):
    """Enough batches per epoch that a signal lands mid-epoch."""
    return fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=50, size=(40, 40)
    )


def test_ctrl_c_once_saves_and_resume_matches_an_uninterrupted_run(slow_data, tmp_path):
    args = [*TINY, STAGES, f"data.root={slow_data}", f"data.manifest={tmp_path / 'm'}"]
    ref = train(
        load_config(None, [*args, f"runs_dir={tmp_path / 'ref'}"]), progress=False, log=quiet
    )
    runs = tmp_path / "runs"
    proc = start_training([*args, "train.checkpoint_every=1"], runs)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: imgclf train --resume" in out
    run = next(runs.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["fit"]["status"] == "interrupted"
    # F7: everything an exact continuation needs, as plain values and tensors.
    assert {"model", "optimizer", "schedule", "precision", "fit", "rng", "rng_ranks"} <= set(ckpt)
    assert ckpt["optimizer"]["state"], "optimizer moments are saved"
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert ckpt["fit"]["epoch_state"]["batches"] > 0, "the position inside the epoch is saved"
    resume = [sys.executable, "-m", "imgclf", "train", "--resume", str(run), "--no-progress"]
    r = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert metrics_without_time(run) == metrics_without_time(ref)
    assert same_weights(run, ref)


def test_sigterm_saves_like_ctrl_c(slow_data, tmp_path):
    """A scheduler's preemption notice (SLURM, Kubernetes, torchrun passing a stop on)."""
    args = [*TINY, STAGES, f"data.root={slow_data}", f"data.manifest={tmp_path / 'm'}"]
    runs = tmp_path / "runs"
    proc = start_training([*args, "train.checkpoint_every=1"], runs)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run = next(runs.iterdir())
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["fit"]["status"] == "interrupted"


def test_a_run_still_training_cannot_be_resumed_by_a_second_process(tmp_path):
    data = fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )
    run = train(cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]"), progress=False, log=quiet)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with RunDir(run).lock(), pytest.raises(ImgclfError, match="is being trained by pid"):
        train(None, resume=run, progress=False, log=quiet)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_ctrl_c_twice_stops_without_corrupting_the_run(slow_data, tmp_path):
    args = [*TINY, STAGES, f"data.root={slow_data}", f"data.manifest={tmp_path / 'm'}"]
    runs = tmp_path / "runs"
    proc = start_training([*args, "train.checkpoint_every=1"], runs)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    run = next(runs.iterdir())
    for name in ("summary.json", "model.json", "data.json", "environment.json"):
        json.loads((run / name).read_text())  # every file is whole
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    load_checkpoint(run / "checkpoints" / "last.pt")
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_that_must_be_refused(tmp_path):
    data = fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )
    run = train(cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]"), progress=False, log=quiet)
    ckpt = run / "checkpoints" / "last.pt"
    good = ckpt.read_bytes()

    marker = tmp_path / "pwned"
    ckpt.write_bytes(pickle.dumps({"format": 1, "model": Exploit(marker)}))
    with pytest.raises(ImgclfError, match=r"last\.pt refused"):
        train(None, resume=run, progress=False)
    assert not marker.exists(), "the pickle ran code"

    ckpt.write_bytes(b"")
    with pytest.raises(ImgclfError, match=r"last\.pt is truncated or corrupt"):
        train(None, resume=run, progress=False)
    flipped = bytearray(good)
    for i in range(len(flipped) // 3, len(flipped) // 3 + 64):
        flipped[i] ^= 0xFF
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(ImgclfError, match=r"last\.pt"):
        train(None, resume=run, progress=False)

    # Weights of another architecture are refused by name, never half-loaded.
    other = train(cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]", "model.scratch.width=4"),
                  progress=False, log=quiet)  # fmt: skip
    (run / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ImgclfError, match=r"model\.safetensors does not fit this architecture"):
        Predictor.from_run(run)

    # Another architecture's checkpoint: refused by its identity, and by name when forced.
    ckpt.write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    with pytest.raises(ImgclfError, match="model architecture differs"):
        train(None, resume=run, progress=False)
    with pytest.raises(ImgclfError, match=r"last\.pt does not fit this architecture"):
        train(None, resume=run, force=True, progress=False)


def test_resume_after_the_data_changed_lists_the_difference(tmp_path):
    data = fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )
    run = train(cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]"), progress=False, log=quiet)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    fx.write_png(data / "a" / "new.png", size=(40, 40), seed=999)
    with pytest.raises(ImgclfError, match="data version"):
        train(None, resume=run, progress=False)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before, "nothing was overwritten"
    # Forced, it continues on the changed data (the user's explicit choice).
    train(None, resume=run, force=True, progress=False, log=quiet)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_an_interrupt_soon_after_a_mid_epoch_resume_keeps_the_rest_of_the_epoch(
    slow_data, tmp_path, monkeypatch
):
    """A resumed epoch's loader yields only the batches left; a stop then must still be seen
    as mid-epoch (it once counted as the epoch's end, losing its remaining batches)."""
    import imgclf.train.fit as fit_module

    args = [*TINY, STAGES, f"data.root={slow_data}", f"data.manifest={tmp_path / 'm'}"]
    ref = train(load_config(None, [*args, f"runs_dir={tmp_path / 'ref'}"]), progress=False,
                log=quiet)  # fmt: skip
    real_save, saves = fit_module.save_checkpoint, {"n": 0, "at": 0}

    def save_then_interrupt(*a, **k):
        out = real_save(*a, **k)
        saves["n"] += 1
        if saves["n"] == saves["at"]:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once, right after this save
        return out

    monkeypatch.setattr(fit_module, "save_checkpoint", save_then_interrupt)
    cfg = load_config(None, [*args, "train.checkpoint_every=1", f"runs_dir={tmp_path / 'r'}"])
    saves["at"] = 8  # deep into epoch 1 (11 batches)
    run = train(cfg, progress=False, log=quiet)
    first = load_checkpoint(run / "checkpoints" / "last.pt")["fit"]
    assert first["status"] == "interrupted" and first["epoch_state"]["batches"] >= 8
    saves["n"], saves["at"] = 0, 1  # one batch after the resume: fewer left than done
    train(None, resume=run, progress=False, log=quiet)
    second = load_checkpoint(run / "checkpoints" / "last.pt")["fit"]
    assert second["status"] == "interrupted" and second["epoch_state"] is not None, second
    saves["at"] = -1
    train(None, resume=run, progress=False, log=quiet)
    assert metrics_without_time(run) == metrics_without_time(ref)
    assert same_weights(run, ref)
