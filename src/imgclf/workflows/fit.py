"""`imgclf fit DATA`: from a folder to the best model it can find in a time budget.

The recipe a careful person follows by hand, as one visible sequence of ordinary runs:

1. **prepare** the manifest and split (reused when they exist) and profile the data and machine;
2. **screen** every candidate cheaply: a pretrained backbone trains a head on its cached
   features (one forward pass over the data, then seconds per epoch); a from-scratch CNN trains
   a few epochs;
3. **fine-tune** the lead (the best probe, or a larger backbone within noise of it) and its
   twin (the same model from another seed), then the next best where the quality allows: the
   LR range test, then the backbone (all of it, or from its fourth stage on a CPU) with a new
   head, from a warm-up epoch, with early stopping on validation; the screening probe ranks
   the candidates, it does not start their fine-tunes;
4. **combine**: flip TTA and a soft-vote ensemble of the best run of each of the top two or
   three candidates (fine-tuned, or its probe), each kept only when it beats the best single
   run on validation (an ensemble's tie on accuracy: by a clearly lower log loss,
   `ensemble_check`);
5. **finish**: the chosen model's test split measured once, an ONNX export, a leaderboard of the
   fit and one report page.

Every run is an ordinary run folder tagged `fit: <id>` (and `role`, `candidate`); the fit's own
folder `fits/<id>/` holds `fit.json` (the record, written after every step, which is what
`--resume` continues from), `report.html`, `leaderboard.md` and `export/`. Choices are made on
the validation split only; the test split is predicted once, at the end, for the chosen model.

Time: each phase gets a share of the budget; each run gets a deadline (`train(deadline=…)`:
no epoch starts that would end past it, a step running at the deadline is the last), so the
budget holds to within the final steps. Ctrl-C stops the run in progress as `imgclf train`
does (saved), records the fit and exits; `imgclf fit --resume FIT` continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.config import RunConfig, validate
from imgclf.data.borders import sample_borders
from imgclf.data.manifest import MANIFEST_JSON
from imgclf.data.prepare import prepare
from imgclf.errors import ImgclfError
from imgclf.evaluate.fit_report import LEADERBOARD_MD, write_fit_report
from imgclf.files import atomic_write_json, atomic_write_text
from imgclf.runs.layout import (
    CHECKPOINT,
    ENSEMBLE_JSON,
    FIT_JSON,
    PREDICTIONS,
    SUMMARY_JSON,
    RunFileError,
    RunFolder,
)
from imgclf.runs.record import new_run_id
from imgclf.workflows import fit_plan
from imgclf.workflows.fit_plan import Candidate, DataProfile

EXPORT = "export"

# Learning rates a fine-tune may use, whatever the LR range test says: its suggestion (a tenth
# of the lr at the loss minimum) is noisy over a few dozen steps. At 1e-3 (the old ceiling,
# which the test chose for Lite1 on the held-in clip art) all layers of a pretrained backbone
# are wrecked in the first epoch despite the warm-up: val accuracy 0.716 → 0.459, recovering to
# 0.713 only after 5 epochs; 3e-4 kept the probe's accuracy from the first epoch.
FINETUNE_LR = (1e-5, 3e-4)
SCRATCH_LR = (1e-4, 1e-2)
# Seconds allowed per phase beyond measured speeds: model building, loaders, MLflow, plots.
RUN_OVERHEAD = 8.0
# Predicted images per trained one, for the reserve: a forward pass against forward and backward
# (about 3 with every layer trained; nearer 2 with the early stages frozen: held-in clip art in
# bf16 on the CPU, Lite2 at 260 px trained at 18-19 images/s and the reserved phases ran at
# about 40). The feature pass priced them before: from a cold image cache it decodes too, and
# kept 210 s for phases that took 80.
PREDICT_PER_TRAIN = 2.0
# Fine-tuning a backbone for fewer epochs than this rarely beats its linear probe.
MIN_FINETUNE_EPOCHS = 8
FLIP_VAL = "fit-val-tta"  # the evaluation name of a run's val predictions with flip TTA
_BOARD = ("val_accuracy", "val_loss", "train_s")  # the fit leaderboard's metric columns


@dataclass
class FitOptions:
    data: Path | None  # class-folder tree, CSV or manifest folder (None on --resume)
    budget: float  # seconds
    quality: str = "good"
    models: list[str] | None = None
    device: str = "auto"  # auto | cpu | cuda
    runs_dir: Path = Path("runs")
    fits_dir: Path = Path("fits")
    seed: int = 0
    progress: bool = True
    mlflow: bool = True


@dataclass
class FitResult:
    folder: Path  # the fit's folder
    chosen: Path | None  # the chosen run or ensemble folder
    test: dict[str, float] = field(default_factory=dict)
    status: str = "completed"


class FitInterrupted(Exception):
    """Ctrl-C during a fit: what finished is recorded; `imgclf fit --resume` continues."""


def fit(opts: FitOptions, *, resume: Path | None = None, log=print) -> FitResult:
    """Run (or continue) a fit; returns where it is and what it chose."""
    fitter = _Fitter.start(opts, resume, log)
    return fitter.run()


# ---------------------------------------------------------------------------------------------


class _Fitter:
    """One fit: the record (`fit.json`), the clock and the display; one method per phase."""

    def __init__(self, folder: Path, record: dict, opts: FitOptions, log) -> None:
        self.folder, self.record, self.opts = folder, record, opts
        self.began = time.monotonic()
        self.spent_before = float(record.get("spent_s", 0.0))
        self.deadline = self.began + max(0.0, opts.budget - self.spent_before)
        self.display = _Display(self, log, opts.progress)
        self.log = self.display.log
        self.user_stop = False

    # ------------------------------------------------------------------ set-up

    @classmethod
    def start(cls, opts: FitOptions, resume: Path | None, log) -> _Fitter:
        if resume is not None:
            path = Path(resume)
            if not (path / FIT_JSON).is_file():
                raise ImgclfError(f"{path} is not a fit folder (no {FIT_JSON})")
            try:
                record = json.loads((path / FIT_JSON).read_text(encoding="utf-8"))
            except ValueError as e:
                raise ImgclfError(f"{path / FIT_JSON} is damaged ({e}); start a new fit") from e
            saved = record["options"]
            budget = opts.budget if opts.budget > 0 else float(saved["budget"])
            opts = FitOptions(
                data=Path(saved["data"]),
                budget=budget,
                quality=saved["quality"],
                models=saved["models"],
                device=saved["device"],
                runs_dir=Path(saved["runs_dir"]),
                fits_dir=path.parent,
                seed=saved["seed"],
                progress=opts.progress,
                mlflow=saved.get("mlflow", True),
            )
            record["options"]["budget"] = budget
            record["status"] = "running"
            log(
                f"resuming fit {record['fit_id']}: {max(0.0, budget - record['spent_s']):.0f} s "
                f"of {budget:.0f} s left"
            )
            return cls(path, record, opts, log)
        if opts.quality not in fit_plan.QUALITIES:
            raise ImgclfError(f"--quality {opts.quality!r}: one of {', '.join(fit_plan.QUALITIES)}")
        if opts.data is None or not opts.data.exists():
            raise ImgclfError(
                f"{opts.data} does not exist: give a class-folder tree, a CSV or a manifest"
            )
        fit_id = new_run_id("fit", None)
        folder = opts.fits_dir / fit_id
        folder.mkdir(parents=True, exist_ok=False)
        record = {
            "fit_id": fit_id,
            "status": "running",
            "options": {
                "data": str(opts.data),
                "budget": opts.budget,
                "quality": opts.quality,
                "models": opts.models,
                "device": opts.device,
                "runs_dir": str(opts.runs_dir),
                "seed": opts.seed,
                "mlflow": opts.mlflow,
            },
            "spent_s": 0.0,
            "phases": {},  # phase → seconds spent (over every session)
            "decisions": [],
            "candidates": [],
        }
        return cls(folder, record, opts, log)

    @property
    def fit_id(self) -> str:
        return self.record["fit_id"]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.record["spent_s"] = round(self.spent_before + time.monotonic() - self.began, 2)
        atomic_write_json(self.folder / FIT_JSON, self.record)

    def decide(self, text: str) -> None:
        """A choice and its reason: in the log, the record and the report."""
        if text not in self.record["decisions"]:
            self.record["decisions"].append(text)
            self.log(text)

    # ------------------------------------------------------------------ the phases

    def run(self) -> FitResult:
        self.log(f"fit {self.fit_id}: folder {self.folder}, budget {self.opts.budget:.0f} s")
        try:
            with self.display:
                for name, phase in (
                    ("prepare", self.prepare),
                    ("screening", self.screen),
                    ("fine-tuning", self.finetune),
                    ("combining", self.combine),
                    ("final", self.finish),
                ):
                    if self.record["phases"].get(name, {}).get("done"):
                        continue
                    self.display.phase(name)
                    t0 = time.monotonic()
                    phase()
                    entry = self.record["phases"].setdefault(name, {"seconds": 0.0})
                    entry["seconds"] = round(entry["seconds"] + time.monotonic() - t0, 2)
                    entry["done"] = True
                    self.save()
        except (KeyboardInterrupt, FitInterrupted):
            self.record["status"] = "interrupted"
            self.save()
            write_fit_report(self.folder)
            self.log(f"fit interrupted; continue with: imgclf fit --resume {self.folder}")
            return FitResult(self.folder, None, status="interrupted")
        self.record["status"] = "completed"
        self.save()
        self.log(f"report: {write_fit_report(self.folder)}")
        chosen = self.record.get("chosen") or {}
        return FitResult(
            self.folder,
            Path(chosen["folder"]) if chosen.get("folder") else None,
            self.record.get("test", {}),
        )

    # 1 ---------------------------------------------------------------- prepare and plan

    def prepare(self) -> None:
        data = Path(self.record["options"]["data"])
        dcfg = {"manifest": str(data)} if (data / MANIFEST_JSON).is_file() else {"root": str(data)}
        cfg = validate({"data": dcfg}, "imgclf fit")
        manifest, manifest_dir = prepare(cfg.data, progress=self.opts.progress)
        if not manifest.split_entries("val"):
            raise ImgclfError(
                f"{manifest_dir} has no validation images: fit chooses on the val split; "
                "re-split with imgclf split MANIFEST --val 0.2 --force"
            )
        light = sample_borders(manifest).light
        profile = replace(fit_plan.profile_manifest(manifest), light_borders=light)
        machine = _machine(self.opts.device)
        self.record.update(
            manifest=str(manifest_dir),
            split=cfg.data.split.model_dump(),
            profile=asdict(profile),
            machine=machine,
        )
        gpu = machine["device"] == "cuda"
        candidates = fit_plan.choose_candidates(
            profile, self.opts.quality, self.opts.models, gpu=gpu
        )
        augment, why_aug = fit_plan.augmentation(profile)
        imbalance, why_imb = fit_plan.imbalance(profile)
        crop_mode, why_crop = fit_plan.crop_mode(profile)
        freeze, why_freeze = fit_plan.freeze_early(profile, gpu)
        batch = 128 if gpu else 32
        batch = max(8, min(batch, profile.train // 4))
        self.record["settings"] = {
            "augment": augment,
            "augment_why": why_aug,
            "imbalance": imbalance,
            "imbalance_why": why_imb,
            "crop_mode": crop_mode,
            "crop_mode_why": why_crop,
            "freeze_early": freeze,
            "batch_size": batch,
        }
        self.record["candidates"] = [
            {**asdict(c), "screen": None, "finetune": None} for c in candidates
        ]
        self.decide(
            f"data: {profile.train} training / {profile.val} val / {profile.test} test images, "
            f"{profile.classes} classes, median short side {profile.median_side} px; "
            f"machine: {machine['device']} ({machine['cores']} cores"
            + (", native bf16: training in bf16 autocast)" if machine.get("bf16") else ")")
        )
        self.decide("candidates: " + "; ".join(f"{c.key} ({c.why})" for c in candidates))
        self.decide(f"augmentation {augment}: {why_aug}")
        self.decide(f"imbalance {imbalance}: {why_imb}")
        self.decide(f"crop {crop_mode}: {why_crop}")
        self.decide(f"fine-tuning: {why_freeze}")

    def _profile(self) -> DataProfile:
        return DataProfile(**self.record["profile"])

    # 2 ---------------------------------------------------------------- screening

    def screen(self) -> None:
        cands = self.record["candidates"]
        screened = [c for c in cands if not c.get("twin_of")]  # a twin is fine-tuned only
        budget = fit_plan.share_budget(max(self.left(), 1.0), len(screened), self._reserve())
        self.record["budget"] = asdict(budget) | {"finetune": budget.finetune}
        ends = time.monotonic() + budget.screening
        # Cheapest first: the first backbone's time prices the others (relative cost per
        # image), so one that would not fit the screening share is skipped, not cut short.
        order = sorted(screened, key=lambda c: fit_plan.relative_cost(_candidate(c)))
        first: tuple[float, float] | None = None  # (seconds, relative cost) of a screened one
        for i, cand in enumerate(order):
            if cand["screen"] and cand["screen"].get("done"):
                continue
            c = _candidate(cand)
            left = ends - time.monotonic()
            share = max(RUN_OVERHEAD + 6, left / (len(order) - i))
            if first and not c.scratch:
                estimate = first[0] * fit_plan.relative_cost(c) / first[1]
                if estimate > max(left, 0.0) * 1.2:
                    self.decide(
                        f"{c.key}: not screened, it would take about {estimate:.0f} s of the "
                        f"{max(left, 0):.0f} s left for screening"
                    )
                    cand["screen"] = {"role": "screen", "status": "skipped", "done": True}
                    continue
                share = max(share, estimate * 1.3)
            self.display.item(f"screening {c.key}")
            if c.scratch:
                stages = [_scratch_stage(self._scratch_epochs(c, share))]
                cfg = self._config(c, "screen", stages, features=False)
            else:
                # A linear probe, trained to convergence: on cached features of the images
                # as they are (no augmentation), 30 epochs cost seconds after the feature pass.
                # It ranks the candidates (and is a candidate's model when none of its
                # fine-tunes beats it); the fine-tunes start from a new head (`finetune`).
                stages = [
                    {
                        "name": "head",
                        "trainable": "head",
                        "epochs": 30,
                        "optimizer": "adamw",
                        "lr": 1e-2,
                        "schedule": "cosine",
                    }
                ]
                cfg = self._config(c, "screen", stages, features=True, augment={"preset": "none"})
                # The feature pass must run whole: the deadline is the fit's, not the share.
                share = max(share, self.left() - self._reserve())
            cand["screen"] = self._train(cfg, "screen", c.key, share)
            if not c.scratch and _score(cand["screen"]) is not None and first is None:
                first = (cand["screen"]["seconds"], fit_plan.relative_cost(c))
            self.save()
        # Equal validation accuracy: the cheaper model (to train on, and to serve) ranks first.
        ranked = sorted(
            (c for c in cands if _score(c["screen"]) is not None),
            key=lambda c: (-_score(c["screen"]), fit_plan.relative_cost(_candidate(c))),
        )
        if not ranked:
            raise ImgclfError("no candidate finished screening within the budget: give more --time")
        self.decide(
            "screening (val accuracy): "
            + ", ".join(f"{c['key']} {_score(c['screen']):.4f}" for c in ranked)
        )
        self.record["survivors"] = self._choose_survivors(ranked)
        self.decide(f"fine-tuning {', '.join(self.record['survivors'])}")

    def _choose_survivors(self, ranked: list[dict]) -> list[str]:
        """The candidates to fine-tune, in order, from the screened ones best first: the lead
        (`_lead`), its twin (`fit_plan.twin`) where the quality ensembles, then the next best
        up to the quality's count. The twin is added to the fit's candidates."""
        quality = fit_plan.QUALITIES[self.opts.quality]
        lead, why = _lead(ranked)
        if why:
            self.decide(why)  # a larger backbone first
        ranked = [lead] + [c for c in ranked if c is not lead]
        survivors = [c["key"] for c in ranked[: quality.survivors]]
        if not (quality.ensemble and quality.survivors >= 2 and _score(lead["screen"]) < 1.0):
            return survivors
        # The lead's twin takes the second place: two fine-tunes of the best backbone from
        # different seeds make a stronger vote than it with a weaker backbone (held-in clip
        # art: fine-tuned Lite0 trailed Lite2 by 2-3 points on val, and their vote beat Lite2
        # alone in none of six fits; two Lite2 seeds: docs/PERFORMANCE.md, "Twins").
        second = fit_plan.twin(_candidate(lead))
        cands = self.record["candidates"]
        if second.key not in {c["key"] for c in cands}:
            cands.append(
                {**asdict(second), "twin_of": lead["key"], "screen": None, "finetune": None}
            )
        return [lead["key"], second.key, *survivors[1 : quality.survivors - 1]]

    def _survivors_that_fit(self, rate: float) -> None:
        """Fewer survivors when the fine-tuning time would give each fewer than
        `MIN_FINETUNE_EPOCHS` epochs: the first one's training speed as its LR range test
        measured it (real batches, augmented, in the training memory format; the screening run
        cannot tell: its feature pass runs without gradients, and from a warm cache not at all),
        the others' scaled by their relative cost per image (a Lite0 epoch is about 1/1.55 of a
        Lite1 one). On a CPU one well-trained model beats two half-trained ones; two that both
        fit beat one (held-in clip art, docs/PERFORMANCE.md: fine-tuned Lite1 0.787 and Lite0
        0.792 test accuracy, their soft vote 0.807)."""
        keys = self.record["survivors"]
        if len(keys) <= 1 or rate <= 0:
            return
        epoch = self._epoch_seconds(rate)
        time_left = self.left() - self._reserve()
        fits, needed, costs = 0, 0.0, self._costs(keys)
        by_key = {c["key"]: c for c in self.record["candidates"]}
        twins = [bool(by_key.get(k, {}).get("twin_of")) for k in keys]
        for i, cost in enumerate(costs):
            # Each after the first also runs its own LR range test first (about an epoch of
            # images: 30 batches of 32 for ~1,000 training images) and sets up two runs; kept
            # without counting them, a survivor got 6 epochs (held-in clip art on a slow host:
            # Lite0 after Lite2, val 0.743 against its probe's 0.720). A twin has none: it
            # takes its lead's lr.
            later = i > 0 and not twins[i]
            needed += (MIN_FINETUNE_EPOCHS + later) * epoch * cost / costs[0]
            needed += RUN_OVERHEAD * (1 + later)
            if needed > time_left:
                break
            fits += 1
        fits = max(1, fits)
        if fits < len(keys):
            self.decide(
                f"fine-tuning {fits} of {len(keys)} candidates: an epoch of {keys[0]} takes "
                f"about {epoch:.0f} s and {time_left:.0f} s are left, so more would each get "
                f"fewer than {MIN_FINETUNE_EPOCHS} epochs"
            )
            self.record["survivors"] = keys[:fits]
            self.save()

    def _costs(self, keys: list[str]) -> list[float]:
        """The candidates' relative costs per image (`fit_plan.relative_cost`), or all 1 when
        one is a scratch CNN or unknown: a small CNN's epoch is mostly loading and overhead,
        not the multiply-adds its relative cost counts, so it is priced (and given time) like
        the backbones, as before costs were used."""
        by_key = {c["key"]: c for c in self.record["candidates"]}
        cands = [by_key.get(k) for k in keys]
        if any(c is None or c["pretrained"] == "none" for c in cands):
            return [1.0] * len(keys)
        return [fit_plan.relative_cost(_candidate(c)) for c in cands]

    def _share(self, keys: list[str], i: int) -> float:
        """Survivor i's seconds of the fine-tuning time left: split by relative cost, so each
        of the survivors still to come gets about the same number of epochs."""
        costs = self._costs(keys[i:])
        return (self.left() - self._reserve()) * costs[0] / sum(costs)

    def _scratch_epochs(self, c: Candidate, seconds: float) -> int:
        rate = _speed(c, self.record["machine"], train=True)
        epoch = self._epoch_seconds(rate)
        return int(max(2, min(40, (seconds - RUN_OVERHEAD) // max(epoch, 1e-3))))

    # 3 ---------------------------------------------------------------- fine-tuning

    def finetune(self) -> None:
        by_key = {c["key"]: c for c in self.record["candidates"]}
        i = -1
        while i + 1 < len(self.record["survivors"]):  # the first LR range test may shorten it
            i += 1
            keys = self.record["survivors"]
            key = keys[i]
            cand = by_key[key]
            if cand["finetune"] and cand["finetune"].get("done"):
                continue
            share = self._share(keys, i)
            ends = time.monotonic() + share
            if share < 15:
                stays = "" if cand.get("twin_of") else " (its screening run stays)"
                self.decide(f"{key}: not fine-tuned, the budget is spent{stays}")
                continue
            c = _candidate(cand)
            # Both start afresh: a scratch CNN trains again for longer (its short screening
            # schedule is done); a pretrained backbone from its packaged weights and a new
            # head, which trains with it from the first epoch's warm-up. The screening probe
            # ranks the candidates, it does not start their fine-tunes: a head trained to
            # convergence on the unaugmented features fits the training images at once, and
            # the backbone under it then adapts less and overfits sooner (held-in clip art,
            # Lite2 at 260 px, 8 epochs, same seed: from the probe's head val loss 0.800,
            # test 0.8033, train accuracy 0.99 by epoch 7; from a new head 0.715, 0.8219).
            lead = by_key.get(cand.get("twin_of"), {})  # a twin's lead: the same model
            if (lead.get("finetune") or {}).get("lr") and lead.get("train_rate"):
                # and recipe: the lead's lr and measured speed hold for its twin
                lr, rate = lead["finetune"]["lr"], lead["train_rate"]
                why = f"{lead['key']}'s, the same model"
            else:
                self.display.item(f"fine-tuning {key}: LR range test")
                lr, why, rate = self._lr(c, share)
            cand["train_rate"] = round(rate, 2)  # training images/s, for the plan and reserve
            self.decide(f"{key}: fine-tune lr {lr:.2e} ({why}); {rate:.1f} training images/s")
            if i == 0 and len(keys) > 1:
                self._survivors_that_fit(rate)
            # Its share again, after the test: fewer survivors, and the reserve priced from the
            # speed the test measured rather than from a screening feature pass, which from a
            # cold cache also decoded every image (held-in clip art: Lite2 planned against a
            # 204 s reserve where the last phases took 69 s; the fit ended 238 s early).
            share = self._share(self.record["survivors"], i)
            ends = time.monotonic() + share
            pace = self._pace(c)
            if pace != 1.0:
                rate *= pace
                self.decide(
                    f"{key}: epochs planned at {rate:.1f} images/s, {pace:.2f}× its LR range "
                    "test's pace, as the fine-tunes before it ran"
                )
            epoch = self._epoch_seconds(rate)
            epochs = int(max(1, min(40, (share - RUN_OVERHEAD) // max(epoch, 1e-3))))
            stage = _finetune_stage(c, epochs, lr, self._trainable(c))
            cfg = self._config(c, "finetune", [stage], features=False)
            self.display.item(f"fine-tuning {key}: {epochs} epochs at most")
            cand["finetune"] = self._train(cfg, "finetune", key, share)
            cand["finetune"].update(lr=lr, lr_why=why, planned_epochs=epochs)
            self.save()
            later = self.record["survivors"][i + 1 :]
            if not later:
                self._more_rounds(c, cand, lr, ends)
            elif ends - time.monotonic() > RUN_OVERHEAD:
                # A further round at a third of the lr rarely gains (held-in clip art: Lite0's
                # rounds 2-4 moved val 0.784 -> 0.787, Lite2's second 0.780 -> 0.761), a
                # later survivor's first one does: what early stopping (or a plan that fell
                # short) left of this share goes to the next candidate (the last one's share
                # is all that is left).
                self.decide(
                    f"{key}: its run ended with {ends - time.monotonic():.0f} s of its share left; "
                    f"they go to {later[0]}"
                )

    def _epoch_seconds(self, rate: float) -> float:
        """An epoch at `rate` training images/s: the training split, and the val split
        predicted (a forward pass, about a third of a training step)."""
        prof = self._profile()
        return prof.train / rate + prof.val / (3 * rate)

    def _pace(self, c: Candidate) -> float:
        """How much faster than their LR range tests said the fit's earlier fine-tunes of the
        same kind (backbone or scratch CNN) ran: their first rounds' epochs, val pass included,
        against the plan's estimate from the test's speed; clamped to [0.75, 1.33], 1 with
        none. The test's steps run slower than an epoch's (held-in clip art on the CPU: Lite0
        34 against 41 images/s, Lite2 17 against 20), so the last survivor's one cosine
        schedule ended a fifth of its share early, and the rest went to a round at a third of
        the lr or to nothing."""
        ratios = []
        for cand in self.record["candidates"]:
            first = (cand.get("rounds") or [cand.get("finetune")])[0] or {}
            rate, epochs = cand.get("train_rate"), first.get("epochs")
            if cand["key"] == c.key or (cand["pretrained"] == "none") != c.scratch:
                continue
            # a run a resumed fit found finished has no timing of its own (its seconds: the
            # reading of its folder)
            if not rate or not epochs or _score(first) is None or first["seconds"] <= RUN_OVERHEAD:
                continue
            planned = self._epoch_seconds(rate)
            ran = max(first["seconds"] - RUN_OVERHEAD, 1e-3) / epochs
            ratios.append(planned / ran)
        if not ratios:
            return 1.0
        return round(min(4 / 3, max(0.75, statistics.median(ratios))), 2)

    def _more_rounds(self, c: Candidate, cand: dict, lr: float, ends: float) -> None:
        """Further rounds while the candidate's share holds 3 epochs more, at the speed its
        last round really had (early stopping, or a first plan that fell short): each
        warm-starts from the best weights so far at a third of the lr, with its own warm-up and
        cosine decay; the better round is the candidate's."""
        rounds = 1
        cand.setdefault("rounds", [dict(cand["finetune"])])
        low = (SCRATCH_LR if c.scratch else FINETUNE_LR)[0]
        while True:
            last = cand["finetune"]
            if _score(last) is None or not last.get("epochs"):
                return
            # Nothing left to gain on val, or an lr too small to move the weights: a tie
            # would otherwise warm-start round after round (tiny sets: 17 rounds to 2e-10).
            if _score(last) >= 1.0 or lr / 3 < low:
                why = (
                    "val accuracy 1.0"
                    if _score(last) >= 1.0
                    else f"the lr would fall under {low:g}"
                )
                self.decide(f"{c.key}: no more rounds ({why})")
                return
            epoch = max(1.0, (last["seconds"] - RUN_OVERHEAD) / last["epochs"])
            left = ends - time.monotonic()
            epochs = int(min(40, (left - RUN_OVERHEAD) // epoch))
            if epochs < 3:
                return
            rounds, lr = rounds + 1, lr / 3
            role = f"finetune{rounds}"
            self.decide(
                f"{c.key}: {left:.0f} s of its share left (an epoch takes {epoch:.0f} s): "
                f"{epochs} more epochs from its best weights at lr {lr:.2e}"
            )
            stage = _finetune_stage(c, epochs, lr, self._trainable(c))
            cfg = self._config(c, role, [stage], features=False, init_from=Path(last["run"]))
            more = self._train(cfg, role, c.key, left)
            more.update(lr=lr, planned_epochs=epochs)
            cand["rounds"].append(more)
            if _better_round(more, last):
                cand["finetune"] = more
            else:
                cand["finetune"] = {**last, "done": True}
                self.save()
                return
            self.save()

    def _trainable(self, c: Candidate) -> str | dict:
        """What a pretrained candidate's fine-tune trains: every layer, or from
        `fit_plan.FROZEN_BEFORE` on for a packaged backbone when the fit freezes early stages
        (fit.json files from before that choice have no "freeze_early": every layer)."""
        if self.record["settings"].get("freeze_early") and c.model in fit_plan.PACKAGED:
            return {"from_layer": fit_plan.FROZEN_BEFORE}
        return "all"

    def _lr(self, c: Candidate, share: float) -> tuple[float, str, float]:
        """The LR range test (from the packaged weights and a new head, or fresh weights for a
        scratch CNN), in at most a fifth of the run's share; returns (lr, why, training
        images/s at the steady pace of its steps after the first, without the set-up before
        them)."""
        from imgclf.workflows.lr_search import find_lr

        low, high = SCRATCH_LR if c.scratch else FINETUNE_LR
        steps = fit_plan.QUALITIES[self.opts.quality].lr_steps
        rate = self._train_rate(c)
        if rate:  # fewer steps where they would take more than the fifth (12 at least)
            fits = int((share / 5 - RUN_OVERHEAD) * rate / self.record["settings"]["batch_size"])
            steps = max(12, min(steps, fits))
        # the layers its fine-tune trains: their lr, and their speed for planning its epochs
        stage = _scratch_stage(1) if c.scratch else {"trainable": self._trainable(c), "bn": "eval"}
        cfg = self._config(c, "lr", [stage], features=False)
        t0 = time.monotonic()
        try:
            result = find_lr(
                cfg,
                self.folder / f"lr_find_{_slug(c.key)}.png",
                num_steps=steps,
                start_lr=1e-6 if not c.scratch else 1e-5,
                end_lr=1.0,
                progress=False,
                deadline=time.monotonic() + max(share / 4, RUN_OVERHEAD * 2),
            )
        except (ImgclfError, RuntimeError, ValueError) as e:
            default = 3e-4 if not c.scratch else 3e-3
            rate = _speed(c, self.record["machine"], train=True)
            return default, f"LR range test failed ({e}); the default", rate
        batch = self.record["settings"]["batch_size"]
        if len(result.step_seconds) >= 4:  # the steady pace: after the first step's start-up
            rate = batch / max(statistics.median(result.step_seconds[1:]), 1e-6)
        else:
            rate = len(result.lrs) * batch / max(time.monotonic() - t0, 1e-6)
        if c.scratch:  # from fresh weights: the usual rule, a tenth of the minimum's lr
            lr = float(min(high, max(low, result.suggestion)))
            why = f"LR range test from fresh weights: {result.reason}"
            if lr != result.suggestion:
                why += f", clamped to [{low:g}, {high:g}]"
            return lr, why, rate
        lr, why = fit_plan.finetune_lr(result.lrs, result.losses, low, high)
        return lr, why, rate

    # 4 ---------------------------------------------------------------- TTA and ensemble

    def combine(self) -> None:
        cands = self.record["candidates"]
        finished = [
            (c["key"], c[role])
            for c in cands
            for role in ("finetune", "screen")
            if c[role] and _score(c[role]) is not None
        ]
        best_of: dict[str, tuple[str, dict]] = {}
        for key, run in finished:  # per candidate: its better run (fine-tuned, usually)
            if key not in best_of or _score(run) > _score(best_of[key][1]):
                best_of[key] = (key, run)
        cost = {c["key"]: fit_plan.relative_cost(_candidate(c)) for c in cands}
        ranked = sorted(best_of.values(), key=lambda kr: (-_score(kr[1]), cost[kr[0]]))
        if not ranked:
            raise ImgclfError("no run finished within the budget: give more --time")
        scratch = frozenset(c["key"] for c in cands if c["pretrained"] == "none")
        best_key, best, why = choose_single(ranked, cost, scratch)
        if best_key != ranked[0][0] or "log loss" in why:
            self.decide(why)
        top = _score(ranked[0][1])  # what an ensemble must beat, whichever single run is chosen
        chosen = {
            "folder": best["run"],
            "kind": "run",
            "tta": None,
            "val_accuracy": _score(best),
            "why": why,
        }
        self.display.best(_score(best), best_key)
        # Flip TTA, only for a model that trained with flips (else it is the trap imgclf warns of)
        hflip = (self.record["settings"]["augment"].get("hflip", 0.5) or 0) > 0
        if hflip and self.left() > self._reserve() * 0.5:
            self.display.item(f"flip TTA on {best_key} (val)")
            from imgclf.evaluate.evaluate import evaluate_run

            ev = evaluate_run(best["run"], split="val", tta="flip", name=FLIP_VAL)
            tta_acc = float(ev.record["metrics"]["accuracy"])
            # float32 in summary.json against float64 here: a tie must not read as a gain
            # (held-in: 0.77985075 > 0.77985072 kept flip TTA on the same 209 of 268 images)
            kept = tta_acc > chosen["val_accuracy"] and not _same_accuracy(
                tta_acc, chosen["val_accuracy"]
            )
            self.record["tta"] = {
                "run": best["run"],
                "val_accuracy": chosen["val_accuracy"],
                "val_accuracy_tta": tta_acc,
                "kept": kept,
            }
            self.decide(
                f"flip TTA on {best_key}: val accuracy {tta_acc:.4f} vs "
                f"{chosen['val_accuracy']:.4f}" + (" — kept" if kept else " — not kept")
            )
            if kept:
                chosen.update(
                    tta="flip", val_accuracy=tta_acc, why=chosen["why"] + ", with flip TTA"
                )
        elif not hflip:
            self.decide("flip TTA not tried: the models trained without flips")
        # The best run of each candidate (fine-tuned, or its probe when it was not fine-tuned):
        # models that differ in backbone err differently, so a fit with one survivor still
        # tries an ensemble; kept only when it wins on val (held-in clip art: the fine-tuned
        # Lite0 and Lite1, val 0.7985 against 0.7761, kept; Lite1 with Lite0's probe, 0.7724
        # against 0.8097, not kept). The best two, or three (`best_vote`).
        if fit_plan.QUALITIES[self.opts.quality].ensemble and len(ranked) >= 2:
            bar, single = self._bar(top, ranked[0][1], chosen)
            runs, vote, kept = best_vote([Path(r["run"]) for _, r in ranked], bar, single=single)
            members = [str(r) for r in runs]
            # Like for like: the ensemble with flip TTA too when the single run was offered it
            # (from each member's flipped val predictions; the best one's are made already).
            flipped, tta = None, None
            if vote is not None and "tta" in self.record and self.left() > self._reserve() * 0.5:
                self.display.item(f"flip TTA on the ensemble's {len(members)} members (val)")
                flipped, kept_flipped = ensemble_check(runs, bar, _flip_val_csv, single=single)
                if flipped is not None and (flipped.accuracy, -flipped.loss) > (
                    vote.accuracy,
                    -vote.loss,
                ):
                    tta, kept = "flip", kept_flipped
            used = flipped if tta else vote
            acc = used.accuracy if used else None
            tied = used is not None and single is not None and _same_accuracy(used.accuracy, bar)
            self.record["ensemble"] = {
                "members": members,
                "val_accuracy": vote.accuracy if vote else None,
                "val_accuracy_tta": flipped.accuracy if flipped else None,
                "tta": tta,
                "val_loss": used.loss if used else None,
                "single_val_loss": single.loss if single else None,
                "kept": kept,
            }
            self.decide(
                f"soft-vote ensemble of the best runs of {len(members)} candidates: val accuracy "
                + (f"{vote.accuracy:.4f}" if vote is not None else "unknown")
                + (f", {flipped.accuracy:.4f} with flip TTA" if flipped is not None else "")
                + f" vs {bar:.4f}"
                + (
                    f" (a tie: log loss {used.loss:.4f} vs {single.loss:.4f}, "
                    f"z {used.loss_z(single) or 0:.2f})"
                    if tied
                    else ""
                )
                + (" — kept" if kept else " — not kept")
            )
            if kept:
                from imgclf.workflows.ensemble import save_ensemble

                # scored on val only: the fit predicts the test split once, at the end, with
                # the chosen model (and its TTA); a test pass here would be that work twice
                folder = save_ensemble(
                    members,
                    f"{self.fit_id}-ensemble",
                    runs_dir=self.opts.runs_dir,
                    batch_size=self.record["settings"]["batch_size"],
                    splits=("val",),
                )
                _tag(folder, {"fit": self.fit_id, "role": "ensemble"})
                chosen = {
                    "folder": str(folder),
                    "kind": "ensemble",
                    "tta": tta,
                    "val_accuracy": acc,
                    "why": f"the soft-vote ensemble of {len(members)} runs"
                    + (" with flip TTA" if tta else "")
                    + (
                        f" tied the best single run on validation accuracy ({acc:.4f}) with a "
                        f"log loss lower by over a standard error ({used.loss:.4f} vs "
                        f"{single.loss:.4f})"
                        if tied
                        else f" beat the best single run on validation ({acc:.4f})"
                    ),
                }
        self.record["chosen"] = chosen
        self.display.best(chosen["val_accuracy"], Path(chosen["folder"]).name)
        self.decide(f"chosen: {chosen['folder']} — {chosen['why']}")

    def _bar(self, top: float, top_run: dict, chosen: dict) -> tuple[float, Vote | None]:
        """What an ensemble must beat on val: the best single accuracy (the top run's, or the
        chosen run's with flip TTA when that is higher), and that same model's own vote."""
        if chosen["val_accuracy"] >= top:
            where = _flip_val_csv if chosen["tta"] == "flip" else _val_csv
            return chosen["val_accuracy"], soft_vote([Path(chosen["folder"])], where)
        return top, soft_vote([Path(top_run["run"])])

    # 5 ---------------------------------------------------------------- test, export, report

    def finish(self) -> None:
        from imgclf.evaluate.evaluate import evaluate_run

        chosen = self.record["chosen"]
        self.display.item("the test split, once, with the chosen model")
        test = {}
        if self._profile().test:
            ev = evaluate_run(
                chosen["folder"],
                split="test",
                tta=chosen["tta"],
                name="fit-test",
                batch_size=self.record["settings"]["batch_size"],
            )
            m = ev.record["metrics"]
            test = {
                "accuracy": float(m["accuracy"]),
                "balanced_accuracy": float(m["balanced_accuracy"]),
                "images": self._profile().test,
                "evaluation": str(ev.folder),
            }
        self.record["test"] = test
        self.save()
        self.display.item("ONNX export")
        try:
            self.record["export"] = self._export(chosen)
            if chosen["tta"]:
                self.decide("the ONNX export is the model alone: apply flip TTA yourself")
        except Exception as e:  # the model is chosen and measured; an export failure is noted
            self.record["export"] = {"error": str(e)}
            self.log(f"warning: ONNX export failed: {e}")
        self.save()
        self._leaderboard()

    def _export(self, chosen: dict) -> dict:
        from imgclf.predict.export import export_model_or_members

        record = export_model_or_members(Path(chosen["folder"]), self.folder / EXPORT, self.log)
        if record.get("members"):
            self.decide(
                "ONNX: the ensemble's members resize differently, so each is exported on its "
                f"own into {record['folder']}/, and {ENSEMBLE_JSON} there says how to combine "
                "them"
            )
        return record

    def _leaderboard(self) -> None:
        from imgclf.runs.leaderboard import leaderboard

        text, rows = leaderboard(
            self.opts.runs_dir,
            where=f"fit == {self.fit_id}",
            fmt="markdown",
            columns=[*("id", "status", "model", "image_size", "stages", "epochs"), *_BOARD],
            warn=lambda *_: None,
        )
        if rows:
            atomic_write_text(self.folder / LEADERBOARD_MD, text)

    # ------------------------------------------------------------------ helpers

    def _train_rate(self, c: Candidate) -> float | None:
        """Training images/s of a candidate, from its screening run: the feature pass read
        every training and val image forward (training costs about three times as much)."""
        cand = next(x for x in self.record["candidates"] if x["key"] == c.key)
        run = cand.get("screen") or {}
        if c.scratch or _score(run) is None or not run.get("seconds"):
            return None
        prof = self._profile()
        return (prof.train + prof.val) / run["seconds"] / 3

    def _reserve(self) -> float:
        """Seconds kept for TTA, the ensemble check, the test pass, the export and the report.
        Before screening: a tenth of the budget; after it, from the slowest screened
        backbone's predicting speed: `PREDICT_PER_TRAIN` times its training speed where its LR
        range test measured one, else its feature pass's (which read every training and val
        image, and from a cold cache decoded them too)."""
        prof = self._profile()
        rates = [
            PREDICT_PER_TRAIN * c["train_rate"]
            if c.get("train_rate")
            else (prof.train + 2 * prof.val) / max(1.0, c["screen"]["seconds"] - RUN_OVERHEAD)
            for c in self.record["candidates"]
            if c["pretrained"] != "none" and _score(c["screen"]) is not None
        ]
        if not rates:
            return max(15.0, 0.1 * self.opts.budget)
        survivors = len(self.record.get("survivors") or ()) or (
            fit_plan.QUALITIES[self.opts.quality].survivors
        )
        # TTA on the best run's val (2 views), the other members' too for the ensemble, the
        # test split once (an ensemble: each member) and the export's parity images.
        images = 2 * prof.val * (1 + survivors) + prof.test * (1 + survivors)
        # an ensemble of members at different sizes exports each one (about 4 s apiece here)
        members = min(3, len(self.record["candidates"]))
        # No margin: the rates above are a predictor's lower bound (held-in clip art: reserves
        # of 210-268 s from the feature pass where the phases took 80-165 s).
        return RUN_OVERHEAD * (2 + (members - 1) / 2) + images / min(rates)

    def _config(
        self,
        c: Candidate,
        role: str,
        stages: list[dict],
        *,
        features: bool,
        init_from: Path | None = None,
        augment: dict | None = None,
    ) -> RunConfig:
        s = self.record["settings"]
        raw: dict[str, Any] = {
            "data": {
                "manifest": self.record["manifest"],
                "image_size": c.image_size,
                # fit.json files written before crop_mode existed: the centre crop they used.
                "crop_mode": s.get("crop_mode", "center"),
                "cache": "auto",
            },
            "model": {
                "name": c.model,
                "pretrained": c.pretrained,
                "head": {"dropout": 0.2} if not c.scratch else {},
            },
            "train": {
                "batch_size": s["batch_size"],
                "augment": augment or s["augment"],
                "imbalance": s["imbalance"],
                "label_smoothing": 0.1,
                "stages": stages,
                # One-cycle's high-lr middle makes a scratch CNN's val loss noisy: it runs its
                # (time-planned) schedule whole; fine-tuning stops after 4 epochs without gain.
                "early_stopping": {"metric": "val_loss", "patience": None if c.scratch else 4},
                "features": "cache" if features else "none",
                "predict_test": False,
                "accelerator": self.record["machine"]["device"],
                # bf16 autocast where the CPU has it natively (`cpu_has_bf16`): about 1.2× the
                # training speed, so more epochs in the budget; fit.json files from before
                # it have no "bf16" and keep fp32.
                "precision": "bf16-mixed" if self.record["machine"].get("bf16") else "auto",
            },
            "tracking": {"mlflow": self.opts.mlflow},
            "runs_dir": str(self.opts.runs_dir),
            "name": f"{_slug(c.key)}-{role}",
            "tags": {"fit": self.fit_id, "role": role, "candidate": c.key},
            "seed": self.opts.seed + c.seed,
        }
        if init_from is not None:
            raw["model"]["init_from"] = str(init_from)
        return validate(raw, f"imgclf fit ({c.key}, {role})")

    def _train(self, cfg: RunConfig, role: str, key: str, seconds: float) -> dict:
        """One ordinary run with a deadline; its record for fit.json. A run of this fit that a
        killed or interrupted session left behind is resumed instead of started again."""
        from imgclf.workflows.training import train

        deadline = min(self.deadline - self._reserve() * 0.5, time.monotonic() + seconds)
        t0 = time.monotonic()
        if deadline - t0 < RUN_OVERHEAD / 2:
            self.decide(f"{key}: no {role} run, the budget is spent")
            return {"role": role, "status": "skipped", "done": True, "seconds": 0.0}
        previous = _find_run(self.opts.runs_dir, self.fit_id, role, key)

        def on_epoch(row: dict) -> None:
            self.display.epoch(key, row)

        try:
            status = _status(previous)
            if previous is not None and status == "completed":
                path = previous  # finished before the last session recorded it
            elif previous is not None and (previous / CHECKPOINT).is_file():
                self.log(f"continuing {previous.name}")
                path = train(
                    None,
                    resume=previous,
                    progress=False,
                    log=self.log,
                    on_epoch=on_epoch,
                    deadline=deadline,
                )
            else:
                path = train(
                    cfg, progress=False, log=self.log, on_epoch=on_epoch, deadline=deadline
                )
        except KeyboardInterrupt:
            raise FitInterrupted from None
        except ImgclfError as e:
            self.log(f"{key} ({role}) failed: {e}")
            return {
                "role": role,
                "status": "failed",
                "error": str(e),
                "done": True,
                "seconds": round(time.monotonic() - t0, 1),
            }
        summary = RunFolder(path).summary()
        status = summary.get("status")
        # A run stopped by the user (not by the deadline) ends the fit, resumable.
        if status == "interrupted" and time.monotonic() < deadline - 1:
            raise FitInterrupted
        val = summary.get("val") or {}
        record = {
            "role": role,
            "run": str(path),
            "status": status,
            "val_accuracy": val.get("val_accuracy"),
            "val_loss": val.get("val_loss"),
            "epochs": summary.get("epochs"),
            "seconds": round(time.monotonic() - t0, 1),
            "done": True,
        }
        if record["val_accuracy"] is not None:
            self.display.best(record["val_accuracy"], key)
        return record


# ---------------------------------------------------------------------------------------------


def _finetune_stage(c: Candidate, epochs: int, lr: float, trainable: str | dict) -> dict:
    """The one stage of a fine-tuning round: the `trainable` layers (every one, or all but the
    early stages), AdamW, warm-up then cosine, the pretrained BatchNorm statistics kept (a
    scratch CNN: its one-cycle stage)."""
    if c.scratch:
        return _scratch_stage(epochs, lr)
    return {
        "name": "finetune",
        "trainable": trainable,
        "epochs": epochs,
        "optimizer": "adamw",
        "lr": lr,
        "schedule": "cosine",
        # Adam's first steps move every weight by about the lr whatever its gradient: without a
        # warm-up they wreck pretrained features (measured: digits val accuracy 0.91 → 0.41 in
        # the first epoch at 5e-4).
        "warmup_epochs": 1.0 if epochs >= 4 else 0.5,
        "bn": "eval",
    }


def _candidate(record: dict) -> Candidate:
    # fit.json files from before twins have no "seed": the fit's own
    return Candidate(**{k: record[k] for k in Candidate.__dataclass_fields__ if k in record})


def _scratch_stage(epochs: int, lr: float = 4e-3) -> dict:
    """A from-scratch CNN's one stage: one-cycle AdamW with strong weight decay (the schedule
    that trains small CNNs fastest; the project's digits recipe)."""
    return {
        "name": "scratch",
        "trainable": "all",
        "epochs": epochs,
        "optimizer": "adamw",
        "lr": lr,
        "weight_decay": 0.05,
        "schedule": "onecycle",
    }


def _score(run: dict | None) -> float | None:
    """A run's validation accuracy with its best weights (None when it has none)."""
    if not run or run.get("status") not in ("completed", "interrupted"):
        return None
    return run.get("val_accuracy")


def _lead(ranked: list[dict]) -> tuple[dict, str]:
    """The candidate fine-tuned first (and twinned), from the screened ones best first: the
    best, or a larger packaged backbone whose probe is within two paired standard errors of the
    best packaged one's; returns it and why when it is not the best. Fine-tuned, the larger
    ImageNet backbones transfer better, which their linear probes do not show (Kornblith et al.,
    "Do Better ImageNet Models Transfer Better?", 2019; held-in clip art: Lite2's probe 0.683
    against Lite0's 0.720 on val, fine-tuned Lite2 0.816-0.828 on test against Lite0's
    0.787-0.807). Across kinds (a scratch CNN, `file:` weights) the probe's ranking stands."""
    best = ranked[0]
    if best["pretrained"] != "packaged" or best["model"] not in fit_plan.PACKAGED:
        return best, ""
    order = list(fit_plan.PACKAGED)
    larger = [
        c
        for c in ranked[1:]
        if c["pretrained"] == "packaged"
        and c["model"] in order
        and order.index(c["model"]) > order.index(best["model"])
    ]
    for c in sorted(larger, key=lambda c: -order.index(c["model"])):
        z = paired_z(Path(best["screen"]["run"]), Path(c["screen"]["run"]))
        if z is not None and z <= 2.0:
            return c, (
                f"{c['key']} first: its probe is within two standard errors of "
                f"{best['key']}'s (paired z {z:.2f}), and a larger ImageNet backbone transfers "
                "better once fine-tuned than its linear probe shows"
            )
    return best, ""


def _better_round(more: dict, last: dict) -> bool:
    """Whether a further round replaces the candidate's run: its val accuracy at least as high
    and its val loss (what the round's early stopping judged) no higher. Accuracy alone let two
    val images decide against the loss (digits: the scratch CNN's second round, val 1.0 against
    0.9944 but val loss 0.182 against 0.152, scored 0.9888 on test against the first's 0.9963)."""
    if _score(more) is None or _score(more) < (_score(last) or 0.0):
        return False
    loss, before = more.get("val_loss"), last.get("val_loss")
    return loss is None or before is None or loss <= before


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _find_run(runs_dir: Path, fit_id: str, role: str, key: str) -> Path | None:
    """This fit's run for (role, candidate), if an earlier session started one."""
    if not runs_dir.is_dir():
        return None
    for path in sorted(runs_dir.iterdir()):
        try:
            tags = RunFolder(path).summary().get("tags") or {}
        except (RunFileError, OSError):
            continue
        if tags.get("fit") == fit_id and tags.get("role") == role and tags.get("candidate") == key:
            return path
    return None


def _status(run: Path | None) -> str | None:
    if run is None:
        return None
    try:
        return RunFolder(run).summary().get("status")
    except RunFileError:
        return None


def _tag(folder: Path, tags: dict[str, str]) -> None:
    summary = RunFolder(folder).summary()
    atomic_write_json(
        folder / SUMMARY_JSON, {**summary, "tags": {**summary.get("tags", {}), **tags}}
    )


def choose_single(
    ranked: list[tuple[str, dict]], cost: dict[str, float], scratch: frozenset[str] = frozenset()
) -> tuple[str, dict, str]:
    """The single run a fit keeps, from (candidate, run record) pairs best first on validation:
    the best, unless a cheaper candidate's run is within one standard error of it on the same
    images (paired z ≤ 1), when the cheapest such run is kept; returns (candidate, run, why).
    A few hundred val images cannot tell one image from noise (digits: Lite0 at 64 px, 360 of
    360 right, against the scratch CNN's 359 chose Lite0, which then scored 0.9888 on test and
    the scratch CNN 0.9963), and the cheaper model is the faster to serve.

    Two pretrained backbones fine-tuned by the same recipe are also weighed on log loss, which
    counts every image's probability, not only which side of the line it falls: when the best's
    is lower by over one paired standard error, its lead is real and it stays (held-in clip
    art: Lite2 at 0.7836 against Lite0's 0.7724 was a tie on accuracy, z 0.63, but not on log
    loss, 0.729 against 0.839, z 2.8; on test Lite2 scored 0.8089, Lite0 0.7885). Across
    recipes the losses are not comparable (`scratch`: the scratch CNN's keys; digits: Lite0's
    val loss 0.08 against the scratch CNN's 0.17, z 10, and yet the test above)."""
    best_key, best = ranked[0]
    cheaper = sorted(
        (kr for kr in ranked[1:] if cost[kr[0]] < cost[best_key]), key=lambda kr: cost[kr[0]]
    )
    for key, run in cheaper:
        z = paired_z(Path(best["run"]), Path(run["run"]))
        if z is None or z > 1.0:
            continue
        if _same_recipe((best_key, best), (key, run), scratch):
            ahead, behind = soft_vote([Path(best["run"])]), soft_vote([Path(run["run"])])
            loss_z = ahead.loss_z(behind) if ahead and behind else None
            if loss_z is not None and loss_z > 1.0:
                return (
                    best_key,
                    best,
                    f"{best_key}: the best validation accuracy of a single run ({_score(best):.4f}"
                    f"; {key}'s {_score(run):.4f} is within one standard error, paired z "
                    f"{z:.2f}, but its log loss is higher by {loss_z:.1f} standard errors: "
                    f"{behind.loss:.4f} against {ahead.loss:.4f})",
                )
        return (
            key,
            run,
            f"{key}: val accuracy {_score(run):.4f}, within one standard error of the best "
            f"single run ({best_key}, {_score(best):.4f}, paired z {z:.2f}), and cheaper "
            "to run",
        )
    return best_key, best, f"{best_key}: the best validation accuracy of a single run"


def _same_recipe(a: tuple[str, dict], b: tuple[str, dict], scratch: frozenset[str]) -> bool:
    """Whether two (candidate, run record) pairs are fine-tunes of pretrained backbones, whose
    val log losses compare like for like."""
    return all(
        key not in scratch and str(run.get("role", "")).startswith("finetune")
        for key, run in (a, b)
    )


def ensemble_check(
    members: list[Path],
    best: float,
    where: Callable[[Path], Path] | None = None,
    *,
    single: Vote | None = None,
) -> tuple[Vote | None, bool]:
    """The soft-vote ensemble on validation, and whether it is kept: when its accuracy beats
    `best`, the best single model's, or ties it with a log loss lower by at least one standard
    error of the per-image difference from `single` (that model's own vote, on the same val
    images; z ≥ 1, the same margin as `choose_single`). A few hundred val images put one image
    at a third of a point, so equal accuracy is common and says little; the log loss weighs
    every image's probability (held-in clip art: the fine-tuned Lite0 and Lite1, both with flip
    TTA, tied at 0.7799 on val, log loss 0.732 against 0.776, z = 2.3; the vote scored 0.8163
    on test against the single run's 0.8052). Otherwise, and always when the single model is
    right on every val image (a vote cannot show it would do better), the single model is kept:
    cheaper to run. `where`: the members' val predictions (default predictions/val.csv;
    `_flip_val_csv`: with flip TTA)."""
    vote = soft_vote(members, where or _val_csv)
    if vote is None:
        return None, False
    # A single run that is right on every val image leaves the vote nothing to show: it stays.
    if _same_accuracy(vote.accuracy, best):
        z = vote.loss_z(single) if single is not None and best < 1 else None
        return vote, z is not None and z >= 1.0
    return vote, vote.accuracy > best


def best_vote(
    runs: list[Path], best: float, *, single: Vote | None = None
) -> tuple[list[Path], Vote | None, bool]:
    """The ensemble of the best two runs (`runs` best first), or of the best three when that
    vote is better on val (accuracy, then log loss): a third much weaker than the first two (a
    probe beside two twin fine-tunes) would dilute their vote. Returns (members, their vote,
    whether `ensemble_check` keeps it)."""
    members, vote, kept = runs[:2], None, False
    for k in range(2, min(3, len(runs)) + 1):
        v, keep = ensemble_check(runs[:k], best, single=single)
        if v is not None and (vote is None or (v.accuracy, -v.loss) > (vote.accuracy, -vote.loss)):
            members, vote, kept = runs[:k], v, keep
    return members, vote, kept


def _same_accuracy(a: float, b: float) -> bool:
    """summary.json keeps float32 accuracies (209/268 reads 0.77985072, not 0.77985075): equal
    within a millionth is the same count of images."""
    return abs(a - b) < 1e-6


def _flip_val_csv(run: Path) -> Path:
    """The run's val predictions with flip TTA (`evaluations/fit-val-tta/predictions.csv`),
    evaluated now unless an earlier step of the fit made them."""
    from imgclf.evaluate.evaluate import evaluate_run, evaluations_dir

    path = evaluations_dir(run) / FLIP_VAL / "predictions.csv"
    if not path.is_file():
        evaluate_run(run, split="val", tta="flip", name=FLIP_VAL)
    return path


def _val_csv(run: Path) -> Path:
    return run / PREDICTIONS / "val.csv"


def _val_predictions(
    run: Path, where: Callable[[Path], Path] = _val_csv
) -> tuple[list[str], dict[str, tuple[str, list[float]]]] | None:
    """A run's saved val predictions (`where(run)`: predictions/val.csv, or an evaluation's
    predictions.csv): its probability columns and, per image path, the true label and the
    probabilities (None when the file is missing or empty)."""
    path = where(run)
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    if not rows:
        return None
    cols = [k for k in rows[0] if k.startswith("p_") and k != "p_true"]  # p_true: evaluations'
    return cols, {r["path"]: (r["label"], [float(r[c]) for c in cols]) for r in rows}


@dataclass(frozen=True)
class Vote:
    """Averaged val probabilities: accuracy, and the log loss of each image by path."""

    accuracy: float
    losses: dict[str, float]

    @property
    def loss(self) -> float:
        return float(np.mean(list(self.losses.values())))

    def loss_z(self, other: Vote) -> float | None:
        """How far this vote's log loss is below `other`'s on the images both have, in standard
        errors of the paired per-image difference (None with under two images)."""
        common = sorted(set(self.losses) & set(other.losses))
        if len(common) < 2:
            return None
        d = np.array([other.losses[k] - self.losses[k] for k in common])
        se = d.std(ddof=1) / math.sqrt(len(d))
        return float(d.mean() / se) if se > 0 else (math.inf if d.mean() > 0 else 0.0)


def soft_vote(runs: list[Path], where: Callable[[Path], Path] = _val_csv) -> Vote | None:
    """The members' averaged val probabilities, from their saved val predictions (`where`:
    predictions/val.csv, no inference; or `_flip_val_csv`); one run gives its own. None when
    they are missing or name different classes."""
    read = [_val_predictions(run, where) for run in runs]
    if any(r is None for r in read) or any(r[0] != read[0][0] for r in read):
        return None
    names = [n[2:] for n in read[0][0]]
    common = sorted(set.intersection(*(set(r[1]) for r in read)))
    if not common:
        return None
    mean = np.mean([[r[1][k][1] for k in common] for r in read], axis=0)
    truth = [read[0][1][k][0] for k in common]
    right = [names[int(i)] == t for i, t in zip(mean.argmax(1), truth, strict=True)]
    p_true = [mean[i][names.index(t)] if t in names else 0.0 for i, t in enumerate(truth)]
    losses = -np.log(np.clip(p_true, 1e-12, 1.0))
    return Vote(float(np.mean(right)), dict(zip(common, map(float, losses), strict=True)))


def paired_z(better: Path, other: Path) -> float | None:
    """How far `better` is ahead of `other` on the validation images both predicted, in
    standard errors of the paired difference (McNemar's z: (b − c) / √(b + c), b the images only
    `better` gets right, c those only `other` does); None when their predictions cannot be
    compared. Both right or both wrong says nothing about which is better."""
    read = [_val_predictions(run) for run in (better, other)]
    if any(r is None for r in read) or read[0][0] != read[1][0]:
        return None
    names = read[0][0]

    def right(r: tuple, key: str) -> bool:
        label, probs = r[1][key]
        return names[int(np.argmax(probs))][2:] == label

    common = set(read[0][1]) & set(read[1][1])
    b = sum(right(read[0], k) and not right(read[1], k) for k in common)
    c = sum(right(read[1], k) and not right(read[0], k) for k in common)
    return (b - c) / math.sqrt(b + c) if b + c else 0.0


_SPEEDS: dict[tuple, float] = {}


def _speed(c: Candidate, machine: dict[str, Any], *, train: bool) -> float:
    """Images per second of the candidate's model at its input size: forward (eval) or
    forward + backward (train), in the precision its runs use, measured on a small synthetic
    batch; cached per process."""
    device, bf16 = machine["device"], bool(machine.get("bf16"))
    key = (c.model, c.image_size, c.scratch, device, bf16, train)
    if key in _SPEEDS:
        return _SPEEDS[key]
    import torch

    from imgclf.config import ModelConfig
    from imgclf.models import build_model, default_channels_last

    model, _ = build_model(ModelConfig(name=c.model, pretrained="none"), 10, c.image_size)
    model = model.to(device)
    n = 8
    x = torch.randn(n, 3, c.image_size, c.image_size, device=device)
    if default_channels_last(torch.device(device).type):  # the memory format runs train in
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train(train)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if train:
                model(x).sum().backward()
            else:
                with torch.no_grad():
                    model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # Decoding and augmenting images costs about as much again on a CPU.
    rate = n / min(times[1:]) / (2.0 if device == "cpu" else 1.2)
    _SPEEDS[key] = rate
    return rate


def _machine(device: str) -> dict[str, Any]:
    import torch

    from imgclf.train.step import cpu_has_bf16

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ImgclfError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"device": device, "cores": cores}
    if device == "cpu":
        info["bf16"] = cpu_has_bf16()
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(), gpu_free_gb=round(free / 2**30, 1))
    return info


