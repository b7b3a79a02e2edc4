"""Two-stage classifier: group files are checked, stages train on derived manifests that keep
the split, and the composite gives P(group) × P(class | group) over the original labels."""

import json
from types import SimpleNamespace

import pytest
import torch

from imgclf.config import load_config
from imgclf.data.manifest import read_manifest
from imgclf.errors import ImgclfError
from imgclf.predict.predictor import load_predictor
from imgclf.predict.two_stage import TwoStage, _plan, compose
from imgclf.workflows.two_stage import find_confusion_groups, read_groups, train_two_stage

import factory as fx


def test_groups_file_must_cover_every_class_once(tmp_path):
    labels = ["a", "b", "c", "d"]
    path = tmp_path / "g.json"
    path.write_text(json.dumps([["b", "a"], ["d", "c"]]))
    assert read_groups(path, labels) == [["a", "b"], ["c", "d"]]
    path.write_text(json.dumps([["a", "b"], ["b", "c"], ["x"]]))
    with pytest.raises(ImgclfError) as e:
        read_groups(path, labels)
    msg = str(e.value)
    assert "unknown classes ['x']" in msg and "missing classes ['d']" in msg
    assert "more than one group (or twice) ['b']" in msg
    path.write_text('{"a": 1}')
    with pytest.raises(ImgclfError, match="list of non-empty lists"):
        read_groups(path, labels)


def test_auto_groups_need_an_evaluation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ImgclfError, match=r"imgclf evaluate .* first"):
        find_confusion_groups(run)
    for name in ("test", "val"):
        (run / "evaluations" / name).mkdir(parents=True)
        (run / "evaluations" / name / "confusion_groups.json").write_text("[]")
    assert find_confusion_groups(run).parent.name == "val"
    assert find_confusion_groups(run, "test").parent.name == "test"
    cfg = load_config(None, ["data.root=nowhere"])
    with pytest.raises(ImgclfError, match="--from-run"):
        train_two_stage(cfg, "auto")


def test_compose_singleton_and_pair_groups():
    stage1 = SimpleNamespace(labels=["group_0", "group_1"])
    pair = SimpleNamespace(labels=["c", "a"])  # stage-2 labels in its own order
    plan = _plan(stage1.labels, [["a", "c"], ["b"]], [pair, None], ["a", "b", "c"])
    p1 = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    p2 = torch.tensor([[0.25, 0.75], [0.5, 0.5]])  # P(c | g0), P(a | g0)
    out = compose(p1, [p2], plan)
    want = torch.tensor([[0.8 * 0.75, 0.2, 0.8 * 0.25], [0.1 * 0.5, 0.9, 0.1 * 0.5]])
    assert torch.allclose(out, want)
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_two_stage_trains_and_sums_to_one(tmp_path):
    data = fx.make_class_folder(tmp_path / "food", classes=("a", "b", "c", "d"), per_class=8)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps([["a", "b"], ["c", "d"]]))
    single = tmp_path / "single"  # the single-stage run compared against (its summary only)
    single.mkdir()
    (single / "summary.json").write_text(json.dumps({"test": {"test_accuracy": 0.5}}))
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            f"data.manifest={tmp_path / 'manifest'}",
            f"runs_dir={tmp_path / 'runs'}",
            "model.name=scratch_cnn",
            "model.pretrained=none",
            "model.scratch.blocks=1",
            "model.scratch.width=4",
            "data.image_size=16",
            "train.batch_size=8",
            "train.stages=[{epochs: 1, lr: 0.01}]",
            "tracking.mlflow=false",
        ],
    )
    folder = train_two_stage(
        cfg, groups, from_run=single, name="ts", progress=False, log=lambda *_: None
    )
    spec = json.loads((folder / "two_stage.json").read_text())
    assert spec["groups"] == [["a", "b"], ["c", "d"]] and sorted(spec["stage2"]) == [
        "group_0",
        "group_1",
    ]
    # derived manifests keep every image's split; the coarse one is relabelled by group
    original = {e.path: e for e in read_manifest(tmp_path / "manifest").ok_entries}
    coarse = read_manifest(folder / "manifests" / "coarse")
    assert coarse.labels.names == ("group_0", "group_1")
    assert {e.path: e.split for e in coarse.ok_entries} == {p: e.split for p, e in original.items()}
    assert {e.label for e in coarse.ok_entries if original[e.path].label in "ab"} == {"group_0"}
    group1 = read_manifest(folder / "manifests" / "group_1")
    assert {e.label for e in group1.ok_entries} == {"c", "d"}
    model = load_predictor(folder)
    assert isinstance(model, TwoStage) and model.labels == ["a", "b", "c", "d"]
    paths = [data / "a" / "a_0.png", data / "d" / "d_3.png", tmp_path / "missing.png"]
    preds = model.predict_paths(paths)
    assert preds.ok == [0, 1] and 2 in preds.errors
    assert torch.allclose(preds.probs.sum(1), torch.ones(2), atol=1e-6)
    # P(a) = P(group_0) × P(a | group_0)
    stage1 = load_predictor(folder / spec["stage1"]).predict_paths(paths[:2]).probs
    g0 = load_predictor(folder / spec["stage2"]["group_0"]).predict_paths(paths[:2]).probs
    assert torch.allclose(preds.probs[:, 0], stage1[:, 0] * g0[:, 0], atol=1e-6)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and "test_accuracy" in summary["test"]
    assert json.loads((folder / "model.json").read_text())["kind"] == "two_stage"
    comparison = json.loads((folder / "comparison.json").read_text())
    assert comparison["test_accuracy"] == {
        "two_stage": summary["test"]["test_accuracy"],
        "single_stage": 0.5,
    }
    # Its report compares it with the single-stage run.
    from imgclf.evaluate.report import write_report

    html = write_report(folder).read_text()
    assert 'id="two-stage"' in html and "single-stage" in html
