"""Stratified, seeded train/val/test splits that keep identical files together.

The split is data: `split_manifest` fills the manifest's split column once and training only
reads it (STYLE #9). The result depends only on the ok entries' (path, label, sha256), the
fractions and the seed, never on entry order, so a re-scan that lists files differently
splits them the same way.
"""

from __future__ import annotations

import difflib
import math
import numbers
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from imgclf.data.manifest import SPLITS, Entry, Manifest, natural_key
from imgclf.errors import ImgclfError

_MAX_LISTED = 5  # notes list a few examples, not every duplicate in a large data set


@dataclass
class SplitReport:
    """What the split did, for the scan/split report and the run folder."""

    fractions: dict[str, float]
    seed: int
    source: str  # computed | given
    per_class: dict[str, dict[str, int]]
    train_only_classes: list[str] = field(default_factory=list)
    duplicate_groups: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Checked fractions in split order, with zero-fraction splits left out."""
    for key in fractions:
        if key not in SPLITS:
            near = difflib.get_close_matches(str(key), SPLITS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ImgclfError(
                f"unknown split {key!r} in fractions; valid splits are {', '.join(SPLITS)}{hint}"
            )
    for key, value in fractions.items():
        # bool is an int subclass: `val=True` is a typo, not a fraction of 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ImgclfError(f"split fraction {key}={value!r} is not a number")
        if not math.isfinite(value) or value < 0:
            raise ImgclfError(f"split fraction {key}={value!r} must be a finite number ≥ 0")
    total = sum(float(v) for v in fractions.values())
    listing = ", ".join(f"{k}={v!r}" for k, v in fractions.items())
    if abs(total - 1.0) > 1e-6:
        raise ImgclfError(
            f"split fractions sum to {total:g} ({listing}), not 1; "
            "e.g. train=0.7 val=0.15 test=0.15"
        )
    if not fractions.get("train", 0) > 0:
        raise ImgclfError(
            f"split fraction train={fractions.get('train', 0)!r} must be > 0 ({listing})"
        )
    return {s: float(fractions[s]) for s in SPLITS if fractions.get(s, 0) > 0}


def _class_key(label: str) -> tuple:
    # natural_key folds Unicode forms together; the raw name keeps the order total.
    return (natural_key(label), label)


def _ident(e: Entry) -> tuple[str, str, str]:
    return (e.path, e.label, e.sha256)


def _targets(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder rounding: each split within one image of n × fraction."""
    exact = {s: round(n * f, 9) for s, f in fractions.items()}  # 0.7*10 must not floor to 6
    counts = {s: math.floor(q) for s, q in exact.items()}
    # sorted() is stable, so equal remainders go to the earlier split (train, val, test).
    order = sorted(exact, key=lambda s: exact[s] - counts[s], reverse=True)
    for i in range(n - sum(counts.values())):
        counts[order[i % len(order)]] += 1
    return counts


def _groups(entries: Sequence[Entry], ok_idx: list[int]) -> list[list[int]]:
    """Indices of ok entries grouped by identical bytes (or by path when there is no hash)."""
    by_key: dict[str, list[int]] = {}
    for i in ok_idx:
        e = entries[i]
        by_key.setdefault(f"sha:{e.sha256}" if e.sha256 else f"path:{e.path}", []).append(i)
    groups = [sorted(g, key=lambda i: _ident(entries[i])) for g in by_key.values()]
    # Sorted by content (smallest path first), so the input order cannot leak into the RNG.
    return sorted(groups, key=lambda g: [_ident(entries[i]) for i in g])


def _home(group: list[int], entries: Sequence[Entry]) -> str:
    """The class a cross-class group is stratified with: its most common label."""
    counts = Counter(entries[i].label for i in group)
    return min(counts, key=lambda lab: (-counts[lab], _class_key(lab)))


def _assign_class(
    label: str, groups: list[list[int]], forced: set[int], fractions: dict[str, float], seed: int
) -> list[str]:
    """One split per group of one class; groups at positions in `forced` go to train."""
    target = _targets(sum(len(g) for g in groups), fractions)
    rng = random.Random(f"{seed}:{label}")  # per class: adding a class leaves the others alone
    order = list(range(len(groups)))
    rng.shuffle(order)
    # Forced groups first so they count against train's target; then larger groups first,
    # because small ones fill the remaining deficits exactly (stable sort keeps the shuffle).
    order.sort(key=lambda k: (k not in forced, -len(groups[k])))
    assigned = dict.fromkeys(fractions, 0)
    out = [""] * len(groups)
    for k in order:
        split = "train" if k in forced else max(fractions, key=lambda s: target[s] - assigned[s])
        assigned[split] += len(groups[k])
        out[k] = split
    return out


def _per_class(entries: Sequence[Entry], splits: Sequence[str]) -> dict[str, dict[str, int]]:
    labels = sorted({e.label for e in entries if e.ok}, key=_class_key)
    table = {lab: dict.fromkeys(SPLITS, 0) for lab in labels}
    for e, s in zip(entries, splits, strict=True):
        if e.ok and s in SPLITS:
            table[e.label][s] += 1
    return table


