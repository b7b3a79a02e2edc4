"""Training runs end to end on a tiny generated folder: the run folder, determinism, resume,
warm start, imbalance options, divergence, and rebuilding a copied run in a fresh process."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.workflows.training import train

import factory as fx

TINY = [
    *fx.TINY_MODEL,
    "train.augment.preset=light",
    "data.split.train=0.6",
    "data.split.val=0.2",
    "data.split.test=0.2",
    "tracking.mlflow=false",  # one test below mirrors on purpose; the store costs seconds
]


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(
        tmp_path / "shapes", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )


def cfg_for(data, tmp_path, *extra):
    return load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={tmp_path / 'runs'}",
            f"data.manifest={tmp_path / 'manifest'}",
            *TINY,
            *extra,
        ],
    )


def metrics_without_time(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_folder_is_complete(data, tmp_path):
    cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 2, schedule: cosine, lr: 0.01}]")
    run = train(cfg, progress=False, log=lambda *_: None)
    for name in (
        "config.yaml",
        "environment.json",
        "data.json",
        "metrics.csv",
        "summary.json",
        "model.safetensors",
        "model.json",
        "checkpoints/last.pt",
        "plots/curves.png",
        "predictions/val.csv",
        "predictions/test.csv",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert set(summary["params"]) >= {"total", "trainable", "non_trainable", "optimizer_state"}
    # AdamW keeps two moments per trainable parameter, plus one step counter per tensor.
    trainable = summary["params"]["trainable"]
    assert 2 * trainable < summary["params"]["optimizer_state"] < 2 * trainable + 50
    assert 0 <= summary["test"]["test_accuracy"] <= 1 and "val_loss" in summary["val"]
    model_json = json.loads((run / "model.json").read_text())
    assert model_json["labels"] == ["a", "b", "c"]
    assert model_json["preprocessing"]["input_size"] == 32
    data_json = json.loads((run / "data.json").read_text())
    assert data_json["split"]["a"] == {"train": 6, "val": 2, "test": 2}
    assert len(metrics_without_time(run)) == 2
    # the best epoch keeps its val loss, which settles a later tie on val accuracy
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    best = summary["best"]
    at_best = rows[best["epoch"] - 1]
    assert best["val_loss"] == pytest.approx(float(at_best["val_loss"]))
    later = [r for r in rows[best["epoch"] :] if float(r["val_accuracy"]) == best["value"]]
    assert all(float(r["val_loss"]) >= best["val_loss"] for r in later)
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*")), "no temporary files left"
    # The resolved config in the run folder is enough to repeat the run.
    assert load_config(run / "config.yaml") == cfg


@pytest.mark.parametrize("imbalance", ["weighted_loss", "sampler", "focal"])
def test_imbalance_options_train(data, tmp_path, imbalance):
    cfg = cfg_for(data, tmp_path, f"train.imbalance={imbalance}", "train.stages=[{epochs: 1}]")
    run = train(cfg, progress=False, log=lambda *_: None)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_staged_training_and_warm_start(data, tmp_path):
    stages = (
        "train.stages=[{trainable: head, epochs: 1, lr: 0.01}, "
        "{trainable: all, epochs: 1, lr: 0.001}]"
    )
    first = train(cfg_for(data, tmp_path, stages), progress=False, log=lambda *_: None)
    rows = metrics_without_time(first)
    assert [r["stage"] for r in rows] == ["0", "1"]
    warm = cfg_for(
        data,
        tmp_path,
        f"model.init_from={first}",
        "train.stages=[{trainable: head, epochs: 1, lr: 1e-9}]",
    )
    second = train(warm, progress=False, log=lambda *_: None)
    # An lr of 1e-9 leaves the warm-started weights (all but the trained head) as they were.
    w1, w2 = weights(first), weights(second)
    body = [k for k in w1 if not k.startswith("head.")]
    assert body and all(torch.equal(w1[k], w2[k]) for k in body)
    assert str(first) in (second / "config.yaml").read_text()


def test_divergence_is_recorded(data, tmp_path):
    cfg = cfg_for(
        data,
        tmp_path,
        "train.stages=[{epochs: 2, lr: 1.0e+12, schedule: constant, optimizer: sgd}]",
    )
    with pytest.raises(ImgclfError, match="training loss became"):
        train(cfg, progress=False, log=lambda *_: None)
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


def test_resume_refuses_changed_config_and_corrupt_checkpoints(data, tmp_path):
    cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]")
    run = train(cfg, progress=False, log=lambda *_: None)
    changed = cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]", "train.batch_size=4")
    with pytest.raises(ImgclfError, match=r"train\.batch_size: 8 → 4"):
        train(changed, resume=run, progress=False)
    ckpt = run / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ImgclfError, match=r"last\.pt is truncated or corrupt"):
        train(None, resume=run, progress=False)


def imgclf_cmd(*args):
    return [sys.executable, "-m", "imgclf", *map(str, args)]


def test_copied_run_reproduces_test_predictions_in_a_fresh_process(data, tmp_path):
    run = train(
        cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]"), progress=False, log=lambda *_: None
    )
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, copy)
    for name in ("config.yaml", "data.json", "checkpoints"):
        p = copy / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    script = (
        "import csv, sys\n"
        "from imgclf.predict.predictor import Predictor\n"
        "from imgclf.workflows.finalize import write_predictions\n"
        "run, root, out = sys.argv[1:]\n"
        "rows = list(csv.DictReader(open(f'{run}/predictions/test.csv')))\n"
        "p = Predictor.from_run(run)\n"
        "preds = p.predict_paths([f'{root}/{r[\"path\"]}' for r in rows], batch_size=8)\n"
        "paths, labels = [r['path'] for r in rows], [r['label'] for r in rows]\n"
        "write_predictions(out, preds, p.labels, paths, labels)\n"
    )
    out = tmp_path / "again.csv"
    r = subprocess.run(
        [sys.executable, "-c", script, str(copy), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert out.read_text() == (run / "predictions" / "test.csv").read_text()


def test_early_stopping_ends_a_stage_and_the_next_one_runs(data, tmp_path):
    # A learning rate of 1e-12 with BatchNorm statistics frozen cannot improve val_loss by
    # min_delta: with patience 1 the first stage stops after its second epoch, not its fifth.
    stages = (
        "train.stages=[{epochs: 5, lr: 1.0e-12, schedule: constant, bn: eval}, "
        "{epochs: 1, lr: 0.01, schedule: constant}]"
    )
    cfg = cfg_for(
        data,
        tmp_path,
        stages,
        "train.early_stopping={metric: val_loss, patience: 1, min_delta: 0.001}",
    )
    run = train(cfg, progress=False, log=lambda *_: None)
    assert [r["stage"] for r in metrics_without_time(run)] == ["0", "0", "1"]
    # The epochs of a warm-up are not judged: with two of them, the third sets the reference
    # and the fourth is the bad epoch that patience 1 stops after.
    warm = stages.replace("bn: eval}", "bn: eval, warmup_epochs: 2}")
    cfg = cfg_for(
        data,
        tmp_path / "warm",
        warm,
        "train.early_stopping={metric: val_loss, patience: 1, min_delta: 0.001}",
    )
    run = train(cfg, progress=False, log=lambda *_: None)
    assert [r["stage"] for r in metrics_without_time(run)] == ["0", "0", "0", "0", "1"]


def test_the_epochs_of_a_warm_up_are_not_counted_by_early_stopping():
    from imgclf.train.fit import count_patience

    # a warm-started fine-tune (held-in clip art): the warm-up epoch keeps the head's val loss,
    # the first epochs at the full lr exceed it before they beat it
    losses = [0.903, 1.03, 0.96, 0.91, 0.92]
    judged, exempt = {}, {}
    for epoch, loss in enumerate(losses, 1):
        count_patience(judged, loss, "min")
        count_patience(exempt, loss, "min", warming_up=epoch <= 1.0)
    assert judged == {"best": 0.903, "bad": 4}  # patience 4 would stop here
    assert exempt == {"best": 0.91, "bad": 1}
    higher = {}
    for value in (0.5, 0.7, 0.6):
        count_patience(higher, value, "max", min_delta=0.05)
    assert higher == {"best": 0.7, "bad": 1}


def test_accumulation_clipping_and_mixing_train(data, tmp_path):
    cfg = cfg_for(
        data, tmp_path, "train.accumulate=2", "train.grad_clip=1.0", "train.mixup=0.2",
        "train.cutmix=1.0", "train.label_smoothing=0.1",
        "train.stages=[{epochs: 2, schedule: onecycle, lr: 0.01}]",
    )  # fmt: skip
    run = train(cfg, progress=False, log=lambda *_: None)
    rows = metrics_without_time(run)
    assert (
        len(rows) == 2 and json.loads((run / "summary.json").read_text())["status"] == "completed"
    )
    # One-cycle ends at lr / 25e4: the schedule saw every (accumulated) optimizer step.
    assert float(rows[-1]["lr"]) == pytest.approx(0.01 / 25e4, rel=1e-3)


def test_images_that_vanish_after_the_scan_are_skipped_and_counted(data, tmp_path):
    from imgclf.config import ScanConfig
    from imgclf.data.prepare import split_and_save
    from imgclf.data.scan import scan_to

    manifest_dir = tmp_path / "scanned"
    scan_to(data, manifest_dir, ScanConfig(workers=1), progress=False)
    split, _ = split_and_save(manifest_dir, load_config(None, TINY).data.split)
    gone = split.split_entries("train")[:2]
    for e in gone:
        (data / e.path).unlink()
    cfg = load_config(None, [f"data.manifest={manifest_dir}", f"runs_dir={tmp_path / 'runs'}",
                             *TINY, "train.stages=[{epochs: 1}]"])  # fmt: skip
    run = train(cfg, progress=False, log=lambda *_: None)
    assert metrics_without_time(run)[0]["bad_images"] == "2"
    assert json.loads((run / "summary.json").read_text())["bad_images"] == 2


def test_a_finished_run_is_mirrored_to_mlflow(data, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 2}]", "tracking.mlflow=true")
    run = train(cfg, progress=False, log=lambda *_: None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (found,) = client.search_runs(
        [client.get_experiment_by_name("imgclf").experiment_id],
        filter_string=f"tags.`imgclf.run_id` = '{run.name}'",
    )
    assert found.data.tags["imgclf.status"] == "completed"
    history = client.get_metric_history(found.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert found.data.params["train.batch_size"] == "8"
    assert json.loads((run / "tracking.json").read_text())["mlflow_run_id"] == found.info.run_id


def test_tensorboard_logs_on_request(data, tmp_path):
    cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]", "tracking.tensorboard=true")
    run = train(cfg, progress=False, log=lambda *_: None)
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 100 for e in events)


def test_train_compile_traces_the_model_and_saves_plain_weights(data, tmp_path, monkeypatch):
    """train.compile wraps the model in torch.compile; weights and checkpoints stay the plain
    module's (no `_orig_mod.` prefix), so the Predictor rebuilds the run as usual."""
    from imgclf.predict.predictor import Predictor

    compiled, real = [], torch.compile

    def eager_compile(model, **kw):
        # Dynamo traces the model for real; inductor's C++ build would take a minute on CPU.
        compiled.append(model)
        return real(model, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]", "train.compile=true")
    run = train(cfg, progress=False, log=lambda *_: None)
    # Fabric unwraps a compiled module and compiles it again around its own wrapper.
    assert compiled and all(m is compiled[0] for m in compiled)
    assert not [k for k in weights(run) if "_orig_mod" in k]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert Predictor.from_run(run).labels == ["a", "b", "c"]


