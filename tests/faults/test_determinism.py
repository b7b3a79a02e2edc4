"""docs/RELIABILITY.md F9: the same seed twice on CPU gives identical metrics and weights — also
in a fresh process with DataLoader workers and the strongest augmentation, because every image
is augmented under its own seed from the sampler, whatever process decodes it."""

import subprocess
import sys

from imgclf.workflows.training import train
from test_train import cfg_for, metrics_without_time, same_weights, weights

import factory as fx

STAGES = "train.stages=[{epochs: 2, lr: 0.01}]"


def quiet(*_):
    return None


def test_same_seed_twice_gives_identical_metrics_and_weights(tmp_path):
    data = fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )
    a = train(cfg_for(data, tmp_path, STAGES), progress=False, log=quiet)
    b = train(cfg_for(data, tmp_path, STAGES), progress=False, log=quiet)
    assert metrics_without_time(a) == metrics_without_time(b)
    assert same_weights(a, b)
    c = train(cfg_for(data, tmp_path, STAGES, "seed=1"), progress=False, log=quiet)
    assert not same_weights(a, c)


def test_a_fresh_process_with_workers_and_strong_augmentation_repeats_the_run(tmp_path):
    data = fx.make_class_folder(
        tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=(48, 40)
    )
    extra = ["train.augment.preset=strong", "train.mixup=0.2"]
    here = train(cfg_for(data, tmp_path, STAGES, *extra), progress=False, log=quiet)
    cfg = cfg_for(data, tmp_path, STAGES, *extra, "train.workers=2", f"runs_dir={tmp_path / 'p'}")
    (tmp_path / "run.yaml").write_text(cfg.model_dump_json())
    cmd = [sys.executable, "-m", "imgclf", "train", str(tmp_path / "run.yaml"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    there = next((tmp_path / "p").iterdir())
    assert metrics_without_time(here) == metrics_without_time(there)
    assert same_weights(here, there), {k: v.abs().sum() for k, v in weights(there).items()}
