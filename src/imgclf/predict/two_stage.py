"""Two-stage (coarse → fine) classifier: stage 1 picks a group of easily confused classes, one
stage-2 model per multi-class group picks the class inside it.

Final probabilities are over the ORIGINAL label map: P(class) = P(group) × P(class | group); a
class alone in its group gets P(group). Every stage-2 model runs on every image, so the output
is a full distribution (it sums to 1) rather than a hard routing decision.

This module is the prediction model (`TwoStage`, opened from its folder; registered as the
`two_stage` kind of loading.py). Training the stages and writing the composite folder is the
workflow `imgclf.workflows.two_stage.train_two_stage`; its docstring describes the folder:
two_stage.json {"format": 1, "labels", "groups", "group_names", "stage1": path,
"stage2": {group name: path}} (paths relative to the folder) names the stage runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from imgclf.errors import ImgclfError
from imgclf.predict.loading import read_definition, register_loader
from imgclf.predict.predictor import (
    Predictions,
    Progress,
    load_predictor,
    merge_predictions,
    shared_preprocessing,
)
from imgclf.runs.layout import MODEL_JSON, TWO_STAGE, TWO_STAGE_JSON

FORMAT = 1


def group_name(i: int) -> str:
    return f"group_{i}"


class TwoStage:
    """Stage 1 over group names, stage 2 per multi-class group, composed over the labels."""

    def __init__(
        self, stage1, groups: Sequence[Sequence[str]], stage2: dict, labels: Sequence[str]
    ) -> None:
        self.stage1, self.groups, self.labels = stage1, [list(g) for g in groups], list(labels)
        self.group_names = [group_name(i) for i in range(len(groups))]
        self.stage2 = [stage2.get(n) for n in self.group_names]
        self.plan = _plan(stage1.labels, self.groups, self.stage2, self.labels)
        self.preprocessing = shared_preprocessing(self._parts())
        self.device = getattr(stage1, "device", "cpu")

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> TwoStage:
        """A two-stage folder; stage paths are relative to it."""
        folder = Path(folder)
        spec = read_definition(folder / TWO_STAGE_JSON, ("labels", "groups", "stage1", "stage2"))
        paths = {"stage1": spec["stage1"], **spec["stage2"]}
        missing = [p for p in paths.values() if not (folder / p / MODEL_JSON).is_file()]
        if missing:
            raise ImgclfError(
                f"{folder / TWO_STAGE_JSON} names stage runs that are missing: {missing}"
            )
        stage1 = load_predictor(folder / spec["stage1"], device)
        stage2 = {g: load_predictor(folder / p, device) for g, p in spec["stage2"].items()}
        return cls(stage1, spec["groups"], stage2, spec["labels"])

    def _parts(self) -> list:
        """Stage 1, then the stage-2 models of the multi-class groups in group order."""
        multi = [m for m, g in zip(self.stage2, self.groups, strict=True) if len(g) > 1]
        return [self.stage1, *multi]

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 64,
        workers: int = 0,
        tta: str | None = None,
        progress: Progress | None = None,
    ) -> Predictions:
        """Each stage reads the files with its own preprocessing; then P(group) × P(class|group)."""
        parts = self._parts()
        share = None if progress is None else (lambda n: progress(n / len(parts)))
        results = [p.predict_paths(paths, batch_size, workers, tta, share) for p in parts]
        ok, errors, aligned = merge_predictions(paths, results)
        empty = torch.empty(0, len(self.labels))
        probs = compose(aligned[0], aligned[1:], self.plan) if ok else empty
        return Predictions([str(p) for p in paths], probs, ok, errors)

    def predict_images(self, images: Sequence, tta: str | None = None) -> torch.Tensor:
        """Probabilities over the original labels for decoded RGB PIL images."""
        out = [p.predict_images(images, tta) for p in self._parts()]
        return compose(out[0], out[1:], self.plan)

    def probability_module(self) -> nn.Module:
        """Stage 1 and the stage-2 models on one input (they must resize and crop alike)."""
        if self.preprocessing is None:
            raise ImgclfError(
                "the two-stage model's stages use different input sizes, interpolations or crops; "
                "one ONNX input cannot feed them all"
            )
        return TwoStageModule([p.probability_module() for p in self._parts()], self.plan)


def _plan(stage1_labels, groups, stage2, labels) -> dict:
    """Index tensors that turn stage outputs into the label map's columns: per group (stage-1
    column, stage-2 columns in group order or None for a singleton, index into the stage-2
    outputs), then the permutation from group order to label-map order."""
    where = {n: i for i, n in enumerate(stage1_labels)}
    missing = [group_name(i) for i in range(len(groups)) if group_name(i) not in where]
    if missing or len(stage1_labels) != len(groups):
        raise ImgclfError(f"stage 1 predicts {list(stage1_labels)}, not the groups {missing}")
    blocks, order, m = [], [], 0
    for i, g in enumerate(groups):
        order.extend(g)
        if len(g) == 1:
            blocks.append((where[group_name(i)], None, -1))
            continue
        model = stage2[i]
        if model is None or sorted(model.labels) != sorted(g):
            raise ImgclfError(f"stage 2 of {group_name(i)} must predict {g}")
        cols = torch.tensor([list(model.labels).index(c) for c in g])
        blocks.append((where[group_name(i)], cols, m))
        m += 1
    odd = sorted(set(labels) ^ set(order))
    if odd or len(order) != len(labels):
        raise ImgclfError(f"the groups do not cover the labels exactly: {odd}")
    return {"blocks": blocks, "perm": torch.tensor([order.index(n) for n in labels])}


def compose(p1: torch.Tensor, p2: Sequence[torch.Tensor], plan: dict) -> torch.Tensor:
    """P(class) = P(group) × P(class | group), columns in label-map order."""
    cols = []
    for g, sub, j in plan["blocks"]:
        pg = p1[:, g : g + 1]
        cols.append(pg if sub is None else pg * p2[j].index_select(1, sub.to(p1.device)))
    return torch.cat(cols, 1).index_select(1, plan["perm"].to(p1.device))


class TwoStageModule(nn.Module):
    """Stage modules on one input, composed by `compose` (index tensors held as buffers)."""

    def __init__(self, parts: Sequence[nn.Module], plan: dict) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.blocks = [(g, sub is not None, j) for g, sub, j in plan["blocks"]]
        for i, (_, sub, _) in enumerate(plan["blocks"]):
            if sub is not None:
                self.register_buffer(f"cols_{i}", sub.clone())
        self.register_buffer("perm", plan["perm"].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [m(x) for m in self.parts]
        blocks = [
            (g, getattr(self, f"cols_{i}") if has else None, j)
            for i, (g, has, j) in enumerate(self.blocks)
        ]
        return compose(out[0], out[1:], {"blocks": blocks, "perm": self.perm})


register_loader(TWO_STAGE, TwoStage.load)