def test_each_stage_logs_its_learning_rate_per_parameter_group(data, tmp_path):
    stages = (
        "train.stages=[{trainable: head, epochs: 1, lr: 0.01}, "
        "{trainable: all, epochs: 1, lr: 0.001, backbone_lr_mult: 0.1}]"
    )
    lines = []
    train(
        cfg_for(data, tmp_path, stages, "tracking.mlflow=false"), progress=False, log=lines.append
    )
    shown = [str(line) for line in lines if str(line).startswith("lr per group")]
    assert len(shown) == 2, lines
    assert shown[0].startswith("lr per group (params): head 1.00e-02 (")
    assert "backbone" not in shown[0]
    assert "backbone 1.00e-04 (" in shown[1] and "head 1.00e-03 (" in shown[1]


def test_the_final_predictions_and_mirror_show_progress_only_when_asked(
    data, tmp_path, monkeypatch
):
    import imgclf.progress as progress_module

    shown = []

    def recording(description, total, show, console=None):
        shown.append((description.split(" ")[0], show))
        return progress_module.progress_bar(description, total, False)

    monkeypatch.setattr("imgclf.workflows.finalize.progress_bar", recording)
    monkeypatch.setattr("imgclf.runs.tracking.progress_bar", recording)
    for progress in (False, True):
        shown.clear()
        cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 1}]", "tracking.mlflow=true")
        train(cfg, progress=progress, log=str)
        assert shown == [("predicting", progress), ("predicting", progress), ("MLflow:", progress)]


