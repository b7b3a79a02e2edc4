"""Traps a new user meets silently (issue 14): each is said once, in the output and in the
record of the run, evaluation or comparison it concerns.

One tiny run trained without horizontal flips, a head-only stage first, serves most tests; the
others train one more tiny run each (warm starts, class imbalance, a two-stage model)."""

import json
import random
import re
import shutil

import pytest
from typer.testing import CliRunner

from imgclf.cli import app
from imgclf.config import ScanConfig, load_config
from imgclf.data.scan import scan
from imgclf.evaluate.evaluate import evaluate_run
from imgclf.evaluate.report import compare_runs, write_report
from imgclf.train.losses import class_weights, imbalance_record
from imgclf.workflows.training import train
from imgclf.workflows.two_stage import groups_from_test_split, train_two_stage

import factory as fx

CLASSES = ("a", "b", "c")
TINY = [
    *fx.TINY_MODEL,
    "data.split.train=0.6",
    "data.split.val=0.2",
    "data.split.test=0.2",
    "tracking.mlflow=false",
]
HEAD_THEN_ALL = (
    "train.stages=[{trainable: head, epochs: 1, lr: 0.01}, {trainable: all, epochs: 1, lr: 0.01}]"
)


def config(tmp, data, *extra):
    return load_config(
        None,
        [
            f"data.root={data}",
            f"runs_dir={tmp / 'runs'}",
            f"data.manifest={tmp / ('manifest-' + data.name)}",
            *TINY,
            *extra,
        ],
    )


def trained(cfg):
    """Train; returns (run folder, the lines it logged)."""
    logs: list[str] = []
    run = train(cfg, progress=False, log=lambda m: logs.append(str(m)))
    return run, logs


def said(logs, text):
    return [m for m in logs if text in m]


