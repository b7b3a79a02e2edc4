"""Splits: stratified within one image, duplicates together, deterministic, small classes kept."""

from __future__ import annotations

import copy
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgclf.data.manifest import SPLITS, Entry, LabelMap, Manifest
from imgclf.data.split import SplitReport, compute_splits, split_manifest
from imgclf.errors import ImgclfError

FAST = settings(max_examples=60, deadline=None)
THREE_WAY = {"train": 0.65, "val": 0.2, "test": 0.15}


def make_class(label: str, n: int, start: int = 0) -> list[Entry]:
    """n distinct images of one class (unique sha256 each)."""
    return [
        Entry(path=f"{label}/{i:04d}.jpg", label=label, sha256=f"{label}-{i}", status="ok")
        for i in range(start, start + n)
    ]


def make_manifest(entries: list[Entry]) -> Manifest:
    return Manifest(
        root=Path("/data"),
        entries=entries,
        labels=LabelMap.from_names(e.label for e in entries if e.ok),
        settings={"min_size": 8},
        report={"n": len(entries)},
    )


def path_to_split(entries: list[Entry], splits: list[str]) -> dict[str, str]:
    return {e.path: s for e, s in zip(entries, splits, strict=True)}


@st.composite
def fractions_st(draw) -> dict[str, float]:
    """Random valid fractions: 2- or 3-way, integer weights so they sum to 1 in float."""
    train = draw(st.integers(1, 20))
    val = draw(st.integers(1, 10))
    test = draw(st.integers(0, 10))
    total = train + val + test
    out = {"train": train / total, "val": val / total}
    if test or draw(st.booleans()):
        out["test"] = test / total
    return out


@FAST
@given(
    sizes=st.lists(st.integers(3, 60), min_size=1, max_size=5),
    fractions=fractions_st(),
    seed=st.integers(0, 2**31),
)
def test_per_class_counts_within_one_image_and_full_coverage(sizes, fractions, seed):
    entries = [e for k, n in enumerate(sizes) for e in make_class(f"c{k}", n)]
    # Non-ok entries, one sharing bytes with an ok image: they must get "" and join no group.
    entries += [
        Entry(path="c0/bad.jpg", label="c0", sha256="c0-0", status="skipped"),
        Entry(path="notes.txt", label="", status="ignored"),
    ]
    splits, report = compute_splits(entries, fractions, seed)

    assert len(splits) == len(entries)
    for e, s in zip(entries, splits, strict=True):
        assert (s in SPLITS) if e.ok else (s == "")
    active = {s for s, f in fractions.items() if f > 0}
    assert set(report.fractions) == active
    for k, n in enumerate(sizes):
        counts = Counter(
            s for e, s in zip(entries, splits, strict=True) if e.label == f"c{k}" and e.ok
        )
        assert sum(counts.values()) == n
        assert report.per_class[f"c{k}"] == {s: counts[s] for s in SPLITS}
        for split in SPLITS:
            expected = n * fractions.get(split, 0.0)
            assert abs(counts[split] - expected) < 1 + 1e-9, (split, counts, n, fractions)
    assert report.train_only_classes == []


def test_largest_remainder_ties_go_to_earlier_split():
    # 10 × (.45, .45, .1) = 4.5, 4.5, 1: one spare image, the tie goes to train.
    splits, _ = compute_splits(make_class("a", 10), {"train": 0.45, "val": 0.45, "test": 0.1}, 0)
    assert Counter(splits) == {"train": 5, "val": 4, "test": 1}


def test_duplicates_stay_together_even_across_classes():
    entries = make_class("cat", 20) + make_class("dog", 20)
    # Same bytes in three files: two cats and a dog -> one group, homed with "cat".
    for e in (entries[0], entries[1], entries[25]):
        e.sha256 = "same-bytes"
    entries[5].sha256 = entries[6].sha256 = "pair"
    for seed in range(20):
        splits, report = compute_splits(entries, THREE_WAY, seed)
        assert len({splits[0], splits[1], splits[25]}) == 1
        assert splits[5] == splits[6]
        assert report.duplicate_groups == 2
        assert any("different labels" in n and "dog/0005.jpg" in n for n in report.notes)