def test_channels_last_is_the_default_on_cuda_and_the_cpu_and_a_run_can_turn_it_off():
    from imgclf.config import validate
    from imgclf.train.step import use_channels_last

    on, off = validate({}), validate({"train": {"channels_last": False}})
    assert use_channels_last(on, "cpu") and use_channels_last(on, "cuda")
    assert not use_channels_last(on, "mps"), "other devices keep the contiguous layout"
    assert not use_channels_last(off, "cpu") and not use_channels_last(off, "cuda")


def test_an_epoch_that_ties_the_best_accuracy_with_a_lower_val_loss_becomes_the_best():
    """The best weights are the later of two epochs with equal val accuracy when its val loss is
    lower; a tie without a lower loss, or on val_loss itself, keeps the first."""
    from imgclf.train.fit import _tie_lower_loss

    best = {"metric": "val_accuracy", "value": 0.85, "epoch": 1, "val_loss": 0.66}
    later = {"epoch": 7, "val_accuracy": 0.85, "val_loss": 0.65}
    assert _tie_lower_loss(later, "val_accuracy", best)
    assert not _tie_lower_loss({**later, "val_loss": 0.70}, "val_accuracy", best)
    assert not _tie_lower_loss({**later, "val_accuracy": 0.80}, "val_accuracy", best)
    # a best recorded before val_loss was kept (an older checkpoint): the first stays
    assert not _tie_lower_loss(
        later, "val_accuracy", {k: v for k, v in best.items() if k != "val_loss"}
    )
    assert not _tie_lower_loss(
        {"val_loss": 0.5}, "val_loss", {"metric": "val_loss", "value": 0.5, "val_loss": 0.5}
    )
