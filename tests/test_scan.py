"""`imgclf scan` against real files for every row the data layer owns (docs/RELIABILITY.md
rows 1–30)."""

import hashlib
import os
import shutil
import unicodedata
from pathlib import Path

import pytest

from imgclf.config import ScanConfig
from imgclf.data.manifest import read_manifest
from imgclf.data.scan import scan, scan_to
from imgclf.errors import ImgclfError

import factory as fx

CFG = ScanConfig(workers=1)


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Every file and folder under root (links not followed) with a hash of its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
            else:
                out[rel] = "dir"
    return out


def by_path(manifest):
    return {e.path: e for e in manifest.entries}


def test_clean_folder_gives_a_usable_manifest(tmp_path):
    root = fx.make_class_folder(tmp_path / "data", classes=("b", "a", "c"), per_class=4)
    m = scan_to(root, tmp_path / "m", CFG, progress=False)
    assert m.usable and m.errors == []
    assert m.labels.names == ("a", "b", "c")
    assert len(m.ok_entries) == 12
    assert all(len(e.sha256) == 64 and e.format == "PNG" and e.width == 32 for e in m.ok_entries)
    again = read_manifest(tmp_path / "m")
    assert [e.path for e in again.entries] == [e.path for e in m.entries]
    assert again.data_hash() == m.data_hash()
    assert m.report["classes"] == {"a": 4, "b": 4, "c": 4}