@FAST
@given(
    rows=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 15)), min_size=1, max_size=80),
    fractions=fractions_st(),
    seed=st.integers(0, 1000),
)
def test_identical_bytes_never_straddle_splits(rows, fractions, seed):
    entries = [
        Entry(path=f"{label}/{i}.png", label=label, sha256=f"h{h}", status="ok")
        for i, (label, h) in enumerate(rows)
    ]
    splits, report = compute_splits(entries, fractions, seed)
    by_hash = defaultdict(set)
    for e, s in zip(entries, splits, strict=True):
        by_hash[e.sha256].add(s)
    assert all(len(v) == 1 for v in by_hash.values()), by_hash
    assert report.duplicate_groups == sum(n > 1 for n in Counter(h for _, h in rows).values())


def test_same_seed_same_result_and_entry_order_does_not_matter():
    entries = make_class("a", 37) + make_class("b", 23) + make_class("class_10", 11)
    entries[3].sha256 = entries[40].sha256 = "dup"
    first, report = compute_splits(entries, THREE_WAY, 7)
    again, report2 = compute_splits(entries, THREE_WAY, 7)
    assert first == again and report == report2
    expected = path_to_split(entries, first)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = entries[:]
        rng.shuffle(shuffled)
        splits, report3 = compute_splits(shuffled, THREE_WAY, 7)
        assert path_to_split(shuffled, splits) == expected
        assert report3.per_class == report.per_class


