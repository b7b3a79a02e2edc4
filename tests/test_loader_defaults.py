"""The standard loader's defaults (issue 12): `train.workers: auto`, recorded in the run; the
warning when a run spends more than a third of its time waiting for data; per-sample seeding
that leaves the training process's own random stream alone."""

import json
import time

import pytest
import torch

from imgclf.data import loaders
from imgclf.data.loaders import AUTO_WORKERS_MIN_IMAGES, resolve_workers, seeded_cpu_rng
from imgclf.evaluate.report import write_report
from imgclf.train import fit as fit_module
from imgclf.workflows.training import train
from test_train import cfg_for

import factory as fx


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=30, size=(40, 30))


def test_auto_workers_follow_cores_processes_and_data_size(monkeypatch):
    monkeypatch.setattr(loaders, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    many = AUTO_WORKERS_MIN_IMAGES
    assert resolve_workers("auto", many, "cuda")["workers"] == 15  # one core feeds the GPU
    assert resolve_workers("auto", many, "cpu")["workers"] == 4  # the model needs the rest
    assert resolve_workers("auto", many - 1, "cuda")["workers"] == 0  # start-up > savings
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the 16 cores
    assert resolve_workers("auto", many, "cuda")["workers"] == 3
    assert resolve_workers("auto", many, "cuda", processes=4)["processes_here"] == 4
    assert resolve_workers(6, 10, "cuda") == {
        "setting": 6, "workers": 6, "cores": 16, "processes_here": 4,
    }  # fmt: skip
    monkeypatch.setattr(loaders, "usable_cores", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_workers("auto", many, "cuda")["workers"] == 1
    assert resolve_workers("auto", many, "cpu")["workers"] == 1


def test_per_sample_seeding_draws_as_manual_seed_and_restores_the_stream():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded_cpu_rng(7):
        inside = torch.rand(4)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is untouched
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(4))  # the same values torch.manual_seed(7) gives


def slow_images(monkeypatch, seconds: float) -> None:
    original = loaders.ManifestDataset.__getitem__

    def slow(self, item):
        time.sleep(seconds)
        return original(self, item)

    monkeypatch.setattr(loaders.ManifestDataset, "__getitem__", slow)


def test_a_run_waiting_for_data_says_so_once_with_the_setting_that_helps(
    data, tmp_path, monkeypatch
):
    """The GPU rule, run on the CPU: the same code with the CPU on the watched list. A loader
    that takes 20 ms per image against a tiny model waits most of the time: one warning in the
    log, in summary.json and in the report, naming data.cache=auto and train.workers."""
    monkeypatch.setattr(fit_module, "WATCHED_DEVICES", ("cuda", "cpu"))
    slow_images(monkeypatch, 0.02)
    logs: list[str] = []
    cfg = cfg_for(
        data,
        tmp_path,
        "train.stages=[{epochs: 2, lr: 0.01}]",
        "train.workers=0",
        "train.batch_size=4",
    )
    run = train(cfg, progress=False, log=lambda m: logs.append(str(m)))
    warnings = [m for m in logs if "waited for data" in m]
    assert len(warnings) == 1, logs  # once, not once per epoch
    assert "data.cache=auto" in warnings[0] and "train.workers (now 0" in warnings[0]
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["data_wait"]["share"] > fit_module.DATA_WAIT_WARN and summary["data_wait"]["warned"]
    )
    assert summary["warnings"] == [warnings[0].removeprefix("warning: ")]
    html = write_report(run).read_text()
    assert 'class="warn training-warning"' in html and "waited for data" in html
    env = json.loads((run / "environment.json").read_text())
    assert env["loader_workers"]["setting"] == 0 and env["loader_workers"]["workers"] == 0


def test_no_warning_when_the_device_is_not_watched_or_the_data_keeps_up(
    data, tmp_path, monkeypatch
):
    logs: list[str] = []
    cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 1, lr: 0.01}]", "train.batch_size=4")
    slow_images(monkeypatch, 0.02)
    run = train(cfg, progress=False, log=lambda m: logs.append(str(m)))  # CPU: not watched
    summary = json.loads((run / "summary.json").read_text())
    assert summary["warnings"] == [] and summary["data_wait"]["share"] > fit_module.DATA_WAIT_WARN
    assert not any("waited for data" in m for m in logs)
    env = json.loads((run / "environment.json").read_text())
    assert env["loader_workers"]["setting"] == "auto"
    assert env["loader_workers"]["workers"] == 0  # 36 training images: below the minimum