# ---------------------------------------------------------------------------------------------


class _Display:
    """One progress line for the whole fit: phase, what runs now, the best validation score
    so far and the time left. Log lines print above it. Without a terminal (or with progress
    off) only the log lines print."""

    def __init__(self, fitter: _Fitter, log: Callable[[str], None], show: bool) -> None:
        self.fitter, self._log, self.show = fitter, log, show
        self.state = {"phase": "", "item": "", "best": ""}
        self.bar = None
        self.task = None

    def __enter__(self) -> _Display:
        if self.show:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            fitter = self.fitter

            class _Left(TextColumn):
                def render(self, task):  # rich's column API
                    from rich.text import Text

                    return Text(f"{max(0, fitter.left()):.0f} s left")

            self.bar = Progress(
                TextColumn("[bold]{task.fields[phase]}[/]"),
                BarColumn(),
                _Left(""),
                TextColumn("{task.fields[item]}"),
                TextColumn("{task.fields[best]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("fit", total=self.fitter.opts.budget, **self.state)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None

    def _update(self) -> None:
        if self.bar is not None:
            spent = self.fitter.opts.budget - max(0.0, self.fitter.left())
            self.bar.update(self.task, completed=spent, **self.state)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            self._log(text)

    def phase(self, name: str) -> None:
        self.state["phase"] = name
        self.state["item"] = ""
        self._update()

    def item(self, text: str) -> None:
        self.state["item"] = text
        self._update()

    def best(self, score: float, key: str) -> None:
        current = self.fitter.record.get("best_val")
        if current is None or score > current["accuracy"]:
            self.fitter.record["best_val"] = {"accuracy": score, "of": key}
            self.state["best"] = f"best val {score:.4f} ({key})"
        self._update()

    def epoch(self, key: str, row: dict) -> None:
        self.state["item"] = (
            f"{key} epoch {row.get('epoch')}: val {row.get('val_accuracy', float('nan')):.4f}"
        )
        self._update()


def read_fit(folder: Path) -> dict:
    """A fit's record."""
    try:
        return json.loads((Path(folder) / FIT_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImgclfError(f"{folder} is not a fit folder (no {FIT_JSON})") from None
