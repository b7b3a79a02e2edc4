"""The default recipe of `imgclf train` (train/recipe.py): two stages whose `epochs: auto` come
from the number of training images, early stopping on auto stages only, the head stage skipped
on a random backbone, the same numbers on resume, and `imgclf config show` printing it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from imgclf.cli import app as cli
from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.train import recipe
from imgclf.train.recipe import OWN_STATISTICS, SKIPPED_HEAD, auto_epochs, resolve_recipe

import factory as fx

HEAD_ONLY_WARNING = "(trainable: head)"  # train/fit.py's warn_head_only


@pytest.mark.parametrize(
    ("n", "head", "other"),
    [
        (0, 10, 30),  # no training images at all: the upper bounds, not a division by zero
        (12, 10, 30),  # tiny: clamped at the top
        (300, 10, 30),
        (301, 10, 30),  # ceil(3000 / 301) = 10, ceil(15000 / 301) = 50 → 30
        (500, 6, 30),
        (1_000, 3, 15),  # the hand recipe the issue cites
        (1_140, 3, 14),
        (1_500, 2, 10),
        (3_001, 2, 5),  # ceil(0.99…) = 1 → at least 2 for a head stage
        (5_000, 2, 3),
        (100_000, 2, 3),  # large: clamped at the bottom
    ],
)
def test_auto_epochs_aim_at_a_fixed_number_of_images_within_bounds(n, head, other):
    assert auto_epochs("head", n) == head
    assert auto_epochs("all", n) == other
    assert auto_epochs({"last_blocks": 2}, n) == other


def test_the_default_recipe_is_two_auto_stages_with_auto_early_stopping():
    t = load_config(None, []).train
    assert [(s.name, s.trainable, s.epochs, s.lr, s.bn) for s in t.stages] == [
        ("head", "head", "auto", 3e-3, "frozen-eval"),
        ("finetune", "all", "auto", 3e-4, "eval"),
    ]
    assert t.stages[1].warmup_epochs == 1 and t.early_stopping.patience == "auto"
    # A stage the user writes without epochs keeps today's single epoch.
    assert load_config(None, ["train.stages=[{lr: 0.01}]"]).train.stages[0].epochs == 1
    for bad in ("0", "automatic", "-3"):
        with pytest.raises(ImgclfError, match=r"train\.stages\.0\.epochs"):
            load_config(None, [f"train.stages=[{{epochs: {bad}}}]"])
    with pytest.raises(ImgclfError, match=r"train\.early_stopping\.patience"):
        load_config(None, ["train.early_stopping.patience=0"])


def test_resolving_the_default_recipe():
    r = resolve_recipe(load_config(None, []).train, 1_000)
    assert [s.epochs for s in r.train.stages] == [3, 15]
    assert r.patience == (3, 3)
    assert r.lines == ("epochs: auto → head 3, finetune 15 (1,000 training images)",)
    assert r.first_trained.name == "head"
    # Nothing else changes.
    assert [s.lr for s in r.train.stages] == [3e-3, 3e-4]
    assert [s.bn for s in r.train.stages] == ["frozen-eval", "eval"]


def test_a_random_backbone_skips_the_default_head_stage_but_not_a_users():
    default = load_config(None, []).train
    r = resolve_recipe(default, 1_000, random_backbone=True)
    assert [s.epochs for s in r.train.stages] == [0, 15]
    assert r.lines[1:] == (SKIPPED_HEAD, OWN_STATISTICS) and "head 0" in r.lines[0]
    # No pretrained BatchNorm statistics to keep: they are learnt as the model trains.
    assert [s.bn for s in r.train.stages] == ["frozen-eval", "frozen-eval"]
    assert r.first_trained.name == "finetune"
    # A head stage sized by the user keeps fit's warning instead.
    fixed = load_config(None, ["train.stages.0.epochs=2"]).train
    assert [s.epochs for s in resolve_recipe(fixed, 1_000, True).train.stages] == [2, 15]
    # An auto head stage that is the only stage is not skipped: nothing would train.
    alone = load_config(None, ["train.stages=[{trainable: head, epochs: auto}]"]).train
    assert [s.epochs for s in resolve_recipe(alone, 1_000, True).train.stages] == [3]


def test_auto_patience_stops_auto_stages_only():
    mixed = ["train.stages=[{epochs: auto}, {epochs: 4}]"]
    assert resolve_recipe(load_config(None, mixed).train, 50).patience == (3, None)
    for value, expected in (("2", (2, 2)), ("null", (None, None))):
        t = load_config(None, [*mixed, f"train.early_stopping.patience={value}"]).train
        assert resolve_recipe(t, 50).patience == expected
    # Explicit stages with fixed epochs: no early stopping, as before `auto` existed.
    t = load_config(None, ["train.stages=[{epochs: 2}, {epochs: 3}]"]).train
    r = resolve_recipe(t, 50)
    assert r.patience == (None, None) and r.lines == () and r.train == t


def test_config_show_prints_the_default_recipe():
    result = CliRunner().invoke(cli, ["config", "show"], terminal_width=200)
    assert result.exit_code == 0, result.output
    train = yaml.safe_load(result.output)["train"]
    assert [s["epochs"] for s in train["stages"]] == ["auto", "auto"]
    assert [s["name"] for s in train["stages"]] == ["head", "finetune"]
    assert train["early_stopping"]["patience"] == "auto"
    result = CliRunner().invoke(cli, ["config", "show", "--describe"], terminal_width=300)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert rows["train.stages[0].epochs"].split()[1] == '"auto"'  # as JSON, like workers
    assert "auto: from the number of training images" in rows["train.stages[1].epochs"]
    assert "auto: 3 for stages with epochs: auto" in rows["train.early_stopping.patience"]


# ---------------------------------------------------------------- runs


def rows_of(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def stage_epochs(run: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows_of(run):
        counts[row["stage_name"]] = counts.get(row["stage_name"], 0) + 1
    return counts


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(
        tmp_path / "shapes", classes=("a", "b", "c"), per_class=6, size=(32, 32)
    )


def base_overrides(data: Path, tmp_path: Path) -> list[str]:
    return [
        f"data.root={data}",
        f"runs_dir={tmp_path / 'runs'}",
        f"data.manifest={tmp_path / 'manifest'}",
        *fx.TINY_MODEL,
        "tracking.mlflow=false",
    ]


@pytest.fixture
def weights(tmp_path) -> Path:
    """ "Pretrained" weights for the tiny scratch model: with `model.pretrained=file:` its backbone
    is not random, so the recipe keeps the head stage and `bn: eval`."""
    import torch
    from safetensors.torch import save_file

    from imgclf.models import build_model

    torch.manual_seed(1)
    model, _ = build_model(load_config(None, fx.TINY_MODEL).model, 3, 32)
    save_file(model.state_dict(), tmp_path / "tiny.safetensors")
    return tmp_path / "tiny.safetensors"


def test_train_a_folder_with_no_config_runs_the_two_auto_stages(data, tmp_path, weights):
    """`imgclf train FOLDER`: the default recipe on a (tiny, saved) pretrained backbone."""
    args = [
        sys.executable, "-m", "imgclf", "train", str(data), "--no-progress",
        *[o for o in fx.TINY_MODEL if not o.startswith("model.pretrained")],
        f"model.pretrained=file:{weights}",
        "train.early_stopping.patience=null",  # every auto epoch, so the counts are exact
        "tracking.mlflow=false",
    ]  # fmt: skip
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "summary.json").is_file()]
    n = sum(json.loads((run / "data.json").read_text())["split"][c]["train"] for c in "abc")
    head, finetune = auto_epochs("head", n), auto_epochs("all", n)
    assert f"epochs: auto → head {head}, finetune {finetune} ({n} training images)" in r.stdout
    assert stage_epochs(run) == {"head": head, "finetune": finetune}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["warnings"] == []
    assert [s["epochs"] for s in summary["config"]["train"]["stages"]] == [head, finetune]
    # config.yaml keeps `auto`: the same data gives the same numbers when it is repeated.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert [s["epochs"] for s in saved["train"]["stages"]] == ["auto", "auto"]


def test_a_scratch_model_skips_the_default_head_stage(data, tmp_path):
    from imgclf.workflows.training import train

    # The head stage stays auto (and is skipped); the fine-tuning stage is shortened to 2.
    cfg = load_config(None, [*base_overrides(data, tmp_path), "train.stages.1.epochs=2"])
    logs: list[str] = []
    run = train(cfg, progress=False, log=lambda m, *_: logs.append(str(m)))
    assert SKIPPED_HEAD in logs and logs.count(SKIPPED_HEAD) == 1
    assert not [m for m in logs if HEAD_ONLY_WARNING in m]
    assert [(r["stage"], r["stage_name"]) for r in rows_of(run)] == [("1", "finetune")] * 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["warnings"] == []
    assert [s["epochs"] for s in summary["config"]["train"]["stages"]] == [0, 2]


def test_early_stopping_auto_ends_auto_stages_and_leaves_fixed_ones(
    data, tmp_path, weights, monkeypatch
):
    from imgclf.workflows.training import train

    # A learning rate of 1e-12 with BatchNorm statistics frozen (on a "pretrained" backbone: on
    # a random one the recipe lets them update) cannot improve val_loss by min_delta: the auto
    # stage (8 epochs here) stops after 1 + 3; the fixed one runs all 5.
    monkeypatch.setattr(recipe, "OTHER_EPOCHS", (8, 8))
    quiet = "lr: 1.0e-12, schedule: constant, bn: eval"
    cfg = load_config(
        None,
        [
            *base_overrides(data, tmp_path),
            f"model.pretrained=file:{weights}",
            f"train.stages=[{{epochs: auto, {quiet}}}, {{epochs: 5, {quiet}}}]",
            "train.early_stopping.min_delta=0.001",
        ],
    )
    run = train(cfg, progress=False, log=lambda *_: None)
    assert [r["stage"] for r in rows_of(run)] == ["0"] * 4 + ["1"] * 5


class Crash(Exception):
    pass


def test_resuming_a_run_with_auto_epochs_keeps_its_numbers(data, tmp_path, monkeypatch):
    from imgclf.workflows.training import train

    monkeypatch.setattr(recipe, "OTHER_EPOCHS", (3, 3))
    stages = "train.stages=[{epochs: auto}, {epochs: auto, lr: 0.01}]"
    cfg = load_config(None, [*base_overrides(data, tmp_path), stages])

    def crash_in_epoch_2(row):  # before epoch 2's checkpoint: resume continues after epoch 1
        if row["epoch"] == 2:
            raise Crash

    logs: list[str] = []
    with pytest.raises(Crash):
        train(cfg, progress=False, log=logs.append, on_epoch=crash_in_epoch_2)
    (run,) = (tmp_path / "runs").iterdir()
    line = next(m for m in logs if m.startswith("epochs: auto"))
    assert line.startswith("epochs: auto → stage 0 3, stage 1 3 (")
    logs.clear()
    run = train(None, resume=run, progress=False, log=logs.append)
    assert line in logs  # recomputed from the unchanged data: the same numbers
    assert [r["stage"] for r in rows_of(run)] == ["0"] * 3 + ["1"] * 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [s["epochs"] for s in summary["config"]["train"]["stages"]] == [3, 3]
