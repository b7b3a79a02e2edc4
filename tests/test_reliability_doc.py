"""docs/RELIABILITY.md and the code stay in step: every row id that src/ or tests/ cites
("RELIABILITY H9", "docs/RELIABILITY.md rows 1-15", "RELIABILITY F4–F6 and F8") is a row of the
catalog, and every test the catalog names (`tests/FILE.py::test_name`) exists."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "RELIABILITY.md"

ROW = re.compile(r"^\| ([FH]?\d+) \|(.*)$", re.M)
ID = r"[FH]?\d+"
CITATION = re.compile(rf"RELIABILITY(?:\.md)?\s+(?:rows?\s+)?({ID}(?:\s*(?:,|and|-|–)\s*{ID})*)")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)`")
FILE_REF = re.compile(r"`(tests/[\w/]+\.py)`")


def doc_rows() -> dict[str, str]:
    """Row id → the rest of its table line."""
    rows: dict[str, str] = {}
    for m in ROW.finditer(DOC.read_text(encoding="utf-8")):
        assert m.group(1) not in rows, f"row {m.group(1)} appears twice in {DOC.name}"
        rows[m.group(1)] = m.group(2)
    return rows


def expand(ids: str) -> list[str]:
    """'H1-H4, H9' → ['H1', 'H2', 'H3', 'H4', 'H9']; '7, 8 and 9' → ['7', '8', '9']."""
    out: list[str] = []
    for part in re.split(r"\s*(?:,|and)\s*", ids):
        ends = re.split(r"\s*[-–]\s*", part)
        if len(ends) == 1:
            out.append(ends[0])
            continue
        (p1, a), (p2, b) = (re.fullmatch(r"([FH]?)(\d+)", e).groups() for e in ends)
        assert p1 == p2 and int(a) < int(b), f"bad range {part!r}"
        out += [f"{p1}{i}" for i in range(int(a), int(b) + 1)]
    return out


def citations() -> list[tuple[str, str]]:
    """(where, id) for every row id cited in src/ and tests/ (this file aside)."""
    found = []
    for path in sorted([*(REPO / "src").rglob("*.py"), *(REPO / "tests").rglob("*.py")]):
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found += [(f"{path.relative_to(REPO)}:{line}", i) for i in expand(m.group(1))]
    return found


def named_tests() -> list[tuple[int, str, str]]:
    """(doc line, test file, test name) for every `tests/...::name` in the doc; a bare `::name`
    names a test of the file named last on the same line."""
    refs = []
    for n, line in enumerate(DOC.read_text(encoding="utf-8").splitlines(), 1):
        current = None
        for m in TEST_REF.finditer(line):
            current = m.group(1) or current
            assert current, f"{DOC.name}:{n}: `::{m.group(2)}` follows no test file on its line"
            refs.append((n, current, m.group(2)))
    return refs


def test_the_catalog_has_every_row_once_in_order():
    rows = list(doc_rows())
    expected = [str(i) for i in range(1, 34)] + [f"F{i}" for i in range(1, 11)]
    expected += [f"H{i}" for i in range(1, 11)]
    assert rows[: len(expected)] == expected
    for prefix in ("", "F", "H"):  # rows added later continue their table's numbering
        numbers = [int(r.lstrip("FH")) for r in rows if r.rstrip("0123456789") == prefix]
        assert numbers == list(range(1, len(numbers) + 1)), prefix or "images and folders"


def test_every_row_names_a_test_or_says_it_has_none():
    for row, rest in doc_rows().items():
        assert TEST_REF.search(rest) or "no test yet" in rest, f"row {row} names no test"


def test_every_cited_row_is_in_the_catalog():
    rows = doc_rows()
    cited = citations()
    assert len(cited) > 50  # the parser still finds the citations
    missing = [f"{where}: {i}" for where, i in cited if i not in rows]
    assert not missing, f"cited but not in {DOC.name}:\n" + "\n".join(missing)


def test_no_citation_points_outside_the_repository():
    stale = [
        f"{path.relative_to(REPO)}"
        for path in [*(REPO / "src").rglob("*.py"), *(REPO / "tests").rglob("*.py")]
        if "BAD_" + "INPUTS" in path.read_text(encoding="utf-8")
    ]
    assert not stale, f"cite docs/RELIABILITY.md rows instead: {stale}"


def test_every_test_the_catalog_names_exists():
    refs = named_tests()
    assert len(refs) > 100
    functions: dict[str, set[str]] = {}
    missing = []
    for line, file, name in refs:
        if file not in functions:
            path = REPO / file
            assert path.is_file(), f"{DOC.name}:{line}: {file} does not exist"
            tree = ast.parse(path.read_text(encoding="utf-8"))
            functions[file] = {
                node.name
                for node in tree.body
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            }
        if not name.startswith("test_") or name not in functions[file]:
            missing.append(f"{DOC.name}:{line}: {file}::{name}")
    assert not missing, "named in the catalog but not a test:\n" + "\n".join(missing)


def test_every_test_file_the_catalog_names_exists():
    text = DOC.read_text(encoding="utf-8")
    missing = [f for f in FILE_REF.findall(text) if not (REPO / f).is_file()]
    assert not missing, missing


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ("H9", ["H9"]),
        ("1-3", ["1", "2", "3"]),
        ("F4–F6 and F8", ["F4", "F5", "F6", "F8"]),
        ("15, 31, 32", ["15", "31", "32"]),
    ],
)
def test_expand(ids, expected):
    assert expand(ids) == expected
