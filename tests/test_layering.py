"""Layering of src/imgclf: packages sit on floors and import only their own floor or lower ones,
and no two files import each other (directly or round a circle) across packages.

The import graph is read with `ast` from the source, so it holds every import: module level,
inside functions and under `if TYPE_CHECKING:` alike (a lazy import is still a dependency).
A "package" is the first name under imgclf: `imgclf.train.fit` is in `train`, the single-file
`imgclf.files` is `files`, and `imgclf` itself (`__version__`) is `imgclf`.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A package may import its own floor or lower ones, never a higher one; packages
# on one floor may import each other one way only (no package-level circle, see below).
FLOORS: list[set[str]] = [
    # 0: no imgclf package above them (`imgclf` is the root package: __version__)
    {
        "imgclf",
        "errors",
        "files",
        "config",
        "configs",
        "metric_names",
        "geometry",
        "progress",
    },
    # 1: the data layer, model building, the run folder (records, checkpoints, leaderboard)
    {"data", "models", "runs"},
    # 2: a model from its folder, and prediction (never training: issue 15)
    {"predict"},
    # 3: scoring a model folder (evaluate.metrics itself is numpy only)
    {"evaluate"},
    # 4: training a run (finalize scores and predicts with the floors below)
    {"train"},
    # 5: what is built from those: recipes, sweeps, the server, checks, benchmarks
    {"workflows", "sweep", "serve", "doctor"},
    # 6: the command line
    {"commands", "cli", "__main__"},
]

# File circles inside one package that are known and allowed, each with its reason. Circles
# across packages have no exceptions.
KNOWN_FILE_CYCLES = {
    # image_cache.py builds a missing entry on first use through a function-level import of
    # image_cache_build.build_entry, which needs image_cache.py's layout helpers (paths, keys).
    frozenset({"imgclf.data.image_cache", "imgclf.data.image_cache_build"}),
}


def module_names(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package __init__) for every .py under root/imgclf."""
    out = {}
    for path in sorted((root / "imgclf").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module → the imgclf modules it imports anywhere in its file (itself excluded)."""
    modules = module_names(root)

    def known(name: str) -> str | None:  # the longest prefix that is a module of ours
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the current package, `level - 1` up
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from imgclf.predict import loading` names a module, `... import X` a name
                # defined in `source` itself
                named = [f"{source}.{a.name}" for a in node.names]
                targets = [t for t in named if t in modules]
                if len(targets) < len(named):
                    targets.append(source)
            else:
                continue
            deps.update(m for t in targets if t.split(".")[0] == "imgclf" and (m := known(t)))
        deps.discard(name)
        graph[name] = deps
    return graph


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor_of() -> dict[str, int]:
    return {p: i for i, floor in enumerate(FLOORS) for p in floor}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (every circle lies in one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {package(m): set() for m in graph}
    for a, deps in graph.items():
        out[package(a)].update(package(b) for b in deps if package(b) != package(a))
    return out


def edges_between(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    return sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in component)


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each (empty when the layering holds)."""
    floors, problems = floor_of(), []
    for pkg in sorted({package(m) for m in graph} - set(floors)):
        problems.append(f"package {pkg!r} is on no floor: add it to FLOORS in {__file__}")
    for component in cycles(graph):
        if len({package(m) for m in component}) > 1:
            problems.append(f"file circle across packages: {edges_between(graph, component)}")
        elif frozenset(component) not in KNOWN_FILE_CYCLES:
            problems.append(f"file circle: {edges_between(graph, component)}")
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            fa, fb = floors.get(package(a)), floors.get(package(b))
            if fa is not None and fb is not None and fb > fa:
                problems.append(f"{a} (floor {fa}) imports {b} (floor {fb}), a higher floor")
    packages = package_graph(graph)
    for component in cycles(packages):
        problems.append(f"packages import each other: {edges_between(packages, component)}")
    return problems


# ---------------------------------------------------------------- the rules on src/imgclf


def test_every_package_is_on_exactly_one_floor():
    listed = [p for floor in FLOORS for p in floor]
    assert len(listed) == len(set(listed)), "a package is on two floors"
    missing = {package(m) for m in import_graph()} - set(listed)
    assert not missing, f"add {sorted(missing)} to FLOORS"


def test_no_file_circle_between_packages():
    graph = import_graph()
    across = [c for c in cycles(graph) if len({package(m) for m in c}) > 1]
    assert not across, [edges_between(graph, c) for c in across]


def test_no_file_circle_inside_a_package_beyond_the_known_ones():
    graph = import_graph()
    inside = [c for c in cycles(graph) if len({package(m) for m in c}) == 1]
    assert {frozenset(c) for c in inside} <= KNOWN_FILE_CYCLES, [
        edges_between(graph, c) for c in inside if frozenset(c) not in KNOWN_FILE_CYCLES
    ]


def test_no_package_imports_a_higher_floor():
    floors, graph = floor_of(), import_graph()
    upward = [
        f"{a} imports {b}"
        for a, deps in sorted(graph.items())
        for b in sorted(deps)
        if floors.get(package(b), -1) > floors.get(package(a), len(FLOORS))
    ]
    assert not upward, upward


def test_packages_do_not_import_each_other():
    packages = package_graph(import_graph())
    assert not cycles(packages), [edges_between(packages, c) for c in cycles(packages)]


def test_the_whole_layering_holds():
    assert layering_problems(import_graph()) == []


# ---------------------------------------------------------------- the checker itself


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of src/imgclf's module names (empty files) plus `files` (name → source)."""
    for name, (_, is_package) in module_names(SRC).items():
        path = tmp_path / "imgclf" / Path(*name.split(".")[1:])
        target = path / "__init__.py" if is_package else path.with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    for name, source in files.items():
        (tmp_path / Path(*name.split("."))).with_suffix(".py").write_text(textwrap.dedent(source))
    return tmp_path


def test_checker_sees_a_function_level_import_of_a_higher_floor(tmp_path):
    lazy = "def f():\n    from imgclf.train.fit import fit\n"
    root = _tree(tmp_path, {"imgclf.predict.predictor": lazy})
    assert layering_problems(import_graph(root)) == [
        "imgclf.predict.predictor (floor 2) imports imgclf.train.fit (floor 4), a higher floor"
    ]


def test_checker_sees_circles_across_packages(tmp_path):
    root = _tree(
        tmp_path,
        {
            "imgclf.workflows.ensemble": "def f():\n    from imgclf.sweep import runner\n",
            "imgclf.sweep.runner": "from imgclf.workflows import ensemble\n",
        },
    )
    problems = layering_problems(import_graph(root))
    assert any(p.startswith("file circle across packages") for p in problems)
    assert any(p.startswith("packages import each other") for p in problems)


def test_checker_sees_an_upward_import_under_type_checking(tmp_path):
    source = """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from imgclf.commands import predict
    """
    root = _tree(tmp_path, {"imgclf.data.scan": source})
    problems = layering_problems(import_graph(root))
    assert problems == [
        "imgclf.data.scan (floor 1) imports imgclf.commands.predict (floor 6), a higher floor"
    ]


def test_checker_sees_a_relative_import_and_an_unplaced_package(tmp_path):
    root = _tree(
        tmp_path,
        {"imgclf.files": "from .sweep import runner\n", "imgclf.newpkg": "import imgclf.errors\n"},
    )
    problems = layering_problems(import_graph(root))
    assert (
        "imgclf.files (floor 0) imports imgclf.sweep.runner (floor 5), a higher floor" in problems
    )
    assert any("package 'newpkg' is on no floor" in p for p in problems)
