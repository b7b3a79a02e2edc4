"""A stage's weight average (`ema`): the running average's arithmetic, the run keeping the
averaged weights it validated, and an exact resume after SIGKILL with the average in the
checkpoint."""

import csv

import pytest
import torch
from torch import nn

from imgclf.config import load_config
from imgclf.errors import ImgclfError
from imgclf.evaluate.evaluate import evaluate_run
from imgclf.runs.layout import CHECKPOINT
from imgclf.train.average import WeightAverage
from imgclf.workflows.training import train
from test_cached_training import killed_then_resumed, quiet
from test_train import TINY, cfg_for, metrics_without_time, same_weights, weights

import factory as fx


@pytest.fixture
def data(tmp_path):
    return fx.make_class_folder(
        tmp_path / "shapes", classes=("a", "b", "c"), per_class=10, size=(40, 40)
    )


def test_the_average_follows_the_weights_with_its_decay_and_hands_them_back():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, horizon_steps=4)  # decay 0.75, lowered over the first steps
    assert average.decay == pytest.approx(0.75)
    expected = 0.0
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(step))
        average.update()
        decay = min(0.75, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * step
    averaged = average.state_dict_of(model)["weight"]
    assert torch.allclose(averaged, torch.full((1, 2), expected))
    assert not torch.allclose(averaged, model.weight)  # the raw weights are left alone
    with average.swapped_in():
        assert torch.allclose(model.weight, averaged)
    assert torch.equal(model.weight, torch.full((1, 2), 5.0))
    # a checkpoint round trip carries the values and the step count
    other = WeightAverage(model, horizon_steps=4)
    other.load_state_dict(average.state_dict())
    assert other.steps == 5 and torch.equal(other.state_dict_of(model)["weight"], averaged)
    with pytest.raises(ValueError, match="other tensors"):
        WeightAverage(nn.Linear(3, 1, bias=False), 4).load_state_dict(average.state_dict())


def test_a_run_keeps_the_averaged_weights_it_validated(data, tmp_path):
    # One epoch: it is the best, so the kept weights are the average at its end (a horizon of
    # two epochs: the first weights still count).
    cfg = cfg_for(data, tmp_path, "train.stages=[{epochs: 1, lr: 0.05, ema: 2.0}]")
    run = train(cfg, progress=False, log=quiet)
    checkpoint = torch.load(run / CHECKPOINT, weights_only=True)
    average, raw = checkpoint["average"], checkpoint["model"]
    assert average["steps"] > 0
    kept = weights(run)
    assert all(torch.equal(kept[k], v) for k, v in average["values"].items())
    # validation saw the averaged weights: the kept model's val loss is the epoch's
    (row,) = list(csv.DictReader((run / "metrics.csv").open()))
    val = evaluate_run(run, split="val")
    assert val.record["metrics"]["log_loss"] == pytest.approx(float(row["val_loss"]), abs=1e-4)
    assert any(not torch.equal(kept[k], raw[k]) for k in average["values"])
    # BatchNorm's statistics (updated in this stage) are averaged with the weights they go with
    buffers = [k for k in raw if "running_" in k]
    assert buffers and set(buffers) <= set(average["values"])
    assert any(not torch.equal(kept[k], raw[k]) for k in buffers)


def test_ema_is_checked_at_the_edge():
    with pytest.raises(ImgclfError, match="ema"):
        load_config(None, ["train.stages=[{epochs: 1, ema: 0}]"])


def test_an_averaging_run_resumes_exactly_after_a_kill(data, tmp_path):
    args = [
        *TINY,
        f"data.root={data}",
        f"data.manifest={tmp_path / 'manifest'}",
        "train.checkpoint_every=1",
        "train.stages=[{epochs: 2, lr: 0.02, ema: 1.0}]",
    ]
    ref = train(load_config(None, [*args, f"runs_dir={tmp_path / 'ref'}"]), progress=False,
                log=quiet)  # fmt: skip
    run = killed_then_resumed(args, tmp_path / "runs")
    assert metrics_without_time(run) == metrics_without_time(ref)
    assert same_weights(run, ref)
