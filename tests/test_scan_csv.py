"""CSV manifests as input (docs/RELIABILITY.md rows 27–28): every problem cites its line."""

import unicodedata

import pytest

from imgclf.config import ScanConfig
from imgclf.data.scan import scan

import factory as fx

CFG = ScanConfig(workers=1)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "data"
    fx.write_png(root / "imgs" / "a1.png", seed=1)
    fx.write_png(root / "imgs" / "a2.png", seed=2)
    fx.write_png(root / "imgs" / "b, with comma.png", seed=3)
    fx.write_png(root / "imgs" / unicodedata.normalize("NFD", "é.png"), seed=4)
    return root


def write_csv(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_good_csv_with_bom_quotes_relative_and_unicode_paths(images):
    csv = write_csv(
        images / "list.csv",
        "path,label,split\nimgs/a1.png,a,train\nimgs/a2.png,a,val\n"
        + '"imgs/b, with comma.png",b,train\n'
        + unicodedata.normalize("NFC", "imgs/é.png,b,test\n"),
        bom=True,
    )
    m = scan(csv, CFG, progress=False)
    assert m.errors == [], m.errors
    assert m.source == "csv" and m.root == images.resolve()
    assert {e.path for e in m.ok_entries} == {
        "imgs/a1.png",
        "imgs/a2.png",
        "imgs/b, with comma.png",
        unicodedata.normalize("NFD", "imgs/é.png"),
    }
    assert m.has_split and m.labels.names == ("a", "b")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("imgs/missing.png,a", ":3: file not found: imgs/missing.png"),
        ("imgs/a2.png,", ":3: empty label for imgs/a2.png"),
        (",a", ":3: empty path"),
        ("../outside.png,a", ":3: path ../outside.png contains '..'"),
        ("/etc/hostname,a", ":3: absolute path /etc/hostname is outside the data root"),
        ("imgs/a2.png,a,extra", ":3: expected 2 fields, got 3"),
        ("imgs/a1.png,b", ":3: imgs/a1.png is labelled 'b' but 'a' on line 2"),
    ],
)
def test_broken_rows_are_errors_citing_the_line(images, row, message):
    csv = write_csv(images / "list.csv", f"path,label\nimgs/a1.png,a\n{row}\n")
    m = scan(csv, CFG, progress=False)
    assert any(message in e for e in m.errors), m.errors
    assert not m.usable


def test_duplicate_rows_are_skipped(images):
    csv = write_csv(
        images / "list.csv", "path,label\nimgs/a1.png,a\nimgs/a2.png,a\nimgs/a1.png,a\n"
    )
    m = scan(csv, CFG, progress=False)
    rows = [e for e in m.entries if e.status == "skipped"]
    assert [(e.path, e.reason) for e in rows] == [
        ("imgs/a1.png", "duplicate row: same file as line 2")
    ]
    assert len(m.ok_entries) == 2 and m.errors == []


def test_unknown_label_against_a_given_label_list(images):
    csv = write_csv(images / "list.csv", "path,label\nimgs/a1.png,a\nimgs/a2.png,zebra\n")
    m = scan(csv, CFG, labels=["a", "b"], progress=False)
    assert any(":3: unknown label 'zebra'" in e for e in m.errors)
    assert m.labels.names == ("a", "b")


def test_absolute_path_inside_the_root_is_accepted(images):
    csv = write_csv(images / "list.csv", f"path,label\n{images / 'imgs/a1.png'},a\nimgs/a2.png,b\n")
    m = scan(csv, CFG, progress=False)
    assert m.errors == [] and {e.path for e in m.ok_entries} == {"imgs/a1.png", "imgs/a2.png"}


def test_missing_header_columns(images):
    csv = write_csv(images / "list.csv", "file,class\nimgs/a1.png,a\n")
    m = scan(csv, CFG, progress=False)
    assert any(":1: the header must name the columns path,label" in e for e in m.errors)