@FAST
@given(sizes=st.lists(st.integers(3, 30), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_entry_order_never_matters(sizes, seed):
    entries = [e for k, n in enumerate(sizes) for e in make_class(f"k{k}", n)]
    entries[0].sha256 = entries[-1].sha256 = "shared"
    base = path_to_split(entries, compute_splits(entries, THREE_WAY, seed)[0])
    shuffled = entries[::-1]
    assert path_to_split(shuffled, compute_splits(shuffled, THREE_WAY, seed)[0]) == base


def test_different_seed_different_assignment():
    entries = make_class("a", 50)
    a, _ = compute_splits(entries, THREE_WAY, 0)
    b, _ = compute_splits(entries, THREE_WAY, 1)
    assert a != b
    assert Counter(a) == Counter(b)  # same proportions, different images


@pytest.mark.parametrize(
    "fractions", [{"train": 0.8, "val": 0.2}, {"train": 0.8, "val": 0.2, "test": 0}]
)
def test_two_way_split(fractions):
    splits, report = compute_splits(make_class("a", 50) + make_class("b", 7), fractions, 3)
    assert report.fractions == {"train": 0.8, "val": 0.2}
    assert report.per_class == {
        "a": {"train": 40, "val": 10, "test": 0},
        "b": {"train": 6, "val": 1, "test": 0},  # 5.6 + 1.4: the spare image goes to train
    }
    assert "test" not in splits


def test_tiny_classes_kept_in_train_and_reported():
    entries = make_class("big", 30) + make_class("one", 1) + make_class("two", 2)
    splits, report = compute_splits(entries, THREE_WAY, 0)
    by_label = defaultdict(set)
    for e, s in zip(entries, splits, strict=True):
        by_label[e.label].add(s)
    assert by_label["one"] == {"train"} and by_label["two"] == {"train"}
    assert by_label["big"] == set(SPLITS)
    assert report.train_only_classes == ["one", "two"]
    assert any("'two' has 2 images: kept in train only" in n for n in report.notes)
    assert any("'one' has 1 image: kept in train only" in n for n in report.notes)
    # With two splits, a 2-image class can be stratified; a 1-image class cannot.
    _, two_way = compute_splits(entries, {"train": 0.5, "val": 0.5}, 0)
    assert two_way.train_only_classes == ["one"]


def test_tiny_class_duplicated_into_big_class_stays_in_train():
    entries = make_class("big", 30) + make_class("tiny", 1)
    entries[-1].sha256 = entries[0].sha256  # homed with "big", but touches a train-only class
    for seed in range(10):
        splits, report = compute_splits(entries, THREE_WAY, seed)
        assert splits[0] == splits[-1] == "train"
        assert report.train_only_classes == ["tiny"]


def test_no_ok_entries_is_not_a_crash():
    splits, report = compute_splits([Entry(path="x", status="skipped")], THREE_WAY, 0)
    assert splits == [""] and report.per_class == {}


def test_given_split_respected():
    entries = make_class("a", 4) + make_class("b", 3)
    for e, s in zip(
        entries, ["train", "val", "test", "train", "train", "train", "val"], strict=True
    ):
        e.split = s
    out, report = split_manifest(make_manifest(entries), THREE_WAY, 0)
    assert [e.split for e in out.entries] == [e.split for e in entries]
    assert report.source == "given"
    assert report.per_class == {
        "a": {"train": 2, "val": 1, "test": 1},
        "b": {"train": 2, "val": 1, "test": 0},
    }
    assert report.fractions == {
        "train": round(4 / 7, 6),
        "val": round(2 / 7, 6),
        "test": round(1 / 7, 6),
    }


def test_partial_split_raises_with_counts_and_force_recomputes():
    entries = make_class("a", 20)
    entries[0].split, entries[1].split = "train", "val"
    manifest = make_manifest(entries)
    with pytest.raises(ImgclfError, match=r"2 of 20 .* 18 lack one.*--force"):
        split_manifest(manifest, THREE_WAY, 0)
    out, report = split_manifest(manifest, THREE_WAY, 0, force=True)
    assert report.source == "computed"
    assert Counter(e.split for e in out.entries) == {"train": 13, "val": 4, "test": 3}
    # Recomputing ignores the old values: the same as splitting from scratch.
    fresh = make_manifest(make_class("a", 20))
    assert [e.split for e in out.entries] == [
        e.split for e in split_manifest(fresh, THREE_WAY, 0)[0].entries
    ]
    # A complete given split is also recomputed under force.
    _, forced = split_manifest(out, THREE_WAY, 5, force=True)
    assert forced.source == "computed"


def test_unknown_split_values_are_not_silently_overwritten():
    entries = make_class("a", 5)
    for e in entries:
        e.split = "validation"
    with pytest.raises(ImgclfError, match="validation"):
        split_manifest(make_manifest(entries), THREE_WAY, 0)


@pytest.mark.parametrize(
    ("fractions", "named"),
    [
        ({"train": 0.8, "val": -0.1, "test": 0.3}, "val=-0.1"),
        ({"train": 0.8, "valid": 0.2}, "'valid'"),
        ({"train": 0.7, "val": 0.2}, "0.9"),
        ({"train": 0.0, "val": 1.0}, "train=0.0"),
        ({"val": 0.5, "test": 0.5}, "train=0"),
        ({"train": 0.8, "val": "0.2"}, "val='0.2'"),
        ({"train": float("nan"), "val": 0.2}, "train=nan"),
    ],
)
def test_invalid_fractions_name_the_value(fractions, named):
    with pytest.raises(ImgclfError, match=named.replace(".", r"\.")):
        compute_splits(make_class("a", 5), fractions, 0)
    with pytest.raises(ImgclfError, match=named.replace(".", r"\.")):
        split_manifest(make_manifest(make_class("a", 5)), fractions, 0)


def test_split_manifest_does_not_mutate_input():
    entries = (
        make_class("a", 12)
        + make_class("b", 2)
        + [Entry(path="x.txt", status="ignored", split="train")]
    )
    manifest = make_manifest(entries)
    before = copy.deepcopy(manifest)
    out, _ = split_manifest(manifest, THREE_WAY, 0)
    assert manifest == before
    assert all(e.split == "" for e in manifest.entries[:-1])
    assert all(e.split in SPLITS for e in out.entries if e.ok)
    assert out.entries[-1].split == ""  # non-ok entries never carry a split
    assert not any(a is b for a, b in zip(manifest.entries, out.entries, strict=True))
    out.settings["changed"] = True
    out.report["changed"] = True
    assert manifest == before
    assert out.has_split and out.labels == manifest.labels


def test_report_to_dict_is_plain():
    _, report = compute_splits(make_class("a", 10), THREE_WAY, 0)
    d = report.to_dict()
    assert isinstance(report, SplitReport)
    assert d["source"] == "computed" and d["seed"] == 0
    assert d["per_class"] == {"a": {"train": 7, "val": 2, "test": 1}}
    assert set(d) == {
        "fractions",
        "seed",
        "source",
        "per_class",
        "train_only_classes",
        "duplicate_groups",
        "notes",
    }