def summary_of(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A scratch run with hflip 0 whose first stage trains the head only."""
    tmp = tmp_path_factory.mktemp("traps")
    data = fx.make_class_folder(tmp / "shapes", classes=CLASSES, per_class=10, size=(40, 40))
    cfg = config(tmp, data, "train.augment.preset=light", "train.augment.hflip=0", HEAD_THEN_ALL)
    run, logs = trained(cfg)
    return {"tmp": tmp, "data": data, "run": run, "logs": logs}


# ---------------------------------------------------------------- 1. flip TTA without flips


def test_flip_tta_on_a_model_trained_without_flips_is_a_warning_once(base, tmp_path):
    run = base["run"]
    assert json.loads((run / "data.json").read_text())["augment"]["hflip"] == 0
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "val", "--tta", "flip"])
    assert result.exit_code == 0, result.output
    assert result.output.count("trained without horizontal flips") == 1, result.output
    record = json.loads((run / "evaluations" / "val-tta-flip" / "metrics.json").read_text())
    flips = [w for w in record["warnings"] if "hflip: 0" in w]
    assert len(flips) == 1 and str(run) in flips[0]
    # no TTA, or multi-crop: nothing to say
    assert not evaluate_run(run, split="val", tta="multi-crop").record["warnings"]
    # a model that did see mirrored images: no warning
    flipped = tmp_path / run.name
    shutil.copytree(run, flipped, ignore=shutil.ignore_patterns("evaluations"))
    data = json.loads((flipped / "data.json").read_text())
    data["augment"]["hflip"] = 0.5
    (flipped / "data.json").write_text(json.dumps(data))
    assert not evaluate_run(flipped, split="val", tta="flip").record["warnings"]


def test_predict_with_flip_tta_warns_on_stderr(base):
    image = str(base["data"] / "a" / "a_0.png")
    result = CliRunner().invoke(app, ["predict", str(base["run"]), image, "--tta", "flip"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("trained without horizontal flips") == 1
    plain = CliRunner().invoke(app, ["predict", str(base["run"]), image])
    assert "horizontal flips" not in plain.stderr


# ---------------------------------------------------------------- 2. two-stage groups from test


def fake_groups_evaluation(run, name, split, groups):
    """An evaluation folder as `imgclf evaluate --split SPLIT` writes it, with chosen groups
    (a tiny model's own confusion groups are whatever its random start makes them)."""
    folder = run / "evaluations" / name
    folder.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "source": {"kind": "split", "split": split, "manifest": "m"}}
    (folder / "metrics.json").write_text(json.dumps(record))
    (folder / "confusion_groups.json").write_text(json.dumps(groups))
    return folder / "confusion_groups.json"


def test_groups_from_the_test_split_are_recognised(base, tmp_path):
    run = tmp_path / "single"
    evaluated = evaluate_run(base["run"], split="test")  # a real record: source split test
    shutil.copytree(evaluated.folder, run / "evaluations" / "test")
    assert "TEST split" in groups_from_test_split(run / "evaluations/test/confusion_groups.json")
    val = fake_groups_evaluation(run, "val", "val", [["a", "b"], ["c"]])
    assert groups_from_test_split(val) is None
    own = tmp_path / "groups.json"
    own.write_text("[]")
    assert groups_from_test_split(own) is None


def test_two_stage_on_test_split_groups_warns_once_and_records_it(base, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "summary.json").write_text(json.dumps({"test": {"test_accuracy": 0.5}}))
    fake_groups_evaluation(single, "test", "test", [["a", "b"], ["c"]])
    cfg = config(tmp_path, base["data"], "train.stages=[{epochs: 1, lr: 0.01}]")
    logs: list[str] = []
    folder = train_two_stage(
        cfg, "auto", from_run=single, name="ts", progress=False, log=lambda m: logs.append(m)
    )
    assert len(said(logs, "TEST split")) == 1, logs
    summary = summary_of(folder)
    assert summary["status"] == "completed"
    assert len(summary["warnings"]) == 1 and "test leakage" in summary["warnings"][0]


# ---------------------------------------------------------------- 3. comparison across data


def test_comparison_of_runs_on_different_data_versions_says_so(base, tmp_path):
    run = base["run"]
    same = tmp_path / "same-data"
    shutil.copytree(run, same)
    other = tmp_path / "other-data"
    shutil.copytree(run, other)
    data = json.loads((other / "data.json").read_text())
    data["data_hash"] = "f" * 64
    (other / "data.json").write_text(json.dumps(data))
    logs: list[str] = []
    page = compare_runs([run, same], tmp_path / "same.html", log=logs.append).read_text()
    assert not logs and "data-warning" not in page
    own_hash = json.loads((run / "data.json").read_text())["data_hash"][:12]
    assert page.count(f">{own_hash} (") == 2  # the data column
    page = compare_runs([run, same, other], tmp_path / "mixed.html", log=logs.append).read_text()
    assert len(logs) == 1 and "2 different data versions" in logs[0]
    assert page.count('class="warn data-warning"') == 1 and "ffffffffffff" in page
    assert "<th>data</th>" in page
    result = CliRunner().invoke(app, ["report", str(run), str(other), "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert result.output.count("different data versions") == 1


# ---------------------------------------------------------------- 4. head-only on random weights


def test_head_only_stage_on_a_random_backbone_warns_once(base):
    warnings = said(base["logs"], "(trainable: head)")
    assert len(warnings) == 1 and "random weights" in warnings[0], base["logs"]
    # at the start of the stage, before its first epoch
    first_epoch = next(i for i, m in enumerate(base["logs"]) if m.startswith("epoch"))
    assert base["logs"].index(warnings[0]) < first_epoch
    summary = summary_of(base["run"])
    assert summary["warnings"] == [warnings[0].removeprefix("warning: ")]
    html = write_report(base["run"]).read_text()
    assert html.count('class="warn training-warning"') == 1


# ---------------------------------------------------------------- 6. warm start


def test_warm_start_of_the_same_architecture_says_what_it_loaded(base, tmp_path):
    cfg = config(
        tmp_path,
        base["data"],
        f"model.init_from={base['run']}",
        "train.stages=[{trainable: head, epochs: 1, lr: 0.01}]",
    )
    run, logs = trained(cfg)
    lines = said(logs, "warm start")
    assert len(lines) == 1 and "warning" not in lines[0]
    found = re.search(r"loaded (\d+) of this model's (\d+) weight tensors", lines[0])
    loaded, total = int(found[1]), int(found[2])
    assert loaded == total > 0
    # pretrained body: the head-only stage is fine
    assert summary_of(run)["warnings"] == [] and not said(logs, "(trainable: head)")


def test_warm_start_across_architectures_that_loads_nothing_is_a_warning(base, tmp_path):
    cfg = config(
        tmp_path,
        base["data"],
        f"model.init_from={base['run']}",
        "model.scratch.width=4",  # every weight changes shape
        "train.stages=[{trainable: head, epochs: 1, lr: 0.01}]",
    )
    run, logs = trained(cfg)
    lines = said(logs, "warm start")
    assert len(lines) == 2, logs  # its own warning, and the head-only stage's that names it
    # every backbone weight changed shape: at most the head's bias (3 classes) still fits
    nothing = said(logs, "none of the backbone's fits")
    assert len(nothing) == 1 and nothing[0].startswith("warning:"), logs
    assert "new head" not in nothing[0] and "starts from random weights" in nothing[0]
    assert re.search(r"loaded (nothing|only 1 head tensor\(s\)) of this model's 12", nothing[0])
    warnings = summary_of(run)["warnings"]
    assert len(warnings) == 2
    assert warnings[0] == nothing[0].removeprefix("warning: ")
    assert "(trainable: head)" in warnings[1]
    assert "loaded no backbone weights" in warnings[1]


# ---------------------------------------------------------------- 5. imbalance


@pytest.fixture
def imbalanced(tmp_path):
    root = tmp_path / "skewed"
    fx.make_class_folder(root, classes=("a",), per_class=10, size=(40, 40))
    fx.make_class_folder(root, classes=("b", "c"), per_class=3, size=(40, 40), seed=1)
    return root


def test_scan_of_imbalanced_data_names_the_imbalance_settings(imbalanced, tmp_path):
    result = CliRunner().invoke(
        app, ["scan", str(imbalanced), "-o", str(tmp_path / "m"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("train.imbalance=weighted_loss") == 1, result.output
    report = json.loads((tmp_path / "m" / "scan_report.json").read_text())
    assert report["imbalance_ratio"] == pytest.approx(10 / 3, abs=1e-3)
    for mode in ("weighted_loss", "sampler", "focal"):
        assert mode in report["imbalance_note"]
    balanced = fx.make_class_folder(tmp_path / "flat", classes=CLASSES, per_class=4)
    assert scan(balanced, ScanConfig(), progress=False).report["imbalance_note"] is None


def test_imbalance_mode_logs_and_records_its_class_weights_once(imbalanced, tmp_path):
    cfg = config(
        tmp_path, imbalanced, "train.imbalance=weighted_loss", "train.stages=[{epochs: 2}]"
    )
    run, logs = trained(cfg)
    lines = said(logs, "class weights")
    assert len(lines) == 1 and lines[0].startswith("imbalance weighted_loss"), logs
    record = json.loads((run / "data.json").read_text())["imbalance"]
    counts = list(record["class_counts"].values())
    assert record["class_counts"]["a"] > record["class_counts"]["b"]
    want = class_weights(counts).tolist()
    assert list(record["class_weights"].values()) == pytest.approx(want, abs=1e-4)
    assert record["class_weights"]["b"] > record["class_weights"]["a"]


def test_imbalance_record_of_each_mode():
    cfg = load_config(None, ["train.imbalance=sampler"]).train
    rec = imbalance_record(cfg, [8, 2], ["x", "y"])
    assert rec["class_weights"] == {"x": 0.4, "y": 1.6} and "chance" in rec["applied_as"]
    cfg = load_config(None, ["train.imbalance=focal", "train.focal_gamma=1.5"]).train
    rec = imbalance_record(cfg, [8, 2], ["x", "y"])
    assert rec["class_weights"] == {"x": 1.0, "y": 1.0} and "gamma 1.5" in rec["applied_as"]
    assert imbalance_record(load_config(None, []).train, [8, 2], ["x", "y"]) is None


# ---------------------------------------------------------------- 8. black corners on white


def white_background_folder(root):
    """Drawings on white: a coloured disc per class, placed at random."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(10):
            im = Image.new("RGB", (40, 40), "white")
            x, y = rng.randint(4, 16), rng.randint(4, 16)
            ImageDraw.Draw(im).ellipse([x, y, x + 18, y + 18], fill=((80 * c) % 256, 60, 200))
            im.save(root / name / f"{i}.png")
    return root


def test_rotations_that_fill_black_on_white_background_images_are_a_warning(tmp_path):
    data = white_background_folder(tmp_path / "drawings")
    one = "train.stages=[{epochs: 1, lr: 0.01}]"
    run, logs = trained(config(tmp_path, data, "train.augment.preset=default", one))
    warnings = said(logs, "white border")
    assert len(warnings) == 1 and "train.augment.fill=white" in warnings[0], logs
    assert "100% of a sample" in warnings[0] and "with black" in warnings[0]
    assert summary_of(run)["warnings"] == [warnings[0].removeprefix("warning: ")]
    # said for the mean colour too; not with a white fill, nor without rotations or shifts
    _, logs = trained(config(tmp_path, data, "train.augment.fill=mean", one))
    assert said(logs, "with mean")
    for quiet in (["train.augment.fill=white"], ["train.augment.preset=light"]):
        run, logs = trained(config(tmp_path, data, "train.augment.preset=default", *quiet, one))
        assert not said(logs, "white border") and not summary_of(run)["warnings"], quiet


# ---------------------------------------------------------------- 9. fp32 on a CPU with bf16


def test_a_cpu_run_in_fp32_where_bf16_is_native_names_the_faster_precision(tmp_path, monkeypatch):
    from imgclf.workflows import training

    data = white_background_folder(tmp_path / "drawings")
    one = "train.stages=[{epochs: 1, lr: 0.01}]"
    for native, extra, want in (
        (True, [], 1),  # precision auto: fp32 on the CPU, the note names bf16-mixed
        (True, ["train.precision=bf16-mixed"], 0),  # chosen already: trains in bf16, no note
        (False, [], 0),  # emulated bf16 would be slower: no note
    ):
        monkeypatch.setattr(training, "cpu_has_bf16", lambda native=native: native)
        run, logs = trained(config(tmp_path, data, "train.accelerator=cpu", one, *extra))
        notes = said(logs, "train.precision=bf16-mixed trains")
        assert len(notes) == want, (native, extra, logs)
        assert summary_of(run)["status"] == "completed"