def _duplicate_notes(
    entries: Sequence[Entry], groups: list[list[int]], splits: Sequence[str]
) -> tuple[int, list[str]]:
    """Count duplicate groups kept in one split; describe cross-class and straddling ones."""
    dups = [g for g in groups if len(g) > 1 and entries[g[0]].sha256]
    kept = [g for g in dups if len({splits[i] for i in g}) == 1]
    notes = [f"{len(kept)} groups of identical files kept together in one split"] if kept else []

    def show(g: list[int]) -> str:
        return ", ".join(f"{entries[i].path} ({entries[i].label}, {splits[i]})" for i in g)

    mixed = [g for g in dups if len({entries[i].label for i in g}) > 1]
    notes += [f"identical files with different labels: {show(g)}" for g in mixed[:_MAX_LISTED]]
    straddle = [g for g in dups if len({splits[i] for i in g}) > 1]
    notes += [f"identical files in different splits: {show(g)}" for g in straddle[:_MAX_LISTED]]
    for name, rest in (("labels", mixed), ("splits", straddle)):
        if len(rest) > _MAX_LISTED:
            notes.append(f"… and {len(rest) - _MAX_LISTED} more groups with different {name}")
    return len(kept), notes


def compute_splits(
    entries: Sequence[Entry], fractions: Mapping[str, float], seed: int
) -> tuple[list[str], SplitReport]:
    """One split per entry ("" where status != ok), stratified by label, duplicates together."""
    fr = validate_fractions(fractions)
    ok_idx = [i for i, e in enumerate(entries) if e.ok]
    sizes = Counter(entries[i].label for i in ok_idx)
    # docs/RELIABILITY.md 29: too few images to give every split one; keep them for training.
    small = sorted((lab for lab, n in sizes.items() if n < len(fr)), key=_class_key)
    small_set = set(small)
    groups = _groups(entries, ok_idx)
    buckets: dict[str, list[list[int]]] = {}
    for g in groups:
        buckets.setdefault(_home(g, entries), []).append(g)
    splits = [""] * len(entries)
    for label, members in buckets.items():
        # A group touching a train-only class goes to train, even when stratified elsewhere.
        forced = {k for k, g in enumerate(members) if {entries[i].label for i in g} & small_set}
        for g, split in zip(members, _assign_class(label, members, forced, fr, seed), strict=True):
            for i in g:
                splits[i] = split
    kept, dup_notes = _duplicate_notes(entries, groups, splits)
    notes = [
        f"class {lab!r} has {sizes[lab]} image{'s' if sizes[lab] > 1 else ''}: "
        "kept in train only; evaluation will not see it"
        for lab in small
    ]
    totals = Counter(s for s in splits if s)
    notes.insert(0, " / ".join(f"{s} {totals[s]}" for s in fr) + f" images (seed {seed})")
    report = SplitReport(fr, seed, "computed", _per_class(entries, splits), small, kept)
    report.notes = notes + dup_notes
    return splits, report


def _given_report(entries: Sequence[Entry], splits: list[str], seed: int) -> SplitReport:
    totals = Counter(s for e, s in zip(entries, splits, strict=True) if e.ok)
    n = sum(totals.values())
    fr = {s: round(totals[s] / n, 6) for s in SPLITS if totals[s]}
    groups = _groups(entries, [i for i, e in enumerate(entries) if e.ok])
    kept, dup_notes = _duplicate_notes(entries, groups, splits)
    notes = [
        "split column given in the manifest: respected; pass `--force` to recompute it",
        " / ".join(f"{s} {totals[s]}" for s in fr) + " images",
    ]
    return SplitReport(fr, seed, "given", _per_class(entries, splits), [], kept, notes + dup_notes)


def split_manifest(
    manifest: Manifest, fractions: Mapping[str, float], seed: int, *, force: bool = False
) -> tuple[Manifest, SplitReport]:
    """A new manifest with the split column filled; an existing complete split is kept."""
    validate_fractions(fractions)  # bad settings fail even when a given split makes them moot
    ok = manifest.ok_entries
    have = sum(e.split in SPLITS for e in ok)
    unknown = sorted({e.split for e in ok if e.split and e.split not in SPLITS})
    if ok and have == len(ok) and not force:
        splits = [e.split if e.ok else "" for e in manifest.entries]
        report = _given_report(manifest.entries, splits, seed)
    elif (have or unknown) and not force:
        bad = f"; unknown split values {unknown[:_MAX_LISTED]}" if unknown else ""
        raise ImgclfError(
            f"{have} of {len(ok)} usable images have a split and {len(ok) - have} lack one{bad}; "
            f"fill the split column with {'/'.join(SPLITS)} for every image, "
            "or pass `--force` to recompute all splits"
        )
    else:
        splits, report = compute_splits(manifest.entries, fractions, seed)
        if have or unknown:
            report.notes.insert(0, f"existing split column replaced (--force; {have} were set)")
    entries = [replace(e, split=s) for e, s in zip(manifest.entries, splits, strict=True)]
    # Fresh containers too, so editing the result can never reach back into the input.
    return replace(
        manifest,
        entries=entries,
        settings=dict(manifest.settings),
        report=dict(manifest.report),
        errors=list(manifest.errors),
    ), report
