import itertools
import json
import math

import numpy as np
import pytest
import torch

from imgclf.config import StageConfig
from imgclf.errors import ImgclfError
from imgclf.train.lr_find import lr_find, plot_lr_find
from imgclf.train.optim import Schedule, build_optimizer, lr_curve

KINDS = ["constant", "step", "cosine", "onecycle", "cyclic", "plateau"]


def _groups(lrs=(1e-2, 1e-3)):
    return [
        {"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr, "name": f"g{i}"}
        for i, lr in enumerate(lrs)
    ]


def _torch_curve(make_scheduler, steps, lr=0.1):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_with_and_without_warmup():
    assert lr_curve(StageConfig(schedule="constant", epochs=2, lr=0.5), 3) == [0.5] * 6
    warm = lr_curve(StageConfig(schedule="constant", epochs=2, lr=1.0, warmup_epochs=1), 3)
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_step_decays_per_epoch_down_to_the_floor():
    stage = StageConfig(
        schedule="step", epochs=7, lr=1.0, step={"every": 2, "factor": 10, "min_lr": 0.005}
    )
    curve = lr_curve(stage, 3)
    per_epoch = [1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.005]
    assert curve == pytest.approx([lr for lr in per_epoch for _ in range(3)])


def test_cosine_warmup_start_peak_end():
    stage = StageConfig(schedule="cosine", epochs=3, lr=1.0, min_lr=0.1, warmup_epochs=1)
    curve = lr_curve(stage, 4)
    assert len(curve) == 12
    assert curve[0] == pytest.approx(0.2)  # lr / (W + 1), W = 4 warmup steps
    assert max(curve) == curve[4] == pytest.approx(1.0)
    assert curve[-1] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 7 / 8)) / 2)
    after = curve[4:]
    assert all(a > b for a, b in itertools.pairwise(after))
    assert min(curve) >= 0.1


def test_onecycle_matches_torch_and_peaks_at_30_percent():
    curve = lr_curve(StageConfig(schedule="onecycle", epochs=10, lr=0.1), 10)
    ref = _torch_curve(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=100), 100
    )
    assert curve == pytest.approx(ref, rel=1e-9)
    assert curve.index(max(curve)) == 29
    assert curve[0] == pytest.approx(0.1 / 25)
    assert curve[-1] == pytest.approx(0.1 / 25 / 1e4)


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic_periods_amplitudes_and_torch_equivalence(mode):
    stage = StageConfig(
        schedule="cyclic",
        epochs=6,
        lr=1.0,
        cyclic={"mode": mode, "half_cycle_epochs": 1.0, "base_lr_fraction": 0.1, "gamma": 0.9},
    )
    curve = lr_curve(stage, 5)  # half cycle = 5 steps, period 10
    assert [curve[i] for i in (0, 10, 20)] == pytest.approx([0.1] * 3)
    peaks = [curve[i] for i in (5, 15, 25)]
    expected = {
        "triangular": [1.0, 1.0, 1.0],
        "triangular2": [1.0, 0.55, 0.325],
        "exp_range": [0.1 + 0.9 * 0.9**s for s in (5, 15, 25)],
    }[mode]
    assert peaks == pytest.approx(expected)
    ref = _torch_curve(
        lambda o: torch.optim.lr_scheduler.CyclicLR(
            o, base_lr=0.1, max_lr=1.0, step_size_up=5, mode=mode, gamma=0.9, cycle_momentum=False
        ),
        30,
        lr=1.0,
    )
    assert curve == pytest.approx(ref, rel=1e-9)


def _plateau(metric="val_loss", patience=2, min_lr=0.0):
    stage = StageConfig(
        schedule="plateau",
        lr=1.0,
        epochs=10,
        plateau={"metric": metric, "factor": 0.5, "patience": patience, "min_lr": min_lr},
    )
    params = [torch.nn.Parameter(torch.ones(1))]
    return Schedule(torch.optim.SGD(params, lr=1.0), stage, steps_per_epoch=2)