def build_everything_folder(root: Path, outside: Path) -> tuple[set[str], dict[str, str]]:
    """One folder holding every row 1–24/26 case. Returns (good paths, bad path → reason kind)."""
    good: set[str] = set()
    bad: dict[str, str] = {}

    def ok(rel, writer, **kw):
        writer(root / rel, **kw)
        good.add(rel)

    def skip(rel, writer, kind, **kw):
        writer(root / rel, **kw)
        bad[rel] = kind

    for i in range(3):
        ok(f"cat/good{i}.jpg", fx.write_jpeg, seed=i)
        ok(f"dog/good{i}.jpg", fx.write_jpeg, seed=10 + i)
    skip("cat/truncated.jpg", fx.write_truncated_jpeg, "truncated or corrupt")  # 1
    skip("cat/zero.jpg", fx.write_zero_byte, "empty file")  # 2
    skip("cat/page.jpg", fx.write_text_as_jpg, "not an image")  # 3
    ok("cat/really_png.jpg", fx.write_png_named_jpg, seed=21)  # 4
    ok("cat/cmyk.jpg", fx.write_cmyk_jpeg, seed=22)  # 5
    ok("cat/palette.png", fx.write_palette_png_transparent, seed=23)  # 6
    ok("cat/rgba.png", fx.write_rgba_png, seed=24)
    ok("cat/la.png", fx.write_la_png, seed=25)
    ok("cat/sixteen.png", fx.write_16bit_png, seed=26)  # 7
    ok("cat/gray.png", fx.write_grayscale_png, seed=27)  # 8
    ok("dog/anim.gif", fx.write_animated_gif, seed=28)  # 9
    ok("dog/pages.tif", fx.write_multipage_tiff, seed=29)
    ok("dog/rotated.jpg", fx.write_exif_rotated_jpeg, seed=30)  # 10
    skip("dog/bomb.png", fx.write_bomb_png, "over pixel cap")  # 11
    skip("dog/tiny.png", fx.write_tiny_png, "too small")  # 12
    skip("dog/photo.heic", fx.write_fake_heic, "unsupported format HEIC")  # 13
    ok("dog/x.webp", fx.write_webp, seed=31)  # 14
    ok("dog/x.bmp", fx.write_bmp, seed=32)
    ok("dog/x.tiff", fx.write_tiff, seed=33)
    ok(unicodedata.normalize("NFD", "dog/café.png"), fx.write_png, seed=34)  # 15
    ok(unicodedata.normalize("NFC", "dog/naïve.png"), fx.write_png, seed=35)
    for junk in ("cat/.DS_Store", "dog/Thumbs.db", "desktop.ini"):  # 16
        (root / junk).write_bytes(b"junk")
    fx.write_jpeg(root / "__MACOSX/cat/._good0.jpg", seed=40)  # 17
    (root / "cat/._good1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    fx.write_jpeg(root / ".ipynb_checkpoints/cat/x.jpg", seed=41)  # 18
    fx.write_jpeg(root / "cat/.git/x.jpg", seed=42)
    (root / "empty_class").mkdir()  # 19
    skip("stray.jpg", fx.write_jpeg, "image outside a class folder", seed=43)  # 20
    os.symlink("..", root / "cat/loop")  # 21: a loop
    fx.write_jpeg(outside / "elsewhere.jpg", seed=44)
    os.symlink(outside / "elsewhere.jpg", root / "cat/outside.jpg")
    bad["cat/outside.jpg"] = "symlink"
    os.symlink("../cat/good0.jpg", root / "dog/linked.jpg")  # 21/23: duplicate in another class
    good.add("dog/linked.jpg")
    os.symlink("gone.jpg", root / "cat/dangling.jpg")  # 22: deleted after listing
    bad["cat/dangling.jpg"] = "unreadable"
    ok("class_10/a.png", fx.write_png, seed=50)  # 24
    ok("class_2/a.png", fx.write_png, seed=51)
    ok("class_1/a.png", fx.write_png, seed=52)
    ok("Class_1/b.png", fx.write_png, seed=53)  # 26: collides with class_1 by case
    return good, bad


def test_every_bad_input_in_one_folder(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    good, bad = build_everything_folder(root, outside)
    before = tree_fingerprint(root)

    m = scan_to(root, tmp_path / "m", CFG, progress=False)

    assert tree_fingerprint(root) == before, "scan modified the user's folder"
    rows = by_path(m)
    assert {e.path for e in m.ok_entries} == good
    for rel, kind in bad.items():
        assert rows[rel].status == "skipped", rel
        assert rows[rel].reason.startswith(kind), (rel, rows[rel].reason)
    ignored = {e.path: e.reason for e in m.entries if e.status == "ignored"}
    assert ignored["cat/.DS_Store"] == "macOS .DS_Store"
    assert ignored["dog/Thumbs.db"] == "Windows Thumbs.db"
    assert ignored["desktop.ini"] == "Windows desktop.ini"
    assert ignored["__MACOSX/"] == "__MACOSX folder"
    assert ignored["cat/._good1.jpg"] == "AppleDouble ._ file"
    assert ignored[".ipynb_checkpoints/"] == ignored["cat/.git/"] == "hidden folder"
    assert rows["cat/loop/"].reason.startswith("symlink: loop")
    # What was normalised is recorded on the accepted rows.
    assert "extension .jpg but content is PNG" in rows["cat/really_png.jpg"].reason
    assert rows["cat/cmyk.jpg"].mode == "CMYK" and rows["dog/anim.gif"].frames == 3
    assert rows["dog/rotated.jpg"].width == 32 and rows["dog/rotated.jpg"].height == 64
    # The structural problems are errors that name the files and folders.
    errors = "\n".join(m.errors)
    assert "stray.jpg" in errors and "not in a class folder" in errors
    assert "'empty_class' holds no image files" in errors
    assert "'Class_1', 'class_1'" in errors
    assert "dog/linked.jpg (dog)" in errors and "cat/good0.jpg (cat)" in errors
    assert not m.usable
    assert m.labels.names == (
        "cat",
        "Class_1",
        "class_1",
        "class_2",
        "class_10",
        "dog",
        "empty_class",
    )
    report = m.report
    assert report["unsupported_by_extension"] == {".heic": 1}
    assert report["ignored_by_kind"]["hidden folder"] == 2
    assert set(report["skipped_by_reason"]["truncated or corrupt"]) == {"cat/truncated.jpg"}
    with pytest.raises(ImgclfError, match="not usable"):
        m.require_usable()


def test_label_conflicts_can_be_skipped(tmp_path):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    shutil.copy(root / "a" / os.listdir(root / "a")[0], root / "b" / "copy.png")
    strict = scan(root, CFG, progress=False)
    assert any("identical bytes under different labels" in e for e in strict.errors)
    lenient = scan(root, CFG.model_copy(update={"label_conflicts": "skip"}), progress=False)
    assert lenient.errors == [] and len(lenient.ok_entries) == 5  # 7 files, both copies out
    assert lenient.report["duplicates"]["across_classes"]


def test_duplicates_within_a_class_are_reported_not_fatal(tmp_path):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    first = sorted(os.listdir(root / "a"))[0]
    shutil.copy(root / "a" / first, root / "a" / "again.png")
    m = scan(root, CFG, progress=False)
    assert m.usable
    assert m.report["duplicates"]["within_class"] == [sorted([f"a/{first}", "a/again.png"])]


def test_unicode_forms_of_one_class_name_collide(tmp_path):
    root = tmp_path / "d"
    fx.write_png(root / unicodedata.normalize("NFC", "café") / "a.png", seed=1)
    fx.write_png(root / unicodedata.normalize("NFD", "café") / "b.png", seed=2)
    m = scan(root, CFG, progress=False)
    assert any("differ only by case, spaces or Unicode form" in e for e in m.errors)


def test_unreadable_file_is_skipped_with_the_os_error(tmp_path, monkeypatch):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    target = str(sorted((root / "a").iterdir())[0])
    real_open = open

    def guarded_open(path, *args, **kw):
        if str(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr("builtins.open", guarded_open)
    m = scan(root, CFG, progress=False)
    row = by_path(m)[str(Path(target).relative_to(root))]
    assert row.status == "skipped" and row.reason == "unreadable: Permission denied"
    assert m.usable and len(m.ok_entries) == 5


def test_zero_usable_images_is_an_error_with_the_summary(tmp_path):
    fx.write_zero_byte(tmp_path / "d/a/x.jpg")
    fx.write_text_as_jpg(tmp_path / "d/b/y.jpg")
    m = scan(tmp_path / "d", CFG, progress=False)
    assert any("0 usable images after filtering" in e and "2 skipped" in e for e in m.errors)


def test_skipped_fraction_over_the_limit_aborts(tmp_path):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    for i in range(5):
        fx.write_zero_byte(root / "a" / f"bad{i}.jpg")
    m = scan(root, CFG.model_copy(update={"max_skipped_fraction": 0.5}), progress=False)
    assert any("5 of 9 image files were skipped" in e for e in m.errors)
    m = scan(root, CFG.model_copy(update={"max_skipped_fraction": 0.6}), progress=False)
    assert m.usable


def test_symlinks_outside_followed_only_when_asked(tmp_path):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    fx.write_png(tmp_path / "out" / "o.png", seed=99)
    os.symlink(tmp_path / "out", root / "a" / "more")
    inside = scan(root, CFG, progress=False)
    assert by_path(inside)["a/more/"].status == "skipped"
    followed = scan(root, CFG.model_copy(update={"follow_symlinks": "all"}), progress=False)
    assert by_path(followed)["a/more/o.png"].ok


def test_split_folders_are_respected(tmp_path):
    for split, n in (("train", 3), ("valid", 2), ("test", 1)):
        fx.make_class_folder(tmp_path / "d" / split, classes=("x", "y"), per_class=n, seed=n)
    m = scan(tmp_path / "d", CFG, progress=False)
    assert m.usable and m.has_split
    assert m.report["splits"]["val"] == {"x": 2, "y": 2}
    assert m.labels.names == ("x", "y")


def test_rescan_reuses_unchanged_rows_and_rechecks_changed(tmp_path):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    first = scan_to(root, tmp_path / "m", CFG, progress=False)
    assert first.report["files"]["reused"] == 0
    second = scan_to(root, tmp_path / "m", CFG, progress=False)
    assert second.report["files"]["reused"] == 6
    assert second.data_hash() == first.data_hash()
    changed = sorted((root / "a").iterdir())[0]
    fx.write_truncated_jpeg(changed)
    third = scan_to(root, tmp_path / "m", CFG, progress=False)
    assert third.report["files"]["reused"] == 5
    assert by_path(third)[f"a/{changed.name}"].reason.startswith("truncated or corrupt")
    stricter = scan_to(
        root, tmp_path / "m", CFG.model_copy(update={"min_side": 16}), progress=False
    )
    assert stricter.report["files"]["reused"] == 0


def test_parallel_workers_agree_with_in_process(tmp_path):
    root = fx.make_class_folder(tmp_path / "d", classes=("a", "b"), per_class=40)
    fx.write_truncated_jpeg(root / "a" / "t.jpg")
    serial = scan(root, CFG, progress=False)
    parallel = scan(root, CFG.model_copy(update={"workers": 2}), progress=False)
    assert [(e.path, e.status, e.sha256) for e in serial.entries] == [
        (e.path, e.status, e.sha256) for e in parallel.entries
    ]