def test_plateau_reduces_after_more_than_patience_bad_epochs():
    sched = _plateau()
    lrs = []
    for loss in [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.8]:
        sched.step_epoch({"val_loss": loss, "val_accuracy": 0.5})
        lrs.append(sched.lrs()[0])
    # Bad epochs 3, 4, 5 → reduce after the third; the count restarts; 6, 7, 8 → again.
    assert lrs == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_plateau_maximises_non_loss_metrics_and_respects_floor():
    sched = _plateau(metric="val_accuracy", patience=0, min_lr=0.3)
    for acc in [0.5, 0.6, 0.6, 0.4, 0.4]:
        sched.step_epoch({"val_accuracy": acc})
    assert sched.lrs() == pytest.approx([0.3])  # 1 → 0.5 → 0.3 (floor) → 0.3


def test_plateau_names_missing_metric_and_available_keys():
    with pytest.raises(ImgclfError, match=r"val_loss.*\['train_loss', 'val_acc'\]"):
        _plateau().step_epoch({"train_loss": 1.0, "val_acc": 0.3})


@pytest.mark.parametrize("kind", KINDS)
def test_group_multipliers_are_preserved(kind):
    stage = StageConfig(
        schedule=kind,
        epochs=4,
        lr=1e-2,
        min_lr=1e-4,
        warmup_epochs=1 if kind in ("constant", "step", "cosine", "plateau") else 0,
        step={"every": 1, "factor": 10, "min_lr": 1e-4},
        plateau={"patience": 0},
    )
    opt = build_optimizer(_groups((1e-2, 1e-3, 3e-4)), stage)
    sched = Schedule(opt, stage, steps_per_epoch=3)
    seen = set()
    for _ in range(4):
        for _ in range(3):
            a, b, c = sched.lrs()
            assert (b / a, c / a) == pytest.approx((0.1, 0.03))
            seen.add(round(a, 12))
            sched.step_batch()
        sched.step_epoch({"val_loss": 1.0})
    assert len(seen) > (1 if kind == "constant" else 3)  # the curve really moved


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_continues_the_identical_curve(kind):
    stage = StageConfig(
        schedule=kind,
        epochs=5,
        lr=0.1,
        warmup_epochs=0.5 if kind in ("cosine", "plateau") else 0,
        step={"every": 2},
        plateau={"patience": 0},
    )
    losses = [1.0, 0.9, 0.95, 0.97, 0.99]

    def run(sched, epochs, first_epoch=0):
        out = []
        for e in range(first_epoch, first_epoch + epochs):
            for _ in range(4):
                out.append(sched.lrs())
                sched.step_batch()
            sched.step_epoch({"val_loss": losses[e]})
        return out

    full = run(Schedule(build_optimizer(_groups(), stage), stage, 4), 5)
    first = Schedule(build_optimizer(_groups(), stage), stage, 4)
    head = run(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # plain values only
    resumed = Schedule(build_optimizer(_groups(), stage), stage, 4)
    resumed.load_state_dict(state)
    assert head + run(resumed, 3, first_epoch=2) == full
    if kind != "constant":
        assert len({lrs[0] for lrs in full}) > 2


def test_load_state_dict_rejects_a_different_stage():
    stage = StageConfig(schedule="cosine", epochs=2)
    state = Schedule(build_optimizer(_groups(), stage), stage, 4).state_dict()
    other = Schedule(build_optimizer(_groups(), stage), stage, 5)
    with pytest.raises(ImgclfError, match="steps_per_epoch"):
        other.load_state_dict(state)


def test_warmup_is_refused_for_schedules_with_their_own_start():
    stage = StageConfig(schedule="onecycle", warmup_epochs=1, epochs=3)
    with pytest.raises(ImgclfError, match="warmup_epochs"):
        lr_curve(stage, 4)


def test_lr_curve_base_lr_scales_the_curve():
    stage = StageConfig(schedule="cosine", epochs=2, lr=1.0)
    assert lr_curve(stage, 5, base_lr=0.5) == pytest.approx([x / 2 for x in lr_curve(stage, 5)])


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize(
    ("device_type", "flag"), [("cpu", None), ("cuda", "fused"), ("mps", "foreach")]
)
def test_optimizers_keep_group_settings_and_step(name, device_type, flag):
    stage = StageConfig(optimizer=name, lr=0.1, weight_decay=0.05, nesterov=name == "sgd")
    groups = _groups((0.1, 0.01))
    groups[0]["weight_decay"] = 0.0
    opt = build_optimizer(groups, stage, device_type=device_type)
    assert type(opt).__name__.lower() == name
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert [g["name"] for g in opt.param_groups] == ["g0", "g1"]
    if name == "sgd":
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    for key in ("fused", "foreach"):
        assert bool(opt.defaults.get(key)) == (key == flag)
    if device_type == "cpu" or flag == "fused":  # foreach/fused kernels exist for CPU tensors
        for g in opt.param_groups:
            g["params"][0].grad = torch.ones(2)
        opt.step()
        assert not torch.equal(opt.param_groups[0]["params"][0].detach(), torch.ones(2))


def test_optimizer_errors():
    with pytest.raises(ImgclfError, match="momentum"):
        build_optimizer(_groups(), StageConfig(optimizer="sgd", nesterov=True, momentum=0))
    frozen = [{"params": [torch.nn.Parameter(torch.ones(1), requires_grad=False)]}]
    with pytest.raises(ImgclfError, match="nothing to train"):
        build_optimizer(frozen, StageConfig())


def _regression_step(seed=0):
    """One real SGD step on a tiny least-squares problem; diverges for lr above ~1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    model = torch.nn.Linear(8, 1)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(lr):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


@pytest.mark.parametrize("seed", [0, 1])
def test_lr_find_suggests_a_sensible_decade_and_stops_on_divergence(seed):
    result = lr_find(_regression_step(seed), start_lr=1e-5, end_lr=10.0, num_steps=100)
    assert 1e-2 <= result.suggestion <= 1.0
    assert "diverged" in result.reason
    assert len(result.lrs) == len(result.losses) < 100
    assert result.lrs[0] == pytest.approx(1e-5)
    assert result.losses[-1] > 4 * min(result.losses)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:], strict=False)]
    assert ratios == pytest.approx([10 ** (6 / 99)] * len(ratios))


def test_lr_find_falls_back_without_descent_and_plots_atomically(tmp_path):
    result = lr_find(lambda lr: 1.0 + lr, start_lr=1e-3, end_lr=1.0, num_steps=10)
    assert result.suggestion == pytest.approx(1e-4)  # the minimum is at start_lr: min / 10
    assert "reached end_lr" in result.reason and "/ 10" in result.reason
    assert "never fell" in result.reason
    out = plot_lr_find(result, tmp_path / "lr_find.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lr_find.png"]


def test_lr_find_suggests_a_tenth_of_the_minimum_not_the_steepest_point():
    # A synthetic curve (log10 lr → loss): flat, then a descent that is steepest right before
    # its minimum at lr 1e-2, then divergence. Steepest descent would pick ~1e-2 (too bold).
    def curve(lr):
        x = math.log10(lr)
        if x <= -2:
            return 2.0 - 1.5 * math.exp(3 * (x + 2))
        return 0.5 + 40 * (x + 2) ** 2

    steps = []
    result = lr_find(
        curve,
        start_lr=1e-6,
        end_lr=1.0,
        num_steps=200,
        smooth=0.0,
        on_step=lambda lr, loss: steps.append(lr),
    )
    lr_min = result.lrs[int(np.argmin(result.losses))]
    assert lr_min == pytest.approx(1e-2, rel=0.1)
    assert result.suggestion == pytest.approx(lr_min / 10)
    assert steps == result.lrs, "on_step reports every step (the progress bar)"


def test_lr_find_times_each_step_without_what_came_before():
    import time

    def step(lr: float) -> float:
        time.sleep(0.02 if lr > 1e-3 else 0.0)  # the later steps are the slow ones
        return 1.0

    result = lr_find(step, start_lr=1e-5, end_lr=1e-1, num_steps=5)
    assert len(result.step_seconds) == len(result.lrs) == 5
    assert [s >= 0.02 for s in result.step_seconds] == [lr > 1e-3 for lr in result.lrs]


def test_lr_find_rejects_bad_arguments_and_nan_first_loss():
    with pytest.raises(ImgclfError, match="start_lr"):
        lr_find(lambda lr: 1.0, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ImgclfError, match="nan"):
        lr_find(lambda lr: float("nan"))
